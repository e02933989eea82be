"""OHIF's label upload: the label as raw bytes (``.bin``), one per voxel of its image.

OHIF's MONAI Label panel sends a segmentation as its voxel buffer, without a header, in a file
named ``*.bin``; MONAI Label's ``binary_to_image`` reads it as uint8 and reshapes it to the image
file's (I, J, K) shape with the first axis fastest (Fortran order), on the image's affine. This
does the same, and refuses a buffer whose size is not the image's voxel count, which would
otherwise be cut or padded into a label on the wrong voxels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from .errors import UnsupportedFileError

__all__ = ["BINARY_EXTENSION", "binary_label"]

BINARY_EXTENSION = ".bin"


def binary_label(raw: Union[str, os.PathLike], image: Union[str, os.PathLike],
                 out: Union[str, os.PathLike]) -> Path:
    """Write the ``.bin`` label ``raw`` of ``image`` (a NIfTI file) as NIfTI at ``out``, on the image's grid.

    Raises:
        UnsupportedFileError: ``raw`` is not exactly one byte per voxel of the image.
    """
    import nibabel as nib

    reference = nib.load(os.fspath(image))
    shape = tuple(int(n) for n in reference.shape[:3])
    voxels = int(np.prod(shape))
    size = os.path.getsize(raw)
    if size != voxels:
        raise UnsupportedFileError(
            f"a .bin label holds one byte per voxel of its image, {voxels} for {'x'.join(map(str, shape))}, but "
            f"this one has {size} bytes; send the label of this image, or a NIfTI label (.nii.gz)")
    data = np.fromfile(os.fspath(raw), dtype=np.uint8).reshape(shape, order="F")
    label = nib.Nifti1Image(data, reference.affine)
    label.set_qform(reference.affine, int(reference.header["qform_code"]) or 1)
    label.set_sform(reference.affine, int(reference.header["sform_code"]) or 1)
    out = Path(out)
    nib.save(label, os.fspath(out))
    return out
