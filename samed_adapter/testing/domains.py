"""A shifted domain for the learning loop: the quick start's MNI152 subject in another contrast.

An adapter trained by the quick start has seen the T1 template, where white matter is brighter
than grey. The same head with its contrast inverted inside the head (``255 - T1`` where the T1
is not zero: white matter darker than grey, as on a T2-weighted scan) keeps the anatomy and its
labels and changes what the model sees, so an adapter that serves it does worse than on T1 and
one fine-tuned on a few corrected slabs of it can do better. Percentile scaling cannot undo the
inversion (it is not a linear map of the same order).

Each slab of axial slices is one "patient": a file pair as a datastore holds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

#: axial (z) slabs of the 2 mm template, one image each: brain in every slab
SLABS = tuple(range(z, z + 6) for z in range(20, 68, 6))


def inverted_contrast(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z) uint8 T1 in 0..255 -> the same head with ``255 - value`` wherever it is not 0."""
    out = image.copy()
    inside = image > 0
    out[inside] = 255 - image[inside]
    return out


def write_shifted_slabs(root: Union[str, os.PathLike], slabs: Sequence[range] = SLABS,
                        prefix: str = "t2like") -> list[tuple[str, Path, Path]]:
    """Write each slab of the inverted-contrast template as ``root/images/<id>.nii.gz`` and its
    grey/white-matter labels as ``root/labels/<id>.nii.gz``; returns ``[(id, image, label)]``.

    World positions are kept (each slab's affine starts at its first slice), as
    :func:`samed_adapter.cli.demo.build_mni_task` writes its slabs.
    """
    import nibabel as nib

    from ..cli.demo import mni_volumes

    root = Path(root)
    image, labels, affine = mni_volumes()
    shifted = inverted_contrast(image)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    for n, slab in enumerate(slabs):
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, slab.start]) + affine[:3, 3]
        cut = slice(slab.start, slab.stop)
        image_id = f"{prefix}_{n:02d}"
        image_path, label_path = root / "images" / f"{image_id}.nii.gz", root / "labels" / f"{image_id}.nii.gz"
        nib.save(nib.Nifti1Image(shifted[:, :, cut], slab_affine), image_path)
        nib.save(nib.Nifti1Image(labels[:, :, cut], slab_affine), label_path)
        written.append((image_id, image_path, label_path))
    return written
