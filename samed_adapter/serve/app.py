"""The service's one FastAPI app, which every route group's mixin declares its routes on, and the
error answer they share.

The ingress (:class:`~.frontend.Frontend`, the native API and the plumbing) inherits the other
route groups as mixins: MONAI Label's info, login and inference (:mod:`.monai_routes`), its
sessions (:mod:`.session_routes`), datastore (:mod:`.datastore_routes`) and training
(:mod:`.train_routes`), and the adapters' versions (:mod:`.version_routes`). Ray Serve finds a
route declared on any class of the ingress's MRO (Ray 2.53 and later: ray-project/ray#59410).
"""


from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .errors import ServeError

app = FastAPI(title="samed-adapter", description="SAMed adapters on one SAM: native API and MONAI Label's",
              docs_url=None, redoc_url=None, openapi_url=None)

#: the response header that names the adapter version (its fingerprint) that made an answer
FINGERPRINT_HEADER = "X-Adapter-Fingerprint"


def error_answer(err: ServeError) -> JSONResponse:
    """Every error's answer: ``{"error": one line, "status": code}`` with that status."""
    return JSONResponse({"error": str(err), "status": err.status}, status_code=err.status)


@app.exception_handler(HTTPException)
async def _route_error(request: Request, err: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer as every error here does: ``{"error", "status"}``."""
    return error_answer(ServeError(f"{request.method} {request.url.path}: {err.detail} (routes: GET /v1/adapters, GET "
                                   "/v1/adapters/{name}/versions, POST /v1/adapters/{name}/serve?version=N, POST "
                                   "/v1/segment, "
                                   "GET /info/, POST /infer/{adapter}, PUT /session/, GET or DELETE /session/{id}, "
                                   "/datastore/, POST /activelearning/{strategy} and POST, GET or DELETE "
                                   "/train/{adapter} (serve --datastore), GET /healthz, GET "
                                   "/metrics)",
                                   err.status_code))
