"""The SAMed training loop: one process or several (DistributedDataParallel), resumable.

Determinism is by construction: the data order of epoch e is a permutation drawn from
(seed, e), each slice's augmentation from (seed, e, index), and the global batch of an iteration
is split between processes, so N processes with batch b see exactly the samples of one process
with batch N * b, and a resumed run repeats exactly the iterations a killed one lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from ..model import SAMed
from ..surgery.structure import require_stock_state
from .augment import augment
from .config import RECIPES, TrainConfig
from .errors import NonFiniteLossError, TrainingError, TrainingInterrupted
from .folder import BEST, FINAL, LAST, LOG, STATE, check_run_folder, clear_run, epoch_adapter
from .clicks import ClickTraining, mean_click_loss
from .losses import all_reduce_sum, segmentation_loss
from .schedule import lr_at, set_lr
from .state import TrainingState, load_state, save_state


class _Slices(Dataset):
    """Items are (epoch, index): the slice `index`, augmented from a generator seeded by
    (seed, epoch, index), so workers, processes and resumed runs all draw the same numbers."""

    def __init__(self, dataset: Dataset, image_size: int, seed: int, train: bool) -> None:
        self.dataset, self.image_size, self.seed, self.train = dataset, image_size, seed, train

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, index = key
        item = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        out = augment(item["image"], item["label"], self.image_size, rng, train=self.train)
        # The key seeds the slice's simulated clicks (training.clicks) as it seeds its augmentation.
        return {"image": out["image"], "low_res_label": out["low_res_label"], "key": np.array([epoch, index])}


class _GlobalBatches(Sampler):
    """This process's share of each global batch, from iteration `start` on."""

    def __init__(self, size: int, batch: int, iters_per_epoch: int, start: int, stop: int, seed: int,
                 rank: int, world: int) -> None:
        self.size, self.batch, self.per_epoch = size, batch, iters_per_epoch
        self.start, self.stop, self.seed, self.rank, self.world = start, stop, seed, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            epoch, step = divmod(it, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            global_batch = order[step * self.batch : (step + 1) * self.batch]
            share = np.array_split(global_batch, self.world)[self.rank]
            yield [(epoch, int(i)) for i in share]


def iterations_per_epoch(num_slices: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches, plus the last partial one when every process gets at least one slice of it."""
    full, rest = divmod(num_slices, batch_size)
    return full + (1 if rest >= world_size else 0)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _trainable(model: SAMed) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable tensors that reach the loss.

    Without prompts only `no_mask_embed` of the prompt encoder is used, and the iou head's output
    is not in the loss: their gradients would be None, so AdamW (as in the published code)
    never changes them. Freezing them says so explicitly and keeps DDP free of unused parameters.
    A click-trained adapter's clicks also reach the point embeddings (positive, negative, padding)
    and the mask-prompt path; never the box corners.
    """
    host = require_stock_state(model.sam).host
    used = _CLICK_PROMPT_TENSORS if model.config.clicks else ("no_mask_embed.weight",)
    # SAM 2's decoder also has an object-score head that the masks do not use.
    unused = {id(p) for name, p in host.prompt_encoder.named_parameters() if not name.startswith(used)}
    unused |= {id(p) for name, p in host.mask_decoder.named_parameters()
               if name.startswith(("iou_prediction_head.", "pred_obj_score_head."))}
    named = []
    for name, param in model.sam.named_parameters():
        if id(param) in unused:
            param.requires_grad_(False)
        elif param.requires_grad:
            named.append((name, param))
    return named


# The prompt encoder's tensors that simulated clicks reach (the same names in SAM and SAM 2):
# point_embeddings.0/1 negative/positive, not_a_point_embed the padding point, the mask prompt's
# convolutions, and no_mask_embed for the automatic output.
_CLICK_PROMPT_TENSORS = ("point_embeddings.0.", "point_embeddings.1.", "not_a_point_embed.", "mask_downscaling.",
                         "no_mask_embed.")


@contextlib.contextmanager
def _checkpointed_blocks(model: SAMed, enabled: bool):
    """Recompute encoder blocks in the backward pass instead of storing their activations."""
    blocks = list(require_stock_state(model.sam).host.blocks()) if enabled else []
    # A block may already carry an instance forward (the windowed SDPA path): wrap that one and
    # put it back afterwards.
    previous = [blk.__dict__.get("forward") for blk in blocks]
    for blk in blocks:
        blk.forward = (lambda run: lambda x: checkpoint(run, x, use_reentrant=False))(blk.forward)
    try:
        yield
    finally:
        for blk, forward in zip(blocks, previous):
            if forward is None:
                del blk.forward
            else:
                blk.forward = forward


def train(
    model: SAMed,
    dataset: Dataset,
    config: TrainConfig,
    *,
    val_volumes: Optional[Sequence] = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train the adapter on `model` (made by `inject` or `patch`) in place.

    A click-trained adapter (`AdapterConfig(clicks=True)`) also learns to refine a class from
    clicks: each step adds `config.click_weight` x the loss of `config.click_rounds` simulated
    click rounds per image on the step's own embeddings (see `training.clicks`); the automatic
    output and its loss are computed exactly as without clicks.

    `output_dir` receives `adapter.safetensors` (the final adapter), `adapter_last.safetensors`
    and `train_state.pt` (the checkpoint, rewritten after every epoch and every
    `save_every_iters` steps), `best.safetensors` (with validation), `adapter_epochNNN.safetensors`
    every `save_every` epochs (only when asked), and `log.jsonl`.

    Args:
        dataset: 2-D slices, items {"image": (H, W) float in [0, 1], "label": (H, W) ints}.
        val_volumes: volumes for validation (see `evaluate.evaluate`), every `val_every` epochs;
            the adapter with the best mean Dice is kept as best.safetensors.
        resume: continue the run in `output_dir` from its `train_state.pt` (from the start when
            there is none yet: killed before its first checkpoint).
        overwrite: delete the run files in `output_dir` (only those, see `folder.run_files`) and
            start over; they are deleted once the data and model have been checked, just before
            the first write.

    Returns:
        The path of the final adapter, `output_dir/adapter.safetensors`. Under
        torch.distributed only rank 0 writes.

    Raises:
        RunFolderError: `output_dir` holds a run and neither `resume` nor `overwrite` was given
            (raised before anything is written, so the old run is intact).
        TrainingStateError: `resume` with a train_state.pt that is damaged or made for another adapter.
        NonFiniteLossError: the loss became NaN or infinite; names the checkpoint kept, if any.
        TrainingInterrupted: Ctrl-C; the live adapter and state were saved at the current step.
    """
    rank, world = _distributed()
    out = Path(config.output_dir)
    # Both read only: a refused run changes nothing.
    check_device(next(model.sam.image_encoder.parameters()).device)
    check_run_folder(out, resume=resume, overwrite=overwrite)
    created = not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(model, dataset, config, out, rank, world, val_volumes, resume, overwrite)
    except BaseException:
        # A fresh run that stops before its first step (bad labels, bad flags) leaves nothing behind;
        # the folder held no run before (checked above), so this log is its own.
        log = out / LOG
        if rank == 0 and not resume and log.exists() and all(_iteration(ln) == 0 for ln in log.read_text().splitlines()):
            log.unlink()
        if rank == 0 and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


@dataclass
class _Run:
    """What one run sets up before its first step: the schedule's lengths, the optimiser and
    the network it steps, and the state it resumes from."""

    net: torch.nn.Module  # the model, or its DDP / compiled wrapper
    named: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainingState
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    reduce_fn: Any
    per_epoch: int
    max_iters: int
    stop_iters: int
    # Steps done at the checkpoint now in the folder (None: none yet), named by a diverging run.
    checkpointed: Optional[int] = None
    # A click-trained adapter: `net` is a ClickTraining, and each step adds the click loss.
    clicks: bool = False


def _train(model: SAMed, dataset: Dataset, config: TrainConfig, out: Path, rank: int, world: int,
           val_volumes: Optional[Sequence], resume: bool, overwrite: bool) -> Path:
    run = _set_up(model, dataset, config, out, world, resume)
    if overwrite and rank == 0:
        clear_run(out)
    start = run.state.iteration
    sampler = _GlobalBatches(len(dataset), config.batch_size, run.per_epoch, start, run.stop_iters,
                             config.seed, rank, world)
    loader = DataLoader(_Slices(dataset, model.config.image_size, config.seed, config.augment), batch_sampler=sampler,
                        num_workers=config.num_workers)
    log = _Log(out, rank, start, config, total=run.stop_iters, adapter=model.config.to_dict())
    model.train()
    it = start
    try:
        with _checkpointed_blocks(model, config.activation_checkpointing), log:
            for batch in loader:
                lr, loss = _forward_backward(run, config, batch, it, out)
                # Ctrl-C waits for the update, the count and the log line: a checkpoint saved on
                # interrupt never holds a half-applied step.
                with _sigint_deferred():
                    run.scaler.step(run.optimizer)
                    run.scaler.update()
                    it += 1
                    log.step(it, lr, loss)
                epoch, epoch_done = it // run.per_epoch, it % run.per_epoch == 0
                if epoch_done and config.val_every and epoch % config.val_every == 0 and val_volumes is not None:
                    run.state.best_dice = _validate(model, val_volumes, out, rank, run.state.best_dice, epoch, log)
                if _checkpoint_due(config, run, it):
                    keep_epoch = epoch_done and bool(config.save_every) and epoch % config.save_every == 0
                    _checkpoint(model, run, out, rank, it, epoch if keep_epoch else None)
    except KeyboardInterrupt:
        if it > start and run.checkpointed != it:
            _checkpoint(model, run, out, rank, it, None)
        # The checkpoint at `it` (just written, or already there); none when a fresh run made no step.
        saved = [p for p in (out / LAST, out / STATE) if p.exists()] if run.checkpointed == it else []
        raise TrainingInterrupted(it, run.stop_iters, saved) from None
    if rank == 0:
        model.adapter().save(out / FINAL)
    if world > 1:
        dist.barrier()
    return out / FINAL


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C (SIGINT) back until the block is done, then raise it as KeyboardInterrupt.

    Only where Python's own handler is installed and in the main thread (the only one that may
    set handlers): another handler is the caller's to keep.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _set_up(model: SAMed, dataset: Dataset, config: TrainConfig, out: Path, world: int, resume: bool) -> _Run:
    """Check the data against the batch, build the optimiser (resumed from `out` when asked) and wrap the model."""
    device = next(model.sam.image_encoder.parameters()).device
    if config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {world} processes")
    per_epoch = iterations_per_epoch(len(dataset), config.batch_size, world)
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} slices, too few for one batch")

    named = _trainable(model)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.base_lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    state = TrainingState(iteration=0, best_dice=None)
    checkpointed = None
    state_path = out / STATE
    if resume and state_path.exists():
        state = load_state(state_path, named, optimizer, scaler)
        checkpointed = state.iteration
    if config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # A click-trained adapter's step runs its click rounds inside the forward DDP wraps.
    net: torch.nn.Module = ClickTraining(model, config.click_rounds, config.seed) if model.config.clicks else model
    if world > 1:
        # A step's clicks may all be positive (the negative point embedding unused) or find no
        # class to refine on one process's share: DDP must look for unused tensors then.
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=model.config.clicks)
    if config.compile:
        net = torch.compile(net)
    return _Run(
        net=net, named=named, optimizer=optimizer, scaler=scaler, state=state, device=device,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision),
        reduce_fn=all_reduce_sum() if world > 1 else None,
        per_epoch=per_epoch,
        max_iters=config.max_epochs * per_epoch,
        stop_iters=(config.stop_epoch or config.max_epochs) * per_epoch,
        checkpointed=checkpointed,
        clicks=model.config.clicks,
    )


# Device types a model can train on: they hold values and run autograd and AdamW.
TRAINING_DEVICES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: torch.device) -> None:
    """Raise TrainingError unless the model's `device` can train (meta holds no values, for one)."""
    if device.type not in TRAINING_DEVICES:
        raise TrainingError(lambda opt: (
            f"the model is on the {device.type} device, which cannot train (it "
            f"{'holds shapes but no values' if device.type == 'meta' else 'is not one training supports'}); "
            f"use one of {', '.join(TRAINING_DEVICES)}"))


def _forward_backward(run: _Run, config: TrainConfig, batch: dict[str, torch.Tensor], it: int,
                      out: Path) -> tuple[float, Any]:
    """Gradients of step `it` (0-based) on one batch, not yet applied; returns its lr and loss.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (nothing was changed by this step).
    """
    # The published loop sets the lr after each step: step j runs at lr_at(j - 1).
    lr = lr_at(max(it - 1, 0), base_lr=config.base_lr, warmup_iters=config.warmup_iters,
               max_iters=run.max_iters, power=config.power)
    set_lr(run.optimizer, lr)
    device, autocast_dtype = run.device, run.autocast_dtype
    images = batch["image"].to(device, non_blocking=True)
    target = batch["low_res_label"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if run.clicks:
            logits, click_sum, click_count = run.net(images, target, batch["key"])
        else:
            logits = run.net(images)["low_res_logits"]
    loss = segmentation_loss(logits.float(), target, ce_weight=config.ce_weight,
                             dice_weight=config.dice_weight, reduce_fn=run.reduce_fn)
    if run.clicks:
        loss.click = mean_click_loss(click_sum, click_count, run.reduce_fn)
        loss.total = loss.total + config.click_weight * loss.click
    if not torch.isfinite(loss.total):
        kept = None
        if run.checkpointed is not None:
            kept = (run.checkpointed, [p for p in (out / LAST, out / STATE) if p.exists()])
        raise NonFiniteLossError(loss.total.item(), step=it + 1, epoch=it // run.per_epoch + 1, kept=kept,
                                 base_lr=config.base_lr, precision=config.precision)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss.total * loss.grad_scale).backward()
    return lr, loss


def _checkpoint_due(config: TrainConfig, run: _Run, it: int) -> bool:
    """Whether to checkpoint after `it` steps: at the end, after every epoch, every `save_every_iters`."""
    return it == run.stop_iters or it % run.per_epoch == 0 or bool(
        config.save_every_iters and it % config.save_every_iters == 0
    )


def _checkpoint(model: SAMed, run: _Run, out: Path, rank: int, it: int, epoch: Optional[int]) -> list[Path]:
    """Save the live adapter as adapter_last (and as the epoch's adapter when `epoch` is given) and
    the state at `it` steps, each atomically; returns the files written (none off rank 0)."""
    run.state.iteration = it
    if rank != 0:
        run.checkpointed = it
        return []
    adapter = model.adapter()
    written = []
    if epoch is not None:
        written.append(adapter.save(out / epoch_adapter(epoch)))
    written.append(adapter.save(out / LAST))
    # The state last: a resume reads it first, so it never points past the adapter beside it.
    save_state(out / STATE, run.named, run.optimizer, run.scaler, run.state)
    run.checkpointed = it  # only once both are written: an interrupted save is saved again
    return written + [out / STATE]


def _validate(model: SAMed, volumes, out: Path, rank: int, best: Optional[float], epoch: int, log) -> Optional[float]:
    from ..evaluation.evaluate import evaluate

    summary, _ = evaluate(model, volumes, protocol="default")
    model.train()
    dice = summary.mean_dice
    log.record({"epoch": epoch, "val_mean_dice": dice, "val_class_dice": summary.class_dice})
    if dice is not None and (best is None or dice > best):
        best = dice
        if rank == 0:
            model.adapter().save(out / BEST)
    return best


def _iteration(line: str) -> float:
    """The iteration a log line records; a line cut short by a killed run counts as never written."""
    try:
        return json.loads(line).get("iter", 0)
    except json.JSONDecodeError:
        return float("inf")


class _Log:
    """JSON lines of every iteration (rank 0), a tqdm bar, optionally TensorBoard."""

    def __init__(self, out: Path, rank: int, start: int, config: TrainConfig, total: int,
                 adapter: Optional[dict] = None) -> None:
        self.path = out / LOG
        self.active = rank == 0
        self.file = None
        self.bar = None
        self.writer = None
        if not self.active:
            return
        if start == 0 or not self.path.exists():
            lines = []
        else:  # a resumed run repeats the iterations after its checkpoint: drop their old lines
            lines = [ln for ln in self.path.read_text().splitlines() if _iteration(ln) <= start]
        self.path.write_text("".join(ln + "\n" for ln in lines))
        self.file = self.path.open("a")
        if start == 0:
            # The adapter's config holds the data's preprocessing and orientation: logged with the run.
            self.record({"config": dataclasses.asdict(config), "adapter": adapter})
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(initial=start, total=total, unit="it", desc="train", dynamic_ncols=True)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def record(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def step(self, it: int, lr: float, loss) -> None:
        if not self.active:
            return
        values = {"loss": loss.total.item(), "ce": loss.ce.item(), "dice": loss.dice.item()}
        if loss.click is not None:
            values["click"] = loss.click.item()
        self.record({"iter": it, "lr": lr, **values})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, it)
            self.writer.add_scalar("train/lr", lr, it)

    def close(self) -> None:
        for handle in (self.bar, self.writer, self.file):
            if handle is not None:
                handle.close()
        self.bar = self.writer = self.file = None

    def __enter__(self) -> "_Log":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["RECIPES", "NonFiniteLossError", "TRAINING_DEVICES", "TrainConfig", "check_device", "iterations_per_epoch",
           "train"]
