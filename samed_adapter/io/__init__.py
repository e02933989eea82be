"""Files: NIfTI / DICOM / PNG / NPY readers and label writers, DICOM-SEG, RTSTRUCT, overlays, atomic writes; imports volume only.

Arrays are slices first: ``(D, H, W)`` for volumes, ``(H, W)`` for 2-D images;
``Volume.array[k, j, i]`` is NIfTI voxel ``(i, j, k)``.  See
:mod:`samed_adapter.io.volume` for the full convention (readers by format: :mod:`.nifti`,
:mod:`.png_npy`, :mod:`.volumes` for any of them),
:mod:`samed_adapter.io.dicom_folders` for the series of a DICOM folder,
:mod:`samed_adapter.io.dicom_series` for reading one (even slice spacing),
:mod:`samed_adapter.io.limits` for how big an input may be, and
:mod:`samed_adapter.volume.geometry` for how volumes are cut into the model's slices.
"""

from samed_adapter.io.dicom_seg import read_dicom_seg, write_dicom_seg
from samed_adapter.io.dicom_folders import (
    DicomFolder,
    DicomSeries,
    find_dicom,
    is_dicom_file,
    list_dicom_series,
    probe_dicom,
)
from samed_adapter.io.dicom_series import read_dicom_folder, read_dicom_series
from samed_adapter.io.errors import ImageReadError, ImageTooLargeError, TruncatedImageError, UnevenSpacingError
from samed_adapter.io.limits import DEFAULT_MAX_VOXELS, check_voxels
from samed_adapter.io.overlay import colour_table, overlay_montage, overlay_volume
from samed_adapter.io.rtstruct import read_rtstruct, write_rtstruct
from samed_adapter.io.nifti import label_nifti, nifti_voxels, volume_from_nifti
from samed_adapter.io.paths import READ_SUFFIXES, WRITE_SUFFIXES, output_path
from samed_adapter.io.volume import Volume, voxel_sizes
from samed_adapter.io.volumes import read_image, write_labels

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomFolder",
    "DicomSeries",
    "ImageReadError",
    "ImageTooLargeError",
    "TruncatedImageError",
    "UnevenSpacingError",
    "Volume",
    "check_voxels",
    "colour_table",
    "find_dicom",
    "is_dicom_file",
    "label_nifti",
    "list_dicom_series",
    "nifti_voxels",
    "output_path",
    "overlay_montage",
    "overlay_volume",
    "probe_dicom",
    "read_dicom_folder",
    "read_dicom_seg",
    "read_dicom_series",
    "read_image",
    "read_rtstruct",
    "volume_from_nifti",
    "voxel_sizes",
    "write_dicom_seg",
    "write_labels",
    "write_rtstruct",
]
