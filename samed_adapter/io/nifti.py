"""NIfTI-1/2: read a file (its header's claims checked before any voxel is read), a Volume from an
in-memory nibabel image, and the NIfTI image of a label map on its scan's grid."""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np

from ..volume.geometry import voxel_size_disagreement
from .errors import SUPPORTED, ImageReadError, TruncatedImageError, UnevenSpacingError, user_stacklevel
from .limits import DEFAULT_MAX_VOXELS, check_voxels, file_size, read_bounded
from .paths import image_suffix
from .volume import Volume, label_dtype, uneven_message, voxel_sizes

__all__ = ["label_nifti", "nifti_voxels", "read_nifti", "volume_from_nifti"]


def nifti_voxels(img: Any, index: Any = None, *, name: Any = None) -> np.ndarray:
    """A nibabel image's voxels (or the part ``index`` selects) as float32, scaled by its header.

    Every reader goes through here, so a plane read alone is bit for bit the same plane of the
    whole volume: training slices, `evaluate` volumes and `segment` see the same numbers.

    Raises:
        ImageReadError: voxels that are no real numbers (complex, RGB), named as ``name`` (default:
            the image's file).
    """
    _check_real(img, name)
    if index is None:
        index = (slice(None),) * len(img.shape)
    return np.asarray(img.dataobj[index], dtype=np.float32)


def _check_real(img: Any, name: Any = None) -> None:
    """ImageReadError unless ``img`` stores real numbers: a float32 copy of complex voxels keeps
    their real part and drops the rest without a word (numpy only warns), and RGB has no one value."""
    dtype = img.get_data_dtype()
    if np.issubdtype(dtype, np.complexfloating):
        what, fix = f"complex numbers ({dtype})", "its magnitude (numpy.abs) or real part"
    elif dtype.fields is not None or not (np.issubdtype(dtype, np.number) or dtype == bool):
        what, fix = f"not numbers ({dtype}: e.g. RGB colours)", "one channel or a grey-scale version"
    else:
        return
    shown = name or img.get_filename() or "the image"
    raise ImageReadError(f"{shown}: its voxels are {what}, not the real intensities of a scan; save {fix} as a "
                         "real-valued NIfTI and segment that")


def volume_from_nifti(img: Any, source: Optional[Path] = None) -> Volume:
    """A :class:`Volume` from an in-memory nibabel image (NIfTI-1/2 or a pair).

    Raises:
        ImageReadError: not NIfTI, not 2-D/3-D, or an affine holding NaN or infinity.
    """
    name = source or "the image"
    if not isinstance(img, nib.Nifti1Pair):
        raise ImageReadError(f"{name}: not a NIfTI image ({type(img).__name__}); {SUPPORTED}")
    _check_real(img, name)  # before any other word about it
    shape = img.shape
    # Trailing singleton axes (e.g. a 4-D file with one time point) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        hint = "extract one volume first (e.g. nilearn.image.index_img)"
        raise ImageReadError(f"{name}: NIfTI shape {img.shape} is not 2-D or 3-D; {hint}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        # Left alone, geometry fails much later with "SVD did not converge".
        raise ImageReadError(f"{name}: the header's affine (sform/qform or pixdim) holds NaN or infinity; the header "
                             "is damaged: fix it (e.g. nibabel: img.set_sform(good_affine)) or export the image again")
    # Told twice: as a warning (Python callers) and in Volume.messages, which the CLI prints.
    disagreement = voxel_size_disagreement(affine, img.header.get_zooms()[:3], name)
    if disagreement:
        warnings.warn(disagreement, UserWarning, stacklevel=user_stacklevel())
    data = nifti_voxels(img, name=name).reshape(shape)
    # (X, Y, Z) -> (Z, Y, X); nibabel returns Fortran-ordered data, so no copy here.
    array = np.ascontiguousarray(data.T)
    return Volume(array, affine, img.header, voxel_sizes(affine, array.ndim), source,
                  messages=(disagreement,) if disagreement else ())


#: The most bytes a NIfTI may hold between its header and its voxels (extensions): real ones
#: (CIFTI, JSON sidecars, DICOM headers) are kilobytes to a few MiB; a gzip stream inflates all
#: of them, so a hostile vox_offset must not be able to ask for gigabytes.
_MAX_EXTENSION_BYTES = 64 << 20


def _nifti_header(head: bytes, path: Path) -> Any:
    """The NIfTI-1 or NIfTI-2 header of the first bytes of a file, or an ImageReadError."""
    little = int.from_bytes(head[:4], "little")
    size = little if little in (348, 540) else int.from_bytes(head[:4], "big")
    klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if klass is None or len(head) < size:
        raise ImageReadError(f"{path}: not a NIfTI file (its first bytes are no NIfTI-1/2 header); {SUPPORTED}")
    try:
        # The byte order is sizeof_hdr's: nibabel would guess it from dim[0], which a damaged
        # header gets wrong, and then report byte-swapped dimensions.
        return klass.from_fileobj(io.BytesIO(head), endianness="<" if little == size else ">", check=False)
    except Exception as exc:  # nibabel's header checks raise several types
        raise ImageReadError(f"{path}: damaged NIfTI header ({type(exc).__name__}: {exc})") from exc


def _nifti_layout(header: Any, path: Path, max_voxels: int) -> tuple[int, int]:
    """(vox_offset, data bytes) that ``header`` claims, checked against ``max_voxels`` and sanity."""
    dims = [int(d) for d in header["dim"]]
    if not 1 <= dims[0] <= 7:
        raise ImageReadError(f"{path}: damaged NIfTI header: dim[0] = {dims[0]} axes (must be 1..7)")
    shape = dims[1:dims[0] + 1]
    count = check_voxels(shape, max_voxels, path)
    if count == 0:
        raise ImageReadError(f"{path}: NIfTI shape {tuple(shape)} holds no voxels")
    try:
        itemsize = header.get_data_dtype().itemsize
    except Exception as exc:  # an unknown datatype code
        raise ImageReadError(f"{path}: damaged NIfTI header: unknown datatype {header['datatype']}") from exc
    raw_offset = float(header["vox_offset"])
    least = header.single_vox_offset if hasattr(header, "single_vox_offset") else header.sizeof_hdr + 4
    if not (np.isfinite(raw_offset) and least <= raw_offset <= least + _MAX_EXTENSION_BYTES):
        raise ImageReadError(f"{path}: damaged NIfTI header: vox_offset {raw_offset:g} is not where voxels can start "
                             f"({least} to {least + _MAX_EXTENSION_BYTES} bytes)")
    return int(raw_offset), count * itemsize


def read_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a NIfTI after checking its header's claims: size, layout, and the bytes really held.

    A ``.nii.gz`` is inflated into memory up to what its header says and no further (a gzip bomb
    stops there; a stream holding more, or cut off, is an error); a ``.nii`` must hold at least
    its claimed bytes, so nibabel never maps past the end of the file.
    """
    gz = image_suffix(path) == ".nii.gz"
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        try:
            head = fh.read(348)
            if len(head) == 348 and 540 in {int.from_bytes(head[:4], o) for o in ("little", "big")}:
                head += fh.read(540 - 348)
        except (EOFError, OSError, zlib.error) as exc:  # not gzip at all, cut off or damaged in the header
            raise ImageReadError(f"{path}: cannot read a NIfTI header from it ({type(exc).__name__}: {exc}); "
                                 f"the file is damaged or not really NIfTI; {SUPPORTED}") from exc
        header = _nifti_header(head, path)
        offset, nbytes = _nifti_layout(header, path, max_voxels)
        if gz:
            raw = read_bounded(fh, offset + nbytes - len(head), path, prefix=head)
    if gz:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = klass.from_bytes(raw)
    else:
        held = file_size(path)
        if held < offset + nbytes:
            raise TruncatedImageError(f"{path}: truncated: its header claims {offset + nbytes:,} bytes, the file holds "
                                      f"{held:,}; copy it again from the source")
        img = nib.load(path)
    return volume_from_nifti(img, path)


def label_nifti(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """The NIfTI image of ``labels`` (``like.array``'s layout) with ``like``'s grid and header."""
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {like.array.shape}")
    if like.uneven:
        raise UnevenSpacingError(uneven_message(like), like.positions)
    labels = labels.astype(label_dtype(labels, ".nii.gz"), copy=False)
    data = labels.T  # (Z, Y, X) -> (X, Y, Z): exact inverse of the read transpose
    header = like.header if isinstance(like.header, nib.Nifti1Header) else None
    if header is not None:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        unchanged = like.affine is None or np.allclose(like.affine, header.get_best_affine())
        # The header's own best affine leaves the copied qform/sform (codes and matrices)
        # verbatim and still gives the image an .affine; nibabel stores an edited affine as an
        # 'aligned' sform, qform unknown.
        copied = header.copy()
        img = klass(data, copied.get_best_affine() if unchanged else like.affine, header=copied)
    else:
        known = like.affine is not None
        zooms = (*like.spacing[::-1], 1.0)[:3]  # NIfTI order (di, dj, dk); 2-D gets dk = 1
        affine = like.affine if known else np.diag([*zooms, 1.0])
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1 if known else 0)  # 1 = scanner coordinates, as dcm2niix
        img.set_sform(affine, code=1 if known else 2)
        img.header.set_xyzt_units(xyz="mm")
    hdr = img.header
    hdr.set_data_dtype(labels.dtype)
    hdr.set_slope_inter(1.0, 0.0)  # labels are class ids: never rescale
    hdr.set_intent("label")
    hdr["cal_min"] = 0
    hdr["cal_max"] = float(labels.max()) if labels.size else 0.0
    hdr["descrip"] = b"samed-adapter labels"
    return img
