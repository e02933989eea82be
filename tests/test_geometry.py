"""samed_adapter.volume.geometry: reorientation to the model's slices and back, for every orientation."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.adapter_file.adapter import FORMAT_VERSION
from samed_adapter.volume.geometry import RADIOLOGICAL, SliceGeometry, axis_codes, parse_orientation
from samed_adapter.io import Volume, read_image
from samed_adapter.volume.preprocessing import Intensity, contrast_warning
from samed_adapter.testing import random_adapter


def stored_affine(perm: tuple[int, int, int], flips: tuple[int, int, int], zooms=(0.8, 1.1, 3.0)) -> np.ndarray:
    """An affine whose voxel axis s runs along RAS axis perm[s], in direction flips[s]."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for s, (t, f) in enumerate(zip(perm, flips)):
        affine[t, s] = f * zooms[s]
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


ORIENTATIONS = [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((1, -1), repeat=3)]


def test_there_are_48_axis_aligned_orientations_with_distinct_codes():
    codes = {axis_codes(stored_affine(p, f)) for p, f in ORIENTATIONS}
    assert len(ORIENTATIONS) == len(codes) == 48


@pytest.mark.parametrize("target", [RADIOLOGICAL, ("R", "A", "S"), ("A", "I", "R")])
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_reorient_then_restore_is_the_identity_for_all_48_orientations(target, slice_axis):
    rng = np.random.default_rng(slice_axis)
    for perm, flips in ORIENTATIONS:
        data = rng.normal(size=(5, 6, 7)).astype(np.float32)
        geometry = SliceGeometry.for_volume(data.shape, stored_affine(perm, flips), target, slice_axis)
        slices = geometry.to_slices(data)
        # No resampling: the slices hold exactly the stored values, permuted.
        np.testing.assert_array_equal(np.sort(slices, axis=None), np.sort(data, axis=None))
        assert slices.shape == geometry.slices_shape
        np.testing.assert_array_equal(geometry.from_slices(slices), data)
        # Reading one plane lazily gives the same slice as cutting the whole volume.
        for k in (0, slices.shape[0] - 1):
            np.testing.assert_array_equal(geometry.slice(data, k), slices[k])


def test_every_stored_orientation_gives_the_same_slices_in_world_space():
    """One scan stored 48 ways: after reorientation the model sees identical slices."""
    rng = np.random.default_rng(0)
    canonical = rng.normal(size=(4, 5, 6))  # RAS-ordered voxels
    reference = SliceGeometry.for_volume(canonical.shape, np.eye(4), RADIOLOGICAL, 2).to_slices(canonical)
    for perm, flips in ORIENTATIONS:
        # Store the RAS array with voxel axis s along RAS axis perm[s], flipped where flips[s] < 0.
        stored = canonical.transpose(perm)
        for s, f in enumerate(flips):
            if f < 0:
                stored = np.flip(stored, axis=s)
        affine = stored_affine(perm, flips, zooms=(1.0, 1.0, 1.0))
        slices = SliceGeometry.for_volume(stored.shape, affine, RADIOLOGICAL, 2).to_slices(stored)
        np.testing.assert_array_equal(slices, reference, err_msg=str(axis_codes(affine)))


def test_layout_matches_the_published_synapse_preprocessing():
    """As stored, slice k is data[:, :, k].T: rows along j, columns along i."""
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    geometry = SliceGeometry.for_volume(data.shape, np.diag([-0.7, -0.7, 3.0, 1.0]), None)
    slices = geometry.to_slices(data)
    assert slices.shape == (4, 3, 2)
    for k in range(4):
        np.testing.assert_array_equal(slices[k], data[:, :, k].T)
    # Its own orientation as the target is the same as "as stored".
    own = SliceGeometry.for_volume(data.shape, np.diag([-0.7, -0.7, 3.0, 1.0]), ("L", "P", "S"))
    np.testing.assert_array_equal(own.to_slices(data), slices)


def test_radiological_view_puts_anterior_up_and_patient_right_on_the_left():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS+: i runs towards the patient's right, j to anterior
    data = np.zeros((5, 6, 1))
    data[4, 0, 0] = 1  # the patient's far right, posterior end
    data[0, 5, 0] = 2  # the patient's far left, anterior end
    view = SliceGeometry.for_volume(data.shape, affine, RADIOLOGICAL, 2).to_slices(data)[0]
    assert view.shape == (6, 5)
    assert view[0, 4] == 2  # anterior is the top row; the patient's left is on the image's right
    assert view[5, 0] == 1  # posterior at the bottom; the patient's right on the image's left


def test_spacing_follows_the_axes():
    affine = stored_affine((2, 0, 1), (1, -1, 1), zooms=(0.5, 0.7, 3.0))  # i along S, j along R, k along A
    geometry = SliceGeometry.for_volume((10, 20, 30), affine, RADIOLOGICAL, 2)
    assert geometry.slices_shape == (10, 30, 20)  # slices along S, rows along P (k), columns along L (j)
    assert geometry.spacing((0.5, 0.7, 3.0)) == (0.5, 3.0, 0.7)


def test_oblique_affines_use_their_closest_axes():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 2.0])
    assert axis_codes(affine) == ("L", "P", "S")
    data = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(SliceGeometry.for_volume(data.shape, affine, RADIOLOGICAL).to_slices(data),
                                  data.transpose(2, 1, 0))


def test_bad_orientations_and_axes_are_refused():
    assert parse_orientation("lps") == parse_orientation("L,P,S") == parse_orientation(["L", "P", "S"]) == RADIOLOGICAL
    for bad in ("LRS", "LP", "XYZ", "LPSI", ("L", "L", "S"), 3):
        with pytest.raises(ValueError, match="one of L/R, one of A/P and one of S/I"):
            parse_orientation(bad)
    with pytest.raises(ValueError, match="slice_axis must be 0, 1 or 2"):
        SliceGeometry.for_volume((2, 3, 4), np.eye(4), "RAS", 3)
    degenerate = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no direction"):
        axis_codes(degenerate)


def test_volume_maps_between_its_layout_and_voxels():
    vol = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), affine=np.eye(4))
    assert vol.voxels.shape == (4, 3, 2)
    assert vol.voxels[3, 1, 0] == vol.array[0, 1, 3]
    np.testing.assert_array_equal(vol.from_voxels(vol.voxels), vol.array)
    flat = Volume(np.arange(6, dtype=np.float32).reshape(2, 3))  # PNG-like: no affine
    assert flat.voxels.shape == (3, 2, 1)
    np.testing.assert_array_equal(flat.from_voxels(flat.voxels), flat.array)
    # Without an affine the array is taken as the slices, whatever the adapter records.
    np.testing.assert_array_equal(flat.geometry(RADIOLOGICAL, 0).to_slices(flat.voxels)[0], flat.array)


# --------------------------------------------------------------------------- preprocessing


def test_intensity_window_percentiles_and_none():
    raw = np.array([-1000.0, -125.0, 75.0, 275.0, 2000.0], dtype=np.float32)
    np.testing.assert_array_equal(Intensity(window=(-125, 275))(raw), [0, 0, 0.5, 1, 1])
    scaled = Intensity(percentiles=(0, 100))(raw)
    assert scaled.min() == 0 and scaled.max() == 1 and scaled.dtype == np.float32
    np.testing.assert_array_equal(Intensity()(raw), raw)
    np.testing.assert_array_equal(Intensity(percentiles=(1, 99))(np.full(4, 3.0)), np.zeros(4))
    with pytest.raises(ValueError, match="not both"):
        Intensity(window=(0, 1), percentiles=(1, 99))
    with pytest.raises(ValueError, match="inside"):
        Intensity(percentiles=(-1, 99))


def test_contrast_warning_for_mr_under_the_ct_window():
    mr = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)  # MR already in [0, 1]
    message = contrast_warning(mr, Intensity(window=(-125, 275)), "case x")
    assert message is not None and "case x" in message and "--percentiles" in message
    ct = np.random.default_rng(0).uniform(-1000, 1500, (8, 16, 16))
    assert contrast_warning(ct, Intensity(window=(-125, 275)), "ct") is None
    assert contrast_warning(mr, Intensity(percentiles=(0.5, 99.5)), "mr") is None


# --------------------------------------------------------------------------- the adapter file


def test_config_records_orientation_and_preprocessing():
    config = sa.AdapterConfig(num_classes=2, intensity_window=None, intensity_percentiles=[0.5, 99.5],
                              orientation="lps", slice_axis=2)
    assert config.orientation == RADIOLOGICAL and config.intensity_percentiles == (0.5, 99.5)
    assert sa.AdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="intensity_window=None"):
        sa.AdapterConfig(intensity_percentiles=(1, 99))  # the CT window is the default
    with pytest.raises(ValueError, match="axis codes"):
        sa.AdapterConfig(orientation="LRS")


def _rewrite_as_version_1(path: Path) -> None:
    """Turn a version-2 file into what version 1 wrote: no new config fields, format_version 1."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    config = json.loads(header["__metadata__"]["config"])
    for key in ("intensity_percentiles", "orientation", "slice_axis"):
        config.pop(key)
    header["__metadata__"].update(format_version="1", config=json.dumps(config))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def test_version_1_files_still_load_and_cut_slices_as_stored(tmp_path):
    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=2, image_size=64, intensity_window=(0.0, 1.0))
    adapter = random_adapter(sam, config, seed=3)
    path = adapter.save(tmp_path / "v2.safetensors")
    assert FORMAT_VERSION == 2
    _rewrite_as_version_1(path)
    old = sa.Adapter.load(path)
    assert old.config == adapter.config and old.config.orientation is None and old.config.slice_axis == 2
    for name, tensor in adapter.tensors.items():
        assert torch.equal(old.tensors[name], tensor)
    # Applied to a volume it behaves as version 1 did: the (k, j, i) slices as stored.
    model = sa.patch(sam, path)
    data = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    nifti = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    nib.save(nifti, tmp_path / "scan.nii.gz")
    with pytest.warns(UserWarning, match="records no orientation"):
        labels = model.segment(read_image(tmp_path / "scan.nii.gz"))
    np.testing.assert_array_equal(labels, model.segment(data.transpose(2, 1, 0)))
    sa.unpatch(sam)


def test_voxel_sizes_come_from_the_affine_columns_and_pixdim_disagreement_warns() -> None:
    import warnings

    from samed_adapter.volume.geometry import check_voxel_sizes, voxel_sizes

    oblique = np.eye(4)
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique[:3, :3] = rotation @ np.diag([0.8, 1.1, 3.0])
    assert voxel_sizes(oblique) == pytest.approx((0.8, 1.1, 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_voxel_sizes(oblique, (0.8, 1.1, 3.0)) == pytest.approx((0.8, 1.1, 3.0))
        check_voxel_sizes(oblique, (0.8, 1.1))  # a 2-D header's zooms: the axes it has
        check_voxel_sizes(oblique, (0.8, 1.1, 0.0))  # 0: unset, not a disagreement
    with pytest.warns(UserWarning, match=r"case7: the header's voxel size \(pixdim 0.8, 1.1, 1.5 mm\) disagrees"):
        assert check_voxel_sizes(oblique, (0.8, 1.1, 1.5), "case7") == pytest.approx((0.8, 1.1, 3.0))
