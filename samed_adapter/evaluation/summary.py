"""Summaries of per-case scores (:mod:`.metrics`): means and the tables and files they go into.

:func:`summarize` averages per class over cases, then over classes, skipping ``None``.
:class:`Summary` writes Markdown and CSV tables, and :func:`nnunet_summary` /
:meth:`Summary.to_json` write the voxel counts of :func:`~.metrics.confusion_counts`, with our
HD95, in the shape of nnU-Net v2's ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, TextIO, Union

import numpy as np

from ..io.files import atomic_path
from .metrics import PROTOCOLS, ClassScore, ConfusionCounts

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .clicks import ClickSummary


def mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None; None when none is."""
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
        counts: case id -> K voxel counts (:func:`confusion_counts`), as :func:`evaluate` records
            them; None when not recorded. Needed by :meth:`to_nnunet_dict` / :meth:`to_json`.
        protocol: the protocol the scores follow ("samed" or "default"); None when unknown.
        clicks: Dice after each round of simulated clicks and NoC (``evaluate(clicks=N)``); it
            adds its tables to :meth:`to_markdown` and its "clicks" entry to :meth:`to_json`.
    """

    class_names: list[str]
    cases: dict[str, list[ClassScore]]
    class_dice: list[Optional[float]]
    class_hd95: list[Optional[float]]
    mean_dice: Optional[float]
    mean_hd95: Optional[float]
    empty_truth_counts: list[int]
    empty_prediction_counts: list[int]
    counts: Optional[dict[str, list[ConfusionCounts]]] = None
    protocol: Optional[str] = None
    clicks: Optional["ClickSummary"] = None

    def to_nnunet_dict(
        self,
        *,
        prediction_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
        reference_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
    ) -> dict[str, Any]:
        """The dict of :func:`nnunet_summary` from the counts this Summary carries."""
        return nnunet_summary(self, prediction_files=prediction_files, reference_files=reference_files)

    def to_json(
        self,
        path: Union[str, os.PathLike],
        *,
        prediction_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
        reference_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
    ) -> Path:
        """Write :meth:`to_nnunet_dict` as ``path`` (e.g. ``summary.json``), atomically.

        Strict JSON: undefined values are ``null`` (nnU-Net itself writes ``NaN``). Returns ``path``.

        Raises:
            ValueError: the Summary carries no counts (build it with :func:`evaluate`, or pass
                counts to :func:`summarize`).
        """
        data = self.to_nnunet_dict(prediction_files=prediction_files, reference_files=reference_files)
        text = json.dumps(data, indent=4, allow_nan=False) + "\n"
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        """Per-case table, then per-class means (Dice in percent, 2 decimals; HD95 2 decimals)."""
        lines = ["| case | class | Dice (%) | HD95 | note |", "|---|---|---:|---:|---|"]
        for case, scores in self.cases.items():
            for name, s in zip(self.class_names, scores):
                notes = [n for n, f in (("empty truth", s.empty_truth), ("empty prediction", s.empty_prediction)) if f]
                lines.append(f"| {case} | {name} | {percent_cell(s.dice)} | {number_cell(s.hd95)} "
                             f"| {', '.join(notes)} |")
        text = "\n".join(lines) + "\n\n" + self.means_markdown()
        return text if self.clicks is None else text + "\n" + self.clicks.to_markdown()

    def means_markdown(self) -> str:
        """The per-class means table alone (the last part of :meth:`to_markdown`; the model card's)."""
        lines = ["| class | mean DSC (%) | mean HD95 | empty-truth cases | empty-prediction cases |",
                 "|---|---:|---:|---:|---:|"]
        for i, name in enumerate(self.class_names):
            lines.append(
                f"| {name} | {percent_cell(self.class_dice[i])} | {number_cell(self.class_hd95[i])} "
                f"| {self.empty_truth_counts[i]} | {self.empty_prediction_counts[i]} |"
            )
        lines.append(
            f"| **mean** | {percent_cell(self.mean_dice)} | {number_cell(self.mean_hd95)} "
            f"| {sum(self.empty_truth_counts)} | {sum(self.empty_prediction_counts)} |"
        )
        return "\n".join(lines) + "\n"

    def to_csv(self, path_or_buffer: Union[str, os.PathLike, TextIO]) -> None:
        """Write ``case,class,dice,hd95,empty_truth,empty_prediction`` rows (Dice as a fraction).

        Per-case rows hold 0/1 flags; then one row per class with ``case == "mean"`` holding the
        class means and the flags' counts, and a last ``mean,all`` row with the overall means.
        Unscored values are empty cells.
        """
        write_csv(path_or_buffer, self._write_csv)

    def _write_csv(self, f: TextIO) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case", "class", "dice", "hd95", "empty_truth", "empty_prediction"])
        for case, scores in self.cases.items():
            for name, s in zip(self.class_names, scores):
                w.writerow([case, name, csv_cell(s.dice), csv_cell(s.hd95), int(s.empty_truth),
                            int(s.empty_prediction)])
        for i, name in enumerate(self.class_names):
            w.writerow(["mean", name, csv_cell(self.class_dice[i]), csv_cell(self.class_hd95[i]),
                        self.empty_truth_counts[i], self.empty_prediction_counts[i]])
        w.writerow(["mean", "all", csv_cell(self.mean_dice), csv_cell(self.mean_hd95),
                    sum(self.empty_truth_counts), sum(self.empty_prediction_counts)])


def write_csv(path_or_buffer: Union[str, os.PathLike, TextIO], write: Callable[[TextIO], None]) -> None:
    """Call ``write(f)`` on an open text buffer, or on `path_or_buffer` opened for CSV (UTF-8)."""
    if hasattr(path_or_buffer, "write"):
        write(path_or_buffer)  # type: ignore[arg-type]
    else:
        with open(path_or_buffer, "w", newline="", encoding="utf-8") as f:
            write(f)


def percent_cell(v: Optional[float]) -> str:
    """A fraction as a Markdown cell in percent, 2 decimals ("n/a": unscored)."""
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def number_cell(v: Optional[float]) -> str:
    """A number as a Markdown cell, 2 decimals ("n/a": unscored)."""
    return "n/a" if v is None else f"{v:.2f}"


def csv_cell(v: Optional[float]) -> str:
    """A number as a CSV cell at full precision (empty: unscored)."""
    return "" if v is None else repr(float(v))


def summarize(
    cases: dict[str, list[ClassScore]],
    class_names: list[str],
    *,
    counts: Optional[Mapping[str, Sequence[ConfusionCounts]]] = None,
    protocol: Optional[str] = None,
) -> Summary:
    """Average each class over cases (skipping None), then the class means over classes.

    Args:
        cases: case id -> the K scores of :func:`score_case`; at least one case.
        class_names: K names, for classes 1..K.
        counts: optional, case id -> the K :func:`confusion_counts` of the same cases, kept on
            the Summary for :meth:`Summary.to_json`.
        protocol: optional, the protocol ``cases`` were scored under, kept on the Summary.
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
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} or None, got {protocol!r}")
    kept_counts = None if counts is None else _check_counts(counts, [str(k) for k in cases], len(names))
    per_class = list(zip(*cases.values()))  # class index -> scores of every case
    class_dice = [mean_of([s.dice for s in col]) for col in per_class]
    class_hd95 = [mean_of([s.hd95 for s in col]) for col in per_class]
    return Summary(
        class_names=names,
        cases={str(k): list(v) for k, v in cases.items()},
        class_dice=class_dice,
        class_hd95=class_hd95,
        mean_dice=mean_of(class_dice),
        mean_hd95=mean_of(class_hd95),
        empty_truth_counts=[sum(s.empty_truth for s in col) for col in per_class],
        empty_prediction_counts=[sum(s.empty_prediction and not s.empty_truth for s in col) for col in per_class],
        counts=kept_counts,
        protocol=protocol,
    )


def _check_counts(
    counts: Mapping[str, Sequence[ConfusionCounts]], cases: Sequence[str], num_classes: int
) -> dict[str, list[ConfusionCounts]]:
    if not isinstance(counts, Mapping):
        raise ValueError("counts must be a dict of case id -> list of ConfusionCounts (from confusion_counts)")
    by_case = {str(k): v for k, v in counts.items()}
    if set(by_case) != set(cases):
        missing, extra = sorted(set(cases) - set(by_case)), sorted(set(by_case) - set(cases))
        raise ValueError(f"counts must cover exactly the scored cases; missing {missing}, extra {extra}")
    for case, items in by_case.items():
        if (
            not isinstance(items, (list, tuple))
            or len(items) != num_classes
            or not all(isinstance(c, ConfusionCounts) for c in items)
        ):
            raise ValueError(
                f"counts of case {case!r} do not hold {num_classes} ConfusionCounts items (one per class); "
                "pass the list that confusion_counts returns"
            )
    return {case: list(by_case[case]) for case in cases}


# nnU-Net v2's per-class metrics, in its order, and ours (HD95) after its Dice and IoU.
_NNUNET_METRICS: tuple[str, ...] = ("Dice", "IoU", "HD95", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def _json_number(value: Optional[float]) -> Optional[Union[int, float]]:
    """A plain int/float for JSON, None for missing or non-finite values."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def nnunet_summary(
    summary: Summary,
    counts: Optional[Mapping[str, Sequence[ConfusionCounts]]] = None,
    class_names: Optional[Sequence[str]] = None,
    *,
    protocol: Optional[str] = None,
    prediction_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
    reference_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
) -> dict[str, Any]:
    """The dict of nnU-Net v2's ``summary.json`` (``compute_metrics_on_folder``), plus our HD95.

    Shape (class keys are the label values as strings, "1".."K"; foreground classes only)::

        {"metric_per_case": [{"prediction_file": str, "reference_file": str, "case": str,
                              "metrics": {"1": {"name", "Dice", "IoU", "HD95", "FP", "TP", "FN",
                                                "TN", "n_pred", "n_ref"}, ...}}, ...],
         "mean": {"1": {"name", <each metric>: mean over cases}, ...},
         "foreground_mean": {<each metric>: mean over classes of the per-class means},
         "class_names": {"1": name, ...},
         "protocol": "samed" | "default" | None,
         "clicks": ClickSummary.to_dict()}  # only where the summary holds clicks

    Dice = 2TP/(2TP+FP+FN) and IoU = TP/(TP+FP+FN) come from the voxel counts, as nnU-Net
    computes them, so they are None (nnU-Net: NaN) when prediction and truth are both empty and
    0 when only the truth is empty — unlike the protocol's Dice in ``summary.cases`` (the
    "samed" protocol scores those 0 and 1, "default" leaves a truth-empty class unscored).
    Where the truth is non-empty both Dice agree. HD95 is the protocol's, from
    ``summary.cases`` (voxels for "samed", spacing units for "default"; None where unscored).
    Means skip None, as nnU-Net's ``np.nanmean`` skips NaN; a mean with nothing to average is
    None. Undefined values are None (JSON ``null``, where nnU-Net writes ``NaN``).

    Args:
        summary: from :func:`evaluate` or :func:`summarize`.
        counts: case id -> K :class:`ConfusionCounts`; default: ``summary.counts``.
        class_names: K names; default: ``summary.class_names``.
        protocol: written as "protocol"; default: ``summary.protocol``.
        prediction_files, reference_files: case id -> file written as "prediction_file" /
            "reference_file"; default (and for a case not given): the case id.

    Raises:
        ValueError: no counts, or counts / names that do not match the summary's cases and classes.
    """
    if counts is None:
        counts = summary.counts
    if counts is None:
        raise ValueError(
            "the summary carries no voxel counts; evaluate() records them, or pass "
            "counts={case: confusion_counts(pred, truth, K)}"
        )
    num_classes = len(summary.class_names)
    names = list(summary.class_names if class_names is None else (str(n) for n in class_names))
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but the summary scores {num_classes} classes")
    counts = _check_counts(counts, list(summary.cases), num_classes)
    protocol = summary.protocol if protocol is None else protocol
    keys = [str(c) for c in range(1, num_classes + 1)]

    def file_of(files: Optional[Mapping[str, Union[str, os.PathLike]]], case: str) -> str:
        if files is None or case not in files:
            return case
        return os.fspath(files[case])

    per_case = []
    for case, scores in summary.cases.items():
        metrics = {}
        for key, name, score, n in zip(keys, names, scores, counts[case]):
            metrics[key] = {
                "name": name,
                "Dice": _json_number(n.dice),
                "IoU": _json_number(n.iou),
                "HD95": _json_number(score.hd95),
                "FP": n.fp,
                "TP": n.tp,
                "FN": n.fn,
                "TN": n.tn,
                "n_pred": n.n_pred,
                "n_ref": n.n_ref,
            }
        per_case.append({
            "prediction_file": file_of(prediction_files, case),
            "reference_file": file_of(reference_files, case),
            "case": case,
            "metrics": metrics,
        })
    mean: dict[str, dict[str, Any]] = {}
    for key, name in zip(keys, names):
        entry: dict[str, Any] = {"name": name}
        for m in _NNUNET_METRICS:
            entry[m] = _json_number(mean_of([_json_number(c["metrics"][key][m]) for c in per_case]))
        mean[key] = entry
    foreground_mean = {m: _json_number(mean_of([mean[key][m] for key in keys])) for m in _NNUNET_METRICS}
    data = {
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "class_names": dict(zip(keys, names)),
        "protocol": protocol,
    }
    if summary.clicks is not None:
        data["clicks"] = summary.clicks.to_dict()
    return data
