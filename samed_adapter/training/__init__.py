"""Training: datasets, augmentation, losses, schedule, loop, checkpoint state; imports evaluation, the core and the stages below.

Names from modules that need torch are imported on first use (PEP 562), so that the command
line can declare its flags without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .augment import augment, low_res_size
from .config import DEFAULT_BASE_LR, DEFAULT_POWER, DEFAULT_WARMUP_ITERS, RECIPES, VIT_H_POWER, TrainConfig

_LAZY = {
    "SYNAPSE_LABEL_MAP": "data", "NiftiSlices": "data", "NiftiVolumes": "data", "SynapseSlices": "data",
    "SynapseVolumes": "data", "find_nifti_cases": "data", "split_cases": "data",
    "LossOutput": "losses", "all_reduce_sum": "losses", "dice_loss": "losses", "segmentation_loss": "losses",
    "NonFiniteLossError": "errors", "RunFolderError": "errors", "TrainingError": "errors",
    "TrainingInterrupted": "errors", "TrainingStateError": "errors", "iterations_per_epoch": "loop", "train": "loop",
    "lr_at": "schedule", "set_lr": "schedule",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'samed_adapter.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .data import (SYNAPSE_LABEL_MAP, NiftiSlices, NiftiVolumes, SynapseSlices, SynapseVolumes,
                       find_nifti_cases, split_cases)
    from .losses import LossOutput, all_reduce_sum, dice_loss, segmentation_loss
    from .errors import NonFiniteLossError, RunFolderError, TrainingError, TrainingInterrupted, TrainingStateError
    from .loop import iterations_per_epoch, train
    from .schedule import lr_at, set_lr

__all__ = [
    "train",
    "TrainConfig",
    "RECIPES",
    "NonFiniteLossError",
    "RunFolderError",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingStateError",
    "iterations_per_epoch",
    "augment",
    "low_res_size",
    "SYNAPSE_LABEL_MAP",
    "SynapseSlices",
    "SynapseVolumes",
    "NiftiSlices",
    "NiftiVolumes",
    "find_nifti_cases",
    "split_cases",
    "LossOutput",
    "segmentation_loss",
    "dice_loss",
    "all_reduce_sum",
    "lr_at",
    "set_lr",
    "DEFAULT_BASE_LR",
    "DEFAULT_WARMUP_ITERS",
    "DEFAULT_POWER",
    "VIT_H_POWER",
]
