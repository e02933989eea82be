"""Image input/output for samed-adapter: readers, label writers and overlays.

Arrays are slices first: ``(D, H, W)`` for volumes, ``(H, W)`` for 2-D images;
``Volume.array[k, j, i]`` is NIfTI voxel ``(i, j, k)``.  See
:mod:`samed_adapter.io.volumes` for the full convention and
:mod:`samed_adapter.geometry` for how volumes are cut into the model's slices.
"""

from samed_adapter.io.dicom_seg import read_dicom_seg, write_dicom_seg
from samed_adapter.io.overlay import colour_table, overlay_montage, overlay_volume
from samed_adapter.io.volumes import (
    READ_SUFFIXES,
    WRITE_SUFFIXES,
    DicomSeries,
    ImageReadError,
    Volume,
    label_nifti,
    list_dicom_series,
    nifti_voxels,
    output_path,
    read_dicom_folder,
    read_dicom_series,
    read_image,
    volume_from_nifti,
    write_labels,
)

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomSeries",
    "ImageReadError",
    "Volume",
    "colour_table",
    "label_nifti",
    "list_dicom_series",
    "nifti_voxels",
    "output_path",
    "overlay_montage",
    "overlay_volume",
    "read_dicom_folder",
    "read_dicom_seg",
    "read_dicom_series",
    "read_image",
    "volume_from_nifti",
    "write_dicom_seg",
    "write_labels",
]
