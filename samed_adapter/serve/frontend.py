"""The HTTP front: routes, who may call, uploads, and the work around the model.

Native API (``/v1``), MONAI Label's (``/info/``, ``/infer/{model}``, ``/auth/``), ``/healthz`` and
``/metrics``. Reading, reorienting and scaling a scan, and writing its outputs, run here on
threads; only its slices go to the model replicas (:mod:`.segmenter`), one call per request, and
the replica packs slices of every request in flight into full batches.
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
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from ..adapter_file.config import AdapterConfig
from ..datastore import ORIGINAL
from ..interactive.prompts import ClicksNotTrainedError, require_clicks
from ..io.errors import ImageReadError, ImageTooLargeError
from .catalog import UnknownAdapterError, catalog_for
from .errors import (
    BadRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServeError,
    UnauthorizedError,
    UnprocessableError,
)
from .folders import RequestFolder, open_answer, stream
from .metrics import Metrics
from .monai_label import answer_name, app_info, multipart
from .residents import VolumeRequest, VolumeResult
from .sessions import ClickRequest, SessionImages, click_labels, parse_clicks
from .settings import ServeSettings
from .store_routes import (NO_DATASTORE, ForbiddenError, NoDatastoreError, StoreRoutes, adapter_for, file_answer,
                           json_body, read_small, strategies_info)
from .training_jobs import ACTOR_NAMESPACE, actor_name, trainers
from .uploads import (
    UPLOAD,
    bound_body,
    label_name,
    params_json,
    segment_options,
    too_large,
    unpack_series,
    upload_stem,
    upload_suffix,
    zip_outputs,
)
from .version_routes import serve_version, version_list

app = FastAPI(title="samed-adapter", description="SAMed adapters on one SAM: native API and MONAI Label's",
              docs_url=None, redoc_url=None, openapi_url=None)

#: the response header that names the adapter version (its fingerprint) that made an answer
FINGERPRINT_HEADER = "X-Adapter-Fingerprint"


def _error(err: ServeError) -> JSONResponse:
    return JSONResponse({"error": str(err), "status": err.status}, status_code=err.status)


@app.exception_handler(HTTPException)
async def _route_error(request: Request, err: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer as every error here does: ``{"error", "status"}``."""
    return _error(ServeError(f"{request.method} {request.url.path}: {err.detail} (routes: GET /v1/adapters, GET "
                             "/v1/adapters/{name}/versions, POST /v1/adapters/{name}/serve?version=N, POST "
                             "/v1/segment, "
                             "GET /info/, POST /infer/{adapter}, PUT /session/, GET or DELETE /session/{id}, "
                             "/datastore/, POST /activelearning/{strategy} and POST, GET or DELETE /train/{adapter} (serve "
                             "--datastore), GET /healthz, GET "
                             "/metrics)",
                             err.status_code))


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
class Frontend:
    """The ingress: every route below, one instance per HTTP replica."""

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

    def _folder(self) -> RequestFolder:
        """A private folder for one request's upload and outputs (mode 0700), under --tmp-dir if set."""
        folder = RequestFolder(self.settings.tmp_dir)
        self._folders.add(folder)
        return folder

    def _remove(self, folder: RequestFolder) -> None:
        folder.close()
        self._folders.discard(folder)

    def _send(self, folder: RequestFolder, path: Path, media_type: str, filename: str,
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
            self._remove(folder)
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

    def _authorize_admin(self, request: Request) -> None:
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

    async def _answer(self, route: str, request: Request, work: Any, *, guarded: bool = False,
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
            response = _error(err)
            if status == 503:
                response.headers["Retry-After"] = "5"
            if status == 408:  # the rest of that body is not read: the connection cannot carry another request
                response.headers["Connection"] = "close"
            return response
        except Exception as err:  # noqa: BLE001 - a client gets one line, never a traceback
            logging.getLogger("ray.serve").exception("samed-adapter: %s failed", route)  # the replica's log has it
            return _error(ServeError(f"internal error: {type(err).__name__}: {err}"))
        finally:
            if counted:
                self.busy -= 1
                self.metrics.in_progress.set(self.busy)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _check_length(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise ServeError("send the upload with a Content-Length header (curl -F and every HTTP library do)", 411)
        if int(length) > self.settings.max_upload_bytes:
            raise PayloadTooLargeError(f"the upload is {int(length) / 2**20:.1f} MiB, over this server's limit of "
                                       f"{self.settings.max_upload_mb:g} MiB (--max-upload-mb)")

    async def _describe(self, name: str, *, pin: bool = False) -> dict[str, Any]:
        """Adapter ``name``'s entry; ``pin``: read from its file now, to pin a request to that version."""
        try:
            return await asyncio.to_thread(self.catalog.pin if pin else self.catalog.describe, name)
        except UnknownAdapterError as err:
            raise NotFoundError(str(err)) from None
        except (ValueError, OSError) as err:
            raise UnprocessableError(f"adapter {name!r} cannot be read: {err}") from None

    async def _save_upload(self, form: Any, field: str, folder: RequestFolder) -> tuple[Path, str, bool]:
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

    async def _segment(self, entry: dict[str, Any], source: Path, label_name: str, options: dict[str, Any],
                       folder: RequestFolder, times: dict[str, float],
                       keep: Optional[dict[str, Any]] = None) -> tuple[list[Path], list[str]]:
        """Segment one scan into ``folder``/out with the adapter version ``entry`` pinned (its
        fingerprint): what `segment` writes for it. ``keep`` gets ``"probs"``, the model's
        (n, K+1, S, S) softmax on its own slices (a datastore image's score, :mod:`.store_routes`)."""
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
                                     opts.save_probabilities or keep is not None, on_replica)
        t2 = time.perf_counter()
        if keep is not None:
            keep["probs"] = result.probs
            if not opts.save_probabilities:  # not resized to the scan for nothing
                result.probs = None
        small, soft = await folder.run(_resized, result, prepared.size)
        try:
            files = await folder.run(write_prepared, prepared, small, soft, job.out, opts, config)
        except ValueError as err:  # what the upload lacks for an output asked for (a SEG's source UIDs)
            raise UnprocessableError(str(err).replace(str(source), UPLOAD)) from None
        times.update(pre=t1 - t0, infer=t2 - t1, post=time.perf_counter() - t2,
                     **{f"replica_{k}": v for k, v in on_replica.items()})
        return files, [m.replace(str(source), UPLOAD) for m in prepared.messages]

    async def _predict(self, name: str, fingerprint: str, slices: np.ndarray, probabilities: bool,
                       times: dict[str, float]) -> VolumeResult:
        """(n, S, S) slices through version ``fingerprint`` of adapter ``name`` in one call to a
        replica (it answers with that version or 409); ``times`` gets where its time went there."""
        import ray

        try:
            result = await self.segmenter.remote(VolumeRequest(name, slices, probabilities, fingerprint,
                                                               alone=self.busy <= 1))
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
        return await self._answer("/metrics", request, work)

    @app.get("/v1/adapters")
    async def adapters(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse({"adapters": await self._entries(), "allow_base_mismatch":
                                 self.settings.allow_base_mismatch})
        return await self._answer("/v1/adapters", request, work)

    @app.get("/v1/adapters/{name}/versions")
    async def adapter_versions(self, name: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await asyncio.to_thread(version_list, self.catalog, name))
        return await self._answer("/v1/adapters/versions", request, work)

    @app.post("/v1/adapters/{name}/serve")
    async def serve_adapter_version(self, name: str, request: Request) -> Response:
        """Rollback or promotion (admin token): the next request is pinned to that version."""
        async def work() -> Response:
            self._authorize_admin(request)
            return JSONResponse(await asyncio.to_thread(serve_version, self.catalog, name,
                                                        request.query_params.get("version")))
        return await self._answer("/v1/adapters/serve", request, work, authorize=False)

    async def _entries(self) -> list[dict[str, Any]]:
        entries = []
        for name in await asyncio.to_thread(self.catalog.names):
            try:
                entry = await self._describe(name)
                on = self.metrics.resident_on(name, entry["fingerprint"])
                entries.append({**entry, "resident": on > 0, "resident_replicas": on})
            except ServeError:  # a broken file in the folder is not served, and does not hide the others
                continue
        return entries

    @app.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        async def work() -> Response:
            self._check_length(request)
            folder = self._folder()
            try:
                async with request.form(max_files=1, max_fields=32) as form:
                    name = form.get("adapter")
                    if not isinstance(name, str) or not name:
                        raise BadRequestError("no adapter: name one in the form field 'adapter' (GET /v1/adapters "
                                              "lists them)")
                    source, stem, dicom = await self._save_upload(form, "file", folder)
                    options = segment_options(form, dicom=dicom)
                    label_file = label_name(form.get("name"), stem)
                entry = await self._describe(name, pin=True)  # this version answers, or none (409)
                files, messages = await self._segment(entry, source, label_file, options, folder, {})
                archive = folder.path / "outputs.zip"
                await folder.run(zip_outputs, files, folder.path / "out", archive, messages)
                return self._send(folder, archive, "application/zip", f"{stem}.zip",
                                  {FINGERPRINT_HEADER: entry["fingerprint"]})
            finally:
                self._remove(folder)
        return await self._answer("/v1/segment", request, work, guarded=True)

    # ------------------------------------------------------------------ MONAI Label

    @app.get("/info/")
    async def info(self, request: Request) -> Response:
        async def work() -> Response:
            entries = await self._entries()
            return JSONResponse(app_info(entries, **await self._store_info(entries),
                                         **await self._train_info(entries)))
        return await self._answer("/info/", request, work)

    @app.get("/auth/")
    async def auth(self) -> JSONResponse:
        return JSONResponse({"enabled": bool(self.settings.token), "client_id": "samed-adapter"})

    @app.post("/auth/token")
    async def auth_token(self, request: Request) -> Response:
        """MONAI Label's login: the server's token as password gives that token back as a bearer token."""
        async def work() -> Response:
            form = await request.form(max_files=0, max_fields=8)
            password = str(form.get("password", ""))
            # The admin token logs in as itself (3D Slicer's Train button needs it), the plain one as the plain one.
            for token in (self.settings.token, self.settings.admin_token):
                if token and hmac.compare_digest(password.encode(), token.encode()):
                    return JSONResponse({"access_token": token, "token_type": "bearer"})
            raise UnauthorizedError("wrong password: use the server's token (samed-adapter serve --token)")
        return await self._answer("/auth/token", request, work, authorize=False)  # the login that gives the token

    @app.get("/auth/token/valid")
    async def auth_valid(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse({"valid": True})
        return await self._answer("/auth/token/valid", request, work)

    @app.post("/infer/{model}")
    async def infer(self, model: str, request: Request) -> Response:
        """MONAI Label's inference: the image uploaded (``file``), named by ``session_id``, or
        else the datastore's image ``?image=ID`` (its score recorded, its label saved as
        ``original`` given ``params`` ``save_label``); a click-trained adapter's clicks in ``params``
        (:func:`~.sessions.parse_clicks`) refine its automatic labels. The answer is the label map
        in every case."""
        async def work() -> Response:
            output = request.query_params.get("output") or "all"
            if output not in ("all", "image", "json", "dicom_seg"):
                raise BadRequestError(f"output={output!r}: use image, json, all or dicom_seg")
            session_id = request.query_params.get("session_id")
            session = self.sessions.get(session_id) if session_id else None  # 404 / 410 before the body is read
            self._check_length(request)
            folder = self._folder()
            try:
                async with request.form(max_files=2, max_fields=16) as form:
                    params = params_json(form.get("params"))
                    stored: Optional[str] = None  # the datastore image's id, when inferred by id
                    if session is not None:
                        source, stem, dicom = session.image, upload_stem(session.name), session.name.endswith(".zip")
                    elif form.get("file") is None:
                        stored = request.query_params.get("image") or ""
                        source = await self._stored_image(stored)
                        stem, dicom = upload_stem(source.name), False
                    else:
                        source, stem, dicom = await self._save_upload(form, "file", folder)
                if output == "dicom_seg" and not dicom:
                    raise BadRequestError("output=dicom_seg needs a DICOM series upload (a .zip)")
                times: dict[str, float] = {}
                start = time.perf_counter()
                kind = "dicom-seg" if output == "dicom_seg" else "nifti"
                entry = await self._describe(model, pin=True)  # this version answers, or none (409)
                if session is not None:
                    session.pin(model, entry["fingerprint"])
                clicks = parse_clicks(params, entry["class_names"])
                trained = bool(entry["config"].get("clicks"))
                extra: dict[str, Any] = {}
                keep: Optional[dict[str, Any]] = {} if stored is not None else None  # the softmax, for its score
                if clicks and not trained:
                    try:
                        require_clicks(AdapterConfig.from_dict(entry["config"]), f"adapter {model!r}")
                    except ClicksNotTrainedError as err:
                        raise UnprocessableError(str(err)) from None
                if trained and (clicks or session is not None) and output != "dicom_seg":
                    label = folder.path / f"{stem}.nii.gz"
                    result, resent = await click_labels(self._call_clicks, entry, source, session, clicks, label,
                                                        times)
                    extra = {"clicks": {"count": len(clicks), "encoded": result.built, "replica": result.replica,
                                        "resent": resent}}
                else:
                    if clicks:
                        raise BadRequestError("clicks answer a label image: use output=all, image or json")
                    files, _ = await self._segment(entry, source, f"{stem}.nii.gz", {"output_types": kind}, folder,
                                                   times, keep)
                    label = files[0]
                version = {FINGERPRINT_HEADER: entry["fingerprint"]}
                result_json = {"label_names": {n: i for i, n in enumerate(entry["class_names"], start=1)},
                               "latencies": {**{k: round(v, 3) for k, v in times.items()},
                                             "total": round(time.perf_counter() - start, 3)},
                               "params": params, "adapter": {"name": model, "fingerprint": entry["fingerprint"]},
                               **extra}
                if stored is not None and self.store is not None:
                    result_json["datastore"] = await self.store.after_infer(stored, entry, label, dict(result_json),
                                                                            params, (keep or {}).get("probs"))
                if output == "json":
                    return JSONResponse(result_json, headers=version)
                if output in ("image", "dicom_seg"):
                    media = "application/dicom" if output == "dicom_seg" else "application/octet-stream"
                    return self._send(folder, label, media, answer_name(label.name), version)
                body, content_type = multipart(result_json, answer_name(label.name), label.read_bytes())
                return Response(body, media_type=content_type, headers=version)
            finally:
                self._remove(folder)
        return await self._answer("/infer", request, work, guarded=True)

    async def _call_clicks(self, request: ClickRequest) -> Any:
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

    # ------------------------------------------------------------------ MONAI Label's sessions

    @app.api_route("/session/", methods=["PUT", "POST"])
    async def create_session(self, request: Request) -> Response:
        """Upload an image once (MONAI Label's client: ``create_session(path)``, a ``files`` field);
        its id then names it in ``/infer/{model}?session_id=ID``."""
        async def work() -> Response:
            self._check_length(request)
            folder = RequestFolder(self.settings.tmp_dir)  # the session store owns it once added
            try:
                async with request.form(max_files=1, max_fields=16) as form:
                    upload = form.get("files")
                    name = getattr(upload, "filename", None) or ""
                    source, _, _ = await self._save_upload(form, "files", folder)
            except BaseException:
                folder.close()
                raise
            session = self.sessions.add(folder, source, Path(name.replace("\\", "/")).name)
            return JSONResponse({"session_id": session.id, "session_info": session.info()})
        return await self._answer("/session/", request, work, guarded=True)

    @app.get("/session/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(self.sessions.get(session_id).info())
        return await self._answer("/session/", request, work)

    @app.delete("/session/{session_id}")
    async def remove_session(self, session_id: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(self.sessions.remove(session_id).info())
        return await self._answer("/session/", request, work)

    # ---- MONAI Label's datastore (serve --datastore FOLDER; the work is in store_routes)

    def _store(self) -> StoreRoutes:
        if self.store is None:
            raise NoDatastoreError(NO_DATASTORE)
        return self.store

    async def _stored_image(self, image_id: str) -> Path:
        """The datastore's image ``image_id``, for inference by id (no file, no session)."""
        if self.store is None or not image_id:
            how = "an image of the datastore (?image=ID)" if self.store else "start the server with --datastore " \
                "FOLDER to infer by image id"
            raise BadRequestError("no image: send the image with the request (MONAILabelClient.infer(model, id, {}, "
                                  f"file=PATH)), name a session (PUT /session/, then ?session_id=ID), or {how}")
        return await self.store.image_path(image_id)

    async def _store_info(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """``/info/``'s datastore and strategies (3D Slicer shows its next-sample and label buttons for them)."""
        if self.store is None:
            return {}
        return {"datastore": await self.store.status(), "strategies": strategies_info([e["name"] for e in entries])}

    async def _label_config(self, params: dict[str, Any]) -> Optional[AdapterConfig]:
        """What a label is checked against: ``params``' ``model`` (3D Slicer sends its selected one), else
        the only adapter, else the one with the most classes (``/train/{model}`` checks its own again)."""
        if params.get("model"):
            return AdapterConfig.from_dict((await self._describe(str(params["model"])))["config"])
        entries = await self._entries()
        widest = max(entries, key=lambda e: e["num_classes"], default=None)
        return AdapterConfig.from_dict(widest["config"]) if widest else None

    async def _score_stored(self, entry: dict[str, Any], image_id: str) -> None:
        """Infer the datastore's image by id to record its score (and keep its labels as ``original``
        when it has none); an image the model cannot read is recorded as failed for this version."""
        store, folder, keep = self._store(), self._folder(), {}
        try:
            source = await store.image_path(image_id)
            files, _ = await self._segment(entry, source, f"{upload_stem(source.name)}.nii.gz",
                                           {"output_types": "nifti"}, folder, {}, keep)
            result = {"label_names": {n: i for i, n in enumerate(entry["class_names"], start=1)},
                      "adapter": {"name": entry["name"], "fingerprint": entry["fingerprint"]}}
            unsaved = ORIGINAL not in await asyncio.to_thread(store.datastore.get_labels_by_image_id, image_id)
            await store.after_infer(image_id, entry, files[0], result, {"save_label": unsaved}, keep.get("probs"))
        except NotFoundError:  # removed meanwhile
            pass
        except (BadRequestError, PayloadTooLargeError, UnprocessableError) as err:
            await store.record_score(image_id, entry, None, str(err))
        finally:
            self._remove(folder)

    async def _store_upload(self, request: Request, route: str, call: Any) -> Response:
        """A datastore upload (``PUT``): ``await call(form, folder)`` answers; the upload's copy goes with it."""
        async def work() -> Response:
            self._store()
            self._check_length(request)
            folder = self._folder()
            try:
                async with request.form(max_files=1, max_fields=8) as form:
                    return JSONResponse(await call(form, folder))
            finally:
                self._remove(folder)
        return await self._answer(route, request, work, guarded=True)

    @app.get("/datastore/")
    async def datastore(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self._store().listing(request.query_params.get("output")))
        return await self._answer("/datastore/", request, work)

    @app.put("/datastore/")
    @app.put("/datastore/image")
    async def datastore_add_image(self, request: Request) -> Response:
        image = request.query_params.get("image")
        return await self._store_upload(request, "/datastore/image",
                                        lambda form, folder: self._store().add_image(form, image, folder))

    @app.delete("/datastore/")
    @app.delete("/datastore/image")
    async def datastore_remove_image(self, request: Request) -> Response:
        async def work() -> Response:
            self._authorize_admin(request)
            return JSONResponse(await self._store().remove_image(request.query_params.get("id")))
        return await self._answer("/datastore/image", request, work, authorize=False)

    @app.head("/datastore/image")
    async def datastore_check_image(self, request: Request) -> Response:
        async def work() -> Response:
            query = request.query_params
            return JSONResponse(await self._store().check_image(query.get("image"), query.get("check_sum")))
        return await self._answer("/datastore/image", request, work)

    @app.get("/datastore/image")
    async def datastore_image(self, request: Request) -> Response:
        async def work() -> Response:
            store = self._store()
            path = await store.image_path(request.query_params.get("image"))
            return file_answer(*await store.open_file(path), path.name)
        return await self._answer("/datastore/image", request, work)

    @app.get("/datastore/image/info")
    async def datastore_image_info(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self._store().image_info(request.query_params.get("image")))
        return await self._answer("/datastore/image/info", request, work)

    @app.put("/datastore/image/info")
    async def datastore_set_image_info(self, request: Request) -> Response:
        async def work() -> Response:
            form = await request.form(max_files=0, max_fields=8)
            return JSONResponse(await self._store().set_image_info(request.query_params.get("image"), form.get("info")))
        return await self._answer("/datastore/image/info", request, work)

    @app.put("/datastore/label")
    async def datastore_save_label(self, request: Request) -> Response:
        image, tag = request.query_params.get("image"), request.query_params.get("tag")

        async def save(form: Any, folder: RequestFolder) -> dict[str, Any]:
            config = await self._label_config(params_json(form.get("params")))
            return await self._store().save_label(form, image, tag, config, folder)
        return await self._store_upload(request, "/datastore/label", save)

    @app.delete("/datastore/label")
    async def datastore_remove_label(self, request: Request) -> Response:
        async def work() -> Response:
            self._authorize_admin(request)
            query = request.query_params
            return JSONResponse(await self._store().remove_label(query.get("id"), query.get("tag")))
        return await self._answer("/datastore/label", request, work, authorize=False)

    @app.head("/datastore/label")
    async def datastore_check_label(self, request: Request) -> Response:
        async def work() -> Response:
            await self._store().label_path(request.query_params.get("image"), request.query_params.get("tag"))
            return JSONResponse({})
        return await self._answer("/datastore/label", request, work)

    @app.get("/datastore/label")
    async def datastore_label(self, request: Request) -> Response:
        async def work() -> Response:
            store = self._store()
            path = await store.label_path(request.query_params.get("label"), request.query_params.get("tag"))
            return file_answer(*await store.open_file(path), path.name)
        return await self._answer("/datastore/label", request, work)

    @app.get("/datastore/label/info")
    async def datastore_label_info(self, request: Request) -> Response:
        async def work() -> Response:
            query = request.query_params
            return JSONResponse(await self._store().label_info(query.get("label"), query.get("tag")))
        return await self._answer("/datastore/label/info", request, work)

    @app.put("/datastore/label/info")
    async def datastore_set_label_info(self, request: Request) -> Response:
        async def work() -> Response:
            form, query = await request.form(max_files=0, max_fields=8), request.query_params
            return JSONResponse(await self._store().set_label_info(query.get("label"), query.get("tag"),
                                                                   form.get("info")))
        return await self._answer("/datastore/label/info", request, work)

    @app.post("/activelearning/{strategy}")
    async def activelearning(self, strategy: str, request: Request) -> Response:
        """MONAI Label's next sample; ``least_sure`` may first infer a few unscored images (store_routes)."""
        async def work() -> Response:
            store = self._store()
            params = json_body(await read_small(request))
            if strategy != "least_sure":
                return JSONResponse(await store.next_sample(strategy, params))
            entry = await self._describe(adapter_for(params, await asyncio.to_thread(self.catalog.names)), pin=True)
            return JSONResponse(await store.next_sample(strategy, params, entry=entry,
                                                        score=lambda image_id: self._score_stored(entry, image_id)))
        return await self._answer("/activelearning", request, work, guarded=True)

    # ---- MONAI Label's training (serve --datastore; the jobs run in training_jobs' actor, never here)

    async def _jobs(self, method: str, *args: Any) -> Any:
        """Call the training jobs' actor; the ServeError it answers with is raised here."""
        import ray

        self._store()
        try:
            actor = ray.get_actor(actor_name(self.settings), namespace=ACTOR_NAMESPACE)
            result = await getattr(actor, method).remote(*args)
        except (ValueError, ray.exceptions.RayError) as err:
            raise OverloadedError(f"the training jobs' actor cannot be reached ({type(err).__name__}); restart the "
                                  "server to start it again") from None
        if isinstance(result, ServeError):
            raise result
        return result

    async def _train_info(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """``/info/``'s trainers (3D Slicer shows its Train button for them) and their progress."""
        if self.store is None:
            return {}
        try:
            stats = await self._jobs("train_stats")
        except ServeError:  # the jobs' actor gone: /info/ still answers (Slicer connects with it)
            stats = {}
        return {"trainers": trainers([e["name"] for e in entries], self.settings), "train_stats": stats}

    @app.post("/train/{model}")
    async def train_start(self, model: str, request: Request) -> Response:
        """A new version of ``model`` from the datastore's final labels (admin token); 409 while one runs."""
        async def work() -> Response:
            self._authorize_admin(request)
            return JSONResponse(await self._jobs("start", model, json_body(await read_small(request))))
        return await self._answer("/train", request, work, authorize=False)

    @app.get("/train/{model}")
    async def train_status(self, model: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self._jobs("status", model))
        return await self._answer("/train", request, work)

    @app.get("/train/")
    async def train_jobs(self, request: Request) -> Response:
        """MONAI Label's status: the latest job (``?check_if_running=true``: 404 unless it runs), with
        every adapter's latest job in ``jobs`` (``?all=true``: that list alone)."""
        async def work() -> Response:
            query = request.query_params
            if query.get("check_if_running") == "true":
                latest = await self._jobs("status")
                if latest["status"] != "RUNNING":
                    raise NotFoundError(f"no training job is running (the last one: {latest['status']})")
                return JSONResponse(latest)
            jobs = await self._jobs("list")
            return JSONResponse(jobs if query.get("all") == "true" else {**(jobs[-1] if jobs else {}), "jobs": jobs})
        return await self._answer("/train", request, work)

    @app.delete("/train/{model}")
    @app.delete("/train/")
    async def train_stop(self, request: Request, model: Optional[str] = None) -> Response:
        """Stop ``model``'s job (``/train/``: every running one, as MONAI Label's); nothing is recorded."""
        async def work() -> Response:
            self._authorize_admin(request)
            return JSONResponse(await self._jobs("stop", model))
        return await self._answer("/train", request, work, authorize=False)
