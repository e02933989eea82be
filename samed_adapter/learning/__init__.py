"""Adapter versions and the jobs that make them from a datastore; may import the stages below it (io, adapter_file, ..., training, datastore), never serve/ or cli/.

- :mod:`.versions`: :class:`VersionStore`, ``NAME@N`` files with their figures, lineage and the serving one;
- :mod:`.job`: :class:`LearningJob`, a new version from a datastore's final labels on Ray Train, scored on
  held-out images against the serving one and served only if not worse;
- :mod:`.errors`: one typed error per refusal.
"""

from __future__ import annotations

from .errors import UnknownVersionError, VersionError, VersionFileError, VersionFormatError, VersionStoreBusyError
from .job import (JobOptions, JobResult, JobState, LearningJob, LearningJobError, ParentMissingError,
                  TooFewItemsError)
from .versions import Version, VersionStore, parse_ref

__all__ = ["JobOptions", "JobResult", "JobState", "LearningJob", "LearningJobError", "ParentMissingError",
           "TooFewItemsError", "UnknownVersionError", "Version", "VersionError", "VersionFileError",
           "VersionFormatError", "VersionStore", "VersionStoreBusyError", "parse_ref"]
