"""`samed-adapter segment --ray`: the segmentation job on Ray Data.

The job is one Ray Data pipeline, streamed (never materialised), one row per input::

    ray.data.from_items(index, pickled Job)       one block per input
      .map(_read_and_prepare, num_cpus=0.5)       CPU tasks: Job.read + inference.prepare_volume
      .map_batches(_Segmenter, batch_size=1,      an actor pool, one patched SAM per actor, built
          compute=ActorPoolStrategy(size=N),      once in __init__; a whole volume per row
          num_gpus=G)
      .map(_write, num_cpus=0.5)                  CPU tasks: segmentation.write_prepared
      .iter_rows()                                the driver: one result per input, in input order

Rows carry their payloads as pickled bytes, which Arrow stores as plain binary columns: the
prepared slices (for the actor), the Prepared object without them (its volume and nibabel
header, for the writer), the labels. The actor predicts exactly as the serial engine does
(batches of ``options.batch_size`` slices through `inference.predict` and
`inference.resize_slices`), so the labels are byte for byte the same. Ray Data's backpressure
bounds how many prepared volumes wait between the stages.

Failures:

- A bad input (unreadable, corrupt, wrong shape, out of memory in the model) never raises out of
  a stage: the stage catches it and the row carries the pickled exception on to the driver, which
  yields it for that input; the other inputs go on. (Ray Data would otherwise fail the dataset.)
- A worker or actor process that dies (killed, segfault) is Ray's business: Ray Data runs the
  read and write tasks with ``max_retries=-1`` and its actor pools with ``max_restarts=-1`` and
  ``max_task_retries=-1``, so a dead actor is restarted (rebuilding its SAM) and the volumes it
  held are sent again. Outputs are written atomically and all or nothing (`write_prepared`), and a
  write first removes the temporaries a killed earlier attempt of the same input left, so a
  retried write is harmless.
- A model that cannot be set up (checkpoint missing, adapter for another SAM) fails every input
  the same way: that error is raised from :func:`run_on_ray`, as the other engines raise it.

Logging: the command's own lines and real warnings only. A Ray started here logs its C++ core at
``fatal`` (``RAY_BACKEND_LOG_LEVEL``, unless the user set it) and keeps Ray Data's notes and the
token-authentication notice to itself; its log files are where they always are.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from .ray_start import init_ray

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..adapter_file.adapter import Adapter
    from ..adapter_file.config import AdapterConfig
    from .job import Job
    from .pipeline import SamSource
    from .outputs import OutputOptions

__all__ = ["RayInputError", "WrittenFiles", "run_on_ray"]

#: Test hook (tests/test_ray.py): the path of a marker file. A model actor that finds the file
#: (holding nothing, or text that is part of the input's path) deletes it and kills its own
#: process before predicting that input, so that tests can see a dead actor replaced and its
#: input retried. Read on the driver and handed to the actors; unset in normal use.
KILL_ONCE_ENV = "SAMED_ADAPTER_TEST_KILL_ONCE"

#: CPUs a read or write task reserves. Reading and writing are mostly decompression and I/O, and
#: must not ask for exactly what a model actor asks for: Ray Data fuses a task map into the actor
#: map after it when their resources match, and the model would then wait for every read.
_IO_CPUS = 0.5

_INSTALL = "the Ray engine needs Ray Data: pip install samed-adapter[ray]"


class RayInputError(RuntimeError):
    """An input that failed on Ray, where its own exception could not travel (or named no input).

    Attributes:
        kind: the type name of the original exception.
    """

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return (type(self), (str(self), self.kind))


class WrittenFiles(list):
    """The files written for one input (a list of Paths), with its ``messages`` (contrast and
    orientation warnings, as `Prepared.messages`)."""

    def __init__(self, files: Sequence[Path] = (), messages: Sequence[str] = ()) -> None:
        super().__init__(files)
        self.messages = list(messages)


# --------------------------------------------------------------------------- rows and errors


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _error(job: Optional["Job"], err: BaseException, setup: bool = False) -> bytes:
    """A pickled exception that names the input and survives the trip to the driver."""
    name = job.name if job is not None else "input"
    kind = type(err).__name__
    text = str(err) or kind
    if kind == "OutOfMemoryError":
        text = "out of GPU memory; try a smaller --batch-size"
    named = setup or (job is not None and job.source in text)
    exc: BaseException = err
    if named and kind != "OutOfMemoryError":
        try:  # keep the exception itself (ImageReadError, ...) when it travels intact
            back = pickle.loads(_dumps(err))
            if type(back) is not type(err) or str(back) != str(err):
                raise TypeError
        except Exception:  # noqa: BLE001 - an exception that does not pickle: keep its message
            exc = RayInputError(text, kind)
    else:
        exc = RayInputError(text if named else f"{name}: {text}", kind)
    return _dumps({"exc": exc, "setup": setup})


def _load_error(blob: bytes, job: "Job") -> tuple[BaseException, bool]:
    try:
        payload = pickle.loads(blob)
        return payload["exc"], bool(payload["setup"])
    except Exception as err:  # noqa: BLE001 - e.g. a class the driver cannot import
        return RayInputError(f"{job.name}: failed on Ray ({err})"), False


def _item(value: Any) -> Any:
    """A numpy batch's element as plain Python (bytes stay bytes)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- the stages


def _read_and_prepare(row: dict, *, options: "OutputOptions", config: "AdapterConfig") -> dict:
    """CPU task: read one input and prepare its slices for the model."""
    from ..inference import stages as inference

    job = None
    out = {"index": row["index"], "job": row["job"], "inputs": b"", "meta": b"", "height": 0, "width": 0,
           "error": b""}
    try:
        job = pickle.loads(row["job"])
        prepared = inference.prepare_volume(config, job.read(options), **options.preparing())
        inputs = prepared.inputs.numpy()
        prepared.inputs = prepared.inputs[:0]  # the actor takes the slices; the writer the rest
        out.update(inputs=_dumps(inputs), meta=_dumps(prepared), height=int(prepared.size[0]),
                   width=int(prepared.size[1]))
    except Exception as err:  # noqa: BLE001 - reported for this input; the others go on
        out["error"] = _error(job, err)
    return out


class _Segmenter:
    """One actor of the pool: a SAM built and patched once, predicting whole volumes."""

    def __init__(self, source: Any, adapter: Any, *, device: str, merge: bool, allow_base_mismatch: bool,
                 batch_size: int, probabilities: bool, kill_once: Optional[str] = None) -> None:
        import ray

        self.batch_size = batch_size
        self.probabilities = probabilities
        self.kill_once = kill_once
        self.model = None
        self.setup_error: Optional[BaseException] = None
        try:
            # Refs come wrapped in a tuple, so that Ray hands them over unresolved: fetched here.
            source, adapter = ray.get(source[0]), ray.get(adapter[0])
            from ..patching import patch

            sam = source if not hasattr(source, "build") else source.build()
            self.model = patch(sam.to(device), adapter, merge=merge, allow_base_mismatch=allow_base_mismatch)
            self.model.eval()
        except Exception as err:  # noqa: BLE001 - every input is told, and run_on_ray raises it
            self.setup_error = err

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        labels, errors = [], []
        for i in range(n):
            blob, error = b"", _item(batch["error"][i])
            if not error:
                job = None
                try:
                    job = pickle.loads(_item(batch["job"][i]))
                    if self.setup_error is not None:
                        error = _error(job, self.setup_error, setup=True)
                    else:
                        self._test_hook(job)
                        size = (int(batch["height"][i]), int(batch["width"][i]))
                        blob = _dumps(self._predict(pickle.loads(_item(batch["inputs"][i])), size))
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: this input fails
                    error = _error(job, err)
            labels.append(blob)
            errors.append(error)
        return {"index": batch["index"], "job": batch["job"], "meta": batch["meta"],
                "labels": np.array(labels, dtype=object), "error": np.array(errors, dtype=object)}

    def _predict(self, inputs: np.ndarray, size: tuple[int, int]):
        """(labels (D, H, W), probabilities or None): as `pipeline._predict_all` does it."""
        import torch

        from ..inference import stages as inference

        slices = torch.from_numpy(inputs)
        labels, probs = [], []
        for start in range(0, slices.shape[0], self.batch_size):
            small, soft = inference.resize_slices(
                *inference.predict(self.model, slices[start : start + self.batch_size], self.probabilities), size)
            labels.append(small)
            probs.append(soft)
        return np.concatenate(labels), np.concatenate(probs) if self.probabilities else None

    def _test_hook(self, job: "Job") -> None:
        if not self.kill_once or not os.path.exists(self.kill_once):
            return
        with open(self.kill_once, encoding="utf-8") as fh:
            wanted = fh.read().strip()
        if not wanted or wanted in job.source:
            os.unlink(self.kill_once)
            os._exit(1)


def _write(row: dict, *, options: "OutputOptions", config: "AdapterConfig") -> dict:
    """CPU task: put the labels back on the scan's grid and write every output of one input."""
    from .outputs import write_prepared

    out = {"index": row["index"], "files": b"", "messages": b"", "error": row["error"]}
    if row["error"]:
        return out
    job = None
    try:
        job = pickle.loads(row["job"])
        prepared = pickle.loads(row["meta"])
        labels, probs = pickle.loads(row["labels"])
        options = job.options(options)  # as they apply to this input
        # write_prepared removes what an earlier, killed attempt of this write left, under the
        # outputs' lock, as every writer of them takes it (another run's included).
        files = write_prepared(prepared, labels, probs, job.out, options, config)
        out.update(files=_dumps([str(p) for p in files]), messages=_dumps(list(prepared.messages)))
    except Exception as err:  # noqa: BLE001 - reported for this input; the others go on
        out["error"] = _error(job, err)
    return out


# --------------------------------------------------------------------------- the driver


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra
    except ImportError as err:
        raise ImportError(f"{_INSTALL} ({err})") from err
    return ray


def _actor_cpus(ray: Any, workers: int, gpus_per_worker: float, *, local: bool) -> float:
    """CPUs each model actor reserves: one, or a share when the cluster is too small for that.

    Actors that hold every CPU would leave none to the read tasks, and the run would wait
    forever; so on a cluster with fewer than ``workers + 0.5`` CPUs the actors split what the
    readers and writers leave (the model still uses the cores it is given by the OS). A Ray
    started here that lacks the GPUs asked for is an error, for the same reason; a cluster
    given by address may add GPU nodes as it scales, so there Ray waits for them.
    """
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if local and gpus_per_worker > 0 and gpus < gpus_per_worker:
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g} needs a GPU, but the local Ray sees {gpus:g} "
                         "GPUs; use --gpus-per-worker 0, or --ray-address for a cluster with GPUs")
    if cpus > _IO_CPUS and workers + _IO_CPUS > cpus:
        share = round((cpus - _IO_CPUS) / workers, 4)
        return share if share != _IO_CPUS else share - 0.01  # unequal, or the reads fuse into the actors
    return 1.0


def run_on_ray(
    jobs: Sequence["Job"],
    options: "OutputOptions",
    source: "SamSource",
    adapter: "Adapter",
    *,
    address: Optional[str] = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    device: str = "cpu",
    merge: bool = False,
    allow_base_mismatch: bool = False,
) -> Iterator[tuple["Job", Union[list[Path], BaseException]]]:
    """Segment ``jobs`` on Ray Data; yield ``(job, files written)`` or ``(job, exception)``.

    Every job is yielded exactly once, in the order given. Ray is started locally inside this
    process when none is running (``address`` connects to an existing cluster instead) and shut
    down again at the end; a Ray that was already running is left running.

    Args:
        workers: model actors (each builds and patches its own SAM once).
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU).
        device: the torch device the actors run the model on.

    Raises:
        ImportError: Ray Data is not installed.
        Exception: the model could not be set up (as `patch` raises it), e.g.
            `BaseMismatchError`.
    """
    ray = _import_ray()
    if workers < 1 or gpus_per_worker < 0:
        raise ValueError("workers must be at least 1 and gpus_per_worker at least 0")
    jobs = list(jobs)
    if not jobs:
        return
    started = not ray.is_initialized()
    # Ray Data's notes on starting and finishing (and on the progress bars turned off below) would
    # mix with the command's own lines; its warnings still show. The notice that token
    # authentication is on (it is, for the local Ray started here) is said on every run.
    quiet = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR,
             "ray._private.authentication.authentication_token_setup": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
    if started:
        init_ray(ray, address)
    rows = None
    try:
        # A module at hand travels once through the object store; otherwise each actor rebuilds it.
        sam_ref = ray.put(source.module if source.module is not None else source)
        adapter_ref = ray.put(adapter)
        config = adapter.config
        ds = ray.data.from_items([{"index": i, "job": _dumps(job)} for i, job in enumerate(jobs)],
                                 override_num_blocks=len(jobs))
        context = ds.context  # this dataset's own copy of the DataContext
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        context.max_errored_blocks = 0  # the stages never raise for an input; anything else is real
        ds = ds.map(_read_and_prepare, fn_kwargs={"options": options, "config": config}, num_cpus=_IO_CPUS)
        ds = ds.map_batches(
            _Segmenter,
            fn_constructor_args=((sam_ref,), (adapter_ref,)),
            fn_constructor_kwargs={"device": device, "merge": merge, "allow_base_mismatch": allow_base_mismatch,
                                   "batch_size": options.batch_size, "probabilities": options.save_probabilities,
                                   "kill_once": os.environ.get(KILL_ONCE_ENV) or None},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=_actor_cpus(ray, workers, gpus_per_worker, local=started and address is None),
            num_gpus=gpus_per_worker or None)
        # A dead actor is restarted and the volumes it held sent again: Ray Data gives its actor
        # pools max_restarts=-1 and max_task_retries=-1 (ActorPoolMapOperator.
        # _apply_default_remote_args; passing them to map_batches is deprecated since 2.5x).
        ds = ds.map(_write, fn_kwargs={"options": options, "config": config}, num_cpus=_IO_CPUS)

        done: dict[int, tuple["Job", Any]] = {}
        next_index = 0
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                index = int(row["index"])
                if index in done or index < next_index:
                    continue  # never expected: a result already given
                job = jobs[index]
                if row["error"]:
                    exc, setup = _load_error(row["error"], job)
                    if setup:
                        raise exc
                    done[index] = (job, exc)
                else:
                    files = [Path(p) for p in pickle.loads(row["files"])]
                    done[index] = (job, WrittenFiles(files, pickle.loads(row["messages"])))
                while next_index in done:  # in input order; results are small, so waiting is cheap
                    yield done.pop(next_index)
                    next_index += 1
        except Exception as err:
            if isinstance(err, ray.exceptions.RayError) or type(err).__module__.startswith("ray."):
                # The run itself broke (the cluster went away, ...): the inputs not done fail.
                failure = err
            else:
                raise
        else:
            failure = None
        for index in range(next_index, len(jobs)):
            job = jobs[index]
            if index in done:
                yield done.pop(index)
            else:
                reason = f"the Ray run stopped: {failure}" if failure is not None else "no result came back from Ray"
                yield job, RayInputError(f"{job.name}: not segmented; {reason}")
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if started:
            ray.shutdown()
