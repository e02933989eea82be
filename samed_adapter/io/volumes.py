"""Read any supported image into a slices-first :class:`~samed_adapter.io.volume.Volume` and write
label maps back, by format: NIfTI (:mod:`.nifti`), PNG and NPY (:mod:`.png_npy`), DICOM series
(:mod:`.dicom_series`). The axis convention is :mod:`.volume`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom_folders import is_dicom_file
from .dicom_series import read_dicom_path
from .errors import SUPPORTED, ImageReadError, ImageTooLargeError, UnevenSpacingError
from .files import atomic_path
from .limits import DEFAULT_MAX_VOXELS, resolve_max_voxels
from .nifti import label_nifti, read_nifti
from .paths import READ_SUFFIXES, WRITE_SUFFIXES, image_suffix
from .png_npy import read_npy, read_png, write_png
from .volume import Volume, label_dtype, uneven_message

__all__ = ["read_image", "write_labels"]


def read_image(path: str | os.PathLike[str], *, max_voxels: int = DEFAULT_MAX_VOXELS,
               allow_uneven: bool = False) -> Volume:
    """Read an image into a slices-first :class:`Volume`.

    * ``.nii`` / ``.nii.gz``: float32 ``(Z, Y, X)`` (or ``(Y, X)``) from
      nibabel's ``(X, Y, Z)``; affine and header kept. The voxel size is the affine's (a
      ``UserWarning`` when the header's pixdim says otherwise, as SimpleITK gives).
    * folder, ``.dcm`` or any file with ``DICM`` at byte 128 (``CR1/6154`` on a CD): one DICOM
      series, slices sorted along the slice normal, RescaleSlope/Intercept applied (CT gives
      HU), RAS affine; the slices must be evenly spaced (see
      :func:`~samed_adapter.io.dicom_series.read_dicom_series`).
    * ``.png``: 2-D grayscale, raw 8/16-bit values as float32, no scaling.
    * ``.npy``: 2-D ``(H, W)`` or 3-D ``(D, H, W)`` array as float32, as stored.

    Args:
        max_voxels: the most voxels the image may hold, checked against the size its header
            claims before anything else is read (a hostile 416-byte header can claim 16 GiB).
        allow_uneven: read an unevenly spaced DICOM series into a Volume marked ``uneven``
            (NIfTI writers refuse it) instead of raising :class:`UnevenSpacingError`.

    Raises:
        ImageReadError: the file is missing, unreadable, of an unknown type or cannot be
            decoded; the one-line message names the file and what to do. Subclasses:
            ImageTooLargeError (over ``max_voxels``), TruncatedImageError (fewer bytes than the
            header says), UnevenSpacingError.
    """
    path = Path(path)
    limit = resolve_max_voxels(max_voxels)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder; {SUPPORTED}")
    if path.is_dir():
        suffix = "DICOM folder"
    else:
        _check_readable(path)
        suffix = image_suffix(path)
        if suffix not in READ_SUFFIXES and is_dicom_file(path):
            suffix = ".dcm"  # DICOM files on CDs and in PACS exports carry no suffix
    readers: dict[str, Callable[[Path], Volume]] = {
        "DICOM folder": lambda p: read_dicom_path(p, max_voxels=limit, allow_uneven=allow_uneven),
        ".dcm": lambda p: read_dicom_path(p, max_voxels=limit, allow_uneven=allow_uneven),
        ".nii": lambda p: read_nifti(p, limit), ".nii.gz": lambda p: read_nifti(p, limit),
        ".png": lambda p: read_png(p, limit), ".npy": lambda p: read_npy(p, limit),
    }
    if suffix not in readers:
        kind = suffix or "(no suffix)"
        raise ImageReadError(f"{path}: unknown image type {kind!r}; {SUPPORTED}")
    try:
        return readers[suffix](path)
    except ImageReadError:
        raise
    except MemoryError as exc:  # the header passed the limit but the machine has less
        raise ImageTooLargeError(f"{path}: not enough memory to read it (limit {limit:,} voxels); "
                                 "free memory or lower --max-voxels to refuse such files early") from exc
    except Exception as exc:  # decoders raise many types; report them as one
        kind = "DICOM" if suffix in ("DICOM folder", ".dcm") else suffix
        raise ImageReadError(
            f"{path}: could not decode it as {kind} ({type(exc).__name__}: {exc}); the file is damaged "
            f"or not really {kind}; {SUPPORTED}"
        ) from exc


def _check_readable(path: Path) -> None:
    """Refuse a file that cannot be opened, saying why (permissions, a broken disk) not "damaged"."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open the file ({exc.strerror or exc}); check that it is readable "
                             "(its permissions, the disk or network share it is on)") from exc


def write_labels(labels: np.ndarray, like: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a label map with the geometry of the image it was predicted from.

    Args:
        labels: integer class ids in ``like.array``'s layout, ``(D, H, W)`` or
            ``(H, W)``; bool and integral floats are accepted.
        like: the :class:`Volume` the labels belong to.
        path: ``.nii``/``.nii.gz`` (voxel order, affine, qform/sform of
            ``like``; uint8 or int16, no intensity scaling), ``.png``
            (uint8, one slice) or ``.npy`` (same layout as ``like.array``).

    Returns:
        The written path.  The file appears atomically: a failed write leaves
        no partial file and keeps any previous file at ``path``.

    Raises:
        ValueError: shape mismatch, unsupported suffix or labels that do not
            fit the output type.
        UnevenSpacingError: a NIfTI asked for ``like.uneven`` (unevenly spaced DICOM slices).
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(
            f"labels shape {labels.shape} does not match image shape {like.array.shape}; "
            "pass labels in the slices-first layout of Volume.array"
        )
    fmt = image_suffix(path)
    if fmt not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write labels to {path}; use one of {', '.join(WRITE_SUFFIXES)}")
    if like.uneven and fmt in (".nii", ".nii.gz"):  # checked before the temporary file exists
        raise UnevenSpacingError(uneven_message(like), like.positions)
    out = labels.astype(label_dtype(labels, fmt))
    with atomic_path(path) as tmp:
        if fmt in (".nii", ".nii.gz"):
            nib.save(label_nifti(out, like), tmp)
        elif fmt == ".png":
            write_png(out, tmp)
        else:
            with open(tmp, "xb") as fh:
                np.save(fh, out, allow_pickle=False)
    return path
