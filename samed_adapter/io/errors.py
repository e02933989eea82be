"""The typed errors of image reading, and the one line every read error ends with.

Every error a reader raises is an :class:`ImageReadError` (a ``ValueError``) whose message is
one line: the file, what is wrong with it, and what to do. The subclasses let a caller (the
archive pipeline, a training script) tell the cases apart without parsing messages.
"""

from __future__ import annotations

__all__ = ["SUPPORTED", "ImageReadError", "ImageTooLargeError", "TruncatedImageError", "UnevenSpacingError"]

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
