"""Synthetic DICOM files with exactly the geometry a test asks for (pydicom, the ``io`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["copy_with_new_instances", "write_ct_series", "write_ct_slice"]


def write_ct_slice(
    path: Union[str, os.PathLike],
    pixels: np.ndarray,
    ipp: Sequence[Union[float, str]],
    *,
    iop: Sequence[float],
    spacing: Sequence[float],
    series: str,
    instance: Optional[int] = None,
    number: Optional[int] = None,
    description: Optional[str] = None,
    slope: float = 1.0,
    intercept: float = -1000.0,
    tags: Optional[Mapping[str, Any]] = None,
) -> None:
    """One little-endian int16 CT slice with full geometry and series tags.

    Args:
        pixels: (rows, columns) stored values (cast to int16).
        ipp: ImagePositionPatient; numbers are written with 6 decimals, strings as given.
        iop, spacing: ImageOrientationPatient and PixelSpacing.
        series: SeriesInstanceUID; ``instance``, ``number`` and ``description`` set
            InstanceNumber, SeriesNumber and SeriesDescription where given.
        slope, intercept: the rescale to Hounsfield units.
        tags: further attributes by keyword (StudyInstanceUID, FrameOfReferenceUID, ...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", series
    for keyword, value in (("InstanceNumber", instance), ("SeriesNumber", number), ("SeriesDescription", description)):
        if value is not None:
            setattr(ds, keyword, value)
    ds.ImagePositionPatient = [v if isinstance(v, str) else f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient, ds.PixelSpacing = list(iop), list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<i2").tobytes()
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(
    folder: Union[str, os.PathLike],
    shape: Sequence[int],
    *,
    iop: Sequence[float],
    spacing: Sequence[float],
    step: float = 2.5,
    origin: Sequence[float] = (-30.0, 12.0, 40.0),
) -> Path:
    """A complete evenly spaced CT series (``shape`` = (slices, rows, columns)) in ``folder`` (made here).

    Slice k lies at ``origin + k * step * normal`` (normal = row direction x column direction), with
    one study, frame of reference and patient, so that a SEG or an RTSTRUCT can reference it; the
    pixels differ per slice. Files are named against slice order. Returns ``folder``.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True)
    depth, rows, columns = shape
    directions = np.asarray(iop, dtype=np.float64)
    normal = np.cross(directions[:3], directions[3:])
    series, tags = generate_uid(), {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid(),
                                    "PatientID": "series-1", "PatientName": "Series^Test", "SliceThickness": step}
    pixels = np.add.outer(np.arange(rows) * 3, np.arange(columns)).astype(np.int16)
    for k in range(depth):
        write_ct_slice(folder / f"{depth - k:03d}.dcm", pixels + 40 * k, list(np.asarray(origin) + k * step * normal),
                       iop=list(iop), spacing=list(spacing), series=series, instance=k + 1, number=3, tags=tags)
    return folder


def copy_with_new_instances(files: Sequence[Union[str, os.PathLike]], folder: Union[str, os.PathLike]) -> Path:
    """Copy DICOM ``files`` into ``folder`` (made here) with new SOP Instance UIDs, same names.

    The same pixels and geometry as other instances: what a reader must not take for the
    series an object (a SEG, an RTSTRUCT) was made from. Returns ``folder``.
    """
    import pydicom
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / Path(f).name)
    return folder
