"""The typed errors of image reading, and the one line every read error ends with.

Every error a reader raises is an :class:`ImageReadError` (a ``ValueError``) whose message is
one line: the file, what is wrong with it, and what to do. The subclasses let a caller (the
archive pipeline, a training script) tell the cases apart without parsing messages.
"""

from __future__ import annotations

import os
import sys

__all__ = ["SUPPORTED", "ImageReadError", "ImageTooLargeError", "TruncatedImageError", "UnevenSpacingError",
           "user_stacklevel"]

#: What can be read; read errors about the kind of file end with it.
SUPPORTED = (
    "supported inputs are NIfTI (.nii, .nii.gz), a folder holding one DICOM "
    "series (or a single DICOM file, with or without .dcm), 2-D grayscale .png and 2-D/3-D .npy"
)


class ImageReadError(ValueError):
    """An input image could not be read; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """The size an image claims (its header, or its slices at the model's size) exceeds the limit.

    Raised before the voxels are read, so a hostile header costs no memory.
    """


class TruncatedImageError(ImageReadError):
    """A file (or its gzip stream) holds fewer bytes than its header says."""


class UnevenSpacingError(ImageReadError):
    """A DICOM series whose slices are not evenly spaced: one affine cannot place them.

    Attributes:
        positions: the slices' offsets along the slice normal, in mm, sorted.
    """

    def __init__(self, message: str, positions: tuple[float, ...] = ()) -> None:
        super().__init__(message)
        self.positions = positions


def user_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first caller outside ``samed_adapter.io``.

    The readers are reached through several public functions at different call depths, so a
    fixed level would blame the wrong line.
    """
    here = os.path.dirname(__file__)
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        level, frame = level + 1, frame.f_back
    return level
