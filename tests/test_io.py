"""Tests for samed_adapter.io: readers, label writers and overlay montages."""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from samed_adapter.io import (
    ImageReadError,
    UnevenSpacingError,
    Volume,
    colour_table,
    output_path,
    overlay_montage,
    read_image,
    write_labels,
)
from samed_adapter.io import volumes as volumes_mod
from samed_adapter.io.overlay import _ALPHA, _pick_slices
from samed_adapter.testing.dicom import write_ct_slice

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- NIfTI


@pytest.fixture(scope="module")
def mni_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNI152 2 mm template shipped inside nilearn (no download), as .nii.gz."""
    from nilearn import datasets

    path = tmp_path_factory.mktemp("mni") / "mni152.nii.gz"
    nib.save(datasets.load_mni152_template(resolution=2), path)
    return path


def test_nifti_round_trip_on_real_scan(mni_path: Path, tmp_path: Path) -> None:
    ref = nib.load(mni_path)
    data = ref.get_fdata(dtype=np.float32)  # (X, Y, Z)
    vol = read_image(mni_path)

    assert vol.array.dtype == np.float32
    assert vol.array.shape == data.shape[::-1]
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0))
    i, j, k = 30, 71, 52  # asymmetric voxel: a wrong transpose reads another value
    assert vol.array[k, j, i] == data[i, j, k] != 0
    np.testing.assert_array_equal(vol.affine, ref.affine)
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert vol.source == mni_path

    top = float(vol.array.max())
    labels = (vol.array > 0.3 * top).astype(np.int64) + (vol.array > 0.6 * top)
    out = write_labels(labels, vol, output_path(mni_path, tmp_path / "out"))
    assert out == tmp_path / "out" / "mni152.nii.gz"

    back = nib.load(out)
    assert back.shape == ref.shape
    np.testing.assert_array_equal(back.affine, ref.affine)
    for code in ("qform_code", "sform_code"):
        assert back.header[code] == ref.header[code]
    raw = np.asanyarray(back.dataobj)
    assert raw.dtype == np.uint8 and back.get_data_dtype() == np.uint8
    assert (back.dataobj.slope, back.dataobj.inter) == (1.0, 0.0)
    assert back.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(raw, labels.transpose(2, 1, 0))
    # Back in the original voxel order: thresholding the source agrees exactly.
    np.testing.assert_array_equal(raw >= 1, data > 0.3 * top)
    np.testing.assert_array_equal(raw == 2, data > 0.6 * top)
    assert set(np.unique(raw)) == {0, 1, 2}


def test_nifti_anisotropic_oblique_axis_order(tmp_path: Path) -> None:
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # (X, Y, Z)
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 0.8, 3.0])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)
    src = tmp_path / "aniso.nii"
    nib.save(img, src)

    vol = read_image(src)
    assert vol.array.shape == (7, 6, 5)
    np.testing.assert_allclose(vol.spacing, (3.0, 0.8, 0.5), rtol=1e-6)
    assert vol.array[6, 1, 4] == data[4, 1, 6]

    labels = (vol.array.astype(np.int64) % 300) - 5  # negatives and > 255: int16
    out = write_labels(labels, vol, output_path(src, tmp_path / "out"))
    assert out.name == "aniso.nii"
    back = nib.load(out)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels.transpose(2, 1, 0))
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (1, 4)


def test_nifti_2d_is_rows_by_columns(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32).reshape(4, 3)  # (X, Y)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.9, 1.0, 1.0])), tmp_path / "flat.nii.gz")
    vol = read_image(tmp_path / "flat.nii.gz")
    np.testing.assert_array_equal(vol.array, data.T)
    np.testing.assert_allclose(vol.spacing, (0.9, 0.7), rtol=1e-6)
    out = write_labels(vol.array > 5, vol, tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), data > 5)


# --------------------------------------------------------------------------- DICOM


# Sagittal slices: rows run anterior->posterior (+y LPS), columns downward (-z).
SAG_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
SAG_X = {"b.dcm": 5.0, "c.dcm": 10.0, "a.dcm": 7.5}  # file name -> x (LPS), unsorted
SAG_SLOPE = {"b.dcm": 0.5, "c.dcm": 2.0, "a.dcm": 1.0}


def _sagittal_series(folder: Path, xs: dict[str, float] = SAG_X, series: str = "1.2.3") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    j, i = np.mgrid[0:4, 0:5]  # 4 rows, 5 columns: a transpose changes the shape
    for n, (name, x) in enumerate(xs.items()):
        raw = (100 * x + 10 * j + i).astype(np.int16)
        write_ct_slice(folder / name, raw, [str(x), "-20", "30"], iop=SAG_IOP, spacing=[0.8, 0.6],
                       slope=SAG_SLOPE.get(name, 1.0), intercept=-1000, series=series,
                       instance=10 - n)


def test_dicom_series_orientation_spacing_hu_and_affine(tmp_path: Path) -> None:
    folder = tmp_path / "series1"
    _sagittal_series(folder)
    (folder / "notes.txt").write_text("not a DICOM file")  # must be skipped

    vol = read_image(folder)
    assert vol.array.shape == (3, 4, 5) and vol.array.dtype == np.float32
    assert vol.header is None
    # Normal = row x col = (-1, 0, 0): ascending along it means x = 10, 7.5, 5.
    j, i = np.mgrid[0:4, 0:5]
    for k, name in enumerate(["c.dcm", "a.dcm", "b.dcm"]):
        expected = (100 * SAG_X[name] + 10 * j + i) * SAG_SLOPE[name] - 1000
        np.testing.assert_allclose(vol.array[k], expected, rtol=0, atol=1e-3)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.6), rtol=1e-9)
    expected_affine = np.array([
        [0.0, 0.0, 2.5, -10.0],   # RAS x = -(LPS x); slices step by -2.5 in LPS x
        [-0.6, 0.0, 0.0, 20.0],   # columns (i) run +y LPS = -y RAS
        [0.0, -0.8, 0.0, 30.0],   # rows (j) run -z
        [0.0, 0.0, 0.0, 1.0],
    ])
    np.testing.assert_allclose(vol.affine, expected_affine, atol=1e-9)
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [-10.0, 20.0, 30.0, 1.0])
    # Any voxel lands where DICOM PS3.3 C.7.6.2.1.1 puts it (converted to RAS).
    k, jj, ii = 2, 3, 4
    lps = np.array([5.0, -20.0, 30.0]) + ii * 0.6 * np.array(SAG_IOP[:3]) + jj * 0.8 * np.array(
        SAG_IOP[3:])
    np.testing.assert_allclose((vol.affine @ [ii, jj, k, 1])[:3], LPS_TO_RAS @ lps, atol=1e-9)

    out = write_labels((vol.array > 0).astype(np.uint8), vol, output_path(folder, tmp_path / "o"))
    assert out == tmp_path / "o" / "series1.nii.gz"
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (1, 1)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj)[ii, jj, k], vol.array[k, jj, ii] > 0)


def test_dicom_real_ct_slices(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    ct = get_testdata_file("CT_small.dcm", download=False)  # bundled; never go online
    if ct is None:
        pytest.skip("pydicom test data CT_small.dcm is not installed")
    ref = pydicom.dcmread(ct)
    ipp0 = np.array([float(v) for v in ref.ImagePositionPatient])

    single = read_image(ct)  # one .dcm file = one-slice volume
    assert single.array.shape == (1, 128, 128)
    np.testing.assert_array_equal(single.array[0], apply_modality_lut(ref.pixel_array, ref))
    assert single.array[0, 0, 0] == ref.pixel_array[0, 0] - 1024
    np.testing.assert_allclose(single.affine[:3, 2], [0.0, 0.0, 5.0])  # SpacingBetweenSlices

    folder = tmp_path / "ct"
    folder.mkdir()
    for k, name in enumerate(["z2", "z0", "z1"]):  # file order differs from slice order
        ds = pydicom.dcmread(ct)
        shift = {"z0": 0, "z1": 1, "z2": 2}[name]
        ds.PixelData = (ds.pixel_array + 10 * shift).astype(ds.pixel_array.dtype).tobytes()
        ds.ImagePositionPatient = [f"{ipp0[0]:.6f}", f"{ipp0[1]:.6f}", f"{ipp0[2] + 5 * shift:.6f}"]
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = 3 - k
        ds.save_as(folder / name)

    vol = read_image(folder)
    assert vol.array.shape == (3, 128, 128)
    for z in range(3):
        np.testing.assert_array_equal(vol.array[z], ref.pixel_array + 10 * z - 1024.0)
    np.testing.assert_allclose(vol.spacing, (5.0, 0.661468, 0.661468), rtol=1e-6)
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [158.135803, 179.035797, -75.699997, 1])
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [-0.661468, -0.661468, 5.0], rtol=1e-6)


def test_dicom_folder_problems_raise(tmp_path: Path) -> None:
    _sagittal_series(tmp_path / "two", series="1.1")
    _sagittal_series(tmp_path / "two", {"d.dcm": 2.5}, series="1.2")
    with pytest.raises(ImageReadError, match="2 DICOM series") as err:
        read_image(tmp_path / "two")
    assert "two" in str(err.value)

    _sagittal_series(tmp_path / "dup", {"a.dcm": 5.0, "b.dcm": 5.0})
    with pytest.raises(ImageReadError, match="share one position"):
        read_image(tmp_path / "dup")

    # A missing slice: no affine holds it (the mean step, 3.75 mm, would misplace the middle one).
    _sagittal_series(tmp_path / "gap", {"a.dcm": 10.0, "b.dcm": 7.5, "c.dcm": 2.5})
    with pytest.raises(UnevenSpacingError, match="unevenly spaced .*-10, -7.5, -2.5 mm.*dicom-seg") as uneven:
        read_image(tmp_path / "gap")
    assert uneven.value.positions == (-10.0, -7.5, -2.5)
    vol = read_image(tmp_path / "gap", allow_uneven=True)  # for outputs exact per instance
    assert vol.uneven and vol.positions == (-10.0, -7.5, -2.5)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(ImageReadError, match="no DICOM image slices with ImagePositionPatient"):
        read_image(tmp_path / "empty")


# --------------------------------------------------------------------------- PNG / NPY


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 40000)])
def test_png_round_trip(tmp_path: Path, dtype: type, top: int) -> None:
    pixels = np.linspace(0, top, 6 * 7).astype(dtype).reshape(6, 7)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    vol = read_image(tmp_path / "scan.png")
    assert vol.array.dtype == np.float32 and vol.array.shape == (6, 7)
    np.testing.assert_array_equal(vol.array, pixels.astype(np.float32))  # no rescaling
    assert vol.array.max() == top and vol.affine is None and vol.spacing == (1.0, 1.0)

    labels = (pixels > top // 2).astype(np.int64) * 3
    out = write_labels(labels, vol, output_path(tmp_path / "scan.png", tmp_path / "out"))
    assert out == tmp_path / "out" / "scan.png"
    back = np.asarray(Image.open(out))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


def test_png_colour_rejected_grey_rgb_accepted(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb_grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb_grey.png").array, grey)
    colour = np.stack([grey, grey + 1, grey], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour.png"):
        read_image(tmp_path / "colour.png")


@pytest.mark.parametrize("shape", [(5, 6), (3, 5, 6)])
def test_npy_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    data = np.random.default_rng(0).normal(size=shape)
    np.save(tmp_path / "img.npy", data)
    vol = read_image(tmp_path / "img.npy")
    assert vol.array.dtype == np.float32 and vol.array.shape == shape
    np.testing.assert_array_equal(vol.array, data.astype(np.float32))

    labels = (data > 0).astype(np.int32)
    out = write_labels(labels, vol, output_path(tmp_path / "img.npy", tmp_path / "out"))
    back = np.load(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    big = write_labels(labels * 1000, vol, tmp_path / "big.npy")
    assert np.load(big).dtype == np.int16 and np.load(big).max() == 1000


# --------------------------------------------------------------------------- errors, paths


def test_unreadable_and_unknown_files_raise_naming_the_file(tmp_path: Path) -> None:
    cases = {
        "notes.txt": b"hello",
        "broken.nii.gz": b"\x1f\x8b not really gzip",
        "short.nii": b"\x00" * 40,
        "bad.png": b"\x89PNG garbage",
        "bad.npy": b"not numpy",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ImageReadError) as err:
            read_image(tmp_path / name)
        assert name in str(err.value) and ".nii.gz" in str(err.value), str(err.value)
        assert isinstance(err.value, ValueError)
    np.save(tmp_path / "four_d.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(ImageReadError, match="four_d.npy"):
        read_image(tmp_path / "four_d.npy")
    with pytest.raises(ImageReadError, match="missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")


def test_output_path_names(tmp_path: Path) -> None:
    (tmp_path / "series1").mkdir()
    out = tmp_path / "out"
    assert output_path(tmp_path / "case.nii.gz", out) == out / "case.nii.gz"
    assert output_path(tmp_path / "Case.NII.GZ", out) == out / "Case.nii.gz"
    assert output_path(tmp_path / "case.nii", out) == out / "case.nii"
    assert output_path(str(tmp_path / "series1") + os.sep, out) == out / "series1.nii.gz"
    assert output_path(tmp_path / "slice7.dcm", out) == out / "slice7.nii.gz"
    assert output_path(tmp_path / "a.png", out) == out / "a.png"
    assert output_path(tmp_path / "a.npy", out) == out / "a.npy"
    assert output_path(tmp_path / "a.png", out, suffix="npy") == out / "a.npy"
    with pytest.raises(ValueError, match="overwrite the input"):
        output_path(tmp_path / "case.nii.gz", tmp_path)
    with pytest.raises(ValueError, match=".nii.gz"):
        output_path(tmp_path / "a.png", out, suffix=".jpg")


def test_write_labels_rejects_bad_labels(tmp_path: Path) -> None:
    vol = Volume(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        write_labels(np.zeros((3, 4), np.uint8), vol, tmp_path / "x.npy")
    with pytest.raises(ValueError, match="non-integer"):
        write_labels(np.full((2, 3, 4), 0.5), vol, tmp_path / "x.npy")
    with pytest.raises(ValueError, match="one slice"):
        write_labels(np.zeros((2, 3, 4), np.uint8), vol, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_nothing_behind(
    mni_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = read_image(mni_path)
    labels = (vol.array > 0).astype(np.uint8)
    target = tmp_path / "out" / "labels.nii.gz"

    def broken_save(img: nib.Nifti1Image, filename: str | os.PathLike[str]) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a file")  # partial output first
        raise OSError("disk full")

    monkeypatch.setattr(volumes_mod.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_labels(labels, vol, target)
    assert list(target.parent.iterdir()) == []

    monkeypatch.undo()
    write_labels(labels, vol, target)
    before = target.read_bytes()
    monkeypatch.setattr(volumes_mod.nib, "save", broken_save)
    with pytest.raises(OSError):
        write_labels(1 - labels, vol, target)
    assert target.read_bytes() == before  # the previous good file survives
    assert [p.name for p in target.parent.iterdir()] == ["labels.nii.gz"]


# --------------------------------------------------------------------------- overlay


def test_colour_table() -> None:
    table = colour_table(40)
    assert table.shape == (41, 3) and table.dtype == np.uint8
    assert table[0].tolist() == [0, 0, 0]
    assert len({tuple(row) for row in table[1:]}) == 40
    np.testing.assert_array_equal(colour_table(3), table[:4])  # colours do not shift with K
    assert colour_table(0).shape == (1, 3)


def _montage_case() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((6, 40, 50), 100.0, dtype=np.float32)
    image[:, :5] = 0.0  # dark top rows: shows the slice is drawn the right way up
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2:4, 10:20, 20:35] = 1
    labels[4, 25:30, 30:40] = 2
    return image, labels


def _blend(colour: np.ndarray, gray: int = 128) -> np.ndarray:
    return np.round((1 - _ALPHA) * gray + _ALPHA * colour.astype(float)).astype(np.uint8)


def _count(rgb: np.ndarray, colour: np.ndarray) -> int:
    return int((rgb == colour).all(axis=-1).sum())


def test_overlay_montage_colours_and_size(tmp_path: Path) -> None:
    image, labels = _montage_case()
    path = overlay_montage(image, labels, ["liver", "kidney"], tmp_path / "m" / "sheet.png",
                           window=(0.0, 200.0))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    scale, tile_w, tile_h = 256 // 50, 250, 200  # documented layout, 3 tiles (slices 2-4)
    cols = max(1, round(math.sqrt(3 * tile_h / tile_w)))
    assert rgb.shape[1] == cols * tile_w + (cols + 1) * 6
    assert math.ceil(3 / cols) * tile_h < rgb.shape[0] < math.ceil(3 / cols) * (tile_h + 40) + 60

    colours = colour_table(2)
    c1, c2 = _blend(colours[1]), _blend(colours[2])
    assert _count(rgb, c1) == 2 * 10 * 15 * scale**2
    assert _count(rgb, c2) == 5 * 10 * scale**2
    ys, xs = np.nonzero((rgb == c1).all(axis=-1)[:, : 6 + tile_w])
    assert (np.ptp(ys) + 1, np.ptp(xs) + 1) == (10 * scale, 15 * scale)  # not transposed
    assert xs.min() == 6 + 20 * scale
    assert (rgb[ys.min() - 1, xs.min()] == 128).all()  # background stays see-through
    tile_top = ys.min() - 10 * scale
    assert (rgb[tile_top: tile_top + 5 * scale, xs.min()] == 0).all()
    assert (rgb[tile_top + 5 * scale, xs.min()] == 128).all()


def test_overlay_montage_with_truth(tmp_path: Path) -> None:
    image, labels = _montage_case()
    truth = np.roll(labels, 4, axis=2)
    truth[1, 5:10, 0:5] = 1  # foreground only in truth still picks slice 1
    path = overlay_montage(image, labels, ["background", "liver", "kidney"], tmp_path / "t.png",
                           truth=truth, window=(0.0, 200.0))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    scale, panel = 5, 250
    assert rgb.shape[1] == 3 * panel + 2 * 2 + 2 * 6  # one column of 3-panel tiles
    c1 = _blend(colour_table(2)[1])
    panels = [rgb[:, 6 + p * (panel + 2): 6 + p * (panel + 2) + panel] for p in range(3)]
    assert _count(panels[0], c1) == 0  # plain image
    assert _count(panels[1], c1) == int((truth == 1).sum()) * scale**2
    assert _count(panels[2], c1) == int((labels == 1).sum()) * scale**2

    with pytest.raises(ValueError, match="class_names"):
        overlay_montage(image, labels, ["liver"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_pick_slices_spreads_over_foreground() -> None:
    foreground = np.zeros(100, dtype=bool)
    foreground[20:80] = True
    picks = _pick_slices(foreground, 100, 4)
    assert picks == [20, 40, 59, 79]
    assert _pick_slices(np.zeros(5, dtype=bool), 5, 12) == [0, 1, 2, 3, 4]


def test_a_dicom_folder_that_cannot_be_listed_says_so(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "series"
    folder.mkdir()

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)  # root lists any folder: imitate chmod 000
    with pytest.raises(ImageReadError) as err:
        read_image(folder)
    assert str(err.value) == f"{folder}: cannot list the folder ([Errno 13] Permission denied: '{folder}'); " \
                             "check it exists and is readable"
