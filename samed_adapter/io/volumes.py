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
from typing import Any

from ..files import atomic_path

import nibabel as nib
import numpy as np

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "ImageReadError", "Volume", "output_path",
           "read_image", "write_labels"]

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
    """

    array: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    spacing: tuple[float, ...] = ()
    source: Path | None = None

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


# --------------------------------------------------------------------------- paths


def _suffix(path: Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    """File name without the suffix returned by :func:`_suffix`."""
    suffix = _suffix(path)
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
    in_suffix = "" if src.is_dir() else _suffix(src)
    stem = _stem(src) if in_suffix else src.name
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
    suffix = "DICOM folder" if path.is_dir() else _suffix(path)
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


def _read_nifti(path: Path) -> Volume:
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Pair):
        raise ImageReadError(f"{path}: not a NIfTI image ({type(img).__name__}); {_SUPPORTED}")
    shape = img.shape
    # Trailing singleton axes (e.g. a 4-D file with one time point) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        hint = "extract one volume first (e.g. nilearn.image.index_img)"
        raise ImageReadError(f"{path}: NIfTI shape {img.shape} is not 2-D or 3-D; {hint}")
    data = img.get_fdata(dtype=np.float32).reshape(shape)
    # (X, Y, Z) -> (Z, Y, X); nibabel returns Fortran-ordered data, so no copy here.
    array = np.ascontiguousarray(data.T)
    affine = np.asarray(img.affine, dtype=np.float64)
    return Volume(array, affine, img.header, _spacing_from_affine(affine, array.ndim), path)


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
    fmt = _suffix(path)
    if fmt not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write labels to {path}; use one of {', '.join(WRITE_SUFFIXES)}")
    out = labels.astype(_label_dtype(labels, fmt))
    with atomic_path(path) as tmp:
        if fmt in (".nii", ".nii.gz"):
            nib.save(_label_nifti(out, like), tmp)
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


def _label_nifti(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """Build the NIfTI image for ``labels`` (already uint8/int16, slices-first)."""
    data = labels.T  # (Z, Y, X) -> (X, Y, Z): exact inverse of the read transpose
    header = like.header if isinstance(like.header, nib.Nifti1Header) else None
    if header is not None:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        unchanged = like.affine is None or np.allclose(like.affine, header.get_best_affine())
        # affine=None keeps the copied qform/sform (codes and matrices) verbatim;
        # nibabel stores an edited affine as an 'aligned' sform, qform unknown.
        img = klass(data, None if unchanged else like.affine, header=header.copy())
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


def _probe_dicom(path: Path) -> Any | None:
    """Header of ``path`` if it is a DICOM slice with geometry, else None."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:  # old files lack the 128-byte preamble
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # not DICOM at all (notes, thumbnails, ...): skip it
        return None
    return ds if all(tag in ds for tag in _GEOMETRY) else None


def _floats(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _read_dicom_series(files: list[Path], source: Path) -> Volume:
    """Read one DICOM series into a ``(D, H, W)`` float32 Volume (H = Rows, W = Columns).

    Slices are sorted by ImagePositionPatient projected on the normal
    ``row cosine x column cosine``.  The affine is the DICOM PS3.3
    C.7.6.2.1.1 voxel-to-LPS map with its first two rows negated (RAS), as
    nibabel and dcm2niix build it.
    """
    import pydicom

    slices = [(p, ds) for p in files if p.is_file() and (ds := _probe_dicom(p)) is not None]
    if not slices:
        raise ImageReadError(
            f"{source}: no DICOM image slices with {', '.join(_GEOMETRY[:3])}; {_SUPPORTED}"
        )
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(uids) > 1:
        raise ImageReadError(
            f"{source}: holds {len(uids)} DICOM series ({', '.join(uids)}); "
            "move each series into its own folder and read them one at a time"
        )
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
            "(missing slices?); the affine uses the mean step", UserWarning, stacklevel=4
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
    return Volume(np.stack(planes), affine, None, _spacing_from_affine(affine, 3), source)
