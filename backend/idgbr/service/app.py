"""The local HTTP service (`idgbr serve`): FastAPI routes, request validation and the uvicorn runner."""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Dict, List, Literal, Optional

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import idgbr
from idgbr.errors import BAD_PARAMETER, IdgbrError
from idgbr.limits import DEVICES, MAX_RULE_PX, MAX_SEED, MAX_STEPS, MAX_TILE, MIN_STEPS, MIN_TILE, PRECISIONS
from idgbr.net import is_loopback
from idgbr.procs import ParentWatch, pid_alive
from idgbr.service.auth import bearer_matches, load_or_create_token, write_token_file
from idgbr.service.codes import (
    ALREADY_FINISHED,
    INVALID_REQUEST,
    NOT_FOUND,
    OUTPUT_BUSY,
    QUEUE_FULL,
    TOO_LARGE,
    UNAUTHORIZED,
)
from idgbr.service.jobs import JobNotFound, JobQueue, JobState, QueueFull, Runner
from idgbr.service.models import BundleCache, ModelCatalog, device_info
from idgbr.service.uploads import (
    DEFAULT_MAX_UPLOAD_MB,
    MAX_SIDECARS,
    MB,
    REMOTE_JOB_KEY,
    FileStore,
    UploadId,
    UploadRefused,
    register_routes,
)

READY_PREFIX = "IDGBR READY port="
MAX_BODY_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
RASTER_SUFFIXES = (".tif", ".tiff")
# Exit codes of `idgbr serve`, so a launcher can tell the failures apart without parsing text.
EXIT_BAD_ARGS = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_PORT_TAKEN = 4
STOP_TIMEOUT_S = 10.0  # how long a stopping service waits for its running job to clean up
ORPHAN_STOP_TIMEOUT_S = 2.0  # ... when its parent process died (it must be gone within 5 s)
PARENT_CHECK_TICKS = 5  # uvicorn ticks every 0.1 s: look at the parent process every 0.5 s


# --------------------------------------------------------------------------------------------------------------
# Request and response bodies
# --------------------------------------------------------------------------------------------------------------
def _check_path_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from exc
    if not Path(value).is_absolute():
        raise ValueError("must be an absolute path (the service does not share the caller's working folder)")
    return value


PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]
Coordinate = Annotated[float, Field(ge=-1e12, le=1e12, allow_inf_nan=False)]


class JobRequest(BaseModel):
    """A segmentation or refinement job: the fields of idgbr.pipeline.RunOptions as JSON."""

    model_config = ConfigDict(extra="forbid")

    input: Optional[PathText] = Field(None, description="absolute path of the input raster (GeoTIFF) on the "
                                                        "service's machine; or input_upload")
    output: Optional[PathText] = Field(None, description="absolute path of the output GeoTIFF (.tif); written "
                                                         "atomically; not with input_upload")
    mode: Literal["refine", "segment"] = "refine"
    coarse: Optional[PathText] = Field(None, description="class-id raster to refine instead of the model's own")
    input_upload: Optional[UploadId] = Field(None, description="instead of input/output: an upload (POST /uploads) "
                                                               "as the input; the results stay in the job's own "
                                                               "folder for GET /jobs/{id}/files/{name}")
    coarse_upload: Optional[UploadId] = Field(None, description="with input_upload: an upload as the coarse map")
    input_sidecars: Optional[List[UploadId]] = Field(None, max_length=MAX_SIDECARS,
                                                     description="with input_upload: uploads of the files GDAL reads "
                                                                 "beside the input (.aux.xml, .tfw, ...), under their "
                                                                 "own names")
    coarse_sidecars: Optional[List[UploadId]] = Field(None, max_length=MAX_SIDECARS,
                                                      description="with coarse_upload: the same for the coarse map")
    write_confidence: bool = Field(False, description="with input_upload, refine: also write confidence.tif")
    model: Optional[str] = Field(None, min_length=1, max_length=MAX_PATH_CHARS,
                                 description="bundled model name (see /models) or absolute .safetensors path")
    steps: Optional[int] = Field(None, ge=MIN_STEPS, le=MAX_STEPS)
    device: str = Field("auto", description="one of " + ", ".join(DEVICES))
    precision: Optional[str] = Field(None, description="of the networks: one of " + ", ".join(PRECISIONS)
                                                       + "; null: auto")
    bands: Optional[List[Annotated[int, Field(ge=1, le=65535)]]] = Field(None, min_length=1, max_length=64)
    extent: Optional[List[Coordinate]] = Field(None, min_length=4, max_length=4,
                                               description="xmin, ymin, xmax, ymax in extent_crs")
    extent_crs: Optional[str] = Field(None, min_length=1, max_length=MAX_PATH_CHARS)
    tile: Optional[int] = Field(None, ge=MIN_TILE, le=MAX_TILE)
    overlap: Optional[int] = Field(None, ge=0, le=MAX_TILE // 2)
    band: Optional[int] = Field(None, ge=-1, le=MAX_RULE_PX,
                                description="refine: the refiner may change a pixel only within this many px of a "
                                            "coarse class boundary; 0 keeps the coarse map, -1 switches the rule "
                                            "off; null: the model card's default")
    vocabulary: Optional[int] = Field(None, ge=-1, le=MAX_RULE_PX,
                                      description="refine: a pixel may only take a class the coarse map has within "
                                                  "this many px; -1 switches the rule off; null: the card's default")
    min_confidence: Optional[float] = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                            description="refine: a pixel takes the refiner's class only where the "
                                                        "refiner prefers it over the coarse class with at least "
                                                        "this probability, else it keeps the coarse class; 0.5 or "
                                                        "less lets every preferred change through; null: the "
                                                        "card's default")
    confidence: Optional[PathText] = Field(None, description="refine: absolute path of a float32 GeoTIFF (.tif) "
                                                             "to write the refiner's probability of each written "
                                                             "class to (-1 where the output is nodata)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    pixel_size: Optional[float] = Field(None, gt=0.0, allow_inf_nan=False,
                                        description="the input's pixel size in metres, overriding its georeference; "
                                                    "null: from its CRS (idgbr.resolution)")

    @field_validator("input", "output", "coarse", "confidence")
    @classmethod
    def _paths(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _check_path_text(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in DEVICES:
            raise ValueError("must be one of " + ", ".join(DEVICES))
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in PRECISIONS:
            raise ValueError("must be one of " + ", ".join(PRECISIONS))
        return value

    @field_validator("model", "extent_crs")
    @classmethod
    def _text(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("\x00" in value or not value.isprintable()):
            raise ValueError("must be printable text")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobRequest:
        if self.input_upload is None:
            if self.input is None or self.output is None:
                raise ValueError("give input and output (paths on the service's machine), or input_upload (an id "
                                 "from POST /uploads)")
            if self.coarse_upload is not None or self.write_confidence or self.input_sidecars:
                raise ValueError("coarse_upload, input_sidecars and write_confidence go with input_upload: upload "
                                 "the input too, or give coarse and confidence as paths")
        else:
            paths = [name for name in ("input", "output", "coarse", "confidence") if getattr(self, name) is not None]
            if paths:
                raise ValueError(f"{' and '.join(paths)} cannot be given with input_upload: a job on uploads writes "
                                 "into its own folder; use coarse_upload and write_confidence")
        if self.coarse_sidecars and self.coarse_upload is None:
            raise ValueError("coarse_sidecars go with coarse_upload: upload the coarse map too, or leave them out")
        if self.coarse_upload is not None and self.mode != "refine":
            raise ValueError("coarse_upload is only used in refine mode: set mode to 'refine' or leave it out")
        if self.write_confidence and self.mode != "refine":
            raise ValueError("write_confidence is only for refine mode: set mode to 'refine' or leave it out")
        if self.extent is not None:
            xmin, ymin, xmax, ymax = self.extent
            if not (xmin < xmax and ymin < ymax):
                raise ValueError("extent must be [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax")
        if self.extent_crs is not None and self.extent is None:
            raise ValueError("extent_crs only applies to an extent: give extent too, or leave extent_crs out")
        if self.coarse is not None and self.mode != "refine":
            raise ValueError("coarse is only used in refine mode: set mode to 'refine' or leave coarse out")
        if self.confidence is not None and self.mode != "refine":
            raise ValueError("confidence is only written in refine mode: set mode to 'refine' or leave confidence "
                             "out")
        if self.tile is not None and self.overlap is not None and self.overlap * 2 > self.tile:
            raise ValueError("overlap must be at most half of tile")
        return self


class JobCreated(BaseModel):
    id: str
    state: str


# Codes of refusals: idgbr.service.codes.
_HTTP_CODES = {401: UNAUTHORIZED, 404: NOT_FOUND, 413: TOO_LARGE}


def error_body(message: str, code: str, parameter: Optional[str] = None) -> Dict[str, Any]:
    """Every error the service returns: ``message`` for people (also as ``detail``, FastAPI's key), ``code``
    for programs, and ``parameter``, the job field at fault when there is one."""
    return {"detail": message, "message": message, "code": code, "parameter": parameter}


def _error(status: int, message: str, code: str, parameter: Optional[str] = None) -> JSONResponse:
    return AsciiJSONResponse(error_body(message, code, parameter), status_code=status)


class JobRefused(Exception):
    """A job request that cannot run (a missing file, an unknown model): answered 400 naming the field."""

    def __init__(self, message: str, parameter: Optional[str]) -> None:
        super().__init__(message)
        self.parameter = parameter


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: echoed paths may hold unpaired surrogates that UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------------------------------------------
# Authentication (outermost, so it also covers /openapi.json and unknown paths)
# --------------------------------------------------------------------------------------------------------------
class BearerAuth:
    """Pure ASGI middleware: every HTTP request needs `Authorization: Bearer <token>`, else 401."""

    def __init__(self, app: ASGIApp, token: str, on_authorized: Optional[Callable[[], None]] = None) -> None:
        self.app = app
        self.token = token
        self.on_authorized = on_authorized  # records activity for the idle timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if len(values) == 1 and bearer_matches(values[0], self.token):
            if self.on_authorized is not None:
                self.on_authorized()
            await self.app(scope, receive, send)
            return
        response = AsciiJSONResponse(
            error_body("missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                       "from the service's token file", UNAUTHORIZED),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


# --------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------
def _pipeline_runner(cache: BundleCache) -> Runner:
    def run(fields: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> Any:
        # Imported on first use: the pipeline pulls in torch and rasterio, which start-up must not wait for.
        from idgbr import model_bundle, pipeline

        if getattr(pipeline, "load_bundle", None) is model_bundle.load_bundle:
            # pipeline.run loads its bundle on every call; keep bundles warm between jobs instead.
            pipeline.load_bundle = cache.load
        return pipeline.run(pipeline.RunOptions(**fields), progress, cancel)

    return run


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def create_app(token: str, *, runner: Optional[Runner] = None,
               request_exit: Optional[Callable[[], None]] = None, scratch_dir: Optional[Path] = None,
               max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB), tls: bool = False) -> FastAPI:
    """The service's ASGI app. RUNNER defaults to idgbr.pipeline.run; REQUEST_EXIT stops the server.

    Uploads and the files of jobs on uploads go under SCRATCH_DIR (default: the state folder's "scratch"),
    in a folder of this run made on the first upload and removed when the app stops. TLS: whether the server
    speaks HTTPS (reported by /health)."""
    catalog = ModelCatalog()
    cache = BundleCache()
    started_at = time.time()

    def job_known(job_id: str) -> bool:
        try:
            jobs.get(job_id)
        except JobNotFound:
            return False
        return True

    files = FileStore(scratch_dir if scratch_dir is not None else default_state_dir() / "scratch", max_upload_bytes,
                      job_known)
    jobs = JobQueue(files.wrap(runner or _pipeline_runner(cache)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        try:
            yield
        finally:
            # Cancelled jobs remove their temporary files; give the running one time to do so.
            timeout = app.state.stop_timeout
            if not jobs.stop(timeout=timeout):
                print(f"idgbr serve: the running job did not stop within {timeout:g} s; removing its temporary "
                      "files and exiting anyway", file=sys.stderr)
            raster_io = sys.modules.get("idgbr.raster.io")  # absent: no job ever wrote anything
            if raster_io is not None:
                raster_io.remove_live_temps()
            files.close()

    app = FastAPI(
        title="IDGBR backend service",
        version=idgbr.__version__,
        description="Local service that segments rasters and refines class boundaries. Every request needs "
                    "`Authorization: Bearer <token>`.",
        docs_url=None,  # the interactive pages load scripts from a CDN; the JSON description is enough
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.jobs = jobs
    app.state.files = files
    app.state.last_activity = time.monotonic()
    app.state.stop_timeout = STOP_TIMEOUT_S

    def touch() -> None:
        app.state.last_activity = time.monotonic()

    app.add_middleware(BearerAuth, token=token, on_authorized=touch)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Echo location and message, not the input: it may be large or unencodable.
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors[:10])
        # The field at fault: the first error's location in the body (["body", "steps"] -> "steps").
        fields = [e["loc"][1] for e in errors if len(e["loc"]) > 1 and e["loc"][0] == "body"]
        body = error_body(f"invalid request: {summary}", BAD_PARAMETER if fields else INVALID_REQUEST,
                          fields[0] if fields else None)
        return AsciiJSONResponse({**body, "detail": errors}, status_code=422)

    @app.exception_handler(JobRefused)
    async def _refused(_request: Request, exc: JobRefused) -> JSONResponse:
        return _error(400, str(exc), BAD_PARAMETER if exc.parameter else INVALID_REQUEST, exc.parameter)

    @app.exception_handler(UploadRefused)
    async def _upload_refused(_request: Request, exc: UploadRefused) -> JSONResponse:
        return _error(exc.status, str(exc), exc.code, exc.parameter)

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _exc: RecursionError) -> JSONResponse:
        return _error(400, "request body is nested too deeply: send a flat JSON object", INVALID_REQUEST)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), _HTTP_CODES.get(exc.status_code, INVALID_REQUEST))
        return AsciiJSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", summary="version, compute device and loaded models")
    def health() -> Dict[str, Any]:
        try:
            device = device_info()
        except ImportError as exc:
            device = {"torch": None, "device": "cpu", "device_name": None,
                      "device_reason": f"torch cannot be imported ({exc}): install PyTorch into this Python"}
        return {
            "service": "idgbr",
            "version": idgbr.__version__,
            "pid": os.getpid(),
            "python": sys.executable,
            "uptime_s": round(time.time() - started_at, 1),
            **device,
            "models_loaded": cache.listing(),
            "jobs": jobs.counts(),
            "tls": tls,
            "max_upload_bytes": files.max_bytes,
        }

    @app.get("/models", summary="cards of the bundled models")
    def models() -> Dict[str, Any]:
        return {"models": catalog.listing()}

    @app.post("/jobs", status_code=201, response_model=JobCreated, summary="queue a job",
              responses={400: {"description": "a path or model that cannot be used"},
                         409: {"description": "another unfinished job writes the same output"},
                         429: {"description": "too many jobs waiting"}})
    def submit(request: JobRequest) -> Any:
        if request.input_upload is not None:
            return _submit_on_uploads(request)
        for field in ("input", "coarse", "output", "confidence"):
            value = getattr(request, field)
            if value is not None and files.contains(Path(value)):
                raise JobRefused(f"{field} {value} is in the service's folder for uploads, where a job can only "
                                 "read its own uploads: give input_upload, or a path outside that folder", field)
        fields = _check_job(request, catalog)
        assert request.output is not None  # checked by JobRequest
        written = [request.output] + ([request.confidence] if request.confidence is not None else [])
        active = jobs.active_outputs()
        for field, path in zip(("output", "confidence"), written):
            if any(_same_file(Path(path), Path(other)) for other in active):
                return _error(409, f"another unfinished job already writes {path}: wait for it, cancel it, or "
                                   "choose another output path", OUTPUT_BUSY, field)
        try:
            job = jobs.submit(fields, request.output, also_writes=written[1:])
        except QueueFull as exc:
            return _error(429, str(exc), QUEUE_FULL)
        return {"id": job.id, "state": job.state.value}

    def _submit_on_uploads(request: JobRequest) -> Any:
        """A job on uploads: they move into the job's own folder, where it also writes its results."""
        assert request.input_upload is not None
        job_id = uuid.uuid4().hex
        claimed = files.claim(job_id, request.input_upload, request.coarse_upload, request.input_sidecars or (),
                              request.coarse_sidecars or ())
        try:
            local = request.model_copy(update={
                "input": str(claimed.input), "output": str(claimed.output), "input_upload": None,
                "coarse": str(claimed.coarse) if claimed.coarse is not None else None, "coarse_upload": None,
                "input_sidecars": None, "coarse_sidecars": None,
                "confidence": str(claimed.confidence) if request.write_confidence else None})
            fields = {**_check_job(local, catalog), REMOTE_JOB_KEY: job_id}
            written = [str(claimed.confidence)] if request.write_confidence else []
            job = jobs.submit(fields, str(claimed.output), also_writes=written, job_id=job_id)
        except QueueFull as exc:
            files.unclaim(job_id)
            return _error(429, str(exc), QUEUE_FULL)
        except BaseException:
            files.unclaim(job_id)  # the uploads stay usable for a corrected job
            raise
        return {"id": job.id, "state": job.state.value}

    @app.get("/jobs", summary="all jobs this service remembers")
    def list_jobs() -> Dict[str, Any]:
        return {"jobs": jobs.list()}

    @app.get("/jobs/{job_id}", summary="state, progress 0-100, message and output of a job",
             responses={404: {"description": "unknown job"}})
    def job_status(job_id: Annotated[str, PathParam(max_length=64)]) -> Any:
        try:
            return jobs.get(job_id)
        except JobNotFound as exc:
            return _error(404, str(exc), NOT_FOUND)

    @app.delete("/jobs/{job_id}", summary="cancel a job (no output is left); a job on uploads: also delete its "
                                          "files, finished or not",
                responses={404: {"description": "unknown job"}, 409: {"description": "job already finished"}})
    def cancel_job(job_id: Annotated[str, PathParam(max_length=64)]) -> Any:
        try:
            before = jobs.get(job_id)
            if files.owns(job_id):
                after = jobs.cancel(job_id)  # nothing to cancel when it has finished
                files.discard(job_id)  # now, or when its run has stopped
                return {**after, "files_deleted": True}
            if before["state"] in (JobState.SUCCEEDED.value, JobState.FAILED.value):
                return _error(409, f"job {job_id} already {before['state']}: there is nothing to cancel",
                              ALREADY_FINISHED)
            return jobs.cancel(job_id)
        except JobNotFound as exc:
            return _error(404, str(exc), NOT_FOUND)

    register_routes(app, files, jobs)

    @app.post("/shutdown", status_code=202, summary="cancel all jobs and stop the service")
    def shutdown() -> Dict[str, Any]:
        if request_exit is None:
            return {"stopping": False, "detail": "this service was not started by `idgbr serve`"}
        request_exit()
        return {"stopping": True}

    return app


def _check_job(request: JobRequest, catalog: ModelCatalog) -> Dict[str, Any]:
    """Checks that need the file system, as RunOptions fields; JobRefused (400) names the problem and field."""

    def existing_file(label: str, text: str) -> Path:
        path = Path(text)
        try:
            if path.is_file():
                return path
            if path.is_dir():
                raise JobRefused(f"{label} {text} is a folder: give the path of a raster file", label)
        except (OSError, ValueError) as exc:
            raise JobRefused(f"{label} path {text!r} cannot be used ({exc}): check the path", label) from exc
        raise JobRefused(f"{label} raster {text} does not exist: check the path", label)

    if request.input is None or request.output is None:  # JobRequest refuses such requests; for the type checker
        raise JobRefused("give input and output (paths on the service's machine), or input_upload", "input")
    source = existing_file("input", request.input)
    coarse = existing_file("coarse", request.coarse) if request.coarse is not None else None
    try:
        model = catalog.resolve(request.model)
        catalog.check(model)  # a broken model card fails the request, not the job later
    except IdgbrError as exc:
        raise JobRefused(str(exc), "model") from exc
    except OSError as exc:
        raise JobRefused(f"model {request.model!r} cannot be used ({exc}): check the name or path", "model") from exc

    output = Path(request.output)
    if output.suffix.lower() not in RASTER_SUFFIXES:
        raise JobRefused(f"output {request.output} must be a GeoTIFF ending in .tif or .tiff: change its name",
                         "output")
    try:
        if output.is_dir():
            raise JobRefused(f"output {request.output} is a folder: give a file name ending in .tif", "output")
        if not output.parent.is_dir():
            raise JobRefused(f"the folder of output {request.output} does not exist: create it first", "output")
    except (OSError, ValueError) as exc:
        raise JobRefused(f"output path {request.output!r} cannot be used ({exc}): check the path", "output") from exc
    for label, other in (("input", source), ("coarse", coarse)):
        if other is not None and _same_file(output, other):
            raise JobRefused(f"output {request.output} is the {label} raster: choose another output path", "output")
    confidence = _check_confidence(request, [("input", source), ("coarse", coarse), ("output", output)])

    return {
        "input": source,
        "output": output,
        "mode": request.mode,
        "coarse": coarse,
        "model": model,
        "steps": request.steps,
        "device": request.device,
        "bands": list(request.bands) if request.bands is not None else None,
        "extent": tuple(request.extent) if request.extent is not None else None,
        "extent_crs": request.extent_crs,
        "tile": request.tile,
        "overlap": request.overlap,
        "band": request.band,
        "vocabulary": request.vocabulary,
        "min_confidence": request.min_confidence,
        "confidence": confidence,
        "seed": request.seed,
        "pixel_size": request.pixel_size,
        "precision": request.precision,
    }


def _check_confidence(request: JobRequest, others: List[Any]) -> Optional[Path]:
    """The confidence output's path, checked like the output's; None when none is wanted."""
    if request.confidence is None:
        return None
    confidence = Path(request.confidence)

    def fail(message: str) -> JobRefused:
        return JobRefused(message, "confidence")

    if confidence.suffix.lower() not in RASTER_SUFFIXES:
        raise fail(f"confidence {request.confidence} must be a GeoTIFF ending in .tif or .tiff: change its name")
    try:
        if confidence.is_dir():
            raise fail(f"confidence {request.confidence} is a folder: give a file name ending in .tif")
        if not confidence.parent.is_dir():
            raise fail(f"the folder of confidence {request.confidence} does not exist: create it first")
    except (OSError, ValueError) as exc:
        raise fail(f"confidence path {request.confidence!r} cannot be used ({exc}): check the path") from exc
    for label, other in others:
        if other is not None and _same_file(confidence, other):
            raise fail(f"confidence {request.confidence} is the {label} raster: choose another path for the "
                       "confidence")
    return confidence


# --------------------------------------------------------------------------------------------------------------
# `idgbr serve`
# --------------------------------------------------------------------------------------------------------------
class ServeError(IdgbrError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_state_dir() -> Path:
    """Where the service and its client keep the token and state: $IDGBR_STATE_DIR or ~/.idgbr."""
    env = os.environ.get("IDGBR_STATE_DIR")
    return Path(env) if env else Path.home() / ".idgbr"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (PORT 0: a free one); ServeError when the port is taken."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port} is out of range: use 0 (any free port) to 65535", EXIT_BAD_ARGS)
    bind_host = "127.0.0.1" if host == "localhost" else host
    try:
        infos = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve --host {host!r} ({exc}): give an IP address", EXIT_BAD_ARGS) from exc
    family, socktype, proto, _name, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        if os.name == "nt":
            # Without it another program could bind the same port on Windows and steal connections.
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", -5), 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # allow restart on a TIME_WAIT port
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, 10048, 10013):
            raise ServeError(
                f"port {port} on {host} is taken by another program: choose another --port, or --port 0 "
                "to let the service pick a free one", EXIT_PORT_TAKEN) from exc
        raise ServeError(f"cannot listen on {host}:{port} ({exc}): check --host and --port", EXIT_BAD_ARGS) from exc
    sock.set_inheritable(False)
    return sock


def _check_dependencies() -> None:
    try:
        device_info()  # imports torch; also makes the first /health fast
    except ImportError as exc:
        raise ServeError(
            f"torch cannot be imported in {sys.executable} ({exc}): install PyTorch into this Python, or set "
            "up the backend with 'Set up backend…' in the IDGBR plugin's settings", EXIT_MISSING_DEPENDENCY) from exc


def check_tls(cert: Optional[Path], key: Optional[Path]) -> None:
    """ServeError naming the file when the certificate or key cannot serve HTTPS; checked before listening, so a
    broken file never shows as a service that refuses every connection."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise ServeError(f"{given} needs {missing} too: give the certificate and its private key (PEM files)",
                         EXIT_BAD_ARGS)
    texts = {}
    for flag, path, marker, what in (("--tls-cert", cert, "-----BEGIN CERTIFICATE-----", "PEM certificate"),
                                     ("--tls-key", key, "PRIVATE KEY-----", "PEM private key")):
        try:
            texts[flag] = path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            raise ServeError(f"{flag} {path} does not exist: check the path", EXIT_BAD_ARGS) from None
        except OSError as exc:
            raise ServeError(f"cannot read {flag} {path} ({exc.strerror or exc}): check the path and its "
                             "permissions", EXIT_BAD_ARGS) from exc
        if marker not in texts[flag]:
            raise ServeError(f"{flag} {path} holds no {what} ('{marker}' is missing): give a PEM file, e.g. one "
                             "made with 'openssl req -x509' (docs/USER_GUIDE.md, Remote backend)", EXIT_BAD_ARGS)
    if "ENCRYPTED" in texts["--tls-key"]:
        raise ServeError(f"--tls-key {key} is protected by a passphrase, which the service cannot ask for: give an "
                         "unprotected copy readable only by you ('openssl pkey -in KEY -out KEY.plain', then chmod "
                         "600)", EXIT_BAD_ARGS)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(cert))
    except (ssl.SSLError, ValueError) as exc:
        raise ServeError(f"--tls-cert {cert} is not a valid PEM certificate ({exc}): make it again", EXIT_BAD_ARGS) \
            from exc
    try:
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ServeError(f"--tls-key {key} is not the private key of --tls-cert {cert}: give the key the "
                             "certificate was made with", EXIT_BAD_ARGS) from exc
        raise ServeError(f"--tls-key {key} cannot be used with --tls-cert {cert} ({exc}): check that it is the PEM "
                         "private key of that certificate", EXIT_BAD_ARGS) from exc


def serve(host: str = "127.0.0.1", port: int = 0, token_file: Optional[Path] = None,
          allow_remote: bool = False, idle_timeout: float = 0.0, parent_pid: Optional[int] = None, *,
          tls_cert: Optional[Path] = None, tls_key: Optional[Path] = None, insecure_http: bool = False,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, scratch_dir: Optional[Path] = None) -> int:
    """Run the service until /shutdown, a signal, IDLE_TIMEOUT s (0: never) without requests or jobs, or the
    end of process PARENT_PID (then within 5 s, its job cancelled and temporary files removed).

    With TLS_CERT and TLS_KEY it speaks HTTPS. A non-loopback HOST needs ALLOW_REMOTE, and TLS unless
    INSECURE_HTTP. Uploads (at most MAX_UPLOAD_MB each) go under SCRATCH_DIR (default: the state folder's
    "scratch"). Prints the ready line once it listens. Returns 0.
    """
    if idle_timeout < 0 or idle_timeout != idle_timeout:
        raise ServeError(f"--idle-timeout {idle_timeout} must be 0 (never) or a number of seconds", EXIT_BAD_ARGS)
    if not 0 < max_upload_mb < float("inf"):
        raise ServeError(f"--max-upload-mb {max_upload_mb} must be a positive number of megabytes", EXIT_BAD_ARGS)
    parent = None
    if parent_pid is not None:
        if not pid_alive(parent_pid):
            raise ServeError(f"--parent-pid {parent_pid}: no such process is running; give the id of the process "
                             "whose end should stop the service", EXIT_BAD_ARGS)
        parent = ParentWatch(parent_pid)
    import uvicorn

    if not is_loopback(host) and not allow_remote:
        raise ServeError(
            f"refusing to listen on {host}: it is not a loopback address, so other machines could reach the "
            "service; use --host 127.0.0.1, or add --allow-remote if you really want that", EXIT_BAD_ARGS)
    tls = tls_cert is not None or tls_key is not None
    if tls and insecure_http:
        raise ServeError("--insecure-http contradicts --tls-cert and --tls-key: leave --insecure-http out to serve "
                         "HTTPS", EXIT_BAD_ARGS)
    check_tls(tls_cert, tls_key)
    if not is_loopback(host) and not tls:
        if not insecure_http:
            raise ServeError(
                f"refusing to serve plain HTTP on {host}: the token and the rasters would cross the network "
                "unencrypted; give --tls-cert CERT --tls-key KEY (docs/USER_GUIDE.md, Remote backend), or add "
                "--insecure-http if the network is trusted", EXIT_BAD_ARGS)
        print(f"idgbr serve: WARNING: serving plain HTTP on {host} (--insecure-http): anyone on the network can "
              "read the token and the rasters; use --tls-cert and --tls-key", file=sys.stderr, flush=True)
    if token_file is None:
        token_file = default_state_dir() / "token"
        token = load_or_create_token(None)
        write_token_file(token_file, token)
    else:
        token = load_or_create_token(token_file)
    sock = bind_socket(host, port)  # before the slow torch import, so a taken port fails at once
    try:
        _check_dependencies()
    except BaseException:
        sock.close()
        raise
    actual_port = sock.getsockname()[1]

    holder: Dict[str, Any] = {}

    def request_exit() -> None:
        holder["server"].should_exit = True

    app = create_app(token, request_exit=request_exit, scratch_dir=scratch_dir,
                     max_upload_bytes=int(max_upload_mb * MB), tls=tls)
    scheme = "https" if tls else "http"

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                _announce_ready(actual_port, scheme)
                print(f"idgbr serve: listening on {scheme}://{host}:{actual_port}, token in {token_file}",
                      file=sys.stderr, flush=True)

        async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
            if tls:
                # An idle TLS connection closes only once its client answers the close_notify, which an idle
                # keep-alive client never does: drop those now, or stopping waits for the graceful timeout.
                for connection in list(self.server_state.connections):
                    cycle = getattr(connection, "cycle", None)
                    transport = getattr(connection, "transport", None)
                    if transport is not None and (cycle is None or getattr(cycle, "response_complete", False)):
                        transport.abort()
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            # Called every 0.1 s. A service nobody uses (its QGIS crashed) should not hold memory forever.
            if parent is not None and counter % PARENT_CHECK_TICKS == 0 and not self.should_exit and parent.gone():
                print(f"idgbr serve: the parent process {parent.pid} has ended; cancelling the jobs and stopping",
                      file=sys.stderr, flush=True)
                app.state.stop_timeout = ORPHAN_STOP_TIMEOUT_S
                holder["orphaned"] = True
                self.should_exit = True
            if idle_timeout and counter % 10 == 0 and not self.should_exit:
                counts = app.state.jobs.counts()
                idle = time.monotonic() - app.state.last_activity
                receiving = app.state.files.receiving()
                if counts["queued"] == 0 and counts["running"] == 0 and not receiving and idle >= idle_timeout:
                    print(f"idgbr serve: no requests for {idle:.0f} s and no jobs; stopping", file=sys.stderr,
                          flush=True)
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=15, server_header=False,
                            ssl_certfile=str(tls_cert) if tls_cert is not None else None,
                            ssl_keyfile=str(tls_key) if tls_key is not None else None)
    server = ReadyServer(config)
    holder["server"] = server
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if holder.get("orphaned"):
        # Jobs and temporary files are dealt with; tearing down torch at interpreter exit can take over a
        # second, which the 5 s promise cannot spare.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _announce_ready(port: int, scheme: str = "http") -> None:
    # Plain HTTP keeps the line the plugin's client reads; an HTTPS service says so after the port.
    sys.stdout.write(f"{READY_PREFIX}{port}{' scheme=https' if scheme == 'https' else ''}\n")
    sys.stdout.flush()
    # The launcher may stop reading stdout after this line: send anything printed later (by any library) to
    # stderr, so a full pipe can never block the service.
    try:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptors (io.UnsupportedOperation)
        sys.stdout = sys.stderr


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        return serve(args.host, args.port, args.token_file, args.allow_remote, args.idle_timeout, args.parent_pid,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, insecure_http=args.insecure_http,
                     max_upload_mb=args.max_upload_mb, scratch_dir=args.scratch_dir)
    except ServeError as exc:
        print(f"IDGBR ERROR: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except IdgbrError as exc:
        print(f"IDGBR ERROR: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_ARGS


def register_cli(subparsers: Any) -> None:
    """Add `idgbr serve` to the command line."""
    parser = subparsers.add_parser(
        "serve",
        help="run the local backend service the QGIS plugin talks to",
        description="Run the local HTTP service. Prints 'IDGBR READY port=<port>' on stdout once it listens. "
                    "Every request needs 'Authorization: Bearer <token>' with the token from --token-file.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file holding the bearer token; created with a random token (mode 0600) if missing "
                             "(default: a new token written to $IDGBR_STATE_DIR/token or ~/.idgbr/token)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host (anyone who can reach it and has the token can use it); "
                             "needs --tls-cert and --tls-key, or --insecure-http")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="CERT",
                        help="serve HTTPS with this certificate (PEM; a self-signed one is fine: clients pass it "
                             "with --ca-cert)")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="KEY",
                        help="the private key of --tls-cert (PEM, without a passphrase)")
    parser.add_argument("--insecure-http", action="store_true",
                        help="allow plain HTTP on a non-loopback --host: the token and rasters cross the network "
                             "unencrypted (only on a network you trust)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                        help=f"largest raster a client may upload, in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--scratch-dir", type=Path, default=None, metavar="DIR",
                        help="where uploads and the results of jobs on uploads are kept while the service runs "
                             "(default: $IDGBR_STATE_DIR/scratch or ~/.idgbr/scratch)")
    parser.add_argument("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="stop after this many seconds without requests or jobs (default 0: never)")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                        help="stop within 5 s after process PID ends, cancelling the running job and removing its "
                             "temporary files (the QGIS plugin passes its own process id)")
    parser.set_defaults(func=_cmd_serve)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="idgbr")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    # Development entry point; users run `idgbr serve` or `python -m idgbr serve`.
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else ["serve"]))
