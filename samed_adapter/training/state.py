"""The training state saved beside the adapter so that a killed run can resume exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..io.files import atomic_path
from .errors import TrainingStateError


@dataclass
class TrainingState:
    """Where a run stands: iterations done and the best validation Dice so far."""

    iteration: int
    best_dice: Optional[float]


def save_state(path: Path, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, state: TrainingState) -> None:
    """Write the trainable tensors (exact values, not deltas), optimizer, scaler and RNG state.

    The file is written to a temporary name and renamed, so a crash or a full disk while
    writing leaves the previous state readable.
    """
    payload = {
        "iteration": state.iteration,
        "best_dice": state.best_dice,
        "trainable": {name: p.detach().cpu() for name, p in named},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_state(path: Path, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> TrainingState:
    """Restore what `save_state` wrote into the live tensors and optimizer; return the position.

    Everything in the file is checked (readable, a training state, the same trainable tensors
    with the same shapes, an optimizer state that fits them) before a tensor is changed, so a
    damaged or foreign file leaves the model as it was.

    Raises:
        TrainingStateError: the file cannot be resumed from; the message says why.
    """
    def refuse(problem: str) -> TrainingStateError:
        return TrainingStateError(Path(path), problem)

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, or pickled objects weights_only refuses
        raise refuse(f"it is not a readable training state ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    missing = [key for key in _KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise refuse(f"it is no training state written by train (no {', '.join(repr(k) for k in missing)})")
    trainable, iteration, best = payload["trainable"], payload["iteration"], payload["best_dice"]
    if not isinstance(trainable, dict) or not all(isinstance(t, torch.Tensor) for t in trainable.values()):
        raise refuse("its 'trainable' entry is not a table of tensors")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise refuse(f"its step count {iteration!r} is not a whole number >= 0")
    if best is not None and not isinstance(best, float):
        raise refuse(f"its best validation Dice {best!r} is not a number")
    names = [name for name, _ in named]
    if sorted(trainable) != sorted(names):
        different = sorted(set(trainable) ^ set(names))
        raise refuse(f"it was saved for other trainable tensors ({len(different)} differ, e.g. {different[:2]}); "
                     "resume with the adapter config it was trained with")
    for name, param in named:
        if trainable[name].shape != param.shape:
            raise refuse(f"it holds {name} with shape {tuple(trainable[name].shape)} where this adapter has "
                         f"{tuple(param.shape)}; resume with the adapter config it was trained with")
    rng = payload["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise refuse("its random number generator state is not a byte tensor")
    # The optimizer and scaler are new (made for this run): loading into them changes nothing
    # else, so they are loaded, and checked, before the model's tensors are.
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as err:
        raise refuse(f"its optimizer state does not fit this adapter ({type(err).__name__}: {err})") from None
    for _, param in named:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise refuse(f"its optimizer state {key!r} has shape {tuple(value.shape)} for a tensor of shape "
                             f"{tuple(param.shape)}")
    try:
        torch.set_rng_state(rng)
    except RuntimeError as err:
        raise refuse(f"its random number generator state is not torch's ({err})") from None
    with torch.no_grad():
        for name, param in named:
            param.copy_(trainable[name])
    return TrainingState(iteration=iteration, best_dice=best)


# What save_state writes; a file without any of them was not written by it.
_KEYS = ("iteration", "best_dice", "trainable", "optimizer", "scaler", "torch_rng")
