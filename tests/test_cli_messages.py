"""Issue 20, the commands around `segment`: nothing overwritten, options checked before any work,
names shown rather than obeyed, and each message worded for the interface the user is in.

Every command runs through `cli.main`, as in test_cli.py; no network (conftest's `offline_cache`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.cli import evaluate as evaluate_command
from samed_adapter.cli import main as cli
from samed_adapter.cli import quickstart
from samed_adapter.adapter_file.adapter import AdapterMismatchError, BaseMismatchError
from samed_adapter.io.printable import printable
from samed_adapter.testing import random_adapter, same_tensors
from samed_adapter.testing.hub import lay_out_cache
from samed_adapter.testing.cli import run

pytestmark = pytest.mark.usefixtures("offline_cache")

HOSTILE = ["liver\x1b[2J\x1b]0;pwned\x07", "kid\u202eyen"]  # clears the screen, retitles, reverses


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters on build_sam("tiny", seed=0) (one with hostile class names, one claiming a SAM 2
    backbone, one made on another SAM), that SAM's checkpoint and a scan."""
    root = tmp_path_factory.mktemp("messages")
    sam = sa.build_sam("tiny", seed=0)
    adapter = random_adapter(sam, sa.AdapterConfig(num_classes=2, image_size=64), seed=1)
    hostile = random_adapter(sam, sa.AdapterConfig(num_classes=2, image_size=64, class_names=HOSTILE), seed=1)
    sam2 = sa.Adapter(dataclasses.replace(adapter.config, backbone="sam2.1_hiera_t"), adapter.tensors,
                      adapter.base_fingerprint)
    other = random_adapter(sa.build_sam("tiny", seed=5), sa.AdapterConfig(num_classes=2, image_size=64), seed=1)
    torch.save(sam.state_dict(), root / "sam_tiny.pth")
    nib.save(nib.Nifti1Image(np.arange(16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3), np.eye(4)),
             root / "scan.nii.gz")
    return {"adapter": adapter.save(root / "tiny.safetensors"), "hostile": hostile.save(root / "hostile.safetensors"),
            "sam2": sam2.save(root / "sam2.safetensors"), "other": other.save(root / "other.safetensors"),
            "sam": root / "sam_tiny.pth", "scan": root / "scan.nii.gz"}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samed-adapter "), err
    return lines[0]


# --------------------------------------------------------------------------- printable


@pytest.mark.parametrize("text, shown", [
    ("liver", "liver"),
    ("foie gras é 肝臓", "foie gras é 肝臓"),  # letters of any script are kept
    ("a\x1b[2Jb", "a\\x1b[2Jb"),
    ("bell\x07 nul\x00 del\x7f", "bell\\x07 nul\\x00 del\\x7f"),
    ("two\nlines\ttab\rcr", "two\\nlines\\ttab\\rcr"),
    ("c1 \x9b31m \x85", "c1 \\x9b31m \\x85"),
    ("evil\u202eexe.txt", "evil\\u202eexe.txt"),
    ("\u2066iso\u2069 \u200fmark \u2028sep", "\\u2066iso\\u2069 \\u200fmark \\u2028sep"),
])
def test_printable_escapes_what_a_terminal_would_obey(text, shown):
    assert printable(text) == shown


def test_printable_takes_paths():
    assert printable(Path("out") / "a\x1bb.nii.gz") == "out/a\\x1bb.nii.gz"


# --------------------------------------------------------------------------- info


def test_info_shows_escape_sequences_in_class_names_escaped(capsys, files):
    code, out, err = run(capsys, "info", files["hostile"])
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "liver\\x1b[2J\\x1b]0;pwned\\x07" in out and "kid\\u202eyen" in out
    assert sa.Adapter.load(files["hostile"]).config.class_names == HOSTILE  # shown escaped, stored as given


def test_file_names_in_error_messages_are_escaped(capsys, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "a\x1b[2Jb.safetensors")
    assert code == 2 and "\x1b" not in err and "a\\x1b[2Jb.safetensors" in one_error_line(err)


# --------------------------------------------------------------------------- convert


def test_convert_never_replaces_a_file_that_is_not_an_adapter(capsys, files, tmp_path):
    scan = shutil.copy(files["scan"], tmp_path / "scan.nii.gz")
    before = Path(scan).read_bytes()
    code, _, err = run(capsys, "convert", files["adapter"], scan)
    assert code == 2 and "must be an adapter file ending in .safetensors" in one_error_line(err)
    assert Path(scan).read_bytes() == before

    notes = tmp_path / "notes.safetensors"  # the right suffix, but no adapter
    notes.write_text("my notes")
    code, _, err = run(capsys, "convert", files["adapter"], notes)
    assert code == 2 and "is not an adapter file" in one_error_line(err) and "--overwrite" in err
    assert notes.read_text() == "my notes"
    code, _, err = run(capsys, "convert", files["adapter"], notes, "--overwrite")
    assert code == 0, err
    assert same_tensors(sa.Adapter.load(notes), sa.Adapter.load(files["adapter"]))

    again = shutil.copy(files["adapter"], tmp_path / "again.safetensors")  # an adapter is replaced as before
    code, _, err = run(capsys, "convert", files["hostile"], again)
    assert code == 0, err
    assert sa.Adapter.load(again).config.class_names == HOSTILE


def test_convert_output_is_never_its_input(capsys, files, tmp_path):
    adapter = Path(shutil.copy(files["adapter"], tmp_path / "a.safetensors"))
    (tmp_path / "link.safetensors").symlink_to(adapter)
    before = adapter.read_bytes()
    for output in (adapter, tmp_path / "." / "a.safetensors", tmp_path / "link.safetensors"):
        code, _, err = run(capsys, "convert", adapter, output, "--orientation", "LPS", "--overwrite")
        assert code == 2 and "is the input" in one_error_line(err)
    assert adapter.read_bytes() == before


def test_convert_refuses_a_missing_folder_before_any_work(capsys, files, tmp_path):
    code, _, err = run(capsys, "convert", files["adapter"], tmp_path / "missing" / "a.safetensors")
    assert code == 2 and "does not exist" in one_error_line(err)
    assert not (tmp_path / "missing").exists()


def test_convert_says_which_recorded_settings_it_replaces(capsys, files, tmp_path):
    lps, ras = tmp_path / "lps.safetensors", tmp_path / "ras.safetensors"
    code, out, err = run(capsys, "convert", files["adapter"], lps, "--orientation", "LPS")
    assert code == 0, err
    assert "orientation: not recorded -> LPS" in out.splitlines()
    code, out, err = run(capsys, "convert", lps, ras, "--orientation", "RAS", "--window", "0,100")
    assert code == 0, err
    assert "orientation: LPS -> RAS" in out.splitlines() and "intensity_window: -125,275 -> 0,100" in out.splitlines()
    assert sa.Adapter.load(ras).config.orientation == ("R", "A", "S")
    code, out, _ = run(capsys, "convert", ras, tmp_path / "same.safetensors", "--orientation", "RAS")
    assert code == 0 and "orientation" not in out  # nothing replaced, nothing said


# --------------------------------------------------------------------------- pull -o


@pytest.fixture
def cached(files, offline_cache) -> bytes:
    data = files["adapter"].read_bytes()
    lay_out_cache(offline_cache, "org/tiny", {"adapter.safetensors": data})
    return data


def test_pull_to_a_missing_folder_with_a_slash_makes_the_folder(capsys, tmp_path, cached):
    code, out, err = run(capsys, "pull", "org/tiny", "-o", f"{tmp_path / 'missing_dir'}/")
    assert code == 0, err
    assert (tmp_path / "missing_dir").is_dir()
    assert (tmp_path / "missing_dir" / "tiny.safetensors").read_bytes() == cached
    code, _, err = run(capsys, "pull", "org/tiny", "-o", tmp_path / "missing_dir")  # existing: a folder too
    assert code == 0 and (tmp_path / "missing_dir").is_dir(), err


def test_pull_into_a_folder_keeps_a_file_there_that_is_no_adapter(capsys, tmp_path, cached):
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "tiny.safetensors").write_text("my notes")
    code, _, err = run(capsys, "pull", "org/tiny", "-o", f"{folder}/")
    assert code == 2 and "is not an adapter file" in one_error_line(err)
    assert (folder / "tiny.safetensors").read_text() == "my notes"
    code, _, err = run(capsys, "pull", "org/tiny", "-o", folder, "--overwrite")
    assert code == 0 and (folder / "tiny.safetensors").read_bytes() == cached, err


def test_pull_to_a_file_needs_its_folder_and_a_safetensors_name(capsys, tmp_path, cached):
    code, _, err = run(capsys, "pull", "org/tiny", "-o", tmp_path / "nowhere" / "a.safetensors")
    assert code == 2 and "does not exist" in one_error_line(err) and not (tmp_path / "nowhere").exists()
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"a scan")
    code, _, err = run(capsys, "pull", "org/tiny", "-o", scan)
    assert code == 2 and ".safetensors" in one_error_line(err) and scan.read_bytes() == b"a scan"
    code, _, err = run(capsys, "pull", "org/tiny", "-o", tmp_path / "a.safetensors")
    assert code == 0 and (tmp_path / "a.safetensors").read_bytes() == cached, err


# --------------------------------------------------------------------------- evaluate: options first


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if a SAM is built: each error below must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a SAM was built before the options were checked")

    monkeypatch.setattr(evaluate_command, "segment_sam", refuse)


@pytest.mark.parametrize("options, message", [
    (["--percentiles", "99,1"], "--percentiles"),
    (["--percentiles", "0,200"], "--percentiles"),
    (["--window", "5,5"], "--window"),
    (["--window", "0,1", "--percentiles", "1,99"], "exclude each other"),
    (["--format", "synapse", "--window", "0,1"], "--format nifti"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "meta"], "--device meta"),
])
def test_evaluate_checks_its_options_before_any_work(capsys, files, tmp_path, no_model_work, options, message):
    code, _, err = run(capsys, "evaluate", "--sam", files["sam"], "--adapter", files["adapter"], "--data", tmp_path,
                       "-o", tmp_path / "eval", *options)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_an_output_that_is_a_file_before_any_work(capsys, files, tmp_path, no_model_work):
    taken = tmp_path / "results.md"
    taken.write_text("last week's results")
    code, _, err = run(capsys, "evaluate", "--sam", files["sam"], "--adapter", files["adapter"], "--data", tmp_path,
                       "-o", taken)
    assert code == 2 and "is a file" in one_error_line(err)
    assert taken.read_text() == "last week's results"


# --------------------------------------------------------------------------- --device


@pytest.mark.parametrize("device, message", [
    ("meta", "models do not run on 'meta' devices"),
    ("nonsense", "is not a torch device"),
    ("cuda:99", "cuda"),
])
def test_device_that_runs_nothing_is_one_line(capsys, files, tmp_path, device, message):
    for command in (["segment", "--sam", files["sam"], "--adapter", files["adapter"], files["scan"], "-o",
                     tmp_path / "out"],
                    ["evaluate", "--sam", files["sam"], "--adapter", files["adapter"], "--data", tmp_path]):
        code, _, err = run(capsys, *command, "--device", device)
        line = one_error_line(err)
        assert code == 2 and f"--device {device}" in line and message in line.lower()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- messages for the interface in use


def test_a_base_mismatch_names_the_keyword_in_python_and_the_flag_on_the_command_line(capsys, files, tmp_path):
    with pytest.raises(BaseMismatchError) as info:
        sa.patch(sa.build_sam("tiny", seed=0), files["other"])
    assert "allow_base_mismatch=True" in str(info.value) and "--allow-base-mismatch" not in str(info.value)
    code, _, err = run(capsys, "evaluate", "--sam", files["sam"], "--adapter", files["other"], "--data", tmp_path,
                       "-o", tmp_path / "eval")
    line = one_error_line(err)
    assert code == 2 and "--allow-base-mismatch" in line and "allow_base_mismatch=True" not in line


def test_a_sam2_adapter_on_a_tiny_sam_names_the_flags_on_the_command_line(capsys, files, tmp_path):
    with pytest.raises(AdapterMismatchError) as info:
        sa.patch(sa.build_sam("tiny", seed=0), files["sam2"])
    assert "build_sam2" in str(info.value)  # Python: the call that builds it
    for sam in (["--sam", files["sam"]], ["--sam-backbone", "tiny", "--random-sam-seed", "0"]):
        code, _, err = run(capsys, "evaluate", *sam, "--adapter", files["sam2"], "--data", tmp_path)
        line = one_error_line(err)  # no warning about random weights it cannot use first
        assert code == 2 and "build_sam2" not in line
        assert "--sam-backbone sam2.1_hiera_t" in line and "--sam2-config sam2.1_hiera_t" in line
        assert "sam2.1_hiera_tiny.pt" in line


def test_the_sam2_quick_start_suggests_a_sam2_checkpoint():
    assert "--sam sam2.1_hiera_tiny.pt" in quickstart.random_sam_note("sam2.1_hiera_t", 0)
    assert "sam_vit_b_01ec64.pth" not in quickstart.random_sam_note("sam2.1_hiera_t", 0)
    assert "--sam sam_vit_b_01ec64.pth" in quickstart.random_sam_note("tiny", 0)


# --------------------------------------------------------------------------- --help


def test_the_top_level_help_ends_with_examples(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    examples = out[out.index("examples:"):]
    for command in ("quickstart", "convert", "info", "segment", "pull"):
        assert f"samed-adapter {command} " in examples


def test_the_quick_start_help_has_no_dangling_text(capsys):
    for parse in (lambda: quickstart.main(["--help"]), lambda: cli.main(["quickstart", "--help"])):
        with pytest.raises(SystemExit):
            parse()
        out = capsys.readouterr().out
        assert "(no downloads):" not in out and "example" in out
        description = out.split("\n\n")[1]
        assert description.rstrip().endswith(".")
