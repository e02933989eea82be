"""What clicks do to the quick start's held-out Dice, against an oracle, and with propagation.

Run the quick start first (`python examples/quickstart.py`, which trains a click adapter on the
random tiny SAM of seed 0); then, on its held-out case, with the protocol of `evaluate --clicks`
(each round one click per class and slice where labels and truth differ, at the point farthest
inside the largest error region):
  learned    the adapter's refinement (what `evaluate --clicks` reports),
  oracle     the clicked error region (8-connected, the one the protocol clicks in) set to the
             truth exactly: what a click that fixes "its whole region" could reach at best,
and one round of clicks on every fourth slice only, with `propagate` = 0, 1, 2 (each refined
mask carried to its neighbours as their mask prompt).

    python benchmarks/bench_click_quality.py [--out runs/quickstart] [--rounds 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

import samed_adapter as sa
from samed_adapter.cli.demo import MNI_PERCENTILES
from samed_adapter.interactive.protocol import next_click, round_clicks
from samed_adapter.io import read_image
from samed_adapter.training import NiftiVolumes
from samed_adapter.volume.geometry import axis_codes

EIGHT = np.ones((3, 3), bool)


def mean_dice(labels: np.ndarray, truth: np.ndarray, classes: range) -> float:
    scores = []
    for c in classes:
        a, b = labels == c, truth == c
        scores.append(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return 100 * float(np.mean(scores))


def oracle_round(labels: np.ndarray, truth: np.ndarray, classes: range) -> np.ndarray:
    """One protocol round where each click sets its whole error region to the truth."""
    labels = labels.copy()
    for c in classes:
        for d in range(labels.shape[0]):
            click = next_click(labels[d] == c, truth[d] == c)
            if click is None:
                continue
            row, col, positive = click
            error = (truth[d] == c) & (labels[d] != c) if positive else (labels[d] == c) & (truth[d] != c)
            regions, _ = ndimage.label(error, EIGHT)
            region = regions == regions[row, col]
            labels[d][region] = c if positive else truth[d][region]
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="the quick start's output folder")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    model = sa.patch(sa.build_sam("tiny", seed=0), out / "mni_brain.safetensors")
    root = out / "data"
    orientation = axis_codes(read_image(root / "imagesTr" / "mni_train.nii.gz").affine)
    case = NiftiVolumes(root, ["mni_val"], window=None, percentiles=MNI_PERCENTILES, orientation=orientation,
                        slice_axis=2)[0]
    classes = range(1, model.config.num_classes + 1)
    session = model.interactive(case["image"], preprocessed=True)
    truth = session.to_slices(case["label"].astype(np.int64))
    start = mean_dice(session.slice_labels, truth, classes)
    learned, oracle = [start], [start]
    oracle_labels = session.automatic.copy()
    for _ in range(args.rounds):
        session.refine(round_clicks(session.slice_labels, truth, len(classes)))
        learned.append(mean_dice(session.slice_labels, truth, classes))
        oracle_labels = oracle_round(oracle_labels, truth, classes)
        oracle.append(mean_dice(oracle_labels, truth, classes))
    print(f"quick start held-out case ({out}), mean Dice % after r rounds of clicks per class and slice")
    print("| r | learned | oracle (clicked region fixed exactly) |")
    print("|---|---|---|")
    for r, (a, b) in enumerate(zip(learned, oracle)):
        print(f"| {r} | {a:.2f} | {b:.2f} |")
    print("\none round of clicks on every fourth slice (1, 5, 9, ...), with propagation")
    print("| propagate | mean Dice % | slices changed |")
    print("|---|---|---|")
    for propagate in (0, 1, 2):
        session = model.interactive(case["image"], preprocessed=True, propagate=propagate)
        clicks = [c for c in round_clicks(session.slice_labels, truth, len(classes)) if c.slice % 4 == 1]
        session.refine(clicks)
        changed = len(set(np.argwhere(session.slice_labels != session.automatic)[:, 0].tolist()))
        print(f"| {propagate} | {mean_dice(session.slice_labels, truth, classes):.2f} (from {learned[0]:.2f}) "
              f"| {changed} |")


if __name__ == "__main__":
    main()
