"""`segment` never loses data and never drops an input without a word (issue 20).

Outputs are checked against every input of the run before anything is written; the output
folder is never searched as an input; each real folder is searched once; `--continue` redoes
outputs made by another adapter or with other options; the summary counts every input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest

import samed_adapter as sa
from samed_adapter.segment.pipeline import SamSource
from samed_adapter.testing.cli import random_scan, run, two_adapters

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return two_adapters(tmp_path_factory.mktemp("adapters"))


_scan = random_scan
CR = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033"


def _series(folder: Path, ct_series: Path) -> Path:
    shutil.copytree(ct_series, folder)
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


# --------------------------------------------------------------------------- inputs never overwritten


def test_dicom_output_never_overwrites_a_nifti_input(adapters, capsys, tmp_path, monkeypatch, ct_series):
    """`segment ct/ ct.nii.gz -o .`: both outputs would be ./ct.nii.gz, the NIfTI input itself."""
    _series(tmp_path / "ct", ct_series)
    nifti = _scan(tmp_path / "ct.nii.gz")
    before = _digest(nifti)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], "ct", "ct.nii.gz", "-o", ".")
    assert code == 1
    assert _digest(nifti) == before
    assert "ct (series" not in err and "its output ct.nii.gz would overwrite the input ct.nii.gz" in err, err
    assert "segmented 0 of 2 inputs into ., 2 failed" in out


@pytest.mark.parametrize("flag, victim", [("--overlay", "scan_overlay.png"), ("--statistics", "scan_statistics.json"),
                                          ("--split", "scan/white_matter.nii.gz")])
def test_extra_outputs_never_overwrite_inputs(adapters, capsys, tmp_path, flag, victim):
    """The per-class files, statistics and pictures of one input land on another input: refused,
    and the other inputs are still segmented."""
    _scan(tmp_path / "src" / "scan.nii.gz")
    target = tmp_path / "in" / victim
    target.parent.mkdir(parents=True, exist_ok=True)
    if victim.endswith(".png"):
        from PIL import Image

        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(target)
    elif victim.endswith(".json"):
        target.write_text('{"mine": 1}\n')
    else:
        _scan(target, seed=3)
    before = _digest(target)
    inputs = [tmp_path / "src" / "scan.nii.gz", target]
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], *inputs, "-o", tmp_path / "in", flag)
    assert _digest(target) == before
    assert f"would overwrite the input {target}" in err, err
    assert code == 1 and "failed" in out


def test_symlinked_output_onto_an_input_is_refused(adapters, capsys, tmp_path):
    """Paths are compared after following symlinks: out/b.nii.gz -> in/a.nii.gz is the input a."""
    a = _scan(tmp_path / "in" / "a.nii.gz")
    _scan(tmp_path / "in2" / "b.nii.gz", seed=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.nii.gz").symlink_to(a)
    before = _digest(a)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], a, tmp_path / "in2" / "b.nii.gz",
                       "-o", tmp_path / "out")
    assert _digest(a) == before
    assert f"would overwrite the input {a}" in err
    assert code == 1


@pytest.mark.parametrize("case", ["itself", "a link to it", "a per-class file"])
def test_segment_file_never_overwrites_its_input(adapters, tmp_path, case):
    """The one-file Python API checks its outputs against the input as `segment` does."""
    if case == "a per-class file":
        scan = _scan(tmp_path / "s" / "white_matter.nii.gz")
        output, options = tmp_path / "s.nii.gz", {"split": True}
    else:
        scan = _scan(tmp_path / "s.nii.gz")
        output, options = tmp_path / "labels.nii.gz", {}
        if case == "itself":
            output = scan
        else:
            output.symlink_to(scan)
    before = _digest(scan)
    with pytest.raises(ValueError, match="would overwrite the input .*nothing was written"):
        sa.segment_file(scan, output, sam=sa.build_sam("tiny", seed=0), adapter=adapters["a"], **options)
    assert _digest(scan) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        {"s", "white_matter.nii.gz"} if case == "a per-class file" else {"s.nii.gz", output.name})


# --------------------------------------------------------------------------- files of others never overwritten


@pytest.mark.parametrize("victim, flags", [("s0.nii.gz", []), ("s0_statistics.json", ["--statistics"])])
def test_a_file_samed_adapter_did_not_write_is_kept(adapters, capsys, tmp_path, victim, flags):
    """A radiologist's segmentation (or any file) where a planned output goes, with no record of ours
    beside it: that input fails with the file named, the file is kept byte for byte, the others are
    written; --continue does not change that, --overwrite replaces it."""
    src = [_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(2)]
    clean = tmp_path / "clean"
    assert run(capsys, "segment", *TINY, "--adapter", adapters["a"], *src, "-o", clean, *flags)[0] == 0
    out_dir = tmp_path / "out"
    manual = out_dir / victim
    out_dir.mkdir()
    manual.write_bytes(b"a manual segmentation")
    before = _digest(manual)
    for extra in ([], ["--continue"]):
        code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], *src, "-o", out_dir, *flags, *extra)
        assert code == 1 and _digest(manual) == before
        assert f"{manual} exists and samed-adapter did not write it" in err and "--overwrite" in err, err
        assert "1 failed" in out and ("1 skipped" if extra else "segmented 1 of 2 inputs") in out, out
        assert _digest(out_dir / "s1.nii.gz") == _digest(clean / "s1.nii.gz")
    results = sa.segment_files(src[:1], out_dir, sam=SamSource(backbone="tiny", seed=0), adapter=adapters["a"],
                               statistics=bool(flags))
    assert [r.status for r in results] == ["failed"] and _digest(manual) == before
    code, out, _ = run(capsys, "segment", *TINY, "--adapter", adapters["a"], *src, "-o", out_dir, *flags, "--overwrite")
    assert code == 0 and "segmented 2 of 2 inputs" in out
    assert _digest(manual) == _digest(clean / victim) != before
    code, out, _ = run(capsys, "segment", *TINY, "--adapter", adapters["b"], *src, "-o", out_dir, *flags)
    assert code == 0 and "segmented 2 of 2 inputs" in out  # now ours: a later run makes it again


def test_a_run_stopped_between_two_outputs_leaves_them_ours_and_continue_redoes_them(adapters, capsys, tmp_path):
    """The record is written pending before an input's outputs and finished after them: a run killed
    between the label file and the statistics leaves files a rerun may replace, and --continue,
    which skips only finished records, makes them again."""
    from samed_adapter.segment.outputs import claim_outputs, record_path

    src = [_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(2)]
    out_dir = tmp_path / "out"
    args = ["segment", *TINY, "--adapter", adapters["a"], *src, "-o", out_dir, "--statistics", "--continue"]
    assert run(capsys, *args)[0] == 0
    record = json.loads(record_path(out_dir / "s0.nii.gz").read_text())
    claim_outputs(out_dir / "s0.nii.gz", record)  # as a kill after the label file leaves it
    (out_dir / "s0_statistics.json").unlink()
    code, out, err = run(capsys, *args)
    assert code == 0 and "segmented 1 of 2 inputs" in out and "1 skipped" in out, err
    assert (out_dir / "s0_statistics.json").exists()
    assert "pending" not in json.loads(record_path(out_dir / "s0.nii.gz").read_text())


def test_an_input_whose_writing_fails_leaves_no_file_and_no_record(adapters, capsys, tmp_path, monkeypatch):
    import samed_adapter.segment.statistics as statistics

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(statistics, "label_statistics", broken)
    src = _scan(tmp_path / "in" / "s0.nii.gz")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], src, "-o", tmp_path / "out",
                         "--statistics")
    assert code == 1 and "disk full" in err, err
    assert sorted((tmp_path / "out").rglob("*")) == []  # hidden files included


def test_evaluate_keeps_tables_it_did_not_write(adapters, capsys, tmp_path):
    """An nnU-Net validation folder holds a summary.json of the same name and shape as ours."""
    data = tmp_path / "data"
    _scan(data / "imagesTr" / "case.nii.gz")
    labels = (np.arange(40 * 36 * 4).reshape(40, 36, 4) % 3).astype(np.uint8)
    (data / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(labels, np.diag([1.0, 1.0, 2.0, 1.0])), data / "labelsTr" / "case.nii.gz")
    out = tmp_path / "nnunet_fold0"
    out.mkdir()
    (out / "summary.json").write_text('{"foreground_mean": {"Dice": 0.91}}\n')
    before = _digest(out / "summary.json")
    args = ["evaluate", *TINY, "--adapter", adapters["a"], "--data", data, "-o", out]
    code, _, err = run(capsys, *args)
    assert code == 2 and _digest(out / "summary.json") == before
    assert f"{out / 'summary.json'} exists and samed-adapter did not write it" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert run(capsys, *args, "--overwrite")[0] == 0
    ours = json.loads((out / "summary.json").read_text())
    assert set(ours["mean"]) == {"1", "2"} and ours["foreground_mean"]["Dice"] is not None
    assert run(capsys, *args)[0] == 0  # ours now: a second evaluation replaces them


# --------------------------------------------------------------------------- what is searched


def test_output_folder_inside_the_input_is_never_searched(adapters, capsys, tmp_path):
    src = tmp_path / "in"
    for i in range(2):
        _scan(src / f"s{i}.nii.gz", seed=i)
    for _ in range(3):
        code, out, _ = run(capsys, "segment", *TINY, "--adapter", adapters["a"], src, "-o", src / "labels",
                           "--continue")
        assert code == 0
    assert _tree(src) == ["labels/s0.nii.gz", "labels/s1.nii.gz", "s0.nii.gz", "s1.nii.gz"]
    assert "segmented 0 of 2 inputs" in out and "2 skipped" in out


def test_symlink_loops_and_second_links_are_searched_once(adapters, capsys, tmp_path):
    src = tmp_path / "in"
    for i in range(3):
        _scan(src / "scans" / f"s{i}.nii.gz", seed=i)
    (src / "scans" / "loop").symlink_to(src)        # a loop back to the top
    (src / "again").symlink_to(src / "scans")       # a second name for one folder
    from samed_adapter.segment.job import find_jobs

    jobs, problems = find_jobs([src], tmp_path / "out")
    assert problems == []
    assert sorted(Path(j.source).name for j in jobs) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]


def test_unreadable_subfolder_is_reported_and_the_rest_segmented(adapters, capsys, tmp_path, monkeypatch):
    src = tmp_path / "in"
    _scan(src / "good" / "a.nii.gz")
    _scan(src / "locked" / "b.nii.gz", seed=1)
    iterdir = Path.iterdir

    def guarded(self):
        if self.name == "locked":  # root may read anything, so the refusal is simulated
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", guarded)
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], src, "-o", tmp_path / "out")
    assert code == 1
    assert f"{src / 'locked'}: cannot list this folder (Permission denied)" in err
    assert _tree(tmp_path / "out") == ["good/a.nii.gz"]
    assert "segmented 1 of 2 inputs" in out and "1 failed" in out


# --------------------------------------------------------------------------- --continue


def test_continue_redoes_outputs_made_by_another_adapter_or_classes(adapters, capsys, tmp_path):
    src = [_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(2)]
    out_dir = tmp_path / "out"
    args = ["segment", *TINY, *src, "-o", out_dir, "--continue"]
    assert run(capsys, *args[:1], "--adapter", adapters["a"], *args[1:])[0] == 0
    made_by_a = {p.name: _digest(p) for p in out_dir.glob("*.nii.gz")}

    code, out, _ = run(capsys, *args[:1], "--adapter", adapters["a"], *args[1:])
    assert "segmented 0 of 2 inputs" in out and "2 skipped" in out
    renamed = shutil.copy(adapters["a"], tmp_path / "same_adapter_other_name.safetensors")
    code, out, _ = run(capsys, *args[:1], "--adapter", renamed, *args[1:])
    assert "segmented 0 of 2 inputs" in out and "2 skipped" in out  # judged by content, not by name

    code, out, err = run(capsys, *args[:1], "--adapter", adapters["b"], *args[1:])
    assert code == 0 and "segmented 2 of 2 inputs" in out and "2 made again" in out, out
    assert err.count("made again") == 2
    made_by_b = {p.name: _digest(p) for p in out_dir.glob("*.nii.gz")}
    assert made_by_b.keys() == made_by_a.keys() and made_by_b != made_by_a

    code, out, _ = run(capsys, *args[:1], "--adapter", adapters["b"], *args[1:], "--classes", "grey matter")
    assert "segmented 2 of 2 inputs" in out and "2 made again" in out
    kept = np.asarray(nib.load(out_dir / "s0.nii.gz").dataobj)
    assert set(np.unique(kept)) <= {0, 2}


def test_classes_accept_the_names_split_gives_files(adapters, capsys, tmp_path):
    scan = _scan(tmp_path / "in" / "s.nii.gz")
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], scan, "-o", tmp_path / "out",
                       "--split", "--classes", "white_matter")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["s.nii.gz", "s/white_matter.nii.gz"]
    labels = np.asarray(nib.load(tmp_path / "out" / "s.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1}


# --------------------------------------------------------------------------- options checked first


@pytest.mark.parametrize("flags, message", [
    (["--num-parts", "0"], "--num-parts must be a positive integer, got 0"),
    (["--num-parts", "-1"], "--num-parts must be a positive integer, got -1"),
    (["--num-parts", "2", "--part-id", "2"], "--part-id must be in 0..1 for --num-parts 2, got 2"),
    (["--part-id", "1"], "--part-id must be in 0..0 for --num-parts 1, got 1"),
    (["--num-workers", "-3"], "--num-workers must be a positive integer (threads reading and writing), got -3"),
    (["--percentiles", "99,1"], "--percentiles: percentiles must be finite (lo, hi) with lo < hi inside [0, 100]"),
    (["--window", "5,3"], "--window: intensity window must be finite (lo, hi) with lo < hi, got (5.0, 3.0)"),
])
def test_bad_archive_options_refuse_the_run(adapters, capsys, tmp_path, flags, message):
    scan = _scan(tmp_path / "in" / "s.nii.gz")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], scan, "-o", tmp_path / "out", *flags)
    assert code == 2
    assert message in err and err.count("error:") == 1 and "warning" not in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- DICOM-SEG inside folders


def test_nifti_and_dicom_seg_write_what_each_input_can_have(adapters, capsys, tmp_path, ct_series):
    _series(tmp_path / "in" / "ct", ct_series)
    _scan(tmp_path / "in" / "mr.nii.gz")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], tmp_path / "in", "-o",
                         tmp_path / "out", "--output-type", "nifti,dicom-seg")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["ct.nii.gz", "ct_seg.dcm", "mr.nii.gz"]
    assert "Volume.files" not in err


def test_dicom_seg_alone_fails_the_nifti_in_a_folder_with_a_reason(adapters, capsys, tmp_path, ct_series):
    _series(tmp_path / "in" / "ct", ct_series)
    _scan(tmp_path / "in" / "mr.nii.gz")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], tmp_path / "in", "-o",
                         tmp_path / "out", "--output-type", "dicom-seg")
    assert code == 1
    assert f"{tmp_path / 'in' / 'mr.nii.gz'}: not a DICOM input, so no DICOM-SEG can reference it" in err
    assert _tree(tmp_path / "out") == ["ct_seg.dcm"]
    assert "segmented 1 of 2 inputs" in out and "1 failed" in out


# --------------------------------------------------------------------------- what is not segmented


def test_dicom_files_that_are_no_volume_slice_are_listed(adapters, capsys, tmp_path, ct_series):
    """A CT series beside CR images of pydicom's test CD (one without a suffix, as on CDs): the
    series is segmented, each CR image is named with why it is not."""
    folder = _series(tmp_path / "study", ct_series)
    shutil.copy(CR / "CR1" / "6154", folder / "6154")
    shutil.copy(next((CR / "CR2").iterdir()), folder / "cr2.dcm")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], folder, "-o", tmp_path / "out")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["study.nii.gz"]
    for name in ("6154", "cr2.dcm"):
        assert f"note: not segmented: {folder / name}: single projection image (CR)" in err, err
    assert "segmented 1 of 1 inputs" in out and "2 file(s) not segmented" in out

    only_cr = tmp_path / "cr_only"
    only_cr.mkdir()
    shutil.copy(folder / "6154", only_cr / "6154")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], only_cr, "-o", tmp_path / "out2")
    assert code == 1
    assert f"note: not segmented: {only_cr / '6154'}: single projection image (CR)" in err
    assert "1 file(s) found and left out (listed above)" in err


# --------------------------------------------------------------------------- memory


def test_slices_at_the_model_size_are_bounded_before_they_are_made(adapters, capsys, tmp_path, monkeypatch):
    """8 x 8 x 2000 voxels (128 k) are 2000 slices of 64 x 64 (8.2 M) for the model: refused
    under --max-voxels 1000000 before any slice is resized, and the other input is written."""
    from samed_adapter.inference import stages as inference

    tall = _scan(tmp_path / "in" / "tall.nii.gz", shape=(8, 8, 2000))
    fine = _scan(tmp_path / "in" / "fine.nii.gz")
    resized = []
    to_model_size = inference.to_model_size
    monkeypatch.setattr(inference, "to_model_size", lambda s, n: resized.append(s.shape) or to_model_size(s, n))
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], tall, fine, "-o", tmp_path / "out",
                         "--max-voxels", "1000000")
    assert code == 1
    assert f"{tall}: 2000 slices at the model's size 64 x 64 are 8,192,000 voxels" in err, err
    assert "over the limit of 1,000,000" in err and "--max-voxels" in err
    assert resized == [(4, 36, 40)]  # only the other input's slices were made
    assert _tree(tmp_path / "out") == ["fine.nii.gz"]


# --------------------------------------------------------------------------- progress


def test_progress_bar_on_a_terminal_and_none_otherwise(adapters, tmp_path):
    """A bar with the number of inputs when stderr is a terminal (a pty here); nothing of it in a log."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    scans = [_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(3)]
    argv = [sys.executable, "-m", "samed_adapter.cli", "segment", *TINY, "--adapter", str(adapters["a"]),
            str(tmp_path / "in")]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([*argv, "-o", str(tmp_path / "tty")], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)  # read while it runs: a full pty buffer would block the child
    seen = b""
    try:
        while chunk := os.read(master, 65536):
            seen += chunk
    except OSError:  # the child closed its end: everything is read
        pass
    os.close(master)
    assert proc.wait(timeout=300) == 0
    assert "segment: 100%" in seen.decode() and "3/3" in seen.decode()
    logged = subprocess.run([*argv, "-o", str(tmp_path / "log")], capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0 and "%|" not in logged.stderr and "segmented 3 of 3 inputs" in logged.stdout
    assert len(scans) == 3


def test_file_names_are_shown_escaped(adapters, capsys, tmp_path):
    """A file named with a terminal escape (clear screen) is shown, never obeyed."""
    scan = _scan(tmp_path / "in" / "evil\x1b[2J.nii.gz")
    broken = tmp_path / "in" / "bad\x1b]0;title\x07.nii.gz"
    broken.write_bytes(b"not a nifti")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], tmp_path / "in", "-o",
                         tmp_path / "out")
    assert code == 1
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "evil\\x1b[2J.nii.gz ->" in out and "bad\\x1b]0;title\\x07.nii.gz" in err
    assert (tmp_path / "out" / scan.name).is_file()


def test_base_mismatch_on_the_command_line_names_the_flag(adapters, capsys, tmp_path):
    scan = _scan(tmp_path / "in" / "s.nii.gz")
    code, _, err = run(capsys, "segment", "--sam-backbone", "tiny", "--random-sam-seed", "1", "--adapter",
                       adapters["a"], scan, "-o", tmp_path / "out")
    assert code == 2
    assert "--allow-base-mismatch" in err and "allow_base_mismatch=True" not in err, err
    assert "a random SAM matches an adapter made on the same backbone and seed" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- uneven DICOM series


def test_a_localizer_in_the_series_is_left_out_and_said(adapters, capsys, tmp_path):
    """pydicom's CT2: slices at z = -99.48, 103.02, 104.27, 105.52 mm. The first stands 200 mm
    apart (a localizer): the label file holds the three even slices, at their own places."""
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], CR / "CT2", "-o", tmp_path / "out")
    assert code == 0, err
    assert "left out 1 slice(s) at -99.48 mm" in err
    img = nib.load(tmp_path / "out" / "CT2.nii.gz")
    assert img.shape[2] == 3
    np.testing.assert_allclose(img.affine[2, 2:], [1.25, 103.02], atol=0.01)


def test_a_series_missing_a_slice_gets_no_lying_nifti(adapters, capsys, tmp_path, ct_series):
    """Slices at 0, 10, 15 mm (the one at 5 mm missing): no affine holds them; the NIfTI is
    refused with the positions, and a DICOM-SEG (one frame per source instance) is written."""
    folder = _series(tmp_path / "ct", ct_series)
    (folder / "a.dcm").unlink()  # the second slice
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], folder, "-o", tmp_path / "out")
    assert code == 1
    assert "--output-type dicom-seg" in err and "unevenly spaced" in err.lower(), err
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == []
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["a"], folder, "-o", tmp_path / "out",
                         "--output-type", "dicom-seg")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["ct_seg.dcm"]
    seg = pydicom.dcmread(tmp_path / "out" / "ct_seg.dcm")
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in folder.iterdir()}



def test_ctrl_c_leaves_only_complete_outputs_and_says_how_to_go_on(adapters, tmp_path):
    """SIGINT in the middle of an archive: exit 130, one line naming --continue, no traceback,
    no half-written file; --continue then does exactly the rest."""
    import signal
    import subprocess
    import sys
    import time

    for i in range(40):
        _scan(tmp_path / "in" / f"s{i:02d}.nii.gz", seed=i, shape=(64, 64, 24))
    argv = [sys.executable, "-m", "samed_adapter.cli", "segment", *TINY, "--adapter", str(adapters["a"]),
            str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*.nii.gz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command with --continue" in err
    done = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not any(".tmp" in name for name in done)
    for path in (tmp_path / "out").glob("*.nii.gz"):
        assert nib.load(path).get_fdata().shape == (64, 64, 24)  # complete files only
    written = len(list((tmp_path / "out").glob("*.nii.gz")))
    assert 0 < written < 40
    rest = subprocess.run([*argv, "--continue"], capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr
    assert f"segmented {40 - written} of 40 inputs" in rest.stdout
