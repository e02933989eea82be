"""MONAI Label's training routes (``serve --datastore``): ``POST``, ``GET`` and ``DELETE``
``/train/{model}``, ``GET`` and ``DELETE /train/``, and ``/info/``'s trainers. The jobs run in the
training jobs' actor (:mod:`.training_jobs`), never in the front: each route asks it and answers.
"""


from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .app import app
from .errors import NotFoundError, OverloadedError, ServeError
from .store_routes import json_body, read_small
from .training_jobs import ACTOR_NAMESPACE, actor_name, trainers

__all__ = ["TrainRoutes"]


class TrainRoutes:
    """The training routes, for the ingress; it has ``settings``, ``store``, ``require_store``,
    ``answer`` and ``authorize_admin``."""

    async def _jobs(self, method: str, *args: Any) -> Any:
        """Call the training jobs' actor; the ServeError it answers with is raised here."""
        import ray

        self.require_store()
        try:
            actor = ray.get_actor(actor_name(self.settings), namespace=ACTOR_NAMESPACE)
            result = await getattr(actor, method).remote(*args)
        except (ValueError, ray.exceptions.RayError) as err:
            raise OverloadedError(f"the training jobs' actor cannot be reached ({type(err).__name__}); restart the "
                                  "server to start it again") from None
        if isinstance(result, ServeError):
            raise result
        return result

    async def train_info(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
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
            self.authorize_admin(request)
            return JSONResponse(await self._jobs("start", model, json_body(await read_small(request))))
        return await self.answer("/train", request, work, authorize=False)

    @app.get("/train/{model}")
    async def train_status(self, model: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await self._jobs("status", model))
        return await self.answer("/train", request, work)

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
        return await self.answer("/train", request, work)

    @app.delete("/train/{model}")
    @app.delete("/train/")
    async def train_stop(self, request: Request, model: Optional[str] = None) -> Response:
        """Stop ``model``'s job (``/train/``: every running one, as MONAI Label's); nothing is recorded."""
        async def work() -> Response:
            self.authorize_admin(request)
            return JSONResponse(await self._jobs("stop", model))
        return await self.answer("/train", request, work, authorize=False)
