"""DICOM-SEG output: the SEG references its source slices, decodes back exactly and names its classes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import samed_adapter
from samed_adapter.io import Volume, read_image
from samed_adapter.io.dicom_seg import read_dicom_seg, write_dicom_seg
from samed_adapter.testing.dicom import copy_with_new_instances

hd = pytest.importorskip("highdicom")


def _floats(value: object) -> list[float]:
    return [float(v) for v in value]  # type: ignore[attr-defined]

NAMES = ["soft tissue", "bone", "metal"]  # class 3 never occurs in the labels
SLICE_FILES = ["c.dcm", "a.dcm", "d.dcm", "b.dcm"]  # conftest's ct_folder: path order != slice order


def _labels(volume: Volume) -> np.ndarray:
    """(D, H, W) classes 1 and 2 by thresholds, class 3 absent, slice 2 all background."""
    labels = (volume.array > 0).astype(np.uint8) + (volume.array > 200)
    labels[2] = 0
    return labels


def _source(volume: Volume) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.files]


def test_volume_files_follow_slice_positions(ct_folder: Path) -> None:
    volume = read_image(ct_folder)
    assert [f.name for f in volume.files] == SLICE_FILES
    z = [float(ds.ImagePositionPatient[2]) for ds in _source(volume)]
    assert z == sorted(z) and np.allclose(np.diff(z), 5.0)
    for k, f in enumerate(volume.files):  # array[k] really comes from files[k]
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(volume.array[k], ds.pixel_array + float(ds.RescaleIntercept))


def test_other_formats_have_no_files(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), np.float32))
    assert read_image(tmp_path / "x.npy").files == ()
    with pytest.raises(ValueError, match="3 files but array .* has 2 slices"):
        Volume(np.zeros((2, 3, 4), np.float32), files=("a", "b", "c"))


def test_round_trip_and_references(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _labels(volume)
    out = write_dicom_seg(labels, volume, NAMES, tmp_path / "out" / "seg.dcm", adapter_name="me/ct-adapter")
    assert out == tmp_path / "out" / "seg.dcm"
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]  # no temporary left behind

    back = read_dicom_seg(out, volume)
    assert back.shape == labels.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)

    seg, sources = pydicom.dcmread(out), _source(volume)  # no force: a proper DICOM file
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence) == sorted(uids)
    # Decode every frame by hand: source slice by UID, position, segment number, pixels.
    frames = seg.pixel_array.reshape(-1, *labels.shape[1:])
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        k = uids.index(source.ReferencedSOPInstanceUID)
        segment = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        ipp = _floats(item.PlanePositionSequence[0].ImagePositionPatient)
        np.testing.assert_allclose(ipp, _floats(sources[k].ImagePositionPatient), atol=1e-5)
        np.testing.assert_array_equal(frame, labels[k] == segment)
        seen.add((k, segment))
    # Empty frames are omitted: slice 2 and class 3 have none, every other pair has one.
    assert seen == {(k, c) for k in (0, 1, 3) for c in (1, 2)}
    assert seg.NumberOfFrames == len(seen)


def test_metadata_names_classes_algorithm_and_new_series(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    out = write_dicom_seg(_labels(volume), volume, NAMES, tmp_path / "seg.dcm",
                          adapter_name="me/ct-adapter", series_description="CT organs")
    seg, source = pydicom.dcmread(out), _source(volume)[0]

    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3]  # = class ids
    assert [s.SegmentLabel for s in seg.SegmentSequence] == NAMES
    assert [s.SegmentDescription for s in seg.SegmentSequence] == NAMES
    for c, segment in enumerate(seg.SegmentSequence, start=1):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"  # SCT Tissue
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "samed-adapter"
        assert algorithm.AlgorithmVersion == samed_adapter.__version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert algorithm.AlgorithmParameters == f"class_id={c},adapter=me/ct-adapter"
    assert seg.SeriesDescription == "CT organs"
    assert "me/ct-adapter" in seg.ContentDescription
    assert (seg.Manufacturer, seg.SoftwareVersions) == ("samed-adapter", samed_adapter.__version__)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SOPInstanceUID not in {str(ds.SOPInstanceUID) for ds in _source(volume)}
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.PatientID, seg.PatientName) == (source.PatientID, source.PatientName)
    assert seg.SeriesNumber == source.SeriesNumber + 1000

    # highdicom reads it back as a segmentation of exactly these slices.
    parsed = hd.seg.segread(out)
    assert parsed.segment_numbers == [1, 2, 3]
    assert {str(uid) for _, _, uid in parsed.get_source_image_uids()} == \
        {str(ds.SOPInstanceUID) for ds in _source(volume)}


def test_a_local_adapter_is_named_by_its_file_name_only(ct_folder: Path, tmp_path: Path) -> None:
    """The path an adapter was loaded from says where the file was made: the SEG names the file only."""
    volume = read_image(ct_folder)
    local = tmp_path / "home" / "me" / "adapters" / "ct.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"")
    out = write_dicom_seg(_labels(volume), volume, NAMES, tmp_path / "seg.dcm", adapter_name=str(local),
                          adapter_fingerprint="sha256:" + "cd" * 32)
    ds = pydicom.dcmread(out)
    assert ds.ContentDescription == "samed-adapter ct.safetensors"
    parameters = [s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters for s in ds.SegmentSequence]
    assert all(p.endswith(",adapter=ct.safetensors") for p in parameters), parameters
    assert "home" not in ds.to_json()


def test_classes_subset_writes_only_those_segments(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _labels(volume)
    out = write_dicom_seg(labels, volume, NAMES, tmp_path / "seg.dcm", adapter_name="a.safetensors",
                          classes=[2])
    (segment,) = pydicom.dcmread(out).SegmentSequence
    # BINARY segments are numbered from 1 without gaps; the class id travels in the parameters.
    assert (segment.SegmentNumber, segment.SegmentLabel) == (1, "bone")
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters.startswith("class_id=2,")
    np.testing.assert_array_equal(read_dicom_seg(out, volume), np.where(labels == 2, 2, 0))

    out = write_dicom_seg(labels, volume, NAMES, tmp_path / "seg13.dcm", adapter_name="a", classes=[3, 1])
    assert [s.SegmentLabel for s in pydicom.dcmread(out).SegmentSequence] == ["soft tissue", "metal"]
    np.testing.assert_array_equal(read_dicom_seg(out, volume), np.where(labels == 1, 1, 0))


def test_all_background_is_written_and_read(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    out = write_dicom_seg(np.zeros(volume.array.shape, bool), volume, NAMES, tmp_path / "seg.dcm",
                          adapter_name="a")
    assert len(pydicom.dcmread(out).SegmentSequence) == 3
    back = read_dicom_seg(out, volume)
    assert back.shape == volume.array.shape and not back.any()


def test_bad_inputs_raise_and_write_nothing(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    labels = _labels(volume)
    out = tmp_path / "seg.dcm"
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), np.float32))
    npy = read_image(tmp_path / "x.npy")
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM series input.*write NIfTI"):
        write_dicom_seg(np.zeros((2, 3, 4), np.uint8), npy, NAMES, out, adapter_name="a")
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM series input"):
        read_dicom_seg(out, npy)
    with pytest.raises(ValueError, match=r"labels shape \(4, 128, 127\) does not match"):
        write_dicom_seg(labels[..., :-1], volume, NAMES, out, adapter_name="a")
    with pytest.raises(ValueError, match="outside 0..2.*one name per class"):
        write_dicom_seg(labels + 1, volume, NAMES[:2], out, adapter_name="a")
    with pytest.raises(ValueError, match="non-integer"):
        write_dicom_seg(labels + 0.5, volume, NAMES, out, adapter_name="a")
    for classes in ([], [0], [4]):
        with pytest.raises(ValueError, match="subset of 1..3"):
            write_dicom_seg(labels, volume, NAMES, out, adapter_name="a", classes=classes)
    assert not list(tmp_path.glob("*.dcm"))


def test_read_rejects_another_series(ct_folder: Path, tmp_path: Path) -> None:
    volume = read_image(ct_folder)
    out = write_dicom_seg(_labels(volume), volume, NAMES, tmp_path / "seg.dcm", adapter_name="a")
    other = copy_with_new_instances(volume.files, tmp_path / "other")  # same pixels and geometry
    with pytest.raises(ValueError, match="not slices of .*the series it was made from"):
        read_dicom_seg(out, read_image(other))


def test_stripped_headers_filled_or_refused(ct_folder: Path, tmp_path: Path) -> None:
    """De-identified series may lack type-2 tags (written empty) but not the shared UIDs."""
    files = sorted(ct_folder.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        for tag in ("PatientID", "PatientName", "PatientSex", "StudyDate", "SliceThickness"):
            delattr(ds, tag)
        ds.save_as(f)
    volume = read_image(ct_folder)
    labels = _labels(volume)
    out = write_dicom_seg(labels, volume, NAMES, tmp_path / "seg.dcm", adapter_name="a")
    seg = pydicom.dcmread(out)
    assert (seg.PatientID, seg.PatientName, seg.PatientSex, seg.StudyDate) == ("", "", "", "")
    # The slice step stands in for the missing SliceThickness in the pixel measures.
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 5.0
    np.testing.assert_array_equal(read_dicom_seg(out, volume), labels)

    ds = pydicom.dcmread(files[1])
    del ds.FrameOfReferenceUID
    ds.save_as(files[1])
    with pytest.raises(ValueError, match=f"{files[1].name}: lacks FrameOfReferenceUID.*write NIfTI"):
        write_dicom_seg(labels, read_image(ct_folder), NAMES, tmp_path / "seg2.dcm", adapter_name="a")
    assert not (tmp_path / "seg2.dcm").exists()


# Every type 1 (present, not empty) and type 2 (present, may be empty) attribute of the
# Segmentation IOD's modules (DICOM PS3.3 A.51) that applies to a BINARY SEG of a CT/MR series,
# module by module. Conditional (1C/2C) ones are listed where their condition holds here.
_TYPE1 = {
    "SOP Common": ["SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet"],
    "General Study": ["StudyInstanceUID"],
    "General Series": ["Modality", "SeriesInstanceUID"],
    "Segmentation Series": ["Modality", "SeriesNumber"],
    "Frame of Reference": ["FrameOfReferenceUID"],
    "Enhanced General Equipment": ["Manufacturer", "ManufacturerModelName", "DeviceSerialNumber",
                                   "SoftwareVersions"],
    "Image Pixel": ["SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "PixelRepresentation", "PixelData"],
    "Segmentation Image": ["ImageType", "InstanceNumber", "ContentLabel", "LossyImageCompression",
                           "SegmentationType", "SegmentSequence"],
    "Multi-frame Functional Groups": ["PerFrameFunctionalGroupsSequence", "InstanceNumber", "ContentDate",
                                      "ContentTime", "NumberOfFrames"],
    "Multi-frame Dimension": ["DimensionOrganizationSequence", "DimensionIndexSequence"],
    "Common Instance Reference": ["ReferencedSeriesSequence"],
}
_TYPE2 = {
    "Patient": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"],
    "General Study": ["StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"],
    "General Series": ["SeriesNumber"],
    "Frame of Reference": ["PositionReferenceIndicator"],
    "General Equipment": ["Manufacturer"],
    "General Image": ["InstanceNumber"],
    "Segmentation Image": ["ContentDescription", "ContentCreatorName"],
    "Multi-frame Functional Groups": ["SharedFunctionalGroupsSequence"],
}
_SEGMENT_TYPE1 = ["SegmentNumber", "SegmentLabel", "SegmentedPropertyCategoryCodeSequence",
                  "SegmentedPropertyTypeCodeSequence", "SegmentAlgorithmType",
                  "SegmentAlgorithmName", "SegmentationAlgorithmIdentificationSequence"]  # 1C: not MANUAL
_ALGORITHM_TYPE1 = ["AlgorithmFamilyCodeSequence", "AlgorithmName", "AlgorithmVersion"]
# Functional group macros a SEG of a series with a frame of reference needs, each in the shared
# item or in every per-frame item (PS3.3 A.51.5).
_FUNCTIONAL_GROUPS = ["PixelMeasuresSequence", "PlanePositionSequence", "PlaneOrientationSequence",
                      "DerivationImageSequence", "FrameContentSequence", "SegmentIdentificationSequence"]
# What de-identification tools drop: none of it may leave a required attribute out of the SEG.
_DROPPABLE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
              "SeriesNumber", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
              "DeviceSerialNumber", "SliceThickness")


def _missing(ds: pydicom.Dataset, type1: list[str], type2: list[str], where: str) -> list[str]:
    """What of ``type1`` is absent or empty and of ``type2`` absent in ``ds``, each said with ``where``."""
    gone = [f"{where}{kw} (type 1)" for kw in type1 if kw not in ds or ds[kw].value in (None, "", b"", [])]
    return gone + [f"{where}{kw} (type 2)" for kw in type2 if kw not in ds]


@pytest.mark.parametrize("stripped", [False, True], ids=["full source", "de-identified source"])
def test_every_type_1_and_2_attribute_of_the_seg_is_there(ct_folder: Path, tmp_path: Path,
                                                          stripped: bool) -> None:
    """ContentCreatorName (type 2) was absent and dcmqi warned (issue 20): every module's required
    attributes are there, also when the source lacks the ones a SEG copies from it."""
    if stripped:
        for f in ct_folder.iterdir():
            ds = pydicom.dcmread(f)
            for keyword in _DROPPABLE:
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(f)
    volume = read_image(ct_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor may highdicom or pydicom find anything to warn about
        out = write_dicom_seg(_labels(volume), volume, NAMES, tmp_path / "seg.dcm", adapter_name="me/ct")
    seg = pydicom.dcmread(out)

    missing = []
    for module in sorted(set(_TYPE1) | set(_TYPE2)):
        missing += _missing(seg, _TYPE1.get(module, []), _TYPE2.get(module, []), f"{module}: ")
    for n, segment in enumerate(seg.SegmentSequence, start=1):
        missing += _missing(segment, _SEGMENT_TYPE1, [], f"segment {n}: ")
        for algorithm in segment.get("SegmentationAlgorithmIdentificationSequence", []):
            missing += _missing(algorithm, _ALGORITHM_TYPE1, [], f"segment {n} algorithm: ")
    (shared,) = seg.SharedFunctionalGroupsSequence
    for group in _FUNCTIONAL_GROUPS:
        if group not in shared and not all(group in item for item in seg.PerFrameFunctionalGroupsSequence):
            missing.append(f"functional group {group}")
    assert missing == []

    # The values that say who made it: this library, by name and version, as an algorithm.
    assert str(seg.ContentCreatorName) == "samed-adapter^"
    assert (seg.Manufacturer, seg.ManufacturerModelName) == ("samed-adapter", "samed-adapter")
    assert seg.SoftwareVersions == samed_adapter.__version__
    assert list(seg.ImageType) == ["DERIVED", "PRIMARY"] and seg.Modality == "SEG"
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmName == "samed-adapter"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("samed-adapter", samed_adapter.__version__)
    np.testing.assert_array_equal(read_dicom_seg(out, volume), _labels(volume))
