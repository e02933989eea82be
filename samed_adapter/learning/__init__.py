"""Adapter versions and the jobs that make them from a datastore; may import the stages below it (io, adapter_file, ..., training, datastore), never serve/ or cli/.

- :mod:`.versions`: :class:`VersionStore`, ``NAME@N`` files with their figures, lineage and the serving one;
- :mod:`.errors`: one typed error per refusal.
"""

from __future__ import annotations

from .errors import UnknownVersionError, VersionError, VersionFileError, VersionFormatError, VersionStoreBusyError
from .versions import Version, VersionStore, parse_ref

__all__ = ["UnknownVersionError", "Version", "VersionError", "VersionFileError", "VersionFormatError",
           "VersionStore", "VersionStoreBusyError", "parse_ref"]
