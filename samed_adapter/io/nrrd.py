"""A label map as NRRD, the format OHIF's MONAI Label panel asks inference for (``result_extension``
``.nrrd``) and reads with its NRRD parser onto the series it shows.

The voxels are written as the NIfTI holds them (x fastest, then y, then z), with the grid in
NRRD's ``left-posterior-superior`` space (DICOM's patient space, what ITK writes for MONAI Label's
own answers): the NIfTI's RAS affine with its x and y rows negated.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["LABEL_DTYPES", "NRRD_EXTENSIONS", "nifti_label_as_nrrd"]

#: the ``result_extension`` values answered as NRRD (MONAI Label's names)
NRRD_EXTENSIONS = (".nrrd", ".seg.nrrd")
#: ``result_dtype``: numpy's name -> NRRD's type
LABEL_DTYPES = {"uint8": "unsigned char", "uint16": "unsigned short", "int16": "short", "int32": "int"}


def _vector(values: np.ndarray) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def nifti_label_as_nrrd(source: Union[str, os.PathLike], out: Union[str, os.PathLike], dtype: str = "uint16",
                        compress: bool = False) -> Path:
    """Write the NIfTI label map ``source`` (a 3-D integer array, X x Y x Z) as the NRRD ``out``.

    Args:
        dtype: one of :data:`LABEL_DTYPES` (OHIF asks ``uint16``).
        compress: gzip encoding (MONAI Label's ``result_compress``); raw otherwise.

    Raises:
        ValueError: ``dtype`` is not a label type, or the labels do not fit it.
    """
    import nibabel as nib

    if dtype not in LABEL_DTYPES:
        raise ValueError(f"result_dtype {dtype!r}: a label map is written as one of {sorted(LABEL_DTYPES)}")
    image = nib.load(str(source))
    labels = np.asanyarray(image.dataobj)
    if labels.ndim != 3:
        raise ValueError(f"{source}: a label map is 3-D, this one has shape {labels.shape}")
    info = np.iinfo(dtype)
    if labels.size and (labels.min() < info.min or labels.max() > info.max):
        raise ValueError(f"result_dtype {dtype!r}: label ids {labels.min()}..{labels.max()} do not fit it")
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.affine, float)[:3]  # RAS -> LPS
    header = ["NRRD0004", f"type: {LABEL_DTYPES[dtype]}", "dimension: 3", "space: left-posterior-superior",
              "sizes: " + " ".join(str(n) for n in labels.shape),
              "space directions: " + " ".join(_vector(lps[:, k]) for k in range(3)),
              "kinds: domain domain domain", "endian: little", f"encoding: {'gzip' if compress else 'raw'}",
              f"space origin: {_vector(lps[:, 3])}"]
    data = labels.astype(np.dtype(dtype).newbyteorder("<")).tobytes(order="F")  # x fastest, as NRRD's sizes say
    out = Path(out)
    with open(out, "xb") as handle:
        handle.write(("\n".join(header) + "\n\n").encode("ascii"))
        handle.write(gzip.compress(data, compresslevel=6) if compress else data)
    return out
