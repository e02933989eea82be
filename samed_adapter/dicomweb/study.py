"""Fetch a study's series (WADO-RS) into a private folder, one subfolder per series, and tell apart
the series that can be segmented from those that cannot (and why).

Each series folder is named like dcm2niix names series (``<number>_<description>``; the end of
the UID where that is not unique), so that the segment job writes ``<name>.nii.gz``,
``<name>_seg.dcm``, ... for it: exactly what ``samed-adapter segment <name>/ -o OUT`` writes for
the same files in a local folder.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import talking
from .query import SeriesInfo

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pydicom
    from dicomweb_client import DICOMwebClient

# What pydicom and dicomweb-client raise on a part that is not DICOM (a missing preamble, a
# truncated element, a body that is not multipart). pydicom parses elements lazily, so the
# checks and the write after the read can raise them too.
_NOT_DICOM = (ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError, struct.error, UnicodeError,
              NotImplementedError)

__all__ = ["FetchedSeries", "fetch_series", "series_folder_names", "why_not_segmented"]


@dataclass
class FetchedSeries:
    """One series of a study on disk: its folder, and why it cannot be segmented (None: it can).

    ``error``: why the server's answer was refused (another study's, series' or patient's
    instances, instances QIDO-RS does not list, a part that is not DICOM); the folder is empty
    then, and the series fails.
    """

    info: SeriesInfo
    folder: Path
    reason: Optional[str] = None
    error: Optional[str] = None


class _WrongAnswer(Exception):
    """The WADO-RS answer of a series is not what was asked for (the message says how)."""


def _safe(text: str) -> str:
    """``text`` as a file name part: runs of characters outside [A-Za-z0-9.-] as ``_``, no leading dot."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._")


def series_folder_names(series: Sequence[SeriesInfo]) -> dict[str, str]:
    """SeriesInstanceUID -> a folder name, unique in the study case-insensitively (macOS, Windows)."""
    bases = {s.uid: "_".join(p for p in (_safe(str(s.number)) if s.number is not None else "", _safe(s.description))
                             if p) or _safe(s.uid)[-8:] for s in series}
    counts: dict[str, int] = {}
    for base in bases.values():
        counts[base.casefold()] = counts.get(base.casefold(), 0) + 1
    names: dict[str, str] = {}
    taken: set[str] = set()
    for uid, base in bases.items():
        name = base if counts[base.casefold()] == 1 else f"{base}_{_safe(uid).replace('.', '')[-8:]}"
        unique, n = name, 1
        while unique.casefold() in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique.casefold())
        names[uid] = unique
    return names


def why_not_segmented(folder: Path) -> Optional[str]:
    """None when ``folder`` holds one series of slices to segment, else why not (one phrase).

    What the segment job itself refuses (unevenly spaced or tilted slices, too many voxels) is
    found when it reads the series, and reported as that series' failure.
    """
    import pydicom

    from ..io.dicom_folders import find_dicom

    found = find_dicom(folder)
    if not found.series:
        reasons = sorted({reason for _, reason in found.skipped})
        return "; ".join(reasons) if reasons else "no DICOM instances"
    first = pydicom.dcmread(found.series[0].files[0], stop_before_pixels=True, specific_tags=["ImageType"])
    if any(str(v).upper() == "LOCALIZER" for v in first.get("ImageType", []) or []):
        return "a localizer (ImageType LOCALIZER): a scout image to plan the scan, not a volume to segment"
    return None


def fetch_series(client: "DICOMwebClient", url: str, study_uid: str, series: Sequence[SeriesInfo], into: Path,
                 names: Optional[dict[str, str]] = None,
                 on_fetched: Optional[Callable[[FetchedSeries], None]] = None, *,
                 instances: Optional[dict[str, frozenset[str]]] = None, patient_id: str = "") -> list[FetchedSeries]:
    """Retrieve every instance of ``series`` (WADO-RS) into ``into/<series folder name>/``.

    Series whose modality holds no images (SR, SEG, RTSTRUCT, ...: QIDO-RS says so) are not
    fetched; they come back with their reason and an empty folder.

    Each instance the server sends must be of ``study_uid``, of the series asked for, of the
    study's patient (``patient_id``, else the first instance's), and one of ``instances[uid]``
    (what QIDO-RS lists), once; the series must come whole. Otherwise the series comes back with
    its ``error`` and an empty folder (nothing of it is segmented or stored), and the others go on.

    ``names``: each series' folder name (default :func:`series_folder_names` of ``series``; pass
    those of the whole study, so that a series keeps its name when others are left out).
    ``into`` should be private (the instances carry patient data): :func:`segment_study` makes a
    temporary folder only its user can read. ``on_fetched`` is called as each series is on disk.

    Raises:
        DicomWebError: the server failed a retrieval, or sent more than the run's limits allow;
            nothing was segmented or stored yet.
    """
    import shutil

    from ..io.dicom_folders import NOT_IMAGES

    names = names or series_folder_names(series)
    patient = [patient_id] if patient_id else []  # the first instance's, where QIDO-RS gave none
    fetched = []
    for info in series:
        folder = into / names[info.uid]
        folder.mkdir(parents=True)
        modality = info.modality.upper()
        if modality in NOT_IMAGES:  # QIDO-RS says enough: no need to fetch a report or a SEG
            fetched.append(FetchedSeries(info, folder, f"not an image ({modality}: {NOT_IMAGES[modality]})"))
            continue
        try:
            with talking(url, f"fetching series {info.label} of study {study_uid} (WADO-RS)",
                         stored="nothing was segmented or stored"):
                _write_series(client, study_uid, info, folder, (instances or {}).get(info.uid), patient)
            item = FetchedSeries(info, folder, why_not_segmented(folder))
        except _WrongAnswer as err:
            shutil.rmtree(folder)
            folder.mkdir()
            item = FetchedSeries(info, folder, error=f"series {folder.name}: the server sent {err} (WADO-RS); nothing "
                                                     "of this series was segmented or stored: check the PACS")
        fetched.append(item)
        if on_fetched is not None:
            on_fetched(item)
    return fetched


def _write_series(client: "DICOMwebClient", study_uid: str, info: SeriesInfo, folder: Path,
                  listed: Optional[frozenset[str]], patient: list[str]) -> None:
    """Stream the series to ``folder`` an instance at a time, checking each (see :func:`fetch_series`).

    Not retrieve_series: that would hold a whole series (a 1000-slice CT is 0.5 GB) in memory
    before the first file is written.
    """
    import pydicom

    from pydicom.errors import InvalidDicomError

    not_dicom = (*_NOT_DICOM, InvalidDicomError)
    seen: set[str] = set()
    answer = iter(client.iter_series(study_uid, info.uid))
    try:
        for k in itertools.count():
            try:
                ds = next(answer)
                problem = _mismatch(ds, study_uid, info.uid, listed, seen, patient)
                if problem is None:
                    pydicom.dcmwrite(folder / f"{k:05d}.dcm", ds, enforce_file_format=True)
            except StopIteration:
                break
            except not_dicom as err:  # what a part that is not DICOM raises in pydicom or dicomweb-client
                raise _WrongAnswer(f"a part that is not DICOM ({type(err).__name__}: {str(err)[:120]})") from None
            if problem is not None:
                raise _WrongAnswer(problem)
    finally:
        close = getattr(answer, "close", None)
        if close is not None:
            close()  # the rest of the answer is not read
    if listed is not None and seen != listed:
        raise _WrongAnswer(f"{len(seen & listed)} of the {len(listed)} instances QIDO-RS lists in this series")


def _mismatch(ds: "pydicom.Dataset", study_uid: str, series_uid: str, listed: Optional[frozenset[str]],
              seen: set[str], patient: list[str]) -> Optional[str]:
    """Why ``ds`` is not an instance of the series asked for, else None (and ``ds`` is counted)."""
    study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    if study != study_uid:
        return f"an instance of study {study or '(none)'}, not of study {study_uid} as asked"
    if series != series_uid:
        return f"an instance of series {series or '(none)'}, not of series {series_uid} as asked"
    if listed is not None and sop not in listed:
        return f"instance {sop or '(none)'}, which QIDO-RS does not list in this series"
    if sop in seen:
        return f"instance {sop} twice"
    if not patient:
        patient.append(str(ds.get("PatientID", "")))
    if str(ds.get("PatientID", "")) != patient[0]:
        return "an instance of another patient (its PatientID is not the study's)"  # whose is not shown: not ours
    seen.add(sop)
    return None
