"""MONAI Label's datastore routes (``serve --datastore FOLDER``): ``/datastore/...``,
``/activelearning/{strategy}``, inference by image id and ``/info/``'s datastore and strategies.
Each route parses the request, calls :class:`~.store_routes.StoreRoutes` (where the work is, on
threads) and answers.
"""


import asyncio
from pathlib import Path
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..adapter_file.config import AdapterConfig
from ..datastore import ORIGINAL
from .app import app
from .errors import (BadGatewayError, BadRequestError, NoDatastoreError, NotFoundError, PayloadTooLargeError,
                     UnprocessableError)
from .folders import RequestFolder
from .store_routes import NO_DATASTORE, StoreRoutes, adapter_for, file_answer, json_body, read_small, strategies_info
from .uploads import params_json, upload_stem

__all__ = ["DatastoreRoutes"]


class DatastoreRoutes:
    """The datastore's routes, for the ingress; it has ``store`` (None without ``--datastore``),
    ``catalog``, ``answer``, ``authorize_admin``, ``check_length``, ``describe``,
    ``adapter_entries``, ``new_folder``, ``remove_folder`` and ``segment_scan``."""

    def require_store(self) -> StoreRoutes:
        """The datastore's routes' work; 501 (start with ``--datastore``) on a server without one."""
        if self.store is None:
            raise NoDatastoreError(NO_DATASTORE)
        return self.store

    async def stored_image(self, image_id: str) -> Path:
        """The datastore's image ``image_id``, for inference by id (no file, no session)."""
        if self.store is None or not image_id:
            how = "an image of the datastore (?image=ID)" if self.store else "start the server with --datastore " \
                "FOLDER to infer by image id"
            raise BadRequestError("no image: send the image with the request (MONAILabelClient.infer(model, id, {}, "
                                  f"file=PATH)), name a session (PUT /session/, then ?session_id=ID), or {how}")
        return await self.store.image_path(image_id)

    async def store_info(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """``/info/``'s datastore and strategies (3D Slicer shows its next-sample and label buttons for them)."""
        if self.store is None:
            return {}
        try:
            stats = await self.store.status()
        except BadGatewayError as err:  # the PACS gone: /info/ still answers (3D Slicer and OHIF connect with it)
            stats = {"error": str(err)}
        return {"datastore": stats, "strategies": strategies_info([e["name"] for e in entries])}

    async def _label_config(self, params: dict[str, Any]) -> Optional[AdapterConfig]:
        """What a label is checked against: ``params``' ``model`` (3D Slicer sends its selected one), else
        the only adapter, else the one with the most classes (``/train/{model}`` checks its own again)."""
        if params.get("model"):
            return AdapterConfig.from_dict((await self.describe(str(params["model"])))["config"])
        entries = await self.adapter_entries()
        widest = max(entries, key=lambda e: e["num_classes"], default=None)
        return AdapterConfig.from_dict(widest["config"]) if widest else None

    async def _score_stored(self, entry: dict[str, Any], image_id: str) -> None:
        """Infer the datastore's image by id to record its score (and keep its labels as ``original``
        when it has none); an image the model cannot read is recorded as failed for this version."""
        store, folder, keep = self.require_store(), self.new_folder(), {}
        try:
            source = await store.image_path(image_id)
            files, _ = await self.segment_scan(entry, source, f"{upload_stem(source.name)}.nii.gz",
                                               {"output_types": "nifti"}, folder, {}, keep)
            result = {"label_names": {n: i for i, n in enumerate(entry["class_names"], start=1)},
                      "adapter": {"name": entry["name"], "fingerprint": entry["fingerprint"]}}
            unsaved = ORIGINAL not in await store.label_tags(image_id)  # a PACS gone: 502, not 500
            await store.after_infer(image_id, entry, files[0], result, {"save_label": unsaved}, keep.get("score"))
        except NotFoundError:  # removed meanwhile
            pass
        except (BadRequestError, PayloadTooLargeError, UnprocessableError) as err:
            await store.record_score(image_id, entry, None, str(err))
        finally:
            self.remove_folder(folder)

    async def _store_upload(self, request: Request, route: str, call: Any) -> Response:
        """A datastore upload (``PUT``): ``await call(form, folder)`` answers; the upload's copy goes with it."""
        async def work() -> Response:
            self.require_store()
            self.check_length(request)
            folder = self.new_folder()
            try:
                async with request.form(max_files=1, max_fields=8) as form:
                    return JSONResponse(await call(form, folder))
            finally:
                self.remove_folder(folder)
        return await self.answer(route, request, work, guarded=True)

    @app.get("/datastore/")
    async def datastore(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self.require_store().listing(request.query_params.get("output")))
        return await self.answer("/datastore/", request, work)

    @app.put("/datastore/")
    @app.put("/datastore/image")
    async def datastore_add_image(self, request: Request) -> Response:
        image = request.query_params.get("image")
        return await self._store_upload(request, "/datastore/image",
                                        lambda form, folder: self.require_store().add_image(form, image, folder))

    @app.delete("/datastore/")
    @app.delete("/datastore/image")
    async def datastore_remove_image(self, request: Request) -> Response:
        async def work() -> Response:
            self.authorize_admin(request)
            return JSONResponse(await self.require_store().remove_image(request.query_params.get("id")))
        return await self.answer("/datastore/image", request, work, authorize=False)

    @app.head("/datastore/image")
    async def datastore_check_image(self, request: Request) -> Response:
        async def work() -> Response:
            query = request.query_params
            return JSONResponse(await self.require_store().check_image(query.get("image"), query.get("check_sum")))
        return await self.answer("/datastore/image", request, work)

    @app.get("/datastore/image")
    async def datastore_image(self, request: Request) -> Response:
        async def work() -> Response:
            store = self.require_store()
            path = await store.image_path(request.query_params.get("image"))
            return file_answer(*await store.open_file(path), path.name)
        return await self.answer("/datastore/image", request, work)

    @app.get("/datastore/image/info")
    async def datastore_image_info(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self.require_store().image_info(request.query_params.get("image")))
        return await self.answer("/datastore/image/info", request, work)

    @app.put("/datastore/image/info")
    async def datastore_set_image_info(self, request: Request) -> Response:
        async def work() -> Response:
            form = await request.form(max_files=0, max_fields=8)
            store, image = self.require_store(), request.query_params.get("image")
            return JSONResponse(await store.set_image_info(image, form.get("info")))
        return await self.answer("/datastore/image/info", request, work)

    @app.put("/datastore/label")
    async def datastore_save_label(self, request: Request) -> Response:
        image, tag = request.query_params.get("image"), request.query_params.get("tag")

        async def save(form: Any, folder: RequestFolder) -> dict[str, Any]:
            config = await self._label_config(params_json(form.get("params")))
            return await self.require_store().save_label(form, image, tag, config, folder)
        return await self._store_upload(request, "/datastore/label", save)

    @app.delete("/datastore/label")
    async def datastore_remove_label(self, request: Request) -> Response:
        async def work() -> Response:
            self.authorize_admin(request)
            query = request.query_params
            return JSONResponse(await self.require_store().remove_label(query.get("id"), query.get("tag")))
        return await self.answer("/datastore/label", request, work, authorize=False)

    @app.head("/datastore/label")
    async def datastore_check_label(self, request: Request) -> Response:
        async def work() -> Response:
            await self.require_store().label_path(request.query_params.get("image"), request.query_params.get("tag"))
            return JSONResponse({})
        return await self.answer("/datastore/label", request, work)

    @app.get("/datastore/label")
    async def datastore_label(self, request: Request) -> Response:
        async def work() -> Response:
            store = self.require_store()
            path = await store.label_path(request.query_params.get("label"), request.query_params.get("tag"))
            return file_answer(*await store.open_file(path), path.name)
        return await self.answer("/datastore/label", request, work)

    @app.get("/datastore/label/info")
    async def datastore_label_info(self, request: Request) -> Response:
        async def work() -> Response:
            query = request.query_params
            return JSONResponse(await self.require_store().label_info(query.get("label"), query.get("tag")))
        return await self.answer("/datastore/label/info", request, work)

    @app.put("/datastore/label/info")
    async def datastore_set_label_info(self, request: Request) -> Response:
        async def work() -> Response:
            form, query = await request.form(max_files=0, max_fields=8), request.query_params
            return JSONResponse(await self.require_store().set_label_info(query.get("label"), query.get("tag"),
                                                                          form.get("info")))
        return await self.answer("/datastore/label/info", request, work)

    @app.post("/activelearning/{strategy}")
    async def activelearning(self, strategy: str, request: Request) -> Response:
        """MONAI Label's next sample; ``least_sure`` may first infer a few unscored images (store_routes)."""
        async def work() -> Response:
            store = self.require_store()
            params = json_body(await read_small(request))
            if strategy != "least_sure":
                return JSONResponse(await store.next_sample(strategy, params))
            entry = await self.describe(adapter_for(params, await asyncio.to_thread(self.catalog.names)), pin=True)
            return JSONResponse(await store.next_sample(strategy, params, entry=entry,
                                                        score=lambda image_id: self._score_stored(entry, image_id)))
        return await self.answer("/activelearning", request, work, guarded=True)
