"""Outputs other tools read, checked before they are written: no labels from non-finite logits,
an overlay for every volume, a DICOM-SEG that dcmqi reads back without a warning."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import Adapter
from samed_adapter.inference.stages import NonFiniteLogitsError
from samed_adapter.model import SAMed
from samed_adapter.testing import random_adapter
from samed_adapter.testing.cli import run

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
HUGE = 3e38  # finite in float32, but the decoder's sums overflow to inf and then NaN
CONFIG = sa.AdapterConfig(num_classes=2, image_size=64, intensity_window=(0.0, 100.0), class_names=["a", "b"])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """A sound adapter for the seed-0 tiny SAM and the same one with one decoder weight at 3e38."""
    root = tmp_path_factory.mktemp("adapters")
    good = random_adapter(sa.build_sam("tiny", seed=0), CONFIG, seed=3)
    tensors = dict(good.tensors)
    tokens = tensors["mask_decoder.mask_tokens.weight"].clone()
    tokens.view(-1)[0] = HUGE
    tensors["mask_decoder.mask_tokens.weight"] = tokens
    bad = Adapter(good.config, tensors, good.base_fingerprint)  # every value finite: it loads
    return {"good": good.save(root / "good.safetensors"), "huge": bad.save(root / "huge.safetensors")}


def _scan(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 100.0, size=(40, 36, 4))


# --------------------------------------------------------------------------- non-finite logits


def test_huge_adapter_weights_raise_instead_of_labels(adapters):
    model = sa.patch(sa.build_sam("tiny", seed=0), Adapter.load(adapters["huge"]), adapter_name="huge.safetensors")
    for probabilities in (False, True):
        with pytest.raises(NonFiniteLogitsError, match=r"adapter 'huge.safetensors' gives NaN or infinite logits "
                                                        r"on 3 of 3 slices") as caught:
            model.segment(_noise(0)[..., :3].transpose(2, 0, 1), return_probabilities=probabilities)
        assert caught.value.rows == (0, 1, 2)
        assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    # The same model with the sound adapter predicts finite labels (the check is not always on).
    model.load_adapter(adapters["good"], "good").set_adapter("good")
    labels = model.segment(_noise(0)[..., :3].transpose(2, 0, 1))
    assert labels.shape == (3, 40, 36) and labels.max() > 0


def test_non_finite_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(NonFiniteLogitsError("adapter 'x' gives NaN", rows=(1, 4))))
    assert (str(err), err.rows) == ("adapter 'x' gives NaN", (1, 4))


@pytest.mark.parametrize("engine", ["serial", "pipeline"])
def test_cli_huge_adapter_fails_every_input_and_writes_nothing(adapters, capsys, tmp_path, engine):
    scans = [_scan(tmp_path / "in" / f"s{i}.nii.gz", _noise(i)) for i in range(2)]
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["huge"], *scans, "-o", tmp_path / "out",
                         "--engine", engine, "--save-probabilities")
    assert code == 1
    assert err.count("gives NaN or infinite logits") == 2, err
    assert "huge.safetensors" in err and "Traceback" not in err
    assert "segmented 0 of 2" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("engine", ["serial", "pipeline"])
def test_cli_non_finite_input_fails_alone(adapters, capsys, tmp_path, monkeypatch, engine):
    """Logits that turn NaN for one input only (all-white slices here): that input fails, the
    other is written, the exit code says so."""
    forward = SAMed.forward

    def poisoned(self, images, adapter_names=None):
        out = forward(self, images, adapter_names)
        white = images.flatten(1).amin(dim=1) >= 1.0
        out["masks"][white] = float("nan")
        return out

    monkeypatch.setattr(SAMed, "forward", poisoned)
    white = _scan(tmp_path / "in" / "white.nii.gz", np.full((40, 36, 4), 500.0))  # window (0, 100): all 1.0
    fine = _scan(tmp_path / "in" / "fine.nii.gz", _noise(1))
    # --batch-size 4: one volume per batch (a packed batch that mixes volumes fails as a whole)
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapters["good"], white, fine, "-o",
                         tmp_path / "out", "--engine", engine, "--batch-size", "4")
    assert code == 1
    assert "white.nii.gz" in err and "gives NaN or infinite logits on 4 of 4 slices" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".fine.samed-adapter.json", "fine.nii.gz"]
    assert "segmented 1 of 2" in out
    assert torch.is_grad_enabled()  # nothing left in inference mode
