"""Every `samed-adapter` command end to end through `cli.main`, on small random SAMs.

No network: the Hub is the recording fake and the laid-out cache of `samed_adapter.testing.hub`,
and conftest's `offline_cache` turns HF_HUB_OFFLINE on for every test here, as in test_hub.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

import samed_adapter as sa  # noqa: E402
from samed_adapter.cli import main as cli  # noqa: E402
from samed_adapter.io import read_image  # noqa: E402
from samed_adapter.testing import random_adapter  # noqa: E402
from samed_adapter.testing.cli import run

pytestmark = pytest.mark.usefixtures("offline_cache")

NAMES = ["liver", "kidney", "spleen"]
COMMANDS = ["convert", "info", "segment", "push", "pull"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapter made on build_sam("tiny", seed=0) and that SAM's stock checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    config = sa.AdapterConfig(num_classes=3, image_size=64, class_names=NAMES, intensity_window=(0.0, 1.0))
    adapter = random_adapter(sa.build_sam("tiny", seed=0), config, seed=1)
    sam_path = root / "sam_tiny.pth"
    torch.save(sa.build_sam("tiny", seed=0).state_dict(), sam_path)
    return {"adapter": adapter.save(root / "tiny.safetensors"), "sam": sam_path}


def segment(capsys, files, *argv: object) -> tuple[int, str, str]:
    return run(capsys, "segment", "--sam", files["sam"], "--adapter", files["adapter"], *argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_an_example(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"samed-adapter {command} " in out


def test_info_prints_the_adapter(capsys, files):
    adapter = sa.Adapter.load(files["adapter"])
    code, out, _ = run(capsys, "info", files["adapter"])
    assert code == 0
    assert f"tensors           {len(adapter.tensors)}" in out
    assert f"parameters        {adapter.num_parameters:,}" in out
    assert "MiB" in out and "dtype             float32" in out
    assert adapter.base_fingerprint in out and "liver, kidney, spleen" in out
    config = json.loads(out.split("config            ", 1)[1])
    assert config == json.loads(adapter.config.to_json())
    code, _, err = run(capsys, "info", "missing.safetensors")
    assert code == 2 and "no adapter file at missing.safetensors" in err


def _published(stock: torch.nn.Module, k: int, size: int) -> dict[str, torch.Tensor]:
    """A published SAMed .pth dict (spec section 2), from the independent reference if present."""
    try:
        from reference_samed import build_reference, save_published
    except ImportError:  # build it by hand from a patched model
        model = sa.inject(stock, sa.AdapterConfig(num_classes=k, image_size=size))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        out = {}
        for b, block in enumerate(model.sam.image_encoder.blocks):
            for j, part in enumerate("qv"):
                bypass = getattr(block.attn.qkv, part)
                out[f"w_a_{2 * b + j:03d}"] = bypass.lora_A.weight.detach().clone()
                out[f"w_b_{2 * b + j:03d}"] = bypass.lora_B.weight.detach().clone()
        for part in ("prompt_encoder", "mask_decoder"):
            out.update({f"{part}.{n}": v.clone() for n, v in getattr(model.sam, part).state_dict().items()})
        sa.unpatch(stock)
        return out
    return save_published(build_reference(stock, k, image_size=size, seed=1))


def test_convert_a_published_checkpoint(capsys, files, tmp_path):
    stock = sa.build_sam("tiny", seed=0)
    torch.manual_seed(0)
    torch.save(_published(stock, 3, 64), tmp_path / "epoch_159.pth")
    out = tmp_path / "converted.safetensors"
    code, text, _ = run(capsys, "convert", tmp_path / "epoch_159.pth", out, "--sam", files["sam"],
                        "--image-size", 64, "--class-names", ",".join(NAMES), "--window", "none", "--dtype", "float16")
    assert code == 0 and f"wrote {out}" in text
    adapter = sa.Adapter.load(out)
    assert adapter.config.num_classes == 3 and adapter.config.class_names == NAMES
    assert adapter.config.image_size == 64 and adapter.config.intensity_window is None
    assert adapter.dtype == torch.float16
    assert adapter.base_fingerprint == sa.stock_fingerprint(sa.build_sam("tiny", seed=0))
    code, _, err = run(capsys, "convert", tmp_path / "nope.pth", out, "--sam", files["sam"])
    assert code == 2 and "nope.pth" in err


def _labels_in_range(labels: np.ndarray) -> None:
    assert np.issubdtype(labels.dtype, np.integer)
    assert labels.min() >= 0 and labels.max() <= len(NAMES)


def test_segment_a_nifti_keeps_its_geometry(capsys, files, tmp_path):
    from nilearn import datasets

    scan = tmp_path / "mni.nii.gz"
    nib.save(datasets.load_mni152_template(resolution=2), scan)
    code, out, err = segment(capsys, files, scan, "-o", tmp_path / "out", "--batch-size", 16)
    assert code == 0, err
    assert "segmented 1 of 1" in out
    source, result = nib.load(scan), nib.load(tmp_path / "out" / "mni.nii.gz")
    assert result.shape == source.shape
    np.testing.assert_array_equal(result.affine, source.affine)
    labels = np.asarray(result.dataobj)
    _labels_in_range(labels)
    # the same labels as the Python API gives
    model = sa.patch(sa.build_sam("tiny", seed=0), files["adapter"])
    np.testing.assert_array_equal(labels.T, model.segment(read_image(scan).array, batch_size=16))


def test_segment_png_and_npy_with_overlays_on_a_random_sam(capsys, files, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 2, (40, 50), dtype=np.uint8)).save(tmp_path / "slice.png")
    np.save(tmp_path / "volume.npy", rng.random((3, 32, 36), dtype=np.float32))
    np.save(tmp_path / "plane.npy", rng.random((30, 20)))
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "segment", "--sam-backbone", "tiny", "--random-sam-seed", 0, "--adapter",
                         files["adapter"], tmp_path / "slice.png", tmp_path / "volume.npy", tmp_path / "plane.npy",
                         "-o", out_dir, "--overlay", "--merge")
    assert code == 0, err
    assert "using random SAM weights" in err and "segmented 3 of 3" in out
    png = np.asarray(Image.open(out_dir / "slice.png"))
    assert png.shape == (40, 50)
    _labels_in_range(png)
    assert np.load(out_dir / "volume.npy").shape == (3, 32, 36)
    assert np.load(out_dir / "plane.npy").shape == (30, 20)
    for name in ("slice", "volume", "plane"):
        assert Image.open(out_dir / f"{name}_overlay.png").format == "PNG"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["slice.png", "volume.npy", "plane.npy", "slice_overlay.png", "volume_overlay.png", "plane_overlay.png",
         ".slice.samed-adapter.json", ".volume.samed-adapter.json", ".plane.samed-adapter.json"])  # + what made them


def test_segment_a_dicom_series(capsys, files, tmp_path):
    from pydicom.data import get_testdata_file

    series = tmp_path / "series1"
    series.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), series / "IM0001.dcm")
    code, _, err = segment(capsys, files, series, "-o", tmp_path / "out")
    assert code == 0, err
    result = nib.load(tmp_path / "out" / "series1.nii.gz")
    assert result.shape == (128, 128, 1)
    np.testing.assert_allclose(result.affine, read_image(series).affine)
    _labels_in_range(np.asarray(result.dataobj))


def test_segment_reports_bad_inputs_and_goes_on(capsys, files, tmp_path):
    np.save(tmp_path / "good.npy", np.random.default_rng(0).random((2, 24, 24)))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    (tmp_path / "notes.txt").write_text("hello")
    out_dir = tmp_path / "out"
    code, out, err = segment(capsys, files, tmp_path / "broken.nii.gz", tmp_path / "good.npy",
                             tmp_path / "missing.png", tmp_path / "notes.txt", "-o", out_dir, "--overlay")
    assert code == 1
    assert "segmented 1 of 4" in out
    for name in ("broken.nii.gz", "missing.png", "notes.txt"):
        assert name in err
    assert sorted(p.name for p in out_dir.iterdir()) == [".good.samed-adapter.json", "good.npy",
                                                         "good_overlay.png"]  # no partial files


def test_segment_argument_errors(capsys, files, tmp_path):
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((16, 16)))
    base = ["segment", "--adapter", files["adapter"], image, "-o", tmp_path / "out"]
    code, _, err = run(capsys, *base, "--sam-backbone", "tiny")
    assert code == 2 and "--random-sam-seed" in err
    code, _, err = run(capsys, *base, "--sam-backbone", "tiny", "--random-sam-seed", 1)
    assert code == 2 and "--allow-base-mismatch" in err
    code, _, err = run(capsys, *base, "--sam-backbone", "tiny", "--random-sam-seed", 1, "--allow-base-mismatch")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--sam", files["sam"], "--device", "nonsense")
    assert code == 2 and "--device" in err
    with pytest.raises(SystemExit):  # argparse: --sam and --sam-backbone exclude each other
        cli.main([str(a) for a in base] + ["--sam", str(files["sam"]), "--sam-backbone", "tiny"])


def test_push_and_pull(capsys, files, tmp_path, fake_hub):
    notes = tmp_path / "results.md"
    notes.write_text("| class | Dice |\n|---|---|\n| liver | 91.0 |\n")
    code, out, err = run(capsys, "push", files["adapter"], "org/tiny", "--private", "--revision", "dev",
                         "--commit-message", "hello", "--create-pr", "--token", "hf_x", "--evaluation", notes)
    assert code == 0, err
    assert "discussions/1" in out
    assert fake_hub.call("create_repo") == {"repo_id": "org/tiny", "token": "hf_x", "private": True,
                                            "repo_type": "model", "exist_ok": True}
    upload = fake_hub.call("upload_folder")
    assert (upload["revision"], upload["commit_message"], upload["create_pr"], upload["token"]) == (
        "dev", "hello", True, "hf_x")
    assert "| liver | 91.0 |" in (fake_hub.last_upload() / "README.md").read_text()

    fake_hub.calls.clear()
    code, _, err = run(capsys, "push", files["adapter"], "org/tiny")
    assert code == 0, err
    assert fake_hub.call("create_repo")["private"] is None and fake_hub.call("upload_folder")["create_pr"] is False

    code, out, _ = run(capsys, "pull", "org/tiny")
    cached = Path(out.strip())
    assert code == 0 and cached.read_bytes() == files["adapter"].read_bytes()
    assert str(offline_cache_dir(cached)) in str(cached)
    code, out, _ = run(capsys, "pull", "org/tiny", "-o", tmp_path / "copy.safetensors")
    assert code == 0 and (tmp_path / "copy.safetensors").read_bytes() == files["adapter"].read_bytes()
    (tmp_path / "dir").mkdir()
    assert run(capsys, "pull", "org/tiny", "-o", tmp_path / "dir")[0] == 0
    assert (tmp_path / "dir" / "tiny.safetensors").is_file()

    # the Hub id works wherever an adapter file does
    code, out, _ = run(capsys, "info", "org/tiny")
    assert code == 0 and sa.Adapter.load(files["adapter"]).base_fingerprint in out
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 16)))
    code, _, err = run(capsys, "segment", "--sam", files["sam"], "--adapter", "org/tiny", tmp_path / "x.npy",
                       "-o", tmp_path / "out")
    assert code == 0, err

    code, _, err = run(capsys, "pull", "org/missing")
    assert code == 2 and "samed-adapter pull org/missing" in err
    code, _, err = run(capsys, "push", tmp_path / "missing.safetensors", "org/tiny")
    assert code == 2 and "no adapter file" in err


def offline_cache_dir(path: Path) -> Path:
    """The models--org--name folder a cached file lies in."""
    return next(p for p in path.parents if p.name.startswith("models--"))
