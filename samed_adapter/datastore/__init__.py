"""Where a service keeps images and corrected labels, and what training jobs read: a folder in MONAI Label's own format, its checks and active learning strategies; may import the stages below it (io, adapter_file, ..., dicomweb), never serve/ or cli/.

- :mod:`.local`: :class:`FolderDatastore`, MONAI Label's ``LocalDatastore`` layout with atomic, locked writes;
- :mod:`.dicomweb`: :class:`~.dicomweb.DicomWebDatastore`, MONAI Label's ``DICOMWebDatastore``: a PACS's series,
  final labels as DICOM SEG series, a FolderDatastore as its cache; :mod:`.pacs`: what it asks the PACS, checked;
- :mod:`.opening`: :func:`~.opening.open_datastore`, the one `serve` and `train` open (a folder or a PACS);
- :mod:`.index`: the datastore's JSON, entries of other kinds kept as they are;
- :mod:`.folder`: MONAI Label's lock, staged copies, moves that never overwrite;
- :mod:`.binary`: OHIF's ``.bin`` label upload (one byte per voxel) read as MONAI Label reads it;
- :mod:`.checks`: safe ids, a label against its image's grid and the adapter's classes, checksums;
- :mod:`.changes`: what a training job saw, and which items changed since;
- :mod:`.activelearning`: the next image to label (``first``, ``random``, ``least_sure``);
- :mod:`.errors`: one typed error per refusal.
"""

from __future__ import annotations

from .activelearning import STRATEGIES, first, least_sure, random_image, uncertainty
from .changes import changed_since, check_unchanged, record
from .checks import GRID_TOLERANCE, check_id, check_label, check_label_classes, check_label_grid, file_checksum
from .errors import (DatastoreBusyError, DatastoreChangedError, DatastoreError, DatastoreFormatError,
                     EmptyDatastoreError, ImageExistsError, ImageNotFoundError, LabelClassError, LabelGridError,
                     LabelNotFoundError, UnsafeIdError, UnsupportedFileError)
from .local import FINAL, ORIGINAL, FolderDatastore, Item

__all__ = ["FINAL", "GRID_TOLERANCE", "ORIGINAL", "STRATEGIES", "DatastoreBusyError", "DatastoreChangedError",
           "DatastoreError", "DatastoreFormatError", "EmptyDatastoreError", "FolderDatastore", "ImageExistsError",
           "ImageNotFoundError", "Item", "LabelClassError", "LabelGridError", "LabelNotFoundError", "UnsafeIdError",
           "UnsupportedFileError", "changed_since", "check_id", "check_label", "check_label_classes",
           "check_label_grid", "check_unchanged", "file_checksum", "first", "least_sure", "random_image", "record",
           "uncertainty"]
