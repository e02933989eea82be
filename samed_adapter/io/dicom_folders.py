"""DICOM folders: which files are slices of which series, and why the others are not (headers only).

:func:`find_dicom` looks at the files directly in a folder and returns a :class:`DicomFolder`:
the segmentable series (:class:`DicomSeries`, grouped by SeriesInstanceUID) and, for every file
that *is* DICOM but belongs to no segmentable series, ``(path, reason)``: a single projection
image (CR, DX, MG: no ImagePositionPatient), not an image at all (SR, RTSTRUCT, SEG, a
presentation state), a multi-frame image, an unreadable header. A file is DICOM when it holds
``DICM`` at byte 128 (whatever its name: ``CR1/6154`` on a CD) or, for old files without the
preamble, when a forced read finds a SOP Class UID. DICOMDIR files (the media's index) and files
that are not DICOM (notes, thumbnails) are in neither list.

Reading a series into a Volume is :mod:`.dicom_series`'s.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SUPPORTED, ImageReadError

__all__ = ["NOT_IMAGES", "DicomFolder", "DicomSeries", "Slice", "find_dicom", "folder_files", "group_series",
           "is_dicom_file", "list_dicom_series", "probe_dicom", "scan_folder", "scan_slices", "several_series_error"]

_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
#: Modalities that hold no pixels to segment (PS3.3 C.7.3.1.1.1).
NOT_IMAGES = {
    "SR": "a structured report", "RTSTRUCT": "an RT structure set", "SEG": "a segmentation",
    "PR": "a presentation state", "KO": "a key object selection", "RTPLAN": "an RT plan",
    "RTRECORD": "an RT treatment record", "DOC": "a document", "REG": "a registration",
    "FID": "fiducials", "AU": "audio", "ECG": "a waveform", "PLAN": "a plan",
}
_PROJECTION = {"CR", "DX", "MG", "IO", "PX", "XA", "RF", "RG", "OP", "XC", "ES", "SM", "US", "OT"}

#: (path, header read with stop_before_pixels) of one DICOM image slice.
Slice = tuple[Path, Any]


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


@dataclass(frozen=True)
class DicomFolder:
    """What :func:`find_dicom` found in one folder.

    Attributes:
        series: the segmentable series, ordered by (SeriesNumber, SeriesInstanceUID).
        skipped: ``(path, reason)`` for each DICOM file that is in no series, sorted by path;
            the reason is one phrase, e.g. ``"single projection image (CR): no slice position"``.
    """

    series: list[DicomSeries] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- finding


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file with the DICOM Part 10 magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_header(path: Path) -> Any | None:
    """The header of a DICOM file (no pixel data), or None when ``path`` is not DICOM."""
    import pydicom

    if is_dicom_file(path):
        return pydicom.dcmread(path, stop_before_pixels=True)
    with warnings.catch_warnings():  # forced reads of notes/thumbnails warn about VRs
        warnings.simplefilter("ignore", UserWarning)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            known = "SOPClassUID" in ds or all(tag in ds for tag in _GEOMETRY)
        except Exception:  # not DICOM at all (notes, thumbnails, ...)
            return None
    return ds if known else None


def _why_not_a_slice(ds: Any) -> str | None:
    """None when ``ds`` is a segmentable image slice, else why not (one phrase)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in NOT_IMAGES:
        return f"not an image ({modality}: {NOT_IMAGES[modality]})"
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        return f"multi-frame image ({frames} frames), unsupported; convert it with dcm2niix"
    if all(tag in ds for tag in _GEOMETRY):
        return None
    if "Rows" not in ds:
        sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        kind = str(getattr(sop, "name", "") or "")
        if kind.endswith("Image Storage"):  # an image by its class, yet the header stops before its size
            return f"truncated or damaged ({kind}, but no Rows/Columns); copy it again from the source"
        if sop is None and not modality:  # DICM magic, then nothing that says what it is
            return "truncated or damaged (no SOP Class, Modality or Rows: the header ends early); copy it again from the source"
        return f"not an image ({modality or 'no Modality'}: no pixel data attributes)"
    if modality in _PROJECTION or "ImagePositionPatient" not in ds:
        return f"single projection image ({modality or 'no Modality'}): no slice position (ImagePositionPatient)"
    missing = ", ".join(tag for tag in _GEOMETRY if tag not in ds)
    return f"image without slice geometry (missing {missing})"


def classify_dicom(path: Path) -> tuple[Any | None, str | None]:
    """``(header, None)`` for an image slice, ``(None, reason)`` for other DICOM, ``(None, None)`` else."""
    try:
        ds = _read_header(path)
    except Exception as exc:  # DICM magic but a damaged header
        return None, f"unreadable DICOM header ({type(exc).__name__}: {str(exc)[:120]})"
    if ds is None or str(ds.get("SOPClassUID", "")) == _DICOMDIR or "DirectoryRecordSequence" in ds:
        return None, None
    reason = _why_not_a_slice(ds)
    return (None, reason) if reason else (ds, None)


def probe_dicom(path: Path) -> Any | None:
    """Header of ``path`` if it is a DICOM slice with geometry, else None."""
    return classify_dicom(Path(path))[0]


def scan_slices(files: list[Path]) -> tuple[list[Slice], list[tuple[Path, str]]]:
    slices, skipped = [], []
    for p in files:
        if not p.is_file():
            continue
        ds, reason = classify_dicom(p)
        if ds is not None:
            slices.append((p, ds))
        elif reason is not None:
            skipped.append((p, reason))
    return slices, skipped


def folder_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder; pass the folder holding the DICOM files")
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        hint = "check it exists and is readable"
        raise ImageReadError(f"{folder}: cannot list the folder ({exc}); {hint}") from exc


def find_dicom(folder: str | os.PathLike[str]) -> DicomFolder:
    """The DICOM series of the files directly in ``folder``, and the DICOM files in none.

    Only headers are read. Unlike :func:`list_dicom_series` this does not raise when the folder
    holds no series: a folder of CR images gives ``series == []`` and one ``skipped`` entry per
    image, so a caller can say what was found and why it is not segmented.

    Raises:
        ImageReadError: ``folder`` is not a folder or cannot be listed.
    """
    folder = Path(folder)
    slices, skipped = scan_slices(folder_files(folder))
    series = [s for s, _ in group_series(slices, folder)] if slices else []
    return DicomFolder(series, skipped)


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """List the DICOM series of the files directly in ``folder`` (not subfolders).

    Only headers are read (no pixel data).  Files that are not DICOM image
    slices with geometry (notes, DICOMDIR, reports) are skipped; :func:`find_dicom`
    also says which DICOM files were skipped and why.  Series are
    ordered by (SeriesNumber, SeriesInstanceUID); a missing number sorts last.

    Raises:
        ImageReadError: ``folder`` is not a folder or holds no DICOM image slice.
    """
    return [series for series, _ in scan_folder(Path(folder))]


def scan_folder(folder: Path) -> list[tuple[DicomSeries, list[Slice]]]:
    """Probe the files directly in ``folder`` and group them into named series."""
    slices, skipped = scan_slices(folder_files(folder))
    return group_series(slices, folder, skipped)


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


def _no_slices_error(source: Path, skipped: list[tuple[Path, str]]) -> ImageReadError:
    if not skipped:
        return ImageReadError(f"{source}: no DICOM image slices with {', '.join(_GEOMETRY[:3])}; {SUPPORTED}")
    shown = "; ".join(f"{p.name}: {reason}" for p, reason in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    return ImageReadError(f"{source}: no DICOM series to segment; {len(skipped)} DICOM file(s) that are not "
                          f"slices of one ({shown})")


def group_series(slices: list[Slice], source: Path, skipped: list[tuple[Path, str]] | None = None
                  ) -> list[tuple[DicomSeries, list[Slice]]]:
    """Group probed slices by SeriesInstanceUID, ordered by (SeriesNumber, UID).

    Each group keeps the input (path) order of its slices.
    """
    if not slices:
        raise _no_slices_error(source, skipped or [])
    groups: dict[str, list[Slice]] = {}
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


def several_series_error(source: Path, series: list[DicomSeries]) -> ImageReadError:
    shown = ", ".join(s.name for s in series[:10]) + (", ..." if len(series) > 10 else "")
    return ImageReadError(
        f"{source}: holds {len(series)} DICOM series ({shown}); read them all with "
        f"samed_adapter.io.read_dicom_folder(folder), or run `samed-adapter segment {source}`, "
        "which writes one label file per series"
    )
