"""`evaluate --clicks N` on the tiny random SAM with a click adapter: round 0 is what plain
evaluate scores, each round is the protocol's clicks through one `session.refine`, and the
Markdown, CSV and JSON tables hold the same N + 1 rounds and NoC values; an adapter without
clicks is refused before any work."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import samed_adapter as sa
from samed_adapter.cli import evaluate as evaluate_command
from samed_adapter.evaluation.clicks import THRESHOLDS, click_case, noc
from samed_adapter.evaluation.evaluate import evaluate
from samed_adapter.evaluation.metrics import dice
from samed_adapter.interactive import SliceClick, round_clicks
from samed_adapter.testing import random_adapter
from samed_adapter.testing.cli import run
from samed_adapter.testing.tiny import CONFIGS, stock_sam

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
K = CONFIGS["clicks"].num_classes
ROUNDS = 3


@pytest.fixture(scope="module")
def adapter() -> sa.Adapter:
    return random_adapter(stock_sam(), CONFIGS["clicks"], seed=1)


@pytest.fixture(scope="module")
def model(adapter):
    return sa.patch(stock_sam(), adapter)


def _case(name: str, seed: int, classes=(1, 2, 3)) -> dict:
    """(3, 40, 48) noise in [0, 1] and a blob per class on every slice (none of the others)."""
    rng = np.random.default_rng(seed)
    image = rng.random((3, 40, 48)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.int64)
    for c in classes:
        top, left = rng.integers(2, 24), rng.integers(2, 30)
        label[:, top : top + 12, left : left + 14] = c
        image[label == c] = 0.25 * c + 0.1 * image[label == c]
    return {"image": image, "label": label, "case": name, "spacing": np.ones(3)}


CASES = [_case("a", 0), _case("b", 1, classes=(1, 2))]  # b has no class 3: unscored there


@pytest.fixture(scope="module")
def runs(model):
    return evaluate(model, CASES), evaluate(model, CASES, clicks=ROUNDS)


def test_round_zero_is_what_plain_evaluate_scores(runs):
    (plain, plain_pred), (clicked, clicked_pred) = runs
    for case in ("a", "b"):
        np.testing.assert_array_equal(clicked_pred[case], plain_pred[case])  # the session's labels are segment's
        assert clicked.clicks.cases[case].dice[0] == [s.dice for s in plain.cases[case]]
    assert clicked.cases == plain.cases and clicked.class_dice == plain.class_dice
    assert clicked.clicks.class_dice(0) == plain.class_dice and clicked.clicks.mean_dice(0) == plain.mean_dice
    assert plain.clicks is None


def test_rounds_are_scored_and_noc_follows_the_dice_rows(runs):
    clicks = runs[1][0].clicks
    for case, result in clicks.cases.items():
        assert len(result.dice) == ROUNDS + 1 and len(result.clicks) == ROUNDS
        for k in range(K):
            rows = [row[k] for row in result.dice]
            if case == "b" and k == 2:  # class 3 absent from b's truth: unscored in every round
                assert rows == [None] * (ROUNDS + 1) and noc(rows, 0.85) is None
                continue
            assert all(0.0 <= d <= 1.0 for d in rows)
            for t in THRESHOLDS:
                n = noc(rows, t)
                reached = [r for r, d in enumerate(rows) if d >= t]
                assert n == (reached[0] if reached else ROUNDS) and 0 <= n <= ROUNDS
    assert sum(clicks.cases["a"].clicks[0]) > 0  # a random adapter is wrong somewhere: round 1 clicks
    assert clicks.cases["a"].dice[1] != clicks.cases["a"].dice[0]


def test_one_round_forces_every_clicked_pixel_and_leaves_unclicked_slices(model):
    case = CASES[0]
    session = model.interactive(case["image"], preprocessed=True)
    truth = session.to_slices(case["label"])
    before = session.slice_labels.copy()
    clicks = round_clicks(before, truth, K)
    assert clicks and all((before[c.slice, c.row, c.col] == c.label) != c.positive for c in clicks)
    session.refine(clicks)
    after = session.slice_labels
    for c in clicks:
        assert (after[c.slice, c.row, c.col] == c.label) == c.positive, c
    clicked = {c.slice for c in clicks}
    for d in range(before.shape[0]):
        if d not in clicked:
            np.testing.assert_array_equal(after[d], before[d])
    # click_case's round 1 is this very round, scored as metrics.dice scores it.
    result = click_case(model.interactive(case["image"], preprocessed=True), case["label"], 1)
    assert result.dice[1] == pytest.approx([dice(after == c, truth == c) for c in range(1, K + 1)], abs=1e-12)
    assert result.clicks[0] == [sum(c.label == k for c in clicks) for k in range(1, K + 1)]


def test_a_refinement_keeps_the_other_classes_clicks(model, monkeypatch):
    """Whatever the decoder returns, no refinement takes another class's positive click or hands
    a pixel back to a class clicked negative there (the decoder is replaced by fixed masks)."""
    session = model.interactive(CASES[0]["image"], preprocessed=True)
    auto = session.automatic[0]
    present = next(c for c in range(1, K + 1) if (auto == c).any())
    other = 1 if present != 1 else 2
    row, col = (int(v) for v in np.argwhere(auto == present)[0])
    wanted: dict[int, bool] = {}
    monkeypatch.setattr(session, "_decode", lambda pairs, prompts=None: [
        np.full(auto.shape, wanted[c]) for _, c in pairs])
    wanted.update({present: False})
    session.refine([SliceClick(present, 0, row, col, False)])  # the class leaves (row, col)
    wanted.update({other: True})
    session.refine([SliceClick(other, 0, 0, 0, True)])  # another takes the whole slice
    assert session.slice_labels[0, row, col] == other
    wanted.update({other: False})
    session.refine([SliceClick(other, 0, 1, 1, False)])  # and leaves it: (row, col) is not given back
    assert session.slice_labels[0, row, col] == 0
    third = next(c for c in range(1, K + 1) if c not in (present, other))
    wanted.update({third: True, other: True})
    session.refine([SliceClick(other, 0, 5, 5, True), SliceClick(third, 0, 9, 9, True)])
    labels = session.slice_labels[0]
    # The third class takes the slice but the other's positive clicks, (0, 0) and (5, 5).
    assert labels[5, 5] == other and labels[0, 0] == other and labels[9, 9] == third
    assert labels[row, col] == third and (labels == third).sum() == labels.size - 2


def test_click_case_refuses_a_used_session_and_bad_rounds(model):
    session = model.interactive(CASES[0]["image"], preprocessed=True)
    with pytest.raises(ValueError, match="rounds"):
        click_case(session, CASES[0]["label"], -1)
    session.click(1, (0, 5, 5))
    with pytest.raises(ValueError, match="already holds clicks"):
        click_case(session, CASES[0]["label"], 1)
    with pytest.raises(ValueError, match="default protocol"):
        evaluate(model, CASES, protocol="samed", clicks=1)


# --------------------------------------------------------------------------- the command line


def _write_data(root):
    """CASES as a NIfTI folder, the slice axis last (the adapter's slice_axis, 2)."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in CASES:
        for folder, data in (("imagesTr", case["image"]), ("labelsTr", case["label"].astype(np.uint8))):
            nib.save(nib.Nifti1Image(np.moveaxis(data, 0, -1), np.eye(4)), root / folder / f"{case['case']}.nii.gz")


def test_evaluate_clicks_writes_the_same_rounds_to_markdown_csv_and_json(adapter, capsys, tmp_path):
    _write_data(tmp_path / "data")
    adapter.save(tmp_path / "clicks.safetensors")
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "evaluate", *TINY, "--adapter", tmp_path / "clicks.safetensors",
                            "--data", tmp_path / "data", "--clicks", ROUNDS, "-o", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    table = summary["clicks"]
    assert table["rounds"] == ROUNDS and summary["protocol"] == "default"
    rows = list(csv.DictReader(open(out / "clicks.csv")))
    plain = {(r["case"], r["class"]): r["dice"] for r in csv.DictReader(open(out / "evaluation.csv"))}
    names = [summary["class_names"][str(k)] for k in range(1, K + 1)]
    for entry in table["metric_per_case"]:
        for key, metrics in entry["metrics"].items():
            name, dices = metrics["name"], metrics["Dice"]
            written = [r for r in rows if (r["case"], r["class"]) == (entry["case"], name)]
            assert [int(r["round"]) for r in written] == list(range(ROUNDS + 1))
            assert [float(r["dice"]) if r["dice"] else None for r in written] == dices
            assert [int(r["clicks"]) for r in written] == [0] + entry["clicks"][key]
            assert plain[(entry["case"], name)] == written[0]["dice"]  # round 0 is evaluate's own Dice
            assert all(d is None or 0.0 <= d <= 1.0 for d in dices)
            for t in THRESHOLDS:
                assert metrics[f"NoC@{round(100 * t)}"] == noc(dices, t)
    means = table["foreground_mean"]
    assert len(means["Dice"]) == ROUNDS + 1 and means["Dice"][0] == pytest.approx(summary["foreground_mean"]["Dice"])
    markdown = (out / "evaluation.md").read_text()
    mean_row = next(line for line in markdown.splitlines() if line.startswith("| **mean** |") and "NoC" not in line
                    and line.count("|") == ROUNDS + 5)
    assert mean_row == ("| **mean** | " + " | ".join(f"{100 * d:.2f}" for d in means["Dice"]) + " | "
                        + " | ".join(f"{means[m]:.2f}" for m in ("NoC@85", "NoC@90")) + " |")
    for name in names:
        class_row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |")
                         and line.count("|") == ROUNDS + 5)
        key = str(names.index(name) + 1)
        assert f"{100 * table['mean'][key]['Dice'][ROUNDS]:.2f}" in class_row
    assert "clicks.csv" in stdout

    # Again without --clicks: the folder's tables are all this run's, no stale clicks.csv beside them.
    code, _, err = run(capsys, "evaluate", *TINY, "--adapter", tmp_path / "clicks.safetensors",
                       "--data", tmp_path / "data", "-o", out)
    assert code == 0, err
    assert not (out / "clicks.csv").exists() and "clicks" not in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("options, message", [
    (["--clicks", "2"], "trained without clicks"),
    (["--clicks", "-1"], "--clicks"),
    (["--clicks", "2", "--protocol", "samed"], "drop --protocol samed"),
])
def test_evaluate_clicks_refusals_come_before_any_work_and_change_nothing(capsys, tmp_path, monkeypatch,
                                                                         options, message):
    monkeypatch.setattr(evaluate_command, "segment_sam", None)  # building a SAM would fail the test
    plain = random_adapter(stock_sam(), CONFIGS["k3"], seed=1).save(tmp_path / "plain.safetensors")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.md").write_text("last week's results")
    code, _, err = run(capsys, "evaluate", *TINY, "--adapter", plain, "--data", tmp_path, "-o", out,
                       "--overwrite", *options)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    if message == "trained without clicks":
        assert "train --clicks" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.md"]
    assert (out / "evaluation.md").read_text() == "last week's results"
