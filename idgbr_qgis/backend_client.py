"""Client of the IDGBR backend service (`idgbr serve`): the local one, or a remote one over HTTPS.

Standard library only: it runs inside QGIS's Python, which has neither torch nor the backend. It starts the
service with a configured Python interpreter (or reuses one recorded in the state folder), then submits,
polls, cancels jobs and shuts the service down over HTTP on the loopback address. `RemoteBackendClient`
talks to a service on another computer (its URL, bearer token and, for a self-signed certificate, that
certificate): rasters go up as uploads and results come back as checked downloads.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

READY_PREFIX = "IDGBR READY port="
STATE_FILE = "service.json"
TOKEN_FILE = "service.token"
LOG_FILE = "service.log"
LOCK_FILE = "start.lock"
EXIT_GRACE_S = 1.0  # how long a service whose connection broke may take to be reported as exited
HOST = "127.0.0.1"
SERVE_MODULE = "idgbr"  # spawned as `python -m idgbr serve ...`
DEFAULT_IDLE_TIMEOUT = 2 * 3600.0  # a service left behind (QGIS crashed) frees its memory after two idle hours
# Exit codes of `idgbr serve` (see idgbr.service.app).
EXIT_MISSING_DEPENDENCY = 3
EXIT_PORT_TAKEN = 4
# Variables QGIS sets for its own Python and GDAL; the backend has its own, and these would break it
# (e.g. OSGeo4W's PYTHONHOME, or a PROJ_LIB pointing at an older proj.db than rasterio's).
_FOREIGN_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "GDAL_DATA", "GDAL_DRIVER_PATH",
                "PROJ_LIB", "PROJ_DATA")
_SETUP_HINT = ("set up the backend with 'Set up backend…' in the IDGBR panel or in the plugin's settings "
               "(Plugins ▸ IDGBR ▸ Settings…)")

PathLike = Union[str, "os.PathLike[str]"]


class BackendError(Exception):
    """Something the user must act on; the message says what happened and what to do.

    When the service refused a request or a job failed, ``code`` is its machine-readable kind of error
    (e.g. "bad_parameter"), ``parameter`` the job field at fault (e.g. "coarse", or None) and ``message``
    the service's own words, without the request that carried them.
    """

    def __init__(self, message: str, status: Optional[int] = None, *, code: Optional[str] = None,
                 parameter: Optional[str] = None, detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status when the service answered with an error
        self.code = code
        self.parameter = parameter
        self.message = detail if detail is not None else message


class ServiceGone(BackendError):
    """The service stopped or does not answer any more."""


class JobFailed(BackendError):
    """The job ended with an error; the message is the job's own."""


class JobCancelled(BackendError):
    """The job was cancelled; it left no output."""


class RemoteUnreachable(ServiceGone):
    """A remote service that cannot be reached or trusted (network, TLS certificate); the message says what to
    change."""


def default_state_dir() -> Path:
    """Where the service's state, token and log live: $IDGBR_STATE_DIR, else ~/.idgbr."""
    env = os.environ.get("IDGBR_STATE_DIR")
    return Path(env) if env else Path.home() / ".idgbr"


class BackendClient:
    """One running service. Build it with `start_or_connect`; every method may raise BackendError."""

    remote = False  # jobs name paths on this computer (RemoteBackendClient: uploads and downloads)
    lost_contact_s = 3.0  # a job's service silent this long is given up (a local one has died)
    min_poll_s = 0.0

    def __init__(self, port: int, token: str, *, process: Optional[subprocess.Popen] = None,
                 log_path: Optional[Path] = None, log_offset: int = 0, state_dir: Optional[Path] = None,
                 python: Optional[str] = None, request_timeout: float = 15.0) -> None:
        self.port = int(port)
        self.base_url = f"http://{HOST}:{self.port}"
        self.process = process  # set when this client started the service
        self.log_path = log_path
        self.python = python
        self.state_dir = state_dir
        self.request_timeout = request_timeout
        self.recorded_pid: Optional[int] = None  # pid from the state file when connected, not started
        self._token = token
        self._log_offset = log_offset
        # No proxies: a system proxy would otherwise receive requests meant for 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"BackendClient({self.base_url}, pid={self.pid})"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else self.recorded_pid

    # ----------------------------------------------------------------------------------------------------------
    # Start or connect
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def start_or_connect(cls, python: PathLike, state_dir: Optional[PathLike] = None, timeout: float = 60.0, *,
                         port: int = 0, env: Optional[Mapping[str, str]] = None,
                         idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                         parent_pid: Optional[int] = None) -> BackendClient:
        """Reuse the service recorded in STATE_DIR if it answers, else start `PYTHON -m idgbr serve`.

        PORT 0 lets the service pick a free port. ENV adds variables for a newly started service, which stops
        by itself after IDLE_TIMEOUT s without requests or jobs (0: never), and within seconds after process
        PARENT_PID ends (e.g. QGIS crashed or was killed), cancelling its job.
        """
        state = Path(state_dir) if state_dir is not None else default_state_dir()
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the IDGBR state folder {state} ({exc}): set IDGBR_STATE_DIR to a "
                               "writable folder") from exc
        interpreter = _check_interpreter(python)
        with _StartLock(state / LOCK_FILE, timeout + 30.0):
            existing = cls._from_state(state)
            if existing is not None:
                if _same_path(existing.python, interpreter):
                    return existing
                # The user picked another interpreter: replace the old service rather than keep using it.
                with contextlib.suppress(BackendError):
                    existing.shutdown()
            return cls._spawn(interpreter, state, timeout, port, env, idle_timeout, parent_pid)

    @classmethod
    def _from_state(cls, state: Path) -> Optional[BackendClient]:
        """A client for the recorded service if it is alive and accepts our token, else None."""
        try:
            record = json.loads((state / STATE_FILE).read_text(encoding="utf-8"))
            token = Path(record["token_file"]).read_text(encoding="utf-8").strip()
            client = cls(int(record["port"]), token, log_path=Path(record["log"]) if record.get("log") else None,
                         log_offset=int(record.get("log_offset", 0)), state_dir=state, python=record.get("python"),
                         request_timeout=5.0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            health = client.health()
        except BackendError:
            return None  # dead, or another program now holds the port, or the token changed
        if health.get("service") != "idgbr":
            return None
        client.request_timeout = 15.0
        client.recorded_pid = record.get("pid") if isinstance(record.get("pid"), int) else None
        return client

    @classmethod
    def _spawn(cls, python: str, state: Path, timeout: float, port: int,
               extra_env: Optional[Mapping[str, str]], idle_timeout: float,
               parent_pid: Optional[int] = None) -> BackendClient:
        token_file = state / TOKEN_FILE
        log_path = state / LOG_FILE
        _rotate(log_path)
        try:
            log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it after we return
        except OSError as exc:
            raise BackendError(f"cannot write the service log {log_path} ({exc}): set IDGBR_STATE_DIR to a "
                               "writable folder") from exc
        log_offset = log.tell()
        command = [python, "-m", SERVE_MODULE, "serve", "--host", HOST, "--port", str(int(port)),
                   "--token-file", str(token_file), "--idle-timeout", str(float(idle_timeout))]
        if parent_pid is not None:
            command += ["--parent-pid", str(int(parent_pid))]
        env = {k: v for k, v in os.environ.items() if k.upper() not in _FOREIGN_ENV}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "IDGBR_STATE_DIR": str(state)})
        env.update(extra_env or {})
        options: Dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
        else:
            # Own session: a Ctrl+C or hang-up aimed at QGIS must not kill jobs that outlive it.
            options["start_new_session"] = True
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                       cwd=str(state), env=env, **options)
        except OSError as exc:
            log.close()
            raise BackendError(f"cannot run the Python interpreter {python} ({exc}): choose another interpreter "
                               f"in the plugin's settings, or {_SETUP_HINT}") from exc
        finally:
            if not log.closed:
                log.close()  # the child has its own handle
        client = cls(0, "", process=process, log_path=log_path, log_offset=log_offset, state_dir=state,
                     python=python)
        client.port = client._read_ready_port(timeout)
        client.base_url = f"http://{HOST}:{client.port}"
        try:
            client._token = token_file.read_text(encoding="utf-8").strip()
            client.health()
        except (OSError, BackendError) as exc:
            client._kill()
            raise BackendError(f"the backend service started but does not answer ({exc}). "
                               f"{client._log_excerpt()}") from exc
        _write_json_atomic(state / STATE_FILE, {
            "port": client.port, "pid": process.pid, "host": HOST, "token_file": str(token_file),
            "python": python, "log": str(log_path), "log_offset": log_offset, "started": time.time(),
        })
        return client

    def _read_ready_port(self, timeout: float) -> int:
        """Wait for the ready line on the child's stdout (a reader thread: select() does not work on Windows)."""
        assert self.process is not None and self.process.stdout is not None
        lines: queue.Queue[Optional[bytes]] = queue.Queue()
        stdout = self.process.stdout

        def read() -> None:
            try:
                for raw in iter(stdout.readline, b""):
                    lines.put(raw)
            except (OSError, ValueError):
                pass
            finally:
                lines.put(None)

        threading.Thread(target=read, name="idgbr-ready-reader", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise BackendError(f"the backend service did not become ready within {timeout:.0f} s: the computer "
                                   f"may be busy; try again. {self._log_excerpt()}")
            try:
                raw = lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if raw is None:  # stdout closed before the ready line: the service ended
                try:
                    self.process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    self._kill()
                raise self._startup_failure()
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith(READY_PREFIX):
                try:
                    return int(line[len(READY_PREFIX):])
                except ValueError:
                    self._kill()
                    raise BackendError(f"the backend service printed a malformed ready line {line!r}: update the "
                                       f"backend ({_SETUP_HINT})") from None

    def _startup_failure(self) -> BackendError:
        """Explain why the service ended before it was ready, from its exit code and log."""
        code = self.process.returncode if self.process is not None else None
        tail = self._log_tail()
        text = "\n".join(tail)
        errors = [line[len("IDGBR ERROR:"):].strip() for line in tail if line.startswith("IDGBR ERROR:")]
        missing = _missing_module(text)
        if code == EXIT_PORT_TAKEN or (errors and "is taken" in errors[-1]):
            return BackendError(errors[-1] if errors else "the service's port is taken: pick another port")
        if missing == "idgbr" or "'idgbr' is a package and cannot be directly executed" in text:
            return BackendError(f"the Python interpreter {self.python} has no IDGBR backend installed "
                                f"(`{self.python} -m idgbr` fails): {_SETUP_HINT}")
        if missing is not None:
            return BackendError(f"the Python interpreter {self.python} cannot import '{missing}', which the "
                                f"backend needs: {_SETUP_HINT}")
        if errors:
            return BackendError(errors[-1])
        return BackendError(f"the backend service stopped while starting ({_describe_exit(code)}). "
                            f"{self._log_excerpt()}")

    # ----------------------------------------------------------------------------------------------------------
    # HTTP
    # ----------------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                 timeout: Optional[float] = None) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {}),
        })
        try:
            with self._opener.open(request, timeout=timeout or self.request_timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(method, path, exc) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            raise self._gone(exc) from None
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except ValueError as exc:
            raise self._unreadable(method, path, exc) from None

    def _unreadable(self, method: str, path: str, exc: Exception) -> BackendError:
        return BackendError(f"the backend service sent an unreadable answer to {method} {path} ({exc}): "
                            f"update the backend ({_SETUP_HINT})")

    def _http_error(self, method: str, path: str, exc: urllib.error.HTTPError) -> BackendError:
        try:
            payload = json.loads(exc.read().decode("utf-8"))
        except (ValueError, OSError):
            payload = None
        detail: Any = None
        fields: Dict[str, Any] = payload if isinstance(payload, dict) else {}
        detail = fields.get("message") or fields.get("detail")
        if isinstance(detail, list):
            detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
        detail = str(detail or exc.reason or "no details")
        code = fields.get("code") if isinstance(fields.get("code"), str) else None
        parameter = fields.get("parameter") if isinstance(fields.get("parameter"), str) else None
        if exc.code == 401:
            return BackendError("the backend service rejected this client's token (was it restarted with "
                                "another token?): start or connect again", status=401, code=code)
        return BackendError(f"{method} {path} failed with HTTP {exc.code}: {detail}", status=exc.code, code=code,
                            parameter=parameter, detail=detail)

    def _gone(self, exc: BaseException) -> ServiceGone:
        if self.process is not None:
            # A killed service resets its connections a moment before the system reports its exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=EXIT_GRACE_S)
        if self.process is not None and self.process.poll() is not None:
            what = f"the backend service stopped ({_describe_exit(self.process.returncode)})"
        else:
            what = f"the backend service at {self.base_url} does not answer ({_reason(exc)})"
        return ServiceGone(f"{what}. The next run starts a fresh service. {self._log_excerpt()}".strip())

    # ----------------------------------------------------------------------------------------------------------
    # API
    # ----------------------------------------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        """Version, device (cuda name, or cpu and why), torch version, loaded models, job counts."""
        return self._request("GET", "/health")

    def models(self) -> List[Dict[str, Any]]:
        """Bundled models: [{name, path, available, card, error}]."""
        return self._request("GET", "/models")["models"]

    def submit(self, **fields: Any) -> str:
        """Queue a job and return its id.

        FIELDS are those of idgbr.pipeline.RunOptions (paths absolute; None = the default), e.g. input, output,
        mode, coarse, model, steps, band / vocabulary (px, -1 = rule off), min_confidence (0..1, 0 = gate off)
        confidence (refine only: where to write the float32 confidence GeoTIFF) and pixel_size (the input's
        metres per pixel, overriding its CRS; None: detected), device and precision (of the networks; None: the
        device's default).
        """
        body = {key: _jsonable(value) for key, value in fields.items() if value is not None}
        return str(self._request("POST", "/jobs", body)["id"])

    def status(self, job_id: str) -> Dict[str, Any]:
        """{id, state, progress 0-100, message, output, ...}; state: queued, running, succeeded, failed, cancelled."""
        return self._request("GET", f"/jobs/{_quote(job_id)}")

    def jobs(self) -> List[Dict[str, Any]]:
        return self._request("GET", "/jobs")["jobs"]

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Ask the job to stop (it ends as 'cancelled' with no output); a finished job is left as it is."""
        try:
            return self._request("DELETE", f"/jobs/{_quote(job_id)}")
        except BackendError as exc:
            if exc.status == 409:  # finished meanwhile: nothing to cancel
                return self.status(job_id)
            raise

    def wait(self, job_id: str, on_progress: Optional[Callable[[float, str], None]] = None,
             is_cancelled: Optional[Callable[[], bool]] = None, poll: float = 0.25) -> Dict[str, Any]:
        """Poll until the job ends; returns its final status when it succeeded.

        Raises JobFailed (the job's message), JobCancelled (after is_cancelled() turned true, or a cancel from
        elsewhere) or ServiceGone (the service died; the message holds the end of its log).
        """
        cancel_sent = False
        last_seen: Any = None
        unreachable_since: Optional[float] = None
        while True:
            if is_cancelled is not None and not cancel_sent and is_cancelled():
                self.cancel(job_id)
                cancel_sent = True
            try:
                status = self.status(job_id)
                unreachable_since = None
            except ServiceGone:
                # One missed poll can be a hiccup; a dead child process or 3 s of silence is not.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if (self.process is not None and self.process.poll() is not None) or \
                        now - unreachable_since > self.lost_contact_s:
                    raise
                time.sleep(max(poll, self.min_poll_s))
                continue
            except BackendError as exc:
                if exc.status == 404:
                    raise ServiceGone(f"the backend service no longer knows job {job_id} (it was restarted): "
                                      "run the job again") from None
                raise
            seen = (status.get("progress"), status.get("message"))
            if on_progress is not None and seen != last_seen:
                on_progress(float(status.get("progress") or 0.0), str(status.get("message") or ""))
            last_seen = seen
            state = status.get("state")
            if state == "succeeded":
                return status
            error = status.get("error") if isinstance(status.get("error"), dict) else {}
            if state == "failed":
                raise JobFailed(str(status.get("message") or "the job failed without a message"),
                                code=error.get("code"), parameter=error.get("parameter"))
            if state == "cancelled":
                raise JobCancelled(str(status.get("message") or "the job was cancelled"), code=error.get("code"))
            time.sleep(max(poll, self.min_poll_s))

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the service (running jobs are cancelled) and forget it in the state file."""
        with contextlib.suppress(ServiceGone):
            self._request("POST", "/shutdown")
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        else:
            # Not our child: wait until it stops answering.
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _port_open(self.port):
                time.sleep(0.1)
        self._forget()

    # ----------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------
    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10.0)

    def _forget(self) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / STATE_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if int(record.get("port", -1)) == self.port:
                path.unlink()
        except (OSError, ValueError, TypeError):
            pass

    def _log_tail(self, lines: int = 15) -> List[str]:
        if self.log_path is None:
            return []
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                start = self._log_offset if self._log_offset <= size else 0
                fh.seek(max(start, size - 8192))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _log_excerpt(self) -> str:
        tail = self._log_tail()
        if not tail:
            return f"Its log ({self.log_path}) is empty." if self.log_path else ""
        return f"Last lines of its log ({self.log_path}):\n" + "\n".join(tail)


# --------------------------------------------------------------------------------------------------------------
# A service on another computer
# --------------------------------------------------------------------------------------------------------------
REMOTE_TIMEOUT_S = 30.0  # connecting, and each read or write of a request
TRANSFER_TIMEOUT_S = 120.0  # each read or write of an upload or download (the service may be busy hashing)
CHUNK = 1024 * 1024
MB = 1024 * 1024
CHECKSUM_HEADER = "X-Content-SHA256"
REMOTE_SETTINGS = "Plugins ▸ IDGBR ▸ Settings… ▸ Remote backend"
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH_CODES = (62, 64)

Transferred = Callable[[int, int], None]  # (bytes done, bytes in all)


def remote_url_problem(url: str) -> Optional[str]:
    """Why URL cannot be the address of a remote `idgbr serve` (https://host:port), or None."""
    text = (url or "").strip()
    example = "https://gpu-server:8443"
    if not text:
        return f"no URL is set for the remote backend: enter its address, such as {example}"
    parsed = urllib.parse.urlsplit(text)
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:
        return f"the remote backend URL {text!r} has an invalid port: enter one such as {example}"
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        return f"{text!r} is not a backend URL: enter one such as {example}"
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        return f"the remote backend URL {text!r} must be only scheme, host and port: enter one such as {example}"
    return None


def token_problem(token: str) -> Optional[str]:
    """Why TOKEN cannot be a service's bearer token (one word of printable ASCII), or None."""
    if not token:
        return "the token is empty"
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        return "a token is one line of letters, digits and signs without spaces"
    return None


def read_token_file(path: PathLike) -> str:
    """The bearer token in a copy of a service's token file; BackendError says how to get a good one."""
    hint = ("copy the service's token file (the file its --token-file names) to this computer and choose it in "
            f"{REMOTE_SETTINGS}")
    file = Path(path)
    try:
        token = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BackendError(f"the token file {file} does not exist: {hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BackendError(f"cannot read the token file {file} ({exc}): {hint}") from exc
    problem = token_problem(token)
    if problem:
        raise BackendError(f"the token file {file} holds no token ({problem}): {hint}")
    return token


def _ssl_context(ca_file: Optional[Path]) -> ssl.SSLContext:
    """The system's trusted certificates, plus CA_FILE (a self-signed service's own certificate)."""
    context = ssl.create_default_context()
    if ca_file is None:
        return context
    hint = (f"choose the service's certificate (its --tls-cert file, PEM) or the CA certificate that signed it in "
            f"{REMOTE_SETTINGS}, or clear the field")
    if not ca_file.is_file():
        raise BackendError(f"the CA certificate {ca_file} does not exist or is not a file: {hint}")
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BackendError(f"the CA certificate {ca_file} is not a PEM certificate ({exc}): {hint}") from exc
    return context


class RemoteBackendClient(BackendClient):
    """A service on another computer (`idgbr serve --allow-remote --tls-cert C --tls-key K`) reached with its bearer
    token, over HTTPS. It never names a path there: a job's rasters go up with `upload` and the job names the
    uploads (`submit(input_upload=...)`); its results come back with `fetch` / `download`, checked against their
    SHA-256. `shutdown` only disconnects: the service belongs to whoever started it.
    """

    remote = True
    lost_contact_s = 60.0  # a network hiccup is not a dead service
    min_poll_s = 0.25  # each poll crosses the network

    def __init__(self, url: str, token: str, *, ca_file: Optional[PathLike] = None,
                 token_source: Optional[str] = None, request_timeout: float = REMOTE_TIMEOUT_S) -> None:
        problem = remote_url_problem(url)
        if problem:
            raise BackendError(f"{problem} ({REMOTE_SETTINGS})")
        parsed = urllib.parse.urlsplit(url.strip())
        super().__init__(parsed.port or (443 if parsed.scheme == "https" else 80), token,
                         request_timeout=request_timeout)
        self.base_url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.host = str(parsed.hostname)
        self.token_source = token_source  # where the token came from, for the message when it is refused
        self.ca_file = Path(ca_file) if ca_file else None
        self.max_upload_bytes: Optional[int] = None  # the service's --max-upload-mb, from /health
        self.context: Optional[ssl.SSLContext] = None
        # No proxies, as for the local service and the command line: an office server is reached directly.
        handlers: List[Any] = [urllib.request.ProxyHandler({})]
        if parsed.scheme == "https":
            self.context = _ssl_context(self.ca_file)
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_token_file(cls, url: str, token_file: PathLike, *, ca_file: Optional[PathLike] = None,
                        request_timeout: float = REMOTE_TIMEOUT_S) -> RemoteBackendClient:
        return cls(url, read_token_file(token_file), ca_file=ca_file, token_source=str(token_file),
                   request_timeout=request_timeout)

    def __repr__(self) -> str:
        return f"RemoteBackendClient({self.base_url})"

    # -- API ---------------------------------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        """The service's /health (version, device, GPU name, upload limit), with ``remote_url`` added."""
        health = self._request("GET", "/health")
        if not isinstance(health, dict) or health.get("service") != "idgbr":
            raise BackendError(f"{self.base_url} answers, but it is not an IDGBR backend: check the host and port "
                               f"of 'idgbr serve' in the URL ({REMOTE_SETTINGS})")
        limit = health.get("max_upload_bytes")
        self.max_upload_bytes = limit if isinstance(limit, int) and limit > 0 else None
        return {**health, "remote_url": self.base_url}

    def shutdown(self, timeout: float = 20.0) -> None:
        """Disconnect; the remote service keeps running for its other users."""

    def upload(self, path: PathLike, name: str, *, on_progress: Optional[Transferred] = None,
               is_cancelled: Optional[Callable[[], bool]] = None) -> str:
        """Upload the file PATH under NAME (announced with its size and SHA-256, then streamed piece by piece);
        returns its upload id. IS_CANCELLED is checked between pieces (JobCancelled, and the upload is dropped)."""
        file = Path(path)
        digest, size = _file_sha256(file, is_cancelled)
        created = self._request("POST", "/uploads", {"size": size, "sha256": digest, "name": name})
        upload_id = str(created["id"])
        try:
            self._put(upload_id, file, size, on_progress, is_cancelled)
        except BaseException:
            self.delete_upload(upload_id)
            raise
        return upload_id

    def _put(self, upload_id: str, file: Path, size: int, on_progress: Optional[Transferred],
             is_cancelled: Optional[Callable[[], bool]]) -> None:
        def pieces() -> Iterator[bytes]:
            sent = 0
            try:
                handle = open(file, "rb")  # noqa: SIM115 - closed below; a generator cannot use `with` across yields
            except OSError as exc:
                raise BackendError(f"cannot read {file} ({exc.strerror or exc}): check that it still exists") from exc
            try:
                while sent < size:
                    if is_cancelled is not None and is_cancelled():
                        raise JobCancelled("cancelled while uploading; nothing was written")
                    try:
                        block = handle.read(min(CHUNK, size - sent))
                    except OSError as exc:
                        raise BackendError(f"cannot read {file} ({exc.strerror or exc})") from exc
                    if not block:
                        raise BackendError(f"{file} became shorter while it was uploaded: wait until nothing writes "
                                           "to it, then run again")
                    sent += len(block)
                    yield block
                    if on_progress is not None:
                        on_progress(sent, size)
            finally:
                handle.close()

        request = urllib.request.Request(self.base_url + f"/uploads/{_quote(upload_id)}", data=pieces(), method="PUT",
                                         headers={"Authorization": f"Bearer {self._token}",
                                                  "Accept": "application/json",
                                                  "Content-Type": "application/octet-stream",
                                                  "Content-Length": str(size)})
        try:
            with self._opener.open(request, timeout=TRANSFER_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error("PUT", "/uploads", exc) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            raise self._gone(exc) from None

    def delete_upload(self, upload_id: str) -> None:
        """Drop an upload no job took (the service also drops them after an hour)."""
        with contextlib.suppress(BackendError):
            self._request("DELETE", f"/uploads/{_quote(upload_id)}", timeout=10.0)

    def forget_job(self, job_id: str) -> None:
        """Cancel the job if it still runs and delete its files on the service; errors are ignored (the service
        deletes them when it stops)."""
        with contextlib.suppress(BackendError):
            self._request("DELETE", f"/jobs/{_quote(job_id)}", timeout=10.0)

    def fetch(self, job_id: str, name: str, target: PathLike, *, size: Optional[int] = None,
              sha256: Optional[str] = None, on_progress: Optional[Transferred] = None,
              is_cancelled: Optional[Callable[[], bool]] = None) -> Path:
        """Stream the result NAME of a job on uploads into a new temporary file beside TARGET
        (".<target name>.<pid>-<random>.part"), checked against SIZE and SHA256 (from the job's ``result.files``;
        else the response's length and checksum header), and return that file: the caller moves it into place
        (`download` does). Nothing is left behind on failure."""
        final = Path(target)
        path = f"/jobs/{_quote(job_id)}/files/{_quote(name)}"
        request = urllib.request.Request(self.base_url + path, method="GET", headers={
            "Authorization": f"Bearer {self._token}", "Accept": "application/octet-stream"})
        try:
            response = self._opener.open(request, timeout=TRANSFER_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise self._http_error("GET", path, exc) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            raise self._gone(exc) from None
        temp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        expected = str(sha256 or response.headers.get(CHECKSUM_HEADER) or "").lower()
        total = int(size) if size is not None else int(response.headers.get("Content-Length") or -1)
        digest = hashlib.sha256()
        done = 0
        try:
            with response:
                try:
                    handle = open(temp, "xb")  # noqa: SIM115 - closed in the finally below
                except OSError as exc:
                    raise self._write_error(final, exc) from exc
                try:
                    while True:
                        if is_cancelled is not None and is_cancelled():
                            raise JobCancelled("cancelled while downloading; nothing was written")
                        try:
                            block = response.read(CHUNK)
                        except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
                            raise self._gone(exc) from None
                        if not block:
                            break
                        try:
                            handle.write(block)
                        except OSError as exc:
                            raise self._write_error(final, exc) from exc
                        digest.update(block)
                        done += len(block)
                        if on_progress is not None:
                            on_progress(done, total)
                finally:
                    handle.close()
            if done != total or not expected or digest.hexdigest() != expected:
                raise BackendError(f"the download of {name} from the backend at {self.base_url} arrived damaged "
                                   f"({done} of {total} bytes, checksum mismatch): run again")
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return temp

    def download(self, job_id: str, name: str, target: PathLike, **options: Any) -> Path:
        """`fetch` into TARGET: the checked file replaces it in one step (os.replace), or nothing changes."""
        temp = self.fetch(job_id, name, target, **options)
        try:
            os.replace(temp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise BackendError(f"cannot put the result in place at {target} ({exc.strerror or exc}): close it in "
                               "other programs and check that the folder is writable") from exc
        return Path(target)

    # -- errors ------------------------------------------------------------------------------------------------
    def _write_error(self, target: Path, exc: OSError) -> BackendError:
        return BackendError(f"cannot write the result beside {target} ({exc.strerror or exc}): check that the "
                            "folder exists, is writable and has free space; nothing was written")

    def _unreadable(self, method: str, path: str, exc: Exception) -> BackendError:
        return BackendError(f"{self.base_url} answered {method} {path} with something that is not JSON ({exc}): "
                            f"check that the URL is an 'idgbr serve' ({REMOTE_SETTINGS})")

    def _http_error(self, method: str, path: str, exc: urllib.error.HTTPError) -> BackendError:
        error = super()._http_error(method, path, exc)
        if error.status == 401:
            source = f" from {self.token_source}" if self.token_source else ""
            return BackendError(
                f"the backend at {self.base_url} refused the token{source} (HTTP 401): copy the service's current "
                "token file (the file its --token-file names; a service started without --token-file makes a new "
                f"token at each start) to this computer and choose it in {REMOTE_SETTINGS}", status=401,
                code=error.code)
        return error

    def _gone(self, exc: BaseException) -> ServiceGone:
        return RemoteUnreachable(self._transport_message(exc))

    def _transport_message(self, exc: BaseException) -> str:
        """What a failed connection means, and what to change."""
        reason: BaseException = exc
        if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
            reason = exc.reason
        url = self.base_url
        if isinstance(reason, ssl.SSLCertVerificationError):
            text = reason.verify_message or str(reason)
            if reason.verify_code in _NAME_MISMATCH_CODES or "mismatch" in text.lower():
                return (f"the certificate of the backend at {url} is not valid for {self.host} ({text}): use the host "
                        "name or address the certificate names in the URL, or make the service a certificate for "
                        f"{self.host} (user guide, 'Remote backend')")
            if self.ca_file is None:
                fix = ("if the service uses a self-signed certificate, choose a copy of it (its --tls-cert file) as "
                       f"the CA certificate in {REMOTE_SETTINGS}")
            else:
                fix = (f"the CA certificate {self.ca_file} did not sign it: choose the service's own certificate "
                       f"(its --tls-cert file) or the CA certificate that signed it in {REMOTE_SETTINGS}")
            return f"the certificate of the backend at {url} is not trusted ({text}): {fix}"
        if isinstance(reason, ssl.SSLError):
            return (f"the TLS connection to the backend at {url} failed ({reason.reason or reason}): check that the "
                    "service was started with --tls-cert and --tls-key (for a service without TLS, use an http:// "
                    "URL)")
        if isinstance(reason, socket.gaierror):
            return (f"cannot reach the backend at {url}: the host name {self.host} is unknown "
                    f"({reason.strerror or reason}); check the host in the URL ({REMOTE_SETTINGS})")
        if isinstance(reason, ConnectionRefusedError):
            return (f"cannot reach the backend at {url}: the connection was refused; check that 'idgbr serve' runs "
                    f"there on port {self.port}, and the host and port in the URL ({REMOTE_SETTINGS})")
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return (f"the backend at {url} did not answer in time: check the host and port in the URL "
                    f"({REMOTE_SETTINGS}), the network and firewalls")
        if isinstance(reason, http.client.HTTPException) and not isinstance(reason, http.client.RemoteDisconnected):
            return (f"the backend at {url} did not answer in HTTP ({reason!r}): check the scheme (https://) and the "
                    f"port in the URL ({REMOTE_SETTINGS})")
        if self.context is None and isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError)):
            return (f"the backend at {url} closed the connection without an answer: if the service uses TLS (it was "
                    f"started with --tls-cert), use an https:// URL ({REMOTE_SETTINGS}); otherwise check the network "
                    "and that the service still runs")
        return (f"the connection to the backend at {url} broke ({_reason(reason)}): check the network and that the "
                "service still runs")


def _file_sha256(path: Path, is_cancelled: Optional[Callable[[], bool]] = None) -> Tuple[str, int]:
    """(hex SHA-256, size) of a file, read in pieces."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                if is_cancelled is not None and is_cancelled():
                    raise JobCancelled("cancelled before the upload; nothing was written")
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise BackendError(f"cannot read {path} ({exc.strerror or exc}): check that it exists and is readable") \
            from exc
    return digest.hexdigest(), size


# --------------------------------------------------------------------------------------------------------------
# Module helpers
# --------------------------------------------------------------------------------------------------------------
def _check_interpreter(python: PathLike) -> str:
    text = os.fspath(python).strip() if python is not None else ""
    if not text:
        raise BackendError(f"no Python interpreter is set for the backend: {_SETUP_HINT}")
    path = Path(text).expanduser()
    if not path.is_file() and len(path.parts) == 1 and shutil.which(text):
        path = Path(shutil.which(text) or text)  # a bare name such as "python3" found on PATH
    if not path.is_file():
        raise BackendError(f"Python interpreter not found: {text}. Choose the backend's Python interpreter in the "
                           "plugin's settings (or set up the backend there)")
    # Keep venv launchers unresolved: resolving a venv's python symlink would leave the venv.
    return str(path.absolute())


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _missing_module(text: str) -> Optional[str]:
    """The top-level module of the last 'No module named X' in TEXT."""
    found = re.findall(r"No module named '?([A-Za-z_][\w.]*)", text)
    return found[-1].split(".")[0] if found else None


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


def _quote(job_id: str) -> str:
    from urllib.parse import quote

    return quote(str(job_id), safe="")


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _rotate(log_path: Path) -> None:
    """Keep the previous log as service.log.1; a log still held open (Windows) is appended to instead."""
    try:
        if log_path.exists() and log_path.stat().st_size > 0:
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    except OSError:
        pass


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackendError(f"cannot record the service in {path} ({exc}): set IDGBR_STATE_DIR to a writable "
                           "folder") from exc


class _StartLock:
    """Cross-process lock (a file created exclusively) so two QGIS windows do not both start a service."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._held = False

    def __enter__(self) -> _StartLock:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                if self._stale():
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                if time.monotonic() > deadline:
                    raise BackendError(f"another program has been starting the backend service for over "
                                       f"{self.timeout:.0f} s: if none is running, delete {self.path}") from None
                time.sleep(0.1)
                continue
            except OSError as exc:
                raise BackendError(f"cannot create {self.path} ({exc}): set IDGBR_STATE_DIR to a writable "
                                   "folder") from exc
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {time.time()}\n")
            self._held = True
            return self

    def _stale(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > self.timeout
        except OSError:
            return False

    def __exit__(self, *exc_info: Any) -> None:
        if self._held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._held = False


__all__: Sequence[str] = ("BackendClient", "BackendError", "JobCancelled", "JobFailed", "RemoteBackendClient",
                          "RemoteUnreachable", "ServiceGone", "default_state_dir", "read_token_file",
                          "remote_url_problem", "READY_PREFIX")
