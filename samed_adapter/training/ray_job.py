"""Fine-tune an adapter on explicit NIfTI (image, label) pairs on Ray Train, with live progress and a clean stop.

:func:`fine_tune` starts from a parent adapter file and trains it further with
:func:`~samed_adapter.training.loop.train` on each worker of a Ray Train ``TorchTrainer``
(``ScalingConfig(num_workers, use_gpu)``; DistributedDataParallel across the workers when there
are several, on the process group Ray Train sets up). Each worker builds its SAM from a
:class:`~samed_adapter.segment.pipeline.SamSource`, patches the parent on it, and reads the pairs
as `segment` reads files for that adapter (:func:`~samed_adapter.training.data.adapter_data_options`).
``engine="local"`` runs the same worker function in the calling process, without Ray (tests,
scripts on one machine).

Progress and stop go through a small Ray actor (a plain object for the local engine) that the
caller polls: after every epoch rank 0 reports the epoch's mean loss and, when there are
validation pairs, their mean Dice; a stop request ends the run at the next slice (one worker) or
epoch end (several: every worker must stop at the same step), with nothing returned. The
parent's and the new adapter's scores on the validation pairs come back with the result, and the
new adapter's bytes too, so the caller needs no file system shared with the workers' output
(the datastore's files must be readable at the same paths on every worker's node).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .config import TrainConfig
from .errors import TrainingError

__all__ = ["ENGINES", "FineTuneError", "FineTuneResult", "FineTuneSpec", "fine_tune"]

Pair = tuple[str, str, str]  # (case, image file, label file)
PathLike = Union[str, Path]
#: where :func:`fine_tune` runs the worker function
ENGINES = ("ray", "local")
#: seconds between the driver's reads of the progress (and forwards of a stop request)
POLL_S = 0.5


class FineTuneError(TrainingError):
    """A fine-tuning run failed on a worker (its one-line reason), or Ray Train could not run it."""

    def __init__(self, message: str) -> None:
        super().__init__(lambda opt: message)


@dataclass(frozen=True)
class FineTuneSpec:
    """What every worker needs: picklable, sent to each one.

    Attributes:
        parent: the adapter file to start from (readable on every worker's node).
        sam: how each worker gets the stock SAM the parent was made for.
        train: ``(case, image, label)`` files to train on; ``val``: to validate on after each
            epoch and to score the parent and the new adapter on (never trained on).
        config: the training options (``output_dir`` is each run's own folder).
        device: the local engine's device (the Ray engine takes each worker's own).
    """

    parent: str
    sam: Any
    train: tuple[Pair, ...]
    val: tuple[Pair, ...]
    config: TrainConfig
    device: str = "cpu"


@dataclass
class FineTuneResult:
    """What a run gave: the new adapter file (None when stopped), per-epoch progress and the scores.

    ``scores``: ``{"parent": s, "new": s}`` with ``s = {"mean_dice": float or None, "class_dice": [...]}``
    (fractions, the default evaluation protocol, on the validation pairs); empty without them.
    """

    adapter: Optional[Path]
    stopped: bool
    epochs: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


class _Progress:
    """Epoch records, the stop flag and the outcome, shared by the driver and rank 0 (a Ray actor,
    or a plain object for the local engine)."""

    def __init__(self, should_stop: Optional[Callable[[], bool]] = None,
                 on_epoch: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self.stop = False
        self.outcome: Optional[dict[str, Any]] = None
        self._should_stop, self._on_epoch = should_stop, on_epoch

    def epoch(self, record: dict[str, Any]) -> None:
        before = self.records.get(record["epoch"], {})
        merged = {**before, **record}
        self.records[record["epoch"]] = merged
        if self._on_epoch is not None and merged != before:
            self._on_epoch(dict(merged))

    def request_stop(self) -> None:
        self.stop = True

    def stopping(self) -> bool:
        return self.stop or bool(self._should_stop and self._should_stop())

    def finish(self, outcome: dict[str, Any]) -> None:
        self.outcome = outcome

    def read(self) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
        return [self.records[e] for e in sorted(self.records)], self.outcome


class _Channel:
    """Calls on the progress object, whether it is a Ray actor handle or the local object itself."""

    def __init__(self, target: Any) -> None:
        self.target, self.remote = target, not isinstance(target, _Progress)

    def __call__(self, method: str, *args: Any) -> Any:
        if not self.remote:
            return getattr(self.target, method)(*args)
        import ray

        return ray.get(getattr(self.target, method).remote(*args))


class _StopOnRequest:
    """Training slices that raise KeyboardInterrupt once a stop is asked for (one worker only:
    the loop saves its state and raises TrainingInterrupted); the flag is read at most every POLL_S."""

    def __init__(self, dataset: Any, channel: _Channel) -> None:
        self.dataset, self.channel, self.checked = dataset, channel, 0.0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        now = time.monotonic()
        if now - self.checked >= POLL_S:
            self.checked = now
            if self.channel("stopping"):
                raise KeyboardInterrupt
        return self.dataset[index]


class _EpochEnd:
    """The loop's validation volumes, iterated by every worker at the end of each epoch (val_every=1):
    there all workers agree on a stop, and rank 0 reports the epoch's loss and the last validation Dice.

    Without validation pairs it yields one slice of the first training case (a probe the loop
    scores and that is never reported), since the loop's validation needs a volume.
    """

    def __init__(self, volumes: Any, probe: Any, channel: _Channel, records: "_LogRecords",
                 rank: int, world: int) -> None:
        self.volumes, self.probe, self.channel, self.records = volumes, probe, channel, records
        self.rank, self.world, self.epoch = rank, world, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        if self._stop_agreed():
            raise KeyboardInterrupt  # the loop saves its state and raises TrainingInterrupted
        if self.rank == 0:
            for record in self.records.changed(upto=self.epoch):
                self.channel("epoch", record)
        if self.volumes is not None:
            yield from (self.volumes[i] for i in range(len(self.volumes)))
        else:
            yield self.probe

    def _stop_agreed(self) -> bool:
        stop = bool(self.channel("stopping"))
        if self.world > 1:  # a flag read at different moments: all stop if any saw it
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if stop else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop


class _LogRecords:
    """``{"epoch", "loss"[, "val_mean_dice"]}`` per epoch from the run's log.jsonl (rank 0's), read on
    from where the last read stopped: each line is parsed once, and only records that changed are
    handed on (an epoch's validation Dice is logged after its loss)."""

    def __init__(self, log: Path, per_epoch: int, validated: bool) -> None:
        self.log, self.per_epoch, self.validated = log, per_epoch, validated
        self.offset = 0
        self.losses: dict[int, list[float]] = {}
        self.dice: dict[int, Any] = {}
        self.sent: dict[int, dict[str, Any]] = {}

    def changed(self, *, upto: int) -> list[dict[str, Any]]:
        """The records of epochs 1..upto that are new or differ from the ones handed on before."""
        self._read()
        out = []
        for epoch in range(1, upto + 1):
            record: dict[str, Any] = {"epoch": epoch}
            if epoch in self.losses:
                record["loss"] = sum(self.losses[epoch]) / len(self.losses[epoch])
            if self.validated and epoch in self.dice:
                record["val_mean_dice"] = self.dice[epoch]
            if self.sent.get(epoch) != record:
                self.sent[epoch] = record
                out.append(record)
        return out

    def _read(self) -> None:
        if not self.log.exists():
            return
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "iter" in entry and "loss" in entry:
                self.losses.setdefault((entry["iter"] - 1) // self.per_epoch + 1, []).append(float(entry["loss"]))
            elif "val_mean_dice" in entry:
                self.dice[int(entry["epoch"])] = entry["val_mean_dice"]


def _scores(model: Any, volumes: Any) -> dict[str, Any]:
    from ..evaluation.evaluate import evaluate

    summary, _ = evaluate(model, [volumes[i] for i in range(len(volumes))])
    return {"mean_dice": summary.mean_dice, "class_dice": list(summary.class_dice)}


def _worker(loop_config: dict[str, Any]) -> None:
    """One worker's run (the Ray Train train function, or the local engine's call)."""
    spec: FineTuneSpec = loop_config["spec"]
    channel = _Channel(loop_config["progress"])
    try:
        outcome = _train_worker(spec, channel, loop_config.get("ray", False))
    except KeyboardInterrupt:
        outcome = {"stopped": True}
    except Exception as err:  # noqa: BLE001 - the driver gets one line; the worker's log has the traceback
        import logging

        logging.getLogger(__name__).exception("fine-tuning failed")
        outcome = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    if outcome is not None:
        channel("finish", outcome)


def _train_worker(spec: FineTuneSpec, channel: _Channel, on_ray: bool) -> Optional[dict[str, Any]]:
    """Patch, score the parent, train, score the new adapter; rank 0's outcome (None elsewhere)."""
    import torch

    from ..adapter_file.adapter import Adapter
    from ..patching import patch
    from .data import NiftiSlices, NiftiVolumes, adapter_data_options
    from .errors import TrainingInterrupted
    from .folder import LOG
    from .loop import iterations_per_epoch, train

    rank, world = _rank_world()
    device = torch.device(spec.device)
    if on_ray:
        import ray.train.torch

        device = ray.train.torch.get_device() if spec.device != "cpu" else torch.device("cpu")
    parent = Adapter.load(spec.parent)
    model = patch(spec.sam.build().to(device), parent)
    options = adapter_data_options(parent.config)
    slices = NiftiSlices.from_pairs(spec.train, **options)
    volumes = NiftiVolumes.from_pairs(spec.val, **options) if spec.val else None
    probe = None
    if volumes is None:
        first = NiftiVolumes.from_pairs(spec.train[:1], **options)[0]
        probe = {**first, "image": first["image"][:1], "label": first["label"][:1], "case": "probe"}
    scores = {"parent": _scores(model, volumes)} if volumes is not None and rank == 0 else {}
    # Every epoch ends in the hook (the loop's validation); no progress bar in a worker's log.
    config = dataclasses.replace(spec.config, val_every=1, progress=False)
    per_epoch = iterations_per_epoch(len(slices), config.batch_size, world)
    records = _LogRecords(Path(config.output_dir) / LOG, per_epoch, validated=volumes is not None)
    hook = _EpochEnd(volumes, probe, channel, records, rank, world)
    # Mid-epoch only where the slices are read in this process (a DataLoader worker's interrupt is its own).
    data = _StopOnRequest(slices, channel) if world == 1 and config.num_workers == 0 else slices
    torch.manual_seed(config.seed)
    try:
        path = train(model, data, config, val_volumes=hook, overwrite=True)
    except TrainingInterrupted:
        return {"stopped": True} if rank == 0 else None
    if rank != 0:
        return None
    for record in records.changed(upto=hook.epoch):
        channel("epoch", record)
    if volumes is not None:
        scores["new"] = _scores(model, volumes)
    return {"stopped": False, "adapter": Path(path).read_bytes(), "scores": scores}


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fine_tune(spec: FineTuneSpec, *, engine: str = "ray", num_workers: int = 1, use_gpu: bool = False,
              cpus_per_worker: float = 1.0, gpus_per_worker: float = 1.0, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
              should_stop: Optional[Callable[[], bool]] = None) -> FineTuneResult:
    """Fine-tune ``spec.parent`` on ``spec.train``; returns once the run ended (done or stopped).

    Args:
        engine: ``"ray"`` (Ray Train's TorchTrainer, on the Ray this process is connected to;
            started locally if none) or ``"local"`` (this process, ``spec.device``, one worker).
        num_workers, use_gpu, cpus_per_worker, gpus_per_worker: Ray Train's ScalingConfig (DDP when
            num_workers > 1; a GPU fraction shares one with the serving replicas). Workers that no node
            can hold yet wait for it; a stop asked meanwhile ends them at their first slice.
        on_epoch: called with each epoch's record ``{"epoch", "loss"[, "val_mean_dice"]}`` (a
            record may come again, completed, when its validation Dice is known).
        should_stop: polled; True ends the run at the next slice (one worker) or epoch end.

    Raises:
        FineTuneError: a worker failed (its one-line reason), or Ray Train did (a node lost).
        ValueError: an unknown engine, or more than one worker for the local engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local" and num_workers != 1:
        raise ValueError("the local engine runs one worker; use engine='ray' for several")
    start = time.perf_counter()
    if engine == "local":
        progress = _Progress(should_stop, on_epoch)
        _worker({"spec": spec, "progress": progress})
        epochs, outcome = progress.read()
    else:
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
        epochs, outcome = _on_ray(spec, num_workers, use_gpu, resources, on_epoch, should_stop)
    return _result(spec, epochs, outcome, time.perf_counter() - start)


def _result(spec: FineTuneSpec, epochs: list[dict[str, Any]], outcome: Optional[dict[str, Any]],
            seconds: float) -> FineTuneResult:
    if outcome is None:
        raise FineTuneError("the training workers ended without a result (killed?); nothing was kept: start the "
                            "job again")
    if "error" in outcome:
        raise FineTuneError(f"fine-tuning failed on a worker: {outcome['error']}")
    if outcome["stopped"]:
        return FineTuneResult(None, True, epochs, {}, seconds)
    path = Path(spec.config.output_dir) / "adapter.safetensors"
    if not path.is_file() or path.read_bytes() != outcome["adapter"]:  # rank 0 ran on another node
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(outcome["adapter"])
    return FineTuneResult(path, False, epochs, outcome.get("scores", {}), seconds)


def _on_ray(spec: FineTuneSpec, num_workers: int, use_gpu: bool, resources: dict[str, float],
            on_epoch: Optional[Callable[[dict[str, Any]], None]], should_stop: Optional[Callable[[], bool]],
            ) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Run ``_worker`` on a TorchTrainer; poll its progress actor meanwhile."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        from ..segment.ray_start import init_ray

        init_ray(ray, None)
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    trainer = TorchTrainer(
        _worker, train_loop_config={"spec": spec, "progress": progress, "ray": True},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        # A lost worker or node ends the run (the caller's job fails, nothing is kept); no retries.
        run_config=RunConfig(name=f"fine-tune-{uuid.uuid4().hex[:8]}",
                             storage_path=str(Path(spec.config.output_dir).resolve().parent / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=fit, name="fine-tune", daemon=True)
    thread.start()
    seen: dict[int, dict[str, Any]] = {}
    try:
        while True:
            done = not thread.is_alive()
            epochs, outcome = ray.get(progress.read.remote())
            for record in epochs:
                if on_epoch is not None and seen.get(record["epoch"]) != record:
                    on_epoch(dict(record))
                seen[record["epoch"]] = record
            if done:
                break
            if should_stop is not None and should_stop():
                progress.request_stop.remote()
            thread.join(POLL_S)
    finally:
        ray.kill(progress)
    if outcome is None and failure:
        line = (str(failure[0]).splitlines() or [""])[0]
        raise FineTuneError(f"Ray Train failed: {type(failure[0]).__name__}: {line}")
    return epochs, outcome
