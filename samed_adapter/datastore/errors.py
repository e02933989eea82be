"""The typed errors of a datastore: one line each, naming the problem and what to do.

Every error is a :class:`DatastoreError` (a ``ValueError``); the subclasses let the service map
them to HTTP answers (404, 409, 422) and a training job tell them apart without parsing messages.
Each is raised before anything is written: a refused request leaves the folder as it was.
"""

from __future__ import annotations

__all__ = ["DatastoreBusyError", "DatastoreChangedError", "DatastoreError", "DatastoreFormatError",
           "EmptyDatastoreError", "ImageExistsError", "ImageNotFoundError", "LabelClassError", "LabelGridError",
           "LabelNotFoundError", "UnsafeIdError", "UnsupportedFileError"]


class DatastoreError(ValueError):
    """A datastore request was refused; the message says why and what to do."""


class UnsafeIdError(DatastoreError):
    """An image id or label tag that is not a plain file name (``../x``, ``/etc/x``, NUL, ``.hidden``)."""


class UnsupportedFileError(DatastoreError):
    """An image or label file of a kind the datastore does not keep (it keeps NIfTI, as MONAI Label's does)."""


class ImageExistsError(DatastoreError):
    """``add_image`` with an id the datastore already holds: adding never overwrites."""


class ImageNotFoundError(DatastoreError):
    """No image with that id."""


class LabelNotFoundError(DatastoreError):
    """The image has no label with that tag."""


class LabelGridError(DatastoreError):
    """A label whose voxel grid (shape, or affine beyond the tolerance) is not its image's."""


class LabelClassError(DatastoreError):
    """A label holding class ids the adapter does not have (above K, negative or not whole numbers)."""


class EmptyDatastoreError(DatastoreError):
    """A training job asked for items and no image has a ``final`` label."""


class DatastoreChangedError(DatastoreError):
    """Items a training job read were changed or removed while it ran.

    Attributes:
        changed: image id -> what changed (``"label changed"``, ``"image changed"``, ``"removed"``, ...).
    """

    def __init__(self, message: str, changed: dict[str, str]) -> None:
        super().__init__(message)
        self.changed = dict(changed)


class DatastoreFormatError(DatastoreError):
    """The datastore's JSON file is damaged or points outside the folder."""


class DatastoreBusyError(DatastoreError):
    """Another writer (a MONAI Label server, another job) held the folder's lock for the whole timeout."""
