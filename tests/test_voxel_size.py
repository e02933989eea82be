"""One voxel size everywhere: the affine's, with a warning when pixdim disagrees (issue 20).

Before, statistics took the voxel volume from the affine and `evaluate`'s HD95 took the spacing
from the header's pixdim (4.47 mm vs 2.24 mm on one file).
"""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samed_adapter.io import read_image
from samed_adapter.evaluation.metrics import hd95
from samed_adapter.segment.statistics import label_statistics
from samed_adapter.training.data import NiftiVolumes

AFFINE_SIZES = (2.0, 2.0, 4.47)  # what places the voxels
PIXDIM = (1.0, 1.0, 2.24)  # what the header's pixdim says


def _save_disagreeing(data: np.ndarray, path: Path) -> Path:
    """A .nii whose sform says AFFINE_SIZES and whose pixdim says PIXDIM (qform unused)."""
    img = nib.Nifti1Image(data, np.diag([*AFFINE_SIZES, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([*AFFINE_SIZES, 1.0]), code=1)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *PIXDIM)  # pixdim[1..3]: bytes 76 + 4 * (1..3)
    path.write_bytes(bytes(raw))
    loaded = nib.load(path)
    assert loaded.header.get_zooms()[:3] == pytest.approx(PIXDIM)
    np.testing.assert_allclose(loaded.affine, np.diag([*AFFINE_SIZES, 1.0]), rtol=1e-6)
    return path


@pytest.fixture
def case(tmp_path: Path) -> Path:
    """root/imagesTr/a.nii and root/labelsTr/a.nii: a 6 x 6 x 8 image, class 1 at k = 2..4."""
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = np.arange(6 * 6 * 8, dtype=np.float32).reshape(6, 6, 8)
    labels = np.zeros((6, 6, 8), np.uint8)
    labels[1:5, 1:5, 2:5] = 1
    _save_disagreeing(image, root / "imagesTr" / "a.nii")
    _save_disagreeing(labels, root / "labelsTr" / "a.nii")
    return root


def test_read_image_takes_the_affine_and_warns(case: Path) -> None:
    with pytest.warns(UserWarning, match=r"pixdim 1, 1, 2\.24 mm\) disagrees with its affine \(2, 2, 4\.47 mm\)"):
        volume = read_image(case / "imagesTr" / "a.nii")
    np.testing.assert_allclose(volume.spacing, AFFINE_SIZES[::-1], rtol=1e-6)
    # Also in Volume.messages, which `segment` prints (it does not show Python warnings).
    assert len(volume.messages) == 1 and "disagrees with its affine" in volume.messages[0]


def test_statistics_and_hd95_agree_with_the_affine(case: Path) -> None:
    with pytest.warns(UserWarning, match="disagrees with its affine"):
        stats = label_statistics(nib.load(case / "labelsTr" / "a.nii"), nib.load(case / "imagesTr" / "a.nii"), ["organ"])
    assert stats["organ"]["voxels"] == 48
    assert stats["organ"]["volume_mm3"] == pytest.approx(48 * 2.0 * 2.0 * 4.47, rel=1e-6)

    dataset = NiftiVolumes(case, window=None)
    with pytest.warns(UserWarning, match="disagrees with its affine"):
        item = dataset[0]
    np.testing.assert_allclose(item["spacing"], [4.47, 2.0, 2.0], rtol=1e-6)  # (D, H, W): k, j, i
    # A prediction one slice off along k: HD95 is one slice step, the affine's 4.47 mm (not 2.24).
    truth = item["label"].astype(bool)
    shifted = np.roll(truth, 1, axis=0)
    assert hd95(shifted, truth, spacing=item["spacing"]) == pytest.approx(4.47, rel=1e-6)
    # And the statistics' voxel volume is the product of the same sizes.
    assert np.prod(item["spacing"]) == pytest.approx(2.0 * 2.0 * 4.47, rel=1e-6)


def test_no_warning_when_pixdim_agrees(tmp_path: Path, recwarn) -> None:
    path = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.diag([0.7, 0.7, 2.5, 1.0])), path)
    volume = read_image(path)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7)) and volume.messages == ()
    assert not [w for w in recwarn if "disagrees" in str(w.message)]
