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

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..files import atomic_path
from ..geometry import SliceGeometry

import nibabel as nib
import numpy as np

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "DicomSeries", "ImageReadError", "Volume",
           "label_nifti", "list_dicom_series", "nifti_voxels", "output_path", "read_dicom_folder",
           "read_dicom_series", "read_image", "volume_from_nifti", "write_labels"]

#: Suffixes accepted by :func:`read_image` (a folder is read as a DICOM series).
READ_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".dcm", ".png", ".npy")
#: Suffixes accepted by :func:`write_labels`.
WRITE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".png", ".npy")

_SUPPORTED = (
    "supported inputs are NIfTI (.nii, .nii.gz), a folder holding one DICOM "
    "series (or a single .dcm file), 2-D grayscale .png and 2-D/3-D .npy"
)

# DICOM patient coordinates are LPS+; NIfTI affines are RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageReadError(ValueError):
    """An input image could not be read; the message names the file."""


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
    """

    array: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    spacing: tuple[float, ...] = ()
    source: Path | None = None
    files: tuple[Path, ...] = ()

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


def read_image(path: str | os.PathLike[str]) -> Volume:
    """Read an image into a slices-first :class:`Volume`.

    * ``.nii`` / ``.nii.gz``: float32 ``(Z, Y, X)`` (or ``(Y, X)``) from
      nibabel's ``(X, Y, Z)``; affine and header kept.
    * folder (or single ``.dcm``): one DICOM series, slices sorted along the
      slice normal, RescaleSlope/Intercept applied (CT gives HU), RAS affine.
    * ``.png``: 2-D grayscale, raw 8/16-bit values as float32, no scaling.
    * ``.npy``: 2-D ``(H, W)`` or 3-D ``(D, H, W)`` array as float32, as stored.

    Raises:
        ImageReadError: the file is missing, has an unknown suffix or cannot
            be decoded; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder; {_SUPPORTED}")
    suffix = "DICOM folder" if path.is_dir() else image_suffix(path)
    readers: dict[str, Callable[[Path], Volume]] = {
        "DICOM folder": lambda p: _read_dicom_series(sorted(p.iterdir()), p),
        ".dcm": lambda p: _read_dicom_series([p], p),
        ".nii": _read_nifti, ".nii.gz": _read_nifti, ".png": _read_png, ".npy": _read_npy,
    }
    if suffix not in readers:
        kind = suffix or "(no suffix)"
        raise ImageReadError(f"{path}: unknown image type {kind!r}; {_SUPPORTED}")
    try:
        return readers[suffix](path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; report them as one
        raise ImageReadError(
            f"{path}: could not read as {suffix} ({type(exc).__name__}: {exc}); "
            f"check the file is complete and really of that type; {_SUPPORTED}"
        ) from exc


def _spacing_from_affine(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel sizes in array order; column norms stay right for oblique affines."""
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[:ndim]
    return tuple(float(s) for s in sizes[::-1])


def nifti_voxels(img: Any, index: Any = None) -> np.ndarray:
    """A nibabel image's voxels (or the part ``index`` selects) as float32, scaled by its header.

    Every reader goes through here, so a plane read alone is bit for bit the same plane of the
    whole volume: training slices, `evaluate` volumes and `segment` see the same numbers.
    """
    if index is None:
        index = (slice(None),) * len(img.shape)
    return np.asarray(img.dataobj[index], dtype=np.float32)


def volume_from_nifti(img: Any, source: Optional[Path] = None) -> Volume:
    """A :class:`Volume` from an in-memory nibabel image (NIfTI-1/2 or a pair)."""
    name = source or "the image"
    if not isinstance(img, nib.Nifti1Pair):
        raise ImageReadError(f"{name}: not a NIfTI image ({type(img).__name__}); {_SUPPORTED}")
    shape = img.shape
    # Trailing singleton axes (e.g. a 4-D file with one time point) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        hint = "extract one volume first (e.g. nilearn.image.index_img)"
        raise ImageReadError(f"{name}: NIfTI shape {img.shape} is not 2-D or 3-D; {hint}")
    data = nifti_voxels(img).reshape(shape)
    # (X, Y, Z) -> (Z, Y, X); nibabel returns Fortran-ordered data, so no copy here.
    array = np.ascontiguousarray(data.T)
    affine = np.asarray(img.affine, dtype=np.float64)
    return Volume(array, affine, img.header, _spacing_from_affine(affine, array.ndim), source)


def _read_nifti(path: Path) -> Volume:
    return volume_from_nifti(nib.load(path), path)


def _read_png(path: Path) -> Volume:
    from PIL import Image

    with Image.open(path) as im:
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


def _read_npy(path: Path) -> Volume:
    array = np.load(path, allow_pickle=False)
    if array.ndim not in (2, 3):
        raise ImageReadError(f"{path}: .npy shape {array.shape}; expected (H, W) or (D, H, W)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ImageReadError(f"{path}: .npy dtype {array.dtype} is not a real-valued image")
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


def label_nifti(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """The NIfTI image of ``labels`` (``like.array``'s layout) with ``like``'s grid and header."""
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {like.array.shape}")
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


# --------------------------------------------------------------------------- DICOM

_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")

#: (path, header read with stop_before_pixels) of one DICOM image slice.
_Slice = tuple[Path, Any]


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder, found from the slice headers alone.

    Attributes:
        uid: SeriesInstanceUID (``""`` when the slices carry none).
        name: file-name-safe label, unique in the folder (case-insensitively),
            built like dcm2niix ``-f %s_%d``: ``"{SeriesNumber}_{SeriesDescription}"``.
        files: the slice files, sorted by path (not by position); at least one.
        number: SeriesNumber, or None when missing or malformed.
        description: SeriesDescription as stored, ``""`` when missing.
    """

    uid: str
    name: str
    files: tuple[Path, ...]
    number: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        # Accept any iterable of str/Path, so hand-built series compare equal.
        object.__setattr__(self, "files", tuple(Path(f) for f in self.files))
        if not self.files:
            raise ValueError(f"DicomSeries {self.name!r} needs at least one slice file")

    @property
    def folder(self) -> Path:
        """The folder holding the first slice; the default ``Volume.source``."""
        return self.files[0].parent


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """List the DICOM series of the files directly in ``folder`` (not subfolders).

    Only headers are read (no pixel data).  Files that are not DICOM image
    slices with geometry (notes, DICOMDIR, reports) are skipped.  Series are
    ordered by (SeriesNumber, SeriesInstanceUID); a missing number sorts last.

    Raises:
        ImageReadError: ``folder`` is not a folder or holds no DICOM image slice.
    """
    return [series for series, _ in _scan_folder(Path(folder))]


def read_dicom_series(series: DicomSeries, source: str | os.PathLike[str] | None = None) -> Volume:
    """Read one series into a ``(D, H, W)`` float32 Volume, as :func:`read_image` reads a folder.

    ``source`` (default: ``series.folder``) becomes ``Volume.source`` and names
    the folder in error messages.

    Raises:
        ImageReadError: the slices are not parallel, differ in size or pixel
            spacing, share a position, are multi-frame or cannot be decoded.
    """
    where = Path(source) if source is not None else series.folder
    return _read_guarded(where, lambda: _read_dicom_series(list(series.files), where))


def read_dicom_folder(folder: str | os.PathLike[str]) -> list[tuple[DicomSeries, Volume]]:
    """Read every series of ``folder``: ``[(series, (D, H, W) Volume), ...]``.

    Same order as :func:`list_dicom_series`; each Volume's ``source`` is
    ``folder``.  Headers are read once.  One unreadable series raises for the
    whole folder; to skip it instead, call :func:`read_dicom_series` per entry
    of :func:`list_dicom_series`.

    Raises:
        ImageReadError: as :func:`list_dicom_series` and :func:`read_dicom_series`.
    """
    folder = Path(folder)
    return [(series, _read_guarded(folder, lambda s=slices: _read_dicom_slices(s, folder)))
            for series, slices in _scan_folder(folder)]


def _read_guarded(source: Path, read: Callable[[], Volume]) -> Volume:
    """``read()``, turning stray decoder errors into an ImageReadError naming ``source``."""
    try:
        return read()
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom and numpy raise many types; report them as one
        raise ImageReadError(
            f"{source}: could not read as DICOM ({type(exc).__name__}: {exc}); "
            f"check the files are complete DICOM slices; {_SUPPORTED}"
        ) from exc


def _scan_folder(folder: Path) -> list[tuple[DicomSeries, list[_Slice]]]:
    """Probe the files directly in ``folder`` and group them into named series."""
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder; pass the folder holding the .dcm files")
    try:
        files = sorted(folder.iterdir())
    except OSError as exc:
        hint = "check it exists and is readable"
        raise ImageReadError(f"{folder}: cannot list the folder ({exc}); {hint}") from exc
    return _group_series(_probe_files(files), folder)


def probe_dicom(path: Path) -> Any | None:
    """Header of ``path`` if it is a DICOM slice with geometry, else None."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:  # old files lack the 128-byte preamble
            with warnings.catch_warnings():  # forced reads of notes/thumbnails warn about VRs
                warnings.simplefilter("ignore", UserWarning)
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # not DICOM at all (notes, thumbnails, ...): skip it
        return None
    return ds if all(tag in ds for tag in _GEOMETRY) else None


def _probe_files(files: list[Path]) -> list[_Slice]:
    """The DICOM image slices among ``files``, in the given order."""
    return [(p, ds) for p in files if p.is_file() and (ds := probe_dicom(p)) is not None]


def _series_number(ds: Any) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value is None or str(value).strip() == "" else int(value)
    except (TypeError, ValueError):  # a malformed IS names nothing; do not refuse the folder
        return None


def _safe_label(text: str) -> str:
    """``text`` with characters outside [A-Za-z0-9._-] as ``_`` and runs of ``_`` collapsed.

    Leading/trailing ``.`` and ``_`` are dropped too: a leading dot hides the
    file and Windows silently strips a trailing one.
    """
    mapped = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text)
    return "_".join(part for part in mapped.split("_") if part).strip("._")


def _uid_tail(uid: str) -> str:
    """Last 8 digits of a UID (dots removed): what tells series of one study apart."""
    return uid.replace(".", "")[-8:] or "nouid"


def _series_names(heads: list[tuple[str, int | None, str]]) -> list[str]:
    """dcm2niix-style names for ``(uid, number, description)``, made unique.

    Names are compared case-insensitively (macOS and Windows file systems);
    every colliding name gets ``_`` + :func:`_uid_tail`, and a counter if even
    that collides, so one label file per series never overwrites another.
    """
    bases = []
    for uid, number, description in heads:
        parts = [_safe_label(str(number)) if number is not None else "", _safe_label(description)]
        bases.append("_".join(part for part in parts if part) or _uid_tail(uid))
    keys = [base.casefold() for base in bases]
    names = [f"{base}_{_uid_tail(uid)}" if keys.count(base.casefold()) > 1 else base
             for base, (uid, _, _) in zip(bases, heads)]
    unique: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate.casefold() in {u.casefold() for u in unique}:
            n += 1
            candidate = f"{name}_{n}"
        unique.append(candidate)
    return unique


def _group_series(slices: list[_Slice], source: Path) -> list[tuple[DicomSeries, list[_Slice]]]:
    """Group probed slices by SeriesInstanceUID, ordered by (SeriesNumber, UID).

    Each group keeps the input (path) order of its slices.
    """
    if not slices:
        raise ImageReadError(
            f"{source}: no DICOM image slices with {', '.join(_GEOMETRY[:3])}; {_SUPPORTED}"
        )
    groups: dict[str, list[_Slice]] = {}
    for p, ds in slices:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    # Number and description come from the first slice; they are per-series tags.
    heads = [(uid, _series_number(g[0][1]), str(g[0][1].get("SeriesDescription", "") or "").strip())
             for uid, g in groups.items()]
    heads.sort(key=lambda h: (h[1] is None, h[1] or 0, h[0]))
    return [
        (DicomSeries(uid, name, tuple(p for p, _ in groups[uid]), number, description), groups[uid])
        for (uid, number, description), name in zip(heads, _series_names(heads))
    ]


def _several_series_error(source: Path, series: list[DicomSeries]) -> ImageReadError:
    shown = ", ".join(s.name for s in series[:10]) + (", ..." if len(series) > 10 else "")
    return ImageReadError(
        f"{source}: holds {len(series)} DICOM series ({shown}); read them all with "
        f"samed_adapter.io.read_dicom_folder(folder), or run `samed-adapter segment {source}`, "
        "which writes one label file per series"
    )


def _user_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first caller outside this module.

    The DICOM readers are reached through several public functions at
    different call depths, so a fixed level would blame the wrong line.
    """
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    return level


def _floats(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _read_dicom_series(files: list[Path], source: Path) -> Volume:
    """Read the DICOM slices among ``files``, which must form one series; see _read_dicom_slices.

    Raises:
        ImageReadError: no slice at all, or slices of several series.
    """
    groups = _group_series(_probe_files(files), source)
    if len(groups) > 1:
        raise _several_series_error(source, [series for series, _ in groups])
    return _read_dicom_slices(groups[0][1], source)


def _read_dicom_slices(slices: list[_Slice], source: Path) -> Volume:
    """Read one series into a ``(D, H, W)`` float32 Volume (H = Rows, W = Columns).

    Slices are sorted by ImagePositionPatient projected on the normal
    ``row cosine x column cosine``; ``Volume.files`` lists their files in that
    order.  The affine is the DICOM PS3.3
    C.7.6.2.1.1 voxel-to-LPS map with its first two rows negated (RAS), as
    nibabel and dcm2niix build it.
    """
    import pydicom

    first_path, first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(f"{first_path}: multi-frame DICOM unsupported; convert with dcm2niix")
    orient, pixel_spacing = _floats(first.ImageOrientationPatient), _floats(first.PixelSpacing)
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    for p, ds in slices:
        same = (ds.Rows, ds.Columns) == (first.Rows, first.Columns)
        same &= np.allclose(_floats(ds.ImageOrientationPatient), orient, atol=1e-4)
        if not (same and np.allclose(_floats(ds.PixelSpacing), pixel_spacing, atol=1e-4)):
            raise ImageReadError(
                f"{p}: size, orientation or pixel spacing differs from {first_path}; "
                "the folder must hold one series of parallel, equally sized slices"
            )
    positions = np.stack([_floats(ds.ImagePositionPatient) for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions, slices = positions[order], [slices[i] for i in order]
    steps = np.diff(positions @ normal)
    if steps.size and steps.min() < 1e-3:
        hint = "echoes, phases or time points? put each volume in its own folder"
        raise ImageReadError(f"{source}: several slices share one position ({hint})")
    if steps.size and np.ptp(steps) > 0.01 * steps.mean():
        # One affine holds one step; a missing slice shows up here.
        warnings.warn(
            f"{source}: slice spacing varies from {steps.min():.4g} to {steps.max():.4g} mm "
            "(missing slices?); the affine uses the mean step", UserWarning,
            stacklevel=_user_stacklevel()
        )

    affine = np.eye(4)
    affine[:3, 0] = row_cos * pixel_spacing[1]  # i: along a row, so column spacing
    affine[:3, 1] = col_cos * pixel_spacing[0]  # j: down the rows, so row spacing
    if len(slices) > 1:
        # The first-to-last vector keeps the shear of gantry-tilted stacks.
        affine[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        affine[:3, 2] = normal * float(step)
    affine[:3, 3] = positions[0]
    affine = _LPS_TO_RAS @ affine

    planes = []
    for p, _ in slices:
        ds = pydicom.dcmread(p, force=True)
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # missing decoder, truncated data, ...
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            hint = "install a decoder such as pylibjpeg, or convert with dcm2niix"
            raise ImageReadError(f"{p}: cannot decode {syntax} pixel data ({exc}); {hint}") from exc
        if pixels.ndim != 2:
            raise ImageReadError(f"{p}: pixel data {pixels.shape} is not one grayscale slice")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # Slope and intercept may change per slice, so rescale before stacking.
        planes.append((pixels.astype(np.float64) * slope + intercept).astype(np.float32))
    return Volume(np.stack(planes), affine, None, _spacing_from_affine(affine, 3), source,
                  files=tuple(p for p, _ in slices))
