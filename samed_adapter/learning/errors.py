"""The typed errors of adapter versions: one line each, naming the problem and what to do.

Every error is a :class:`VersionError` (a ``ValueError``); the subclasses let the service map them
to HTTP answers (404, 422, 503) and a training job tell them apart without parsing messages. Each
is raised before anything is written: a refused call leaves the versions as they were.
"""

from __future__ import annotations

__all__ = ["UnknownVersionError", "VersionError", "VersionFileError", "VersionFormatError",
           "VersionStoreBusyError"]


class VersionError(ValueError):
    """An adapter version request was refused; the message says why and what to do."""


class UnknownVersionError(VersionError):
    """No version with that number (or no versions at all) is recorded for the adapter (HTTP 404)."""


class VersionFileError(VersionError):
    """A recorded version's file is missing, unreadable or no longer holds the adapter its
    fingerprint names (someone replaced or damaged it): it is not served."""


class VersionFormatError(VersionError):
    """An adapter's ``versions.json`` is damaged or not one this samed-adapter writes."""


class VersionStoreBusyError(VersionError):
    """Another writer (a training job, a rollback) held the adapter's version lock for the whole timeout."""
