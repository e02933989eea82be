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
given one, the adapter's fingerprint and the digest of what else changes the labels
(``class_id=<c>,adapter_fingerprint=sha256:...,labels=sha256:...,adapter=<name>``), by
which ``segment --dicomweb --continue`` knows this adapter's SEGs on a server, made as
this run would make them (a retrained adapter keeps its name, not its fingerprint).
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
from .dicom_derived import (
    ALGORITHM_NAME,
    adapter_label,
    chosen_classes,
    class_ids,
    derived_series_number,
    dicom_text,
    require_series,
    slice_stack,
    source_header,
)
from .volume import Volume

__all__ = ["ALGORITHM_NAME", "read_dicom_seg", "write_dicom_seg"]

def _highdicom() -> Any:
    """highdicom, or an ImportError that says how to install it."""
    try:
        import highdicom
    except ImportError as exc:
        raise ImportError(
            "writing DICOM-SEG needs highdicom; install it with pip install 'samed-adapter[io]'"
        ) from exc
    return highdicom


def _segment(hd: Any, number: int, class_id: int, name: str, adapter_name: str,
             fingerprint: Optional[str] = None, labels: Optional[str] = None) -> Any:
    """The SegmentDescription of segment ``number``, which holds class ``class_id``."""
    from pydicom.sr.codedict import codes

    # class_id first and adapter last: the adapter name may itself hold "," or "=".
    parameters = {"class_id": str(class_id)}
    if fingerprint:
        parameters["adapter_fingerprint"] = str(fingerprint)
    if labels:
        parameters["labels"] = str(labels)
    parameters["adapter"] = str(adapter_name)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=__version__, parameters=parameters,
    )
    # The overlay PNGs' colour for this class, so the viewer shows the same colours.
    rgb = colour_table(class_id)[class_id]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=dicom_text(name),
        # Generic codes (3D Slicer's default terminology): class names are free text.
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in rgb)),
    )
    description.SegmentDescription = str(name)[:1024]  # ST: free text, up to 1024 characters
    return description


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
    labels_digest: Optional[str] = None,
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
        adapter_name: the adapter's file or Hub id, recorded in each segment's
            AlgorithmParameters and in ContentDescription (a Hub id as given, a
            local file by its name alone: never the path it was loaded from).
        classes: the class ids to write, one segment each; default all of
            1..K.  Classes absent from ``labels`` still get a (described,
            empty) segment.
        series_description: SeriesDescription of the new series.
        adapter_fingerprint: the adapter's :attr:`~samed_adapter.Adapter.fingerprint`,
            recorded in each segment's AlgorithmParameters when given.
        labels_digest: :func:`~.dicom_derived.labels_digest` of the segment job's record,
            recorded after it (``labels=``) when given.

    Returns:
        ``path``, written atomically (a failed write leaves no partial file).

    Raises:
        ValueError: ``volume`` is not a DICOM series, the shapes differ,
            labels/classes fall outside 1..K, or a slice lacks the study,
            series, instance or frame-of-reference UIDs the SEG must share.
        ImportError: highdicom is not installed.
    """
    hd = _highdicom()
    stack = class_ids(slice_stack(labels, volume), len(class_names))
    chosen = chosen_classes(classes, len(class_names))
    # Segment n <- class chosen[n - 1]; unchosen classes become background.
    lookup = np.zeros(len(class_names) + 1, dtype=np.uint8 if len(chosen) < 256 else np.uint16)
    lookup[chosen] = np.arange(1, len(chosen) + 1)
    pixels = lookup[stack]  # (frames, rows, cols): frame k is segmented from sources[k]
    sources = [source_header(f, volume.spacing[0]) for f in volume.files]
    adapter_name = adapter_label(adapter_name)  # never the local path it was loaded from
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(hd, n, c, class_names[c - 1], adapter_name, adapter_fingerprint,
                                       labels_digest)
                              for n, c in enumerate(chosen, start=1)],
        series_instance_uid=hd.UID(), series_number=derived_series_number(sources[0]),
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="samed-adapter", manufacturer_model_name="samed-adapter",
        software_versions=__version__, device_serial_number="0",
        content_description=dicom_text(f"{ALGORITHM_NAME} {adapter_name}"),
        # Type 2 in the Content Identification macro: readers such as dcmqi warn when it is
        # absent. An automatic segmentation has no person behind it, so the algorithm is named;
        # the trailing "^" marks a lone family-name component (PN), which highdicom would
        # otherwise warn about as a likely misencoded name.
        content_creator_name=f"{ALGORITHM_NAME}^",
        series_description=dicom_text(series_description),
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

    require_series(volume)
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
