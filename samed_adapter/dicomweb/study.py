"""Fetch a study's series (WADO-RS) into a private folder, one subfolder per series, and tell apart
the series that can be segmented from those that cannot (and why).

Each series folder is named like dcm2niix names series (``<number>_<description>``; the end of
the UID where that is not unique), so that the segment job writes ``<name>.nii.gz``,
``<name>_seg.dcm``, ... for it: exactly what ``samed-adapter segment <name>/ -o OUT`` writes for
the same files in a local folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import talking
from .query import SeriesInfo

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

__all__ = ["FetchedSeries", "fetch_series", "series_folder_names", "why_not_segmented"]


@dataclass
class FetchedSeries:
    """One series of a study on disk: its folder, and why it cannot be segmented (None: it can)."""

    info: SeriesInfo
    folder: Path
    reason: Optional[str] = None


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

    from ..io.dicom_series import find_dicom

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
                 on_fetched: Optional[Callable[[FetchedSeries], None]] = None) -> list[FetchedSeries]:
    """Retrieve every instance of ``series`` (WADO-RS) into ``into/<series folder name>/``.

    Series whose modality holds no images (SR, SEG, RTSTRUCT, ...: QIDO-RS says so) are not
    fetched; they come back with their reason and an empty folder.

    ``names``: each series' folder name (default :func:`series_folder_names` of ``series``; pass
    those of the whole study, so that a series keeps its name when others are left out).
    ``into`` should be private (the instances carry patient data): :func:`segment_study` makes a
    temporary folder only its user can read. ``on_fetched`` is called as each series is on disk.

    Raises:
        DicomWebError: the server failed a retrieval; nothing was segmented or stored yet.
    """
    import pydicom

    from ..io.dicom_series import NOT_IMAGES

    names = names or series_folder_names(series)
    fetched = []
    for info in series:
        folder = into / names[info.uid]
        folder.mkdir(parents=True)
        modality = info.modality.upper()
        if modality in NOT_IMAGES:  # QIDO-RS says enough: no need to fetch a report or a SEG
            fetched.append(FetchedSeries(info, folder, f"not an image ({modality}: {NOT_IMAGES[modality]})"))
            continue
        # Streamed to disk an instance at a time: retrieve_series would hold a whole series (a
        # 1000-slice CT is 0.5 GB) in memory before the first file is written.
        with talking(url, f"fetching series {info.label} of study {study_uid} (WADO-RS)",
                     stored="nothing was segmented or stored"):
            for k, ds in enumerate(client.iter_series(study_uid, info.uid)):
                pydicom.dcmwrite(folder / f"{k:05d}.dcm", ds, enforce_file_format=True)
        item = FetchedSeries(info, folder, why_not_segmented(folder))
        fetched.append(item)
        if on_fetched is not None:
            on_fetched(item)
    return fetched
