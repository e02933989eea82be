"""What a datastore checks before it writes: safe ids, and a label against its image and the adapter.

Pure checks on names and on :class:`~samed_adapter.io.volume.Volume` objects; nothing here touches
the folder. The grid tolerance: the world positions of the grid's eight corners under the two
affines may differ by at most :data:`GRID_TOLERANCE` of the image's smallest voxel size (ITK asks
1e-6 of a voxel; NIfTI headers store affines in float32 and viewers write them back rounded, so
a thousandth of a voxel, 1 µm at 1 mm, accepts those and refuses any real shift or flip).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .errors import LabelClassError, LabelGridError, UnsafeIdError, UnsupportedFileError

if TYPE_CHECKING:
    from ..adapter_file.config import AdapterConfig
    from ..io.volume import Volume

__all__ = ["EXTENSIONS", "GRID_TOLERANCE", "MAX_ID_BYTES", "check_id", "check_label", "check_label_classes",
           "check_label_grid", "file_checksum", "split_name"]

#: What a folder datastore keeps, longest first (MONAI Label's LocalDatastore's default extensions).
EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
#: Corner displacement allowed between a label's grid and its image's, in units of the image's smallest voxel.
GRID_TOLERANCE = 1e-3
#: An id plus the longest extension must fit a file name (255 bytes on ext4, XFS, NTFS, APFS).
MAX_ID_BYTES = 255 - len(".nii.gz")


def check_id(name: object, what: str = "image id") -> str:
    """``name`` if it is a plain file name of one path component, else :class:`UnsafeIdError`.

    Refused: not a string, empty, ``.``/``..`` or any leading dot (hidden; the datastore's own
    temporaries are hidden), a ``/`` or ``\\`` (``../x``, absolute paths), NUL and other control
    characters, surrounding spaces, and more than :data:`MAX_ID_BYTES` bytes.
    """
    fix = f"use a plain file name such as 'case_001' (letters, digits, '-', '_', inner dots) as the {what}"
    if not isinstance(name, str) or not name:
        raise UnsafeIdError(f"{what} {name!r} is empty or not text; {fix}")
    if name.startswith("."):
        raise UnsafeIdError(f"{what} {name!r} starts with a dot ('.', '..' and hidden names are refused); {fix}")
    if "/" in name or "\\" in name:
        raise UnsafeIdError(f"{what} {name!r} holds a path separator (a path, not a name); {fix}")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise UnsafeIdError(f"{what} {name!r} holds a control character (NUL, newline, ...); {fix}")
    if name != name.strip():
        raise UnsafeIdError(f"{what} {name!r} starts or ends with white space; {fix}")
    if len(os.fsencode(name)) > MAX_ID_BYTES:
        raise UnsafeIdError(f"{what} is {len(os.fsencode(name))} bytes long, more than a file name allows "
                            f"({MAX_ID_BYTES}); {fix}")
    return name


def split_name(file_name: str, extensions: Sequence[str] = EXTENSIONS) -> tuple[str, str]:
    """(id, extension) of a file name as MONAI Label names it: the name less its NIfTI extension.

    Raises:
        UnsupportedFileError: the name ends with none of ``extensions``.
    """
    for ext in sorted(extensions, key=len, reverse=True):
        if file_name.endswith(ext) and len(file_name) > len(ext):
            return file_name[: -len(ext)], ext
    raise UnsupportedFileError(f"{file_name!r}: the datastore keeps {' and '.join(extensions)} files (as MONAI "
                               "Label's local datastore does); convert it first (e.g. samed-adapter's readers, "
                               "or dcm2niix for DICOM)")


def check_round_trip(image_id: str, ext: str, extensions: Sequence[str] = EXTENSIONS) -> None:
    """Refuse an id that MONAI Label would read back as another id from its file name.

    MONAI Label 0.8.5 takes an id as ``file.replace(ext, "")``: every occurrence of the extension
    goes, so ``a.nii`` stored as ``a.nii.nii`` would come back as ``a``.
    """
    name = image_id + ext
    found = ext
    for e in extensions:  # MONAI Label's _to_id: the last listed extension the name ends with wins
        if name.endswith(e):
            found = e
    if name.replace(found, "") != image_id:
        raise UnsafeIdError(f"image id {image_id!r} would be read back by MONAI Label as "
                            f"{name.replace(found, '')!r} from its file {name!r}; choose an id without "
                            f"{' or '.join(extensions)} in it")


def _corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(2**n, 3) world positions (mm) of an n-D grid's corner voxels (n = 2, 3); NIfTI voxel order (i, j, k)."""
    ijk = np.array(list(itertools.product(*[(0, max(n - 1, 0)) for n in shape])), dtype=np.float64)
    return ijk @ affine[:3, :ijk.shape[1]].T + affine[:3, 3]


def check_label_grid(label: "Volume", image: "Volume", name: object = "the label") -> None:
    """Refuse a label whose voxel grid is not its image's (shape, or corners beyond the tolerance).

    Raises:
        LabelGridError: names both shapes, or the largest corner displacement in mm.
    """
    fix = "resample the label onto the image's grid (or save it from a viewer that has the image loaded)"
    if label.array.shape != image.array.shape:
        raise LabelGridError(f"{name}: its grid {label.array.shape[::-1]} (x, y, z) is not its image's "
                             f"{image.array.shape[::-1]}; {fix}")
    nifti_shape = image.array.shape[::-1]
    shift = float(np.abs(_corners(nifti_shape, label.affine) - _corners(nifti_shape, image.affine)).max())
    voxel = float(min(image.spacing))
    if not np.isfinite(shift) or shift > GRID_TOLERANCE * voxel:
        raise LabelGridError(f"{name}: its affine places the grid up to {shift:.4g} mm away from its image's "
                             f"(tolerance {GRID_TOLERANCE * voxel:.3g} mm, {GRID_TOLERANCE} of a voxel); {fix}")


def check_label_classes(label: "Volume", num_classes: int, name: object = "the label",
                        class_names: Optional[Sequence[str]] = None) -> None:
    """Refuse class ids outside ``0..num_classes`` (and values that are not whole numbers).

    Raises:
        LabelClassError: names the offending ids and the classes the adapter has.
    """
    values = np.unique(label.array)
    have = f"0 (background) to {num_classes}" + (f" ({', '.join(class_names)})" if class_names else "")
    fix = f"the adapter's classes are {have}: relabel it, or train an adapter with more classes"
    whole = values == np.round(values)
    if not whole.all():
        raise LabelClassError(f"{name}: holds values that are not class ids ({_few(values[~whole])}); {fix}")
    bad = values[(values < 0) | (values > num_classes)]
    if bad.size:
        raise LabelClassError(f"{name}: holds class ids {_few(bad)} beyond the adapter's; {fix}")


def _few(values: np.ndarray, most: int = 5) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:most])
    return shown + (f", ... ({values.size} in all)" if values.size > most else "")


def check_label(label: "Volume", image: "Volume", config: Optional["AdapterConfig"] = None,
                name: object = "the label") -> None:
    """Both checks: the label's grid against its image's, then (given an adapter config) its class ids."""
    check_label_grid(label, image, name)
    if config is not None:
        check_label_classes(label, int(config.num_classes), name, config.class_names)


def file_checksum(path: Union[str, os.PathLike]) -> str:
    """``SHA256:<hex>`` of a file's bytes: MONAI Label's ``file_checksum`` format."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"SHA256:{digest.hexdigest()}"
