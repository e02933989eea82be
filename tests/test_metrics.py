"""Tests of samed_adapter.evaluation.metrics against MedPy and against hand-computed values."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from samed_adapter.evaluation.metrics import ClassScore, dice, hd95, score_case
from samed_adapter.evaluation.summary import Summary, summarize


def blob_mask(rng: np.random.Generator, shape: tuple[int, ...], level: float = 0.55) -> np.ndarray:
    """Smooth random blobs, so surfaces look like organs rather than salt-and-pepper noise."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma=2.0)
    mask = field > np.quantile(field, level)
    assert mask.any() and not mask.all()
    return mask


def published_percase(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """calculate_metric_percase of the published SAMed test code, restated."""
    if pred.sum() > 0 and gt.sum() > 0:
        return medpy_binary.dc(pred, gt), medpy_binary.hd95(pred, gt)
    if pred.sum() > 0 and gt.sum() == 0:
        return 1, 0
    return 0, 0


SHAPES = [(40, 36), (18, 20, 16)]


# --- dice / hd95 against MedPy -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_medpy(shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, truth = blob_mask(rng, shape), blob_mask(rng, shape)
    assert dice(pred, truth) == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-6)
    assert hd95(pred, truth) == pytest.approx(medpy_binary.hd95(pred, truth), abs=1e-6)
    spacing = (0.7, 1.3, 2.5)[: len(shape)]
    expected = medpy_binary.hd95(pred, truth, voxelspacing=spacing)
    assert hd95(pred, truth, spacing=spacing) == pytest.approx(expected, abs=1e-6)
    # Anisotropy must change the result, or the spacing would not be reaching MedPy.
    assert hd95(pred, truth, spacing=spacing) != pytest.approx(hd95(pred, truth), abs=1e-6)
    # 0/1 integer masks score like bool masks.
    assert dice(pred.astype(np.uint8), truth.astype(np.int64)) == pytest.approx(dice(pred, truth), abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_salt_and_pepper_masks_match_medpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, truth = rng.random((12, 14, 10)) < 0.2, rng.random((12, 14, 10)) < 0.3
    assert dice(pred, truth) == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-6)
    assert hd95(pred, truth, spacing=2.0) == pytest.approx(medpy_binary.hd95(pred, truth, voxelspacing=2.0), abs=1e-6)


def test_single_voxel_masks() -> None:
    a = np.zeros((6, 7, 5), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[3, 4, 0] = True
    assert dice(a, a) == 1.0 and hd95(a, a) == 0.0
    assert dice(a, b) == 0.0
    assert hd95(a, b) == pytest.approx(5.0, abs=1e-6)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(52.0), abs=1e-6)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(
        medpy_binary.hd95(a, b, voxelspacing=(2.0, 1.0, 1.0)), abs=1e-6
    )


def test_identical_and_disjoint_masks() -> None:
    m = np.zeros((20, 20), bool)
    m[5:10, 5:10] = True
    assert dice(m, m) == 1.0
    assert hd95(m, m) == 0.0
    other = np.zeros_like(m)
    other[5:10, 15:18] = True
    assert dice(m, other) == 0.0
    assert hd95(m, other) == pytest.approx(medpy_binary.hd95(m, other), abs=1e-6)
    # Nearest surface points are at least 6 columns apart, farthest 12.
    assert 6.0 <= hd95(m, other) <= 12.0
    # Dice by hand: a 5x5 square shifted by 2 columns keeps 3 of its 5 columns: 2*15 / (25+25).
    shifted = np.zeros_like(m)
    shifted[5:10, 7:12] = True
    assert dice(m, shifted) == pytest.approx(2 * 15 / (25 + 25), abs=1e-12)


def test_masks_touching_the_border() -> None:
    full = np.ones((8, 9, 7), bool)
    corner = np.zeros_like(full)
    corner[:3, :3, :3] = True
    assert dice(full, corner) == pytest.approx(medpy_binary.dc(full, corner), abs=1e-6)
    assert dice(full, corner) == pytest.approx(2 * 27 / (504 + 27), abs=1e-12)
    for spacing in (None, (1.5, 0.5, 3.0)):
        expected = medpy_binary.hd95(full, corner, voxelspacing=spacing)
        assert hd95(full, corner, spacing=spacing) == pytest.approx(expected, abs=1e-6)
    assert dice(full, full) == 1.0 and hd95(full, full) == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dice(np.ones((3, 3), bool), np.ones((3, 4), bool)), "same shape"),
        (lambda: hd95(np.ones((3, 3), bool), np.ones((4, 3), bool)), "same shape"),
        (lambda: dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)), "both masks are empty"),
        (lambda: hd95(np.zeros((3, 3), bool), np.ones((3, 3), bool)), "pred is empty"),
        (lambda: hd95(np.ones((3, 3), bool), np.zeros((3, 3), bool)), "truth is empty"),
        (lambda: dice(np.full((3, 3), 2), np.ones((3, 3), int)), "values other than 0 and 1"),
        (lambda: hd95(np.ones((3, 3)), np.full((3, 3), np.nan)), "values other than 0 and 1"),
        (lambda: dice(np.array(True), np.array(True)), "at least one dimension"),
        (lambda: hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing=(1.0, 1.0, 1.0)), "one per axis"),
        (lambda: hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing=(1.0, -1.0)), "positive"),
        (lambda: hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing="x"), "spacing"),
    ],
)
def test_mask_metrics_reject_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_dice_with_one_empty_mask_is_zero() -> None:
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    assert dice(m, np.zeros_like(m)) == 0.0
    assert dice(np.zeros_like(m), m) == 0.0


# --- score_case ----------------------------------------------------------------------------------


def four_class_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 1 in both, 2 only predicted, 3 only in the truth, 4 in neither."""
    pred = np.zeros((10, 12, 8), np.int64)
    truth = np.zeros_like(pred)
    truth[2:6, 2:7, 1:5] = 1
    pred[3:7, 2:8, 1:4] = 1
    pred[8:10, 9:12, 5:8] = 2
    truth[0:2, 9:12, 6:8] = 3
    return pred, truth


def test_samed_protocol_empty_rules_and_values() -> None:
    pred, truth = four_class_case()
    scores = score_case(pred, truth, 4)
    assert len(scores) == 4
    assert scores[0].dice == pytest.approx(medpy_binary.dc(pred == 1, truth == 1), abs=1e-6)
    assert scores[0].hd95 == pytest.approx(medpy_binary.hd95(pred == 1, truth == 1), abs=1e-6)
    assert (scores[0].empty_truth, scores[0].empty_prediction) == (False, False)
    assert (scores[1].dice, scores[1].hd95) == (1.0, 0.0)  # predicted, truth empty
    assert (scores[1].empty_truth, scores[1].empty_prediction) == (True, False)
    assert (scores[2].dice, scores[2].hd95) == (0.0, 0.0)  # missed
    assert (scores[2].empty_truth, scores[2].empty_prediction) == (False, True)
    assert (scores[3].dice, scores[3].hd95) == (0.0, 0.0)  # absent from both
    assert (scores[3].empty_truth, scores[3].empty_prediction) == (True, True)
    for s, c in zip(scores, range(1, 5)):
        d, h = published_percase((pred == c).astype(np.uint8), (truth == c).astype(np.uint8))
        assert (s.dice, s.hd95) == (pytest.approx(d, abs=1e-6), pytest.approx(h, abs=1e-6))


def test_default_protocol_reports_empty_truth_separately() -> None:
    pred, truth = four_class_case()
    spacing = (0.8, 0.8, 2.5)
    scores = score_case(pred, truth, 4, protocol="default", spacing=spacing)
    assert scores[0].dice == pytest.approx(medpy_binary.dc(pred == 1, truth == 1), abs=1e-6)
    expected = medpy_binary.hd95(pred == 1, truth == 1, voxelspacing=spacing)
    assert scores[0].hd95 == pytest.approx(expected, abs=1e-6)
    assert scores[1] == ClassScore(dice=None, hd95=None, empty_truth=True, empty_prediction=False)
    assert scores[2] == ClassScore(dice=0.0, hd95=None, empty_truth=False, empty_prediction=True)
    assert scores[3] == ClassScore(dice=None, hd95=None, empty_truth=True, empty_prediction=True)
    summary = summarize({"a": scores}, ["c1", "c2", "c3", "c4"])
    assert summary.class_dice == [pytest.approx(scores[0].dice), None, 0.0, None]
    assert summary.class_hd95 == [pytest.approx(scores[0].hd95), None, None, None]
    assert summary.mean_dice == pytest.approx(scores[0].dice / 2)
    assert summary.mean_hd95 == pytest.approx(scores[0].hd95)
    assert summary.empty_truth_counts == [0, 1, 0, 1]
    assert summary.empty_prediction_counts == [0, 0, 1, 0]


def test_samed_protocol_matches_published_averaging() -> None:
    rng = np.random.default_rng(7)
    k, shape = 3, (12, 16, 16)
    cases, metric_sum = {}, np.zeros((k, 2))
    for i in range(3):
        pred = np.digitize(ndimage.gaussian_filter(rng.random(shape), 2.0), [0.47, 0.5, 0.53])
        truth = np.digitize(ndimage.gaussian_filter(rng.random(shape), 2.0), [0.47, 0.5, 0.53])
        if i == 2:
            truth[truth == 3] = 0  # one case where class 3 is absent from the truth
        cases[f"case{i}"] = score_case(pred, truth, k)
        metric_sum += np.array([published_percase(pred == c, truth == c) for c in range(1, k + 1)], dtype=float)
    published = metric_sum / len(cases)  # per class over cases, as in the published test loop
    summary = summarize(cases, ["a", "b", "c"])
    assert summary.class_dice == pytest.approx(list(published[:, 0]), abs=1e-9)
    assert summary.class_hd95 == pytest.approx(list(published[:, 1]), abs=1e-9)
    assert summary.mean_dice == pytest.approx(np.mean(published, axis=0)[0], abs=1e-9)
    assert summary.mean_hd95 == pytest.approx(np.mean(published, axis=0)[1], abs=1e-9)
    assert summary.empty_truth_counts == [0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.zeros((3, 4), int)), "resample"),
        (dict(pred_labels=np.full((3, 3), 3), truth_labels=np.zeros((3, 3), int)), "within 0..2"),
        (dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.full((3, 3), -1)), "within 0..2"),
        (dict(pred_labels=np.zeros((3, 3)), truth_labels=np.zeros((3, 3), int)), "integer label map"),
        (dict(pred_labels=np.zeros((3, 3), bool), truth_labels=np.zeros((3, 3), int)), "integer label map"),
        (dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.zeros((3, 3), int), num_classes=0), "positive int"),
        (dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.zeros((3, 3), int), protocol="nnunet"), "protocol"),
        (dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.zeros((3, 3), int), spacing=(1, 1)), "voxels"),
        (
            dict(pred_labels=np.zeros((3, 3), int), truth_labels=np.zeros((3, 3), int), protocol="default",
                 spacing=(1.0, 0.0)),
            "positive",
        ),
    ],
)
def test_score_case_rejects_bad_input(kwargs: dict, message: str) -> None:
    kwargs.setdefault("num_classes", 2)
    with pytest.raises(ValueError, match=message):
        score_case(**kwargs)


# --- summarize and its outputs -------------------------------------------------------------------


def small_summary() -> Summary:
    cases = {
        "case1": [ClassScore(0.8, 2.0, False, False), ClassScore(0.5, 10.0, False, False)],
        "case2": [ClassScore(0.6, 4.0, False, False), ClassScore(None, None, True, False)],
        "case3": [ClassScore(0.0, None, False, True), ClassScore(0.9, 1.0, False, False)],
    }
    return summarize(cases, ["liver", "spleen"])


def test_summarize_hand_computed_example() -> None:
    s = small_summary()
    # liver: Dice (0.8+0.6+0)/3, HD95 (2+4)/2; spleen: Dice (0.5+0.9)/2, HD95 (10+1)/2.
    assert s.class_dice == [pytest.approx(1.4 / 3), pytest.approx(0.7)]
    assert s.class_hd95 == [pytest.approx(3.0), pytest.approx(5.5)]
    assert s.mean_dice == pytest.approx((1.4 / 3 + 0.7) / 2)
    assert s.mean_hd95 == pytest.approx((3.0 + 5.5) / 2)
    assert s.empty_truth_counts == [0, 1]
    assert s.empty_prediction_counts == [1, 0]
    assert list(s.cases) == ["case1", "case2", "case3"]


def test_markdown_holds_the_numbers() -> None:
    md = small_summary().to_markdown()
    lines = md.splitlines()
    assert "| case1 | liver | 80.00 | 2.00 |  |" in lines
    assert "| case2 | spleen | n/a | n/a | empty truth |" in lines
    assert "| case3 | liver | 0.00 | n/a | empty prediction |" in lines
    assert "| liver | 46.67 | 3.00 | 0 | 1 |" in lines
    assert "| spleen | 70.00 | 5.50 | 1 | 0 |" in lines
    assert "| **mean** | 58.33 | 4.25 | 1 | 1 |" in lines


def test_csv_holds_the_numbers(tmp_path) -> None:
    s = small_summary()
    buf = io.StringIO()
    s.to_csv(buf)
    path = tmp_path / "scores.csv"
    s.to_csv(path)
    assert path.read_text(encoding="utf-8") == buf.getvalue()
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(rows) == 3 * 2 + 2 + 1
    by_key = {(r["case"], r["class"]): r for r in rows}
    assert float(by_key["case1", "spleen"]["dice"]) == 0.5
    assert float(by_key["case1", "spleen"]["hd95"]) == 10.0
    assert by_key["case2", "spleen"]["dice"] == "" and by_key["case2", "spleen"]["empty_truth"] == "1"
    assert by_key["case3", "liver"]["hd95"] == "" and by_key["case3", "liver"]["empty_prediction"] == "1"
    assert float(by_key["mean", "liver"]["dice"]) == pytest.approx(1.4 / 3, abs=1e-12)
    assert float(by_key["mean", "spleen"]["hd95"]) == pytest.approx(5.5, abs=1e-12)
    assert by_key["mean", "spleen"]["empty_truth"] == "1"
    assert float(by_key["mean", "all"]["dice"]) == pytest.approx((1.4 / 3 + 0.7) / 2, abs=1e-12)
    assert float(by_key["mean", "all"]["hd95"]) == pytest.approx(4.25, abs=1e-12)
    assert (by_key["mean", "all"]["empty_truth"], by_key["mean", "all"]["empty_prediction"]) == ("1", "1")


def test_summarize_class_with_no_scores_is_none_and_skipped() -> None:
    cases = {"a": [ClassScore(0.5, 3.0, False, False), ClassScore(None, None, True, True)]}
    s = summarize(cases, ["x", "y"])
    assert s.class_dice == [0.5, None] and s.class_hd95 == [3.0, None]
    assert s.mean_dice == 0.5 and s.mean_hd95 == 3.0
    assert "| y | n/a | n/a | 1 | 0 |" in s.to_markdown().splitlines()


@pytest.mark.parametrize(
    "cases, names, message",
    [
        ({}, ["x"], "non-empty dict"),
        ({"a": [ClassScore(1.0, 0.0, False, False)]}, [], "class_names is empty"),
        ({"a": [ClassScore(1.0, 0.0, False, False)]}, ["x", "y"], "ClassScore items"),
        ({"a": [(1.0, 0.0)]}, ["x"], "ClassScore items"),
        ({"a": ClassScore(1.0, 0.0, False, False)}, ["x"], "ClassScore items"),
    ],
)
def test_summarize_rejects_bad_input(cases, names, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summarize(cases, names)
