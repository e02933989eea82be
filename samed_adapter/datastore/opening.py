"""The datastore a service or a job asks for: a folder (MONAI Label's local datastore), or a PACS.

:func:`open_datastore` takes what `samed-adapter serve` and `train` take (``--datastore FOLDER``,
``--datastore-dicomweb URL``, ``--datastore-cache FOLDER``) and gives the datastore, opened once:
a folder is made if missing and its JSON reconciled with its files, as MONAI Label does on
opening.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

from ..dicomweb.errors import shown_url
from .errors import DatastoreError
from .local import FolderDatastore

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .dicomweb import DicomWebDatastore

__all__ = ["open_datastore"]


def open_datastore(folder: Optional[Union[str, os.PathLike]] = None, dicomweb: Optional[str] = None,
                   cache: Optional[Union[str, os.PathLike]] = None, *, lock_timeout: float = 60.0,
                   max_voxels: Optional[int] = None, **options: Any) -> Union[FolderDatastore, "DicomWebDatastore"]:
    """The datastore in ``folder``, or the PACS at the DICOMweb URL ``dicomweb`` (copies in ``cache``).

    Args:
        folder: a folder in MONAI Label's local datastore format (made if missing).
        dicomweb: a PACS's DICOMweb base URL instead (MONAI Label's DICOMweb datastore).
        cache: where the DICOMweb datastore keeps its local copies of series and labels.
        lock_timeout: seconds a write waits for another writer before ``DatastoreBusyError``.
        max_voxels: the largest image or label read for the checks (None: the readers' default).
        options: passed on to the datastore (e.g. ``read_only``, ``extensions``; DICOMweb: ``credentials``,
            ``modalities``, ``limits``, ``list_ttl``; see :class:`~.dicomweb.DicomWebDatastore`).

    Raises:
        DatastoreError: neither or both given, or a DICOMweb URL without a cache.
        DicomWebError: the URL is no http(s) URL, or a password is in it.
        DatastoreFormatError: the folder's JSON is damaged.
    """
    if (folder is None) == (dicomweb is None):
        raise DatastoreError("give a datastore folder (--datastore FOLDER) or a DICOMweb URL (--datastore-dicomweb "
                             "URL), exactly one of them")
    if max_voxels is not None:
        options["max_voxels"] = int(max_voxels)
    if dicomweb is not None:
        from .dicomweb import DicomWebDatastore

        if cache is None:
            raise DatastoreError(f"--datastore-dicomweb {shown_url(dicomweb)}: give --datastore-cache FOLDER, where "
                                 "the series and labels fetched from the PACS are kept")
        return DicomWebDatastore(dicomweb, cache, lock_timeout=lock_timeout, **options)
    return FolderDatastore(folder, lock_timeout=lock_timeout, **options)
