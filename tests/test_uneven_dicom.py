"""Unevenly spaced DICOM series never get an affine that puts a slice where it was not (issue 20)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from samed_adapter.io import (
    ImageReadError,
    UnevenSpacingError,
    label_nifti,
    list_dicom_series,
    read_dicom_series,
    read_image,
    write_labels,
)
from samed_adapter.io.slice_spacing import even_run, shortened
from samed_adapter.testing.dicom import write_ct_slice

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent


def _series(folder: Path, zs: list, **kwargs: object) -> Path:
    """One 3 x 4 axial slice per z (numbers or DS strings as given); pixel value = slice index."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(zs):
        ipp = [-10.0, 20.0, z] if not isinstance(z, str) else ["-10.0", "20.0", z]
        write_ct_slice(folder / f"s{k:03d}.dcm", np.full((3, 4), k), ipp, iop=AXIAL, spacing=[0.7, 0.7],
                       series="1.2.840.99.77", intercept=0.0, **kwargs)  # type: ignore[arg-type]
    return folder


def _placed_z(volume) -> np.ndarray:
    """Where the affine puts each slice's first voxel, z in mm (RAS and LPS agree on z)."""
    k = np.arange(volume.array.shape[0])
    return (volume.affine @ np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)]))[2]


def test_pydicom_ct2_localizer_is_left_out_and_said() -> None:
    # pydicom's CT2 holds slices at z = -99.48, 103.02, 104.27, 105.52 mm; stacked at the mean step
    # (68.33 mm) two of them were placed at -31.15 and 37.19 mm.
    with pytest.warns(UserWarning, match=r"left out 1 slice\(s\) at -99.48 mm .*3 evenly spaced"):
        volume = read_image(DICOMDIR_TESTS / "77654033" / "CT2")
    assert volume.array.shape[0] == 3 and not volume.uneven
    np.testing.assert_allclose(volume.positions, [103.02, 104.27, 105.52], atol=1e-4)
    np.testing.assert_allclose(_placed_z(volume), volume.positions, atol=1e-4)  # every slice where it was
    assert len(volume.messages) == 1 and "-99.48" in volume.messages[0]
    assert len(set(volume.files)) == 3  # one file per slice kept, the localizer's not among them


def test_a_missing_slice_is_refused_with_the_positions(tmp_path: Path) -> None:
    folder = _series(tmp_path / "gap", [0.0, 2.0, 4.0, 8.0, 10.0])  # z = 6 missing
    with pytest.raises(UnevenSpacingError) as err:
        read_image(folder)
    message = str(err.value)
    assert "0, 2, 4, 8, 10 mm" in message and "between 4.00 and 8.00" in message
    assert "--output-type dicom-seg" in message and "\n" not in message
    assert err.value.positions == (0.0, 2.0, 4.0, 8.0, 10.0)
    (series,) = list_dicom_series(folder)
    with pytest.raises(UnevenSpacingError):
        read_dicom_series(series)


def test_a_gap_at_an_end_is_a_missing_slice_not_a_localizer(tmp_path: Path) -> None:
    # 2 steps apart: a missing slice (refused), not something standing apart (left out).
    with pytest.raises(UnevenSpacingError, match="0, 4, 6, 8, 10 mm"):
        read_image(_series(tmp_path / "end", [0.0, 4.0, 6.0, 8.0, 10.0]))


def test_a_localizer_at_either_end_is_left_out(tmp_path: Path) -> None:
    zs = [-300.0] + [1.5 * k for k in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_image(_series(tmp_path / "low", zs))
    assert volume.array.shape == (6, 3, 4)
    np.testing.assert_array_equal(volume.array[:, 0, 0], np.arange(1, 7))  # slice 0 (the localizer) left out
    np.testing.assert_allclose(_placed_z(volume), [1.5 * k for k in range(6)], atol=1e-6)
    assert "-300.00" in volume.messages[0] and any("-300.00" in str(w.message) for w in caught)

    with pytest.warns(UserWarning, match="at 400.00 mm"):
        high = read_image(_series(tmp_path / "high", [1.5 * k for k in range(6)] + [400.0]))
    np.testing.assert_array_equal(high.array[:, 0, 0], np.arange(6))


@pytest.mark.parametrize("step, origin", [(0.625, -123.456), (3.27, 17.891), (1.0, -0.004), (5.0, 1000.003)])
def test_positions_rounded_to_two_decimals_are_even(tmp_path: Path, step: float, origin: float) -> None:
    # Scanners write ImagePositionPatient as decimal strings; 2 decimals is the coarsest seen.
    zs = [f"{origin + k * step:.2f}" for k in range(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about an even series
        volume = read_image(_series(tmp_path / "rounded", zs))
    assert not volume.uneven and volume.array.shape[0] == 40 and not volume.messages
    np.testing.assert_allclose(_placed_z(volume), [float(z) for z in zs], atol=0.0101)


def test_float32_positions_printed_in_full_are_even() -> None:
    zs = (np.float32(-512.3) + np.arange(300, dtype=np.float32) * np.float32(0.5)).astype(np.float64)
    positions = np.stack([np.zeros_like(zs), np.zeros_like(zs), zs], axis=1)
    run = even_run(positions, zs)
    assert run is not None and len(run.keep) == 300 and not run.dropped


def test_uneven_volume_read_for_dicom_seg_is_refused_by_nifti_writers(tmp_path: Path) -> None:
    volume = read_image(_series(tmp_path / "gap", [0.0, 2.0, 4.0, 8.0]), allow_uneven=True)
    assert volume.uneven and volume.positions == (0.0, 2.0, 4.0, 8.0)
    assert volume.array.shape == (4, 3, 4)  # every slice kept: a DICOM-SEG references each
    labels = np.ones(volume.array.shape, dtype=np.uint8)
    out = tmp_path / "labels.nii.gz"
    with pytest.raises(UnevenSpacingError, match=r"0, 2, 4, 8 mm .*--output-type dicom-seg"):
        write_labels(labels, volume, out)
    assert not out.exists() and not list(tmp_path.glob("*.nii*"))
    with pytest.raises(UnevenSpacingError):
        label_nifti(labels, volume)
    write_labels(labels, volume, tmp_path / "labels.npy")  # no affine, nothing misplaced


def test_even_series_affine_places_every_slice(tmp_path: Path) -> None:
    volume = read_image(_series(tmp_path / "even", [7.5, 2.5, 5.0, 0.0]))  # files out of order
    np.testing.assert_allclose(_placed_z(volume), [0.0, 2.5, 5.0, 7.5])
    np.testing.assert_array_equal(volume.array[:, 0, 0], [3, 1, 2, 0])
    written = nib.load(write_labels(np.zeros(volume.array.shape, np.uint8), volume, tmp_path / "even.nii.gz"))
    np.testing.assert_allclose(written.affine, volume.affine)


def test_the_tolerance_passes_jitter_and_catches_a_tenth_of_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Table positions with jitter of up to 0.5 % of a 3 mm step: within the slice, accepted.
    jittered = [3.0 * k + float(rng.uniform(-0.015, 0.015)) for k in range(20)]
    assert not read_image(_series(tmp_path / "jitter", jittered)).uneven
    # One slice 0.3 mm (a tenth of the step) off its place: the affine would misplace it.
    off = [3.0 * k for k in range(20)]
    off[7] += 0.3
    with pytest.raises(UnevenSpacingError, match="between 18.00 and 21.30|between 21.30 and 24.00"):
        read_image(_series(tmp_path / "off", off))


def test_a_scout_of_another_orientation_in_the_series_is_left_out(tmp_path: Path) -> None:
    folder = _series(tmp_path / "ct", [2.0 * k for k in range(5)])
    # A sagittal scout of another size stored in the same series, as CT consoles do.
    write_ct_slice(folder / "scout.dcm", np.zeros((6, 6)), [0.0, -100.0, 100.0], iop=[0, 1, 0, 0, 0, -1],
                   spacing=[2.0, 2.0], series="1.2.840.99.77")
    with pytest.warns(UserWarning, match=r"left out 1 slice\(s\) of another size or orientation \(scout.dcm\)"):
        volume = read_image(folder)
    assert volume.array.shape == (5, 3, 4) and "scout.dcm" in volume.messages[0]
    assert folder / "scout.dcm" not in volume.files
    np.testing.assert_allclose(_placed_z(volume), [0.0, 2.0, 4.0, 6.0, 8.0], atol=1e-6)


def test_a_series_of_several_orientations_is_refused(tmp_path: Path) -> None:
    # A 3-plane localizer: no orientation stands for the series.
    folder = _series(tmp_path / "mixed", [0.0, 2.0, 4.0])
    for k in range(3):
        write_ct_slice(folder / f"cor{k}.dcm", np.zeros((3, 4)), [0.0, 2.0 * k, 0.0], iop=[1, 0, 0, 0, 0, -1],
                       spacing=[0.7, 0.7], series="1.2.840.99.77")
    with pytest.raises(ImageReadError, match="size, orientation or pixel spacing differs"):
        read_image(folder)


def test_segment_refuses_a_nifti_for_an_uneven_series_and_writes_a_dicom_seg(ct_folder: Path, tmp_path: Path,
                                                                             capsys) -> None:
    import pydicom
    import torch

    import samed_adapter as sa
    from samed_adapter.cli import main as cli
    from samed_adapter.testing.cli import run
    from samed_adapter.io import read_dicom_seg
    from samed_adapter.testing import random_adapter

    # pydicom's CT_small as 4 slices 5 mm apart; the last moved 10 mm further: two slices missing.
    last = pydicom.dcmread(ct_folder / "b.dcm")
    orient = np.array([float(v) for v in last.ImageOrientationPatient])
    normal = np.cross(orient[:3], orient[3:])
    last.ImagePositionPatient = [f"{v:.6f}" for v in np.array([float(v) for v in last.ImagePositionPatient])
                                 + 10.0 * normal]
    last.save_as(ct_folder / "b.dcm")
    sam = sa.build_sam("tiny", seed=0)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    config = sa.AdapterConfig(num_classes=2, image_size=64, orientation="LPS")
    adapter = random_adapter(sam, config, seed=2, scale=0.5).save(tmp_path / "a.safetensors")
    base = ["segment", "--sam", str(tmp_path / "sam.pth"), "--adapter", str(adapter), str(ct_folder)]

    out = tmp_path / "nifti"
    code, _, err = run(capsys, *base, "-o", str(out))
    assert code != 0 and "Traceback" not in err
    assert "unevenly spaced" in err and "--output-type dicom-seg" in err
    positions = read_image(ct_folder, allow_uneven=True).positions
    assert np.diff(positions) == pytest.approx([5.0, 5.0, 15.0], abs=1e-4)
    assert f"positions along the normal {shortened(positions)} mm" in err
    assert not out.exists() or not list(out.rglob("*.nii*"))  # no NIfTI that misplaces a slice

    seg_out = tmp_path / "seg"
    assert cli.main([*base, "-o", str(seg_out), "--output-type", "dicom-seg"]) == 0
    (seg,) = list(seg_out.rglob("*.dcm"))
    source = read_image(ct_folder, allow_uneven=True)
    labels = read_dicom_seg(seg, source)
    assert labels.shape == source.array.shape == (4, 128, 128)  # every source slice, none invented
