"""DICOM series: read one into a Volume (finding them in a folder is :mod:`.dicom_folders`).

:func:`read_dicom_series` stacks one series' slices along the slice normal. Their spacing must be
even (see :mod:`samed_adapter.io.slice_spacing`): a localizer standing apart at one end is left
out, and so is a slice or two of another size or orientation (a scout stored with an axial
series), with a message in ``Volume.messages`` (and a ``UserWarning``); any other uneven series is an
:class:`~samed_adapter.io.errors.UnevenSpacingError`, unless ``allow_uneven=True`` (for outputs
that reference each instance, such as DICOM-SEG), which gives a Volume marked ``uneven``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dicom_folders import (DicomSeries, Slice, folder_files, group_series, scan_folder, scan_slices,
                            several_series_error)
from .errors import (SUPPORTED, ImageReadError, ImageTooLargeError, TruncatedImageError, UnevenSpacingError,
                     user_stacklevel)
from .limits import DEFAULT_MAX_VOXELS, check_voxels
from .slice_spacing import even_run, shortened

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .volume import Volume

__all__ = ["COVERS", "read_dicom_folder", "read_dicom_path", "read_dicom_series"]


# --------------------------------------------------------------------------- reading


def read_dicom_series(series: DicomSeries, source: str | os.PathLike[str] | None = None, *,
                      max_voxels: int = DEFAULT_MAX_VOXELS, allow_uneven: bool = False) -> "Volume":
    """Read one series into a ``(D, H, W)`` float32 Volume, as :func:`read_image` reads a folder.

    ``source`` (default: ``series.folder``) becomes ``Volume.source`` and names
    the folder in error messages. ``max_voxels`` bounds Rows x Columns x slices, checked from
    the headers before any pixel is read. ``allow_uneven=True`` reads a series whose slices are
    unevenly spaced into a Volume marked ``uneven`` (its affine's slice step is the median one,
    so it is only good for orientation; NIfTI writers refuse it): for outputs that reference
    each source instance, such as DICOM-SEG.

    Raises:
        ImageReadError: the slices are not parallel, differ in size or pixel
            spacing, share a position, are multi-frame or cannot be decoded.
        UnevenSpacingError: the slices are unevenly spaced (and ``allow_uneven`` is False).
        ImageTooLargeError: the series holds more than ``max_voxels`` voxels.
    """
    where = Path(source) if source is not None else series.folder
    return _read_guarded(where, lambda: _read_dicom_series(list(series.files), where, max_voxels, allow_uneven))


def read_dicom_folder(folder: str | os.PathLike[str], *, max_voxels: int = DEFAULT_MAX_VOXELS,
                      allow_uneven: bool = False) -> list[tuple[DicomSeries, "Volume"]]:
    """Read every series of ``folder``: ``[(series, (D, H, W) Volume), ...]``.

    Same order as :func:`list_dicom_series`; each Volume's ``source`` is
    ``folder``.  Headers are read once.  One unreadable series raises for the
    whole folder; to skip it instead, call :func:`read_dicom_series` per entry
    of :func:`list_dicom_series`.

    Raises:
        ImageReadError: as :func:`list_dicom_series` and :func:`read_dicom_series`.
    """
    folder = Path(folder)
    return [(series, _read_guarded(folder, lambda s=slices: _read_dicom_slices(s, folder, max_voxels, allow_uneven)))
            for series, slices in scan_folder(folder)]


def _read_guarded(source: Path, read: Callable[[], "Volume"]) -> "Volume":
    """``read()``, turning stray decoder errors into an ImageReadError naming ``source``."""
    try:
        return read()
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(f"{source}: not enough memory to read the series; free memory, or lower --max-voxels "
                                 "(Python: max_voxels=) to refuse such series before reading them") from exc
    except Exception as exc:  # pydicom and numpy raise many types; report them as one
        raise ImageReadError(
            f"{source}: could not read as DICOM ({type(exc).__name__}: {exc}); {SUPPORTED}"
        ) from exc


def read_dicom_path(path: Path, *, max_voxels: int = DEFAULT_MAX_VOXELS, allow_uneven: bool = False) -> "Volume":
    """What :func:`~samed_adapter.io.read_image` reads for a DICOM path: the one series of a
    folder's files, or a single DICOM file; ``path`` names it in messages."""
    files = folder_files(path) if path.is_dir() else [path]
    return _read_dicom_series(files, path, max_voxels, allow_uneven)


def _read_dicom_series(files: list[Path], source: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                       allow_uneven: bool = False) -> "Volume":
    """Read the DICOM slices among ``files``, which must form one series; see _read_dicom_slices.

    Raises:
        ImageReadError: no slice at all, or slices of several series.
    """
    slices, skipped = scan_slices(files)
    groups = group_series(slices, source, skipped)
    if len(groups) > 1:
        raise several_series_error(source, [series for series, _ in groups])
    return _read_dicom_slices(groups[0][1], source, max_voxels, allow_uneven)


def _floats(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _check_orientation(path: Path, orient: np.ndarray) -> None:
    """Refuse an ImageOrientationPatient that is not two unit vectors at right angles."""
    row_cos, col_cos = orient[:3], orient[3:]
    ok = orient.size == 6 and np.isfinite(orient).all()
    ok = ok and abs(np.linalg.norm(row_cos) - 1) < 1e-2 and abs(np.linalg.norm(col_cos) - 1) < 1e-2
    if not (ok and abs(row_cos @ col_cos) < 1e-2):
        shown = [round(float(v), 4) for v in orient]
        raise ImageReadError(f"{path}: ImageOrientationPatient {shown} is not two unit vectors at right angles; "
                             "the header is damaged (fix it, or convert the series with dcm2niix)")


#: What a left-out slice means for the outputs: whichever were asked for (a label file, a DICOM-SEG,
#: an RTSTRUCT, statistics) are made from the slices kept; a SEG or RTSTRUCT references those alone.
#: `segment` names the outputs it writes instead (see segment.pipeline).
COVERS = "the outputs (label file, DICOM-SEG or RTSTRUCT, whichever are written) cover"

#: At most this many slices of another size or orientation are left out of a series (a localizer
#: or two stored with it, usual on CT); more is a mixed series (a 3-plane localizer), refused.
_MAX_ODD_SLICES = 2


def _same_grid(a: Any, b: Any) -> bool:
    """Whether two slice headers share size, orientation and pixel spacing (to rounding)."""
    try:
        return ((a.Rows, a.Columns) == (b.Rows, b.Columns)
                and np.allclose(_floats(a.ImageOrientationPatient), _floats(b.ImageOrientationPatient), atol=1e-4)
                and np.allclose(_floats(a.PixelSpacing), _floats(b.PixelSpacing), atol=1e-4))
    except (TypeError, ValueError):  # a malformed value: not the same grid
        return False


def _split_odd_slices(slices: list[Slice], source: Path) -> tuple[list[Slice], list[str]]:
    """(the slices of the series' grid, messages): a slice or two of another size or orientation
    (a localizer stored in the series) is left out and said; more is a mixed series, refused."""
    groups: list[list[Slice]] = []
    for item in slices:
        home = next((g for g in groups if _same_grid(g[0][1], item[1])), None)
        if home is None:
            groups.append([item])
        else:
            home.append(item)
    if len(groups) == 1:
        return slices, []
    main = max(groups, key=len)
    odd = sorted((p for g in groups if g is not main for p, _ in g), key=str)
    if len(odd) > _MAX_ODD_SLICES or len(main) < 3:
        other = next(g for g in groups if g is not main)[0][0]
        raise ImageReadError(f"{other}: size, orientation or pixel spacing differs from {main[0][0]}; "
                             "the folder must hold one series of parallel, equally sized slices")
    names = ", ".join(p.name for p in odd)
    return main, [f"{source}: left out {len(odd)} slice(s) of another size or orientation ({names}) than the "
                  f"{len(main)} others, e.g. a localizer stored in the series; {COVERS} those {len(main)} slices "
                  "only"]


def _check_one_frame(slices: list[Slice], source: Path) -> None:
    """Refuse slices in several frames of reference: their positions are coordinates in different
    patient spaces (another scan of the patient, a moved table), so stacking them makes a volume
    that is no one place (and highdicom refuses a DICOM-SEG over them, blaming the image sizes)."""
    frames: dict[str, list[Path]] = {}
    for path, ds in slices:
        uid = str(ds.get("FrameOfReferenceUID", "") or "").strip()
        if uid:
            frames.setdefault(uid, []).append(path)
    if len(frames) < 2:
        return
    shown = "; ".join(f"{uid} ({len(paths)} slices, e.g. {paths[0].name})" for uid, paths in list(frames.items())[:3])
    raise ImageReadError(f"{source}: one series with slices in {len(frames)} frames of reference ({shown}); their "
                         "positions are in different coordinate systems, so they make no one volume: put each frame "
                         "of reference's slices in a folder of its own and segment each")


def _check_slices(slices: list[Slice]) -> tuple[np.ndarray, np.ndarray]:
    """(orientation (6,), pixel spacing (2,)) shared by every slice, else an ImageReadError."""
    first_path, first = slices[0]
    orient, pixel_spacing = _floats(first.ImageOrientationPatient), _floats(first.PixelSpacing)
    _check_orientation(first_path, orient)
    if pixel_spacing.size != 2 or not (np.isfinite(pixel_spacing).all() and (pixel_spacing > 0).all()):
        raise ImageReadError(f"{first_path}: PixelSpacing {pixel_spacing.tolist()} is not two positive sizes; "
                             "the header is damaged")
    for p, ds in slices:
        same = (ds.Rows, ds.Columns) == (first.Rows, first.Columns)
        same &= np.allclose(_floats(ds.ImageOrientationPatient), orient, atol=1e-4)
        if not (same and np.allclose(_floats(ds.PixelSpacing), pixel_spacing, atol=1e-4)):
            raise ImageReadError(
                f"{p}: size, orientation or pixel spacing differs from {first_path}; "
                "the folder must hold one series of parallel, equally sized slices"
            )
    return orient, pixel_spacing


def _uneven_error(source: Path, offsets: np.ndarray) -> UnevenSpacingError:
    steps = np.diff(offsets)
    k = int(np.argmax(np.abs(steps - np.median(steps))))
    return UnevenSpacingError(
        f"{source}: slices are unevenly spaced (positions along the normal {shortened(offsets)} mm; "
        f"steps {steps.min():.4g} to {steps.max():.4g} mm, the odd one between {offsets[k]:.2f} and "
        f"{offsets[k + 1]:.2f}), so no NIfTI can hold them; use --output-type dicom-seg (exact per instance, "
        "Python: allow_uneven=True), or resample the series (e.g. dcm2niix)", tuple(float(o) for o in offsets))


def _dropped_message(source: Path, offsets: np.ndarray, run: Any) -> str:
    kept = offsets[list(run.keep)]
    dropped = ", ".join(f"{offsets[i]:.2f}" for i in run.dropped)
    return (f"{source}: left out {len(run.dropped)} slice(s) at {dropped} mm standing apart from the "
            f"{len(run.keep)} evenly spaced slices ({kept[0]:.2f} to {kept[-1]:.2f} mm, step {run.step:.4g} mm), "
            f"e.g. a localizer stored in the series; {COVERS} those slices only")


def _stack_order(slices: list[Slice], source: Path, normal: np.ndarray, allow_uneven: bool
                 ) -> tuple[list[Slice], np.ndarray, float, bool, list[str]]:
    """(slices sorted and kept, their positions, step, uneven, messages) along ``normal``."""
    positions = np.stack([_floats(ds.ImagePositionPatient) for _, ds in slices])
    if positions.shape[1] != 3 or not np.isfinite(positions).all():
        raise ImageReadError(f"{source}: an ImagePositionPatient is not three finite numbers; the header is damaged")
    order = np.argsort(positions @ normal, kind="stable")
    positions, slices = positions[order], [slices[i] for i in order]
    offsets = positions @ normal
    if len(slices) > 1 and np.diff(offsets).min() < 1e-3:
        hint = "echoes, phases or time points? put each volume in its own folder"
        raise ImageReadError(f"{source}: several slices share one position ({hint})")
    run = even_run(positions, offsets)
    if run is None:
        if not allow_uneven:
            raise _uneven_error(source, offsets)
        return slices, positions, float(np.median(np.diff(offsets))), True, []
    messages = [_dropped_message(source, offsets, run)] if run.dropped else []
    keep = list(run.keep)
    return [slices[i] for i in keep], positions[keep], run.step, False, messages


def _affine(first: Any, orient: np.ndarray, pixel_spacing: np.ndarray, positions: np.ndarray,
            step: float, even: bool) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1 voxel-to-LPS map with its first two rows negated (RAS)."""
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * pixel_spacing[1]  # i: along a row, so column spacing
    affine[:3, 1] = col_cos * pixel_spacing[0]  # j: down the rows, so row spacing
    if len(positions) > 1 and even:
        # The first-to-last vector keeps the shear of gantry-tilted stacks.
        affine[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    elif len(positions) > 1:
        affine[:3, 2] = normal * step  # uneven: orientation only, never written as a grid
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        affine[:3, 2] = normal * float(thickness)
    affine[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}  # uncompressed syntaxes


def _pixels(path: Path) -> np.ndarray:
    """One slice's stored pixel values, or an error naming what is wrong with the file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # the file ends inside an element, ...
        raise TruncatedImageError(f"{path}: the DICOM file ends early or is damaged ({type(exc).__name__}: "
                                  f"{exc}); copy it again from the source") from exc
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: the slice holds no pixel data (PixelData); copy it again from the source")
    if syntax in _NATIVE:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
        held = len(ds.PixelData)
        if held < expected:
            raise TruncatedImageError(f"{path}: truncated: {expected} bytes of pixel data expected "
                                      f"({ds.Rows} x {ds.Columns} x {bits} bits), the file holds {held}; "
                                      "copy it again from the source")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if syntax not in _NATIVE and any(w in text.lower() for w in ("missing", "plugin", "dependenc", "no pixel data handler")):
            hint = "install a decoder such as pylibjpeg (pip install pylibjpeg pylibjpeg-libjpeg), or convert with dcm2niix"
            raise ImageReadError(f"{path}: no decoder installed for transfer syntax {syntax} ({text}); {hint}") from exc
        raise ImageReadError(f"{path}: pixel data ({syntax}) could not be decoded ({text}); the file is damaged "
                             "or truncated: copy it again from the source") from exc
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: pixel data {pixels.shape} is not one grayscale slice")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    # Slope and intercept may change per slice, so rescale before stacking.
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _read_dicom_slices(slices: list[Slice], source: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                       allow_uneven: bool = False) -> "Volume":
    """Read one series into a ``(D, H, W)`` float32 Volume (H = Rows, W = Columns).

    Slices are sorted by ImagePositionPatient projected on the normal
    ``row cosine x column cosine``; ``Volume.files`` lists their files in that
    order.  The affine is the DICOM PS3.3
    C.7.6.2.1.1 voxel-to-LPS map with its first two rows negated (RAS), as
    nibabel and dcm2niix build it.
    """
    from .volume import Volume, voxel_sizes

    slices, messages = _split_odd_slices(slices, source)
    _check_one_frame(slices, source)
    first_path, first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(f"{first_path}: multi-frame DICOM unsupported; convert with dcm2niix")
    check_voxels((len(slices), int(first.Rows), int(first.Columns)), max_voxels, source)
    orient, pixel_spacing = _check_slices(slices)
    normal = np.cross(orient[:3], orient[3:])
    slices, positions, step, uneven, spacing_messages = _stack_order(slices, source, normal, allow_uneven)
    messages += spacing_messages
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    affine = _affine(first, orient, pixel_spacing, positions, step, not uneven)
    planes = np.stack([_pixels(p) for p, _ in slices])
    return Volume(planes, affine, None, voxel_sizes(affine, 3), source, files=tuple(p for p, _ in slices),
                  messages=tuple(messages), uneven=uneven, positions=tuple(positions @ normal))
