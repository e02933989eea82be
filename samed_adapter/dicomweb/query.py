"""QIDO-RS: the studies a query matches, the series of a study, and our results already stored.

``--continue`` against a server asks :func:`stored_results`: the SEG and RTSTRUCT series of the
study (found by QIDO-RS on their modality) whose metadata (WADO-RS) references a source series
and names this library and this adapter in their algorithm identification: the adapter's
fingerprint where the file records one (a retrained adapter has another), else its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import StudyNotFoundError, shown_url, talking

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomweb_client import DICOMwebClient

    from ..adapter_file.adapter import Adapter

__all__ = ["SeriesInfo", "StudyInfo", "check_study_date", "find_studies", "study_series", "stored_results"]

#: Results asked for per QIDO-RS request (servers cap their answers; the rest comes by offset).
PAGE = 200
#: The output type of each modality our writers store.
RESULT_MODALITIES = {"SEG": "dicom-seg", "RTSTRUCT": "dicom-rtstruct"}
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def search(find: Any, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS search, page by page: ``find(limit=, offset=, **kwargs)``.

    Not dicomweb-client's ``get_remaining``: a server that ignores ``offset`` (Orthanc 1.10 does
    without ``limit``) answers the same page forever. Here a page that adds no new ``key``
    (a UID tag) ends the search too.
    """
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = find(limit=PAGE, offset=len(found), **kwargs)
        fresh = {str(_value(item, key, "")): item for item in page}
        before = len(found)
        found.update(fresh)
        if len(page) < PAGE or len(found) == before:
            return list(found.values())


def _value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
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
        return cls(str(_value(item, "0020000D", "")), str(_value(item, "00100020", "")),
                   str(_value(item, "00080020", "")), str(_value(item, "00081030", "")),
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
                return int(_value(item, tag))
            except (TypeError, ValueError):
                return None

        return cls(str(_value(item, "0020000E", "")), str(_value(item, "00080060", "")), integer("00200011"),
                   str(_value(item, "0008103E", "") or ""), integer("00201209"))

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


def find_studies(client: "DICOMwebClient", url: str, *, patient_id: Optional[str] = None,
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
        found = search(client.search_for_studies, "0020000D", search_filters=filters)
    studies = [StudyInfo.from_json(item) for item in found]
    return sorted((s for s in studies if s.uid), key=lambda s: (s.date, s.uid))


def study_series(client: "DICOMwebClient", url: str, study_uid: str) -> list[SeriesInfo]:
    """The series of a study, by series number then UID.

    Raises:
        StudyNotFoundError: the server holds no such study (HTTP 404, or no series).
    """
    with talking(url, f"searching for the series of study {study_uid} (QIDO-RS)"):
        found = search(client.search_for_series, "0020000E", study_instance_uid=study_uid)
    series = [SeriesInfo.from_json(item) for item in found]
    series = [s for s in series if s.uid]
    if not series:
        raise StudyNotFoundError(f"{shown_url(url)}: no study {study_uid} (QIDO-RS found none of its series); check "
                                 "the UID, or find it with --query --patient-id ID")
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


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


def _seg_is_ours(ds: Any, adapter: "Adapter", adapter_name: str) -> bool:
    from ..io.dicom_derived import ALGORITHM_NAME

    algorithms = [a for segment in ds.get("SegmentSequence", [])
                  for a in segment.get("SegmentationAlgorithmIdentificationSequence", [])]
    return bool(algorithms) and all(
        str(a.get("AlgorithmName", "")) == ALGORITHM_NAME
        and _names_adapter(_parameters(a.get("AlgorithmParameters", "")), adapter, adapter_name)
        for a in algorithms)


def _rtstruct_is_ours(ds: Any, adapter: "Adapter", adapter_name: str) -> bool:
    """StructureSetDescription reads ``samed-adapter <version>, adapter_fingerprint=..., adapter=<name>``."""
    from ..io.dicom_derived import ALGORITHM_NAME

    maker, _, parameters = str(ds.get("StructureSetDescription", "")).partition(", ")
    return maker.split(" ")[0] == ALGORITHM_NAME and _names_adapter(_parameters(parameters), adapter, adapter_name)


def _seg_sources(ds: Any) -> set[str]:
    return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])
            if "SeriesInstanceUID" in item}


def _rtstruct_sources(ds: Any) -> set[str]:
    return {str(series.SeriesInstanceUID)
            for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
            for study in frame.get("RTReferencedStudySequence", [])
            for series in study.get("RTReferencedSeriesSequence", []) if "SeriesInstanceUID" in series}


def stored_results(client: "DICOMwebClient", url: str, study_uid: str, adapter: "Adapter", adapter_name: str,
                   types: Sequence[str] = tuple(RESULT_MODALITIES.values())) -> dict[str, set[str]]:
    """Source SeriesInstanceUID -> the output types (``dicom-seg``, ``dicom-rtstruct``) the server
    already holds for it, made by ``adapter`` (see the module docstring)."""
    import pydicom

    checks = {"SEG": (_seg_is_ours, _seg_sources), "RTSTRUCT": (_rtstruct_is_ours, _rtstruct_sources)}
    found: dict[str, set[str]] = {}
    for modality, output_type in RESULT_MODALITIES.items():
        if output_type not in types:
            continue
        is_ours, sources = checks[modality]
        with talking(url, f"searching study {study_uid} for stored {modality} series (QIDO-RS)"):
            series = [SeriesInfo.from_json(item) for item in search(client.search_for_series, "0020000E",
                                                                     study_instance_uid=study_uid,
                                                                     search_filters={"Modality": modality})]
            for result in series:
                for item in client.retrieve_series_metadata(study_uid, result.uid):
                    # Pixel data and other bulk data are not needed: only the references and the algorithm.
                    ds = pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *_: None)
                    if is_ours(ds, adapter, adapter_name):
                        for source in sources(ds):
                            found.setdefault(source, set()).add(output_type)
    return found
