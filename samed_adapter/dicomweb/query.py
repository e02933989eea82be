"""QIDO-RS: the studies a query matches, the series of a study, and our results already stored.

``--continue`` against a server asks :func:`stored_results`: the SEG and RTSTRUCT series of the
study (found by QIDO-RS on their modality) whose metadata (WADO-RS) references a source series
and names this library and this adapter in their algorithm identification: the adapter's
fingerprint where the file records one (a retrained adapter has another), else its name. Such a
result counts as done only where it references exactly the source series' current instances and
records the digest of this run's label options (``labels=``, what a local ``--continue``
compares in the record beside the files); others are listed with why they do not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import BadAnswerError, StudyNotFoundError, shown_url, talking
from .limits import Limits

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

    from ..adapter_file.adapter import Adapter

__all__ = ["SeriesInfo", "StoredResults", "StudyInfo", "check_study_date", "checked_json", "find_studies",
           "first_value", "search", "series_instances", "study_patient", "study_series", "stored_results"]

#: Results asked for per QIDO-RS request (servers cap their answers; the rest comes by offset).
PAGE = 200
#: The output type of each modality our writers store.
RESULT_MODALITIES = {"SEG": "dicom-seg", "RTSTRUCT": "dicom-rtstruct"}
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def search(find: Any, key: str, limits: Limits, url: str, most: Optional[int] = None, **kwargs: Any
           ) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS search, page by page: ``find(limit=, offset=, **kwargs)``.

    Not dicomweb-client's ``get_remaining``: a server that ignores ``offset`` (Orthanc 1.10 does
    without ``limit``) answers the same page forever. Here a page that adds no new ``key``
    (a UID tag) ends the search too, and so does ``limits.max_pages`` (a server that answers
    new results without end); ``most``: the most results (``limits.max_series``), else no bound.

    Raises:
        LimitError: more pages, or more than ``most`` results.
        BadAnswerError: a page that is not DICOM JSON.
    """
    found: dict[str, dict[str, Any]] = {}
    for _ in range(limits.max_pages):
        page = checked_json(find(limit=PAGE, offset=len(found), **kwargs), url)
        fresh = {str(first_value(item, key, "")): item for item in page}
        before = len(found)
        found.update(fresh)
        if most is not None and len(found) > most:
            raise limits.too_many(shown_url(url), "series", "--max-series", most)
        if len(page) < PAGE or len(found) == before:
            return list(found.values())
    raise limits.too_many(shown_url(url), "QIDO-RS pages", "--max-pages", limits.max_pages)


def checked_json(items: Any, url: str) -> list[dict[str, Any]]:
    """``items`` if it is DICOM JSON (a list of objects of tags, each an object whose Value is a
    list), else a :class:`BadAnswerError` saying what is wrong: what reads it may then index freely."""
    def bad(why: str) -> BadAnswerError:
        return BadAnswerError(shown_url(url), f"answered what is not DICOM JSON ({why})",
                              "check the server and the URL (the DICOMweb root, e.g. http://host:8042/dicom-web)")

    if not isinstance(items, list):
        raise bad(f"a {type(items).__name__} where a list of data sets belongs")
    for item in items:
        if not isinstance(item, dict):
            raise bad(f"a {type(item).__name__} where a data set belongs")
        for tag, element in item.items():
            if not isinstance(element, dict) or not isinstance(element.get("Value", []), list):
                raise bad(f"tag {str(tag)[:16]} is not an element with a list of values")
    return items


def first_value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    """The first value of ``tag`` (``"0020000D"``) in a DICOM JSON item; a person name as text."""
    values = item.get(tag, {}).get("Value") or []
    if not values:
        return default
    value = values[0]
    return value.get("Alphabetic", "") if isinstance(value, dict) and "Alphabetic" in value else value


@dataclass(frozen=True)
class StudyInfo:
    """One study a QIDO-RS query found."""

    uid: str
    patient_id: str = ""
    date: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "StudyInfo":
        return cls(str(first_value(item, "0020000D", "")), str(first_value(item, "00100020", "")),
                   str(first_value(item, "00080020", "")), str(first_value(item, "00081030", "")),
                   tuple(str(m) for m in item.get("00080061", {}).get("Value", [])))


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, as QIDO-RS describes it."""

    uid: str
    modality: str = ""
    number: Optional[int] = None
    description: str = ""
    instances: Optional[int] = None

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "SeriesInfo":
        def integer(tag: str) -> Optional[int]:
            try:
                return int(first_value(item, tag))
            except (TypeError, ValueError):
                return None

        return cls(str(first_value(item, "0020000E", "")), str(first_value(item, "00080060", "")), integer("00200011"),
                   str(first_value(item, "0008103E", "") or ""), integer("00201209"))

    @property
    def label(self) -> str:
        """``3 (axial 1.2.3...)``: how messages name the series."""
        number = "" if self.number is None else f"{self.number} "
        return f"{number}({self.description or self.modality or 'no description'}, {self.uid})"


def check_study_date(text: str) -> str:
    """``text`` if it is a DICOM date or range (``20240101``, ``20240101-20241231``, ``-20241231``,
    ``20240101-``), else a ValueError that shows the forms."""
    found = _DATE.match(text.strip())
    if not text.strip() or found is None or (found.group(2) == "-" and not found.group(1)):
        raise ValueError(f"--study-date {text!r} is not a date or range; use YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                         "-YYYYMMDD (up to) or YYYYMMDD- (from)")
    return text.strip()


def find_studies(client: "DICOMwebClient", url: str, limits: Limits, *, patient_id: Optional[str] = None,
                 modality: Optional[str] = None, study_date: Optional[str] = None) -> list[StudyInfo]:
    """The studies QIDO-RS finds for the filters given (all of them must match), by date then UID.

    Raises:
        ValueError: no filter (that would be every study on the server), or a malformed date.
        DicomWebError: the server failed the query (see :mod:`.errors`).
    """
    filters: dict[str, str] = {}
    if patient_id:
        filters["PatientID"] = patient_id
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    if study_date:
        filters["StudyDate"] = check_study_date(study_date)
    if not filters:
        raise ValueError("--query needs at least one of --patient-id, --modality and --study-date: without one it "
                         "would segment every study on the server")
    with talking(url, "searching for studies (QIDO-RS)"):
        found = search(client.search_for_studies, "0020000D", limits, url, search_filters=filters)
    studies = [StudyInfo.from_json(item) for item in found]
    return sorted((s for s in studies if s.uid), key=lambda s: (s.date, s.uid))


def study_series(client: "DICOMwebClient", url: str, study_uid: str, limits: Limits) -> list[SeriesInfo]:
    """The series of a study, by series number then UID.

    Raises:
        StudyNotFoundError: the server holds no such study (HTTP 404, or no series).
        LimitError: more than ``limits.max_series`` series, or ``limits.max_pages`` pages.
    """
    with talking(url, f"searching for the series of study {study_uid} (QIDO-RS)"):
        found = search(client.search_for_series, "0020000E", limits, url, limits.max_series,
                       study_instance_uid=study_uid)
    series = [SeriesInfo.from_json(item) for item in found]
    series = [s for s in series if s.uid]
    if not series:
        raise StudyNotFoundError(f"{shown_url(url)}: no study {study_uid} (QIDO-RS found none of its series); check "
                                 "the UID, or find it with --query --patient-id ID")
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def study_patient(client: "DICOMwebClient", url: str, study_uid: str, limits: Limits) -> str:
    """The study's PatientID as QIDO-RS gives it ("" when the server leaves it out)."""
    with talking(url, f"searching for study {study_uid} (QIDO-RS)"):
        found = search(client.search_for_studies, "0020000D", limits, url,
                       search_filters={"StudyInstanceUID": study_uid})
    return next((str(first_value(item, "00100020", "")) for item in found
                 if str(first_value(item, "0020000D", "")) == study_uid), "")


def series_instances(client: "DICOMwebClient", url: str, study_uid: str, series: SeriesInfo, limits: Limits
                     ) -> frozenset[str]:
    """The SOPInstanceUIDs QIDO-RS lists in ``series``: what its WADO-RS answer must hold, no more, no less."""
    with talking(url, f"searching for the instances of series {series.label} (QIDO-RS)"):
        found = search(client.search_for_instances, "00080018", limits, url, study_instance_uid=study_uid,
                       series_instance_uid=series.uid)
    return frozenset(str(first_value(item, "00080018", "")) for item in found) - {""}


def _parameters(text: str) -> dict[str, str]:
    """``class_id=1,adapter_fingerprint=sha256:..,adapter=a,b`` as a dict: ``adapter`` comes last in
    what our writers record and takes the rest of the text (a name may hold ``,`` and ``=``)."""
    found: dict[str, str] = {}
    rest = str(text or "")
    while rest:
        key, _, value = rest.partition("=")
        key = key.strip()  # ", " separates the RTSTRUCT's parameters
        if key == "adapter":
            found[key] = value
            break
        value, _, rest = value.partition(",")
        found[key] = value
    return found


def _names_adapter(parameters: dict[str, str], adapter: "Adapter", adapter_name: str) -> bool:
    recorded = parameters.get("adapter_fingerprint")
    if recorded:
        return recorded == adapter.fingerprint
    return parameters.get("adapter") == adapter_name


def _seg_parameters(ds: Any) -> list[dict[str, str]]:
    """The parameters of each segment's algorithm; empty when any segment was not made by this library."""
    from ..io.dicom_derived import ALGORITHM_NAME

    algorithms = [a for segment in ds.get("SegmentSequence", [])
                  for a in segment.get("SegmentationAlgorithmIdentificationSequence", [])]
    if not algorithms or any(str(a.get("AlgorithmName", "")) != ALGORITHM_NAME for a in algorithms):
        return []
    return [_parameters(a.get("AlgorithmParameters", "")) for a in algorithms]


def _rtstruct_parameters(ds: Any) -> list[dict[str, str]]:
    """StructureSetDescription reads ``samed-adapter <version>, adapter_fingerprint=..., labels=...,
    adapter=<name>``."""
    from ..io.dicom_derived import ALGORITHM_NAME

    maker, _, parameters = str(ds.get("StructureSetDescription", "")).partition(", ")
    return [_parameters(parameters)] if maker.split(" ")[0] == ALGORITHM_NAME else []


def _seg_sources(ds: Any) -> dict[str, set[str]]:
    """Source SeriesInstanceUID -> the SOPInstanceUIDs of it the SEG references."""
    return {str(item.SeriesInstanceUID): {str(i.get("ReferencedSOPInstanceUID", ""))
                                          for i in item.get("ReferencedInstanceSequence", [])}
            for item in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item}


def _rtstruct_sources(ds: Any) -> dict[str, set[str]]:
    """Source SeriesInstanceUID -> the SOPInstanceUIDs of it the structure set's frame of reference lists."""
    found: dict[str, set[str]] = {}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    found.setdefault(str(series.SeriesInstanceUID), set()).update(
                        str(i.get("ReferencedSOPInstanceUID", "")) for i in series.get("ContourImageSequence", []))
    return found


@dataclass
class StoredResults:
    """What a server holds of this adapter's results, per source SeriesInstanceUID.

    ``done``: the output types (``dicom-seg``, ``dicom-rtstruct``) that count for ``--continue``:
    made as this run would make them, on exactly the series' instances. ``stale``: why results
    of this adapter there do not count (one phrase each), so that the summary says why a series
    is made again.
    """

    done: dict[str, set[str]] = field(default_factory=dict)
    stale: dict[str, list[str]] = field(default_factory=dict)


def _why_stale(modality: str, parameters: list[dict[str, str]], digest: str, referenced: set[str],
               current: frozenset[str]) -> Optional[str]:
    """None when a result of this adapter counts as this run's, else why not."""
    if any(p.get("labels") != digest for p in parameters):
        return (f"its {modality} on the server was made with other options (--classes, --window, --percentiles, "
                "or by an older samed-adapter that did not record them)")
    if referenced != current:
        extra = len(referenced - current)
        return (f"its {modality} on the server references {len(referenced & current)} of the series' {len(current)} "
                f"instances" + (f" and {extra} it no longer holds" if extra else ""))
    return None


def stored_results(client: "DICOMwebClient", url: str, study_uid: str, adapter: "Adapter", adapter_name: str,
                   limits: Limits, *, digest: str, instances: dict[str, frozenset[str]],
                   types: Sequence[str] = tuple(RESULT_MODALITIES.values())) -> StoredResults:
    """What of ``types`` the server holds for each series of ``instances`` (source SeriesInstanceUID
    -> its current SOPInstanceUIDs), made by ``adapter`` (see the module docstring) with the
    label options whose :func:`~samed_adapter.io.dicom_derived.labels_digest` is ``digest``."""
    import pydicom

    checks = {"SEG": (_seg_parameters, _seg_sources), "RTSTRUCT": (_rtstruct_parameters, _rtstruct_sources)}
    found = StoredResults()
    for modality, output_type in RESULT_MODALITIES.items():
        if output_type not in types:
            continue
        parameters_of, sources = checks[modality]
        with talking(url, f"searching study {study_uid} for stored {modality} series (QIDO-RS)"):
            series = [SeriesInfo.from_json(item) for item in search(client.search_for_series, "0020000E", limits,
                                                                     url, limits.max_series,
                                                                     study_instance_uid=study_uid,
                                                                     search_filters={"Modality": modality})]
            for result in series:
                for item in checked_json(client.retrieve_series_metadata(study_uid, result.uid), url):
                    # Pixel data and other bulk data are not needed: only the references and the algorithm.
                    ds = pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *_: None)
                    parameters = parameters_of(ds)
                    if not parameters or not all(_names_adapter(p, adapter, adapter_name) for p in parameters):
                        continue  # another tool's, or another adapter's
                    for source, referenced in sources(ds).items():
                        if source not in instances:
                            continue
                        why = _why_stale(modality, parameters, digest, referenced, instances[source])
                        if why is None:
                            found.done.setdefault(source, set()).add(output_type)
                        else:
                            found.stale.setdefault(source, []).append(why)
    return found
