"""The HTTP front: the ingress class, who may call, uploads, the work around the model and the
native API.

:class:`Frontend` answers the native API (``/v1``), ``/healthz`` and ``/metrics`` here, and
inherits the other route groups: MONAI Label's info, login and inference (:mod:`.monai_routes`),
sessions (:mod:`.session_routes`), datastore (:mod:`.datastore_routes`) and training
(:mod:`.train_routes`), and the adapters' versions (:mod:`.version_routes`); all declare their
routes on the one app of :mod:`.app`. Reading, reorienting and scaling a scan, and writing its
outputs, run here on threads; only its slices go to the model replicas (:mod:`.segmenter`), one
call per request, and the replica packs slices of every request in flight into full batches.
"""


import asyncio
import hmac
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from ..adapter_file.config import AdapterConfig
from ..io.errors import ImageReadError, ImageTooLargeError
from .app import FINGERPRINT_HEADER, app, error_answer
from .catalog import UnknownAdapterError, catalog_for
from .datastore_routes import DatastoreRoutes
from .errors import (
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServeError,
    UnauthorizedError,
    UnprocessableError,
)
from .folders import RequestFolder, open_answer, stream
from .metrics import Metrics
from .monai_routes import MonaiLabelRoutes
from .residents import VolumeRequest, VolumeResult
from .session_routes import SessionRoutes
from .sessions import ClickRequest, SessionImages
from .settings import ServeSettings
from .store_routes import StoreRoutes
from .train_routes import TrainRoutes
from .uploads import (
    UPLOAD,
    bound_body,
    label_name,
    segment_options,
    too_large,
    unpack_series,
    upload_stem,
    upload_suffix,
    zip_outputs,
)
from .version_routes import VersionRoutes


def _resized(result: VolumeResult, size: tuple[int, int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A replica's (D, S, S) labels (and (D, C, S, S) softmax) at the scan's (H, W) (on a thread)."""
    import torch

    from ..inference.stages import resize_slices

    # Ray's object store hands the arrays over read-only (no copy); torch wants to own what it wraps.
    labels = torch.from_numpy(np.array(result.labels))
    probs = None if result.probs is None else torch.from_numpy(np.array(result.probs))
    return resize_slices(labels, probs, size)


@serve.deployment(name="Frontend")
@serve.ingress(app)
class Frontend(MonaiLabelRoutes, SessionRoutes, DatastoreRoutes, TrainRoutes, VersionRoutes):
    """The ingress, one instance per HTTP replica: the native API below, the other route groups
    from the mixins, and the plumbing they share (``answer``, ``describe``, ``segment_scan``, ...)."""

    def __init__(self, segmenter: Any, settings: ServeSettings) -> None:
        self.segmenter = segmenter
        self.settings = settings
        self.catalog = catalog_for(settings)
        self.metrics = Metrics()
        self.busy = 0
        self._folders: set[RequestFolder] = set()  # the requests' private folders not yet closed
        self.sessions = SessionImages(settings.max_sessions)  # MONAI Label's /session/ images
        self.store: Optional[StoreRoutes] = None  # MONAI Label's /datastore/ (serve --datastore)
        if settings.datastore or settings.datastore_dicomweb:
            from ..datastore.opening import open_datastore

            self.store = StoreRoutes(open_datastore(settings.datastore, settings.datastore_dicomweb,
                                                    settings.datastore_cache, max_voxels=settings.max_voxels))

    def new_folder(self) -> RequestFolder:
        """A private folder for one request's upload and outputs (mode 0700), under --tmp-dir if set."""
        folder = RequestFolder(self.settings.tmp_dir)
        self._folders.add(folder)
        return folder

    def remove_folder(self, folder: RequestFolder) -> None:
        folder.close()
        self._folders.discard(folder)

    def send_file(self, folder: RequestFolder, path: Path, media_type: str, filename: str,
                  headers: dict[str, str]) -> StreamingResponse:
        """The file ``path`` as the answer; ``folder`` is removed before its first byte goes out,
        so a client that goes away during or after the answer leaves nothing on disk."""
        handle, size = open_answer(folder, path)
        return StreamingResponse(stream(handle), media_type=media_type, headers={
            **headers, "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'})

    def __del__(self) -> None:
        # Ray Serve calls this when it stops the replica: a request still being answered when the
        # server stopped leaves no scan behind.
        for folder in list(getattr(self, "_folders", ())):
            self.remove_folder(folder)
        if hasattr(self, "sessions"):
            self.sessions.close()

    # ------------------------------------------------------------------ plumbing

    def _authorize(self, request: Request) -> None:
        token = self.settings.token
        if not token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        admin = self.settings.admin_token
        # The admin token reads too: 3D Slicer logs in with one token, and training needs the admin's.
        if not hmac.compare_digest(given, token.encode()) and not (admin and hmac.compare_digest(given, admin.encode())):
            raise UnauthorizedError("this server needs 'Authorization: Bearer <token>' with its token (segment "
                                    "--server URL --token T, or SAMED_SERVE_TOKEN; 3D Slicer: log in with the token "
                                    "as password)")

    def authorize_admin(self, request: Request) -> None:
        """The admin token (``--admin-token``; the plain token where none is set): 403 for the plain one."""
        admin = self.settings.admin_token or self.settings.token
        if not admin:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        if hmac.compare_digest(given, admin.encode()):
            return
        if self.settings.token and hmac.compare_digest(given, self.settings.token.encode()):
            raise ForbiddenError("this needs the admin token (samed-adapter serve --admin-token, or "
                                 "SAMED_SERVE_ADMIN_TOKEN); the plain token reads and saves, it does not delete, "
                                 "train or change the serving version")
        raise UnauthorizedError("this needs 'Authorization: Bearer <admin token>' (samed-adapter serve --admin-token)")

    async def answer(self, route: str, request: Request, work: Any, *, guarded: bool = False,
                     authorize: bool = True) -> Response:
        """Run ``work()`` for ``route``: JSON errors with their status, never a traceback."""
        start = time.perf_counter()
        status = 500
        counted = False
        bound_body(request, self.settings.body_timeout_s)  # a stalled upload would hold its slot
        try:
            if authorize:
                self._authorize(request)
            if guarded:
                if self.busy >= self.settings.max_queue:
                    raise OverloadedError(f"the server is answering {self.busy} requests, as many as it queues "
                                          "(--max-queue); retry in a few seconds")
                self.busy += 1
                counted = True
                self.metrics.in_progress.set(self.busy)
            response = await work()
            status = response.status_code
            return response
        except (ServeError, HTTPException) as err:
            if isinstance(err, HTTPException):  # Starlette's, from a malformed multipart body
                err = ServeError(f"{err.detail} Send the scan as multipart form data (curl -F file=@ct.nii.gz).",
                                 err.status_code)
            status = err.status
            response = error_answer(err)
            if status == 503:
                response.headers["Retry-After"] = "5"
            if status == 408:  # the rest of that body is not read: the connection cannot carry another request
                response.headers["Connection"] = "close"
            return response
        except Exception as err:  # noqa: BLE001 - a client gets one line, never a traceback
            logging.getLogger("ray.serve").exception("samed-adapter: %s failed", route)  # the replica's log has it
            return error_answer(ServeError(f"internal error: {type(err).__name__}: {err}"))
        finally:
            if counted:
                self.busy -= 1
                self.metrics.in_progress.set(self.busy)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def check_length(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise ServeError("send the upload with a Content-Length header (curl -F and every HTTP library do)", 411)
        if int(length) > self.settings.max_upload_bytes:
            raise PayloadTooLargeError(f"the upload is {int(length) / 2**20:.1f} MiB, over this server's limit of "
                                       f"{self.settings.max_upload_mb:g} MiB (--max-upload-mb)")

    async def describe(self, name: str, *, pin: bool = False) -> dict[str, Any]:
        """Adapter ``name``'s entry; ``pin``: read from its file now, to pin a request to that version."""
        try:
            return await asyncio.to_thread(self.catalog.pin if pin else self.catalog.describe, name)
        except UnknownAdapterError as err:
            raise NotFoundError(str(err)) from None
        except (ValueError, OSError) as err:
            raise UnprocessableError(f"adapter {name!r} cannot be read: {err}") from None

    async def save_upload(self, form: Any, field: str, folder: RequestFolder) -> tuple[Path, str, bool]:
        """The uploaded file as a path in ``folder`` (a DICOM zip unpacked): (path, stem, is DICOM)."""
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise BadRequestError(f"no file in the form field {field!r}; send the scan as multipart form data "
                                  f"(curl -F {field}=@ct.nii.gz)")
        suffix = upload_suffix(upload.filename)
        saved = folder.path / f"upload{suffix}"
        with open(saved, "xb") as out:
            await folder.run(shutil.copyfileobj, upload.file, out, 1 << 20)
        if suffix == ".zip":
            limit = max(self.settings.max_upload_bytes * 4, 1 << 30)
            return await folder.run(lambda: unpack_series(saved, folder.path / "series", max_bytes=limit)), \
                upload_stem(upload.filename), True
        return saved, upload_stem(upload.filename), False

    async def segment_scan(self, entry: dict[str, Any], source: Path, label_name: str, options: dict[str, Any],
                           folder: RequestFolder, times: dict[str, float],
                           keep: Optional[dict[str, Any]] = None) -> tuple[list[Path], list[str]]:
        """Segment one scan into ``folder``/out with the adapter version ``entry`` pinned (its
        fingerprint): what `segment` writes for it. ``keep`` gets ``"score"``, the volume's
        uncertainty, computed on the replica (a datastore image's least_sure score, :mod:`.store_routes`)."""
        from ..inference import stages as inference
        from ..segment.outputs import provenance, write_prepared
        from ..segment.job import Job
        from ..segment.pipeline import check_request

        name, out = entry["name"], folder.path / "out"
        out.mkdir()
        config = AdapterConfig.from_dict(entry["config"])
        adapter = SimpleNamespace(config=config, fingerprint=entry["fingerprint"],
                                  base_fingerprint=entry["base_fingerprint"])
        try:
            opts = check_request(adapter, [source], adapter_name=name, max_voxels=self.settings.max_voxels, **options)
        except ValueError as err:
            raise BadRequestError(str(err)) from None
        opts.record = provenance(adapter, opts, allow_base_mismatch=self.settings.allow_base_mismatch)
        job = Job(source=str(source), out=out / label_name)
        t0 = time.perf_counter()
        try:
            prepared = await folder.run(lambda: inference.prepare_volume(config, job.read(opts), **opts.preparing()))
        except ImageTooLargeError as err:
            raise too_large(str(err), source) from None
        except (ImageReadError, ValueError, OSError) as err:
            raise UnprocessableError(str(err).replace(str(source), UPLOAD)) from None
        t1 = time.perf_counter()
        on_replica: dict[str, float] = {}
        result = await self._predict(name, entry["fingerprint"], np.ascontiguousarray(prepared.inputs[:, 0].numpy()),
                                     opts.save_probabilities, on_replica, score=keep is not None)
        t2 = time.perf_counter()
        if keep is not None:
            keep["score"] = result.score
        small, soft = await folder.run(_resized, result, prepared.size)
        try:
            files = await folder.run(write_prepared, prepared, small, soft, job.out, opts, config)
        except ValueError as err:  # what the upload lacks for an output asked for (a SEG's source UIDs)
            raise UnprocessableError(str(err).replace(str(source), UPLOAD)) from None
        times.update(pre=t1 - t0, infer=t2 - t1, post=time.perf_counter() - t2,
                     **{f"replica_{k}": v for k, v in on_replica.items()})
        return files, [m.replace(str(source), UPLOAD) for m in prepared.messages]

    async def _predict(self, name: str, fingerprint: str, slices: np.ndarray, probabilities: bool,
                       times: dict[str, float], score: bool = False) -> VolumeResult:
        """(n, S, S) slices through version ``fingerprint`` of adapter ``name`` in one call to a
        replica (it answers with that version or 409); ``times`` gets where its time went there;
        ``score`` asks the replica for the volume's uncertainty (VolumeRequest.score)."""
        import ray

        try:
            result = await self.segmenter.remote(VolumeRequest(name, slices, probabilities, fingerprint,
                                                               alone=self.busy <= 1, score=score))
        except ray.exceptions.RayError as err:
            raise OverloadedError(f"a model replica stopped while answering ({type(err).__name__}); it is being "
                                  "replaced: retry in a few seconds") from None
        if isinstance(result, ServeError):
            raise result
        for batch in result.batches:
            self.metrics.batch(batch)
        self.metrics.slices.labels(name).inc(len(slices))
        times.update(result.times)
        return result

    # ------------------------------------------------------------------ native API

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "in_progress": self.busy})

    @app.get("/metrics")
    async def metrics_text(self, request: Request) -> Response:
        async def work() -> Response:
            return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")
        return await self.answer("/metrics", request, work)

    @app.get("/v1/adapters")
    async def adapters(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse({"adapters": await self.adapter_entries(), "allow_base_mismatch":
                                 self.settings.allow_base_mismatch})
        return await self.answer("/v1/adapters", request, work)

    async def adapter_entries(self) -> list[dict[str, Any]]:
        entries = []
        for name in await asyncio.to_thread(self.catalog.names):
            try:
                entry = await self.describe(name)
                on = self.metrics.resident_on(name, entry["fingerprint"])
                entries.append({**entry, "resident": on > 0, "resident_replicas": on})
            except ServeError:  # a broken file in the folder is not served, and does not hide the others
                continue
        return entries

    @app.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        async def work() -> Response:
            self.check_length(request)
            folder = self.new_folder()
            try:
                async with request.form(max_files=1, max_fields=32) as form:
                    name = form.get("adapter")
                    if not isinstance(name, str) or not name:
                        raise BadRequestError("no adapter: name one in the form field 'adapter' (GET /v1/adapters "
                                              "lists them)")
                    source, stem, dicom = await self.save_upload(form, "file", folder)
                    options = segment_options(form, dicom=dicom)
                    label_file = label_name(form.get("name"), stem)
                entry = await self.describe(name, pin=True)  # this version answers, or none (409)
                files, messages = await self.segment_scan(entry, source, label_file, options, folder, {})
                archive = folder.path / "outputs.zip"
                await folder.run(zip_outputs, files, folder.path / "out", archive, messages)
                return self.send_file(folder, archive, "application/zip", f"{stem}.zip",
                                      {FINGERPRINT_HEADER: entry["fingerprint"]})
            finally:
                self.remove_folder(folder)
        return await self.answer("/v1/segment", request, work, guarded=True)

    async def call_clicks(self, request: ClickRequest) -> Any:
        import ray

        options: dict[str, Any] = {"method_name": "clicks"}
        if request.session_id:  # Ray Serve's router prefers the replica that reported holding it
            options["multiplexed_model_id"] = request.session_id
        handle = self.segmenter.options(**options)
        try:
            result = await handle.remote(request)
        except ray.exceptions.RayError as err:
            raise OverloadedError(f"a model replica stopped while answering ({type(err).__name__}); it is being "
                                  "replaced: retry in a few seconds") from None
        if isinstance(result, ServeError):
            raise result
        return result
