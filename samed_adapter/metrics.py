"""Dice and HD95 of K+1-class label maps (0 = background), per class, per case, and summarized.

Two protocols score a case (:func:`score_case`):

* ``"samed"`` reproduces the published SAMed evaluation: HD95 in voxels (unit spacing); a class
  predicted where the truth is empty scores Dice 1, HD95 0; an empty prediction scores Dice 0,
  HD95 0 (also when the truth is empty too).
* ``"default"`` measures HD95 in the units of ``spacing`` (usually mm) and scores no class whose
  truth is empty (``dice=hd95=None``, flagged ``empty_truth``); an empty prediction against a
  non-empty truth has Dice 0 and an undefined HD95 (``None``).

:func:`summarize` averages per class over cases, then over classes, skipping ``None``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, TextIO, Union

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
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (foreground classes K), got {num_classes!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "samed" and spacing is not None:
        # The published numbers are in voxels; silently dropping spacing would mislabel the unit.
        raise ValueError("the 'samed' protocol measures HD95 in voxels; drop spacing or use protocol='default'")
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


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class Summary:
    """Means of per-case scores; class lists are indexed like ``class_names`` (class c at c - 1).

    Attributes:
        class_names: K names.
        cases: case id -> K scores, as given to :func:`summarize`.
        class_dice, class_hd95: per class, mean over cases with a score; None if none has one.
        mean_dice, mean_hd95: mean of the per-class means over classes that have one.
        empty_truth_counts: per class, cases whose truth is empty.
        empty_prediction_counts: per class, cases with a non-empty truth but an empty prediction.
    """

    class_names: list[str]
    cases: dict[str, list[ClassScore]]
    class_dice: list[Optional[float]]
    class_hd95: list[Optional[float]]
    mean_dice: Optional[float]
    mean_hd95: Optional[float]
    empty_truth_counts: list[int]
    empty_prediction_counts: list[int]

    def to_markdown(self) -> str:
        """Per-case table, then per-class means (Dice in percent, 2 decimals; HD95 2 decimals)."""
        lines = ["| case | class | Dice (%) | HD95 | note |", "|---|---|---:|---:|---|"]
        for case, scores in self.cases.items():
            for name, s in zip(self.class_names, scores):
                notes = [n for n, f in (("empty truth", s.empty_truth), ("empty prediction", s.empty_prediction)) if f]
                lines.append(f"| {case} | {name} | {_pct(s.dice)} | {_num(s.hd95)} | {', '.join(notes)} |")
        lines += ["", "| class | mean DSC (%) | mean HD95 | empty-truth cases | empty-prediction cases |"]
        lines.append("|---|---:|---:|---:|---:|")
        for i, name in enumerate(self.class_names):
            lines.append(
                f"| {name} | {_pct(self.class_dice[i])} | {_num(self.class_hd95[i])} "
                f"| {self.empty_truth_counts[i]} | {self.empty_prediction_counts[i]} |"
            )
        lines.append(
            f"| **mean** | {_pct(self.mean_dice)} | {_num(self.mean_hd95)} "
            f"| {sum(self.empty_truth_counts)} | {sum(self.empty_prediction_counts)} |"
        )
        return "\n".join(lines) + "\n"

    def to_csv(self, path_or_buffer: Union[str, os.PathLike, TextIO]) -> None:
        """Write ``case,class,dice,hd95,empty_truth,empty_prediction`` rows (Dice as a fraction).

        Per-case rows hold 0/1 flags; then one row per class with ``case == "mean"`` holding the
        class means and the flags' counts, and a last ``mean,all`` row with the overall means.
        Unscored values are empty cells.
        """
        if hasattr(path_or_buffer, "write"):
            self._write_csv(path_or_buffer)  # type: ignore[arg-type]
        else:
            with open(path_or_buffer, "w", newline="", encoding="utf-8") as f:
                self._write_csv(f)

    def _write_csv(self, f: TextIO) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case", "class", "dice", "hd95", "empty_truth", "empty_prediction"])
        for case, scores in self.cases.items():
            for name, s in zip(self.class_names, scores):
                w.writerow([case, name, _raw(s.dice), _raw(s.hd95), int(s.empty_truth), int(s.empty_prediction)])
        for i, name in enumerate(self.class_names):
            w.writerow(["mean", name, _raw(self.class_dice[i]), _raw(self.class_hd95[i]),
                        self.empty_truth_counts[i], self.empty_prediction_counts[i]])
        w.writerow(["mean", "all", _raw(self.mean_dice), _raw(self.mean_hd95),
                    sum(self.empty_truth_counts), sum(self.empty_prediction_counts)])


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _raw(v: Optional[float]) -> str:
    return "" if v is None else repr(float(v))


def summarize(cases: dict[str, list[ClassScore]], class_names: list[str]) -> Summary:
    """Average each class over cases (skipping None), then the class means over classes.

    Args:
        cases: case id -> the K scores of :func:`score_case`; at least one case.
        class_names: K names, for classes 1..K.
    """
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty; give one name per foreground class")
    if not isinstance(cases, dict) or not cases:
        raise ValueError("cases must be a non-empty dict of case id -> list of ClassScore (from score_case)")
    for case, scores in cases.items():
        if (
            not isinstance(scores, (list, tuple))
            or len(scores) != len(names)
            or not all(isinstance(s, ClassScore) for s in scores)
        ):
            raise ValueError(
                f"case {case!r} does not hold {len(names)} ClassScore items (one per class name); "
                "pass the list of ClassScore that score_case returns, one per class"
            )
    per_class = list(zip(*cases.values()))  # class index -> scores of every case
    class_dice = [_mean([s.dice for s in col]) for col in per_class]
    class_hd95 = [_mean([s.hd95 for s in col]) for col in per_class]
    return Summary(
        class_names=names,
        cases={str(k): list(v) for k, v in cases.items()},
        class_dice=class_dice,
        class_hd95=class_hd95,
        mean_dice=_mean(class_dice),
        mean_hd95=_mean(class_hd95),
        empty_truth_counts=[sum(s.empty_truth for s in col) for col in per_class],
        empty_prediction_counts=[sum(s.empty_prediction and not s.empty_truth for s in col) for col in per_class],
    )
