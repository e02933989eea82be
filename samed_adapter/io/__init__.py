"""Image input/output for samed-adapter: readers, label writers and overlays.

Arrays are slices first: ``(D, H, W)`` for volumes, ``(H, W)`` for 2-D images;
``Volume.array[k, j, i]`` is NIfTI voxel ``(i, j, k)``.  See
:mod:`samed_adapter.io.volumes` for the full convention.
"""

from samed_adapter.io.overlay import colour_table, overlay_montage
from samed_adapter.io.volumes import (
    READ_SUFFIXES,
    WRITE_SUFFIXES,
    ImageReadError,
    Volume,
    output_path,
    read_image,
    write_labels,
)

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "ImageReadError",
    "Volume",
    "colour_table",
    "output_path",
    "overlay_montage",
    "read_image",
    "write_labels",
]
