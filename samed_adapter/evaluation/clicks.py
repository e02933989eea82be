"""`evaluate --clicks N`: Dice after 0, 1, ..., N rounds of simulated clicks, and NoC@85 / NoC@90.

One case runs as a user would: ``session = model.interactive(image)`` starts from the automatic
labels (round 0, the labels `evaluate` scores), then each round places one click per class and
slice where the labels and the truth differ (:func:`samed_adapter.interactive.round_clicks`, the
field's protocol: the point deepest inside the largest error region) and refines them all in one
``session.refine``. So N counts clicks per class and slice, as the issue's "5 clicks" does.

Scores follow the "default" protocol of :mod:`.metrics`: Dice over the whole volume per class, a
class whose truth is empty on a case is not scored (None), an empty prediction against a
non-empty truth scores 0. NoC@t of a (case, class) is the first round whose Dice reaches t, and N
where none does within N rounds (the field reports the cap, as RITM's NoC@90 with 20 clicks
does; :attr:`ClickSummary.not_reached` counts those cases apart). A class means over cases,
skipping None; "mean" Dice is the mean of the class means, as :func:`.summary.summarize`
averages; "mean" NoC is over every scored (case, class), the field's mean over objects.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, TextIO, Union

import numpy as np

from ..interactive.protocol import round_clicks
from .metrics import confusion_counts
from .summary import csv_cell, mean_of, number_cell, percent_cell, write_csv

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..interactive.session import ClickSession

__all__ = ["THRESHOLDS", "CaseClicks", "ClickSummary", "click_case", "noc"]

THRESHOLDS: tuple[float, ...] = (0.85, 0.90)


@dataclass(frozen=True)
class CaseClicks:
    """One case through N rounds.

    Attributes:
        dice: (N + 1) rows of K Dice: row r after r rounds (row 0: the automatic labels); None
            where the class's truth is empty.
        clicks: N rows of K counts: the clicks each class got in round r + 1.
    """

    dice: list[list[Optional[float]]]
    clicks: list[list[int]]


def _class_dice(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> list[Optional[float]]:
    """K Dice of (D, H, W) labels against truth, the "default" protocol's (None: truth empty)."""
    return [None if n.n_ref == 0 else n.dice for n in confusion_counts(labels, truth, num_classes)]


def click_case(session: "ClickSession", truth: np.ndarray, rounds: int) -> CaseClicks:
    """Run `rounds` rounds of the protocol on a fresh session and score each.

    Args:
        session: from ``model.interactive(image)``, with no clicks yet.
        truth: integer labels 0..K on the grid of the session's input (as ``session.labels``).
        rounds: N >= 0.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a number of clicks >= 0, got {rounds!r}")
    if session.clicks():
        raise ValueError("the session already holds clicks; start from model.interactive(image)")
    truth = session.to_slices(np.asarray(truth).astype(np.int64))
    num_classes = session.num_classes
    dice = [_class_dice(session.slice_labels, truth, num_classes)]
    placed = []
    for _ in range(rounds):
        clicks = round_clicks(session.slice_labels, truth, num_classes)
        if clicks:  # none: the labels equal the truth, and stay so
            session.refine(clicks)
        placed.append([sum(c.label == k for c in clicks) for k in range(1, num_classes + 1)])
        dice.append(_class_dice(session.slice_labels, truth, num_classes))
    return CaseClicks(dice, placed)


def noc(dice: Sequence[Optional[float]], threshold: float) -> Optional[int]:
    """Rounds to reach `threshold` in one class's Dice after 0..N rounds: the first r with
    ``dice[r] >= threshold``, N (the cap) if none; None for an unscored class."""
    if dice[0] is None:
        return None
    return next((r for r, d in enumerate(dice) if d is not None and d >= threshold), len(dice) - 1)


@dataclass(frozen=True)
class ClickSummary:
    """Click results of every case, and their means (class c at index c - 1).

    Attributes:
        class_names: K names.
        rounds: N.
        cases: case id -> its :class:`CaseClicks`.
    """

    class_names: list[str]
    rounds: int
    cases: dict[str, CaseClicks]

    def __post_init__(self) -> None:
        k, n = len(self.class_names), self.rounds
        for case, result in self.cases.items():
            if len(result.dice) != n + 1 or len(result.clicks) != n or any(len(r) != k for r in result.dice):
                raise ValueError(f"case {case!r} holds {len(result.dice)} Dice rows of {k} classes; "
                                 f"a summary of {n} rounds needs {n + 1}")

    def class_dice(self, r: int) -> list[Optional[float]]:
        """K Dice after r rounds, each the mean over the cases that score the class."""
        return [mean_of([c.dice[r][k] for c in self.cases.values()]) for k in range(len(self.class_names))]

    def mean_dice(self, r: int) -> Optional[float]:
        """The mean of :meth:`class_dice` over the classes that have one."""
        return mean_of(self.class_dice(r))

    def nocs(self, k: int, threshold: float) -> list[int]:
        """NoC@threshold of class index k (0-based) on every case that scores it."""
        values = (noc([row[k] for row in c.dice], threshold) for c in self.cases.values())
        return [v for v in values if v is not None]

    def class_noc(self, threshold: float) -> list[Optional[float]]:
        """Per class, the mean NoC@threshold over the cases that score it."""
        return [mean_of(self.nocs(k, threshold)) for k in range(len(self.class_names))]

    def mean_noc(self, threshold: float) -> Optional[float]:
        """The mean NoC@threshold over every scored (case, class)."""
        return mean_of([v for k in range(len(self.class_names)) for v in self.nocs(k, threshold)])

    def not_reached(self, k: int, threshold: float) -> int:
        """Cases where class index k never reaches `threshold` within N rounds (scored N)."""
        return sum(1 for c in self.cases.values() if c.dice[0][k] is not None
                   and not any(row[k] >= threshold for row in c.dice))

    # ------------------------------------------------------------------ tables

    def to_markdown(self) -> str:
        """Dice (%) after each round, then NoC@85 and NoC@90: per (case, class), then the means."""
        rounds = range(self.rounds + 1)
        head = "| {} | " + " | ".join(["automatic"] + [f"{r} click{'s' * (r > 1)}" for r in rounds[1:]])
        head += " | NoC@85 | NoC@90 |"
        rule = "|---|" + "---:|" * (self.rounds + 3)
        lines = [_CLICKS_NOTE.format(n=self.rounds), "", head.format("case | class"), "|---" + rule]
        for case, result in self.cases.items():
            for k, name in enumerate(self.class_names):
                dice = [row[k] for row in result.dice]
                nocs = [noc(dice, t) for t in THRESHOLDS]
                lines.append(f"| {case} | {name} | " + " | ".join(map(percent_cell, dice)) + " | "
                             + " | ".join("n/a" if v is None else str(v) for v in nocs) + " |")
        lines += ["", head.format("class"), rule]
        for k, name in enumerate(self.class_names):
            dice = [self.class_dice(r)[k] for r in rounds]
            lines.append(f"| {name} | " + " | ".join(map(percent_cell, dice)) + " | "
                         + " | ".join(number_cell(self.class_noc(t)[k]) for t in THRESHOLDS) + " |")
        lines.append("| **mean** | " + " | ".join(percent_cell(self.mean_dice(r)) for r in rounds) + " | "
                     + " | ".join(number_cell(self.mean_noc(t)) for t in THRESHOLDS) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path_or_buffer: Union[str, os.PathLike, TextIO]) -> None:
        """Write ``case,class,round,dice,clicks`` rows: Dice as a fraction (empty: unscored),
        clicks the class got in that round (0 in round 0); then ``mean`` rows per class and
        round (clicks summed over cases), and ``mean,all`` rows of the mean Dice."""
        write_csv(path_or_buffer, self._write_csv)

    def _write_csv(self, f: TextIO) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case", "class", "round", "dice", "clicks"])
        for case, result in self.cases.items():
            for k, name in enumerate(self.class_names):
                for r, row in enumerate(result.dice):
                    w.writerow([case, name, r, csv_cell(row[k]), result.clicks[r - 1][k] if r else 0])
        for k, name in enumerate(self.class_names):
            for r in range(self.rounds + 1):
                total = sum(c.clicks[r - 1][k] for c in self.cases.values()) if r else 0
                w.writerow(["mean", name, r, csv_cell(self.class_dice(r)[k]), total])
        for r in range(self.rounds + 1):
            total = sum(sum(c.clicks[r - 1]) for c in self.cases.values()) if r else 0
            w.writerow(["mean", "all", r, csv_cell(self.mean_dice(r)), total])

    def to_dict(self) -> dict[str, Any]:
        """The "clicks" entry of summary.json (class keys "1".."K" as nnU-Net's; null: unscored)::

            {"rounds": N, "thresholds": [0.85, 0.9], "protocol": str,
             "metric_per_case": [{"case", "clicks": {"1": [per round], ...},
                                  "metrics": {"1": {"name", "Dice": [N + 1], "NoC@85", "NoC@90"}}}],
             "mean": {"1": {"name", "Dice": [N + 1], "NoC@85", "NoC@90",
                            "not_reached@85", "not_reached@90"}, ...},
             "foreground_mean": {"Dice": [N + 1], "NoC@85", "NoC@90"}}
        """
        keys = [str(k + 1) for k in range(len(self.class_names))]
        labels = [f"NoC@{round(100 * t)}" for t in THRESHOLDS]
        per_case = []
        for case, result in self.cases.items():
            metrics = {}
            for k, (key, name) in enumerate(zip(keys, self.class_names)):
                dice = [row[k] for row in result.dice]
                metrics[key] = {"name": name, "Dice": dice, **{m: noc(dice, t) for m, t in zip(labels, THRESHOLDS)}}
            per_case.append({"case": case, "clicks": {key: [row[k] for row in result.clicks] for k, key in
                                                      enumerate(keys)}, "metrics": metrics})
        mean = {}
        for k, (key, name) in enumerate(zip(keys, self.class_names)):
            entry: dict[str, Any] = {"name": name, "Dice": [self.class_dice(r)[k] for r in range(self.rounds + 1)]}
            for m, t in zip(labels, THRESHOLDS):
                entry[m] = self.class_noc(t)[k]
                entry[m.replace("NoC", "not_reached")] = self.not_reached(k, t)
            mean[key] = entry
        foreground = {"Dice": [self.mean_dice(r) for r in range(self.rounds + 1)],
                      **{m: self.mean_noc(t) for m, t in zip(labels, THRESHOLDS)}}
        return {"rounds": self.rounds, "thresholds": list(THRESHOLDS), "protocol": _PROTOCOL,
                "metric_per_case": per_case, "mean": mean, "foreground_mean": foreground}


_PROTOCOL = ("each round: one click per class and slice where labels and truth differ, at the point farthest "
             "from the boundary of the largest error region (positive where the class is missing, negative "
             "where extra); Dice over the volume; NoC = first round reaching the threshold, the cap N if none")
_CLICKS_NOTE = ("Simulated clicks, {n} rounds: " + _PROTOCOL + ". Dice in %; NoC in rounds (clicks per class "
                "and slice).")

