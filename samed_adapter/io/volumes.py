"""Read medical images into slices-first arrays and write label maps back.

Axis convention
---------------
Every :class:`Volume` stores ``array`` **slices first**: ``(D, H, W)`` for a
3-D image and ``(H, W)`` for a 2-D one, so ``array[k]`` is one axial slice as
the model sees it.  The mapping to NIfTI voxel indices is the same for every
format::

    array[k, j, i]  <->  nifti_data[i, j, k]      (3-D)
    array[j, i]     <->  nifti_data[i, j]         (2-D)

i.e. ``array = nifti_data.transpose(2, 1, 0)``; :func:`write_labels` applies
the inverse, so a label map written for a NIfTI input has exactly the voxel
order of that input.  ``Volume.affine`` maps NIfTI voxel indices
``(i, j, k, 1)`` to RAS+ millimetres and ``Volume.spacing`` lists voxel sizes
in ``array`` order, ``(dk, dj, di)``.

For DICOM, ``i`` runs along a row, ``j`` down the rows and ``k`` over slices
sorted along the slice normal.  Nothing is reoriented, for any format: labels
written back line up voxel for voxel with what was read.
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .files import atomic_path
from ..volume.geometry import SliceGeometry, voxel_size_disagreement, voxel_sizes as _column_sizes

import nibabel as nib
import numpy as np

from .dicom_series import is_dicom_file, read_dicom_path
from .errors import (SUPPORTED, ImageReadError, ImageTooLargeError, TruncatedImageError, UnevenSpacingError,
                     user_stacklevel)
from .limits import DEFAULT_MAX_VOXELS, check_voxels, file_size, read_bounded, resolve_max_voxels

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "Volume", "label_nifti", "nifti_voxels", "output_path", "read_image",
           "volume_from_nifti", "voxel_sizes", "write_labels"]

#: Suffixes accepted by :func:`read_image` (a folder is read as a DICOM series, and so is a file
#: of any name holding ``DICM`` at byte 128).
READ_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".dcm", ".png", ".npy")
#: Suffixes accepted by :func:`write_labels`.
WRITE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".png", ".npy")

_SUPPORTED = SUPPORTED


@dataclass
class Volume:
    """An image in the model's slices-first layout plus its geometry.

    Attributes:
        array: image values, ``(D, H, W)`` (3-D) or ``(H, W)`` (2-D); float32
            for everything :func:`read_image` returns.
        affine: ``(4, 4)`` map from NIfTI voxel ``(i, j, k, 1)`` (see the
            module docstring, ``array[k, j, i]``) to RAS+ mm, or ``None`` when
            the format carries no geometry (PNG, NPY).
        header: the nibabel header of a NIfTI input, else ``None``; used to
            write labels with the same qform/sform.
        spacing: voxel size in mm in ``array`` axis order, ``(dk, dj, di)`` or
            ``(dj, di)``; ones when unknown.
        source: the path the volume was read from, if any.
        files: for a DICOM input, the file of each slice in ``array`` order
            (``array[k]`` comes from ``files[k]``), so writers such as DICOM-SEG
            can reference the source instances; ``()`` for other formats.
        messages: what the reader did that the user should hear of, one line each (a
            localizer left out of a DICOM series, ...); also given as ``UserWarning``.
        uneven: the slices are unevenly spaced (a DICOM series read with
            ``allow_uneven=True``): ``affine``'s slice step is only approximate, so the NIfTI
            writers refuse the volume; outputs that reference each file in ``files`` are exact.
        positions: for a DICOM input, each slice's position along the slice normal in mm
            (LPS), in ``array`` order; ``()`` for other formats.
    """

    array: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    spacing: tuple[float, ...] = ()
    source: Path | None = None
    files: tuple[Path, ...] = ()
    messages: tuple[str, ...] = ()
    uneven: bool = False
    positions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ValueError(f"Volume.array must be (H, W) or (D, H, W), got {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing) or (1.0,) * self.array.ndim
        if len(self.spacing) != self.array.ndim:
            raise ValueError(f"spacing {self.spacing} needs one value per axis {self.array.shape}")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine is not None and self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.source is not None:
            self.source = Path(self.source)
        self.files = tuple(Path(f) for f in self.files)
        self.messages = tuple(str(m) for m in self.messages)
        self.uneven = bool(self.uneven)
        self.positions = tuple(float(z) for z in self.positions)
        # A file list that does not match the slices would reference the wrong instances.
        slices = self.array.shape[0] if self.array.ndim == 3 else 1
        if self.files and len(self.files) != slices:
            raise ValueError(f"files lists {len(self.files)} files but array {self.array.shape} "
                             f"has {slices} slices; give one file per slice, or none")

    # The affine's voxel order (i, j, k) is the one geometry works in; ``array`` is its transpose.

    @property
    def voxels(self) -> np.ndarray:
        """The image as ``(I, J, K)`` voxels in the affine's order (a view; 2-D gives K = 1)."""
        return self.to_voxels(self.array)

    def to_voxels(self, array: np.ndarray) -> np.ndarray:
        """An array in ``self.array``'s layout (labels, say) -> ``(I, J, K)`` voxel order (a view)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume's {self.array.shape}")
        return array.T if array.ndim == 3 else array.T[..., None]

    def from_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """``(I, J, K)`` voxels -> ``self.array``'s layout: the inverse of :meth:`to_voxels`."""
        voxels = np.asarray(voxels)
        return voxels.T if self.array.ndim == 3 else voxels[..., 0].T

    def geometry(self, orientation: Any = None, slice_axis: int = 2) -> SliceGeometry:
        """How to cut this volume into model slices for an adapter's orientation and slice axis.

        Without an affine (PNG, NPY) there is nothing to reorient by: ``array`` is taken as
        the slices, as given.
        """
        if self.affine is None:
            return SliceGeometry.for_volume(self.voxels.shape, None, None, 2)
        return SliceGeometry.for_volume(self.voxels.shape, self.affine, orientation, slice_axis)


# --------------------------------------------------------------------------- paths


def image_suffix(path: Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def image_stem(path: Path) -> str:
    """File name without the suffix returned by :func:`image_suffix`."""
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def output_path(
    input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str | None = None
) -> Path:
    """Name the label file for ``input_path`` inside ``out_dir``.

    ``case.nii.gz -> out/case.nii.gz``, ``case.nii -> out/case.nii``,
    ``.png -> .png``, ``.npy -> .npy``; a DICOM series folder ``series1/``
    gives ``out/series1.nii.gz`` and ``slice.dcm`` gives ``out/slice.nii.gz``.
    ``suffix`` (e.g. ``".nii.gz"`` or ``"npy"``) overrides the output format.

    Raises:
        ValueError: for an unsupported suffix, or when the result would
            overwrite the input image itself.
    """
    src = Path(input_path)
    in_suffix = "" if src.is_dir() else image_suffix(src)
    stem = image_stem(src) if in_suffix else src.name
    if suffix is None:
        suffix = ".nii.gz" if in_suffix in ("", ".dcm") else in_suffix  # DICOM -> NIfTI
    suffix = "." + suffix.lower().lstrip(".")
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write labels as {suffix!r}; use one of {WRITE_SUFFIXES}")
    if not stem:
        raise ValueError(f"cannot derive an output name from {str(input_path)!r}")
    out = Path(out_dir) / (stem + suffix)
    if out.resolve() == src.resolve():
        raise ValueError(f"output {out} would overwrite the input image; choose another out_dir")
    return out


# --------------------------------------------------------------------------- reading


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
        raise ImageReadError(f"{path}: no such file or folder; {_SUPPORTED}")
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
        ".nii": lambda p: _read_nifti(p, limit), ".nii.gz": lambda p: _read_nifti(p, limit),
        ".png": lambda p: _read_png(p, limit), ".npy": lambda p: _read_npy(p, limit),
    }
    if suffix not in readers:
        kind = suffix or "(no suffix)"
        raise ImageReadError(f"{path}: unknown image type {kind!r}; {_SUPPORTED}")
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
            f"or not really {kind}; {_SUPPORTED}"
        ) from exc


def _check_readable(path: Path) -> None:
    """Refuse a file that cannot be opened, saying why (permissions, a broken disk) not "damaged"."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open the file ({exc.strerror or exc}); check that it is readable "
                             "(its permissions, the disk or network share it is on)") from exc


def voxel_sizes(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel sizes in ``array`` order, ``(dk, dj, di)`` or ``(dj, di)``, from the affine's columns.

    The affine is the one source of voxel size everywhere (as nibabel and MONAI take it):
    column norms stay right for oblique affines.
    """
    return tuple(float(s) for s in _column_sizes(affine)[:ndim][::-1])


_spacing_from_affine = voxel_sizes  # the earlier private name


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
        raise ImageReadError(f"{name}: not a NIfTI image ({type(img).__name__}); {_SUPPORTED}")
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
        raise ImageReadError(f"{path}: not a NIfTI file (its first bytes are no NIfTI-1/2 header); {_SUPPORTED}")
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


def _read_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
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
                                 f"the file is damaged or not really NIfTI; {_SUPPORTED}") from exc
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


def _read_png(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    from PIL import Image

    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        # The IHDR chunk gives the size before PIL looks at it (its own bomb check raises first).
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        check_voxels((height, width), max_voxels, path)
    with Image.open(path) as im:
        check_voxels((im.height, im.width), max_voxels, path)
        if im.mode == "P":
            raise ImageReadError(f"{path}: palette PNG; save the scan as 8- or 16-bit grayscale")
        mode, pixels = im.mode, np.asarray(im)
    if pixels.ndim == 3:
        # Grayscale scans are often saved as RGB(A); accept them only when the
        # colour channels agree so nothing is silently averaged away.
        channels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
        if not (channels == channels[..., :1]).all():
            raise ImageReadError(f"{path}: PNG mode {mode} holds colour; save it as grayscale")
        pixels = channels[..., 0]
    return Volume(array=pixels.astype(np.float32), source=path)


def _read_npy(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    from numpy.lib import format as npy_format

    with open(path, "rb") as fh:
        try:
            version = npy_format.read_magic(fh)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
        except ValueError as exc:  # not .npy, or a header numpy will not parse (pickled dtypes included)
            raise ImageReadError(f"{path}: not a readable .npy file ({exc}); {_SUPPORTED}") from exc
        start = fh.tell()
    if len(shape) not in (2, 3):
        raise ImageReadError(f"{path}: .npy shape {shape}; expected (H, W) or (D, H, W)")
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise ImageReadError(f"{path}: .npy dtype {dtype} is not a real-valued image")
    count = check_voxels(shape, max_voxels, path)
    if file_size(path) < start + count * dtype.itemsize:
        raise TruncatedImageError(f"{path}: truncated: its header claims {start + count * dtype.itemsize:,} bytes, "
                                  f"the file holds {file_size(path):,}; copy it again from the source")
    array = np.load(path, allow_pickle=False)
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), source=path)


# --------------------------------------------------------------------------- writing


def _label_dtype(labels: np.ndarray, fmt: str) -> np.dtype:
    """uint8 when the labels fit, else int16; reject what would be mangled."""
    if labels.dtype == bool or labels.size == 0:
        return np.dtype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (labels == np.round(labels)).all():
        raise ValueError("labels hold non-integer values; take argmax/round to class ids first")
    lo, hi = labels.min(), labels.max()
    if lo >= 0 and hi < 256:
        return np.dtype(np.uint8)
    if fmt == ".png":
        raise ValueError(f"labels range [{lo}, {hi}] does not fit an 8-bit PNG; write .nii.gz")
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    raise ValueError(f"labels range [{lo}, {hi}] does not fit int16; class ids must be < 32768")


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
    out = labels.astype(_label_dtype(labels, fmt))
    with atomic_path(path) as tmp:
        if fmt in (".nii", ".nii.gz"):
            nib.save(label_nifti(out, like), tmp)
        elif fmt == ".png":
            _write_png(out, tmp)
        else:
            with open(tmp, "xb") as fh:
                np.save(fh, out, allow_pickle=False)
    return path


def _write_png(labels: np.ndarray, tmp: Path) -> None:
    from PIL import Image

    if labels.ndim == 3:
        if labels.shape[0] != 1:
            raise ValueError(f"a PNG holds one slice, labels are {labels.shape}; write .nii.gz")
        labels = labels[0]
    with open(tmp, "xb") as fh:
        Image.fromarray(np.ascontiguousarray(labels)).save(fh, format="PNG")


def uneven_message(like: Volume) -> str:
    """Why an unevenly spaced volume gets no NIfTI: the slice positions and what to do instead."""
    from .slice_spacing import shortened

    where = like.source or "the image"
    shown = f" at {shortened(like.positions)} mm along the slice normal" if like.positions else ""
    return (f"{where}: its slices are unevenly spaced{shown}, and a NIfTI places slices at one even step, so it would "
            "put some where they were not; use --output-type dicom-seg (exact per instance)")


def label_nifti(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """The NIfTI image of ``labels`` (``like.array``'s layout) with ``like``'s grid and header."""
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {like.array.shape}")
    if like.uneven:
        raise UnevenSpacingError(uneven_message(like), like.positions)
    labels = labels.astype(_label_dtype(labels, ".nii.gz"), copy=False)
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
