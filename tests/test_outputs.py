"""What `segment` writes besides the labels: statistics, split masks, probabilities; segment_file.

The adapter is the `trained` fixture's (conftest.py): real MRI, so every class has voxels.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import samed_adapter as sa
from samed_adapter.surgery.structure import get_stock_state
from samed_adapter.testing.cli import run

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
NAMES = ["grey matter", "white matter"]


def expected_statistics(labels: np.ndarray, image: np.ndarray, affine: np.ndarray, names) -> dict:
    """The numbers computed the plain way, mask by mask."""
    voxel = abs(np.linalg.det(affine[:3, :3]))
    out = {}
    for c, name in enumerate(names, start=1):
        mask = labels == c
        where = np.nonzero(mask)
        out[name] = {
            "label": c, "voxels": int(mask.sum()), "volume_mm3": mask.sum() * voxel,
            "intensity_mean": float(image[mask].mean()) if mask.any() else None,
            "intensity_std": float(image[mask].std()) if mask.any() else None,
            "bbox": {"min": [int(w.min()) for w in where], "max": [int(w.max()) for w in where]} if mask.any() else None,
        }
    return out


def assert_statistics_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert (g["label"], g["voxels"], g["bbox"]) == (w["label"], w["voxels"], w["bbox"]), name
        assert g["volume_mm3"] == pytest.approx(w["volume_mm3"], rel=1e-9)
        for key in ("intensity_mean", "intensity_std"):
            assert (g[key] is None) == (w[key] is None)
            if w[key] is not None:
                assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-9), (name, key)


def test_label_statistics_match_mask_by_mask_numbers():
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 300.0, size=(30, 20, 8))  # HU-like
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[3:10, 4:9, 1:3] = 1
    labels[20:29, 2:18, 5:8] = 3
    labels[0, 0, 0] = 3
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    names = ["liver", "spleen", "kidney"]
    img, lab = nib.Nifti1Image(image, affine), nib.Nifti1Image(labels, affine)
    stats = sa.label_statistics(lab, img, names)
    assert_statistics_equal(stats, expected_statistics(labels, image, affine, names))
    assert stats["spleen"] == {"label": 2, "voxels": 0, "volume_mm3": 0.0, "intensity_mean": None,
                               "intensity_std": None, "bbox": None}
    assert stats["liver"]["bbox"] == {"min": [3, 4, 1], "max": [9, 8, 2]}
    assert stats["liver"]["volume_mm3"] == pytest.approx(7 * 5 * 2 * 0.7 * 0.8 * 2.5)
    # Bare arrays take a spacing; bone far from zero keeps its small spread (no cancellation).
    bone = np.full((4, 4, 4), 3000.0) + np.arange(64).reshape(4, 4, 4) * 1e-3
    stats = sa.label_statistics(np.ones((4, 4, 4), np.uint8), bone, ["bone"], spacing=(1, 2, 3))
    assert stats["bone"]["volume_mm3"] == 64 * 6
    assert stats["bone"]["intensity_std"] == pytest.approx(bone.std(), rel=1e-9)
    with pytest.raises(ValueError, match="2 class names"):
        sa.label_statistics(labels, image, ["a", "b"])
    with pytest.raises(ValueError, match="does not match"):
        sa.label_statistics(labels[:-1], image, names)


def test_segment_writes_statistics_split_and_probabilities(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_val.nii.gz"  # stored (k, i, j), x flipped
    code, out, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path,
                         "--statistics", "--split", "--save-probabilities")
    assert code == 0, err
    labels_img = nib.load(tmp_path / "mni_val.nii.gz")
    labels = np.asarray(labels_img.dataobj)
    source = nib.load(scan)
    assert set(np.unique(labels)) == {0, 1, 2}

    stats = json.loads((tmp_path / "mni_val_statistics.json").read_text())
    assert_statistics_equal(stats, expected_statistics(labels, np.asarray(source.dataobj, dtype=np.float64),
                                                       source.affine, NAMES))

    masks = {name: nib.load(tmp_path / "mni_val" / f"{name.replace(' ', '_')}.nii.gz") for name in NAMES}
    assembled = np.zeros_like(labels)
    for c, name in enumerate(NAMES, start=1):
        mask = np.asarray(masks[name].dataobj)
        assert set(np.unique(mask)) == {0, 1} and masks[name].shape == source.shape
        np.testing.assert_allclose(masks[name].affine, source.affine, atol=1e-5)
        assembled[mask == 1] = c
    np.testing.assert_array_equal(assembled, labels)

    with np.load(tmp_path / "mni_val.npz") as npz:
        probs, class_names = npz["probabilities"], list(npz["class_names"])
        assert list(npz["axes"]) == ["class", "i", "j", "k"]  # recorded, not guessed (issue 20)
        np.testing.assert_array_equal(npz["affine"], source.affine)
    assert probs.dtype == np.float16 and probs.shape == (3, *source.shape)
    assert class_names == ["background", *NAMES]
    np.testing.assert_array_equal(probs.argmax(axis=0), labels)
    np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=3e-3)


def test_classes_keep_only_those_in_every_output(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_train.nii.gz"
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "all")
    assert code == 0, err
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "wm",
                       "--classes", "White Matter", "--split", "--statistics")
    assert code == 0, err
    full = np.asarray(nib.load(tmp_path / "all" / "mni_train.nii.gz").dataobj)
    kept = np.asarray(nib.load(tmp_path / "wm" / "mni_train.nii.gz").dataobj)
    np.testing.assert_array_equal(kept, np.where(full == 2, 2, 0))
    assert sorted(p.name for p in (tmp_path / "wm" / "mni_train").iterdir()) == ["white_matter.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "wm" / "mni_train" / "white_matter.nii.gz").dataobj),
                                  (full == 2).astype(np.uint8))
    assert list(json.loads((tmp_path / "wm" / "mni_train_statistics.json").read_text())) == ["white matter"]


def test_bad_requests_stop_before_any_model_work(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_train.nii.gz"
    missing_sam = tmp_path / "no_such_sam.pth"  # reached only if the request passed its checks
    code, _, err = run(capsys, "segment", "--sam", missing_sam, "--adapter", trained["adapter"], scan,
                       "-o", tmp_path / "o", "--classes", "liver")
    assert code == 2 and "'liver'" in err and "grey matter, white matter" in err and "no_such_sam" not in err
    code, _, err = run(capsys, "segment", "--sam", missing_sam, "--adapter", trained["adapter"], scan,
                       "-o", tmp_path / "o", "--output-type", "dicom-seg")
    assert code == 2 and "needs DICOM inputs" in err and "no_such_sam" not in err
    code, _, err = run(capsys, "segment", "--sam", missing_sam, "--adapter", trained["adapter"], scan,
                       "-o", tmp_path / "o", "--output-type", "rtstruct")
    assert code == 2 and "rtstruct" in err
    assert not (tmp_path / "o").exists()


def test_segment_file_mirrors_the_command_line(trained, capsys, tmp_path):
    scan = trained["data"] / "imagesTr" / "mni_val.nii.gz"
    code, _, err = run(capsys, "segment", *TINY, "--adapter", trained["adapter"], scan, "-o", tmp_path / "cli",
                       "--statistics")
    assert code == 0, err
    sam = sa.build_sam("tiny", seed=0)
    labels = sa.segment_file(scan, tmp_path / "py" / "val.nii.gz", sam=sam, adapter=trained["adapter"],
                             statistics=True)
    assert get_stock_state(sam) is None  # the user's SAM is left as it was
    cli_labels = nib.load(tmp_path / "cli" / "mni_val.nii.gz")
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(cli_labels.dataobj))
    np.testing.assert_allclose(labels.affine, nib.load(scan).affine, atol=1e-5)
    assert (json.loads((tmp_path / "py" / "val_statistics.json").read_text())
            == json.loads((tmp_path / "cli" / "mni_val_statistics.json").read_text()))
    # A nibabel image in, nothing written, the same labels out; --classes by name.
    only = sa.segment_file(nib.load(scan), sam=sam, adapter=trained["adapter"], classes=["grey matter"])
    np.testing.assert_array_equal(np.asarray(only.dataobj), np.where(np.asarray(labels.dataobj) == 1, 1, 0))


def test_dicom_seg_decodes_to_the_nifti_labels_of_the_same_run(ct_folder, capsys, tmp_path):
    from samed_adapter.io import read_dicom_seg, read_image
    from samed_adapter.testing import random_adapter

    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["fat", "soft tissue", "bone"],
                              intensity_window=(-200.0, 300.0), orientation="LPS")
    adapter = random_adapter(sam, config, seed=5, scale=0.5).save(tmp_path / "ct.safetensors")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, ct_folder, "-o", tmp_path / "out",
                         "--output-type", "nifti,dicom-seg")
    assert code == 0, err
    volume = read_image(ct_folder)
    nifti = np.asarray(nib.load(tmp_path / "out" / "ct.nii.gz").dataobj)
    decoded = read_dicom_seg(tmp_path / "out" / "ct_seg.dcm", volume)
    assert np.any(nifti > 0)
    np.testing.assert_array_equal(volume.to_voxels(decoded), nifti)


def _ct_adapter(tmp_path: Path) -> Path:
    """A random adapter for the tiny SAM that finds several classes in conftest's ct_folder."""
    from samed_adapter.testing import random_adapter

    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["fat", "soft tissue", "bone"],
                              intensity_window=(-200.0, 300.0), orientation="LPS")
    return random_adapter(sam, config, seed=5, scale=0.5).save(tmp_path / "ct.safetensors")


def test_probabilities_of_a_dicom_series_give_the_labels_in_the_axes_they_record(ct_folder, capsys, tmp_path):
    """Issue 20: the .npz is not nnU-Net's (C, z, y, x), and says what it is: its argmax is the
    written labels at every voxel in the axes it records, and the README's transpose gives the
    (z, y, x) order SimpleITK (nnU-Net's reader) sees."""
    sitk = pytest.importorskip("SimpleITK")
    from samed_adapter.io import read_dicom_seg, read_image

    adapter = _ct_adapter(tmp_path)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, ct_folder, "-o", tmp_path / "out",
                       "--output-type", "nifti,dicom-seg", "--save-probabilities")
    assert code == 0, err
    written = nib.load(tmp_path / "out" / "ct.nii.gz")
    labels = np.asarray(written.dataobj)
    assert len(np.unique(labels)) >= 2  # enough classes for the argmax to mean something
    with np.load(tmp_path / "out" / "ct.npz", allow_pickle=False) as npz:
        probs, axes, affine = npz["probabilities"], list(npz["axes"]), npz["affine"]
        assert list(npz["class_names"]) == ["background", "fat", "soft tissue", "bone"]
    assert axes == ["class", "i", "j", "k"] and probs.shape == (4, *labels.shape)
    np.testing.assert_allclose(affine, written.affine, rtol=0, atol=1e-4)  # NIfTI keeps float32
    np.testing.assert_array_equal(probs.argmax(axis=0), labels)
    # The DICOM-SEG holds the same labels, slice by slice: the voxel grid is one.
    volume = read_image(ct_folder)
    np.testing.assert_array_equal(volume.to_voxels(read_dicom_seg(tmp_path / "out" / "ct_seg.dcm", volume)),
                                  probs.argmax(axis=0))
    # nnU-Net's axis order, (C, z, y, x), is a transpose away, as the README says.
    zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz")))
    np.testing.assert_array_equal(probs.transpose(0, 3, 2, 1).argmax(axis=0), zyx)

    # --classes keeps only those classes in the labels; the probabilities stay every class's.
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, ct_folder, "-o", tmp_path / "soft",
                       "--classes", "soft tissue", "--save-probabilities")
    assert code == 0, err
    with np.load(tmp_path / "soft" / "ct.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["probabilities"], probs)
    kept = np.asarray(nib.load(tmp_path / "soft" / "ct.nii.gz").dataobj)
    assert (kept == 2).any() and (labels == 1).any()
    np.testing.assert_array_equal(kept, np.where(probs.argmax(axis=0) == 2, 2, 0))


def test_probabilities_of_an_array_record_its_own_axes(capsys, tmp_path):
    """An NPY stack keeps its (slice, row, column) layout, and the .npz says so."""
    from samed_adapter.testing import random_adapter

    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=2, image_size=64, class_names=["a", "b"], intensity_window=None,
                              intensity_percentiles=(1.0, 99.0))
    adapter = random_adapter(sam, config, seed=2, scale=0.5).save(tmp_path / "a.safetensors")
    rng = np.random.default_rng(0)
    stack = np.cumsum(rng.normal(size=(3, 40, 24)), axis=1).astype(np.float32)  # smooth-ish, not flat
    np.save(tmp_path / "stack.npy", stack)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, tmp_path / "stack.npy", "-o",
                       tmp_path / "out", "--save-probabilities")
    assert code == 0, err
    labels = np.load(tmp_path / "out" / "stack.npy")
    with np.load(tmp_path / "out" / "stack.npz", allow_pickle=False) as npz:
        probs, axes = npz["probabilities"], list(npz["axes"])
        assert "affine" not in npz.files  # an array has none
    assert len(np.unique(labels)) >= 2
    assert axes == ["class", "slice", "row", "column"] and probs.shape == (3, *stack.shape)
    np.testing.assert_array_equal(probs.argmax(axis=0), labels)


def _first_tile(picture: Path, side: int) -> np.ndarray:
    """Tile 0 of an overlay sheet of ``side`` x ``side`` slices: (H*s, W*s, 3), by the documented
    layout (6 px padding, a one-line caption above, s = 256 // side)."""
    from PIL import Image, ImageFont

    rgb = np.asarray(Image.open(picture).convert("RGB"))
    top = 6 + int(ImageFont.load_default().getbbox("Ag")[3]) + 4
    size = side * (256 // side)
    assert not (rgb[top: top + size, 6 + size] == 128).all()  # the tile ends there: padding follows
    return rgb[top: top + size, 6: 6 + size]


def test_a_constant_volume_overlays_flat_grey(tmp_path):
    """Issue 20: percentiles of a constant volume are (7, 7), which the overlay refused as a window
    (and the labels were lost with it). One value is shown mid-grey, with or without a window."""
    from samed_adapter.io import overlay_montage, overlay_volume, read_image
    from samed_adapter.volume.preprocessing import Intensity

    nib.save(nib.Nifti1Image(np.full((24, 24, 3), 7.0, dtype=np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    volume = read_image(tmp_path / "flat.nii.gz")
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    for n, intensity in enumerate([Intensity(None, (1.0, 99.0)), None]):
        picture = overlay_volume(volume, labels, ["a", "b"], tmp_path / f"volume{n}.png", intensity=intensity)
        assert (_first_tile(picture, 24) == 128).all(), intensity
    picture = overlay_montage(np.full((3, 24, 24), -1e20), np.zeros((3, 24, 24), np.uint8), ["a"], tmp_path / "m.png")
    assert (_first_tile(picture, 24) == 128).all()  # +-0.5 would vanish in the rounding of 1e20
    with pytest.raises(ValueError, match=r"window must be \(low, high\)"):  # asked for, it is still checked
        overlay_montage(np.full((3, 24, 24), 7.0), np.zeros((3, 24, 24), np.uint8), ["a"], tmp_path / "bad.png",
                        window=(7.0, 7.0))
    assert not (tmp_path / "bad.png").exists()


def test_segment_overlay_of_a_constant_volume_keeps_its_labels(capsys, tmp_path):
    """The command writes the labels of a constant volume (the same as without --overlay) and an
    overlay of flat grey under their colours."""
    from samed_adapter.io.overlay import colour_table
    from samed_adapter.testing import random_adapter

    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=2, image_size=64, intensity_window=None, intensity_percentiles=(1.0, 99.0),
                              class_names=["a", "b"])
    adapter = random_adapter(sam, config, seed=1).save(tmp_path / "mr.safetensors")
    scan = tmp_path / "in" / "flat.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(np.full((24, 24, 3), 7.0, dtype=np.float32), np.eye(4)), scan)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, scan, "-o", tmp_path / "plain")
    assert code == 0, err
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, scan, "-o", tmp_path / "out", "--overlay")
    assert code == 0, err
    assert "window" not in err and "segmented 1 of 1" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == \
        ["flat.nii.gz", "flat_overlay.png"]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "flat.nii.gz").dataobj),
                                  np.asarray(nib.load(tmp_path / "plain" / "flat.nii.gz").dataobj))
    tile = _first_tile(tmp_path / "out" / "flat_overlay.png", 24).reshape(-1, 3)
    # Every pixel is the grey or a class colour over that grey, nothing else.
    shown = [np.full(3, 128)] + [np.round(0.5 * 128 + 0.5 * c.astype(float)) for c in colour_table(2)[1:]]
    assert all(any((p == s).all() for s in shown) for p in np.unique(tile, axis=0))
