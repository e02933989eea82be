"""DICOM RT Structure Sets (RTSTRUCT): label maps as contours, which radiotherapy planning systems read.

:func:`write_rtstruct` turns class ids predicted for a DICOM series into one RT
Structure Set (a new series in the source's study, on its frame of reference)
with one ROI per class, named by the class; :func:`read_rtstruct` rasterises
such a file back onto the source slices.  rt-utils (what TotalSegmentator
writes its RTSTRUCTs with) gives the dataset skeleton (patient, study and the
referenced series); the outlines are traced here (:mod:`.outlines`).

What rt-utils is not used for, and why
--------------------------------------
- ``RTStructBuilder.create_new(folder)`` reads every DICOM file under a folder,
  pixels included: a folder of several series would put other series' slices
  into the structure set.  The skeleton is built from ``volume.files`` instead.
- Its pixel -> patient mapping takes the first slice's position plus an even
  step, and scales columns by the row spacing: contours of gantry-tilted or
  unevenly spaced series, or of non-square pixels, would land where the pixels
  are not.  Each outline is placed here with its own slice's position and both
  spacings, exactly.  (Where rt-utils' mapping is right, its reader reads these
  files the same; the tests check it.)
- ``add_roi`` numbers ROIs 1, 2, ... and prints to stdout for an empty mask.
- Its outlines run through the centres of each region's border pixels. A
  planning system (or plastimatch) keeps the pixels whose centres lie inside a
  contour, so it got back 53-81 % of each class, and nothing of a 1- or
  2-pixel structure or a 1-pixel-wide line.

ROI numbers and what is recorded
--------------------------------
ROI ``n`` holds class ``n`` (ROI numbers need not be contiguous), so
:func:`read_rtstruct` gives class ids back without a table.  Each ROI is named by
its class (ROIName, ROIObservationLabel), coloured as the overlay PNGs colour it,
interpreted as ``ORGAN`` and generated ``AUTOMATIC`` by ``samed-adapter <version>``;
StructureSetDescription says
``samed-adapter <version>, adapter_fingerprint=sha256:..., labels=sha256:..., adapter=<name>``
(the fingerprint when the writer is given one; the name last, as it may hold
``,`` or ``=``).  The adapter is named by its Hub id or its file name, never by
the local path it was loaded from (:func:`.dicom_derived.adapter_label`).

Outlines
--------
Each 4-connected region of a class on a slice is one CLOSED_PLANAR contour along
its pixels' edges, a 64th of a pixel inside, with its holes joined by keyhole
cuts (:func:`.outlines.pixel_outlines`): dcmrtstruct2nii and
:func:`read_rtstruct` give back exactly the labels on any slice orientation and
pixel spacing, plastimatch 1.9 on axial and tilted axial slices (it rasterises
contours in axial planes, by their z), rt-utils on square pixels of square
images (it swaps the row and column spacings).  The file is implicit VR little
endian, as rt-utils and planning systems write structure sets: a long outline's
ContourData outgrows the 64 KB that an element holds in explicit VR.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..version import __version__
from .dicom_derived import (
    ALGORITHM_NAME,
    COPIED_TYPE2,
    adapter_label,
    chosen_classes,
    class_ids,
    derived_series_number,
    dicom_text,
    require_series,
    slice_stack,
    source_header,
)
from .files import atomic_path
from .outlines import fill_outlines, pixel_outlines
from .overlay import colour_table
from .volume import Volume

__all__ = ["read_rtstruct", "write_rtstruct"]

_KIND = "DICOM-RTSTRUCT"
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
_CONTOUR_DATA = 0x30060050


def _rt_utils() -> Any:
    """rt-utils (its dataset helpers; the contours are ours), or an ImportError that says how to install it."""
    try:
        import rt_utils.ds_helper
    except ImportError as exc:
        raise ImportError(
            "writing DICOM-RTSTRUCT needs rt-utils; install it with pip install 'samed-adapter[io]'"
        ) from exc
    return rt_utils


def _sh(text: str) -> str:
    """``text`` as a valid SH value (at most 16 characters, no ``\\``)."""
    return dicom_text(text)[:16]


def _floats(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _pixel_to_patient(header: Any) -> np.ndarray:
    """``(3, 3)`` M with ``M @ (column, row, 1)`` = the patient position (mm) of that pixel's centre.

    A step along a row (next column) goes ImageOrientationPatient[:3] by
    PixelSpacing[1]; a step down a column (next row) goes [3:] by PixelSpacing[0].
    """
    iop, (row_step, column_step) = _floats(header.ImageOrientationPatient), _floats(header.PixelSpacing)
    return np.stack([iop[:3] * column_step, iop[3:] * row_step, _floats(header.ImagePositionPatient)], axis=1)


def _contour(header: Any, outline: np.ndarray) -> Any:
    """One CLOSED_PLANAR Contour item: ``outline`` ``(N, 2)`` (column, row), in pixels, on slice ``header``."""
    from pydicom.charset import default_encoding
    from pydicom.dataset import Dataset

    points = _pixel_to_patient(header) @ np.column_stack([outline, np.ones(len(outline))]).T  # (3, N)
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    item = Dataset()
    item.ContourImageSequence = [image]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(outline)
    item[_CONTOUR_DATA] = _decimal_strings(points.T.ravel())  # x1, y1, z1, x2, ...
    # Declared as encoded as the file will be (implicit VR little endian; ASCII only, the same bytes in
    # every character set): else pydicom parses the contour text again before writing it.
    item.set_original_encoding(True, True, default_encoding)
    return item


def _decimal_strings(values: np.ndarray) -> Any:
    """``values`` as the text of a DS element, ready to write.

    pydicom checks each value of a DS it is given (some microseconds each): a scan's contours
    hold millions, so the text is made here, each value valid by construction. DS holds 16
    characters: 6 decimals (a nanometre, far below the outlines' 1/64-pixel inset) fit any
    position inside a scanner.
    """
    from pydicom.dataelem import RawDataElement

    text = "\\".join(f"{v:.6f}"[:16] for v in values).encode("ascii")
    text += b" " * (len(text) % 2)  # an even length, padded with a space as DICOM pads text
    return RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, True, True)


def _contour_points(contour: Any, path: Any, roi: Any) -> np.ndarray:
    """A Contour item's ContourData, ``(N, 3)`` mm; read as numbers at once where still raw text."""
    element = contour.get_item(_CONTOUR_DATA)
    try:
        if element is not None and getattr(element, "is_raw", False) and element.VR in (None, "DS"):
            values = np.array(bytes(element.value).split(b"\\"), dtype=np.float64)
        else:
            values = _floats(contour.ContourData)
        if not np.isfinite(values).all():
            raise ValueError("a value is not finite")
        return values.reshape(-1, 3)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: ROI {roi.ReferencedROINumber} has a contour whose ContourData are not x, y, z "
                         f"triples of numbers ({exc}); the file is damaged") from None


def _roi(headers: Sequence[Any], masks: np.ndarray, class_id: int, name: str,
         frame_of_reference: str, generation: str) -> tuple[Any, Any, Any]:
    """The StructureSetROI, ROIContour and RTROIObservations items of ROI ``class_id``.

    ``masks``: ``(D, H, W)`` bool, ``masks[k]`` on slice ``headers[k]``.
    """
    from pydicom.dataset import Dataset

    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = class_id, frame_of_reference
    roi.ROIName, roi.ROIDescription = dicom_text(name), str(name)[:1024]
    roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription = "AUTOMATIC", dicom_text(generation)

    contours = []
    for header, mask in zip(headers, masks):
        contours += [_contour(header, outline) for outline in pixel_outlines(mask)]
    contour = Dataset()
    contour.ReferencedROINumber = class_id
    contour.ROIDisplayColor = [int(v) for v in colour_table(class_id)[class_id]]  # as the overlay PNGs
    # Empty for an absent class (type 3, so allowed), as rt-utils' reader needs it present.
    contour.ContourSequence = contours

    observation = Dataset()
    observation.ObservationNumber = observation.ReferencedROINumber = class_id
    observation.ROIObservationLabel = _sh(name)
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = f"{ALGORITHM_NAME}^"  # PN: an algorithm, not a person
    return roi, contour, observation


def _skeleton(rt: Any, headers: Sequence[Any]) -> Any:
    """An RT Structure Set with no ROIs yet: patient, study, a new series and the referenced slices.

    rt-utils' ``create_rtstruct_dataset`` less its base dataset, which sets encoding flags that
    pydicom 3 deprecates (and logs), and names rt-utils' institution as the maker.
    """
    import pydicom.uid
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = _RTSTRUCT_SOP_CLASS, pydicom.uid.generate_uid()
    # Implicit VR, as rt-utils and planning systems write structure sets: an element's length has 32 bits
    # there, and 16 in explicit VR, where the ContourData of an outline of over ~1,800 points would not fit
    # (pydicom would write it as UN, which no reader takes for coordinates).
    meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds = FileDataset("rtstruct", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: class and patient names in any script
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ApprovalStatus = "RTSTRUCT", "UNAPPROVED"
    now = datetime.datetime.now()
    ds.InstanceCreationDate = ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = now.strftime("%H%M%S.%f")
    ds.StructureSetROISequence, ds.ROIContourSequence = DicomSequence(), DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    rt.ds_helper.add_study_and_series_information(ds, headers)
    rt.ds_helper.add_patient_information(ds, headers)
    rt.ds_helper.add_refd_frame_of_ref_sequence(ds, headers)
    ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")  # not the source's
    # The patient and study attributes the DICOM-SEG carries, rt-utils' few included (a PACS
    # files both under the same accession); source_header made each present.
    for keyword in COPIED_TYPE2:
        setattr(ds, keyword, headers[0].get(keyword, ""))
    return ds


def write_rtstruct(
    labels: np.ndarray,
    volume: Volume,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    adapter_name: str,
    classes: Optional[Sequence[int]] = None,
    series_description: Optional[str] = None,
    adapter_fingerprint: Optional[str] = None,
    labels_digest: Optional[str] = None,
) -> Path:
    """Write class ids predicted for a DICOM series as a DICOM RT Structure Set file.

    Args:
        labels: class ids ``0..K`` (0 background) in ``volume.array``'s layout,
            ``(D, H, W)``; bool and integral floats are accepted.
        volume: the DICOM series the labels were predicted from
            (:func:`~samed_adapter.io.read_image` of a folder); ``labels[k]`` is
            contoured on ``volume.files[k]``.
        class_names: K names, for classes 1..K; each names its ROI.
        path: the file to write (``.dcm`` by convention).
        adapter_name: the adapter's file or Hub id, recorded (a Hub id as given,
            a local file by its name alone) in the SeriesDescription (by
            default), StructureSetName, StructureSetDescription and each ROI's
            generation description.
        classes: the class ids to write, ROI number = class id; default all of
            1..K.  Classes absent from ``labels`` still get a (named, contour-less) ROI.
        series_description: SeriesDescription of the new series; default
            ``"samed-adapter <adapter_name>"``.
        adapter_fingerprint: the adapter's :attr:`~samed_adapter.Adapter.fingerprint`,
            recorded in StructureSetDescription when given.
        labels_digest: :func:`~.dicom_derived.labels_digest` of the segment job's record,
            recorded after it (``labels=``) when given.

    Returns:
        ``path``, written atomically (a failed write leaves no partial file, and an
        existing ``path`` as it was).

    Raises:
        ValueError: ``volume`` is not a DICOM series, the shapes differ,
            labels/classes fall outside 1..K, or a slice lacks the study,
            series, instance or frame-of-reference UIDs the RTSTRUCT must share.
        ImportError: rt-utils is not installed.
    """
    import pydicom.uid

    rt = _rt_utils()
    adapter_name = adapter_label(adapter_name)  # never the local path it was loaded from
    stack = class_ids(slice_stack(labels, volume, _KIND), len(class_names))
    chosen = chosen_classes(classes, len(class_names))
    headers = [source_header(f, volume.spacing[0], _KIND) for f in volume.files]
    ds = _skeleton(rt, headers)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = pydicom.uid.generate_uid(), \
        derived_series_number(headers[0]) + 1, 1  # just after the SEG's number: viewers list both by their source
    ds.SeriesDescription = dicom_text(series_description or f"{ALGORITHM_NAME} {adapter_name}")
    ds.OperatorsName = f"{ALGORITHM_NAME}^"  # RT Series' type 2 creator: an algorithm, not a person
    ds.Manufacturer = ds.ManufacturerModelName = ALGORITHM_NAME
    ds.SoftwareVersions, ds.DeviceSerialNumber = __version__, "0"
    ds.StructureSetLabel = _sh(ALGORITHM_NAME)
    ds.StructureSetName = dicom_text(adapter_name)
    identity = f"{ALGORITHM_NAME} {__version__}, "
    if adapter_fingerprint:
        identity += f"adapter_fingerprint={adapter_fingerprint}, "
    if labels_digest:
        identity += f"labels={labels_digest}, "
    ds.StructureSetDescription = f"{identity}adapter={adapter_name}"[:1024]
    frame = str(headers[0].FrameOfReferenceUID)
    for c in chosen:
        roi, contour, observation = _roi(headers, stack == c, c, class_names[c - 1], frame,
                                         f"{ALGORITHM_NAME} {__version__} {adapter_name}")
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(contour)
        ds.RTROIObservationsSequence.append(observation)
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _slice_index(contour: Any, points: np.ndarray, uids: dict[str, int], planes: np.ndarray, normal: np.ndarray,
                 tolerance: float) -> Optional[int]:
    """The slice a Contour item (its ``points``, ``(N, 3)`` mm) lies on: by its referenced instance,
    else by its position."""
    for image in contour.get("ContourImageSequence", []):
        k = uids.get(str(image.ReferencedSOPInstanceUID))
        if k is not None:
            return k
        return None  # on an instance of another series
    # ContourImageSequence is optional: the nearest slice plane, if the contour lies on one.
    z = float(points[0] @ normal)
    k = int(np.argmin(np.abs(planes - z)))
    return k if abs(planes[k] - z) <= tolerance else None


def read_rtstruct(path: str | os.PathLike[str], volume: Volume) -> np.ndarray:
    """Rasterise an RT Structure Set into class ids in ``volume.array``'s layout, ``(D, H, W)``.

    Each ROI's closed planar contours are filled as planning systems and
    plastimatch fill them: the pixels whose centres lie inside, by the even-odd
    rule across all of the ROI's contours on a slice (nested outlines leave
    holes).  Contours go on the slice they reference, placed by that slice's own
    position, orientation and spacing; contours without references go to the
    slice plane they lie on.
    ROI number ``n`` becomes class ``n``, as :func:`write_rtstruct` numbers them;
    where ROIs overlap, the higher number wins.

    Returns:
        uint8 class ids (uint16 beyond 255), 0 background.

    Raises:
        ValueError: ``volume`` is not a DICOM series, ``path`` is no RT
            Structure Set, or it has contours on slices other than ``volume``'s.
    """
    import pydicom

    require_series(volume, _KIND)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.files]
    ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) != _RTSTRUCT_SOP_CLASS:
        raise ValueError(f"{path}: is not an RT Structure Set (SOP class {ds.get('SOPClassUID', 'missing')}); "
                         "read DICOM-SEG files with read_dicom_seg")
    uids = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    iop = _floats(headers[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    planes = np.array([_floats(h.ImagePositionPatient) @ normal for h in headers])
    tolerance = 0.5 * (float(np.min(np.abs(np.diff(planes)))) if len(planes) > 1 else float(volume.spacing[0]))
    # to pixels: (column, row) = inverse of the in-plane part of _pixel_to_patient, per slice
    to_pixels = [np.linalg.pinv(_pixel_to_patient(h)[:, :2]) for h in headers]

    rois = sorted(ds.get("ROIContourSequence", []), key=lambda item: int(item.ReferencedROINumber))
    dtype = np.uint8 if all(int(r.ReferencedROINumber) < 256 for r in rois) else np.uint16
    labels = np.zeros((len(headers), *volume.array.shape[-2:]), dtype=dtype)
    for roi in rois:
        polygons: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            points = _contour_points(contour, path, roi)
            k = _slice_index(contour, points, uids, planes, normal, tolerance)
            if k is None:
                raise ValueError(f"{path}: ROI {roi.ReferencedROINumber} has a contour on a slice that is not "
                                 f"one of {volume.source or 'the volume'}; read it with the series it was made "
                                 "from")
            in_plane = points - _floats(headers[k].ImagePositionPatient)
            polygons.setdefault(k, []).append(in_plane @ to_pixels[k].T)  # (N, 2) column, row
        for k, outlines in polygons.items():
            labels[k][fill_outlines(outlines, labels.shape[1:])] = int(roi.ReferencedROINumber)
    return labels.reshape(volume.array.shape)
