"""The training state saved beside the adapter so that a killed run can resume exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..files import atomic_path


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
    """Restore what `save_state` wrote into the live tensors and optimizer; return the position."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise ValueError(f"{path} is not a readable training state ({err}); delete it to start afresh") from None
    trainable = payload["trainable"]
    names = [name for name, _ in named]
    if sorted(trainable) != sorted(names):
        raise ValueError(
            f"{path} was saved for other trainable tensors (e.g. {sorted(set(trainable) ^ set(names))[:3]}); "
            "resume with the same adapter config, or use another output directory"
        )
    with torch.no_grad():
        for name, param in named:
            param.copy_(trainable[name])
    optimizer.load_state_dict(payload["optimizer"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    return TrainingState(iteration=int(payload["iteration"]), best_dice=payload["best_dice"])
