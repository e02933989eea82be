"""Dice and HD95 of K+1-class label maps (0 = background), per class, per case, and summarized.

Two protocols score a case (:func:`score_case`):

* ``"samed"`` reproduces the published SAMed evaluation: HD95 in voxels (unit spacing); a class
  predicted where the truth is empty scores Dice 1, HD95 0; an empty prediction scores Dice 0,
  HD95 0 (also when the truth is empty too).
* ``"default"`` measures HD95 in the units of ``spacing`` (usually mm) and scores no class whose
  truth is empty (``dice=hd95=None``, flagged ``empty_truth``); an empty prediction against a
  non-empty truth has Dice 0 and an undefined HD95 (``None``).

:func:`confusion_counts` gives the voxel counts nnU-Net v2 reports (TP, FP, FN, TN per class);
:mod:`.summary` averages the scores and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np
from medpy.metric import binary as _medpy

EvalProtocol = Literal["samed", "default"]
PROTOCOLS: tuple[str, ...] = ("samed", "default")
Spacing = Union[float, Sequence[float], None]


def _as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred has shape {pred.shape} but truth has {truth.shape}; pass masks of the same shape")
    if pred.ndim == 0:
        raise ValueError("masks must have at least one dimension; wrap a scalar with np.atleast_1d")
    masks = []
    for name, mask in (("pred", pred), ("truth", truth)):
        if mask.dtype != np.bool_:
            # MedPy treats any non-zero as foreground; a label map passed by mistake would then be
            # silently merged into one class, so only 0/1 is accepted here.
            if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
                raise ValueError(f"{name} has dtype {mask.dtype}; pass a bool or 0/1 numeric mask")
            if np.any((mask != 0) & (mask != 1)):
                raise ValueError(f"{name} holds values other than 0 and 1; for a label map pass (labels == c)")
            mask = mask.astype(bool)
        masks.append(mask)
    return masks[0], masks[1]


def _spacing(spacing: Spacing, ndim: int) -> Optional[tuple[float, ...]]:
    if spacing is None:
        return None
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a number or {ndim} numbers (one per axis), got {spacing!r}") from None
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,):
        raise ValueError(f"spacing has {values.size} values but the masks have {ndim} axes; give one per axis")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"spacing must be finite and positive, got {spacing!r}")
    return tuple(float(v) for v in values)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P∩T| / (|P|+|T|) of two binary masks, via ``medpy.metric.binary.dc``.

    Args:
        pred: mask of any shape ``(D0, ..., Dn)``, bool or 0/1 numbers.
        truth: mask of the same shape as ``pred``.

    Returns:
        Dice in [0, 1]; 0 when exactly one mask is empty.

    Raises:
        ValueError: shapes differ, a mask is not binary, or both masks are empty (0/0; MedPy would
            return 1.0 there, which hides the case — decide its score explicitly, e.g. via
            :func:`score_case`).
    """
    p, t = _as_masks(pred, truth)
    if not p.any() and not t.any():
        raise ValueError("Dice is undefined when both masks are empty; score such a case explicitly (see score_case)")
    return float(_medpy.dc(p, t))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Spacing = None) -> float:
    """95th percentile of the symmetric surface distance, via ``medpy.metric.binary.hd95``.

    Args:
        pred: mask of any shape ``(D0, ..., Dn)``, bool or 0/1 numbers.
        truth: mask of the same shape as ``pred``.
        spacing: voxel size, one number for all axes or ``n+1`` numbers (axis order of the
            arrays); None means unit spacing, i.e. HD95 in voxels.

    Returns:
        HD95 in the units of ``spacing`` (>= 0).

    Raises:
        ValueError: shapes differ, a mask is not binary or empty (the distance is undefined),
            or ``spacing`` is malformed.
    """
    p, t = _as_masks(pred, truth)
    sp = _spacing(spacing, p.ndim)
    for name, mask in (("pred", p), ("truth", t)):
        if not mask.any():
            raise ValueError(f"HD95 is undefined because {name} is empty; check for empty masks before calling hd95")
    return float(_medpy.hd95(p, t, voxelspacing=sp))


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (foreground classes K), got {num_classes!r}")


def _label_maps(
    pred_labels: np.ndarray, truth_labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check two integer label maps of the same shape with values in 0..num_classes."""
    pred, truth = np.asarray(pred_labels), np.asarray(truth_labels)
    for name, labels in (("pred_labels", pred), ("truth_labels", truth)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} has dtype {labels.dtype}; pass an integer label map (e.g. labels.astype(np.int64))")
    if pred.shape != truth.shape:
        raise ValueError(f"pred_labels has shape {pred.shape} but truth_labels has {truth.shape}; resample to match")
    if pred.ndim == 0:
        raise ValueError("label maps must have at least one dimension")
    for name, labels in (("pred_labels", pred), ("truth_labels", truth)):
        if labels.size and (labels.min() < 0 or labels.max() > num_classes):
            raise ValueError(
                f"{name} holds labels in [{labels.min()}, {labels.max()}] but must be within 0..{num_classes}; "
                "check num_classes or remap the labels"
            )
    return pred, truth


@dataclass(frozen=True)
class ClassScore:
    """Scores of one foreground class on one case; ``None`` means not scored (see the protocols)."""

    dice: Optional[float]
    hd95: Optional[float]
    empty_truth: bool
    empty_prediction: bool


def score_case(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    num_classes: int,
    *,
    protocol: EvalProtocol = "samed",
    spacing: Spacing = None,
) -> list[ClassScore]:
    """Score classes 1..K of one case (a whole volume, not slice by slice).

    Args:
        pred_labels: integer label map, e.g. ``(D, H, W)``, values in 0..K (0 = background).
        truth_labels: integer label map of the same shape, values in 0..K.
        num_classes: K, the number of foreground classes.
        protocol: ``"samed"`` (published evaluation, HD95 in voxels) or ``"default"``.
        spacing: voxel size per axis in the arrays' axis order (``"default"`` only); None: unit.

    Returns:
        K :class:`ClassScore` items, index ``c - 1`` for class ``c``.
    """
    _check_num_classes(num_classes)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "samed" and spacing is not None:
        # The published numbers are in voxels; silently dropping spacing would mislabel the unit.
        raise ValueError("the 'samed' protocol measures HD95 in voxels; drop spacing or use protocol='default'")
    pred, truth = _label_maps(pred_labels, truth_labels, num_classes)
    sp = _spacing(spacing, pred.ndim)
    scores = []
    for c in range(1, num_classes + 1):
        p, t = pred == c, truth == c
        p_empty, t_empty = not p.any(), not t.any()
        if not p_empty and not t_empty:
            d, h = float(_medpy.dc(p, t)), float(_medpy.hd95(p, t, voxelspacing=sp))
        elif protocol == "samed":
            d, h = (1.0, 0.0) if not p_empty else (0.0, 0.0)
        elif t_empty:
            d, h = None, None
        else:
            d, h = 0.0, None
        scores.append(ClassScore(dice=d, hd95=h, empty_truth=t_empty, empty_prediction=p_empty))
    return scores


@dataclass(frozen=True)
class ConfusionCounts:
    """Voxel counts of one foreground class on one case, as nnU-Net v2 computes them.

    ``tp``: predicted and true; ``fp``: predicted, not true; ``fn``: true, not predicted;
    ``tn``: neither. nnU-Net's Dice and IoU follow from them (see :attr:`dice`, :attr:`iou`).
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n_pred(self) -> int:
        """Voxels predicted as the class (TP + FP)."""
        return self.tp + self.fp

    @property
    def n_ref(self) -> int:
        """Voxels of the class in the truth (TP + FN)."""
        return self.tp + self.fn

    @property
    def dice(self) -> Optional[float]:
        """2TP / (2TP + FP + FN); None when both masks are empty (nnU-Net: NaN)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else None

    @property
    def iou(self) -> Optional[float]:
        """TP / (TP + FP + FN); None when both masks are empty (nnU-Net: NaN)."""
        denominator = self.tp + self.fp + self.fn
        return self.tp / denominator if denominator else None


def confusion_counts(pred_labels: np.ndarray, truth_labels: np.ndarray, num_classes: int) -> list[ConfusionCounts]:
    """Per-class voxel counts of one case (one ``bincount`` over the joint labels).

    Args:
        pred_labels: integer label map, e.g. ``(D, H, W)``, values in 0..K (0 = background).
        truth_labels: integer label map of the same shape, values in 0..K.
        num_classes: K, the number of foreground classes.

    Returns:
        K :class:`ConfusionCounts`, index ``c - 1`` for class ``c``.
    """
    _check_num_classes(num_classes)
    pred, truth = _label_maps(pred_labels, truth_labels, num_classes)
    k = int(num_classes) + 1
    joint = truth.astype(np.int64).ravel() * k  # a copy: the caller's array is left alone
    joint += pred.ravel()
    table = np.bincount(joint, minlength=k * k).reshape(k, k)  # [truth label, predicted label]
    total = int(pred.size)
    counts = []
    for c in range(1, k):
        tp = int(table[c, c])
        fp = int(table[:, c].sum()) - tp
        fn = int(table[c, :].sum()) - tp
        counts.append(ConfusionCounts(tp=tp, fp=fp, fn=fn, tn=total - tp - fp - fn))
    return counts
