"""MONAI Label's info, login and inference routes: ``GET /info/``, ``/auth/`` and
``POST /infer/{model}``, in the shapes of :mod:`.monai_label` (3D Slicer's MONAI Label module,
OHIF and MONAI Label's client connect with them).
"""


import hmac
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..adapter_file.config import AdapterConfig
from ..interactive.prompts import ClicksNotTrainedError, require_clicks
from ..io.nrrd import NRRD_EXTENSIONS, nifti_label_as_nrrd
from .app import FINGERPRINT_HEADER, app
from .errors import BadRequestError, UnauthorizedError, UnprocessableError
from .monai_label import answer_name, app_info, multipart
from .sessions import click_labels, parse_clicks
from .uploads import params_json, upload_stem

__all__ = ["MonaiLabelRoutes", "nrrd_answer"]


def nrrd_answer(label: Path, params: dict[str, Any]) -> Path:
    """The NIfTI ``label`` as the NRRD that ``params`` ask for (MONAI Label's ``result_dtype``, default
    uint8, and ``result_compress``), beside it: what OHIF's panel reads."""
    out = label.with_name(label.name.split(".")[0] + ".nrrd")
    try:
        return nifti_label_as_nrrd(label, out, str(params.get("result_dtype") or "uint8"),
                                   str(params.get("result_compress", False)).lower() in ("1", "true"))
    except ValueError as err:
        raise BadRequestError(f"{err}; or drop result_extension for a NIfTI answer") from None


class MonaiLabelRoutes:
    """MONAI Label's info, login and inference routes, for the ingress; it has ``settings``,
    ``sessions``, ``store``, ``answer``, ``check_length``, ``describe``, ``adapter_entries``,
    ``new_folder``, ``remove_folder``, ``save_upload``, ``segment_scan``, ``send_file``,
    ``call_clicks``, ``stored_image``, ``store_info`` and ``train_info``."""

    @app.get("/info/")
    async def info(self, request: Request) -> Response:
        async def work() -> Response:
            entries = await self.adapter_entries()
            return JSONResponse(app_info(entries, **await self.store_info(entries),
                                         **await self.train_info(entries)))
        return await self.answer("/info/", request, work)

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
        return await self.answer("/auth/token", request, work, authorize=False)  # the login that gives the token

    @app.get("/auth/token/valid")
    async def auth_valid(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse({"valid": True})
        return await self.answer("/auth/token/valid", request, work)

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
            self.check_length(request)
            folder = self.new_folder()
            try:
                async with request.form(max_files=2, max_fields=16) as form:
                    params = params_json(form.get("params"))
                    stored: Optional[str] = None  # the datastore image's id, when inferred by id
                    if session is not None:
                        source, stem, dicom = session.image, upload_stem(session.name), session.name.endswith(".zip")
                    elif form.get("file") is None:
                        stored = request.query_params.get("image") or ""
                        source = await self.stored_image(stored)
                        stem, dicom = upload_stem(source.name), False
                        if output == "dicom_seg" and self.store is not None:  # a PACS's series: its SEG
                            source, dicom = await self.store.series_folder(stored), True
                    else:
                        source, stem, dicom = await self.save_upload(form, "file", folder)
                if output == "dicom_seg" and not dicom:
                    raise BadRequestError("output=dicom_seg needs a DICOM series upload (a .zip)")
                times: dict[str, float] = {}
                start = time.perf_counter()
                kind = "dicom-seg" if output == "dicom_seg" else "nifti"
                entry = await self.describe(model, pin=True)  # this version answers, or none (409)
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
                    result, resent = await click_labels(self.call_clicks, entry, source, session, clicks, label,
                                                        times)
                    extra = {"clicks": {"count": len(clicks), "encoded": result.built, "replica": result.replica,
                                        "resent": resent}}
                else:
                    if clicks:
                        raise BadRequestError("clicks answer a label image: use output=all, image or json")
                    files, _ = await self.segment_scan(entry, source, f"{stem}.nii.gz", {"output_types": kind}, folder,
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
                                                                            params, (keep or {}).get("score"))
                if output == "json":
                    return JSONResponse(result_json, headers=version)
                if output != "dicom_seg" and str(params.get("result_extension", "")).lower() in NRRD_EXTENSIONS:
                    label = await folder.run(nrrd_answer, label, params)  # OHIF's panel reads NRRD
                if output in ("image", "dicom_seg"):
                    media = "application/dicom" if output == "dicom_seg" else "application/octet-stream"
                    return self.send_file(folder, label, media, answer_name(label.name), version)
                body, content_type = multipart(result_json, answer_name(label.name), label.read_bytes())
                return Response(body, media_type=content_type, headers=version)
            finally:
                self.remove_folder(folder)
        return await self.answer("/infer", request, work, guarded=True)
