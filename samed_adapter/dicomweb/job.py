"""Segment a study from a PACS: find its series, fetch them, segment them, store the results back.

:func:`segment_study` runs the segment job (:func:`~samed_adapter.segment.pipeline.segment_files`)
over the series folders fetched into a private temporary folder, so the outputs written into
``output_dir`` are exactly those a local ``samed-adapter segment`` writes for the same series.
Storing (STOW-RS) begins only once every series was segmented, one request per series.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from ..segment.outputs import DICOM_OUTPUT_TYPES
from .errors import StudyNotFoundError, shown_url
from .session import Credentials, open_client

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..segment.pipeline import InputResult
    from .query import SeriesInfo, StudyInfo

__all__ = ["SeriesResult", "StudyResult", "segment_studies", "segment_study"]



@dataclass
class SeriesResult:
    """What became of one series of a study.

    ``status``: ``"stored"`` (segmented and its DICOM results stored), ``"written"`` (segmented,
    nothing stored), ``"skipped"`` (``--continue``: the server, or the output folder, already
    holds this adapter's results), ``"not segmented"`` (``message`` says why: a report, a SEG, a
    localizer) or ``"failed"`` (``message`` says why; the other series went on).
    """

    uid: str
    name: str
    status: str
    message: str = ""
    files: list[Path] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)


@dataclass
class StudyResult:
    """The series of one study, in the order of their series numbers."""

    uid: str
    series: list[SeriesResult] = field(default_factory=list)

    @property
    def stored(self) -> list[str]:
        """The SOPInstanceUIDs this run stored on the server."""
        return [uid for s in self.series for uid in s.stored]

    def status(self, status: str) -> list[SeriesResult]:
        return [s for s in self.series if s.status == status]


def _dicom_types(options: dict[str, Any], store: bool) -> None:
    """With ``store``, outputs a server can keep: a request without one gets a DICOM-SEG."""
    types = options.get("output_types", ("nifti",))
    types = tuple(t.strip() for t in types.split(",")) if isinstance(types, str) else tuple(types)
    if store and not any(t in DICOM_OUTPUT_TYPES for t in types):
        types = (*types, "dicom-seg")
    options["output_types"] = types


def _relabelled(text: str, folder: Path, name: str) -> str:
    """A message about a fetched series' temporary folder, naming the series instead."""
    return text.replace(str(folder), f"series {name}")


def segment_study(
    url: str,
    study_uid: str,
    *,
    sam: Any,
    adapter: Any,
    series: Optional[Sequence[str]] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    store: bool = False,
    store_to: Optional[str] = None,
    skip_stored: bool = False,
    credentials: Optional[Credentials] = None,
    user: Optional[str] = None,
    password: Optional[str] = None,
    token: Optional[str] = None,
    on_series: Optional[Callable[[SeriesResult], None]] = None,
    on_result: Optional[Callable[["InputResult"], None]] = None,
    **options: Any,
) -> StudyResult:
    """Segment the series of a study on a DICOMweb server, and store the results back.

    Args:
        url: the server's DICOMweb root, e.g. ``http://host:8042/dicom-web``.
        study_uid: StudyInstanceUID of the study.
        sam, adapter: as for :func:`~samed_adapter.segment_files` (a stock SAM or its
            checkpoint, an adapter file, Hub id or :class:`~samed_adapter.Adapter`).
        series: SeriesInstanceUIDs to segment (default: every series of the study).
        output_dir: where the outputs go, as a local run on each series folder writes them
            (``<series>.nii.gz``, ``<series>_seg.dcm``, ...). None (``store=True`` only): a
            temporary folder, removed once the results are stored.
        store: send the DICOM-SEG and RTSTRUCT results back (STOW-RS), one request per series,
            after every series was segmented. Without a DICOM type in ``output_types`` a
            DICOM-SEG is added.
        store_to: store on this DICOMweb server instead (with the same credentials).
        skip_stored: ``--continue``: skip series for which the server already holds this
            adapter's results of every DICOM type asked for (and, with ``output_dir``, the local
            outputs that exist, which are stored if the server lacks them).
        credentials, user, password, token: HTTP basic (``user`` with ``password``, else
            ``$SAMED_DICOMWEB_PASSWORD``) or a bearer token (else ``$SAMED_DICOMWEB_TOKEN``).
        on_series: called with each :class:`SeriesResult` as it is known.
        on_result: passed on to the segment job: called as each series' outputs are written.
        options: what to write and how to predict (``output_types``, ``classes``, ``engine``,
            ``batch_size``, ...): see :func:`~samed_adapter.segment_files`.

    Returns:
        A :class:`StudyResult`: one :class:`SeriesResult` per series.

    Raises:
        DicomWebAuthError: the server refused the credentials.
        StudyNotFoundError: no such study, or a series named is not in it.
        DicomWebConnectionError: the server could not be reached or went away; what was stored
            before is complete (the message says which series), nothing else was stored.
        StoreError: the server refused some results of a series.
        ValueError: options the segment job refuses, or neither ``output_dir`` nor ``store``.
    """
    from ..adapter_file.adapter import Adapter

    if output_dir is None and not store:
        raise ValueError("segment_study needs output_dir (-o), store=True (--store), or both; else nothing is kept")
    credentials = credentials or Credentials.resolve(user, password, token)
    # Named as the segment job names it, so the outputs are those of a local run.
    options.setdefault("adapter_name", os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else "adapter")
    adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
    _dicom_types(options, store)
    source = open_client(url, credentials)
    target_url = store_to or url
    target = open_client(store_to, credentials) if store_to else source
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="samed-dicomweb-out-") as tmp:
            return _segment_study(source, url, target, target_url, study_uid, series, Path(tmp), store, skip_stored,
                                  sam, adapter, on_series, on_result, options)
    return _segment_study(source, url, target, target_url, study_uid, series, Path(output_dir), store, skip_stored,
                          sam, adapter, on_series, on_result, options)


def _chosen(infos: Sequence["SeriesInfo"], wanted: Optional[Sequence[str]], url: str, study_uid: str
            ) -> list["SeriesInfo"]:
    if not wanted:
        return list(infos)
    known = {s.uid: s for s in infos}
    unknown = [uid for uid in wanted if uid not in known]
    if unknown:
        listed = ", ".join(s.label for s in infos[:8]) + (", ..." if len(infos) > 8 else "")
        raise StudyNotFoundError(f"{shown_url(url)}: study {study_uid} has no series {', '.join(unknown)}; its series "
                                 f"are {listed}")
    return [known[uid] for uid in dict.fromkeys(wanted)]


def _segment_study(source: Any, url: str, target: Any, target_url: str, study_uid: str,
                   wanted: Optional[Sequence[str]], out: Path, store: bool, skip_stored: bool, sam: Any, adapter: Any,
                   on_series: Optional[Callable], on_result: Optional[Callable], options: dict[str, Any]) -> StudyResult:
    from ..segment.pipeline import segment_files
    from .query import stored_results, study_series
    from .store import store_series
    from .study import fetch_series, series_folder_names

    result = StudyResult(study_uid)

    def say(item: SeriesResult) -> SeriesResult:
        result.series.append(item)
        if on_series is not None:
            on_series(item)
        return item

    infos = _chosen(study_series(source, url, study_uid), wanted, url, study_uid)
    asked = [t for t in DICOM_OUTPUT_TYPES if t in options["output_types"]]
    on_server: dict[str, set[str]] = {}
    if skip_stored and asked:
        on_server = stored_results(target, target_url, study_uid, adapter, options["adapter_name"], asked)
    names = series_folder_names(infos)  # of every series asked for: stable whichever are skipped
    todo = []
    for info in infos:
        if asked and set(asked) <= on_server.get(info.uid, set()):
            say(SeriesResult(info.uid, names[info.uid], "skipped",
                             f"series {names[info.uid]}: the server holds this adapter's results (--continue)"))
        else:
            todo.append(info)
    with tempfile.TemporaryDirectory(prefix="samed-dicomweb-") as tmp:  # mode 0700: the instances are patient data
        fetched = fetch_series(source, url, study_uid, todo, Path(tmp), names)
        ready = []
        for item in fetched:
            name = item.folder.name
            if item.reason is not None:
                say(SeriesResult(item.info.uid, name, "not segmented", f"series {name}: {item.reason}"))
            else:
                ready.append(item)
        by_folder = {str(item.folder): item for item in ready}
        done: dict[str, "InputResult"] = {}

        def collect(input_result: "InputResult") -> None:
            # A result names its series folder, alone or followed by " (series ...)", "/file" or ": why".
            name = input_result.name
            item = next((f for key, f in by_folder.items()
                         if name.startswith(key) and name[len(key):len(key) + 1] in ("", " ", "/", ":")), None)
            if item is not None:
                input_result.message = _relabelled(input_result.message, item.folder, item.folder.name)
                if input_result.status != "ignored":  # a stray instance beside the slices is not the series' result
                    done.setdefault(item.info.uid, input_result)
            if on_result is not None:
                on_result(input_result)

        if ready:
            segment_files([str(item.folder) for item in ready], out, sam=sam, adapter=adapter,
                          skip_existing=skip_stored, on_result=collect, **options)
    stored_names: list[str] = []
    for item in ready:
        name, made = item.folder.name, done.get(item.info.uid)
        if made is None or made.status == "failed":
            say(SeriesResult(item.info.uid, name, "failed", made.message if made else f"series {name}: not segmented"))
            continue
        files = [Path(f) for f in made.files]
        series_result = SeriesResult(item.info.uid, name, "written", made.message, files)
        if store:
            have = on_server.get(item.info.uid, set())
            results = [f for f in files if f.suffix == ".dcm" and _output_type(f) not in have]
            if results:
                before = (f"the results of series {', '.join(stored_names)} were stored, nothing of series {name} "
                          "and after" if stored_names else "nothing was stored")
                series_result.stored = store_series(target, target_url, study_uid, results, f"series {name}", before)
                stored_names.append(name)
            series_result.status = "stored"
        say(series_result)
    result.series.sort(key=lambda s: [i.uid for i in infos].index(s.uid))
    return result


def _output_type(path: Path) -> str:
    """``dicom-seg`` or ``dicom-rtstruct``: which of our DICOM outputs ``path`` is, by its modality."""
    import pydicom

    from .query import RESULT_MODALITIES

    modality = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    return RESULT_MODALITIES.get(modality, modality)


def segment_studies(
    url: str,
    *,
    sam: Any,
    adapter: Any,
    patient_id: Optional[str] = None,
    modality: Optional[str] = None,
    study_date: Optional[str] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    credentials: Optional[Credentials] = None,
    on_studies: Optional[Callable[[list["StudyInfo"]], None]] = None,
    **kwargs: Any,
) -> list[StudyResult]:
    """Segment every study a QIDO-RS query finds (``--query``), one after the other.

    The filters (at least one) all have to match: ``patient_id``, ``modality`` (in the study),
    ``study_date`` (``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``). Each study's outputs go to
    ``output_dir/<StudyInstanceUID>/``. ``on_studies`` is called with the studies found before
    any is segmented. The SAM and the adapter are loaded once for all studies. Other arguments
    are those of :func:`segment_study`.
    """
    from ..adapter_file.adapter import Adapter
    from ..segment.pipeline import SamSource
    from .query import find_studies

    credentials = credentials or Credentials.resolve(kwargs.pop("user", None), kwargs.pop("password", None),
                                                     kwargs.pop("token", None))
    studies = find_studies(open_client(url, credentials), url, patient_id=patient_id, modality=modality,
                           study_date=study_date)
    if on_studies is not None:
        on_studies(studies)
    if not studies:
        return []
    if isinstance(adapter, (str, os.PathLike)):
        kwargs.setdefault("adapter_name", os.fspath(adapter))
        adapter = Adapter.load(adapter)
    if kwargs.get("engine") != "ray":  # Ray workers rebuild the SAM themselves
        sam = (sam if isinstance(sam, SamSource) else SamSource.of(sam))
        sam = SamSource(sam.build()) if sam.module is None else sam
    return [segment_study(url, study.uid, sam=sam, adapter=adapter, credentials=credentials,
                          output_dir=None if output_dir is None else Path(output_dir) / study.uid, **kwargs)
            for study in studies]
