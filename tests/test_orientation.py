"""One geometry everywhere, end to end on real MRI (MNI152 from nilearn) through the command line.

An adapter is trained with `samed-adapter train` on a NIfTI folder whose two cases are stored in
different orientations (the `trained` fixture of conftest.py); `segment`, `evaluate` and the Python API must then cut exactly the
training slices from any stored orientation and put the labels back on each input's own grid.
"""

from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.cli import main as cli
from samed_adapter.cli.demo import MNI_PERCENTILES, build_mni_task
from samed_adapter.evaluation.evaluate import evaluate
from samed_adapter.volume.geometry import axis_codes
from samed_adapter.io import read_image
from samed_adapter.evaluation.metrics import dice
from samed_adapter.training import NiftiSlices, NiftiVolumes, SynapseSlices
from samed_adapter.training.data import SYNAPSE_LABEL_MAP
from samed_adapter.testing.cli import run

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]  # the SAM the `trained` fixture used


# The same scan stored five ways: (name, axis permutation, flips, writer).
WAYS = [
    ("as_is", (0, 1, 2), (False, False, False)),
    ("x_flipped", (0, 1, 2), (True, False, False)),
    ("xy_flipped", (0, 1, 2), (True, True, False)),
    ("kij", (2, 0, 1), (False, False, False)),
    ("itk_lps", (0, 1, 2), (True, True, False)),
]


def test_train_records_orientation_and_preprocessing(trained):
    config = sa.Adapter.load(trained["adapter"]).config
    assert config.orientation == ("R", "A", "S")  # the first case's own
    assert config.slice_axis == 2
    assert config.intensity_window is None and config.intensity_percentiles == MNI_PERCENTILES
    first = json.loads((trained["run"] / "log.jsonl").read_text().splitlines()[0])
    assert first["adapter"]["orientation"] == ["R", "A", "S"]


def test_train_then_segment_gives_the_labels_evaluate_scored(trained, capsys, tmp_path):
    data, adapter = trained["data"], trained["adapter"]
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, *images, "-o", tmp_path / "labels")
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", *TINY, "--adapter", adapter, "--data", data, "-o", tmp_path / "eval")
    assert code == 0, err
    rows = {(r["case"], r["class"]): r for r in csv.DictReader(open(tmp_path / "eval" / "evaluation.csv"))}
    nnunet = json.loads((tmp_path / "eval" / "summary.json").read_text())
    per_case = {entry["case"]: entry["metrics"] for entry in nnunet["metric_per_case"]}

    model = sa.patch(sa.build_sam("tiny", seed=0), adapter)
    config = model.config
    volumes = NiftiVolumes(data, window=None, percentiles=config.intensity_percentiles,
                           orientation=config.orientation, slice_axis=config.slice_axis)
    _, predictions = evaluate(model, volumes)
    for case in volumes.cases:
        written = nib.load(tmp_path / "labels" / f"{case}.nii.gz")
        labels = np.asarray(written.dataobj)
        np.testing.assert_array_equal(labels, volumes.to_stored(case, predictions[case]), err_msg=case)
        truth = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj)
        assert len(np.unique(labels)) == 3  # a trained model: both tissues found
        for c, name in ((1, "grey matter"), (2, "white matter")):
            assert float(rows[(case, name)]["dice"]) == pytest.approx(dice(labels == c, truth == c), abs=1e-12)
            assert per_case[case][str(c)]["Dice"] == pytest.approx(dice(labels == c, truth == c), abs=1e-12)
            assert per_case[case][str(c)]["TP"] == int(((labels == c) & (truth == c)).sum())
        assert dice(labels > 0, truth > 0) > 0.6


def test_every_storage_of_a_scan_gives_the_same_labels_in_world_space(trained, store_scan, capsys, tmp_path):
    source = nib.load(trained["data"] / "imagesTr" / "mni_train.nii.gz")
    scans = tmp_path / "scans"
    scans.mkdir()
    paths = [store_scan(scans / f"{name}.nii.gz", source, perm, flips, itk=name == "itk_lps")
             for name, perm, flips in WAYS]
    assert len({axis_codes(nib.load(p).affine) for p in paths}) == 4  # itk_lps shares xy_flipped's codes
    code, out, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], *paths, "-o", tmp_path / "out")
    assert code == 0, err

    model = sa.patch(sa.build_sam("tiny", seed=0), trained["adapter"])
    reference = None
    for path in paths:
        original = nib.load(path)
        written = nib.load(tmp_path / "out" / path.name)
        python = model.segment(path)  # the Python API gives the same image
        assert isinstance(python, nib.Nifti1Image)
        np.testing.assert_array_equal(np.asarray(python.dataobj), np.asarray(written.dataobj))
        # Each output lies on its own input's grid, with its header's geometry.
        assert written.shape == original.shape
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        assert int(written.header["qform_code"]) == int(original.header["qform_code"])
        assert int(written.header["sform_code"]) == int(original.header["sform_code"])
        # In world space (all reoriented to RAS by nibabel) every copy is the same.
        world = np.asarray(nib.as_closest_canonical(written).dataobj)
        if reference is None:
            reference = world
            assert len(np.unique(world)) == 3
        np.testing.assert_array_equal(world, reference, err_msg=path.name)


def test_a_bare_array_is_taken_as_the_model_slices(trained):
    model = sa.patch(sa.build_sam("tiny", seed=0), trained["adapter"])
    volume = read_image(trained["data"] / "imagesTr" / "mni_train.nii.gz")  # stored RAS, as trained
    np.testing.assert_array_equal(model.segment(volume.array), model.segment(volume))


def test_quickstart_adapter_on_the_raw_scan_through_segment_gives_its_dice(capsys, tmp_path):
    out = tmp_path / "qs"
    code, stdout, err = run(capsys, "quickstart", "--out", out, "--epochs", "6", "--image-size", "128")
    assert code == 0, err
    reported = {m[0]: float(m[1]) for m in re.findall(r"Dice (grey matter|white matter)\s+([\d.]+) %", stdout)}
    raw = out / "data" / "imagesTr" / "mni_val.nii.gz"
    assert np.asarray(nib.load(raw).dataobj).max() > 200  # raw 0..255 intensities, not [0, 1]
    code, _, err = run(capsys, "segment", *TINY, "--adapter", out / "mni_brain.safetensors", raw,
                       "-o", tmp_path / "seg")
    assert code == 0, err
    labels = np.asarray(nib.load(tmp_path / "seg" / "mni_val.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, np.asarray(nib.load(out / "labels" / "mni_val.nii.gz").dataobj))
    truth = np.asarray(nib.load(out / "data" / "labelsTr" / "mni_val.nii.gz").dataobj)
    for c, name in ((1, "grey matter"), (2, "white matter")):
        assert 100 * dice(labels == c, truth == c) == pytest.approx(reported[name], abs=0.006)


def test_raw_synapse_nifti_gives_the_slices_of_the_published_preprocessing(tmp_path):
    """train --format nifti --label-map synapse on raw files == --format synapse on their npz."""
    rng = np.random.default_rng(0)
    raw = rng.integers(-1024, 1500, size=(24, 20, 5)).astype(np.int16)  # (i, j, k) HU
    labels = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13], size=raw.shape).astype(np.uint8)
    affine = np.diag([-0.7, -0.7, 3.0, 1.0])
    root = tmp_path / "raw"
    for folder, array in (("imagesTr", raw), ("labelsTr", labels)):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, affine), root / folder / "img0001.nii.gz")

    # The preprocessing in wide use: clip, scale, transpose (i, j, k) -> (k, j, i), one npz per slice.
    pre = tmp_path / "pre"
    (pre / "train_npz").mkdir(parents=True)
    (pre / "lists_Synapse").mkdir()
    image = (np.clip(nib.load(root / "imagesTr" / "img0001.nii.gz").get_fdata(), -125, 275) + 125) / 400
    label = np.zeros_like(labels)
    for source, target in SYNAPSE_LABEL_MAP.items():
        label[labels == source] = target
    image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)
    names = []
    for k in range(image.shape[0]):
        names.append(f"case0001_slice{k:03d}")
        np.savez(pre / "train_npz" / f"{names[-1]}.npz", image=image[k].astype(np.float32), label=label[k])
    (pre / "lists_Synapse" / "train.txt").write_text("\n".join(names) + "\n")

    from samed_adapter.cli.train import _datasets, _preprocessing, add_arguments

    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    nifti_args = parser.parse_args(["--data", str(root), "--format", "nifti", "--label-map", "synapse", "-o", "x"])
    nifti, _, orientation = _datasets(nifti_args, *_preprocessing(nifti_args))
    synapse_args = parser.parse_args(["--data", str(pre), "--format", "synapse", "-o", "x"])
    synapse, _, _ = _datasets(synapse_args, *_preprocessing(synapse_args))
    assert isinstance(nifti, NiftiSlices) and isinstance(synapse, SynapseSlices)
    assert orientation == ("L", "P", "S") and _preprocessing(synapse_args) == ((-125.0, 275.0), None)
    assert len(nifti) == len(synapse) == 5
    for k in range(5):
        a, b = nifti[k], synapse[k]
        assert a["image"].shape == b["image"].shape == (20, 24)
        np.testing.assert_allclose(a["image"], b["image"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a["label"], b["label"])


# --------------------------------------------------------------------------- papercuts


def test_train_refuses_zero_classes_and_writes_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", tmp_path / "mni", "--format", "mni", "--num-classes", "0",
                       *TINY, "-o", tmp_path / "run")
    assert code == 2 and "num_classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "mni").exists()


def test_train_warns_when_the_window_flattens_the_data(capsys, tmp_path):
    data = build_mni_task(tmp_path / "mni")
    for folder in ("imagesTr",):  # MR scaled to [0, 1], trained under the default CT window
        for path in (data / folder).glob("*.nii.gz"):
            img = nib.load(path)
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj) / 255.0, img.affine), path)
    code, _, err = run(capsys, "train", "--data", data, "--num-classes", "2", *TINY, "--image-size", "64",
                       "--batch-size", "40", "--max-epochs", "1", "--stop-epoch", "1", "--no-progress",
                       "-o", tmp_path / "run")
    assert code == 0
    assert "leaves almost no contrast" in err and "--percentiles" in err


def test_too_many_labels_name_the_flag_and_leave_no_log(capsys, tmp_path):
    data = build_mni_task(tmp_path / "mni")
    path = data / "labelsTr" / "mni_train.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) * 5).astype(np.uint8), img.affine), path)  # labels 0, 5, 10
    code, _, err = run(capsys, "train", "--data", data, "--num-classes", "2", "--window", "none",
                       "--percentiles", "1,99", *TINY, "--image-size", "64", "--batch-size", "40",
                       "--max-epochs", "1", "--stop-epoch", "1", "--no-progress", "-o", tmp_path / "run")
    assert code == 2 and "--label-map synapse" in err and "--num-classes" in err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_quickstart_checks_the_sam_file_before_writing(capsys, tmp_path):
    code, _, err = run(capsys, "quickstart", "--sam", tmp_path / "missing.pth", "--out", tmp_path / "qs")
    assert code == 2 and "missing.pth" in err
    assert not (tmp_path / "qs").exists()


def test_segment_help_example_uses_files_that_exist_after_the_quick_start(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = capsys.readouterr().out
    assert "tiny.safetensors" not in text
    assert "runs/quickstart/mni_brain.safetensors" in text and "samed-adapter quickstart" in text


def test_random_sam_warning_says_whether_the_adapter_was_trained_on_it(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_train.nii.gz"
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "a")
    assert code == 0 and "trained on this very SAM" in err and "meaningless" not in err
    code, _, err = run(capsys, "segment", "--sam-backbone", "tiny", "--random-sam-seed", "1",
                       "--allow-base-mismatch", "--adapter", trained["adapter"], scan, "-o", tmp_path / "b")
    assert code == 0 and "meaningless" in err


def test_segment_window_and_percentile_overrides(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_train.nii.gz"
    model = sa.patch(sa.build_sam("tiny", seed=0), trained["adapter"])
    volume = read_image(scan)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "w",
                       "--window", "0,120")
    assert code == 0, err
    expected = volume.to_voxels(model.segment(volume, window=(0.0, 120.0)))
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "w" / scan.name).dataobj), expected)
    assert not np.array_equal(expected, volume.to_voxels(model.segment(volume)))
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "p",
                       "--window", "0,1", "--percentiles", "1,99")
    assert code == 2 and "exclude each other" in err


def test_convert_records_an_orientation_on_an_existing_adapter(trained, capsys, tmp_path):
    code, out, err = run(capsys, "convert", trained["adapter"], tmp_path / "lps.safetensors", "--orientation", "LPS")
    assert code == 0, err
    before, after = sa.Adapter.load(trained["adapter"]), sa.Adapter.load(tmp_path / "lps.safetensors")
    assert after.config.orientation == ("L", "P", "S")
    assert after.config.intensity_percentiles == before.config.intensity_percentiles
    assert all(torch.equal(after.tensors[k], v) for k, v in before.tensors.items())
    code, out, err = run(capsys, "info", tmp_path / "lps.safetensors")
    assert "LPS: volumes reoriented to LPS" in out and "percentiles 0.5,99.5" in out
