"""Run a job on a remote ``idgbr serve`` (`idgbr refine ... --backend https://HOST:PORT`): upload INPUT (and the
coarse map) with the files GDAL reads beside them, submit the job with the options of a local run, follow its
progress, download the results with their checksums and put them in place together, as a local run does.

Standard library only (http.client and ssl). The service's side is idgbr.service.uploads.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import time
import types
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import Cancelled, IdgbrError
from .net import is_loopback

log = logging.getLogger("idgbr")

Progress = Callable[[float, str], None]
MB = 1024 * 1024
CHUNK = MB
TIMEOUT_S = 60.0  # connecting, and each read or write on the connection
CLEANUP_TIMEOUT_S = 10.0  # removing the job's files on the way out (also after Ctrl-C)
POLL_INTERVAL_S = 0.5
LOST_CONTACT_S = 120.0  # a backend that does not answer this long while a job runs is given up
CHECKSUM_HEADER = "X-Content-SHA256"
OUTPUT_NAME = "output.tif"  # the service's names of a job's results (idgbr.service.uploads)
CONFIDENCE_NAME = "confidence.tif"
PLACEHOLDER_ID = "0" * 32
# Fields of a local run sent as they are; input, coarse, output and confidence travel as uploads and downloads.
JOB_FIELDS = ("mode", "model", "steps", "device", "precision", "bands", "extent", "extent_crs", "tile", "overlap",
              "band", "vocabulary", "min_confidence", "seed", "pixel_size")
# The service's job fields that name an uploaded file, as the run option they stand for.
_UPLOAD_FIELDS = {"input_upload": "input", "input_sidecars": "input", "coarse_upload": "coarse",
                  "coarse_sidecars": "coarse"}


class RemoteError(IdgbrError):
    """The backend could not be reached or used; the message names its URL and what to do."""


class TransportError(RemoteError):
    """No answer at all (refused, unreachable, broken connection, TLS): polling may try again."""


def _mb(size: float) -> str:
    return f"{size / MB:.1f}"


def read_token(path: Path) -> str:
    """The service's token from a copy of its token file."""
    hint = ("copy the service's token file (the file its --token-file names; ~/.idgbr/token on the service's "
            "machine by default) to this machine and pass it with --token-file")
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise RemoteError(f"token file {path} does not exist: {hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RemoteError(f"cannot read token file {path} ({exc}): {hint}") from exc
    if not token or not token.isascii() or any(c.isspace() for c in token):
        raise RemoteError(f"token file {path} does not hold a token (one line, no spaces): {hint}")
    return token


def upload_names(files: List[Path]) -> List[str]:
    """Names the service accepts for a raster and its sidecars, changed alike (character by character), so GDAL
    still pairs them on the service's side ("my map.tif", "my map.tif.aux.xml" -> "my_map.tif", ...)."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", path.name) for path in files]
    return names if re.match(r"^[A-Za-z0-9]", names[0]) else ["f" + name for name in names]


def _sha256(path: Path, progress: Optional[Progress], label: str) -> Tuple[str, int]:
    digest = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
            if progress is not None and size:
                progress(done / size, f"checksum of {label}: {_mb(done)} of {_mb(size)} MB")
    return digest.hexdigest(), done


class Backend:
    """One `idgbr serve` reached over HTTPS (or plain HTTP) with its bearer token."""

    def __init__(self, url: str, token: str, *, ca_cert: Optional[Path] = None, token_file: Optional[Path] = None,
                 timeout: float = TIMEOUT_S) -> None:
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if parsed.scheme not in ("https", "http") or not parsed.hostname or port == -1 or parsed.query:
            raise RemoteError(f"--backend {url!r} is not a backend URL: give one such as https://gpu-server:8443")
        self.url = url.rstrip("/")
        self.host = parsed.hostname
        self.port = port or (443 if parsed.scheme == "https" else 80)
        self.prefix = parsed.path.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.timeout = timeout
        self.context: Optional[ssl.SSLContext] = None
        if parsed.scheme == "https":
            self.context = self._ssl_context(ca_cert)
        elif not is_loopback(self.host):
            log.warning(f"--backend {self.url} is plain HTTP: the token and the rasters cross the network "
                        "unencrypted; use https:// with a service started with --tls-cert and --tls-key.")

    @staticmethod
    def _ssl_context(ca_cert: Optional[Path]) -> ssl.SSLContext:
        if ca_cert is None:
            return ssl.create_default_context()
        hint = "pass the service's certificate (its --tls-cert file) or the CA certificate that signed it"
        if not Path(ca_cert).is_file():
            raise RemoteError(f"--ca-cert {ca_cert} does not exist or is not a file: {hint}")
        try:
            return ssl.create_default_context(cafile=str(ca_cert))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise RemoteError(f"--ca-cert {ca_cert} is not a PEM certificate ({exc}): {hint}") from exc

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _connect(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout or self.timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **(extra or {})}

    def _transport_error(self, exc: BaseException) -> TransportError:
        """What a failed connection means, and what to do about it."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
            if exc.verify_code in (62, 64) or "mismatch" in reason.lower():  # X509_V_ERR_{HOSTNAME,IP_ADDRESS}_MISMATCH
                return TransportError(
                    f"the certificate of the backend at {self.url} is not valid for {self.host} ({reason}): use the "
                    "host name or address the certificate names in --backend, or make a certificate for "
                    f"{self.host} (see 'Remote backend' in docs/USER_GUIDE.md)")
            return TransportError(
                f"the certificate of the backend at {self.url} is not trusted ({reason}): if the service uses a "
                "self-signed certificate, pass a copy of it (its --tls-cert file) with --ca-cert")
        if isinstance(exc, ssl.SSLError):
            return TransportError(
                f"the TLS connection to the backend at {self.url} failed ({exc.reason or exc}): check that the "
                "service was started with --tls-cert and --tls-key (for a plain HTTP service, use http://), and "
                "that --ca-cert is its certificate")
        if isinstance(exc, socket.gaierror):
            return TransportError(f"cannot reach the backend at {self.url}: the host name {self.host} is unknown "
                                  f"({exc.strerror or exc}); check the host in --backend")
        if isinstance(exc, ConnectionRefusedError):
            return TransportError(f"cannot reach the backend at {self.url}: the connection was refused; check that "
                                  f"'idgbr serve' runs there on port {self.port} and the host and port in --backend")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return TransportError(f"the backend at {self.url} did not answer within {self.timeout:.0f} s: check the "
                                  "host and port in --backend, the network and firewalls")
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, http.client.RemoteDisconnected):
            return TransportError(f"the backend at {self.url} did not answer in HTTP ({exc!r}): check the scheme "
                                  "(https://) and the port in --backend")
        hint = " (if the service uses TLS, use https://)" if self.context is None else ""
        return TransportError(f"the connection to the backend at {self.url} broke ({exc}){hint}: check the network "
                              "and that the service still runs")

    def _refusal(self, status: int, body: bytes, what: str) -> IdgbrError:
        """The service's structured error body (idgbr.service.app.error_body) as an IdgbrError."""
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict):
            data = {}
        message = data.get("message") or (data["detail"] if isinstance(data.get("detail"), str) else None)
        message = message or body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
        if status == 401:
            source = f"from {self.token_file} " if self.token_file is not None else ""
            return RemoteError(
                f"the backend at {self.url} refused the token {source}(401): copy the service's current token file "
                "(the file its --token-file names; a service started without --token-file makes a new token at each "
                "start) and pass it with --token-file")
        parameter = data.get("parameter")
        parameter = _UPLOAD_FIELDS.get(parameter, parameter) if isinstance(parameter, str) else None
        return IdgbrError(f"the backend at {self.url} refused {what}: {message}", parameter)

    def _send(self, method: str, path: str, *, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
              what: str, timeout: Optional[float] = None,
              stream: Optional[Callable[[http.client.HTTPConnection], None]] = None,
              ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; the open connection and its 2xx response (the caller reads and closes them)."""
        conn = self._connect(timeout)
        try:
            try:
                conn.putrequest(method, self.prefix + path, skip_accept_encoding=True)
                for key, value in self._headers(headers).items():
                    conn.putheader(key, value)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                if stream is not None:
                    # A service that refuses the body answers early and closes: its answer is read below.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLEOFError,
                                             ssl.SSLZeroReturnError):
                        stream(conn)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise self._transport_error(exc) from exc
            if response.status >= 300:
                try:
                    data = response.read(64 * 1024)
                except (OSError, http.client.HTTPException):
                    data = b""
                raise self._refusal(response.status, data, what)
            return conn, response
        except BaseException:
            conn.close()
            raise

    def call(self, method: str, path: str, payload: Optional[Dict[str, Any]] = None, *, what: str,
             timeout: Optional[float] = None) -> Dict[str, Any]:
        """A JSON request and its JSON answer."""
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        conn, response = self._send(method, path, body=body, headers=headers, what=what, timeout=timeout)
        try:
            data = json.loads(response.read().decode("utf-8"))
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(exc) from exc
        except ValueError as exc:
            raise RemoteError(f"the backend at {self.url} answered {what} with something that is not JSON: check "
                              "that --backend is an 'idgbr serve'") from exc
        finally:
            conn.close()
        if not isinstance(data, dict):
            raise RemoteError(f"the backend at {self.url} answered {what} unexpectedly: update it to this version")
        return data

    # -- uploads and downloads -------------------------------------------------------------------------------
    def upload(self, path: Path, label: str, name: str, progress: Optional[Progress]) -> str:
        """Upload a file (announced with its size and SHA-256, then streamed); its upload id."""
        digest, size = _sha256(path, progress, label)
        created = self.call("POST", "/uploads", {"size": size, "sha256": digest, "name": name},
                            what=f"the upload of {label} ({_mb(size)} MB)")
        upload_id = str(created["id"])

        def stream(conn: http.client.HTTPConnection) -> None:
            sent = 0
            with open(path, "rb") as fh:
                while sent < size:
                    block = fh.read(min(CHUNK, size - sent))
                    if not block:
                        raise RemoteError(f"{label} {path} became shorter while it was uploaded: wait until "
                                          "nothing writes to it, then run again")
                    conn.send(block)
                    sent += len(block)
                    if progress is not None:
                        progress(sent / size, f"uploading {label}: {_mb(sent)} of {_mb(size)} MB")

        try:
            conn, response = self._send(
                "PUT", f"/uploads/{upload_id}", what=f"the upload of {label}", stream=stream,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            with contextlib.closing(conn):
                response.read()
        except BaseException:
            self.forget_upload(upload_id)
            raise
        return upload_id

    def download(self, job_id: str, name: str, info: Dict[str, Any], target: Path,
                 progress: Optional[Progress], label: str) -> None:
        """Stream a result into TARGET (an existing temporary file), checking its size and SHA-256."""
        conn, response = self._send("GET", f"/jobs/{job_id}/files/{name}", what=f"the download of {label}")
        size = int(info.get("size", -1))
        expected = str(info.get("sha256") or response.getheader(CHECKSUM_HEADER) or "").lower()
        digest = hashlib.sha256()
        done = 0
        try:
            with contextlib.closing(conn), open(target, "wb") as fh:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None and size > 0:
                        progress(done / size, f"downloading {label}: {_mb(done)} of {_mb(size)} MB")
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise IdgbrError(f"Could not write {label} beside {target.parent} ({exc.strerror or exc}). Check "
                                 "that the folder is writable and not full; nothing was written.") from exc
            raise self._transport_error(exc) from exc
        if done != size or digest.hexdigest() != expected:
            raise RemoteError(f"the download of {label} from {self.url} arrived damaged ({done} of {size} bytes, "
                              "checksum mismatch): run again")

    def forget_upload(self, upload_id: str) -> None:
        with contextlib.suppress(IdgbrError):
            self.call("DELETE", f"/uploads/{upload_id}", what="removing an upload", timeout=CLEANUP_TIMEOUT_S)

    def forget_job(self, job_id: str) -> None:
        """Cancel the job if it still runs and remove its files from the service."""
        try:
            self.call("DELETE", f"/jobs/{job_id}", what="removing the job's files", timeout=CLEANUP_TIMEOUT_S)
        except IdgbrError as exc:
            log.warning(f"could not remove job {job_id} from the backend ({exc}); the service removes its files "
                        "when it stops.")

    def wait(self, job_id: str, progress: Optional[Progress]) -> Dict[str, Any]:
        """Follow the job until it ends: its status once it succeeded; IdgbrError with its message else."""
        last_answer = time.monotonic()
        while True:
            try:
                status = self.call("GET", f"/jobs/{job_id}", what="a status request")
            except TransportError as exc:
                if time.monotonic() - last_answer > LOST_CONTACT_S:
                    raise RemoteError(f"lost contact with the backend at {self.url} for {LOST_CONTACT_S:.0f} s while "
                                      f"job {job_id} ran ({exc})") from exc
                time.sleep(2.0)
                continue
            last_answer = time.monotonic()
            state = status.get("state")
            if progress is not None:
                progress(float(status.get("progress") or 0.0) / 100.0, str(status.get("message") or state))
            if state == "succeeded":
                return status
            if state in ("failed", "cancelled"):
                error = status.get("error") or {}
                message = error.get("message") or status.get("message")
                if state == "cancelled":
                    raise Cancelled(f"the job was cancelled on the backend at {self.url}: {message}")
                raise IdgbrError(f"the job failed on the backend at {self.url}: {message}", error.get("parameter"))
            time.sleep(POLL_INTERVAL_S)


def _check_job(job: Dict[str, Any]) -> None:
    """The service's own checks of the job's fields, here, so a typo never costs an upload."""
    from pydantic import ValidationError

    from .service.app import JobRequest

    try:
        JobRequest(**job, input_upload=PLACEHOLDER_ID)
    except ValidationError as exc:
        errors = exc.errors()
        where = [str(e["loc"][0]) for e in errors if e.get("loc")]
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'job'}: {e.get('msg')}" for e in errors)
        raise IdgbrError(f"the backend would refuse this job: {text}", where[0] if where else None) from None


def _raster_files(path: Path, what: str, parameter: str) -> List[Path]:
    """PATH and the files GDAL reads beside it (.aux.xml, .tfw, .ovr ...), which travel with it."""
    from .errors import blame
    from .raster.io import gdal_env, open_raster

    with blame(parameter), gdal_env(), open_raster(path, what) as src:
        files = [Path(f) for f in (src.files or [str(path)])]
    main = Path(path).resolve()
    return [Path(path)] + [f for f in files if f.resolve() != main and f.is_file()]


def run(fields: Dict[str, Any], *, url: str, token_file: Path, ca_cert: Optional[Path] = None,
        progress: Optional[Progress] = None) -> types.SimpleNamespace:
    """Run the job FIELDS (idgbr.pipeline.RunOptions fields) on the backend at URL; the result as the attributes
    of a local run's RunResult, with the local output paths. On any failure or interrupt nothing is written and
    the job's files on the service are removed."""
    from .errors import blame
    from .raster.io import FILE_MODE, check_output, remove_stale_temps, swap_in, temp_path

    source, output = Path(fields["input"]), Path(fields["output"])
    coarse = Path(fields["coarse"]) if fields.get("coarse") is not None else None
    confidence = Path(fields["confidence"]) if fields.get("confidence") is not None else None
    mode = fields.get("mode", "refine")
    job: Dict[str, Any] = {key: fields[key] for key in JOB_FIELDS if fields.get(key) is not None}
    job["model"] = str(job["model"]) if "model" in job else None
    if "extent" in job:
        job["extent"] = [float(v) for v in job["extent"]]
    if confidence is not None:
        job["write_confidence"] = True
    if mode == "segment" and confidence is not None:  # the local run's words
        raise IdgbrError("The confidence output is the refiner's: segment mode has none. Drop --confidence or run "
                         "'idgbr refine'.", "confidence")
    if mode == "segment" and coarse is not None:
        raise IdgbrError("A coarse map is only used by refine; drop --coarse or run 'idgbr refine'.", "coarse")
    _check_job(job)

    # What a local run checks first: the rasters open, the outputs can be written.
    sources = _raster_files(source, "INPUT", "input")
    coarse_files = _raster_files(coarse, "The coarse map", "coarse") if coarse is not None else []
    others = [(name, path) for name, path in (("INPUT", source), ("the coarse map", coarse)) if path is not None]
    with blame("output"):
        check_output(output, others)
    if confidence is not None:
        with blame("confidence"):
            check_output(confidence, others, what="the confidence output (--confidence)")

    backend = Backend(url, read_token(token_file), ca_cert=ca_cert, token_file=token_file)
    health = backend.call("GET", "/health", what="a health check")
    limit = health.get("max_upload_bytes")
    for path in sources + coarse_files:
        size = path.stat().st_size
        if isinstance(limit, int) and size > limit:
            raise IdgbrError(f"{path} is {_mb(size)} MB, over the upload limit of the backend at {backend.url} "
                             f"({_mb(limit)} MB, its --max-upload-mb): process a smaller file or extent (e.g. cut it "
                             "with gdal_translate -projwin), or have the service started with a larger "
                             "--max-upload-mb", "coarse" if path in coarse_files else "input")

    uploads: List[str] = []
    job_id: Optional[str] = None
    temps: List[Path] = []
    try:
        def send(files: List[Path], label: str) -> List[str]:
            ids = []
            for index, (path, name) in enumerate(zip(files, upload_names(files))):
                ids.append(backend.upload(path, f"{label} ({path.name})" if index else label, name, progress))
                uploads.append(ids[-1])
            return ids

        input_ids = send(sources, "INPUT")
        job.update(input_upload=input_ids[0], input_sidecars=input_ids[1:] or None)
        if coarse is not None:
            coarse_ids = send(coarse_files, "the coarse map")
            job.update(coarse_upload=coarse_ids[0], coarse_sidecars=coarse_ids[1:] or None)
        created = backend.call("POST", "/jobs", {k: v for k, v in job.items() if v is not None}, what="the job")
        job_id = str(created["id"])
        uploads.clear()  # the job's now: removed with it
        status = backend.wait(job_id, progress)
        result = status.get("result") or {}
        files = result.get("files") or {}

        # Into temporary files beside the outputs, then all swapped in together (raster.io.swap_in).
        for folder in dict.fromkeys(p.parent for p in (output, confidence) if p is not None):
            remove_stale_temps(folder)
        replacements: List[Tuple[Path, Optional[Path]]] = []
        for target, remote_name, label in ((output, OUTPUT_NAME, "OUTPUT"),
                                           (confidence, CONFIDENCE_NAME, "the confidence output")):
            if target is None:
                continue
            if remote_name not in files:
                raise RemoteError(f"the backend at {backend.url} did not list {label} among the job's files: update "
                                  "it to this version")
            for suffix in ("", ".aux.xml"):
                info = files.get(remote_name + suffix)
                if info is None:
                    replacements.append((Path(str(target) + suffix), None))  # a stale sidecar would mislabel it
                    continue
                temp = temp_path(target, ".tmp.tif" + (".cat.xml" if suffix else ""))
                temps.append(temp)
                backend.download(job_id, remote_name + suffix, info, temp, progress, label)
                os.chmod(temp, FILE_MODE)
                replacements.append((Path(str(target) + suffix), temp))
        try:
            swap_in(replacements)
        except OSError as exc:
            names = " and ".join(str(p) for p in (output, confidence) if p is not None)
            raise IdgbrError(f"Could not move the result into place at {names} ({exc.strerror or exc}); the "
                             "previous files there are unchanged. Check that they are not open in another program "
                             "and that the folder is writable.") from exc
        temps.clear()
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        for upload_id in uploads:
            backend.forget_upload(upload_id)
        if job_id is not None:
            backend.forget_job(job_id)

    for note in result.get("notes") or []:
        log.info(note)
    summary = types.SimpleNamespace(**result)
    summary.output, summary.confidence = output, confidence
    summary.device = f"{result.get('device')} at {backend.url}"
    summary.megapixels = int(result.get("width", 0)) * int(result.get("height", 0)) / 1e6
    tiles = int(result.get("tiles") or 0)
    summary.refined_share = int(result.get("tiles_refined") or 0) / tiles if tiles else 0.0
    return summary
