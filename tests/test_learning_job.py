"""Learning jobs (issue 32): a new adapter version from a datastore's final labels, served only if better.

Real data: slabs of nilearn's MNI152 T1 with its grey/white-matter labels (the quick start's), in
a folder datastore; a parent adapter trained for a few epochs on the quick start's training slab
with a tiny random SAM at 128. Most jobs run on the local engine (the same worker function in this
process); one runs on Ray Train's TorchTrainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import Adapter
from samed_adapter.cli.demo import MNI_CLASS_NAMES, MNI_PERCENTILES, build_mni_task, mni_volumes
from samed_adapter.datastore import (DatastoreChangedError, EmptyDatastoreError, FolderDatastore, LabelClassError)
from samed_adapter.evaluation.evaluate import evaluate
from samed_adapter.learning.job import (JobOptions, LearningJob, LearningJobError, ParentMissingError,
                                        TooFewItemsError)
from samed_adapter.learning.versions import VersionStore
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.training.data import NiftiVolumes, adapter_data_options
from samed_adapter.training.loop import TrainConfig, train

SLABS = {f"case_{i}": (z, z + 6) for i, z in enumerate(range(26, 56, 6))}  # five slabs with brain in them
SAM = SamSource(backbone="tiny", seed=0)
FAST = dict(epochs=2, batch_size=8, warmup_iters=2, engine="local")


def slab(array: np.ndarray, affine: np.ndarray, z: tuple[int, int]) -> nib.Nifti1Image:
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0, 0, z[0]]) + affine[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(array[:, :, z[0]:z[1]]), moved)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """<id>.nii.gz images and <id>_label.nii.gz labels of the slabs, outside any datastore."""
    image, labels, affine = mni_volumes()
    root = tmp_path_factory.mktemp("sources")
    for case, z in SLABS.items():
        nib.save(slab(image, affine, z), root / f"{case}.nii.gz")
        nib.save(slab(labels, affine, z), root / f"{case}_label.nii.gz")
    bad = labels.copy()
    bad[bad == 2] = 3  # a class the 2-class adapter lacks
    nib.save(slab(bad, affine, SLABS["case_0"]), root / "case_0_class3.nii.gz")
    corrected = labels.copy()
    corrected[corrected == 2] = 1  # the same grid, other labels: a correction saved again
    nib.save(slab(corrected, affine, SLABS["case_1"]), root / "case_1_corrected.nii.gz")
    return root


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A 2-class adapter trained 3 epochs on the quick start's training slab (a weak start)."""
    from samed_adapter.training import NiftiSlices

    root = tmp_path_factory.mktemp("parent")
    data = build_mni_task(root / "data")
    config = sa.AdapterConfig(num_classes=2, image_size=128, class_names=list(MNI_CLASS_NAMES),
                              intensity_window=None, intensity_percentiles=MNI_PERCENTILES, slice_axis=2)
    torch.manual_seed(0)
    model = sa.inject(SAM.build(), config)
    slices = NiftiSlices(data, ["mni_train"], window=None, percentiles=MNI_PERCENTILES)
    train(model, slices, TrainConfig(output_dir=str(root / "run"), batch_size=8, max_epochs=3, stop_epoch=3,
                                     warmup_iters=5, progress=False))
    return model.adapter().save(root / "brain.safetensors")


def datastore(root: Path, sources: Path, finals=tuple(SLABS)) -> FolderDatastore:
    ds = FolderDatastore(root / "ds")
    for case in SLABS:
        ds.add_image(case, sources / f"{case}.nii.gz")
    for case in finals:
        ds.save_label(case, sources / f"{case}_label.nii.gz", "final")
    return ds


def holdout_dice(adapter_path: Path, ds: FolderDatastore, ids: list[str]) -> float:
    """Mean Dice (percent) of an adapter file on a fresh SAM over the datastore images ``ids``."""
    adapter = Adapter.load(adapter_path)
    volumes = NiftiVolumes.from_pairs([(i, ds.image_path(i), ds.label_path(i)) for i in ids],
                                      **adapter_data_options(adapter.config))
    summary, _ = evaluate(sa.patch(SAM.build(), adapter), [volumes[k] for k in range(len(volumes))])
    return 100.0 * summary.mean_dice


def versions_state(store: VersionStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*"))
            if p.is_file() and ".jobs" not in p.parts}


@pytest.fixture
def ray_session():
    """A local Ray for the job's TorchTrainer, shut down after if this test started it."""
    import logging

    pytest.importorskip("ray.train", reason="Ray Train is not installed: pip install 'samed-adapter[serve]'")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


def test_a_job_on_ray_records_a_better_version_with_its_figures_and_lineage(tmp_path, sources, parent, ray_session):
    ds = datastore(tmp_path, sources)
    store = VersionStore(tmp_path / "versions")
    # Two workers: DistributedDataParallel on the process group Ray Train sets up (gloo on CPUs).
    options = JobOptions(**{**FAST, "engine": "ray", "workers": 2, "cpus": 0.5})
    job = LearningJob(ds, store, "brain", SAM, options, catalog_file=parent)
    result = job.run()

    assert [v.version for v in store.versions("brain")] == [1, 2]
    made = store.get("brain", 2)
    assert made.parent == 1 and result.version == made
    # One of five held out (0.2), chosen by the seed, never among the items trained on.
    trained = [i["image"] for i in made.items]
    assert len(made.holdout) == 1 and set(made.holdout).isdisjoint(trained)
    assert sorted(trained + made.holdout) == sorted(SLABS)
    assert all(i["label_checksum"] == ds.get_label_info(i["image"], "final")["checksum"] for i in made.items)
    # The figures are what the two files score on the held-out image through segment's path.
    dice = made.figures["holdout_dice"]
    assert dice["current"] == pytest.approx(holdout_dice(parent, ds, made.holdout), abs=1e-6)
    assert dice["new"] == pytest.approx(holdout_dice(made.path, ds, made.holdout), abs=1e-6)
    assert made.serving == (dice["new"] >= dice["current"]) == result.serving
    lineage = Adapter.load(made.path).lineage
    assert lineage["parent"] == 1 and lineage["holdout"] == made.holdout
    assert [i["image"] for i in lineage["items"]] == trained and lineage["datastore"] == str(ds.root)
    # Progress while it ran: each epoch's loss and held-out Dice, the last one the new version's.
    state = job.state.to_dict()
    assert state["status"] == "DONE" and [p["epoch"] for p in state["progress"]] == [1, 2]
    assert all(p["loss"] > 0 for p in state["progress"])
    assert state["progress"][-1]["holdout_dice"] == pytest.approx(dice["new"], abs=1e-6)
    assert state["result"]["version"] == 2 and state["result"]["serving"] == made.serving
    assert list((store.root / ".jobs" / "brain").iterdir()) == []  # its training folder went with it


def test_a_worse_version_is_kept_but_not_served(tmp_path, sources, parent):
    ds = datastore(tmp_path, sources)
    store = VersionStore(tmp_path / "versions")
    # Threshold -100: the new version must beat the current one by 100 Dice points, which none does.
    result = LearningJob(ds, store, "brain", SAM, JobOptions(**FAST, threshold=-100.0), catalog_file=parent).run()
    assert not result.serving and store.serving("brain").version == 1
    kept = store.get("brain", 2)
    assert not kept.serving and kept.path.is_file() and kept.figures["threshold"] == -100.0
    assert kept.figures["holdout_dice"]["new"] is not None
    assert store.serving("brain").path.read_bytes() == parent.read_bytes()


def test_an_item_changed_during_training_records_no_version(tmp_path, sources, parent):
    ds = datastore(tmp_path, sources)
    store = VersionStore(tmp_path / "versions")
    job = LearningJob(ds, store, "brain", SAM, JobOptions(**FAST), catalog_file=parent)
    report = job.state.epoch

    def relabel_after_first_epoch(record):
        report(record)
        if record["epoch"] == 1 and "val_mean_dice" not in record:  # a radiologist saves a label again
            ds.save_label("case_1", sources / "case_1_corrected.nii.gz", "final")
    job.state.epoch = relabel_after_first_epoch
    with pytest.raises(DatastoreChangedError, match="case_1 \\(label changed\\)"):
        job.run()
    assert store.versions("brain") == [] and job.state.to_dict()["status"] == "ERROR"
    assert "case_1" in job.state.to_dict()["error"]


def test_a_stopped_job_changes_nothing(tmp_path, sources, parent):
    ds = datastore(tmp_path, sources)
    store = VersionStore(tmp_path / "versions")
    store.adopt("brain", parent)
    before = versions_state(store)
    job = LearningJob(ds, store, "brain", SAM, JobOptions(**{**FAST, "epochs": 4}), catalog_file=parent)
    report = job.state.epoch

    def stop_after_first_epoch(record):
        report(record)
        job.stop()
    job.state.epoch = stop_after_first_epoch
    result = job.run()
    assert result.stopped and result.version is None
    state = job.state.to_dict()
    assert state["status"] == "STOPPED" and [p["epoch"] for p in state["progress"]] == [1]
    assert versions_state(store) == before
    assert not any((store.root / ".jobs" / "brain").iterdir())  # its training folder went with it


KILLED_JOB = """
import sys
from samed_adapter.datastore import FolderDatastore
from samed_adapter.learning.job import JobOptions, LearningJob
from samed_adapter.learning.versions import VersionStore
from samed_adapter.segment.pipeline import SamSource
ds, versions, parent = sys.argv[1:]
job = LearningJob(FolderDatastore(ds), VersionStore(versions), "brain", SamSource(backbone="tiny", seed=0),
                  JobOptions(epochs=500, batch_size=8, warmup_iters=2, engine="local"), catalog_file=parent)
job.run()
"""


def test_a_job_killed_half_way_changes_nothing_and_the_next_removes_what_it_left(tmp_path, sources, parent,
                                                                                  monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    from samed_adapter.learning import job as job_module

    ds = datastore(tmp_path, sources)
    store = VersionStore(tmp_path / "versions")
    store.adopt("brain", parent)
    before = versions_state(store)
    jobs = store.root / ".jobs" / "brain"
    child = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(ds.root), str(store.root), str(parent)])
    try:
        deadline = time.monotonic() + 120
        while not list(jobs.glob("*/train/log.jsonl")):  # training, its first steps logged
            assert child.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (left,) = list(jobs.iterdir())
    assert versions_state(store) == before  # the serving version and the store untouched
    running = job_module.claim_folder(jobs / "running-now")  # a live job's folder: its lock held
    monkeypatch.setattr(job_module, "UNLOCKED_GRACE_S", 0.0)
    again = LearningJob(ds, store, "brain", SAM, JobOptions(**FAST), catalog_file=parent).run()
    assert again.version.version == 2 and again.version.parent == 1
    assert not left.exists() and (jobs / "running-now").is_dir()  # the killed job's files went, the live one's stay
    os.close(running)


def test_refused_jobs_say_why_in_one_line_and_write_nothing(tmp_path, sources, parent):
    store = VersionStore(tmp_path / "versions")
    empty = FolderDatastore(tmp_path / "empty")
    cases = [
        (empty, EmptyDatastoreError, "none of its 0 images has a final label", parent),
        (datastore(tmp_path / "one", sources, finals=["case_0"]), TooFewItemsError, "needs at least 2", parent),
        (datastore(tmp_path / "two", sources, finals=["case_1", "case_2"]), ParentMissingError,
         "has no version to start from", tmp_path / "gone.safetensors"),
    ]
    for ds, error, words, catalog_file in cases:
        with pytest.raises(error, match=words) as caught:
            LearningJob(ds, store, "brain", SAM, JobOptions(**FAST), catalog_file=catalog_file).run()
        assert "\n" not in str(caught.value)
    # A label whose classes the adapter lacks (saved without the adapter's check).
    ds = datastore(tmp_path / "bad", sources, finals=["case_1", "case_2"])
    ds.save_label("case_0", sources / "case_0_class3.nii.gz", "final")
    with pytest.raises(LabelClassError, match="image 'case_0'.*class ids 3"):
        LearningJob(ds, store, "brain", SAM, JobOptions(**FAST), catalog_file=parent).run()
    assert not store.root.exists() or versions_state(store) == {}


@pytest.mark.parametrize("options, words", [
    (dict(holdout=0.0), "holdout must be a fraction"), (dict(holdout=1.0), "holdout must be a fraction"),
    (dict(epochs=0), "epochs must be"), (dict(threshold=float("nan")), "threshold must be a finite"),
    (dict(device="tpu"), "device must be cpu or cuda"), (dict(engine="local", workers=2), "one worker"),
])
def test_job_options_are_checked(options, words):
    with pytest.raises(LearningJobError, match=words):
        JobOptions(**options)


def test_options_from_monai_label_params():
    options = JobOptions.from_params({"max_epochs": 3, "holdout": 0.5, "client_id": "slicer", "engine": "local"})
    assert (options.epochs, options.holdout, options.engine) == (3, 0.5, "ray")
    assert json.dumps(JobOptions.from_params({}, epochs=7).epochs) == "7"


def test_the_command_line_makes_a_version_and_says_both_figures(tmp_path, sources, parent, capsys):
    from samed_adapter.cli.main import main

    ds = datastore(tmp_path, sources)
    flags = ["train", "--datastore", str(ds.root), "--from", "brain", "--adapter", f"brain={parent}",
             "--sam-backbone", "tiny", "--random-sam-seed", "0", "--engine", "local", "--max-epochs", "1",
             "--batch-size", "8", "--warmup-iters", "2", "--device", "cpu", "--threshold", "-100"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    made = VersionStore(ds.root / "versions").get("brain", 2)
    dice = made.figures["holdout_dice"]
    assert f"current (version 1) {dice['current']:.2f} %, new {dice['new']:.2f} %" in out
    assert "brain@2 is kept but does not serve" in out and not made.serving and made.figures["epochs"] == 1
    # Refusals: one line, nothing recorded.
    assert main(["train", "--datastore", str(ds.root), "--from", "brain", "--adapter", f"brain={parent}",
                 "--data", "x", "--sam-backbone", "tiny", "--random-sam-seed", "0"]) == 2
    assert main(["train", "--datastore", str(ds.root), "--from", "liver", "--adapter", f"brain={parent}",
                 "--sam-backbone", "tiny", "--random-sam-seed", "0", "--engine", "local"]) == 2
    err = capsys.readouterr().err
    assert "--data do not apply" in err and "--from liver: no adapter named 'liver'" in err
    assert [v.version for v in VersionStore(ds.root / "versions").versions("brain")] == [1, 2]


def test_the_command_line_on_ray_takes_paths_relative_to_where_it_runs(tmp_path, sources, parent, ray_session,
                                                                      monkeypatch, capsys):
    """Ray Train's workers run in another working folder: the relative --adapter and --datastore
    paths a user types reach them as files (the adapter file was not found there)."""
    import shutil

    from samed_adapter.cli.main import main

    datastore(tmp_path, sources)
    shutil.copy(parent, tmp_path / "brain.safetensors")
    monkeypatch.chdir(tmp_path)
    flags = ["train", "--datastore", "ds", "--from", "brain", "--adapter", "brain=brain.safetensors",
             "--versions", "versions", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--engine", "ray",
             "--max-epochs", "1", "--batch-size", "8", "--warmup-iters", "2", "--device", "cpu"]
    assert main(flags) == 0, capsys.readouterr().err
    made = VersionStore(tmp_path / "versions").get("brain", 2)
    assert made.parent == 1 and made.path.is_file() and "held-out mean Dice" in capsys.readouterr().out



def test_the_progress_reads_each_log_line_once_and_hands_on_only_changed_epochs(tmp_path):
    """Rank 0 reports epochs from log.jsonl after every epoch: a line is parsed once (the read goes
    on from where it stopped; a line still being written waits), and an epoch is handed on again
    only when it changed (its validation Dice comes after its loss)."""
    import json

    from samed_adapter.training.ray_job import _LogRecords

    log = tmp_path / "log.jsonl"
    records = _LogRecords(log, per_epoch=2, validated=True)
    assert records.changed(upto=1) == [{"epoch": 1}]  # no log yet
    with open(log, "w") as f:
        f.write("\n".join(json.dumps({"iter": i, "loss": float(i)}) for i in (1, 2)) + "\n")
        f.write('{"iter": 3, "lo')  # half a line
    assert records.changed(upto=1) == [{"epoch": 1, "loss": 1.5}]
    assert records.changed(upto=1) == []  # nothing new
    with open(log, "a") as f:
        f.write('ss": 5.0}\n' + json.dumps({"epoch": 1, "val_mean_dice": 0.5}) + "\n"
                + json.dumps({"iter": 4, "loss": 7.0}) + "\n")
    assert records.changed(upto=2) == [{"epoch": 1, "loss": 1.5, "val_mean_dice": 0.5}, {"epoch": 2, "loss": 6.0}]
    assert records.offset == log.stat().st_size
