"""The PACS side of a DICOMweb datastore: its image series, the final labels (SEG series) that
reference them, and one series fetched into a folder, each answer checked against what was asked.

What MONAI Label's ``DICOMWebDatastore`` (``monailabel/datastore/dicom.py``) reads, with the
checks it leaves out: an image is a series of an image modality (QIDO-RS, every study); a final
label is a SEG series of one instance whose ``ReferencedSeriesSequence`` names exactly one listed
image series, in that series' study and of its patient (a SEG of another patient or study that
names the series is refused, and :func:`final_labels` says why). Every answer is read under the
DICOMweb limits (:mod:`samed_adapter.dicomweb.limits`); a series is fetched with the checks of
:func:`samed_adapter.dicomweb.study.fetch_series` (its study, series and patient, exactly the
instances QIDO-RS lists).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ..dicomweb.errors import BadAnswerError, shown_url, talking
from ..dicomweb.limits import Limits
from ..dicomweb.query import SeriesInfo, checked_json, first_value, search, series_instances
from ..io.dicom_folders import NOT_IMAGES
from ..io.errors import ImageReadError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

    from ..io.volume import Volume

__all__ = ["PacsLabel", "PacsSeries", "SegFacts", "fetch_series_files", "final_labels", "image_nifti",
           "image_series", "seg_facts"]

logger = logging.getLogger(__name__)

#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters; also what makes it a safe image id.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: The series attributes asked of QIDO-RS (beyond its defaults) for an image's info.
_FIELDS = ["StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "Modality", "SeriesDescription",
           "SeriesNumber"]


def is_uid(text: str) -> bool:
    """Whether ``text`` is a well-formed DICOM UID."""
    return len(text) <= 64 and _UID.match(text) is not None


def _value(item: dict[str, Any], tag: str) -> str:
    """:func:`first_value` as text, "" where the tag or its value is missing."""
    value = first_value(item, tag, "")
    return "" if isinstance(value, dict) else str(value)  # a person name without an alphabetic form


@dataclass(frozen=True)
class PacsSeries:
    """One image series as QIDO-RS lists it; ``info`` is MONAI Label's ``_dicom_info`` of it."""

    uid: str
    study: str
    patient: str
    modality: str
    info: dict[str, str]

    @classmethod
    def from_json(cls, item: dict[str, Any], url: str) -> "PacsSeries":
        uid, study = _value(item, "0020000E"), _value(item, "0020000D")
        info = {"SeriesInstanceUID": uid, "StudyDate": _value(item, "00080020") or "UNK",
                "StudyTime": _value(item, "00080030") or "UNK", "Modality": _value(item, "00080060") or "UNK",
                "RetrieveURL": f"{shown_url(url).rstrip('/')}/studies/{study}/series/{uid}",
                "PatientID": _value(item, "00100020"), "StudyInstanceUID": study,
                "SeriesDescription": _value(item, "0008103E")}
        return cls(uid, study, info["PatientID"], _value(item, "00080060").upper(), info)


def image_series(client: "DICOMwebClient", url: str, limits: Limits,
                 modalities: Optional[Sequence[str]] = None) -> dict[str, PacsSeries]:
    """SeriesInstanceUID -> the image series of the PACS, in its order.

    ``modalities``: those listed (MONAI Label's ``search_filter``, default ``{"Modality": "CT"}``);
    None: every series whose modality holds images (not SEG, SR, RTSTRUCT, ...). Series whose UID
    or study UID is malformed are left out (a UID is the image id, and names a cache file).
    """
    found: list[dict[str, Any]] = []
    for modality in modalities or [None]:
        filters = {"Modality": modality.upper()} if modality else {}
        with talking(url, f"listing the {modality or 'image'} series of the PACS (QIDO-RS)"):
            found += search(client.search_for_series, "0020000E", limits, url, fields=_FIELDS,
                            search_filters=filters)
    series: dict[str, PacsSeries] = {}
    for item in found:
        entry = PacsSeries.from_json(item, url)
        if entry.modality in NOT_IMAGES or (modalities and entry.modality not in [m.upper() for m in modalities]):
            continue
        if not (is_uid(entry.uid) and is_uid(entry.study)):
            logger.warning("%s: series %r of study %r left out: not a DICOM UID", shown_url(url), entry.uid[:80],
                           entry.study[:80])
            continue
        series.setdefault(entry.uid, entry)
    return series


@dataclass(frozen=True)
class SegFacts:
    """What a SEG series' metadata says of itself: where it is, whose it is, what it references."""

    uid: str
    study: str
    patient: str
    instances: int
    referenced: tuple[str, ...]
    when: str  # ContentDate + ContentTime: the newest SEG of a series is its final label


@dataclass(frozen=True)
class PacsLabel:
    """The final label of an image: a SEG series of the PACS."""

    seg: str
    image: str
    study: str
    patient: str
    when: str


def seg_facts(client: "DICOMwebClient", url: str, limits: Limits, study: str, seg: str) -> SegFacts:
    """The :class:`SegFacts` of SEG series ``seg`` from its metadata (WADO-RS; no pixel data)."""
    import pydicom

    with talking(url, f"reading the metadata of SEG series {seg} (WADO-RS)"):
        items = checked_json(client.retrieve_series_metadata(study, seg), url)
    datasets = [pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *_: None) for item in items]
    first = datasets[0] if datasets else pydicom.Dataset()
    referenced = tuple(str(item.get("SeriesInstanceUID", "")) for item in first.get("ReferencedSeriesSequence", []))
    return SegFacts(str(first.get("SeriesInstanceUID", "")), str(first.get("StudyInstanceUID", "")),
                    str(first.get("PatientID", "")), len(datasets), referenced,
                    f"{first.get('ContentDate', '')}{first.get('ContentTime', '')}")


def _why_not(facts: SegFacts, listed_study: str, seg: str, images: dict[str, PacsSeries]) -> Optional[str]:
    """None when the SEG is a final label of a listed image, else why it is not (one phrase)."""
    if facts.uid != seg or facts.study != listed_study:
        return f"its metadata is of series {facts.uid or '(none)'} in study {facts.study or '(none)'}, not as listed"
    if facts.instances != 1:
        return f"it holds {facts.instances} instances (a label is one SEG instance)"
    if len(facts.referenced) != 1:
        return f"it references {len(facts.referenced)} series (a label references its image series alone)"
    image = images.get(facts.referenced[0])
    if image is None:
        return f"it references series {facts.referenced[0]}, which is not an image of this datastore"
    if facts.study != image.study:
        return f"it lies in study {facts.study}, not in its image series' study {image.study}"
    if facts.patient != image.patient:
        return "it is of another patient than its image series (PatientID differs)"
    return None


def final_labels(client: "DICOMwebClient", url: str, limits: Limits, images: dict[str, PacsSeries],
                 known: dict[str, SegFacts], unreadable: Optional[dict[str, str]] = None
                 ) -> tuple[dict[str, PacsLabel], dict[str, str]]:
    """(image uid -> its final label, SEG series uid -> why it is not taken as one).

    ``known``: SEG series uid -> its facts, read before (a stored SEG does not change); new ones
    are read and added. ``unreadable``: SEG series uid -> why it did not read as a label of its
    series (refused again). Of several SEGs of an image the newest (ContentDate, ContentTime) wins.
    """
    unreadable = unreadable or {}
    with talking(url, "listing the SEG series of the PACS (QIDO-RS)"):
        found = search(client.search_for_series, "0020000E", limits, url, fields=["StudyInstanceUID", "PatientID"],
                       search_filters={"Modality": "SEG"})
    labels: dict[str, PacsLabel] = {}
    refused: dict[str, str] = {}
    for item in found:
        seg, study = _value(item, "0020000E"), _value(item, "0020000D")
        if not (is_uid(seg) and is_uid(study)):
            continue
        if seg not in known:
            known[seg] = seg_facts(client, url, limits, study, seg)
        why = unreadable.get(seg) or _why_not(known[seg], study, seg, images)
        if why is not None:
            refused[seg] = why
            continue
        facts = known[seg]
        label = PacsLabel(seg, facts.referenced[0], facts.study, facts.patient, facts.when)
        before = labels.get(label.image)
        if before is None or (label.when, label.seg) > (before.when, before.seg):
            labels[label.image] = label
    return labels, refused


def fetch_series_files(client: "DICOMwebClient", url: str, limits: Limits, study: str, uid: str, patient: str,
                       into: Path, *, image: bool = True) -> Path:
    """Fetch series ``uid`` of ``study`` (WADO-RS) into the new folder ``into/uid``; that folder.

    Every instance must be of that study, series and ``patient`` ("" : the first instance's),
    and the series exactly the instances QIDO-RS lists in it.

    Raises:
        BadAnswerError: the server sent something else; nothing of it is kept.
        DicomWebError: the server failed (see :mod:`samed_adapter.dicomweb.errors`).
        ImageReadError: ``image`` and the series holds no image to read (a localizer, no slices).
    """
    from ..dicomweb.study import fetch_series

    # No modality: fetch_series leaves a series it knows to hold no images (a SEG) unfetched.
    info = SeriesInfo(uid)
    listed = series_instances(client, url, study, info, limits)
    fetched = fetch_series(client, url, study, [info], into, {uid: uid}, instances={uid: listed},
                           patient_id=patient)[0]
    if fetched.error is not None:
        problem = fetched.error.split(": ", 1)[-1].split("; nothing of this series")[0]
        raise BadAnswerError(shown_url(url), f"series {uid}: {problem}", "nothing of it was kept: check the PACS")
    if image and fetched.reason is not None:
        raise ImageReadError(f"series {uid}: {fetched.reason}; it cannot be an image of the datastore (set the "
                             "datastore's modalities to leave such series out)")
    return fetched.folder


def image_nifti(volume: "Volume", path: Union[str, Path]) -> Path:
    """Write ``volume``'s voxels (a DICOM series read) as NIfTI at ``path``: int16 where every value
    is a whole number in its range (CT, MR), float32 otherwise, so reading it back gives them exactly."""
    import nibabel as nib

    from ..io.files import atomic_path

    array = volume.array
    whole = bool(np.all(array == np.round(array))) and array.min(initial=0) >= -32768 and \
        array.max(initial=0) <= 32767
    data = np.asarray(array.T, dtype=np.int16 if whole else np.float32)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_qform(volume.affine, code=1)  # scanner coordinates, as dcm2niix writes them
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_slope_inter(1.0, 0.0)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
