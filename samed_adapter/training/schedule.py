"""SAMed's learning-rate schedule: linear warm-up, then polynomial decay."""

from __future__ import annotations

import math
import numbers

import torch

from .config import DEFAULT_BASE_LR, DEFAULT_POWER, DEFAULT_WARMUP_ITERS

__all__ = ["lr_at", "set_lr"]


def lr_at(
    it: int,
    *,
    base_lr: float = DEFAULT_BASE_LR,
    warmup_iters: int = DEFAULT_WARMUP_ITERS,
    max_iters: int,
    power: float = DEFAULT_POWER,
) -> float:
    """Learning rate of SAMed's schedule at iteration counter ``it`` (0-based).

    - ``it < warmup_iters``: ``base_lr * (it + 1) / warmup_iters``;
    - otherwise: ``base_lr * (1 - (it - warmup_iters) / max_iters) ** power``.

    How the published loop uses it: the optimiser is created with lr ``base_lr / warmup_iters``
    (= ``lr_at(0)``); right *after* optimiser step ``it`` it sets ``lr_at(it)``, which the next
    step then uses. So step 0 and step 1 both run at ``base_lr / warmup_iters``, and step j >= 1
    runs at ``lr_at(j - 1)``. Do the same to reproduce published runs.

    ``max_iters`` is max_epochs x iterations per epoch. As in the published code the decay is
    measured from the end of warm-up but divided by ``max_iters`` (not ``max_iters -
    warmup_iters``), so the lr at the last iteration (``it = max_iters - 1``) is still above
    zero. Once ``it - warmup_iters`` reaches ``max_iters`` the base of the power would be <= 0 (a
    complex number in Python for negative bases); the lr is 0.0 from there on (never negative).
    ``warmup_iters=0`` disables warm-up. Power: DEFAULT_POWER (0.9, ViT-B recipe), VIT_H_POWER
    (7) for the ViT-H recipe.
    """
    it = _int_at_least("it (the 0-based optimiser step)", it, 0)
    warmup_iters = _int_at_least("warmup_iters", warmup_iters, 0)
    max_iters = _int_at_least("max_iters (max_epochs x iterations per epoch)", max_iters, 1)
    if not isinstance(base_lr, numbers.Real) or not 0.0 <= base_lr < math.inf:
        raise ValueError(f"base_lr must be a finite non-negative number, got {base_lr!r}")
    if not isinstance(power, numbers.Real) or not 0.0 <= power < math.inf:
        raise ValueError(f"power must be a finite non-negative number, got {power!r}")
    if it < warmup_iters:
        return float(base_lr) * (it + 1) / warmup_iters
    remaining = 1.0 - (it - warmup_iters) / max_iters
    if remaining <= 0.0:
        return 0.0
    return float(base_lr) * remaining**power


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group of ``optimizer``."""
    if not isinstance(lr, numbers.Real) or not 0.0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
