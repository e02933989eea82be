"""Model-independent training building blocks: augmentation, loss, lr schedule, dataset readers."""

from .augment import SliceAugment, augment, low_res_size
from .data import (
    SYNAPSE_LABEL_MAP,
    NiftiSlices,
    NiftiVolumes,
    SynapseSlices,
    SynapseVolumes,
    find_nifti_cases,
    split_cases,
)
from .losses import LossOutput, all_reduce_sum, dice_loss, segmentation_loss
from .loop import RECIPES, NonFiniteLossError, TrainConfig, iterations_per_epoch, train
from .schedule import DEFAULT_BASE_LR, DEFAULT_POWER, DEFAULT_WARMUP_ITERS, VIT_H_POWER, lr_at, set_lr

__all__ = [
    "train",
    "TrainConfig",
    "RECIPES",
    "NonFiniteLossError",
    "iterations_per_epoch",
    "augment",
    "SliceAugment",
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
