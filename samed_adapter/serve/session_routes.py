"""MONAI Label's sessions: ``PUT /session/`` uploads an image once, and ``/infer/{model}?session_id=ID``
then names it (the images are kept by :class:`~.sessions.SessionImages`); ``GET`` and ``DELETE
/session/{id}``.
"""


from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .app import app
from .folders import RequestFolder

__all__ = ["SessionRoutes"]


class SessionRoutes:
    """The sessions' routes, for the ingress; it has ``settings``, ``sessions``, ``answer``,
    ``check_length`` and ``save_upload``."""

    @app.api_route("/session/", methods=["PUT", "POST"])
    async def create_session(self, request: Request) -> Response:
        """Upload an image once (MONAI Label's client: ``create_session(path)``, a ``files`` field);
        its id then names it in ``/infer/{model}?session_id=ID``."""
        async def work() -> Response:
            self.check_length(request)
            folder = RequestFolder(self.settings.tmp_dir)  # the session store owns it once added
            try:
                async with request.form(max_files=1, max_fields=16) as form:
                    upload = form.get("files")
                    name = getattr(upload, "filename", None) or ""
                    source, _, _ = await self.save_upload(form, "files", folder)
            except BaseException:
                folder.close()
                raise
            session = self.sessions.add(folder, source, Path(name.replace("\\", "/")).name)
            return JSONResponse({"session_id": session.id, "session_info": session.info()})
        return await self.answer("/session/", request, work, guarded=True)

    @app.get("/session/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(self.sessions.get(session_id).info())
        return await self.answer("/session/", request, work)

    @app.delete("/session/{session_id}")
    async def remove_session(self, session_id: str, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(self.sessions.remove(session_id).info())
        return await self.answer("/session/", request, work)
