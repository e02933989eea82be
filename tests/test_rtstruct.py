"""RTSTRUCT output (issue 23): contours on the source slices that fill back to the labels, in a
complete DICOM object of the source's patient, study and frame of reference. What other readers
(plastimatch, dcmrtstruct2nii, rt-utils) get back: tests/test_rtstruct_readback.py (issue 28)."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import samed_adapter as sa
from samed_adapter.io import Volume, colour_table, read_dicom_seg, read_image, read_rtstruct, write_rtstruct
from samed_adapter.io.outlines import INSET
from samed_adapter.testing import random_adapter
from samed_adapter.testing.cli import run
from samed_adapter.testing.dicom import copy_with_new_instances, write_ct_slice

pytest.importorskip("rt_utils")

TINY = ["--sam-backbone", "tiny", "--random-sam-seed", "0"]
NAMES = ["box", "ring", "strand", "absent"]  # class 4 never occurs in the labels
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _shapes(shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) hand-made classes: 1 an off-centre box, 2 a ring (a hole in it), 3 an L-shaped
    strand two pixels wide; slice 2 all background, class 4 nowhere."""
    depth, rows, cols = shape
    labels = np.zeros(shape, np.uint8)
    r, c = np.mgrid[:rows, :cols]
    for k in range(depth):
        if k == 2:
            continue
        labels[k, 3:11 + k, 5:25] = 1  # taller on each slice, so a slice-order mix-up shows
        ring = (np.hypot(r - 0.6 * rows, c - 0.6 * cols) <= 0.25 * min(rows, cols)) & \
               (np.hypot(r - 0.6 * rows, c - 0.6 * cols) > 0.1 * min(rows, cols))
        labels[k][ring] = 2
        labels[k, rows - 6:rows - 4, 2:cols // 2] = 3
        labels[k, rows // 2:rows - 4, 2:4] = 3
    return labels


def _only(labels: np.ndarray, classes) -> np.ndarray:
    """``labels`` with every class but ``classes`` made background: what an RTSTRUCT of them reads back as."""
    return np.where(np.isin(labels, list(classes)), labels, 0).astype(labels.dtype)


def _texts(ds: pydicom.Dataset) -> list[str]:
    """Every text value in ``ds``, nested sequences included."""
    found = []
    for element in ds.iterall():
        if element.VR in ("LO", "LT", "SH", "ST", "UT", "PN", "UC", "CS"):
            values = element.value if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
            found += [str(v) for v in values]
    return found


def _headers(volume: Volume) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.files]


def _floats(value: object) -> np.ndarray:
    return np.array([float(v) for v in value])  # type: ignore[attr-defined]


def _odd_series(folder: Path, zs: list[float], tilt: float = 0.8) -> Path:
    """A series rt-utils' own geometry gets wrong: oblique coronal slices of 40 x 56 pixels, pixel
    spacing 1.3 mm (rows) x 0.7 mm (columns), each slice shifted ``tilt`` mm down its columns (a
    gantry tilt), at positions ``zs`` along the normal; files named against slice order."""
    a = np.deg2rad(20.0)
    row_dir, col_dir = np.array([np.cos(a), np.sin(a), 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row_dir, col_dir)
    series = generate_uid()
    folder.mkdir(parents=True)
    pixels = np.add.outer(np.arange(40) * 10, np.arange(56)).astype(np.int16)
    for k, z in enumerate(zs):
        ipp = np.array([-30.0, 12.0, 40.0]) + z * normal + k * tilt * col_dir
        write_ct_slice(folder / f"{len(zs) - k:02d}.dcm", pixels + 50 * k, list(ipp),
                       iop=[*row_dir, *col_dir], spacing=[1.3, 0.7], series=series, instance=k + 1, number=7)
    for f in folder.iterdir():  # write_ct_slice leaves out the study, patient and frame of reference
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
        ds.PatientID, ds.PatientName = "odd-1", "Odd^Geometry"
        ds.save_as(f)
    return folder


# --------------------------------------------------------------------------- writing and reading back


def test_hand_made_shapes_fill_back_and_rt_utils_reads_them_alike(ct_folder: Path, tmp_path: Path) -> None:
    from rt_utils import RTStructBuilder

    volume = read_image(ct_folder)
    labels = _shapes(volume.array.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor may pydicom or rt-utils find anything to warn about
        out = write_rtstruct(labels, volume, NAMES, tmp_path / "out" / "rt.dcm", adapter_name="me/ct")
    assert out == tmp_path / "out" / "rt.dcm"
    assert [p.name for p in out.parent.iterdir()] == ["rt.dcm"]  # no temporary left behind

    back = read_rtstruct(out, volume)
    assert back.shape == labels.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)  # every pixel, the strand's and the ring's inner border too
    centre = int(0.6 * labels.shape[1]), int(0.6 * labels.shape[2])
    assert (labels[:, centre[0], centre[1]] == 0).all() and (back[:, centre[0], centre[1]] == 0).all()  # a hole

    # rt-utils' own reader (the folder, its slice order) fills the same voxels: the mask it
    # wants is (rows, columns, slices) in its order, which is ours for this series.
    rt = RTStructBuilder.create_from(str(ct_folder), str(out))
    assert rt.get_roi_names() == NAMES
    for c, name in enumerate(NAMES, start=1):
        np.testing.assert_array_equal(rt.get_roi_mask_by_name(name).transpose(2, 0, 1), back == c)


def test_contours_lie_where_the_pixels_are_on_odd_geometry(tmp_path: Path) -> None:
    """Non-square pixels and images, oblique slices, a gantry tilt and uneven spacing: each contour
    runs along pixel edges (INSET inside) of its class, on the very slice it references."""
    folder = _odd_series(tmp_path / "odd", [0.0, 2.5, 5.0, 10.0])
    volume = read_image(folder, allow_uneven=True)
    assert volume.uneven and volume.array.shape == (4, 40, 56)
    labels = _shapes(volume.array.shape)
    out = write_rtstruct(labels, volume, NAMES, tmp_path / "rt.dcm", adapter_name="a")
    headers, ds = _headers(volume), pydicom.dcmread(out)
    uids = [str(h.SOPInstanceUID) for h in headers]
    for roi in ds.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            k = uids.index(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            h = headers[k]
            iop, (dr, dc) = _floats(h.ImageOrientationPatient), _floats(h.PixelSpacing)
            d = _floats(contour.ContourData).reshape(-1, 3) - _floats(h.ImagePositionPatient)
            col, row, off = d @ iop[:3] / dc, d @ iop[3:] / dr, d @ np.cross(iop[:3], iop[3:])
            np.testing.assert_allclose(off, 0.0, atol=1e-4)  # in the slice's plane
            # Each point lies in a pixel of its class (a border pixel, or one a keyhole cut crosses),
            # and none on a pixel centre, where centre-inside readers would have to guess.
            on = labels[k][np.rint(row).astype(int), np.rint(col).astype(int)]
            assert (on == int(roi.ReferencedROINumber)).all()
            assert np.all(np.maximum(np.abs(col - np.rint(col)), np.abs(row - np.rint(row))) > 0.2)
            assert contour.NumberOfContourPoints == len(d)
    # The box of slice 1 spans rows 3..11 and columns 5..24: its outline runs along those pixels' outer edges.
    (box,) = [c for c in ds.ROIContourSequence[0].ContourSequence
              if c.ContourImageSequence[0].ReferencedSOPInstanceUID == uids[1]]
    h = headers[1]
    d = _floats(box.ContourData).reshape(-1, 3) - _floats(h.ImagePositionPatient)
    iop = _floats(h.ImageOrientationPatient)
    np.testing.assert_allclose([(d @ iop[:3] / 0.7).min(), (d @ iop[:3] / 0.7).max()],
                               [4.5 + INSET, 24.5 - INSET], atol=1e-5)
    np.testing.assert_allclose([(d @ iop[3:] / 1.3).min(), (d @ iop[3:] / 1.3).max()],
                               [2.5 + INSET, 11.5 - INSET], atol=1e-5)
    assert len(d) == 4

    np.testing.assert_array_equal(read_rtstruct(out, volume), labels)


def test_contours_without_image_references_go_to_their_plane(ct_folder: Path, tmp_path: Path) -> None:
    """ContourImageSequence is optional (other tools leave it out): the plane a contour lies on says
    its slice."""
    volume = read_image(ct_folder)
    labels = _shapes(volume.array.shape)
    out = write_rtstruct(labels, volume, NAMES, tmp_path / "rt.dcm", adapter_name="a")
    ds = pydicom.dcmread(out)
    for roi in ds.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            del contour.ContourImageSequence
    ds.save_as(tmp_path / "bare.dcm")
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "bare.dcm", volume), read_rtstruct(out, volume))


# --------------------------------------------------------------------------- what is recorded


def test_identity_algorithm_and_references(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _shapes(volume.array.shape)
    out = write_rtstruct(labels, volume, NAMES, tmp_path / "rt.dcm", adapter_name="me/ct-adapter",
                         adapter_fingerprint="sha256:" + "ab" * 32)
    ds, headers = pydicom.dcmread(out), _headers(volume)  # no force: a proper DICOM file
    source, uids = headers[0], [str(h.SOPInstanceUID) for h in headers]

    assert (ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID, ds.Modality) == (RTSTRUCT, RTSTRUCT, "RTSTRUCT")
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID and ds.SOPInstanceUID not in uids
    # The source's patient and study; a new series in it, numbered after the source (and its SEG).
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "StudyDate", "StudyTime"):
        assert ds[keyword].value == source[keyword].value, keyword
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesNumber == source.SeriesNumber + 1001 and ds.InstanceNumber == 1
    assert ds.SeriesDescription == "samed-adapter me/ct-adapter"
    # The algorithm: this library, its version, the adapter by name and fingerprint.
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("samed-adapter", "samed-adapter")
    assert ds.SoftwareVersions == sa.__version__ and "InstitutionName" not in ds
    assert str(ds.OperatorsName) == "samed-adapter^"
    assert (ds.StructureSetLabel, ds.StructureSetName) == ("samed-adapter", "me/ct-adapter")
    assert ds.StructureSetDescription == \
        f"samed-adapter {sa.__version__}, adapter_fingerprint=sha256:{'ab' * 32}, adapter=me/ct-adapter"
    assert ds.ApprovalStatus == "UNAPPROVED"

    # The frame of reference and every slice of the source series.
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == source.FrameOfReferenceUID
    (series,) = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == uids

    # One ROI per class: number = class id, named, coloured as the overlays, an ORGAN.
    assert [r.ROINumber for r in ds.StructureSetROISequence] == [1, 2, 3, 4]
    assert [r.ROIName for r in ds.StructureSetROISequence] == NAMES
    for c, (roi, contours, observation) in enumerate(zip(ds.StructureSetROISequence, ds.ROIContourSequence,
                                                         ds.RTROIObservationsSequence), start=1):
        assert roi.ReferencedFrameOfReferenceUID == source.FrameOfReferenceUID
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC" and "me/ct-adapter" in roi.ROIGenerationDescription
        assert contours.ReferencedROINumber == c
        assert list(contours.ROIDisplayColor) == [int(v) for v in colour_table(c)[c]]
        assert (observation.ReferencedROINumber, observation.ObservationNumber) == (c, c)
        assert (observation.RTROIInterpretedType, observation.ROIObservationLabel) == ("ORGAN", NAMES[c - 1])
        referenced = {i.ReferencedSOPInstanceUID for s in contours.get("ContourSequence", [])
                      for i in s.ContourImageSequence}
        slices = {uids[k] for k in range(len(uids)) if (labels[k] == c).any()}
        assert referenced == slices  # contours on exactly the slices holding the class
        assert all(s.ContourGeometricType == "CLOSED_PLANAR" for s in contours.get("ContourSequence", []))
    assert len(ds.ROIContourSequence[3].ContourSequence) == 0  # the absent class: named, no contours


def test_a_local_adapter_is_named_by_its_file_name_only(ct_folder: Path, tmp_path: Path) -> None:
    """The path an adapter was loaded from says where the file was made: no text of the RTSTRUCT holds it."""
    volume = read_image(ct_folder)
    local = tmp_path / "home" / "me" / "adapters" / "ct.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"")
    for given in (str(local), local, str(tmp_path / "home" / "me" / "adapters") + "/"):
        out = write_rtstruct(_shapes(volume.array.shape), volume, NAMES, tmp_path / "rt.dcm", adapter_name=given,
                             adapter_fingerprint="sha256:" + "cd" * 32)
        ds = pydicom.dcmread(out)
        name = "adapters" if str(given).endswith("/") else "ct.safetensors"
        assert (ds.StructureSetName, ds.SeriesDescription) == (name, f"samed-adapter {name}")
        assert ds.StructureSetDescription.endswith(f"adapter_fingerprint=sha256:{'cd' * 32}, adapter={name}")
        assert all(r.ROIGenerationDescription.endswith(f" {name}") for r in ds.StructureSetROISequence)
        assert not [t for t in _texts(ds) if "home" in t], given


def test_classes_subset_and_all_background(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _shapes(volume.array.shape)
    out = write_rtstruct(labels, volume, NAMES, tmp_path / "rt2.dcm", adapter_name="a", classes=[2])
    (roi,) = pydicom.dcmread(out).StructureSetROISequence
    assert (roi.ROINumber, roi.ROIName) == (2, "ring")
    np.testing.assert_array_equal(read_rtstruct(out, volume), _only(labels, [2]))

    out = write_rtstruct(np.zeros(volume.array.shape, bool), volume, NAMES, tmp_path / "none.dcm", adapter_name="a")
    assert len(pydicom.dcmread(out).StructureSetROISequence) == 4
    assert not read_rtstruct(out, volume).any()


def test_bad_inputs_raise_and_write_nothing(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _shapes(volume.array.shape)
    out = tmp_path / "rt.dcm"
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), np.float32))
    npy = read_image(tmp_path / "x.npy")
    cases = [  # (what is wrong, what the error says)
        (lambda: write_rtstruct(np.zeros((2, 3, 4), np.uint8), npy, NAMES, out, adapter_name="a"),
         "DICOM-RTSTRUCT needs a DICOM series input.*write NIfTI"),
        (lambda: read_rtstruct(out, npy), "DICOM-RTSTRUCT needs a DICOM series input"),
        (lambda: write_rtstruct(labels[..., :-1], volume, NAMES, out, adapter_name="a"),
         r"labels shape \(4, 128, 127\) does not match"),
        (lambda: write_rtstruct(labels + 1, volume, NAMES[:2], out, adapter_name="a"),
         "outside 0..2.*one name per class"),
        (lambda: write_rtstruct(labels, volume, NAMES, out, adapter_name="a", classes=[5]), "subset of 1..4"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    first = sorted(ct_folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    del ds.FrameOfReferenceUID
    ds.save_as(first)
    with pytest.raises(ValueError, match=f"{first.name}: lacks FrameOfReferenceUID, which a DICOM-RTSTRUCT"):
        write_rtstruct(labels, read_image(ct_folder), NAMES, out, adapter_name="a")
    assert not list(tmp_path.glob("*.dcm"))


def test_read_refuses_another_series_and_other_objects(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    out = write_rtstruct(_shapes(volume.array.shape), volume, NAMES, tmp_path / "rt.dcm", adapter_name="a")
    other = copy_with_new_instances(volume.files, tmp_path / "other")  # same pixels and geometry
    with pytest.raises(ValueError, match="not one of .*read it with the series it was made from"):
        read_rtstruct(out, read_image(other))
    with pytest.raises(ValueError, match="is not an RT Structure Set"):
        read_rtstruct(volume.files[0], volume)


def test_a_failed_write_leaves_the_existing_file(ct_folder: Path, tmp_path: Path, monkeypatch) -> None:
    volume = read_image(ct_folder)
    out = tmp_path / "rt.dcm"
    out.write_bytes(b"an earlier structure set")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.Dataset, "save_as", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_rtstruct(_shapes(volume.array.shape), volume, NAMES, out, adapter_name="a")
    assert out.read_bytes() == b"an earlier structure set"
    assert [p.name for p in tmp_path.iterdir() if p.name != "ct"] == ["rt.dcm"]


# --------------------------------------------------------------------------- `segment --output-type dicom-rtstruct`


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random adapter for the tiny SAM that finds several classes in conftest's CT series."""
    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=3, image_size=64, class_names=["fat", "soft tissue", "bone"],
                              intensity_window=(-200.0, 300.0), orientation="LPS")
    return random_adapter(sam, config, seed=5, scale=0.5).save(tmp_path_factory.mktemp("a") / "ct.safetensors")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_segment_writes_nifti_seg_and_rtstruct_of_the_same_labels(adapter, ct_folder, capsys, tmp_path):
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, ct_folder, "-o", tmp_path / "out",
                         "--output-type", "nifti,dicom-seg,dicom-rtstruct")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["ct.nii.gz", "ct_rtstruct.dcm", "ct_seg.dcm"]
    volume = read_image(ct_folder)
    labels = read_dicom_seg(tmp_path / "out" / "ct_seg.dcm", volume)
    np.testing.assert_array_equal(volume.to_voxels(labels), np.asarray(nib.load(tmp_path / "out" / "ct.nii.gz").dataobj))
    present = [c for c in (1, 2, 3) if (labels == c).any()]
    assert len(present) >= 2, present  # several classes, or the test would prove little
    back = read_rtstruct(tmp_path / "out" / "ct_rtstruct.dcm", volume)
    np.testing.assert_array_equal(back, labels)
    ds = pydicom.dcmread(tmp_path / "out" / "ct_rtstruct.dcm")
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["fat", "soft tissue", "bone"]
    assert f"adapter_fingerprint={sa.Adapter.load(adapter).fingerprint}" in ds.StructureSetDescription
    # The adapter by its file name and fingerprint; the folder it was loaded from nowhere.
    assert ds.StructureSetName == adapter.name and ds.StructureSetDescription.endswith(f"adapter={adapter.name}")
    assert not [t for t in _texts(ds) if str(adapter.parent) in t]
    seg = pydicom.dcmread(tmp_path / "out" / "ct_seg.dcm")
    assert ds.SeriesInstanceUID != seg.SeriesInstanceUID and ds.StudyInstanceUID == seg.StudyInstanceUID


def test_segment_rtstruct_of_an_uneven_series(adapter, capsys, tmp_path):
    """An unevenly spaced series gets no NIfTI, but an RTSTRUCT (each contour on its own slice)."""
    folder = _odd_series(tmp_path / "odd", [0.0, 2.5, 5.0, 10.0])
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, folder, "-o", tmp_path / "out",
                       "--output-type", "dicom-rtstruct,dicom-seg", "--window", "0,300")
    assert code == 0, err
    assert _tree(tmp_path / "out") == ["odd_rtstruct.dcm", "odd_seg.dcm"]
    volume = read_image(folder, allow_uneven=True)
    labels = read_dicom_seg(tmp_path / "out" / "odd_seg.dcm", volume)
    assert labels.any()
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "out" / "odd_rtstruct.dcm", volume), labels)


def test_a_nifti_input_is_refused_with_the_reason(adapter, capsys, tmp_path, ct_series):
    scan = tmp_path / "in" / "mr.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 100, (40, 36, 4)).astype(np.float32),
                             np.diag([1.0, 1.0, 2.0, 1.0])), scan)
    code, _, err = run(capsys, "segment", *TINY, "--adapter", adapter, scan, "-o", tmp_path / "o",
                       "--output-type", "dicom-rtstruct")
    assert code == 2 and err.count("error:") == 1
    assert f"--output-type dicom-rtstruct needs DICOM inputs (series folders or .dcm files), but {scan} is not " \
           "one; segment NIfTI, PNG and NPY inputs with --output-type nifti" in err, err
    assert not (tmp_path / "o").exists()

    # In a folder beside a series: the NIfTI fails alone, with the reason; or gets its label file.
    shutil.copytree(ct_series, tmp_path / "in" / "ct")
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, tmp_path / "in", "-o", tmp_path / "o",
                         "--output-type", "dicom-rtstruct")
    assert code == 1
    assert f"{scan}: not a DICOM input, so no RTSTRUCT can reference it; segment it with --output-type nifti" in err
    assert _tree(tmp_path / "o") == ["ct_rtstruct.dcm"]
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, tmp_path / "in", "-o", tmp_path / "o2",
                         "--output-type", "nifti,dicom-rtstruct")
    assert code == 0, err
    assert _tree(tmp_path / "o2") == ["ct.nii.gz", "ct_rtstruct.dcm", "mr.nii.gz"]


def test_the_rtstruct_never_overwrites_an_input(adapter, capsys, tmp_path, ct_series):
    """`segment ct/ out/ct_rtstruct.dcm -o out`: the series' RTSTRUCT would be a DICOM input."""
    shutil.copytree(ct_series, tmp_path / "ct")
    victim = tmp_path / "out" / "ct_rtstruct.dcm"
    victim.parent.mkdir()
    shutil.copy(sorted((tmp_path / "ct").iterdir())[0], victim)
    before = hashlib.sha256(victim.read_bytes()).hexdigest()
    code, out, err = run(capsys, "segment", *TINY, "--adapter", adapter, tmp_path / "ct", victim,
                         "-o", tmp_path / "out", "--output-type", "dicom-rtstruct")
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == before
    assert f"its output {victim} would overwrite the input {victim}" in err, err
    assert code == 1


def test_a_long_outline_is_written_whole(tmp_path: Path) -> None:
    """An outline of thousands of points has more than the 64 KB of text that an element holds in
    explicit VR (pydicom wrote it as UN, which no reader takes for coordinates): the file is implicit
    VR, as rt-utils and planning systems write structure sets, and reads back whole."""
    from samed_adapter.testing.dicom import write_ct_series

    folder = write_ct_series(tmp_path / "ct", (2, 400, 400), iop=[1, 0, 0, 0, 1, 0], spacing=[0.7, 0.7])
    volume = read_image(folder)
    r, c = np.mgrid[:400, :400]
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[1][(np.abs(r - c) <= 2) | (np.abs(r + c - 399) <= 2)] = 1  # an X of staircases: ~3,200 corners
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_rtstruct(labels, volume, NAMES[:1], tmp_path / "rt.dcm", adapter_name="a")
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    (contour,) = ds.ROIContourSequence[0].ContourSequence
    assert contour.NumberOfContourPoints > 3000 and len(contour.ContourData) == 3 * contour.NumberOfContourPoints
    np.testing.assert_array_equal(read_rtstruct(out, volume), labels)


def test_damaged_contour_data_is_refused_naming_the_file(ct_folder: Path, tmp_path: Path) -> None:
    from pydicom.charset import default_encoding
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    volume = read_image(ct_folder)
    out = write_rtstruct(_shapes(volume.array.shape), volume, NAMES, tmp_path / "rt.dcm", adapter_name="a")
    for damage in (b"1.5\\nan\\2.0 ", b"1.5\\2.0\\x3 ", b"1.5\\2.0 "):  # not finite, not a number, not triples
        ds = pydicom.dcmread(out)
        contour = ds.ROIContourSequence[1].ContourSequence[0]
        contour[0x30060050] = RawDataElement(Tag(0x30060050), "DS", len(damage), damage, 0, True, True)
        contour.set_original_encoding(True, True, default_encoding)  # written as given, unchecked
        ds.save_as(tmp_path / "damaged.dcm")
        with pytest.raises(ValueError, match="damaged.dcm: ROI 2 has a contour whose ContourData are not x, y, z "
                                             "triples of numbers"):
            read_rtstruct(tmp_path / "damaged.dcm", volume)
