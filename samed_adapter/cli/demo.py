"""A real-data task that ships with a PyPI package: grey and white matter on the MNI152 template.

nilearn's wheel carries the MNI152 2009 template (T1, stored as 8-bit values 0..255) and its
grey- and white-matter probability maps. Thresholding the maps gives a 3-class label map (0
background, 1 grey matter, 2 white matter). The axial slices of one part of the brain make the
training case and those of another part the held-out case, written in the nnU-Net / Decathlon
layout (`imagesTr/`, `labelsTr/`) that the NIfTI readers take, in the template's raw 0..255
intensities: like a real MR scan, they are scaled by percentile normalisation
(`MNI_PERCENTILES`), which the trained adapter records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

MNI_CLASS_NAMES = ("grey matter", "white matter")
TRAIN_SLICES = range(22, 50)  # axial (z) slices of the lower and middle brain
VAL_SLICES = range(53, 65)  # held out: the upper brain
MNI_PERCENTILES = (0.5, 99.5)  # MR percentile normalisation of the raw 0..255 T1


def mni_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 image (X, Y, Z) uint8 in raw 0..255, labels (X, Y, Z) uint8, affine (4, 4)) at 2 mm.

    nilearn resamples the 1 mm template to 2 mm and divides it by 255; multiplying back gives the
    file's 8-bit intensity scale.
    """
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    grey = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    white = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    labels = np.zeros(template.shape, dtype=np.uint8)
    labels[(grey > 0.5) & (grey >= white)] = 1
    labels[(white > 0.5) & (white > grey)] = 2
    image = np.round(np.clip(template.get_fdata(), 0.0, 1.0) * 255).astype(np.uint8)
    return image, labels, template.affine


def build_mni_task(root: Union[str, os.PathLike], *, train_slices: range = TRAIN_SLICES,
                   val_slices: range = VAL_SLICES) -> Path:
    """Write `mni_train` and `mni_val` slabs as NIfTI under root/imagesTr and root/labelsTr."""
    import nibabel as nib

    root = Path(root)
    image, labels, affine = mni_volumes()
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for case, slices in (("mni_train", train_slices), ("mni_val", val_slices)):
        z0 = slices.start
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, z0]) + affine[:3, 3]  # keep world positions
        sub = slice(slices.start, slices.stop)
        nib.save(nib.Nifti1Image(image[:, :, sub], slab_affine), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels[:, :, sub], slab_affine), root / "labelsTr" / f"{case}.nii.gz")
    return root


def best_constant_dice(image: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of the best trivial predictor: one class on every non-zero voxel.

    A model has learnt something about the anatomy only if it beats this.
    """
    from ..evaluation.metrics import dice

    brain = image > 0.05 * float(image.max())
    best = 0.0
    for c in range(1, num_classes + 1):
        scores = [dice(brain, labels == k) if c == k else 0.0 for k in range(1, num_classes + 1)]
        best = max(best, float(np.mean(scores)))
    return best
