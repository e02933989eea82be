"""Errors a request can meet, each with the HTTP status it is answered with.

They travel between Ray processes (pickled), so each keeps its message and status in ``args``.
"""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be answered; ``status`` is the HTTP code, the message says why and what to do."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status if status is not None else type(self).status)
        self.status = self.args[1]

    def __str__(self) -> str:
        return str(self.args[0])


class BadRequestError(ServeError):
    """An option or form field that is wrong (400)."""

    status = 400


class UnauthorizedError(ServeError):
    """No or a wrong bearer token (401)."""

    status = 401


class NotFoundError(ServeError):
    """An unknown adapter or route (404)."""

    status = 404


class RequestTimeoutError(ServeError):
    """An upload whose body did not arrive within --body-timeout (408)."""

    status = 408


class PayloadTooLargeError(ServeError):
    """An upload over --max-upload-mb, or a scan over --max-voxels (413)."""

    status = 413


class UnprocessableError(ServeError):
    """A file that cannot be read as a scan, an adapter that cannot run on this SAM (422)."""

    status = 422


class OverloadedError(ServeError):
    """More requests waiting than the queue holds, or a replica that died mid-request (503: retry)."""

    status = 503


class NoDatastoreError(ServeError):
    """A datastore route on a server started without ``--datastore`` (501)."""

    status = 501


class ForbiddenError(ServeError):
    """The plain token where the admin token is needed (403)."""

    status = 403


class BadGatewayError(ServeError):
    """The datastore's PACS failed (gone, refused us, answered what no PACS sends or past a bound) (502)."""

    status = 502
