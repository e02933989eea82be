"""Synthetic DICOM files with exactly the geometry a test asks for (pydicom, the ``io`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["copy_with_new_instances", "write_ct_slice"]


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
) -> None:
    """One little-endian int16 CT slice with full geometry and series tags.

    Args:
        pixels: (rows, columns) stored values (cast to int16).
        ipp: ImagePositionPatient; numbers are written with 6 decimals, strings as given.
        iop, spacing: ImageOrientationPatient and PixelSpacing.
        series: SeriesInstanceUID; ``instance``, ``number`` and ``description`` set
            InstanceNumber, SeriesNumber and SeriesDescription where given.
        slope, intercept: the rescale to Hounsfield units.
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
    ds.save_as(path, enforce_file_format=True)


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
