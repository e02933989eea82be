"""Segmenting an archive: folders in, mirrored folders out, the pipeline, --num-parts, --continue.

Every engine must give exactly the labels of the plain one-volume-at-a-time path (`--engine
serial`). The adapter is the `trained` fixture's (conftest.py): real MRI, a tiny random SAM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samed_adapter.cli import main as cli
from samed_adapter.segment.job import find_jobs, select_part
from samed_adapter.testing.cli import run  # noqa: E402

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, trained, ct_series) -> Path:
    """6 inputs in nested folders: NIfTI (.nii.gz and .nii, several orientations) and a DICOM series."""
    root = tmp_path_factory.mktemp("archive") / "study"
    data = trained["data"] / "imagesTr"
    train, val = nib.load(data / "mni_train.nii.gz"), nib.load(data / "mni_val.nii.gz")
    (root / "site_a").mkdir(parents=True)
    (root / "site_b" / "nested").mkdir(parents=True)
    shutil.copy(data / "mni_train.nii.gz", root / "site_a" / "brain1.nii.gz")
    shutil.copy(data / "mni_val.nii.gz", root / "site_a" / "brain2.nii.gz")
    top = nib.Nifti1Image(np.asarray(train.dataobj)[:, :, 10:22], train.affine)
    nib.save(top, root / "site_b" / "brain3.nii")  # uncompressed
    flipped = np.asarray(val.dataobj)[::-1]
    affine = val.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (val.shape[0] - 1)
    affine[:3, 0] *= -1
    nib.save(nib.Nifti1Image(flipped, affine), root / "site_b" / "nested" / "brain4.nii.gz")
    small = nib.Nifti1Image(np.asarray(train.dataobj)[20:80, 30:90, :5], train.affine)
    nib.save(small, root / "brain5.nii.gz")
    shutil.copytree(ct_series, root / "site_b" / "ct_series")  # pydicom's CT slices as a 4-slice series
    (root / "README.txt").write_text("not an image")
    return root


EXPECTED = ["brain5.nii.gz", "site_a/brain1.nii.gz", "site_a/brain2.nii.gz", "site_b/brain3.nii",
            "site_b/ct_series.nii.gz", "site_b/nested/brain4.nii.gz"]


def outputs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(nib.load(p).dataobj)
            for p in sorted(folder.rglob("*.nii*")) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def reference(archive, trained, tmp_path_factory) -> dict[str, np.ndarray]:
    """The plain path: one volume after the other."""
    out = tmp_path_factory.mktemp("serial")
    assert cli.main(["segment", *TINY, "--adapter", str(trained["adapter"]), str(archive), "-o", str(out),
                     "--engine", "serial"]) == 0
    found = outputs(out)
    assert sorted(found) == EXPECTED
    return found


def test_folders_are_searched_and_mirrored(archive):
    jobs, problems = find_jobs([archive], "/out")
    assert problems == []
    assert sorted(str(j.out.relative_to("/out")) for j in jobs) == EXPECTED
    parts = [select_part(jobs, 3, i) for i in range(3)]
    assert sorted(str(j.out) for part in parts for j in part) == sorted(str(j.out) for j in jobs)
    assert all(len(p) == 2 for p in parts) and select_part(jobs[::-1], 3, 1) == parts[1]  # order-free
    with pytest.raises(ValueError, match="part-id"):
        select_part(jobs, 2, 2)


def test_pipeline_gives_the_labels_of_the_plain_path(archive, trained, reference, capsys, tmp_path):
    code, out, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], archive, "-o", tmp_path,
                         "--batch-size", "5", "--num-workers", "2")
    assert code == 0, err
    found = outputs(tmp_path)
    assert sorted(found) == EXPECTED
    for name, labels in reference.items():
        np.testing.assert_array_equal(found[name], labels, err_msg=name)
    assert any(len(np.unique(v)) == 3 for v in found.values())


def test_num_parts_split_the_archive_between_runs(archive, trained, reference, capsys, tmp_path):
    for part in ("0", "1"):
        code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], archive, "-o", tmp_path,
                           "--num-parts", "2", "--part-id", part)
        assert code == 0, err
        if part == "0":
            assert len(outputs(tmp_path)) == 3
    found = outputs(tmp_path)
    assert sorted(found) == EXPECTED
    for name, labels in reference.items():
        np.testing.assert_array_equal(found[name], labels, err_msg=name)


def test_a_corrupt_file_is_reported_and_the_others_land(archive, trained, reference, capsys, tmp_path):
    broken = tmp_path / "in"
    shutil.copytree(archive, broken)
    (broken / "site_a" / "corrupt.nii.gz").write_bytes(os.urandom(4096))
    code, out, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], broken, "-o", tmp_path / "out")
    assert code == 1
    assert "corrupt.nii.gz" in err and "error" in err
    found = outputs(tmp_path / "out")
    assert sorted(found) == EXPECTED
    for name, labels in reference.items():
        np.testing.assert_array_equal(found[name], labels, err_msg=name)
    assert "segmented 6 of 7 inputs" in out


def test_continue_after_a_killed_run_writes_only_what_is_missing(archive, trained, reference, capsys, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "samed_adapter.cli", "segment", *TINY, "--adapter", str(trained["adapter"]),
               str(archive), "-o", str(out), "--engine", "serial", "--batch-size", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(outputs(out) if out.exists() else {}) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = outputs(out) if out.exists() else {}
    if len(done) == len(EXPECTED):  # the run beat the kill: take half of its outputs away instead
        for name in EXPECTED[::2]:
            (out / name).unlink()
        done = outputs(out)
    # Nothing partial under a final name: every file there is complete and right.
    for name, labels in done.items():
        np.testing.assert_array_equal(labels, reference[name], err_msg=name)
    before = {name: (out / name).stat().st_mtime_ns for name in done}
    missing = next(name for name in EXPECTED if name not in done)
    stem, suffix = missing.rsplit("/", 1)[-1].split(".", 1)
    stale = (out / missing).parent / f".{stem}.0123456789ab.tmp.{suffix}"  # as a SIGKILL mid-write leaves it
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a file")

    code, stdout, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], archive, "-o", out,
                            "--continue")
    assert code == 0, err
    assert f"{len(done)} skipped" in stdout
    found = outputs(out)
    assert sorted(found) == EXPECTED
    for name, labels in reference.items():
        np.testing.assert_array_equal(found[name], labels, err_msg=name)
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # not rewritten
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # stale temporaries of the killed run removed


def test_ray_gives_the_labels_of_the_plain_path(archive, trained, reference, capsys, tmp_path):
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install samed-adapter[ray]")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], archive, "-o", tmp_path,
                         "--ray", "--ray-workers", "1")
    assert code == 0, err
    found = outputs(tmp_path)
    assert sorted(found) == EXPECTED
    for name, labels in reference.items():
        np.testing.assert_array_equal(found[name], labels, err_msg=name)
