"""MONAI Label's datastore API on the service (``serve --datastore FOLDER``): the work of its routes.

The front (:mod:`.frontend`) parses each request and answers; the work is here, on threads (a
datastore write takes the folder's lock and reads the image to check a label). The routes are
MONAI Label 0.8.5's (``monailabel/endpoints/datastore.py``, ``activelearning.py``), with what its
client, 3D Slicer's module and OHIF's panel call:

- ``GET /datastore/?output=stats|all|train``; ``PUT /datastore/`` and ``/datastore/image``
  (``?image=ID``, form ``file`` and ``params``: Slicer's upload, and what its *Run* calls on a
  local volume before it infers by id); ``DELETE /datastore/image?id=`` (the admin token);
  ``HEAD``/``GET /datastore/image?image=``; ``GET``/``PUT /datastore/image/info``;
- ``PUT /datastore/label?image=&tag=`` (form ``label``, ``params``; Slicer's *Submit label*),
  checked against the adapter's grid and classes; ``DELETE``/``HEAD``/``GET /datastore/label``;
  ``GET``/``PUT /datastore/label/info``;
- ``POST /activelearning/{first|random|least_sure}``, recording ``{ts, client_id}`` under
  ``info["strategy"][name]`` of the image given, as MONAI Label's server does.

Errors: unknown image or label 404, an id taken by other bytes 409, an unsafe id, a file that is
not NIfTI, a label off its image's grid or with classes the adapter lacks 422, the folder locked
by another writer 503, the PACS of ``--datastore-dicomweb`` failing (gone, refusing the server's
credentials, answering what no PACS sends or past a bound) 502, naming it. A refused request
leaves the folder as it was.

``least_sure`` scores: the mean per-voxel entropy of the adapter's softmax over the voxels it
labels (:func:`~samed_adapter.datastore.uncertainty`), computed on the model's own slices
((n, K+1, S, S), before they are resized to the scan) whenever the server infers a datastore image
by id; the model replica computes it (four sums per slice, added up), so the softmax never leaves
it, and the score is kept in that image's info under ``"least_sure"``, keyed by the adapter version's
fingerprint (the newest :data:`MAX_SCORES` versions). A new version's scores start empty: each
``least_sure`` request first scores at most :data:`SCORE_PER_REQUEST` unlabeled images that this
version has not scored (sorted by id; ``params {"score": N}``, 0 to :data:`MAX_SCORE_PER_REQUEST`),
running the model on them as inference by id does, then picks among the scored ones. An image
that cannot be read is recorded as failed for that version and not tried again.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, BinaryIO, Callable, Mapping, Optional, Sequence

import numpy as np

from ..datastore import (FINAL, ORIGINAL, STRATEGIES, DatastoreBusyError, DatastoreError, DatastoreFormatError,
                         EmptyDatastoreError, FolderDatastore, ImageExistsError, ImageNotFoundError,
                         LabelClassError, LabelGridError, LabelNotFoundError, UnsafeIdError, UnsupportedFileError,
                         check_id, file_checksum, first, least_sure, random_image)
from ..datastore.binary import BINARY_EXTENSION, binary_label
from ..datastore.checks import GRID_TOLERANCE, split_name
from ..dicomweb.errors import DicomWebAuthError, DicomWebError
from ..io.errors import ImageReadError, ImageTooLargeError
from ..io.volumes import read_image
from .errors import (BadGatewayError, BadRequestError, NotFoundError, OverloadedError, PayloadTooLargeError,
                     ServeError, UnprocessableError)
from .folders import RequestFolder, stream
from .uploads import params_json

__all__ = ["FAULTS", "MAX_SCORES", "NO_DATASTORE", "SCORE_PER_REQUEST", "StoreRoutes", "adapter_for", "file_answer",
           "json_body", "pacs_failed", "read_small", "served", "strategies_info"]

#: what the datastore routes answer on a server started without one
NO_DATASTORE = ("this server keeps no datastore: start it with samed-adapter serve --datastore FOLDER (images and "
                "labels in MONAI Label's local datastore format) or --datastore-dicomweb URL (a PACS) to upload "
                "images, save labels and infer by image id")
#: the image info key of the least_sure scores, by adapter fingerprint
SCORES = "least_sure"
#: the adapter versions whose scores an image keeps (the newest)
MAX_SCORES = 8
#: unlabeled images without a score a least_sure request scores before it picks, by default and at most
SCORE_PER_REQUEST = 4
MAX_SCORE_PER_REQUEST = 32
#: the largest JSON body of params (``POST /activelearning``)
MAX_PARAMS_BYTES = 1 << 20
#: image info keys that describe the stored file or the server's scores: set by the server only
_RESERVED = ("checksum", "name", "ts", "path", SCORES)

_STATUS: tuple[tuple[type, int], ...] = (
    (ImageExistsError, 409), (EmptyDatastoreError, 409), (ImageNotFoundError, 404), (LabelNotFoundError, 404),
    (UnsafeIdError, 422), (UnsupportedFileError, 422), (LabelGridError, 422), (LabelClassError, 422),
    (DatastoreBusyError, 503), (DatastoreFormatError, 500))


#: what a datastore route's work may raise: the datastore's, a reader's, the PACS's (serve --datastore-dicomweb)
FAULTS = (DatastoreError, ImageReadError, DicomWebError)


def pacs_failed(err: DicomWebError) -> str:
    """The one line a PACS's failure answers with: what the PACS did (its URL first), and what to check
    on the service (the DICOMweb errors' own hints name `segment --dicomweb`'s flags, dropped here)."""
    text = re.sub(r",? (then run again )?with --continue[^;]*", "", str(err))
    if isinstance(err, DicomWebAuthError):
        text = text.split("; check --dicomweb-user")[0]
        return (f"the datastore's PACS failed: {text}; check the user in the --datastore-dicomweb URL "
                "(http://USER@host/dicom-web) and the password in SAMED_DICOMWEB_PASSWORD")
    return f"the datastore's PACS failed: {text}; it is serve's --datastore-dicomweb: retry once it answers there"


def served(err: Exception) -> ServeError:
    """A datastore, reader or PACS error as the service answers it (status by kind, the same one line)."""
    if isinstance(err, DicomWebError):  # the PACS's fault, not the server's (500) nor the client's (4xx)
        return BadGatewayError(pacs_failed(err))
    if isinstance(err, ImageTooLargeError):
        return PayloadTooLargeError(str(err))
    if isinstance(err, ImageReadError):
        return UnprocessableError(str(err))
    status = next((code for kind, code in _STATUS if isinstance(err, kind)), 400)
    return OverloadedError(str(err)) if status == 503 else ServeError(str(err), status)


def strategies_info(adapters: Sequence[str]) -> dict[str, Any]:
    """``/info/``'s strategies as MONAI Label lists them ({name: {"description", "config"}}); least_sure's
    config lists the adapters, which 3D Slicer shows as a drop-down and sends the chosen one of."""
    return {name: {"description": text, "config": {"model": list(adapters)} if name == "least_sure" and adapters
                   else {}} for name, text in STRATEGIES.items()}


def adapter_for(params: Mapping[str, Any], names: Sequence[str]) -> str:
    """The adapter whose labels least_sure ranks: ``params``' ``model``, else the only one served."""
    if params.get("model"):
        return str(params["model"])
    if len(names) != 1:
        raise BadRequestError(f"least_sure ranks one adapter's labels: send params {{\"model\": NAME}}, NAME one of "
                              f"{list(names)}")
    return names[0]


def file_answer(handle: BinaryIO, size: int, name: str) -> Any:
    """A stored file as the answer, read from ``handle`` (opened before: a removal meanwhile does not cut it)."""
    from starlette.responses import StreamingResponse

    quoted = urllib.parse.quote(name)
    disposition = f"attachment; filename=\"{quoted}\"; filename*=UTF-8''{quoted}"
    return StreamingResponse(stream(handle), media_type="application/octet-stream",
                             headers={"Content-Length": str(size), "Content-Disposition": disposition})


def info_form(value: Any) -> dict[str, Any]:
    """MONAI Label's ``info`` form field (a JSON object), with none of the keys the server sets."""
    info = params_json(value)
    reserved = sorted(set(info) & set(_RESERVED))
    if reserved:
        raise BadRequestError(f"info keys {reserved} describe the stored file or its scores and are set by the "
                              "server; send other keys")
    return info


class StoreRoutes:
    """The datastore routes' work on one :class:`FolderDatastore` (opened once by the front)."""

    def __init__(self, datastore: FolderDatastore) -> None:
        self.datastore = datastore

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on a thread, its datastore, reader or PACS errors answered as :func:`served` says."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except FAULTS as err:
            raise served(err) from None

    # ---- reading

    async def listing(self, output: Optional[str]) -> Any:
        """``GET /datastore/``: stats (default), the whole JSON (all), or the training list (train)."""
        calls = {"stats": self.datastore.status, "all": self.datastore.json, "train": self.datastore.datalist}
        if (output or "stats") not in calls:
            raise BadRequestError(f"output={output!r}: use stats, all or train")
        return await self._run(calls[output or "stats"])

    async def status(self) -> dict[str, Any]:
        return await self._run(self.datastore.status)

    async def image_path(self, image_id: Optional[str]) -> Path:
        """The stored image's path (404 naming the fix when unknown, 422 when unsafe)."""
        return await self._run(lambda: self.datastore.image_path(check_id(image_id or "")))

    async def label_path(self, image_id: Optional[str], tag: Optional[str]) -> Path:
        return await self._run(lambda: self.datastore.label_path(check_id(image_id or ""),
                                                                 check_id(tag or "", "label tag")))

    async def series_folder(self, image_id: str) -> Path:
        """The DICOM series of a PACS's image (``--datastore-dicomweb``), for a DICOM SEG answer."""
        fetch = getattr(self.datastore, "series_folder", None)
        if fetch is None:
            raise BadRequestError("output=dicom_seg needs DICOM, and this datastore's images are NIfTI files: ask "
                                  "output=image (or all, json), or send the series as a .zip")
        return await self._run(fetch, check_id(image_id))

    async def label_tags(self, image_id: str) -> dict[str, str]:
        """{tag: label id} of a stored image's labels."""
        return await self._run(self.datastore.get_labels_by_image_id, image_id)

    async def check_image(self, image_id: Optional[str], check_sum: Optional[str]) -> dict[str, Any]:
        """``HEAD /datastore/image``: {} if there (and, given ``check_sum`` ``[SHA256:]hex``, with those bytes)."""
        path = await self.image_path(image_id)
        if check_sum:
            digest = check_sum.split(":", 1)[-1].lower()
            if (await self._run(file_checksum, path)).split(":", 1)[1] != digest:
                raise NotFoundError(f"image {image_id!r} is stored with other bytes than checksum {check_sum}; "
                                    "GET /datastore/image?image=ID gives the stored file")
        return {}

    async def open_file(self, path: Path) -> tuple[BinaryIO, int]:
        """An open handle on a stored file and its size: a removal meanwhile does not cut the answer."""
        def opened() -> tuple[BinaryIO, int]:
            handle = open(path, "rb")
            return handle, os.fstat(handle.fileno()).st_size  # the opened file: a removal now cannot leak it
        try:
            return await asyncio.to_thread(opened)
        except FileNotFoundError:
            raise NotFoundError(f"{path.name} was removed just now; list the datastore again") from None

    async def image_info(self, image_id: Optional[str]) -> dict[str, Any]:
        await self.image_path(image_id)
        return await self._run(self.datastore.get_image_info, image_id)

    async def label_info(self, label_id: Optional[str], tag: Optional[str]) -> dict[str, Any]:
        await self.label_path(label_id, tag)
        return await self._run(self.datastore.get_label_info, label_id, tag)

    # ---- writing

    async def add_image(self, form: Any, image_id: Optional[str], folder: RequestFolder) -> dict[str, Any]:
        """``PUT /datastore/image``: the upload under ``image_id`` (default: its file name less the extension).

        The same id sent again with the same image (its bytes, or its voxels on its grid: 3D
        Slicer uploads a volume again on each *Run* after a restart) answers as the first time;
        other contents under a taken id are refused (409), never written over.
        """
        saved, file_id = await self._saved(form, "file", folder)
        params = params_json(form.get("params"))
        image_id = image_id or file_id
        try:
            return {"image": await asyncio.to_thread(self.datastore.add_image, image_id, saved, params)}
        except ImageExistsError as err:
            stored = await self._run(self.datastore.get_image_uri, image_id)  # reads the JSON: off the loop
            if stored and await self._run(_same_image, Path(stored), saved, self.datastore.max_voxels):
                return {"image": image_id, "exists": True}
            raise ServeError(f"image {image_id!r} exists in the datastore with other contents and is never replaced: "
                             "upload it under another id (in 3D Slicer, rename the volume), or delete the stored one "
                             "first (DELETE /datastore/image?id=ID with the admin token; its labels go too)", 409) \
                from err
        except FAULTS as err:
            raise served(err) from None

    async def save_label(self, form: Any, image_id: Optional[str], tag: Optional[str], config: Any,
                         folder: RequestFolder) -> dict[str, Any]:
        """``PUT /datastore/label``: the upload as ``image_id``'s label of ``tag`` (default final),
        on its image's grid and with ``config``'s classes only (``config`` None: the grid only)."""
        image_id = await self._run(check_id, image_id or "")
        tag = await self._run(check_id, tag or FINAL, "label tag")
        image = await self.image_path(image_id)  # 404 before the upload is copied
        saved, _ = await self._saved(form, "label", folder, binary=True)
        if saved.suffix == BINARY_EXTENSION:  # OHIF's voxel buffer, as MONAI Label reads it
            try:
                saved = await folder.run(binary_label, saved, image, folder.path / "label.nii.gz")
            except UnsupportedFileError as err:
                raise served(err) from None
        params = params_json(form.get("params"))
        label_id = await self._run(self.datastore.save_label, image_id, saved, tag, params, config=config)
        return {"image": image_id, "label": label_id, "tag": tag}

    async def set_image_info(self, image_id: Optional[str], value: Any) -> dict[str, Any]:
        await self.image_path(image_id)
        info = info_form(value)
        await self._run(self.datastore.update_image_info, image_id, info)
        return await self.image_info(image_id)

    async def set_label_info(self, label_id: Optional[str], tag: Optional[str], value: Any) -> dict[str, Any]:
        await self.label_path(label_id, tag)
        info = info_form(value)
        await self._run(self.datastore.update_label_info, label_id, tag, info)
        return await self.label_info(label_id, tag)

    async def remove_image(self, image_id: Optional[str]) -> dict[str, Any]:
        await self._run(lambda: self.datastore.remove_image(check_id(image_id or "")))
        return {}

    async def remove_label(self, label_id: Optional[str], tag: Optional[str]) -> dict[str, Any]:
        await self._run(lambda: self.datastore.remove_label(check_id(label_id or ""), check_id(tag or "", "label tag")))
        return {}

    async def _saved(self, form: Any, field: str, folder: RequestFolder, *,
                     binary: bool = False) -> tuple[Path, str]:
        """The form's file ``field`` copied into ``folder`` as ``upload<ext>``: (path, the id its name gives);
        ``binary``: a ``.bin`` file is taken too (OHIF's labels, see :mod:`samed_adapter.datastore.binary`)."""
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise BadRequestError(f"no file in the form field {field!r}; send the NIfTI file as multipart form data "
                                  f"(curl -F {field}=@case.nii.gz)")
        name = PurePosixPath((upload.filename or "").replace("\\", "/")).name
        extensions = (*self.datastore.extensions, BINARY_EXTENSION) if binary else self.datastore.extensions
        try:  # MONAI Label takes a file without a name as .nii.gz
            file_id, ext = split_name(name, extensions) if name else ("", ".nii.gz")
        except UnsupportedFileError as err:
            raise served(err) from None
        saved = folder.path / f"upload{ext}"
        with open(saved, "xb") as out:
            await folder.run(shutil.copyfileobj, upload.file, out, 1 << 20)
        return saved, file_id

    # ---- after inference by id

    async def after_infer(self, image_id: str, entry: Mapping[str, Any], label: Path, result: dict[str, Any],
                          params: Mapping[str, Any], score: Optional[float]) -> dict[str, Any]:
        """Record the adapter version's uncertainty ``score`` of ``image_id`` (computed on the model
        replica from its softmax, :func:`~samed_adapter.datastore.uncertainty`), and save its
        automatic ``label`` when ``params`` ask (``save_label``, tag ``label_tag``,
        default original, as MONAI Label); what was done, for the answer's JSON."""
        done: dict[str, Any] = {"image": image_id}
        tag = None
        if _truthy(params.get("save_label")):  # checked before anything is written
            if not label.name.endswith((".nii.gz", ".nii")):
                raise BadRequestError("save_label keeps the labels as the datastore's NIfTI label, and this answer "
                                      "is a DICOM SEG: ask output=image, all or json to save them")
            tag = await self._run(check_id, str(params.get("label_tag") or ORIGINAL), "label tag")
            if tag == FINAL:
                raise UnprocessableError("an automatic label is saved as 'original' (or another tag), never over a "
                                         "person's 'final' label; drop label_tag or name another tag")
        if score is not None:
            done["uncertainty"] = await self.record_score(image_id, entry, score)
        if tag is not None:
            info = {"model": entry["name"], "fingerprint": entry["fingerprint"], "params": result}
            await self._run(self.datastore.save_label, image_id, label, tag, info)
            done["label_tag"] = tag
        return done

    async def record_score(self, image_id: str, entry: Mapping[str, Any], score: Optional[float],
                           error: Optional[str] = None) -> Optional[float]:
        """Keep the version's uncertainty ``score`` of ``image_id`` (or the ``error`` that kept it from one)."""
        record: dict[str, Any] = {"adapter": entry["name"], "ts": int(time.time())}
        record.update({"uncertainty": score} if score is not None else {"error": error or "no probabilities"})

        def change(info: dict[str, Any]) -> dict[str, Any]:
            kept = dict(info.get(SCORES) or {})
            kept[entry["fingerprint"]] = record
            newest = sorted(kept, key=lambda fp: kept[fp].get("ts", 0) if isinstance(kept[fp], dict) else 0)
            return {SCORES: {fp: kept[fp] for fp in newest[-MAX_SCORES:]}}
        await self._run(self.datastore.change_image_info, image_id, change)
        return score

    def scores(self, fingerprint: str) -> tuple[dict[str, float], set[str]]:
        """({image id: uncertainty}, {ids that failed}) of the version ``fingerprint`` (on a thread)."""
        objects = self.datastore.json()["objects"]
        scored, failed = {}, set()
        for image_id, entry in objects.items():
            record = (entry["image"]["info"].get(SCORES) or {}).get(fingerprint)
            if isinstance(record, dict) and isinstance(record.get("uncertainty"), (int, float)):
                scored[image_id] = float(record["uncertainty"])
            elif isinstance(record, dict):
                failed.add(image_id)
        return scored, failed

    # ---- active learning

    async def next_sample(self, strategy: str, params: dict[str, Any], *,
                          entry: Optional[Mapping[str, Any]] = None,
                          score: Optional[Callable[[str], Awaitable[None]]] = None) -> dict[str, Any]:
        """``POST /activelearning/{strategy}``: the image to label next, with its info, or {} when none.

        ``least_sure`` needs the serving adapter version's ``entry`` and ``score(image_id)``,
        which infers a stored image by id (recording its score).
        """
        tag = params.get("label_tag") or None
        if strategy == "first":
            pick = await self._run(first, self.datastore, tag)
        elif strategy == "random":
            pick = await self._run(random_image, self.datastore, tag, strategy=strategy)
        elif strategy == "least_sure" and entry is not None and score is not None:
            pick = await self._least_sure(entry, params, tag, score)
        else:
            raise NotFoundError(f"no active learning strategy {strategy!r}; this server has {sorted(STRATEGIES)}")
        if not pick:
            return {}
        info = await self._run(self.datastore.get_image_info, pick["id"])
        stamp = {"ts": int(time.time()), "client_id": params.get("client_id")}
        await self._run(self.datastore.update_image_info, pick["id"],
                        {"strategy": {**(info.get("strategy") or {}), strategy: stamp}})
        return {**pick, **info}

    async def _least_sure(self, entry: Mapping[str, Any], params: Mapping[str, Any], tag: Optional[str],
                          score: Callable[[str], Awaitable[None]]) -> Optional[dict[str, Any]]:
        limit = params.get("score", SCORE_PER_REQUEST)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_SCORE_PER_REQUEST:
            raise BadRequestError(f"score={limit!r}: give how many unscored images to score now, 0 to "
                                  f"{MAX_SCORE_PER_REQUEST}")
        unlabeled = sorted(await self._run(self.datastore.get_unlabeled_images, tag))
        scored, failed = await self._run(self.scores, entry["fingerprint"])
        for image_id in [i for i in unlabeled if i not in scored and i not in failed][:limit]:
            await score(image_id)
        scored, _ = await self._run(self.scores, entry["fingerprint"])
        pick = await self._run(least_sure, self.datastore, scored, tag)
        if pick is not None:
            pick["unscored"] = sum(i not in scored for i in unlabeled)
        return pick


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def _same_image(stored: Path, upload: Path, max_voxels: int) -> bool:
    """The upload is the stored image: the same bytes, or the same voxels on the same grid."""
    if file_checksum(stored) == file_checksum(upload):
        return True
    a, b = read_image(stored, max_voxels=max_voxels), read_image(upload, max_voxels=max_voxels)
    if a.array.shape != b.array.shape or not np.array_equal(a.array, b.array):
        return False
    voxel = float(min(a.spacing))
    return a.affine is not None and b.affine is not None and bool(
        np.abs(a.affine - b.affine).max() <= GRID_TOLERANCE * voxel)


async def read_small(request: Any, limit: int = MAX_PARAMS_BYTES) -> bytes:
    """A request's body of params, refused (413) past ``limit`` bytes whatever its Content-Length says."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"the params are over {limit // 1024} KiB; send a small JSON object")
    return bytes(body)


def json_body(raw: bytes) -> dict[str, Any]:
    """``POST /activelearning``'s body: MONAI Label's client sends the params as a JSON object (or nothing)."""
    return params_json(raw.strip(), example='a body of {"client_id": "slicer"}')
