"""Segment an archive: find the scans, plan the outputs, and keep the model busy.

`segment_files` is what `samed-adapter segment` runs. It takes files and folders (searched
recursively for NIfTI files and DICOM series), mirrors the folder structure under the output
folder, and runs one of three engines over the inputs, all giving the same labels:

- ``"pipeline"`` (default): background threads read, reorient and scale the next volumes while
  the model runs; slices of several volumes are packed into full batches; labels are restored
  and written in the background. At most ``num_workers + 2`` prepared volumes wait in memory.
- ``"serial"``: one volume after the other (read, predict, write), today's plain path.
- ``"ray"``: the same job on Ray Data (see :mod:`samed_adapter.segment.ray_data`).
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..inference import stages as inference
from ..io.paths import image_suffix
from .job import InputResult, Job, find_inputs, input_files, select_part
from .outputs import DICOM_OUTPUT_TYPES, OutputOptions, output_files, write_prepared

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..model import SAMed

__all__ = ["SamSource", "check_request", "check_run", "segment_files"]


# --------------------------------------------------------------------------- planning the outputs


def _check_unique(jobs: Sequence[Job], options: OutputOptions, names: Sequence[str]) -> tuple[list[Job], list[str]]:
    taken: dict[Path, str] = {}
    kept, problems = [], []
    for job in jobs:
        outs = output_files(job.out, job.options(options), names)
        clash = next((o for o in outs if o in taken), None)
        if clash is not None:
            problems.append(f"{job.name}: its output {clash} would overwrite the one of {taken[clash]}; "
                            "rename one input or segment them into different folders")
            continue
        taken.update({o: job.name for o in outs})
        kept.append(job)
    return kept, problems


def _fit_output_types(jobs: Sequence[Job], options: OutputOptions) -> tuple[list[Job], list[str]]:
    """Give each input the output types it can have: a DICOM-SEG or RTSTRUCT needs a DICOM input.

    With ``nifti,dicom-seg`` a NIfTI found in a folder gets its label file and a note; with
    ``dicom-seg`` (or ``dicom-rtstruct``, or both) alone it is a problem of its own. (A non-DICOM
    input named directly refuses the whole request earlier, in :func:`check_request`.)
    """
    dicom_only = [t for t in options.output_types if t in DICOM_OUTPUT_TYPES]
    if not dicom_only:
        return list(jobs), []
    kept, problems = [], []
    for job in jobs:
        if job.is_dicom:
            kept.append(job)
            continue
        rest = tuple(t for t in options.output_types if t not in DICOM_OUTPUT_TYPES)
        if not rest:
            kinds = " or ".join({"dicom-seg": "DICOM-SEG", "dicom-rtstruct": "RTSTRUCT"}[t] for t in dicom_only)
            problems.append(f"{job.source}: not a DICOM input, so no {kinds} can reference it; "
                            "segment it with --output-type nifti")
            continue
        job.output_types = rest
        kept.append(job)
    return kept, problems


def _check_inputs(jobs: Sequence[Job], every_job: Sequence[Job], given: Sequence[Union[str, os.PathLike]],
                  options: OutputOptions, names: Sequence[str]) -> tuple[list[Job], list[str]]:
    """Leave out (as problems) the inputs any of whose planned outputs is a file this run reads.

    Checked against every input of the run, not only the job's own, before anything is written:
    ``segment ct/ ct.nii.gz -o .`` would otherwise write the DICOM series' labels over the NIfTI.
    """
    inputs = input_files(every_job, given)
    kept, problems = [], []
    for job in jobs:
        outs = output_files(job.out, job.options(options), names)
        hit = next(((o, inputs[o.resolve()]) for o in outs if o.resolve() in inputs), None)
        if hit is not None:
            problems.append(f"{job.name}: its output {hit[0]} would overwrite the input {hit[1]}; nothing is "
                            "written for it: choose an output folder (-o) outside the inputs, or rename the input")
            continue
        kept.append(job)
    return kept, problems


def _check_owned(jobs: Sequence[Job], options: OutputOptions, names: Sequence[str]) -> tuple[list[Job], list[str]]:
    """Leave out (as problems) the inputs any of whose planned outputs is a file samed-adapter did
    not write: no record beside it (:func:`~samed_adapter.segment.outputs.owns_outputs`). A
    radiologist's segmentation named like a planned label file is kept, whatever the run."""
    from .outputs import owns_outputs

    kept, problems = [], []
    for job in jobs:
        outs = output_files(job.out, job.options(options), names)
        found = next((o for o in outs if os.path.lexists(o)), None)
        if found is not None and not owns_outputs(job.out):  # the record is read only where files are
            problems.append(f"{job.name}: {found} exists and samed-adapter did not write it (no record beside it); "
                            "it is kept and nothing is written for this input: choose another output folder (-o), "
                            "move the file, or pass --overwrite to replace it")
            continue
        kept.append(job)
    return kept, problems


# --------------------------------------------------------------------------- engines


def _prepare(model: "SAMed", job: Job, options: OutputOptions) -> inference.Prepared:
    return inference.prepare_volume(model.config, job.read(options), **options.preparing())


def _serial(model: "SAMed", jobs: Sequence[Job], options: OutputOptions, report: Callable) -> None:
    for job in jobs:
        try:
            prepared = _prepare(model, job, options)
            labels, probs = inference.predict_prepared(model, prepared, options.batch_size, options.save_probabilities)
            report(job, write_prepared(prepared, labels, probs, job.out, job.options(options), model.config),
                   prepared.messages)
        except Exception as err:  # noqa: BLE001 - reported per input; the others go on
            report(job, err, [])


class _Packer:
    """Collects per-slice predictions of packed batches back into whole volumes."""

    def __init__(self, prepared: inference.Prepared) -> None:
        self.prepared = prepared
        self.labels: list[Any] = []
        self.probs: list[Any] = []
        self.done = 0
        self.failed = False

    def add(self, labels, probs) -> bool:
        """Keep one piece; True when the volume is complete (never for a failed one)."""
        if self.failed:
            return False
        self.labels.append(labels)
        self.probs.append(probs)
        self.done += labels.shape[0]
        return self.done == self.prepared.num_slices


def _pipeline(model: "SAMed", jobs: Sequence[Job], options: OutputOptions, report: Callable,
              num_workers: int) -> None:
    """Read ahead on ``num_workers`` threads, pack slices of consecutive volumes into full batches,
    write on a second pool; memory holds at most ``num_workers + 2`` prepared volumes."""
    depth = num_workers + 2
    readers = ThreadPoolExecutor(num_workers, thread_name_prefix="samed-read")
    writers = ThreadPoolExecutor(max(1, num_workers // 2), thread_name_prefix="samed-write")
    pending: deque[tuple[Job, Future]] = deque()
    writes: list[tuple[Job, Future, list[str]]] = []
    todo = iter(jobs)

    def refill() -> None:
        while len(pending) < depth:
            job = next(todo, None)
            if job is None:
                return
            pending.append((job, readers.submit(_prepare, model, job, options)))

    def finish(job: Job, packer: _Packer) -> None:
        item = packer.prepared
        labels, probs = np.concatenate(packer.labels), None
        if options.save_probabilities:
            probs = np.concatenate(packer.probs)
        writes.append((job, writers.submit(write_prepared, item, labels, probs, job.out, job.options(options),
                                           model.config), item.messages))

    def flush(batch: list[tuple[Job, _Packer, int, int]]) -> None:
        """Run one packed batch: (job, packer, first slice, last slice) pieces."""
        inputs = [packer.prepared.inputs[a:b] for _, packer, a, b in batch]
        labels, probs = inference.predict(model, inputs[0] if len(inputs) == 1 else torch.cat(inputs),
                                          options.save_probabilities)
        at = 0
        for job, packer, a, b in batch:
            n = b - a
            small, soft = inference.resize_slices(labels[at : at + n], None if probs is None else probs[at : at + n],
                                                  packer.prepared.size)
            at += n
            if packer.add(small, soft):
                finish(job, packer)

    try:
        model.eval()
        refill()
        batch: list[tuple[Job, _Packer, int, int]] = []
        filled = 0
        while pending:
            job, future = pending.popleft()
            refill()
            try:
                packer = _Packer(future.result())
            except Exception as err:  # noqa: BLE001 - a bad input is reported, the others go on
                report(job, err, [])
                continue
            start = 0
            while start < packer.prepared.num_slices:
                take = min(options.batch_size - filled, packer.prepared.num_slices - start)
                batch.append((job, packer, start, start + take))
                filled += take
                start += take
                if filled == options.batch_size:
                    _run_batch(flush, batch, report)
                    batch, filled = [], 0
            if packer.prepared.num_slices == 0:
                finish(job, packer)
        if batch:
            _run_batch(flush, batch, report)
        for job, future, messages in writes:
            try:
                report(job, future.result(), messages)
            except Exception as err:  # noqa: BLE001
                report(job, err, [])
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)


def _run_batch(flush: Callable, batch: list, report: Callable) -> None:
    try:
        flush(batch)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: every input in the batch fails
        for job, packer, _, _ in batch:
            if not packer.failed:
                packer.failed = True  # never completes, so nothing of it is written
                report(job, err, [])


def default_num_workers() -> int:
    """Readers for the pipeline: the cores but one (the model's thread), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------- the entry point


def check_run(*, engine: str = "pipeline", num_workers: Optional[int] = None, num_parts: int = 1,
              part_id: int = 0) -> None:
    """Check how a run is to go (engine, threads, share of the archive) before any work.

    Raises:
        ValueError: naming the flag and what it takes.
    """
    if engine not in ("pipeline", "serial", "ray"):
        raise ValueError(f"engine must be pipeline, serial or ray, got {engine!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise ValueError(f"--num-workers must be a positive integer (threads reading and writing), got {num_workers!r}")
    select_part([], num_parts, part_id)


def check_request(adapter: Any, inputs: Sequence[Union[str, os.PathLike]], **options: Any) -> OutputOptions:
    """The :class:`OutputOptions` for a request, checked before any model work.

    Raises:
        ValueError: an unknown class name or output type, DICOM-SEG asked for non-DICOM inputs,
            conflicting intensity options.
    """
    from ..volume.preprocessing import Intensity
    from .outputs import resolve_classes

    names = list(adapter.config.class_names or [])
    classes = options.pop("classes", None)
    opts = OutputOptions(classes=resolve_classes(classes, names), **options)
    try:  # a window with lo >= hi or percentiles outside 0..100 would otherwise fail on every input
        Intensity.from_config(adapter.config, opts.window, opts.percentiles)
    except ValueError as err:
        flag = "--percentiles" if opts.percentiles is not None else "--window"
        raise ValueError(f"{flag}: {err}") from None
    dicom_only = [t for t in opts.output_types if t in DICOM_OUTPUT_TYPES]
    if dicom_only:
        others = [str(p) for p in inputs if not Path(p).is_dir() and image_suffix(Path(p)) != ".dcm"]
        if others:
            raise ValueError(f"--output-type {','.join(dicom_only)} needs DICOM inputs (series folders or .dcm "
                             f"files), but {others[0]} is not one; segment NIfTI, PNG and NPY inputs with "
                             "--output-type nifti")
    return opts


def segment_files(
    inputs: Sequence[Union[str, os.PathLike]],
    output_dir: Union[str, os.PathLike],
    *,
    sam: Any,
    adapter: Any,
    engine: str = "pipeline",
    num_workers: Optional[int] = None,
    skip_existing: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    device: str = "cpu",
    merge: bool = False,
    allow_base_mismatch: bool = False,
    ray_address: Optional[str] = None,
    ray_workers: int = 1,
    gpus_per_worker: float = 0.0,
    progress: bool = False,
    on_result: Optional[Callable[[InputResult], None]] = None,
    on_plan: Optional[Callable[[int], None]] = None,
    runner: Optional[Callable[[Sequence[Job], OutputOptions, Callable], None]] = None,
    **options: Any,
) -> list[InputResult]:
    """Segment files and folders into ``output_dir``, as `samed-adapter segment` does.

    Args:
        inputs: files (NIfTI, DICOM, PNG, NPY) and folders (searched recursively for NIfTI files
            and DICOM series; outputs mirror the structure below each folder).
        sam: a stock SAM (``segment_anything`` ``Sam``; patched for the run and left as found),
            a checkpoint path, or a :class:`SamSource` (what Ray workers rebuild it from).
        adapter: an adapter file, Hub id or :class:`~samed_adapter.Adapter`.
        engine: "pipeline", "serial" or "ray" (see the module docstring).
        on_result: called with each :class:`InputResult` as it comes.
        on_plan: called once, before any input is read, with how many results will follow
            through ``on_result`` apart from "ignored" ones (for a progress bar's total).
        runner: makes the outputs instead of a local model: ``runner(jobs, options, report)``
            calls ``report(job, files written or the exception, messages)`` once per job
            (``segment --server``: a server segments, this process plans and writes). ``sam``
            is then unused and ``adapter`` needs only ``config``, ``fingerprint`` and
            ``base_fingerprint``.
        skip_existing: skip inputs whose outputs all exist (outputs are written atomically, so an
            existing file is a complete one): `--continue`.
        overwrite: replace files at planned output paths that samed-adapter did not write (no
            record beside them); without it such an input fails and the file is kept. Outputs of
            earlier runs are always ours to make again. Inputs are never overwritten. Another run
            writing an input's outputs at the same time is waited for (see
            :func:`~samed_adapter.segment.outputs.writing_outputs`).
        num_parts, part_id: take a deterministic share of the inputs, for splitting an archive
            between machines without any engine.
        options: what to write and how to predict, see
            :class:`~samed_adapter.segment.outputs.OutputOptions` (``batch_size``, ``statistics``,
            ``classes`` by name, ...).

    Returns:
        One :class:`InputResult` per input (and per series of multi-series folders), in the
        order of the inputs found; problems found while planning come first, as "failed".
    """
    from ..adapter_file.adapter import Adapter
    from .outputs import provenance, same_record

    check_run(engine=engine, num_workers=num_workers, num_parts=num_parts, part_id=part_id)
    source = None if runner is not None else sam if isinstance(sam, SamSource) else SamSource.of(sam)
    adapter_obj = adapter if isinstance(adapter, Adapter) or runner is not None else Adapter.load(adapter)
    names = list(adapter_obj.config.class_names or [])
    options.setdefault("adapter_name", os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else "adapter")
    opts = check_request(adapter_obj, inputs, **options)
    opts.record = provenance(adapter_obj, opts, allow_base_mismatch=bool(allow_base_mismatch))
    found = find_inputs(inputs, output_dir)
    jobs = select_part(found.jobs, num_parts, part_id) if num_parts > 1 else found.jobs
    jobs, not_made = _fit_output_types(jobs, opts)
    jobs, clashes = _check_unique(jobs, opts, names)
    jobs, overwrites = _check_inputs(jobs, found.jobs, inputs, opts, names)
    if not overwrite:
        jobs, foreign = _check_owned(jobs, opts, names)
        overwrites += foreign
    results: list[InputResult] = [InputResult(n.split(": ")[0], "ignored", message=n) for n in found.ignored]
    results += [InputResult(p.split(":")[0], "failed", message=p) for p in found.problems + not_made + clashes
                + overwrites]
    if on_plan:
        on_plan(len(results) - len(found.ignored) + len(jobs))
    for result in results:
        if on_result:
            on_result(result)
    redo: set[int] = set()
    if skip_existing:
        todo = []
        for job in jobs:
            files = output_files(job.out, job.options(opts), names)
            if all(p.exists() for p in files) and same_record(job.out, opts.record):
                result = InputResult(job.name, "skipped", files, "outputs exist (--continue)")
                results.append(result)
                if on_result:
                    on_result(result)
                continue
            if all(p.exists() for p in files[:-1]):  # complete, but made by another adapter or with other options
                redo.add(id(job))
            todo.append(job)  # what a killed run left half written goes when it is written (writing_outputs)
        jobs = todo
    if not jobs:
        return results

    said: set[str] = set()

    def report(job: Job, outcome: Any, messages: Sequence[str]) -> None:
        if isinstance(outcome, BaseException):
            text = str(outcome)
            if type(outcome).__name__ == "OutOfMemoryError":
                text = "out of GPU memory; try a smaller --batch-size"
            result = InputResult(job.name, "failed", message=text if job.source in text else f"{job.name}: {text}")
        else:
            result = InputResult(job.name, "written", list(outcome), redone=id(job) in redo)
            if result.redone:
                messages = [*messages, f"{job.name}: made again: its outputs were made by another adapter or with "
                                       "other options (--continue redoes those)"]
        messages = [_covered(m, job.options(opts)) for m in messages]
        fresh = [m for m in messages if m not in said]
        said.update(fresh)
        result.message = "\n".join([*fresh, result.message]).strip() if result.status == "written" else result.message
        results.append(result)
        if on_result:
            on_result(result)

    if runner is not None:
        runner(jobs, opts, report)
        return results
    if engine == "ray":
        from .ray_data import run_on_ray

        for job, outcome in run_on_ray(jobs, opts, source, adapter_obj, address=ray_address, workers=ray_workers,
                                       gpus_per_worker=gpus_per_worker, device=device, merge=merge,
                                       allow_base_mismatch=allow_base_mismatch):
            report(job, outcome, getattr(outcome, "messages", []))
        return results

    from ..patching import patch, unpatch
    from ..surgery.structure import get_stock_state

    sam_module = source.build()
    was_patched = get_stock_state(sam_module) is not None
    model = patch(sam_module.to(device), adapter_obj, merge=merge, allow_base_mismatch=allow_base_mismatch,
                  adapter_name=opts.adapter_name)  # errors name the adapter as the user gave it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # per-input messages travel in the results
            if engine == "serial":
                _serial(model, jobs, opts, report)
            else:
                _pipeline(model, jobs, opts, report, num_workers or default_num_workers())
    finally:
        if source.module is not None and not was_patched:
            unpatch(sam_module)
    return results


def _covered(message: str, options: OutputOptions) -> str:
    """A reader's "the outputs (...) cover those slices only" told as what this input gets: "the
    DICOM-SEG covers", "the label file and the RTSTRUCT cover" (with --server, the server's words too)."""
    from ..io.dicom_series import COVERS

    if COVERS not in message:
        return message
    made = [_OUTPUT_NAMES[t] for t in options.output_types]
    return message.replace(COVERS, f"{made[0]} covers" if len(made) == 1
                           else f"{', '.join(made[:-1])} and {made[-1]} cover")


_OUTPUT_NAMES = {"nifti": "the label file", "dicom-seg": "the DICOM-SEG", "dicom-rtstruct": "the RTSTRUCT"}


@dataclass
class SamSource:
    """How to get the stock SAM: a module at hand, a checkpoint file, or a random backbone (tests, demos).

    Ray workers rebuild the SAM from this, each once.
    """

    module: Any = None
    checkpoint: Optional[str] = None
    backbone: Optional[str] = None
    seed: Optional[int] = None
    sam2_config: Optional[str] = None  # with checkpoint: its SAM 2 backbone (default: read from its tensors)

    @classmethod
    def of(cls, sam: Any) -> "SamSource":
        if isinstance(sam, (str, os.PathLike)):
            return cls(checkpoint=os.fspath(sam))
        return cls(module=sam)

    def build(self) -> Any:
        from ..hosts.backbones import build_sam, load_stock_sam

        if self.module is not None:
            return self.module
        if self.checkpoint is not None:
            return load_stock_sam(self.checkpoint, sam2_config=self.sam2_config)
        if self.backbone is not None and self.seed is not None:
            return build_sam(self.backbone, seed=self.seed)
        raise ValueError("a SamSource needs a module, a checkpoint, or a backbone with a seed")
