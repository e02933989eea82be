"""nnU-Net v2-shaped summary.json: voxel counts, Dice/IoU from them, our HD95, means, the file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from samed_adapter.evaluation.metrics import ClassScore, ConfusionCounts, confusion_counts, score_case
from samed_adapter.evaluation.summary import nnunet_summary, summarize

NAMES = ["liver", "spleen"]

# Three cases of 2 x 6 voxels (12), K = 2, with overlaps counted by hand below.
TRUTH = {
    "a": np.array([[[1, 1, 1, 0, 0, 2], [2, 2, 0, 0, 0, 0]]]),
    "b": np.array([[[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]]),
    "c": np.array([[[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 2, 0]]]),
}
PRED = {
    "a": np.array([[[1, 1, 0, 1, 0, 2], [2, 0, 0, 0, 0, 0]]]),
    "b": np.array([[[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]]),
    "c": np.array([[[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2, 0]]]),
}
# (TP, FP, FN, TN) per case and class, counted by hand from the arrays above.
HAND = {
    # a/liver: truth at 0,1,2; pred at 0,1,3 -> TP 2, FP 1 (3), FN 1 (2), TN 12 - 4.
    # a/spleen: truth at (0,5),(1,0),(1,1); pred at (0,5),(1,0) -> TP 2, FN 1.
    "a": [(2, 1, 1, 8), (2, 0, 1, 9)],
    # b/liver: truth empty, 2 voxels predicted; b/spleen: both empty.
    "b": [(0, 2, 0, 10), (0, 0, 0, 12)],
    # c/liver: 4 true voxels, none predicted; c/spleen: one voxel, found.
    "c": [(0, 0, 4, 8), (1, 0, 0, 11)],
}
# nnU-Net's Dice 2TP/(2TP+FP+FN) and IoU TP/(TP+FP+FN), by hand (None: both masks empty).
HAND_DICE = {"a": [4 / 6, 4 / 5], "b": [0.0, None], "c": [0.0, 1.0]}
HAND_IOU = {"a": [2 / 4, 2 / 3], "b": [0.0, None], "c": [0.0, 1.0]}


def mean_skipping_none(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def make_summary(protocol: str = "default"):
    cases = {c: score_case(PRED[c], TRUTH[c], 2, protocol=protocol) for c in TRUTH}
    counts = {c: confusion_counts(PRED[c], TRUTH[c], 2) for c in TRUTH}
    return summarize(cases, NAMES, counts=counts, protocol=protocol)


def strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in summary.json")

    return json.loads(text, parse_constant=refuse)


# --- counts --------------------------------------------------------------------------------------


def test_confusion_counts_match_the_hand_counts() -> None:
    for case, hand in HAND.items():
        counts = confusion_counts(PRED[case], TRUTH[case], 2)
        assert [(n.tp, n.fp, n.fn, n.tn) for n in counts] == hand, case
        for n, (tp, fp, fn, _tn) in zip(counts, hand):
            assert n.n_pred == tp + fp and n.n_ref == tp + fn
            assert all(type(v) is int for v in (n.tp, n.fp, n.fn, n.tn))
        assert [n.dice for n in counts] == pytest.approx(HAND_DICE[case])
        assert [n.iou for n in counts] == pytest.approx(HAND_IOU[case])


def test_confusion_counts_match_boolean_sums_on_random_volumes() -> None:
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 4, size=(5, 7, 9))
    truth = rng.integers(0, 4, size=(5, 7, 9))
    truth_before = truth.copy()
    counts = confusion_counts(pred, truth, 3)
    assert np.array_equal(truth, truth_before)  # the input is not modified
    for c, n in enumerate(counts, start=1):
        p, t = pred == c, truth == c
        assert (n.tp, n.fp, n.fn, n.tn) == (
            int(np.sum(p & t)), int(np.sum(p & ~t)), int(np.sum(~p & t)), int(np.sum(~p & ~t))
        )
        assert n.dice == pytest.approx(2 * np.sum(p & t) / (p.sum() + t.sum()))


def test_confusion_counts_dice_equals_the_protocol_dice_where_truth_is_present() -> None:
    for case in TRUTH:
        for n, s in zip(confusion_counts(PRED[case], TRUTH[case], 2), score_case(PRED[case], TRUTH[case], 2)):
            if not s.empty_truth:
                assert n.dice == pytest.approx(s.dice, abs=1e-12)


@pytest.mark.parametrize(
    "pred, truth, k, message",
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), 2, "shape"),
        (np.zeros((2, 2)), np.zeros((2, 2), int), 2, "integer label map"),
        (np.full((2, 2), 3), np.zeros((2, 2), int), 2, "within 0..2"),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), 0, "positive int"),
    ],
)
def test_confusion_counts_rejects_bad_input(pred, truth, k, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_counts(pred, truth, k)


# --- the dict ------------------------------------------------------------------------------------


def test_per_case_entries_hold_every_number() -> None:
    summary = make_summary()
    data = summary.to_nnunet_dict()
    assert [e["case"] for e in data["metric_per_case"]] == ["a", "b", "c"]
    for entry in data["metric_per_case"]:
        case = entry["case"]
        assert entry["prediction_file"] == case and entry["reference_file"] == case
        assert list(entry["metrics"]) == ["1", "2"]
        for i, key in enumerate(["1", "2"]):
            m = entry["metrics"][key]
            tp, fp, fn, tn = HAND[case][i]
            assert m["name"] == NAMES[i]
            assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (tp, fp, fn, tn)
            assert (m["n_pred"], m["n_ref"]) == (tp + fp, tp + fn)
            assert m["Dice"] == pytest.approx(HAND_DICE[case][i])
            assert m["IoU"] == pytest.approx(HAND_IOU[case][i])
            assert m["HD95"] == summary.cases[case][i].hd95
    b = data["metric_per_case"][1]["metrics"]["2"]
    assert b["Dice"] is None and b["IoU"] is None and b["HD95"] is None  # both empty
    # default protocol: HD95 defined only where both masks hold the class
    assert data["metric_per_case"][0]["metrics"]["1"]["HD95"] == pytest.approx(1.0)
    assert data["metric_per_case"][2]["metrics"]["2"]["HD95"] == 0.0
    assert data["metric_per_case"][2]["metrics"]["1"]["HD95"] is None  # empty prediction
    assert data["protocol"] == "default"
    assert data["class_names"] == {"1": "liver", "2": "spleen"}


def test_means_skip_none_and_foreground_mean_averages_the_class_means() -> None:
    summary = make_summary()
    data = summary.to_nnunet_dict()
    per_case = data["metric_per_case"]
    metrics = ["Dice", "IoU", "HD95", "FP", "TP", "FN", "TN", "n_pred", "n_ref"]
    for key, name in (("1", "liver"), ("2", "spleen")):
        assert data["mean"][key]["name"] == name
        for m in metrics:
            expected = mean_skipping_none([e["metrics"][key][m] for e in per_case])
            assert data["mean"][key][m] == pytest.approx(expected), (key, m)
    # by hand: the both-empty spleen of case b is left out of the spleen's Dice and IoU
    assert data["mean"]["1"]["Dice"] == pytest.approx((4 / 6 + 0 + 0) / 3)
    assert data["mean"]["2"]["Dice"] == pytest.approx((4 / 5 + 1) / 2)
    assert data["mean"]["1"]["IoU"] == pytest.approx((1 / 2) / 3)
    assert data["mean"]["2"]["IoU"] == pytest.approx((2 / 3 + 1) / 2)
    assert data["mean"]["1"]["TP"] == pytest.approx(2 / 3)
    assert data["mean"]["2"]["TN"] == pytest.approx((9 + 12 + 11) / 3)
    # HD95 means are the Summary's class means (the same cases are skipped)
    assert [data["mean"][k]["HD95"] for k in ("1", "2")] == pytest.approx(summary.class_hd95)
    for m in metrics:
        expected = mean_skipping_none([data["mean"][k][m] for k in ("1", "2")])
        assert data["foreground_mean"][m] == pytest.approx(expected), m
    assert data["foreground_mean"]["Dice"] == pytest.approx(((4 / 6) / 3 + 0.9) / 2)
    assert "name" not in data["foreground_mean"]


def test_a_class_never_defined_has_null_means_and_is_skipped_in_foreground_mean() -> None:
    pred = truth = np.array([[1, 1, 0, 0]])
    scores = score_case(pred, truth, 2, protocol="default")
    summary = summarize({"x": scores}, NAMES, counts={"x": confusion_counts(pred, truth, 2)})
    data = nnunet_summary(summary)
    assert data["mean"]["2"]["Dice"] is None and data["mean"]["2"]["IoU"] is None
    assert data["mean"]["2"]["HD95"] is None
    assert data["mean"]["2"]["TN"] == 4.0
    assert data["foreground_mean"]["Dice"] == 1.0  # class 1 only
    assert data["foreground_mean"]["TN"] == 3.0  # (2 + 4) / 2
    assert data["protocol"] is None  # summarize was not told


def test_samed_protocol_hd95_and_nnunet_dice() -> None:
    summary = make_summary("samed")
    data = summary.to_nnunet_dict()
    assert data["protocol"] == "samed"
    for entry in data["metric_per_case"]:
        for i, key in enumerate(["1", "2"]):
            assert entry["metrics"][key]["HD95"] == summary.cases[entry["case"]][i].hd95
            assert entry["metrics"][key]["Dice"] == pytest.approx(HAND_DICE[entry["case"]][i])
    # samed scores case b's liver (predicted, truth empty) Dice 1; nnU-Net's count-based Dice is 0
    assert summary.cases["b"][0].dice == 1.0
    assert data["metric_per_case"][1]["metrics"]["1"]["Dice"] == 0.0
    assert data["metric_per_case"][1]["metrics"]["2"]["HD95"] == 0.0  # samed: both empty -> 0


def test_explicit_counts_names_files_and_protocol() -> None:
    cases = {c: score_case(PRED[c], TRUTH[c], 2) for c in TRUTH}
    counts = {c: confusion_counts(PRED[c], TRUTH[c], 2) for c in TRUTH}
    summary = summarize(cases, NAMES)
    assert summary.counts is None
    data = nnunet_summary(
        summary, counts, ["L", "S"], protocol="default",
        prediction_files={"a": "/p/a.nii.gz"}, reference_files={"a": "/r/a.nii.gz", "c": "/r/c.nii.gz"},
    )
    assert data["class_names"] == {"1": "L", "2": "S"}
    assert data["mean"]["2"]["name"] == "S"
    assert data["protocol"] == "default"
    a, b, c = data["metric_per_case"]
    assert (a["prediction_file"], a["reference_file"]) == ("/p/a.nii.gz", "/r/a.nii.gz")
    assert (b["prediction_file"], b["reference_file"]) == ("b", "b")
    assert c["reference_file"] == "/r/c.nii.gz"
    assert a["metrics"]["1"]["TP"] == 2


def test_missing_or_mismatched_counts_are_refused(tmp_path) -> None:
    cases = {c: score_case(PRED[c], TRUTH[c], 2) for c in TRUTH}
    summary = summarize(cases, NAMES)
    with pytest.raises(ValueError, match="no voxel counts"):
        summary.to_json(tmp_path / "summary.json")
    assert not (tmp_path / "summary.json").exists()
    counts = {c: confusion_counts(PRED[c], TRUTH[c], 2) for c in TRUTH}
    with pytest.raises(ValueError, match="exactly the scored cases"):
        summarize(cases, NAMES, counts={"a": counts["a"]})
    with pytest.raises(ValueError, match="ConfusionCounts items"):
        summarize(cases, NAMES, counts={**counts, "a": counts["a"][:1]})
    with pytest.raises(ValueError, match="ConfusionCounts items"):
        summarize(cases, NAMES, counts={**counts, "a": [(2, 1, 1, 8), (2, 0, 1, 9)]})
    with pytest.raises(ValueError, match="protocol"):
        summarize(cases, NAMES, protocol="nnunet")
    with pytest.raises(ValueError, match="class_names has 1"):
        nnunet_summary(summary, counts, ["only"])


def test_confusion_counts_dice_iou_none_only_when_both_empty() -> None:
    assert ConfusionCounts(tp=0, fp=0, fn=0, tn=5).dice is None
    assert ConfusionCounts(tp=0, fp=0, fn=0, tn=5).iou is None
    assert ConfusionCounts(tp=0, fp=1, fn=0, tn=5).dice == 0.0
    assert ConfusionCounts(tp=3, fp=1, fn=2, tn=5).iou == 0.5


# --- the file ------------------------------------------------------------------------------------


def test_to_json_writes_strict_json_with_nulls(tmp_path) -> None:
    summary = make_summary()
    path = summary.to_json(tmp_path / "out" / "summary.json")
    assert path == tmp_path / "out" / "summary.json"
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = strict_loads(text)
    assert data == json.loads(json.dumps(summary.to_nnunet_dict()))
    assert set(data) == {"metric_per_case", "mean", "foreground_mean", "class_names", "protocol"}
    assert data["metric_per_case"][1]["metrics"]["2"]["Dice"] is None
    assert data["metric_per_case"][0]["metrics"]["1"]["TP"] == 2
    assert data["class_names"] == {"1": "liver", "2": "spleen"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]  # no temporaries left
    # a second write replaces the file
    summarize_samed = make_summary("samed")
    summarize_samed.to_json(path)
    assert strict_loads(path.read_text(encoding="utf-8"))["protocol"] == "samed"


def test_non_finite_hd95_becomes_null(tmp_path) -> None:
    pred = truth = np.array([[1, 0]])
    cases = {"x": [ClassScore(1.0, float("nan"), False, False)]}
    summary = summarize(cases, ["c"], counts={"x": confusion_counts(pred, truth, 1)})
    data = strict_loads(summary.to_json(tmp_path / "s.json").read_text())
    assert data["metric_per_case"][0]["metrics"]["1"]["HD95"] is None
    assert data["mean"]["1"]["HD95"] is None and data["foreground_mean"]["HD95"] is None


# --- end to end through evaluate() ---------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated():
    import samed_adapter as sa
    from samed_adapter.evaluation.evaluate import evaluate
    from samed_adapter.testing import random_adapter

    config = sa.AdapterConfig(num_classes=2, image_size=64, class_names=NAMES, intensity_window=(0.0, 1.0))
    adapter = random_adapter(sa.build_sam("tiny", seed=0), config, seed=1, scale=0.5)
    model = sa.patch(sa.build_sam("tiny", seed=0), adapter)
    rng = np.random.default_rng(0)
    volumes = []
    for i in range(2):
        image = rng.random((3, 40, 48)).astype(np.float32)
        label = np.zeros((3, 40, 48), dtype=np.int64)
        label[:, 5:25, 8:30] = 1
        if i == 0:
            label[:, 28:36, 30:44] = 2  # case1 has no spleen
        image[label == 1] = image[label == 1] * 0.3 + 0.7
        volumes.append({"image": image, "label": label, "case": f"case{i}", "spacing": (2.0, 0.8, 0.8)})
    results = {p: evaluate(model, volumes, protocol=p) for p in ("default", "samed")}
    return volumes, results


@pytest.mark.parametrize("protocol", ["default", "samed"])
def test_evaluate_records_counts_and_writes_summary_json(evaluated, protocol: str, tmp_path) -> None:
    volumes, results = evaluated
    summary, predictions = results[protocol]
    assert summary.protocol == protocol
    assert summary.counts is not None and list(summary.counts) == ["case0", "case1"]
    data = strict_loads(summary.to_json(tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert data["protocol"] == protocol
    assert data["class_names"] == {"1": "liver", "2": "spleen"}
    seen_predicted = False
    for entry, volume in zip(data["metric_per_case"], volumes):
        case = volume["case"]
        assert entry["case"] == case
        pred, truth = predictions[case], volume["label"]
        for i, key in enumerate(["1", "2"]):
            m = entry["metrics"][key]
            p, t = pred == i + 1, truth == i + 1
            assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (
                int(np.sum(p & t)), int(np.sum(p & ~t)), int(np.sum(~p & t)), int(np.sum(~p & ~t))
            )
            assert (m["n_pred"], m["n_ref"]) == (int(p.sum()), int(t.sum()))
            seen_predicted |= bool(p.any())
            score = summary.cases[case][i]
            assert m["HD95"] == score.hd95
            if t.any():  # the protocol's Dice and nnU-Net's agree wherever the truth holds the class
                assert m["Dice"] == pytest.approx(score.dice, abs=1e-12)
            elif p.any():
                assert m["Dice"] == 0.0 and score.dice == (None if protocol == "default" else 1.0)
            else:
                assert m["Dice"] is None and score.dice == (None if protocol == "default" else 0.0)
    assert seen_predicted  # the random model predicts some foreground, so the counts are not trivial
    for key in ("1", "2"):
        dices = [e["metrics"][key]["Dice"] for e in data["metric_per_case"]]
        assert data["mean"][key]["Dice"] == pytest.approx(mean_skipping_none(dices))
    assert [data["mean"][k]["HD95"] for k in ("1", "2")] == pytest.approx(summary.class_hd95)
    if protocol == "default":  # no predicted-but-absent class scored apart: class Dice means agree
        truth_has = [[bool((v["label"] == c).any()) for v in volumes] for c in (1, 2)]
        for i, key in enumerate(["1", "2"]):
            dices = [e["metrics"][key]["Dice"] for e, has in zip(data["metric_per_case"], truth_has[i]) if has]
            assert summary.class_dice[i] == pytest.approx(mean_skipping_none(dices))
