"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from samed_adapter.cli import main as cli
from samed_adapter.cli.demo import build_mni_task
from samed_adapter.volume.geometry import axis_codes
from samed_adapter.testing.hub import FakeHub

# The random SAM the `trained` adapter was trained on (and so matches by fingerprint).
TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]


def _restore(img: nib.Nifti1Image, data: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, ...]):
    """`data` (on img's grid) stored with voxel axis s = old axis perm[s], flipped where flips[s]."""
    affine = img.affine.copy()
    shape = data.shape
    stored = data.transpose(perm)
    new = affine[:, list(perm) + [3]]
    for s, flip in enumerate(flips):
        if flip:
            stored = np.flip(stored, axis=s)
            n = shape[perm[s]]
            new[:3, 3] += new[:3, s] * (n - 1)  # the old last voxel is the new first
            new[:3, s] *= -1
    return np.ascontiguousarray(stored), new


def _store(path: Path, img: nib.Nifti1Image, perm, flips, *, itk: bool = False) -> Path:
    data, affine = _restore(img, np.asarray(img.dataobj), perm, flips)
    if itk:
        # As ITK writes an LPS-ordered image: int16 data, qform only (sform code 0), mm units.
        out = nib.Nifti1Image(data.astype(np.int16), None)
        out.set_qform(affine, code=1)
        out.set_sform(None, code=0)
        out.header.set_xyzt_units("mm", "sec")
    else:
        out = nib.Nifti1Image(data, affine)
    nib.save(out, path)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """`samed-adapter train` on a NIfTI folder of two cases stored RAS and (k, i, j) with x flipped.

    Real MRI (MNI152 grey/white matter from nilearn), a tiny random SAM, 60 iterations at 128: about
    20 s on two cores, enough for labels with both tissues in them.
    """
    root = tmp_path_factory.mktemp("orient")
    data = build_mni_task(root / "data")
    for folder in ("imagesTr", "labelsTr"):  # store the second case another way
        path = data / folder / "mni_val.nii.gz"
        img = nib.load(path)
        _store(path, img, (2, 0, 1), (True, False, False))
    assert axis_codes(nib.load(data / "imagesTr" / "mni_val.nii.gz").affine) != ("R", "A", "S")
    out = root / "run"
    code = cli.main(["train", "--data", str(data), "--format", "nifti", "--num-classes", "2",
                     "--class-names", "grey matter,white matter", "--window", "none", "--percentiles", "0.5,99.5",
                     *TINY, "--image-size", "128", "--batch-size", "8", "--max-epochs", "12", "--stop-epoch", "12",
                     "--warmup-iters", "4", "--no-progress", "--device", "cpu", "-o", str(out)])
    assert code == 0
    return {"data": data, "adapter": out / "adapter.safetensors", "run": out, "root": root}


@pytest.fixture
def store_scan():
    """Write a NIfTI image's data stored another way: ``store_scan(path, img, perm, flips, itk=False)``."""
    return _store


def _floats(value: object) -> list[float]:
    return [float(v) for v in value]  # type: ignore[attr-defined]


def _write_ct_series(folder: Path) -> Path:
    """4 slices of pydicom's CT_small, 5 mm apart along the normal, each shifted sideways."""
    ct = get_testdata_file("CT_small.dcm", download=False)  # bundled; never online
    if ct is None:
        pytest.skip("pydicom test data CT_small.dcm is not installed")
    series = generate_uid()
    folder.mkdir(parents=True)
    for k, name in enumerate(["c.dcm", "a.dcm", "d.dcm", "b.dcm"]):  # file names not in slice order
        ds = pydicom.dcmread(ct)
        normal = np.cross(_floats(ds.ImageOrientationPatient)[:3], _floats(ds.ImageOrientationPatient)[3:])
        ipp = np.array(_floats(ds.ImagePositionPatient)) + k * float(ds.SliceThickness) * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        # Rolled columns make every slice (and so every label slice) different.
        ds.PixelData = np.roll(ds.pixel_array, 9 * k, axis=1).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / name)
    return folder


@pytest.fixture
def ct_folder(tmp_path: Path) -> Path:
    """A 4-slice CT series folder made from pydicom's bundled CT_small.dcm (a fresh copy per test)."""
    return _write_ct_series(tmp_path / "ct")


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory) -> Path:
    """The same series, written once per session (for tests that only read it)."""
    return _write_ct_series(tmp_path_factory.mktemp("ct_series") / "ct")


# --------------------------------------------------------------------------- the Hub, offline


@pytest.fixture
def offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE on and the default Hugging Face cache in tmp_path (the Hub tests use it for
    every test: ``pytestmark = pytest.mark.usefixtures("offline_cache")``)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, offline_cache: Path, tmp_path: Path) -> FakeHub:
    """huggingface_hub.HfApi replaced by a `FakeHub` whose uploads land in `offline_cache`."""
    import huggingface_hub

    fake = FakeHub(offline_cache, tmp_path / "uploads")
    fake.uploads.mkdir()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    return fake
