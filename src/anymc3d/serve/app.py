"""The FastAPI application: ``create_app(ServeConfig(...))``.

Endpoints (all JSON errors are ``{"detail": "<the CLI's one-line message>"}``):

* ``GET /healthz`` - liveness and queue state (public);
* ``GET /v1/plugins`` - every task the service runs: labels, threshold, backbone, inputs, views;
* ``POST /v1/predict`` - one volume upload (``file``), optional ``tasks=a,b`` and ``heatmaps=true``;
  the JSON of ``anymc3d predict --plugins`` plus, with heatmaps, the URLs of each task's heatmap NIfTI
  and PNG and of the volume the viewer shows;
* ``GET /v1/results/{id}/{file}`` - those files, until the result expires;
* ``GET /`` - the web viewer (static files shipped in the package; nothing from the network).

Status codes: 400 unusable request (type, empty, unknown task, a Host header not allowed), 401 token,
403 cross-origin request, 408 upload too slow / past its deadline, 413 upload too large, 422 the volume
cannot be used (the reader's / predictor's message, a header that points outside the upload), 503 queue
full (Retry-After), 507 one result larger than the results disk cap.

Middleware, outermost first: security headers on every response, ``TrustedHostMiddleware`` (the Host
header must be one of ``config.allowed_hosts``: no DNS rebinding), then :class:`.guard.Guard` (Origin,
token, size, admission, upload deadline). Answers never carry server paths (plugin names only).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .config import ServeConfig
from .guard import Guard, SecurityHeaders, token_ok
from .jobs import Admission, Workers
from .results import ResultsFull, ResultStore
from .service import Redactor, ServiceError, load_engines, parse_tasks, plugins_info, run_request
from .uploads import BadUpload, NotInline, UploadTooLarge, save_upload
from .workspace import Workspace

STATIC = Path(__file__).with_name("static")


class Error(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    version: str
    tasks: int
    auth_required: bool
    queue_capacity: int
    in_flight: int


class PluginRow(BaseModel):
    task: str
    task_name: str
    task_type: str
    labels: list[str]
    threshold: float
    backbone: str
    backbone_fingerprint: str
    inputs: list[str]
    streams: list[str]
    mode: str


class Skipped(BaseModel):
    name: str
    reason: Optional[str] = None


class Plugins(BaseModel):
    backbone: str
    backbone_fingerprint: str
    plugins: list[PluginRow]
    skipped: list[Skipped]


_ERR = {"model": Error}
_AUTH = {401: {**_ERR, "description": "missing or wrong bearer token"}}


def _lifespan(config: ServeConfig, workers: Workers, results: ResultStore, workspace: Workspace):
    """The app's lifespan: a sweeper of expired results while it runs; workers, results, workspace closed after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweeper():
            while True:
                await asyncio.sleep(min(60.0, config.results_ttl_s / 2))
                results.sweep()

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            workers.close()
            results.close()
            workspace.close()

    return lifespan


def _auth(config: ServeConfig) -> tuple[list, dict]:
    """``(dependencies, responses)`` of a route that needs the token: empty when the service has none."""
    bearer = HTTPBearer(auto_error=False, description="the token of `anymc3d serve --token-file`")

    def require_token(cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        # the Guard middleware has already checked this before the body was read; declared here for OpenAPI
        header = f"Bearer {cred.credentials}" if cred is not None else None
        if not token_ok(header, config.token):
            raise ServiceError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                               {"WWW-Authenticate": "Bearer"})

    # the schema declares the bearer scheme only when the service requires it (it documents this service)
    secured = [Depends(require_token)] if config.token is not None else []
    auth_doc = _AUTH if config.token is not None else {}
    return secured, auth_doc


def _add_error_handlers(app: FastAPI, redact: Redactor) -> None:
    """Every error answer is ``{"detail": "<one line>"}`` with server paths redacted."""

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return JSONResponse({"detail": redact(exc.detail)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
        return JSONResponse({"detail": redact("; ".join(parts) or "invalid request")}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": redact(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)


def _add_info_routes(app: FastAPI, config: ServeConfig, engines: list, admission: Admission, redact: Redactor,
                     secured: list, auth_doc: dict) -> None:
    """``GET /healthz`` (public) and ``GET /v1/plugins``."""

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """Liveness: the store is loaded and the service answers. No token needed."""
        return Health(status="ok", version=__version__, tasks=len(engines[0].tasks),
                      auth_required=config.token is not None, queue_capacity=admission.capacity,
                      in_flight=admission.in_flight)

    @app.get("/v1/plugins", response_model=Plugins, responses=auth_doc, dependencies=secured,
             tags=["predict"])
    def plugins() -> dict:
        """The tasks this service runs (one per compatible plugin of the store) and the plugins it skipped."""
        return redact.json(plugins_info(engines[0]))


def _predict_responses(auth_doc: dict) -> dict:
    """The OpenAPI responses of ``POST /v1/predict``."""
    return {200: {"description": "the JSON of `anymc3d predict --plugins` (+ `heatmaps`, `result` "
                                 "with heatmaps=true)",
                  "content": {"application/json": {"schema": {"type": "object"}}}},
            400: {**_ERR, "description": "unusable request: file type, empty upload, bad zip, unknown task"},
            **auth_doc,
            403: {**_ERR, "description": "cross-origin request (an Origin that is not this service's)"},
            408: {**_ERR, "description": "the upload did not arrive within --upload-timeout / above "
                                         "--min-upload-rate"},
            413: {**_ERR, "description": "upload (or a zip's content or member count) over the limit"},
            422: {**_ERR, "description": "the volume cannot be used (the CLI's message), its header "
                                         "points outside the upload, or a bad parameter"},
            503: {**_ERR, "description": "request queue full; see Retry-After",
                  "headers": {"Retry-After": {"schema": {"type": "integer"},
                                              "description": "seconds"}}},
            507: {**_ERR, "description": "this request's heatmap files alone exceed --max-results-mb"}}


async def _save_upload(file: UploadFile, config: ServeConfig, workspace: Workspace):
    """The uploaded volume saved into the workspace; its problems as 413 / 422 / 400."""
    try:
        return await run_in_threadpool(save_upload, file.file, file.filename, config.max_upload_bytes,
                                       config.max_unzipped_bytes, config.max_zip_members, workspace.uploads)
    except UploadTooLarge as exc:
        raise ServiceError(413, str(exc)) from exc
    except NotInline as exc:
        raise ServiceError(422, str(exc)) from exc
    except BadUpload as exc:
        raise ServiceError(400, str(exc)) from exc


def _add_predict_route(app: FastAPI, config: ServeConfig, engines: list, workers: Workers, results: ResultStore,
                       workspace: Workspace, redact: Redactor, secured: list, auth_doc: dict) -> None:
    """``POST /v1/predict``: every task (or ``tasks``) on one uploaded volume."""
    reader_args = config.reader_args()

    @app.post("/v1/predict", tags=["predict"], dependencies=secured, responses=_predict_responses(auth_doc))
    async def predict(request: Request,
                      file: UploadFile = File(..., description="one .nii/.nii.gz/.nrrd/.mha/.npy volume, or a "
                                                               ".zip of one DICOM series"),
                      tasks: Optional[str] = Query(None, description="comma list of tasks (default: all)"),
                      heatmaps: bool = Query(False, description="also compute heatmaps (NIfTI + PNG URLs)")):
        """Every task (or ``tasks``) on one uploaded volume."""
        task_list = parse_tasks(tasks, engines[0])
        upload = await _save_upload(file, config, workspace)
        rid = ""
        try:
            out = await workers.run(run_request, upload, task_list, heatmaps, results, reader_args,
                                    request.scope.get("root_path", "").rstrip("/"))
            rid = (out.get("result") or {}).get("id", "")
        except ResultsFull as exc:
            raise ServiceError(507, str(exc)) from exc
        finally:
            await run_in_threadpool(upload.discard, config.keep, rid)
        results.sweep()
        for name, t in (out.get("tasks") or {}).items():  # plugin names only, never the store's paths
            if isinstance(t, dict) and "plugin" in t:
                t["plugin"] = name
        return Response(json.dumps(redact.json(out), default=float), media_type="application/json")


def _add_file_routes(app: FastAPI, config: ServeConfig, results: ResultStore, secured: list, auth_doc: dict) -> None:
    """``GET /v1/results/{id}/{file}``, the viewer at ``GET /`` and its ``/static`` files."""

    @app.get("/v1/results/{result_id}/{name:path}", tags=["predict"], dependencies=secured,
             responses={**auth_doc, 404: {**_ERR, "description": "unknown or expired result, or no such file"},
                        200: {"description": "the file", "content": {"application/octet-stream": {}, "image/png": {}}}})
    def result_file(result_id: str, name: str):
        """A heatmap NIfTI / PNG (``<task>/<id>_heatmap.nii.gz``) or ``image.nii.gz`` of a result, until it expires."""
        path = results.get(result_id, name)
        if path is None or not path.is_file():
            raise ServiceError(404, f"no file {name!r} in result {result_id!r} (unknown, or expired after "
                                    f"{config.results_ttl_s:.0f} s)")
        media = "image/png" if name.endswith(".png") else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=Path(name).name,
                            headers={"Cache-Control": "private, no-store"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


def _add_middleware(app: FastAPI, config: ServeConfig, admission: Admission) -> None:
    """Outermost first: security headers, TrustedHost (no DNS rebinding), then the Guard."""
    app.add_middleware(Guard, token=config.token, max_body=config.max_upload_bytes, admission=admission,
                       allowed_origins=config.allowed_origins, upload_timeout_s=config.upload_timeout_s,
                       min_rate_bps=config.min_upload_rate_kib * 1024)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts, www_redirect=False)
    app.add_middleware(SecurityHeaders)  # outermost: also on the 400 of TrustedHost and the Guard's answers


def create_app(config: ServeConfig, engines: list | None = None) -> FastAPI:
    """The service for ``config``. The store is loaded here, once (``engines``: already loaded ones)."""
    engines = engines if engines is not None else load_engines(config)
    admission = Admission(config.queue, len(engines))
    workers = Workers(engines, admission)
    workspace = Workspace()
    results = ResultStore(config.results_ttl_s, root=workspace.results, max_bytes=config.max_results_bytes)
    redact = Redactor(config.plugins, workspace.root)

    # docs_url / redoc_url off: those pages load Swagger UI / ReDoc from a CDN (the service works offline)
    app = FastAPI(title="anymc3d serve", version=__version__, lifespan=_lifespan(config, workers, results, workspace),
                  docs_url=None, redoc_url=None,
                  description="3D volume classification: every task of one plugin store on one loaded backbone.")
    app.state.config, app.state.engines, app.state.admission = config, engines, admission
    app.state.workers, app.state.results, app.state.workspace = workers, results, workspace
    secured, auth_doc = _auth(config)
    _add_error_handlers(app, redact)
    _add_info_routes(app, config, engines, admission, redact, secured, auth_doc)
    _add_predict_route(app, config, engines, workers, results, workspace, redact, secured, auth_doc)
    _add_file_routes(app, config, results, secured, auth_doc)
    _add_middleware(app, config, admission)
    return app


__all__ = ["create_app"]
