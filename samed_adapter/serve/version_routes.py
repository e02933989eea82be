"""The service's adapter versions: ``GET /v1/adapters/{name}/versions`` and
``POST /v1/adapters/{name}/serve?version=N`` (a rollback or a promotion): the logic, and the
routes (:class:`VersionRoutes`, a mixin of the ingress :class:`~.frontend.Frontend`).

A swap only rewrites the versions' JSON: the front pins its next request to the new version, and
each replica loads its file on the next batch that asks for it, while requests pinned before the
swap finish on their version (:meth:`~.residents.ServingModel._read` finds it by fingerprint).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..learning.errors import (UnknownVersionError, VersionError, VersionFileError, VersionFormatError,
                               VersionStoreBusyError)
from ..learning.versions import VersionStore
from .app import app
from .catalog import AdapterCatalog, UnknownAdapterError
from .errors import BadRequestError, NotFoundError, OverloadedError, ServeError, UnprocessableError

__all__ = ["VersionRoutes", "serve_version", "version_list"]

NO_VERSIONS = ("this server keeps no adapter versions: start it with --versions FOLDER (or --datastore FOLDER, "
               "which keeps them in FOLDER/versions)")


def version_list(catalog: AdapterCatalog, name: str) -> dict[str, Any]:
    """``name``'s recorded versions, oldest first, with their figures, parent, items count and
    serving flag; ``serving`` is the serving one's number (None: the given file serves, unversioned)."""
    store = _store(catalog)
    try:
        versions = store.versions(name)
        if not versions:
            catalog.path(name)  # an adapter served here, never versioned: listed with no versions
    except UnknownAdapterError as err:
        raise NotFoundError(str(err)) from None
    except VersionError as err:
        raise _http(err) from None
    serving = next((v.version for v in versions if v.serving), None)
    return {"name": name, "serving": serving, "versions": [v.to_dict() for v in versions]}


def serve_version(catalog: AdapterCatalog, name: str, version: Any) -> dict[str, Any]:
    """Make version ``version`` (the query's text) of ``name`` the serving one; its entry and the one before."""
    store = _store(catalog)
    if not isinstance(version, str) or not version.isdigit() or not 0 < int(version) < 10**9:
        raise BadRequestError(f"version={version!r}: give the version to serve as ?version=N with N a version "
                              f"number (GET /v1/adapters/{name}/versions lists them)")
    try:
        before = store.serving(name)
        now = store.set_serving(name, int(version))
    except VersionError as err:
        raise _http(err) from None
    except OSError as err:  # a full or failing disk: the JSON was not replaced
        raise ServeError(f"the versions of {name!r} could not be written ({err.strerror or err}); nothing changed: "
                         "free disk space and send it again", 507) from None
    return {"name": name, "serving": now.to_dict(), "previous": before.version if before else None}


def _store(catalog: AdapterCatalog) -> VersionStore:
    if catalog.versions is None:
        raise NotFoundError(NO_VERSIONS)
    return catalog.versions


def _http(err: VersionError) -> ServeError:
    """The HTTP error a version refusal is answered with."""
    if isinstance(err, UnknownVersionError):
        return NotFoundError(str(err))
    if isinstance(err, VersionStoreBusyError):
        return OverloadedError(str(err))
    if isinstance(err, (VersionFileError, VersionFormatError)):
        return UnprocessableError(str(err))
    return BadRequestError(str(err))  # a name that cannot be an adapter's


class VersionRoutes:
    """The versions' routes, for the ingress; it has ``catalog``, ``answer`` and ``authorize_admin``."""

    @app.get("/v1/adapters/{name}/versions")
    async def adapter_versions(self, name: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await asyncio.to_thread(version_list, self.catalog, name))
        return await self.answer("/v1/adapters/versions", request, work)

    @app.post("/v1/adapters/{name}/serve")
    async def serve_adapter_version(self, name: str, request: Request) -> Response:
        """Rollback or promotion (admin token): the next request is pinned to that version."""
        async def work() -> Response:
            self.authorize_admin(request)
            return JSONResponse(await asyncio.to_thread(serve_version, self.catalog, name,
                                                        request.query_params.get("version")))
        return await self.answer("/v1/adapters/serve", request, work, authorize=False)
