"""Papercuts a new user hit: a non-checkpoint file given as the stock SAM, adapter files that
ignored the umask, a mismatch message that named a SAM segment_anything cannot build, and
words of `segment` that were not true (issue 28: a complex NIfTI, Ctrl-C, a left-out localizer).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import samed_adapter as sa
from samed_adapter.testing.cli import run
from samed_adapter.hosts.backbones import backbone_for_state_dict, build_hint
from samed_adapter.adapter_file.checkpoints import UnsafeCheckpointError, load_state_dict_file
from samed_adapter.io.files import atomic_path
from samed_adapter.testing import random_adapter

EXPECTED = "sam_vit_b_01ec64.pth: a torch.save'd state dict, or a .safetensors file of tensors"


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return sa.build_sam("tiny", seed=0).state_dict()


@pytest.fixture(scope="module")
def adapter() -> sa.Adapter:
    return random_adapter(sa.build_sam("tiny", seed=0), sa.AdapterConfig(num_classes=2, image_size=64), seed=1)


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")


def _truncated(path: Path, save) -> None:
    save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _bad_checkpoints(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Files a user could pass as the stock SAM that are no SAM checkpoint, by what they hold."""
    makers = {
        "text.safetensors": lambda p: p.write_text("this is not a SAM\n"),
        "text.pth": lambda p: p.write_text("this is not a SAM\n"),
        "empty.pth": lambda p: p.write_bytes(b""),
        "empty.safetensors": lambda p: p.write_bytes(b""),
        # The first byte is not pickle's PROTO, so this is not even the start of a pickle.
        "random.pth": lambda p: p.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095)),
        "random.safetensors": lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)),
        "zip.pth": _zip_of_text,
        "list.pth": lambda p: torch.save([torch.zeros(2)], p),
        "numbers.pth": lambda p: torch.save({"a": 1}, p),
        "truncated.pth": lambda p: _truncated(p, lambda q: torch.save(state, q)),
        "truncated.safetensors": lambda p: _truncated(p, lambda q: save_file(state, str(q))),
    }
    made = {}
    for name, make in makers.items():
        made[name] = folder / name
        make(made[name])
    return made


BAD = ["text.safetensors", "text.pth", "empty.pth", "empty.safetensors", "random.pth", "random.safetensors",
       "zip.pth", "list.pth", "numbers.pth", "truncated.pth", "truncated.safetensors"]


# --------------------------------------------------------------------------- 1. not a checkpoint


@pytest.mark.parametrize("name", BAD)
def test_a_file_that_is_no_checkpoint_is_a_one_line_value_error(tmp_path, tiny_state, name):
    bad = _bad_checkpoints(tmp_path, tiny_state)[name]
    with pytest.raises(ValueError) as info:
        load_state_dict_file(bad)
    message = str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)  # it runs no code: it is no checkpoint at all
    assert message.startswith(f"{bad} ")
    assert "\n" not in message
    assert message.endswith(EXPECTED)


@pytest.mark.parametrize("name", BAD)
def test_build_sam_from_a_file_that_is_no_checkpoint(tmp_path, tiny_state, name):
    bad = _bad_checkpoints(tmp_path, tiny_state)[name]
    with pytest.raises(ValueError) as info:
        sa.build_sam("tiny", checkpoint=bad)
    assert str(info.value).startswith(f"{bad} ") and str(info.value).endswith(EXPECTED)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, adapter):
    root = tmp_path_factory.mktemp("papercut_cli")
    image = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(-125, 275, (16, 12, 2)).astype(np.float32),
                             np.eye(4)), image)
    return {"adapter": adapter.save(root / "tiny.safetensors"), "image": image}


def _segment(capsys, sam: Path, cli_files, out: Path) -> tuple[int, str, str]:
    return run(capsys, "segment", "--sam", sam, "--adapter", cli_files["adapter"], cli_files["image"], "-o", out)


@pytest.mark.parametrize("name", BAD)
def test_segment_with_a_bad_sam_file_fails_in_one_line(capsys, tmp_path, tiny_state, cli_files, name):
    bad = _bad_checkpoints(tmp_path, tiny_state)[name]
    out = tmp_path / "out"
    code, stdout, stderr = _segment(capsys, bad, cli_files, out)
    assert code == 2
    assert stdout == ""
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("samed-adapter segment: warning: ")]
    assert len(lines) == 1, stderr  # the error is one line
    assert lines[0].startswith(f"samed-adapter segment: error: {bad} ")
    assert lines[0].endswith(EXPECTED)
    assert "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_segment_with_a_safetensors_sam_checkpoint(capsys, tmp_path, tiny_state, cli_files):
    sam = tmp_path / "sam_tiny.safetensors"
    save_file(tiny_state, str(sam))
    loaded = sa.build_sam("tiny", checkpoint=sam).state_dict()
    assert loaded.keys() == tiny_state.keys()
    assert all(torch.equal(loaded[k], tiny_state[k]) for k in tiny_state)
    code, stdout, stderr = _segment(capsys, sam, cli_files, tmp_path / "out")
    assert code == 0, stderr
    assert "error" not in stderr
    assert nib.load(tmp_path / "out" / "ct.nii.gz").shape == (16, 12, 2)


class _Pwned:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("how", ["torch.save", "legacy", "pickle-0", "pickle-2", "pickle-4", "pickle-5"])
def test_pickles_that_would_run_code_are_still_refused_as_unsafe(tmp_path, capsys, how):
    path = tmp_path / "evil.pth"
    payload = {"w": torch.zeros(2), "payload": _Pwned()}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(how.split("-")[1])))
    capsys.readouterr()
    with warnings.catch_warnings(), pytest.raises(UnsafeCheckpointError) as info:
        warnings.simplefilter("ignore")  # torch warns of pickle protocols other than 2
        load_state_dict_file(path)
    assert str(info.value).startswith(f"{path} was refused: it holds pickled objects other than tensors")
    assert "\n" not in str(info.value)
    assert "pwned" not in capsys.readouterr().out


def test_an_adapter_given_as_the_sam_is_named(tmp_path, cli_files):
    path = cli_files["adapter"]
    state = load_state_dict_file(path)  # an adapter file is a valid file of tensors...
    with pytest.raises(ValueError) as info:  # ...but no SAM
        backbone_for_state_dict(state, source=path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a SAM state dict")
    assert "look like an adapter file" in message and "sam_vit_b_01ec64.pth" in message
    with pytest.raises(ValueError, match="^not a SAM state dict"):
        backbone_for_state_dict(state)


# --------------------------------------------------------------------------- 2. file modes


@pytest.fixture
def umask():
    """Set the umask for one test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_written_files_follow_the_umask(tmp_path, adapter, umask, mask, mode):
    umask(mask)
    saved = adapter.save(tmp_path / "adapter.safetensors")
    with atomic_path(tmp_path / "labels.nii.gz") as tmp:
        tmp.write_bytes(b"labels")
    assert _mode(saved) == mode
    assert _mode(tmp_path / "labels.nii.gz") == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "labels.nii.gz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_reading_the_umask_leaves_it_unchanged(umask):
    from samed_adapter.io.files import _umask

    umask(0o027)
    assert _umask() == 0o027
    assert os.umask(0o027) == 0o027


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_umask_without_proc(monkeypatch, umask):
    from samed_adapter.io import files

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("no /proc here")

    monkeypatch.setattr(files, "open", no_proc, raising=False)  # as on macOS: os.umask set and restored
    umask(0o027)
    assert files._umask() == 0o027
    assert os.umask(0o027) == 0o027


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_overwritten_file_keeps_its_mode(tmp_path, adapter, umask):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o640)
    adapter.save(path)
    assert _mode(path) == 0o640
    assert sa.Adapter.load(path).config == adapter.config


# --------------------------------------------------------------------------- 3. mismatch message


def test_a_tiny_adapter_on_a_vit_b_sam_suggests_build_sam(adapter):
    with pytest.raises(sa.AdapterMismatchError) as info:
        sa.patch(sa.build_sam("vit_b"), adapter)
    assert str(info.value) == (
        "the adapter is for a tiny SAM but this SAM is vit_b; build samed_adapter.build_sam('tiny', checkpoint=...) "
        "instead"
    )


def test_a_vit_b_adapter_on_a_tiny_sam_suggests_the_registry(adapter):
    vit_b = sa.Adapter(dataclasses.replace(adapter.config, backbone="vit_b"), adapter.tensors, adapter.base_fingerprint)
    with pytest.raises(sa.AdapterMismatchError) as info:
        sa.patch(sa.build_sam("tiny", seed=0), vit_b)
    assert str(info.value) == (
        "the adapter is for a vit_b SAM but this SAM is tiny; build "
        "segment_anything.sam_model_registry['vit_b'](checkpoint=...) instead"
    )


@pytest.mark.parametrize(
    "name, hint",
    [
        ("vit_b", "segment_anything.sam_model_registry['vit_b'](checkpoint=...)"),
        ("vit_l", "segment_anything.sam_model_registry['vit_l'](checkpoint=...)"),
        ("vit_h", "segment_anything.sam_model_registry['vit_h'](checkpoint=...)"),
        ("tiny", "samed_adapter.build_sam('tiny', checkpoint=...)"),
        ("custom_64x3x2", "the SAM the adapter was made on (a custom_64x3x2 encoder)"),
    ],
)
def test_build_hint(name, hint):
    assert build_hint(name) == hint


# --------------------------------------------------------------------------- segment's words (issue 28)

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from samed_adapter.testing.cli import two_adapters

    return two_adapters(tmp_path_factory.mktemp("pair"))


def test_a_complex_nifti_is_refused_in_one_line(capsys, tmp_path, pair):
    """A complex-valued NIfTI (an MR phase/magnitude pair stored as one) was segmented on its real
    part without a word: now that input fails in one line naming the dtype and the way out."""
    from samed_adapter.io import ImageReadError, read_image

    data = np.random.default_rng(0).uniform(0, 100, (40, 36, 4)) * np.exp(1j * np.pi / 3)
    path = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.complex64), np.eye(4)), path)
    with pytest.raises(ImageReadError, match=r"complex numbers \(complex64\)"):
        read_image(path)
    code, out, err = run(capsys, "segment", *TINY, "--adapter", pair["a"], path, "-o", tmp_path / "out")
    assert code == 1 and "segmented 0 of 1 inputs" in out
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "complex numbers (complex64)" in errors[0] and "numpy.abs" in errors[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ctrl_c_while_the_command_starts_is_one_line(capsys, tmp_path, pair, monkeypatch):
    """Ctrl-C while the adapter or SAM loads (here: in Adapter.load) gave a traceback."""
    from samed_adapter.adapter_file.adapter import Adapter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Adapter, "load", interrupted)
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), scan)
    code, out, err = run(capsys, "segment", *TINY, "--adapter", str(pair["a"]), str(scan), "-o", str(tmp_path / "out"))
    assert code == 130 and err == "samed-adapter segment: interrupted (Ctrl-C)\n" and out == ""


def test_ctrl_c_after_every_input_was_written_says_so(capsys, tmp_path, pair, monkeypatch):
    """A Ctrl-C that comes once all 3 inputs were written (here: as the SAM is put back) said
    "interrupted before the end of 3 inputs": now it says all 3 were done, and no --continue."""
    import samed_adapter.patching as patching

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patching, "unpatch", interrupted)
    scans = []
    for i in range(3):
        scans.append(tmp_path / "in" / f"s{i}.nii.gz")
        scans[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.full((16, 16, 2), 10.0 * i, np.float32), np.eye(4)), scans[-1])
    code, out, err = run(capsys, "segment", *TINY, "--adapter", str(pair["a"]), *map(str, scans), "-o",
                         str(tmp_path / "out"))
    assert code == 130 and len(list((tmp_path / "out").glob("*.nii.gz"))) == 3
    assert "interrupted after all 3 inputs were done (3 written)" in err and "before the end" not in err
    assert "--continue" not in err and "Traceback" not in err


@pytest.mark.parametrize("types, said", [("dicom-seg", "the DICOM-SEG covers those slices only"),
                                         ("nifti,dicom-rtstruct", "the label file and the RTSTRUCT cover those")])
def test_a_left_out_localizer_names_the_outputs_written(capsys, tmp_path, pair, types, said):
    """pydicom's CT2 holds a localizer 200 mm from its 3 even slices: it is left out, and the
    warning said "the label file covers those slices only" with --output-type dicom-seg, which
    writes no label file; it names the outputs that are written."""
    import pydicom.data


    ct2 = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CT2"
    code, _, err = run(capsys, "segment", *TINY, "--adapter", pair["a"], ct2, "-o", tmp_path / "out",
                       "--output-type", types)
    assert code == 0, err
    assert "left out 1 slice(s) at -99.48 mm" in err and said in err, err
    assert ("label file" in err) == ("nifti" in types)
