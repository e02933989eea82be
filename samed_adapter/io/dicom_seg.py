"""DICOM Segmentation (SEG) objects: label maps that PACS viewers show over their source series.

:func:`write_dicom_seg` turns class ids predicted for a DICOM series into one
BINARY Segmentation instance (a new series in the source's study and frame of
reference) that OHIF, 3D Slicer and other viewers overlay on the source slices;
:func:`read_dicom_seg` decodes such a file back into class ids.

Segment numbers
---------------
BINARY segments must be numbered 1, 2, ... without gaps (highdicom enforces
it).  Segment ``n`` holds class ``classes[n - 1]`` (classes sorted), so with
the default ``classes`` (all of 1..K) the segment number *is* the class id.
Each segment also records its class id in its AlgorithmParameters
(``class_id=<c>,adapter=<name>``), which :func:`read_dicom_seg` uses to map
segments back when only some classes were written, and, when the writer is
given one, the adapter's fingerprint (``class_id=<c>,adapter_fingerprint=sha256:...,
adapter=<name>``), by which ``segment --dicomweb --continue`` knows this
adapter's SEGs on a server (a retrained adapter keeps its name, not its fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..version import __version__
from .files import atomic_path
from .overlay import colour_table
from .volumes import Volume

__all__ = ["ALGORITHM_NAME", "read_dicom_seg", "write_dicom_seg"]

#: AlgorithmName of every segment written here.
ALGORITHM_NAME = "samed-adapter"

# The SEG joins its source's study and frame of reference: without these it cannot.
_SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "FrameOfReferenceUID")
# Patient and study attributes highdicom copies; DICOM lets them be empty (type 2), and
# de-identification tools sometimes drop them altogether.
_COPIED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                 "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")

_NO_SERIES = ("{kind} needs a DICOM series input ({what}); "
              "write NIfTI (.nii.gz) labels for NIfTI, PNG and NPY inputs")


def _highdicom() -> Any:
    """highdicom, or an ImportError that says how to install it."""
    try:
        import highdicom
    except ImportError as exc:
        raise ImportError(
            "writing DICOM-SEG needs highdicom; install it with pip install 'samed-adapter[io]'"
        ) from exc
    return highdicom


def _lo(text: str) -> str:
    """``text`` as a valid LO value: at most 64 characters, no ``\\`` (the value separator)."""
    return " ".join(str(text).replace("\\", "/").split())[:64]


def _require_series(volume: Volume, kind: str = "DICOM-SEG") -> None:
    """Raise unless ``volume`` was read from DICOM slices (only those can be referenced)."""
    if not volume.files:
        raise ValueError(_NO_SERIES.format(kind=kind, what=f"{volume.source or 'the volume'} has no "
                                                           "DICOM slice files (Volume.files is empty)"))


def _slice_stack(labels: Any, volume: Volume, kind: str = "DICOM-SEG") -> np.ndarray:
    """``labels`` checked against ``volume`` and viewed as ``(D, H, W)`` (one frame per file)."""
    _require_series(volume, kind)
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image shape "
                         f"{volume.array.shape}; pass labels in the layout of Volume.array")
    return labels.reshape((len(volume.files), *labels.shape[-2:]))


def _class_ids(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``labels`` as int64 class ids, each in 0..num_classes; else a ValueError saying why."""
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (labels == np.round(labels)).all():
        raise ValueError("labels hold non-integer values; take argmax/round to class ids first")
    lo, hi = (labels.min(), labels.max()) if labels.size else (0, 0)
    if lo < 0 or hi > num_classes:
        raise ValueError(f"labels range [{lo}, {hi}] is outside 0..{num_classes}: class_names "
                         f"names {num_classes} classes (1..{num_classes}); pass one name per class")
    return labels.astype(np.int64)


def _chosen_classes(classes: Optional[Sequence[int]], num_classes: int) -> list[int]:
    """The class ids to write, sorted: ``classes`` checked against 1..num_classes."""
    if num_classes < 1:
        raise ValueError("class_names is empty; give one name per foreground class")
    if classes is None:
        return list(range(1, num_classes + 1))
    chosen = sorted({int(c) for c in classes})
    if not chosen or chosen[0] < 1 or chosen[-1] > num_classes:
        raise ValueError(f"classes {list(classes)} must be a non-empty subset of "
                         f"1..{num_classes} (0 is background and gets no segment)")
    return chosen


def _segment(hd: Any, number: int, class_id: int, name: str, adapter_name: str,
             fingerprint: Optional[str] = None) -> Any:
    """The SegmentDescription of segment ``number``, which holds class ``class_id``."""
    from pydicom.sr.codedict import codes

    # class_id first and adapter last: the adapter name may itself hold "," or "=".
    parameters = {"class_id": str(class_id)}
    if fingerprint:
        parameters["adapter_fingerprint"] = str(fingerprint)
    parameters["adapter"] = str(adapter_name)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=__version__, parameters=parameters,
    )
    # The overlay PNGs' colour for this class, so the viewer shows the same colours.
    rgb = colour_table(class_id)[class_id]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=_lo(name),
        # Generic codes (3D Slicer's default terminology): class names are free text.
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in rgb)),
    )
    description.SegmentDescription = str(name)[:1024]  # ST: free text, up to 1024 characters
    return description


def _source_header(path: Path, step: float, kind: str = "DICOM-SEG") -> Any:
    """The header of source slice ``path``, ready for highdicom (pixel data is not needed).

    ``step`` (mm between slices) stands in for a missing SliceThickness: the SEG's
    pixel measures need one, and each label voxel covers one step.
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    missing = [tag for tag in _SOURCE_UIDS if not ds.get(tag)]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}, which a {kind} must share with "
                         "its source series; write NIfTI for this input instead")
    for tag in _COPIED_TYPE2:
        if tag not in ds:
            setattr(ds, tag, "")  # present but empty: "unknown", as the standard allows
    if not ds.get("SliceThickness"):
        ds.SliceThickness = f"{step:.6g}"
    return ds


def _series_number(first: Any) -> int:
    """The source's SeriesNumber + 1000, so viewers list the SEG after, and near, its source."""
    try:
        number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):  # malformed IS: any number will do
        number = 0
    return number + 1000 if 0 <= number < 2**31 - 1001 else 1000


def write_dicom_seg(
    labels: np.ndarray,
    volume: Volume,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    adapter_name: str,
    classes: Optional[Sequence[int]] = None,
    series_description: str = "samed-adapter segmentation",
    adapter_fingerprint: Optional[str] = None,
) -> Path:
    """Write class ids predicted for a DICOM series as a DICOM Segmentation (BINARY) file.

    Args:
        labels: class ids ``0..K`` (0 background) in ``volume.array``'s layout,
            ``(D, H, W)``; bool and integral floats are accepted.
        volume: the DICOM series the labels were predicted from
            (:func:`~samed_adapter.io.read_image` of a folder); its ``files``
            give the source instances, ``files[k]`` for ``labels[k]``.
        class_names: K names, for classes 1..K; each becomes its segment's
            SegmentLabel and SegmentDescription.
        path: the file to write (``.dcm`` by convention).
        adapter_name: the adapter's file name or Hub id, recorded in each
            segment's AlgorithmParameters and in ContentDescription.
        classes: the class ids to write, one segment each; default all of
            1..K.  Classes absent from ``labels`` still get a (described,
            empty) segment.
        series_description: SeriesDescription of the new series.
        adapter_fingerprint: the adapter's :attr:`~samed_adapter.Adapter.fingerprint`,
            recorded in each segment's AlgorithmParameters when given.

    Returns:
        ``path``, written atomically (a failed write leaves no partial file).

    Raises:
        ValueError: ``volume`` is not a DICOM series, the shapes differ,
            labels/classes fall outside 1..K, or a slice lacks the study,
            series, instance or frame-of-reference UIDs the SEG must share.
        ImportError: highdicom is not installed.
    """
    hd = _highdicom()
    stack = _class_ids(_slice_stack(labels, volume), len(class_names))
    chosen = _chosen_classes(classes, len(class_names))
    # Segment n <- class chosen[n - 1]; unchosen classes become background.
    lookup = np.zeros(len(class_names) + 1, dtype=np.uint8 if len(chosen) < 256 else np.uint16)
    lookup[chosen] = np.arange(1, len(chosen) + 1)
    pixels = lookup[stack]  # (frames, rows, cols): frame k is segmented from sources[k]
    sources = [_source_header(f, volume.spacing[0]) for f in volume.files]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(hd, n, c, class_names[c - 1], adapter_name, adapter_fingerprint)
                              for n, c in enumerate(chosen, start=1)],
        series_instance_uid=hd.UID(), series_number=_series_number(sources[0]),
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="samed-adapter", manufacturer_model_name="samed-adapter",
        software_versions=__version__, device_serial_number="0",
        content_description=_lo(f"{ALGORITHM_NAME} {adapter_name}"),
        # Type 2 in the Content Identification macro: readers such as dcmqi warn when it is
        # absent. An automatic segmentation has no person behind it, so the algorithm is named;
        # the trailing "^" marks a lone family-name component (PN), which highdicom would
        # otherwise warn about as a likely misencoded name.
        content_creator_name=f"{ALGORITHM_NAME}^",
        series_description=_lo(series_description),
        # Empty frames are left out (a sparse mask's size, not D x K full frames); empty
        # segments stay described. An all-background mask must keep its frames: say so
        # here rather than let highdicom log a warning that it does.
        omit_empty_frames=bool(pixels.any()),
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def _class_of_segment(item: Any) -> int:
    """Class id of one SegmentSequence item: its ``class_id`` parameter, else its number."""
    for algorithm in item.get("SegmentationAlgorithmIdentificationSequence", []):
        for parameter in str(algorithm.get("AlgorithmParameters", "")).split(","):
            key, _, value = parameter.partition("=")
            if key.strip() == "class_id" and value.strip().isdigit():
                return int(value)
    return int(item.SegmentNumber)


def read_dicom_seg(path: str | os.PathLike[str], volume: Volume) -> np.ndarray:
    """Decode a DICOM-SEG into class ids in ``volume.array``'s layout, ``(D, H, W)``.

    Frames are matched to ``volume``'s slices through their referenced SOP
    Instance UIDs (not by frame order); slices no frame refers to are
    background.  Segments map to class ids as :func:`write_dicom_seg` records
    them (segment number otherwise).

    Returns:
        uint8 class ids (uint16 beyond 255), 0 background.

    Raises:
        ValueError: ``volume`` is not a DICOM series, or the SEG was made from
            other instances than ``volume``'s slices.
        ImportError: highdicom is not installed.
    """
    hd = _highdicom()
    import pydicom

    _require_series(volume)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                .SOPInstanceUID) for f in volume.files]
    seg = hd.seg.segread(path)
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    if not referenced or not referenced <= set(uids):
        raise ValueError(
            f"{path}: was made from {len(referenced - set(uids))} DICOM instances that are not "
            f"slices of {volume.source or 'the volume'}; read it with the series it was made from"
        )
    numbers = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False,
        # Slices without frames are background; this also covers slices the SEG does not
        # reference at all (one made from part of the series), which highdicom would refuse.
        assert_missing_frames_are_empty=True, dtype=np.uint16,
    )
    lookup = np.zeros(int(max(seg.segment_numbers, default=0)) + 1, dtype=np.int64)
    for item in seg.SegmentSequence:
        lookup[int(item.SegmentNumber)] = _class_of_segment(item)
    dtype = np.uint8 if lookup.max(initial=0) < 256 else np.uint16
    return lookup[numbers].astype(dtype).reshape(volume.array.shape)
