"""DICOM folders holding several series: listing, naming and one Volume per series."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from samed_adapter.io import (
    DicomSeries,
    ImageReadError,
    Volume,
    list_dicom_series,
    read_dicom_folder,
    read_dicom_series,
    read_image,
)
from samed_adapter.testing.dicom import write_ct_slice

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]     # rows +x, columns +y (LPS): normal +z
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # rows +x, columns -z: normal +y
TILTED = [1.0, 0.0, 0.0, 0.0, 0.8, -0.6]   # not parallel to AXIAL


def _series(folder: Path, prefix: str, *, uid: str, iop: list[float], spacing: list[float],
            shape: tuple[int, int], origins: list[list[float]], number: int | None = None,
            description: str | None = None) -> list[Path]:
    """Write one slice per origin as ``{prefix}{k}.dcm``; pixel = 100 k + 10 row + column."""
    folder.mkdir(parents=True, exist_ok=True)
    j, i = np.mgrid[0:shape[0], 0:shape[1]]
    paths = []
    for k, ipp in enumerate(origins):
        path = folder / f"{prefix}{k}.dcm"
        write_ct_slice(path, 100 * k + 10 * j + i, ipp, iop=iop, spacing=spacing, series=uid,
                       number=number, description=description)
        paths.append(path)
    return paths


def _axial(folder: Path, uid: str = "1.2.840.99.1", **tags: object) -> list[Path]:
    """3 axial slices of 4 x 5 pixels, 0.8 x 0.6 mm, 2.5 mm apart, files in reverse z order."""
    origins = [[-10.0, -20.0, z] for z in (5.0, 2.5, 0.0)]
    return _series(folder, "ax", uid=uid, iop=AXIAL, spacing=[0.8, 0.6], shape=(4, 5),
                   origins=origins, **tags)  # type: ignore[arg-type]


def _coronal(folder: Path, uid: str = "1.2.840.99.2", **tags: object) -> list[Path]:
    """2 coronal slices of 6 x 3 pixels, 1.5 x 1.2 mm, 4 mm apart."""
    origins = [[0.0, y, 40.0] for y in (-4.0, 0.0)]
    return _series(folder, "cor", uid=uid, iop=CORONAL, spacing=[1.5, 1.2], shape=(6, 3),
                   origins=origins, **tags)  # type: ignore[arg-type]


def _alone(files: list[Path], folder: Path) -> Volume:
    """read_image of ``files`` copied into a folder of their own (the single-series path)."""
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return read_image(folder)


def test_two_series_of_different_geometry_give_two_volumes(tmp_path: Path) -> None:
    mixed = tmp_path / "study"
    ax_files = _axial(mixed, number=2, description="T1 axial")
    cor_files = _coronal(mixed, number=10, description="cor")
    (mixed / "notes.txt").write_text("not DICOM")  # skipped, as by read_image

    listed = list_dicom_series(mixed)
    # Ordered by series *number*: 2 before 10 although "10" < "2" as text.
    assert [s.name for s in listed] == ["2_T1_axial", "10_cor"]
    assert [s.uid for s in listed] == ["1.2.840.99.1", "1.2.840.99.2"]
    assert [s.number for s in listed] == [2, 10]
    assert [s.description for s in listed] == ["T1 axial", "cor"]
    assert listed[0].files == tuple(sorted(ax_files)) and listed[1].files == tuple(cor_files)
    assert all(s.folder == mixed for s in listed)

    pairs = read_dicom_folder(mixed)
    assert [s for s, _ in pairs] == listed
    (_, ax), (_, cor) = pairs
    assert ax.array.shape == (3, 4, 5) and cor.array.shape == (2, 6, 3)
    assert ax.source == mixed and cor.source == mixed
    np.testing.assert_allclose(ax.spacing, (2.5, 0.8, 0.6))
    np.testing.assert_allclose(cor.spacing, (4.0, 1.5, 1.2))
    # Axial: RAS = diag(-0.6, -0.8, 2.5) from the LPS corner (-10, -20, 0).
    np.testing.assert_allclose(ax.affine, [[-0.6, 0, 0, 10], [0, -0.8, 0, 20],
                                           [0, 0, 2.5, 0], [0, 0, 0, 1]], atol=1e-9)
    # Coronal: columns go -z, slices go +y LPS (= -y RAS), from (0, -4, 40) LPS.
    np.testing.assert_allclose(cor.affine, [[-1.2, 0, 0, 0], [0, 0, -4.0, 4.0],
                                            [0, -1.5, 0, 40.0], [0, 0, 0, 1]], atol=1e-9)
    # Slices sorted by position, not by file name: ax0 (z = 5) is the last plane.
    np.testing.assert_array_equal(ax.array[:, 0, 0], [200 - 1000, 100 - 1000, 0 - 1000])
    np.testing.assert_array_equal(cor.array[1, 5, 2], 100 + 52 - 1000)

    # Each volume is exactly what the series gives when read on its own.
    for vol, files, name in ((ax, ax_files, "ax_only"), (cor, cor_files, "cor_only")):
        alone = _alone(files, tmp_path / name)
        np.testing.assert_array_equal(vol.array, alone.array)
        np.testing.assert_array_equal(vol.affine, alone.affine)
        assert vol.spacing == alone.spacing
    for series, vol in pairs:
        again = read_dicom_series(series)
        np.testing.assert_array_equal(again.array, vol.array)
        np.testing.assert_array_equal(again.affine, vol.affine)
        assert again.source == mixed
    assert read_dicom_series(listed[1], tmp_path / "elsewhere").source == tmp_path / "elsewhere"


def test_read_image_on_several_series_names_them_and_the_way_out(tmp_path: Path) -> None:
    _axial(tmp_path / "study", number=3, description="T2")
    _coronal(tmp_path / "study", number=4, description=None)
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "study")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'study'}: holds 2 DICOM series (3_T2, 4)")
    assert "samed_adapter.io.read_dicom_folder" in message
    assert f"samed-adapter segment {tmp_path / 'study'}" in message


def test_name_collisions_get_the_uid_tail(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _axial(folder, uid="1.2.840.99.123456789.1", number=3, description="T1")
    _coronal(folder, uid="1.2.840.99.987654321.2", number=3, description="t1")  # same on macOS
    _series(folder, "loc", uid="1.2.840.99.5", iop=AXIAL, spacing=[1.0, 1.0], shape=(2, 2),
            origins=[[0.0, 0.0, 0.0]], number=1, description="T1")
    names = [s.name for s in list_dicom_series(folder)]
    # Digits of the UIDs without dots: ...1234567891 and ...9876543212.
    assert names == ["1_T1", "3_T1_34567891", "3_t1_76543212"]
    assert len({n.casefold() for n in names}) == 3


def test_names_are_sanitised_and_fall_back_to_the_uid(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _axial(folder, uid="1.2.840.99.100", number=5, description="T1 w/ contrast: (ax) ")
    _coronal(folder, uid="1.2.840.99.200", number=None, description="Hüfte/../x")
    _series(folder, "n", uid="1.2.840.99.300", iop=AXIAL, spacing=[1.0, 1.0], shape=(2, 2),
            origins=[[0.0, 0.0, 0.0]], number=7, description=None)
    _series(folder, "u", uid="1.2.840.99.12345.6789", iop=AXIAL, spacing=[1.0, 1.0],
            shape=(2, 2), origins=[[0.0, 0.0, 0.0]], number=None, description=None)
    names = {s.uid: s.name for s in list_dicom_series(folder)}
    assert names == {
        "1.2.840.99.100": "5_T1_w_contrast_ax",
        "1.2.840.99.200": "H_fte_.._x",
        "1.2.840.99.300": "7",
        "1.2.840.99.12345.6789": "23456789",  # no number, no description: UID digits
    }
    assert all(c.isascii() and (c.isalnum() or c in "._-") for n in names.values() for c in n)
    # A missing SeriesNumber sorts after the numbered series, then by UID.
    assert [s.number for s in list_dicom_series(folder)] == [5, 7, None, None]


def test_bad_series_is_listed_but_refused_when_read(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _axial(folder, number=1, description="good")
    _series(folder, "tilt", uid="1.2.840.99.9", iop=AXIAL, spacing=[1.0, 1.0], shape=(3, 3),
            origins=[[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]], number=2, description="bad")
    write_ct_slice(folder / "tilt1.dcm", np.zeros((3, 3)), [0.0, 0.0, 3.0], iop=TILTED,
                   spacing=[1.0, 1.0], series="1.2.840.99.9", number=2, description="bad")
    good, bad = list_dicom_series(folder)
    assert (good.name, bad.name) == ("1_good", "2_bad") and len(bad.files) == 2

    with pytest.raises(ImageReadError, match=r"orientation.*differs") as err:
        read_dicom_series(bad)
    assert "tilt1.dcm" in str(err.value)
    with pytest.raises(ImageReadError, match=r"orientation.*differs"):
        read_dicom_folder(folder)
    assert read_dicom_series(good).array.shape == (3, 4, 5)  # the others stay readable


def test_duplicate_positions_and_empty_folders_still_refused(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _series(folder, "echo", uid="1.2.840.99.7", iop=AXIAL, spacing=[1.0, 1.0], shape=(2, 2),
            origins=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], number=1, description="echoes")
    (series,) = list_dicom_series(folder)
    with pytest.raises(ImageReadError, match="share one position"):
        read_dicom_series(series)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    for call in (list_dicom_series, read_dicom_folder):
        with pytest.raises(ImageReadError, match="no DICOM image slices with ImagePositionPatient,"
                                                 " ImageOrientationPatient, PixelSpacing") as err:
            call(tmp_path / "empty")
        assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(ImageReadError, match="not a folder"):
        list_dicom_series(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ValueError, match="at least one slice"):
        DicomSeries("1.2", "x", ())


def test_single_series_folder_unchanged(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    ct = get_testdata_file("CT_small.dcm", download=False)  # bundled; never go online
    if ct is None:
        pytest.skip("pydicom test data CT_small.dcm is not installed")
    ref = pydicom.dcmread(ct)
    folder = tmp_path / "ct"
    folder.mkdir()
    for name, shift in (("z2", 2), ("z0", 0), ("z1", 1)):
        ds = pydicom.dcmread(ct)
        x, y, z = (float(v) for v in ref.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y:.6f}", f"{z + 5 * shift:.6f}"]
        ds.PixelData = (ds.pixel_array + 10 * shift).astype(ds.pixel_array.dtype).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / name)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evenly spaced: nothing to warn about
        vol = read_image(folder)
    assert vol.array.shape == (3, 128, 128) and vol.source == folder
    for z in range(3):
        expected = apply_modality_lut(ref.pixel_array, ref) + 10 * z
        np.testing.assert_array_equal(vol.array[z], expected)
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [158.135803, 179.035797, -75.699997, 1])

    (series,) = list_dicom_series(folder)
    assert (series.uid, series.name, series.number, series.description) == (
        ref.SeriesInstanceUID, "1", 1, "")
    assert series.files == (folder / "z0", folder / "z1", folder / "z2")
    ((same, other),) = read_dicom_folder(folder)
    assert same == series
    np.testing.assert_array_equal(other.array, vol.array)
    np.testing.assert_array_equal(other.affine, vol.affine)


def test_left_out_localizer_warning_points_at_the_caller(tmp_path: Path) -> None:
    folder = tmp_path / "scout"
    # Three slices 2.5 mm apart and one 100 mm away (a localizer stored in the series).
    _series(folder, "g", uid="1.2.840.99.8", iop=AXIAL, spacing=[1.0, 1.0], shape=(2, 2),
            origins=[[0.0, 0.0, 0.0], [0.0, 0.0, 2.5], [0.0, 0.0, 5.0], [0.0, 0.0, 105.0]])
    (series,) = list_dicom_series(folder)
    for read in (lambda: read_image(folder), lambda: read_dicom_series(series),
                 lambda: read_dicom_folder(folder)[0][1]):
        with pytest.warns(UserWarning, match="left out 1 slice.* at 105.00 mm") as record:
            volume = read()
        assert record[0].filename == __file__
        assert volume.array.shape == (3, 2, 2) and volume.positions == (0.0, 2.5, 5.0)
        assert len(volume.messages) == 1 and "105.00" in volume.messages[0]


def test_segment_writes_one_label_file_per_series_on_its_own_grid(tmp_path: Path) -> None:
    import nibabel as nib
    import torch

    import samed_adapter as sa
    from samed_adapter.cli import main as cli
    from samed_adapter.testing import random_adapter

    study = tmp_path / "study"
    _axial(study, number=2, description="T1 axial")
    _coronal(study, number=10, description="cor")
    sam = sa.build_sam("tiny", seed=0)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    config = sa.AdapterConfig(num_classes=2, image_size=64, intensity_window=(-1000.0, -900.0), orientation="LPS")
    adapter = random_adapter(sam, config, seed=2, scale=0.5).save(tmp_path / "a.safetensors")
    out = tmp_path / "labels"
    code = cli.main(["segment", "--sam", str(tmp_path / "sam.pth"), "--adapter", str(adapter), str(study),
                     "-o", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [  # hidden: what made them
        "study_10_cor.nii.gz", "study_2_T1_axial.nii.gz"]
    model = sa.patch(sam, adapter)
    for series, volume in read_dicom_folder(study):
        written = nib.load(out / f"study_{series.name}.nii.gz")
        assert written.shape == volume.voxels.shape  # each series keeps its own grid
        np.testing.assert_allclose(written.affine, volume.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(written.dataobj), volume.to_voxels(model.segment(volume)))
    sa.unpatch(sam)


def test_dicom_files_without_a_suffix_are_recognised_by_their_magic(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from samed_adapter.io import find_dicom, is_dicom_file

    # As on CDs and in PACS exports: no suffix. DICM at byte 128 says what it is.
    path = tmp_path / "IM000001"
    write_ct_slice(path, np.arange(12).reshape(3, 4), [1.0, 2.0, 3.0], iop=AXIAL, spacing=[0.5, 0.5], series="1.2.3")
    assert is_dicom_file(path) and not is_dicom_file(tmp_path)
    volume = read_image(path)
    assert volume.array.shape == (1, 3, 4) and volume.files == (path,)
    np.testing.assert_array_equal(volume.array[0], np.arange(12).reshape(3, 4) - 1000.0)

    # pydicom's CR1/6154: DICOM without a suffix, but a single projection image.
    cr = Path(get_testdata_file("DICOMDIR")).parent / "77654033" / "CR1" / "6154"
    assert is_dicom_file(cr)
    with pytest.raises(ImageReadError) as err:
        read_image(cr)
    assert "unknown image type" not in str(err.value)
    assert "6154: single projection image (CR): no slice position" in str(err.value)
    found = find_dicom(cr.parent)
    assert found.series == [] and found.skipped == [(cr, "single projection image (CR): no slice position "
                                                         "(ImagePositionPatient)")]

    notes = tmp_path / "README"
    notes.write_text("not an image")
    with pytest.raises(ImageReadError, match="unknown image type '\\(no suffix\\)'"):
        read_image(notes)


def test_one_series_in_two_frames_of_reference_is_refused_saying_why(tmp_path: Path) -> None:
    """Four axial slices of one SeriesInstanceUID, two in each of two frames of reference (a rescan
    after the patient moved, stored under one series): their positions are in different coordinate
    systems. They were stacked into one volume without a word (and a DICOM-SEG then failed with
    highdicom's "Source images must all be part of the same series and must have the same image
    dimensions"); now reading refuses them, naming both frames."""
    from samed_adapter.cli import main as cli

    folder = tmp_path / "ct"
    folder.mkdir()
    frames = [generate_uid(), generate_uid()]
    for k in range(4):
        write_ct_slice(folder / f"s{k}.dcm", np.full((4, 5), 100 * k), [-10.0, -20.0, 2.5 * k], iop=AXIAL,
                       spacing=[0.8, 0.6], series="1.2.840.99.7", tags={"FrameOfReferenceUID": frames[k // 2]})
    with pytest.raises(ImageReadError, match="2 frames of reference") as refused:
        read_image(folder)
    assert all(uid in str(refused.value) for uid in frames) and "folder of its own" in str(refused.value)
    code = cli.main(["segment", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--adapter",
                     str(_tiny_adapter(tmp_path)), str(folder), "-o", str(tmp_path / "out")])
    assert code == 1 and not list((tmp_path / "out").glob("*.nii.gz"))
    for k in range(4):  # one frame of reference: one volume, as before
        write_ct_slice(folder / f"s{k}.dcm", np.full((4, 5), 100 * k), [-10.0, -20.0, 2.5 * k], iop=AXIAL,
                       spacing=[0.8, 0.6], series="1.2.840.99.7", tags={"FrameOfReferenceUID": frames[0]})
    assert read_image(folder).array.shape == (4, 4, 5)


def _tiny_adapter(tmp_path: Path) -> Path:
    from samed_adapter.testing.cli import two_adapters

    return two_adapters(tmp_path)["a"]
