"""Files of remote jobs: a client uploads the input raster (and the coarse map), submits a job that names the
uploads, follows it and downloads the result, so it never names a path on the service's machine.

Everything lives under the service run's own folder, ``<scratch>/serve-<host>-<pid>`` (made on the first
upload, removed when the service stops, or by the next service on this host once that process is gone)::

    uploads/.<id>.part                  being received; removed when the upload fails or is interrupted
    uploads/<id>/<name>                 received and verified, waiting for a job
    jobs/<job id>/input/<name>          moved here by the job that names the upload: only it can read them
    jobs/<job id>/coarse/<name>         (removed when the job ends)
    jobs/<job id>/output/output.tif     its results (+ output.tif.aux.xml, confidence.tif), until the job is
                                        deleted (DELETE /jobs/{id})
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from idgbr.errors import BAD_PARAMETER, Cancelled
from idgbr.procs import pid_alive
from idgbr.service.codes import (
    ALREADY_FINISHED,
    BUSY,
    CHECKSUM_MISMATCH,
    INCOMPLETE,
    NO_SPACE,
    NOT_FOUND,
    NOT_READY,
    QUEUE_FULL,
    TOO_LARGE,
)
from idgbr.service.jobs import JobNotFound, JobQueue, Runner

MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 2048.0
UPLOAD_TTL_S = 3600.0  # an upload that no job names within an hour is removed
MAX_WAITING_UPLOADS = 64  # uploads not yet named by a job (each holds disk space)
MAX_SIDECARS = 16  # files GDAL reads beside a raster (.aux.xml, .tfw, .prj, .ovr ...), uploaded with it
WRITE_CHUNK = MB  # received bytes are written (and hashed) off the event loop in pieces of this size
READ_CHUNK = MB
# The body limit of the upload route: the size the upload announced is the real limit, checked in the handler
# with a message that says so (Starlette's own limit would answer a bare "Content Too Large").
UPLOAD_BODY_CAP = 1 << 62
CHECKSUM_HEADER = "X-Content-SHA256"
OUTPUT_NAME = "output.tif"
CONFIDENCE_NAME = "confidence.tif"
REMOTE_JOB_KEY = "remote_job"  # in a job's fields: the job runs in its own folder (removed before the runner)
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ROOT_NAME = re.compile(r"^serve-(?P<host>[0-9a-f]{4})-(?P<pid>\d+)$")
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')) & 0xFFFF:04x}"

UploadId = Annotated[str, Field(pattern=UPLOAD_ID_PATTERN, description="an upload's id (POST /uploads)")]
UploadIdParam = Annotated[str, PathParam(pattern=UPLOAD_ID_PATTERN)]


def megabytes(size: float) -> str:
    return f"{size / MB:.3g}" if size < 10 * MB else f"{size / MB:.0f}"


class UploadRefused(Exception):
    """A refused upload or download request; the service answers STATUS with error_body(message, code, ...)."""

    def __init__(self, status: int, message: str, code: str, parameter: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.parameter = parameter


class UploadRequest(BaseModel):
    """Announces an upload: its data follows with PUT /uploads/{id}."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1, le=2**53, description="bytes of the file")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of the file (hex); checked at the end")
    name: str = Field("upload.tif", min_length=1, max_length=128,
                      description="the file's name without folders; the job reads the file under this name")

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(FILE_NAME_PATTERN, value):
            raise ValueError("must be a plain file name (letters, digits, '.', '_', '-'; no folders, not starting "
                             "with '.')")
        return value


@dataclasses.dataclass
class Upload:
    id: str
    name: str
    size: int
    sha256: str
    created: float = dataclasses.field(default_factory=time.monotonic)
    state: str = "empty"  # empty -> receiving -> complete
    job: Optional[str] = None  # the job that named it; only that job can read it

    def view(self, max_bytes: int) -> Dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "sha256": self.sha256, "state": self.state,
                "job": self.job, "max_bytes": max_bytes}


@dataclasses.dataclass
class JobFolder:
    folder: Path
    uploads: List[Tuple[str, str]]  # (sub folder, upload id) of the files it claimed
    running: bool = False
    discarded: bool = False  # deleted while running: removed when the run ends
    files: Optional[Dict[str, Dict[str, Any]]] = None  # name -> {size, sha256}, once the job succeeded


@dataclasses.dataclass
class ClaimedFiles:
    input: Path
    coarse: Optional[Path]
    output: Path
    confidence: Path


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(READ_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _storage_error(exc: OSError, what: str) -> UploadRefused:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploadRefused(507, f"the service's disk is full while {what}; nothing was kept: free space on the "
                                  "service's machine or start it with --scratch-dir on a larger disk", NO_SPACE)
    return UploadRefused(507, f"the service cannot store files while {what} ({exc.strerror or exc}); nothing was "
                              "kept: check the folder of --scratch-dir on the service's machine", NO_SPACE)


class FileStore:
    """Uploads and the folders of remote jobs, for one service run. Thread-safe: routes run in threads and on
    the event loop, jobs in the worker thread."""

    def __init__(self, scratch: Path, max_bytes: int, job_known: Callable[[str], bool] = lambda _job: True) -> None:
        self.scratch = Path(scratch)
        self.max_bytes = int(max_bytes)
        self.job_known = job_known  # False once the queue forgot a job: its folder can go
        self._lock = threading.Lock()
        self._root: Optional[Path] = None
        self._uploads: Dict[str, Upload] = {}
        self._jobs: Dict[str, JobFolder] = {}

    # -- folders -----------------------------------------------------------------------------------------------
    def root(self) -> Path:
        """This service run's folder, made on first use (after removing what dead services on this host left)."""
        with self._lock:
            if self._root is None:
                root = self.scratch / f"serve-{HOST_TAG}-{os.getpid()}"
                try:
                    self.scratch.mkdir(parents=True, exist_ok=True)
                    self._remove_dead_roots()
                    for sub in ("uploads", "jobs"):
                        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
                    if os.name != "nt":
                        os.chmod(root, 0o700)  # uploaded rasters are the users' data
                except OSError as exc:
                    raise _storage_error(exc, f"creating its folder for uploads {root}") from exc
                self._root = root
            return self._root

    def _remove_dead_roots(self) -> None:
        try:
            entries = list(os.scandir(self.scratch))
        except OSError:
            return
        for entry in entries:
            match = _ROOT_NAME.match(entry.name)
            if match is None or match["host"] != HOST_TAG:
                continue  # another computer's service, on a shared home folder
            pid = int(match["pid"])
            if pid != os.getpid() and not pid_alive(pid):
                _remove_tree(Path(entry.path))

    def contains(self, path: Path) -> bool:
        """True when PATH lies in the scratch folder, where only remote jobs may read and write their own files."""
        try:
            return Path(path).resolve().is_relative_to(self.scratch.resolve())
        except (OSError, RuntimeError, ValueError):
            return False

    def close(self) -> None:
        """Remove every upload and job folder of this run (the service stops)."""
        with self._lock:
            root, self._root = self._root, None
            self._uploads.clear()
            self._jobs.clear()
        if root is not None:
            _remove_tree(root)

    # -- uploads -----------------------------------------------------------------------------------------------
    def create(self, request: UploadRequest) -> Dict[str, Any]:
        self.prune()
        if request.size > self.max_bytes:
            raise UploadRefused(
                413, f"the file is {megabytes(request.size)} MB, over this service's upload limit of "
                     f"{megabytes(self.max_bytes)} MB: process a smaller file or extent, or start the service with "
                     "a larger --max-upload-mb", TOO_LARGE, "size")
        root = self.root()
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = None
        if free is not None and free < request.size:
            raise UploadRefused(
                507, f"the service's disk has {megabytes(free)} MB free, not enough for this "
                     f"{megabytes(request.size)} MB upload: free space on the service's machine or start it with "
                     "--scratch-dir on a larger disk", NO_SPACE, "size")
        with self._lock:
            waiting = sum(1 for upload in self._uploads.values() if upload.job is None)
            if waiting >= MAX_WAITING_UPLOADS:
                raise UploadRefused(429, f"{waiting} uploads are waiting for a job: submit jobs for them or delete "
                                         "them (DELETE /uploads/{id})", QUEUE_FULL)
            upload = Upload(id=uuid.uuid4().hex, name=request.name, size=request.size, sha256=request.sha256)
            self._uploads[upload.id] = upload
            return upload.view(self.max_bytes)

    def _find(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise UploadRefused(404, f"no upload {upload_id} in this service (it expired after "
                                     f"{UPLOAD_TTL_S / 60:.0f} minutes unused, was deleted, or the service "
                                     "restarted): upload the file again", NOT_FOUND)
        return upload

    async def receive(self, upload_id: str, request: Request) -> Dict[str, Any]:
        """Stream the request body into the upload, checking its size and SHA-256; all or nothing."""
        with self._lock:
            upload = self._find(upload_id)
            if upload.state == "receiving":
                raise UploadRefused(409, f"upload {upload_id} is being received by another request: wait for it "
                                         "or create a new upload", BUSY)
            if upload.state == "complete":
                raise UploadRefused(409, f"upload {upload_id} is complete already: use it in a job, or create a "
                                         "new upload for other data", ALREADY_FINISHED)
            upload.state = "receiving"
        folder: Optional[Path] = None
        try:
            self._check_length(upload, request.headers.get("content-length"))
            folder = self.root() / "uploads"
            part = folder / f".{upload.id}.part"
            try:
                await self._receive_into(upload, request, part)
                (folder / upload.id).mkdir(mode=0o700)
                os.replace(part, folder / upload.id / upload.name)
            except OSError as exc:
                raise _storage_error(exc, f"receiving upload {upload.id}") from exc
            finally:
                part.unlink(missing_ok=True)
        except BaseException:
            if folder is not None:
                _remove_tree(folder / upload.id)
            with self._lock:
                upload.state = "empty"  # the client may send the data again
            raise
        with self._lock:
            upload.state = "complete"
            upload.created = time.monotonic()  # the hour to name it in a job starts now
            return upload.view(self.max_bytes)

    @staticmethod
    def _check_length(upload: Upload, header: Optional[str]) -> None:
        if header is None:
            return  # chunked: counted while receiving
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length != upload.size:
            raise UploadRefused(413 if length > upload.size else 400,
                                f"upload {upload.id} was announced as {upload.size} bytes but this request "
                                f"carries {header}: send exactly the file announced",
                                TOO_LARGE if length > upload.size else INCOMPLETE)

    async def _receive_into(self, upload: Upload, request: Request, part: Path) -> None:
        digest = hashlib.sha256()
        received = 0
        with open(part, "xb") as fh:
            def write(data: bytes) -> None:
                fh.write(data)
                digest.update(data)

            pending = bytearray()
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > upload.size:
                        raise UploadRefused(413, f"upload {upload.id} was announced as {upload.size} bytes but more "
                                                 "arrived; nothing was kept: send exactly the file announced",
                                            TOO_LARGE)
                    pending += chunk
                    if len(pending) >= WRITE_CHUNK:
                        await run_in_threadpool(write, bytes(pending))
                        pending.clear()
            except ClientDisconnect:
                raise UploadRefused(400, f"the connection broke after {received} of {upload.size} bytes of upload "
                                         f"{upload.id}; nothing was kept: send the file again", INCOMPLETE) from None
            if pending:
                await run_in_threadpool(write, bytes(pending))
        if received < upload.size:
            raise UploadRefused(400, f"upload {upload.id} ended after {received} of {upload.size} bytes; nothing was "
                                     "kept: send the whole file again", INCOMPLETE)
        actual = digest.hexdigest()
        if actual != upload.sha256:
            raise UploadRefused(400, f"the {upload.size} bytes received for upload {upload.id} have SHA-256 {actual}, "
                                     f"not the {upload.sha256} announced: the file changed while it was sent or was "
                                     "damaged on the way; nothing was kept: send it again", CHECKSUM_MISMATCH,
                                "sha256")

    def receiving(self) -> bool:
        """True while an upload's bytes are arriving (the service is busy even without requests starting)."""
        with self._lock:
            return any(upload.state == "receiving" for upload in self._uploads.values())

    def delete(self, upload_id: str) -> Dict[str, Any]:
        with self._lock:
            upload = self._find(upload_id)
            if upload.state == "receiving":
                raise UploadRefused(409, f"upload {upload_id} is being received: try again when that request ended",
                                    BUSY)
            if upload.job is not None:
                raise UploadRefused(409, f"upload {upload_id} belongs to job {upload.job}: delete the job "
                                         "(DELETE /jobs/{id}) to remove its files", ALREADY_FINISHED)
            del self._uploads[upload_id]
            root = self._root
        if root is not None:
            _remove_tree(root / "uploads" / upload_id)
        return {"id": upload_id, "deleted": True}

    def prune(self) -> None:
        """Remove uploads no job named within UPLOAD_TTL_S, and the folders of jobs the queue has forgotten."""
        now = time.monotonic()
        with self._lock:
            stale = [u.id for u in self._uploads.values()
                     if u.job is None and u.state != "receiving" and now - u.created > UPLOAD_TTL_S]
            for upload_id in stale:
                del self._uploads[upload_id]
            candidates = [job_id for job_id, entry in self._jobs.items() if not entry.running]
            root = self._root
        if root is not None:
            for upload_id in stale:
                _remove_tree(root / "uploads" / upload_id)
        forgotten = [job_id for job_id in candidates if not self.job_known(job_id)]
        for job_id in forgotten:
            self.discard(job_id)

    # -- jobs --------------------------------------------------------------------------------------------------
    def claim(self, job_id: str, input_id: str, coarse_id: Optional[str] = None,
              input_sidecars: Sequence[str] = (), coarse_sidecars: Sequence[str] = ()) -> ClaimedFiles:
        """Move the uploads into the new job's folder (the sidecars, files GDAL reads beside a raster, next to
        their raster): from now on only that job can read them."""
        self.prune()
        root = self.root()
        named = [("input", "input_upload", input_id)] + [("input", "input_sidecars", i) for i in input_sidecars]
        if coarse_id is not None:
            named += [("coarse", "coarse_upload", coarse_id)] + [("coarse", "coarse_sidecars", i)
                                                                  for i in coarse_sidecars]
        with self._lock:
            claimed: List[Tuple[str, Upload]] = []
            seen_ids, seen_names = set(), set()
            for sub, field, upload_id in named:
                upload = self._uploads.get(upload_id)
                if upload_id in seen_ids:
                    raise UploadRefused(400, f"{field}: upload {upload_id} is named twice in this job: upload each "
                                             "file once", BAD_PARAMETER, field)
                if upload is None:
                    raise UploadRefused(400, f"{field}: no upload {upload_id} in this service (it expired, was "
                                             "deleted, or the service restarted): upload the file again",
                                        BAD_PARAMETER, field)
                if upload.job is not None:
                    raise UploadRefused(400, f"{field}: upload {upload_id} belongs to another job; a job can only "
                                             "read its own uploads: upload the file again for this job",
                                        BAD_PARAMETER, field)
                if upload.state != "complete":
                    raise UploadRefused(400, f"{field}: upload {upload_id} is not complete ({upload.state}): send "
                                             f"its data with PUT /uploads/{upload_id} first", BAD_PARAMETER, field)
                if (sub, upload.name) in seen_names:
                    raise UploadRefused(400, f"{field}: two uploads of this job's {sub} are named {upload.name}: "
                                             "each file beside a raster needs its own name", BAD_PARAMETER, field)
                seen_ids.add(upload_id)
                seen_names.add((sub, upload.name))
                claimed.append((sub, upload))
            folder = root / "jobs" / job_id
            moved: List[Tuple[Path, Path]] = []
            try:
                (folder / "output").mkdir(mode=0o700, parents=True)
                for sub, upload in claimed:
                    (folder / sub).mkdir(mode=0o700, exist_ok=True)
                    source, target = root / "uploads" / upload.id / upload.name, folder / sub / upload.name
                    os.replace(source, target)
                    moved.append((target, source))
            except OSError as exc:
                for target, source in moved:
                    with contextlib.suppress(OSError):
                        os.replace(target, source)
                _remove_tree(folder)
                raise _storage_error(exc, "moving the uploads into the job's folder") from exc
            for _sub, upload in claimed:
                upload.job = job_id
                _remove_tree(root / "uploads" / upload.id)
            self._jobs[job_id] = JobFolder(folder, [(sub, upload.id) for sub, upload in claimed])
        mains = {sub: upload for (sub, field, _id), (_sub, upload) in zip(named, claimed) if field.endswith("upload")}
        coarse = folder / "coarse" / mains["coarse"].name if "coarse" in mains else None
        return ClaimedFiles(folder / "input" / mains["input"].name, coarse, folder / "output" / OUTPUT_NAME,
                            folder / "output" / CONFIDENCE_NAME)

    def unclaim(self, job_id: str) -> None:
        """Give the uploads back (the job was refused), so the client can fix the job and submit it again."""
        with self._lock:
            entry = self._jobs.pop(job_id, None)
            if entry is None or self._root is None:
                return
            for sub, upload_id in entry.uploads:
                upload = self._uploads.get(upload_id)
                if upload is None:
                    continue
                target = self._root / "uploads" / upload.id
                try:
                    target.mkdir(mode=0o700, exist_ok=True)
                    os.replace(entry.folder / sub / upload.name, target / upload.name)
                    upload.job = None
                except OSError:
                    del self._uploads[upload_id]  # lost: the client uploads again
        _remove_tree(entry.folder)

    def owns(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._jobs

    def discard(self, job_id: str) -> bool:
        """Remove a job's folder now, or when its run ends if it is running. False: not a job with a folder."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return False
            if entry.running:
                entry.discarded = True
                return True
            self._forget(job_id, entry)
        _remove_tree(entry.folder)
        return True

    def _forget(self, job_id: str, entry: JobFolder) -> None:
        del self._jobs[job_id]
        for _sub, upload_id in entry.uploads:
            self._uploads.pop(upload_id, None)

    def wrap(self, runner: Runner) -> Runner:
        """RUNNER for both kinds of job; a remote job's inputs are removed when it ends, and its results are
        listed with their checksums (``files`` in its result)."""

        def run(fields: Any, progress: Callable[[float, str], None], cancel: threading.Event) -> Any:
            job_id = fields.get(REMOTE_JOB_KEY) if isinstance(fields, dict) else None
            if job_id is None:
                return runner(fields, progress, cancel)
            options = {key: value for key, value in fields.items() if key != REMOTE_JOB_KEY}
            with self._lock:
                entry = self._jobs.get(job_id)
                if entry is None:
                    raise Cancelled("the job was deleted before it started; no output was written")
                entry.running = True
            try:
                result = runner(options, progress, cancel)
                files = {path.name: {"size": path.stat().st_size, "sha256": _sha256_of(path)}
                         for path in sorted((entry.folder / "output").iterdir())
                         if path.is_file() and not path.name.startswith(".")}
                with self._lock:
                    entry.files = files
                data = result.to_dict() if callable(getattr(result, "to_dict", None)) else result
                return {**data, "files": files} if isinstance(data, dict) else data
            finally:
                with self._lock:
                    entry.running = False
                    discarded = entry.discarded
                    if discarded and self._jobs.get(job_id) is entry:
                        self._forget(job_id, entry)
                _remove_tree(entry.folder / "input")
                _remove_tree(entry.folder / "coarse")
                if discarded:
                    _remove_tree(entry.folder)

        return run

    def open_result(self, job_id: str, name: str, status: Dict[str, Any]) -> Tuple[BinaryIO, Dict[str, Any]]:
        """An open file of a finished remote job and its {size, sha256}; UploadRefused says why there is none."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                raise UploadRefused(404, f"job {job_id} has no files to download: it was not submitted with "
                                         "input_upload (its output is where its request said), or its files were "
                                         "deleted", NOT_FOUND)
            if entry.files is None or entry.running:
                state = status.get("state")
                if state in ("failed", "cancelled"):
                    error = status.get("error") or {}
                    raise UploadRefused(409, f"job {job_id} {state}, so it has no output: "
                                             f"{error.get('message') or status.get('message')}", NOT_READY)
                raise UploadRefused(409, f"job {job_id} is {state}: download its files once its state is "
                                         "'succeeded'", NOT_READY)
            info = entry.files.get(name)
            if info is None:
                names = ", ".join(sorted(entry.files)) or "none"
                raise UploadRefused(404, f"job {job_id} has no file {name!r}; its files are: {names}", NOT_FOUND)
            try:
                return open(entry.folder / "output" / name, "rb"), info  # noqa: SIM115 - closed by the response
            except OSError as exc:
                raise UploadRefused(404, f"the file {name} of job {job_id} is gone ({exc.strerror or exc}): run "
                                         "the job again", NOT_FOUND) from exc


def _stream(handle: BinaryIO) -> Iterator[bytes]:
    try:
        yield from iter(lambda: handle.read(READ_CHUNK), b"")
    finally:
        handle.close()


def register_routes(app: FastAPI, store: FileStore, jobs: JobQueue) -> None:
    """POST /uploads, PUT and DELETE /uploads/{upload_id}, GET /jobs/{job_id}/files/{name}."""

    @app.post("/uploads", status_code=201, summary="announce an upload: its size, SHA-256 and file name",
              responses={413: {"description": "over --max-upload-mb"}, 507: {"description": "disk full"}})
    def create_upload(request: UploadRequest) -> Dict[str, Any]:
        return store.create(request)

    @app.put("/uploads/{upload_id}", summary="the upload's bytes, streamed as the raw request body",
             max_body_size=UPLOAD_BODY_CAP,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
             responses={400: {"description": "checksum mismatch or too few bytes"},
                        404: {"description": "unknown upload"}, 413: {"description": "more bytes than announced"}})
    async def receive_upload(upload_id: UploadIdParam, request: Request) -> Dict[str, Any]:
        return await store.receive(upload_id, request)

    @app.delete("/uploads/{upload_id}", summary="remove an upload no job uses",
                responses={404: {"description": "unknown upload"}, 409: {"description": "in use"}})
    def delete_upload(upload_id: UploadIdParam) -> Dict[str, Any]:
        return store.delete(upload_id)

    @app.get("/jobs/{job_id}/files/{name}", summary="download a result of a job submitted with input_upload",
             response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": f"the file; its SHA-256 in the {CHECKSUM_HEADER} header"},
                        404: {"description": "unknown job or file"}, 409: {"description": "job not succeeded"}})
    def download(job_id: Annotated[str, PathParam(max_length=64)],
                 name: Annotated[str, PathParam(pattern=FILE_NAME_PATTERN)]) -> StreamingResponse:
        try:
            status = jobs.get(job_id)
        except JobNotFound as exc:
            raise UploadRefused(404, str(exc), NOT_FOUND) from exc
        handle, info = store.open_result(job_id, name, status)
        media = "image/tiff" if name.endswith((".tif", ".tiff")) else (
            "application/xml" if name.endswith(".xml") else "application/octet-stream")
        return StreamingResponse(_stream(handle), media_type=media, headers={
            "Content-Length": str(info["size"]), CHECKSUM_HEADER: info["sha256"],
            "Content-Disposition": f'attachment; filename="{name}"'})
