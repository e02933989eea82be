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
from .limits import Limits
from .query import StoredResults
from .session import Credentials, open_client

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..segment.job import InputResult
    from .query import SeriesInfo, StudyInfo
    from .study import FetchedSeries

__all__ = ["SeriesResult", "StudyResult", "segment_studies", "segment_study"]



@dataclass
class SeriesResult:
    """What became of one series of a study.

    ``status``: ``"stored"`` (segmented and its DICOM results stored), ``"written"`` (segmented,
    nothing stored), ``"skipped"`` (``--continue``: the server, or the output folder, already
    holds this adapter's results), ``"not segmented"`` (``message`` says why: a report, a SEG, a
    localizer) or ``"failed"`` (``message`` says why; the other series went on). ``redone``:
    with ``--continue``, why this adapter's results on the server did not count (they reference
    other instances, or were made with other options), so the series was made again.
    """

    uid: str
    name: str
    status: str
    message: str = ""
    files: list[Path] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    redone: str = ""


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
    limits: Optional[Limits] = None,
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
            adapter's results of every DICOM type asked for, made with the same label options on
            exactly the series' current instances (and, with ``output_dir``, the local outputs
            that exist, which are stored if the server lacks them). Results of this adapter that
            do not count are left on the server; the series is made again (``redone`` says why).
        credentials, user, password, token: HTTP basic (``user`` with ``password``, else
            ``$SAMED_DICOMWEB_PASSWORD``) or a bearer token (else ``$SAMED_DICOMWEB_TOKEN``).
        on_series: called with each :class:`SeriesResult` as it is known.
        on_result: passed on to the segment job: called as each series' outputs are written.
        limits: what the run accepts from the servers (:class:`~.limits.Limits`; its clock
            starts when it is made), or its bounds as keyword arguments: ``max_instance_bytes``,
            ``max_series_bytes``, ``max_series`` (of the study), ``max_pages`` (of a QIDO-RS
            search), ``max_run_time`` (seconds).
        options: what to write and how to predict (``output_types``, ``classes``, ``engine``,
            ``batch_size``, ...): see :func:`~samed_adapter.segment_files`.

    Returns:
        A :class:`StudyResult`: one :class:`SeriesResult` per series.

    Raises:
        DicomWebAuthError: the server refused the credentials.
        StudyNotFoundError: no such study, or a series named is not in it.
        DicomWebConnectionError: the server could not be reached or went away; what was stored
            before is complete (the message says which series), nothing else was stored, except
            that a STOW-RS request the server took before it went away may be stored in part
            (the message says so; ``skip_stored`` then stores what it lacks).
        StoreError: the server refused some results of a series.
        LimitError: a server sent more, or took longer, than ``limits`` allow.
        BadAnswerError: a QIDO-RS answer that is not DICOM JSON. (A WADO-RS answer that is not
            the series asked for, or not DICOM, fails that series; the others go on.)
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
    limits = limits if limits is not None else Limits.take(options)
    source = open_client(url, credentials, limits=limits)
    target = _Server(store_to, open_client(store_to, credentials, limits=limits)) if store_to else \
        _Server(url, source)
    run = _Run(_Server(url, source), target, limits, study_uid, store, skip_stored, sam, adapter, on_series,
               on_result, options)
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="samed-dicomweb-out-") as tmp:
            return _segment_study(run, series, Path(tmp))
    return _segment_study(run, series, Path(output_dir))


@dataclass
class _Server:
    url: str
    client: Any


@dataclass
class _Run:
    """What one study's round trip works with."""

    source: _Server
    target: _Server
    limits: Limits
    study_uid: str
    store: bool
    skip_stored: bool
    sam: Any
    adapter: Any
    on_series: Optional[Callable]
    on_result: Optional[Callable]
    options: dict[str, Any]


def _labels_digest(adapter: Any, options: dict[str, Any]) -> str:
    """The digest the segment job's DICOM results will record for ``options`` (see
    :func:`~samed_adapter.io.dicom_derived.labels_digest`): the same record, made the same way."""
    from ..io.dicom_derived import labels_digest
    from ..segment.outputs import OutputOptions, provenance
    from ..segment.pipeline import check_request

    fields = {k: v for k, v in options.items() if k in OutputOptions.__dataclass_fields__ or k == "classes"}
    opts = check_request(adapter, [], **fields)
    return labels_digest(provenance(adapter, opts, allow_base_mismatch=bool(options.get("allow_base_mismatch"))))


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


def _segment_study(run: _Run, wanted: Optional[Sequence[str]], out: Path) -> StudyResult:
    from ..io.dicom_folders import NOT_IMAGES
    from .query import series_instances, stored_results, study_patient, study_series
    from .study import fetch_series, series_folder_names

    result = StudyResult(run.study_uid)

    def say(item: SeriesResult) -> SeriesResult:
        result.series.append(item)
        if run.on_series is not None:
            run.on_series(item)
        return item

    source, limits, study_uid, options = run.source, run.limits, run.study_uid, run.options
    infos = _chosen(study_series(source.client, source.url, study_uid, limits), wanted, source.url, study_uid)
    # What each image series holds now: its fetched instances must be these, and a result on the server counts
    # for --continue only if it references exactly these.
    instances = {info.uid: series_instances(source.client, source.url, study_uid, info, limits) for info in infos
                 if info.modality.upper() not in NOT_IMAGES}
    asked = [t for t in DICOM_OUTPUT_TYPES if t in options["output_types"]]
    on_server = StoredResults()
    if run.skip_stored and asked:
        on_server = stored_results(run.target.client, run.target.url, study_uid, run.adapter, options["adapter_name"],
                                   limits, digest=_labels_digest(run.adapter, options), instances=instances,
                                   types=asked)
    names = series_folder_names(infos)  # of every series asked for: stable whichever are skipped
    todo = []
    for info in infos:
        if asked and set(asked) <= on_server.done.get(info.uid, set()):
            say(SeriesResult(info.uid, names[info.uid], "skipped",
                             f"series {names[info.uid]}: the server holds this adapter's results (--continue)"))
        else:
            todo.append(info)
    with tempfile.TemporaryDirectory(prefix="samed-dicomweb-") as tmp:  # mode 0700: the instances are patient data
        fetched = fetch_series(source.client, source.url, study_uid, todo, Path(tmp), names, instances=instances,
                               patient_id=study_patient(source.client, source.url, study_uid, limits))
        ready = []
        for item in fetched:
            name = item.folder.name
            if item.error is not None:
                say(SeriesResult(item.info.uid, name, "failed", item.error))
            elif item.reason is not None:
                say(SeriesResult(item.info.uid, name, "not segmented", f"series {name}: {item.reason}"))
            else:
                ready.append(item)
        done = _segment_ready(run, ready, out) if ready else {}
    _store_ready(run, ready, done, on_server, say)
    result.series.sort(key=lambda s: [i.uid for i in infos].index(s.uid))
    return result


def _segment_ready(run: _Run, ready: list["FetchedSeries"], out: Path) -> dict[str, "InputResult"]:
    """Run the segment job on the fetched series folders; SeriesInstanceUID -> its result."""
    from ..segment.pipeline import segment_files

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
        if run.on_result is not None:
            run.on_result(input_result)

    segment_files([str(item.folder) for item in ready], out, sam=run.sam, adapter=run.adapter,
                  skip_existing=run.skip_stored, on_result=collect, **run.options)
    return done


def _store_ready(run: _Run, ready: list["FetchedSeries"], done: dict[str, "InputResult"], on_server: StoredResults,
                 say: Callable[[SeriesResult], SeriesResult]) -> None:
    """Store the DICOM results of each segmented series the server lacks (one request each), and say each."""
    from .store import store_series

    stored_names: list[str] = []
    for item in ready:
        name, made = item.folder.name, done.get(item.info.uid)
        if made is None or made.status == "failed":
            say(SeriesResult(item.info.uid, name, "failed", made.message if made else f"series {name}: not segmented"))
            continue
        files = [Path(f) for f in made.files]
        stale = "; ".join(dict.fromkeys(on_server.stale.get(item.info.uid, [])))
        series_result = SeriesResult(item.info.uid, name, "written", made.message, files,
                                     redone=f"series {name}: {stale}; made again" if stale else "")
        if run.store:
            have = on_server.done.get(item.info.uid, set())
            results = [f for f in files if f.suffix == ".dcm" and _output_type(f) not in have]
            if results:
                series_result.stored = store_series(run.target.client, run.target.url, run.study_uid, results,
                                                    f"series {name}", stored_names)
                stored_names.append(name)
            series_result.status = "stored"
        say(series_result)


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
    limits = Limits.take(kwargs)  # one clock for the whole run
    studies = find_studies(open_client(url, credentials, limits=limits), url, limits, patient_id=patient_id,
                           modality=modality, study_date=study_date)
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
    return [segment_study(url, study.uid, sam=sam, adapter=adapter, credentials=credentials, limits=limits,
                          output_dir=None if output_dir is None else Path(output_dir) / study.uid, **kwargs)
            for study in studies]
