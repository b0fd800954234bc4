"""`idgbr serve` as a real process on loopback: command line, token, auth on every route, input validation,
size limits, and fuzzing from its own OpenAPI description (no 5xx, ever)."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import httpx
import pytest

READY = "IDGBR READY port="

pytestmark = pytest.mark.timeout(300)  # a refusal that failed would otherwise serve forever


class Service:
    """A `python -m idgbr serve` child process and an authenticated HTTP client for it."""

    def __init__(self, process: subprocess.Popen, port: int, token: str, stderr_path: Path) -> None:
        self.process = process
        self.port = port
        self.token = token
        self.stderr_path = stderr_path
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=20.0,
                                 trust_env=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.http.post("/shutdown")
                self.process.wait(timeout=20)
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
        self.http.close()


def start_process(args: List[str], tmp: Path, timeout: float = 60.0) -> Tuple[subprocess.Popen, Optional[str], Path]:
    """Run `python -m idgbr serve ARGS`; returns (process, first stdout line or None if it exited, stderr path)."""
    stderr_path = tmp / f"serve-{len(list(tmp.glob('serve-*.log')))}.log"
    env = {**os.environ, "IDGBR_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"}
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "idgbr", "serve", *args], stdout=subprocess.PIPE,
                                   stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp))
    lines: queue.Queue[Optional[str]] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline().decode() or None), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"no ready line within {timeout} s; stderr: {stderr_path.read_text()}") from None
    return process, line, stderr_path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    token_file = tmp / "token"
    process, line, stderr_path = start_process(["--port", "0", "--token-file", str(token_file)], tmp)
    assert line is not None and line.startswith(READY), f"{line!r}; stderr: {stderr_path.read_text()}"
    svc = Service(process, int(line.strip()[len(READY):]), token_file.read_text().strip(), stderr_path)
    yield svc
    svc.stop()


def test_ready_line_token_file_and_clean_shutdown(tmp_path: Path) -> None:
    token_file = tmp_path / "sub" / "token"
    process, line, stderr_path = start_process(["--token-file", str(token_file)], tmp_path)
    try:
        assert line is not None and line.strip().startswith(READY), stderr_path.read_text()
        port = int(line.strip()[len(READY):])
        token = token_file.read_text().strip()
        assert len(token) >= 32
        if os.name != "nt":
            assert token_file.stat().st_mode & 0o777 == 0o600
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            assert http.get("/health").json()["service"] == "idgbr"
            assert http.post("/shutdown").status_code == 202
        assert process.wait(timeout=30) == 0
        # Exactly one line ever reaches stdout: later output goes to stderr, so nobody has to drain the pipe.
        assert process.stdout.read() == b""
    finally:
        if process.poll() is None:
            process.kill()


def test_idle_service_stops_by_itself(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    process, line, stderr_path = start_process(["--token-file", str(token_file), "--idle-timeout", "1"], tmp_path)
    try:
        assert line is not None and line.startswith(READY), stderr_path.read_text()
        assert process.wait(timeout=60) == 0
        assert "no requests for" in stderr_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()


def test_existing_token_file_is_used_and_tightened(tmp_path: Path) -> None:
    from idgbr.service.auth import load_or_create_token

    token_file = tmp_path / "token"
    token_file.write_text("my-own-token-0123456789\n")
    token_file.chmod(0o644)
    assert load_or_create_token(token_file) == "my-own-token-0123456789"
    if os.name != "nt":
        assert token_file.stat().st_mode & 0o777 == 0o600, "a token readable by others is tightened"


# The refusals happen before the server starts, so they are checked in-process (a child costs seconds each).
@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--host", "0.0.0.0"], 2, "--allow-remote"),
        (["--host", "192.0.2.10"], 2, "not a loopback address"),
        (["--host", "example.invalid"], 2, "not a loopback address"),
        (["--port", "70000"], 2, "out of range"),
        (["--idle-timeout", "-5"], 2, "idle-timeout"),
    ],
)
def test_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture, args: List[str], code: int,
                               words: str) -> None:
    from idgbr.service.app import main

    assert main(["serve", "--token-file", str(tmp_path / "token"), *args]) == code
    out, err = capsys.readouterr()
    assert READY not in out
    assert words in err and err.startswith("IDGBR ERROR:")


def test_short_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from idgbr.service.app import main

    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    assert main(["serve", "--token-file", str(token_file)]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_taken_port_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from idgbr.service.app import main

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        assert main(["serve", "--port", str(port), "--token-file", str(tmp_path / "token")]) == 4
    err = capsys.readouterr().err
    assert f"port {port}" in err and "is taken" in err and "--port 0" in err


# ----------------------------------------------------------------------------------------------------------------
# Authentication
# ----------------------------------------------------------------------------------------------------------------
def _routes(service: Service) -> List[Tuple[str, str]]:
    spec = service.http.get("/openapi.json").json()
    routes = [(method.upper(), path.replace("{job_id}", "0" * 32))
              for path, item in spec["paths"].items() for method in item]
    return routes + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no-such-route")]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-0123456789", "Bearer", "Basic {token}", "Bearer {token}x", "Bearer {short}",
     "{token}"],
    ids=["missing", "wrong", "empty", "basic-scheme", "longer", "prefix", "no-scheme"],
)
def test_every_route_needs_the_token(service: Service, authorization: Optional[str]) -> None:
    routes = _routes(service)
    assert {("GET", "/health"), ("GET", "/models"), ("POST", "/jobs"), ("POST", "/shutdown")} <= set(routes)
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization.format(token=service.token, short=service.token[:-1])
    with httpx.Client(base_url=service.url, trust_env=False, timeout=20.0) as anonymous:
        for method, path in routes:
            response = anonymous.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.status_code, response.text)
            assert response.headers.get("www-authenticate") == "Bearer"
            assert "token" in response.json()["detail"]
    # The unauthenticated POST /shutdown above did not stop anything.
    assert service.http.get("/health").status_code == 200


def test_right_token_reaches_every_route(service: Service) -> None:
    for method, path in _routes(service):
        if path == "/shutdown":
            continue
        response = service.http.request(method, path, json={} if method == "POST" else None)
        assert response.status_code != 401, (method, path)
        assert response.status_code < 500, (method, path, response.text)


def test_duplicate_authorization_headers_are_refused(service: Service) -> None:
    with httpx.Client(base_url=service.url, trust_env=False) as anonymous:
        headers = [("Authorization", f"Bearer {service.token}"), ("Authorization", "Bearer other-0123456789abc")]
        assert anonymous.get("/health", headers=headers).status_code == 401


# ----------------------------------------------------------------------------------------------------------------
# Routes and validation
# ----------------------------------------------------------------------------------------------------------------
def test_health_reports_version_device_and_torch(service: Service) -> None:
    import torch

    import idgbr

    health = service.http.get("/health").json()
    assert health["version"] == idgbr.__version__
    assert health["torch"] == torch.__version__
    assert isinstance(health["models_loaded"], list)
    if torch.cuda.is_available():
        assert health["device"] == "cuda" and health["device_name"]
    elif health["device"] == "cpu":
        assert "torch.cuda.is_available() is False" in health["device_reason"]


def test_models_lists_the_bundled_cards(service: Service) -> None:
    from idgbr.model_bundle import bundled_models

    listing = service.http.get("/models").json()["models"]
    assert sorted(entry["name"] for entry in listing) == sorted(bundled_models())
    for entry in listing:
        if entry["available"]:
            assert entry["card"]["num_classes"] == len(entry["card"]["classes"])
        else:
            assert entry["error"]


def _job(tmp: Path, **fields: object) -> dict:
    return {"input": str(tmp / "missing.tif"), "output": str(tmp / "out.tif"), **fields}


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"input": "relative/a.tif"}, 422, "absolute path"),
        ({"bogus": 1}, 422, "bogus"),
        ({"steps": 0}, 422, "steps"),
        ({"steps": 10**9}, 422, "steps"),
        ({"mode": "paint"}, 422, "mode"),
        ({"device": "tpu"}, 422, "device"),
        ({"extent": [1, 2, 3]}, 422, "extent"),
        ({"extent": [10, 0, 0, 10]}, 422, "xmin < xmax"),
        ({"extent_crs": "EPSG:4326"}, 422, "give extent too"),
        ({"mode": "segment", "coarse": "/x/c.tif"}, 422, "refine mode"),
        ({"mode": "segment", "confidence": "/x/c.tif"}, 422, "confidence is only written in refine mode"),
        ({"confidence": "c.tif"}, 422, "absolute path"),
        ({"band": -2}, 422, "band"),
        ({"vocabulary": 2000}, 422, "vocabulary"),
        ({"min_confidence": 1.5}, 422, "min_confidence"),
        ({"pixel_size": 0}, 422, "pixel_size"),
        ({"pixel_size": -0.5}, 422, "pixel_size"),
        ({"bands": []}, 422, "bands"),
        ({"bands": [0, 1, 2]}, 422, "bands"),
        ({"tile": 64, "overlap": 40}, 422, "half of tile"),
        ({"input": "/a\u0000b.tif"}, 422, "NUL"),
        ({}, 400, "does not exist"),
    ],
)
def test_bad_jobs_get_clear_4xx(service: Service, tmp_path: Path, fields: dict, status: int, words: str) -> None:
    response = service.http.post("/jobs", json=_job(tmp_path, **fields))
    assert response.status_code == status, response.text
    body = response.json()
    text = body.get("message") or body["detail"]
    assert words in (text if isinstance(text, str) else json.dumps(text)), body


def test_file_checks_name_the_problem(service: Service, sample_raster: Path, tmp_path: Path) -> None:
    base = {"input": str(sample_raster), "output": str(tmp_path / "out.tif")}
    cases = [
        ({"input": str(tmp_path)}, "is a folder"),
        ({"output": str(tmp_path / "no" / "out.tif")}, "does not exist: create it first"),
        ({"output": str(tmp_path / "out.png")}, ".tif"),
        ({"output": str(sample_raster)}, "is the input raster"),
        ({"model": "no-such-model"}, "unknown model"),
        ({"model": str(tmp_path / "m.safetensors")}, "does not exist"),
        ({"coarse": str(tmp_path / "c.tif")}, "coarse raster"),
        ({"confidence": str(tmp_path / "c.png")}, "confidence"),
        ({"confidence": str(tmp_path / "no" / "c.tif")}, "does not exist: create it first"),
        ({"confidence": str(sample_raster)}, "is the input raster"),
        ({"confidence": str(tmp_path / "out.tif")}, "is the output raster"),
    ]
    for fields, words in cases:
        response = service.http.post("/jobs", json={**base, **fields})
        assert response.status_code == 400, (fields, response.text)
        assert words in response.json()["detail"], (fields, response.json())
    assert not (tmp_path / "out.tif").exists()


def test_malformed_bodies_are_4xx(service: Service) -> None:
    raw = [b"{not json", b"[" * 60000, b'{"input": NaN}', b"\xff\xfe", b"null", b'"text"', b"{}"]
    for body in raw:
        response = service.http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (body[:20], response.status_code, response.text)
    nan = b'{"input": "/a.tif", "output": "/b.tif", "extent": [0, 0, NaN, 1]}'
    assert service.http.post("/jobs", content=nan, headers={"Content-Type": "application/json"}).status_code == 422


def test_large_bodies_are_refused(service: Service, tmp_path: Path) -> None:
    big = _job(tmp_path, extent_crs="x" * (70 * 1024))
    assert service.http.post("/jobs", json=big).status_code == 413
    # Streamed (chunked) bodies are counted too, not only a declared Content-Length.
    chunks = (b"a" * 4096 for _ in range(40))
    response = service.http.post("/jobs", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert service.http.get("/health").status_code == 200


def test_unknown_jobs_are_404(service: Service) -> None:
    for method in ("GET", "DELETE"):
        response = service.http.request(method, "/jobs/" + "f" * 32)
        assert response.status_code == 404
        assert "submit the job again" in response.json()["detail"]
    assert service.http.get("/jobs/" + "x" * 65).status_code == 422


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing from the OpenAPI description
# ----------------------------------------------------------------------------------------------------------------
def test_fuzz_the_api_from_its_openapi_description(service: Service, tmp_path: Path) -> None:
    """Positive and negative requests generated from /openapi.json: the service never answers 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    auth = {"Authorization": f"Bearer {service.token}"}
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers=auth, timeout=20)
    schema = schema.exclude(path="/shutdown")  # would end the fuzzing session itself
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    missing = str(tmp_path / "does-not-exist.tif")
    seen: List[int] = []

    @settings(max_examples=120, deadline=10_000, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        body = case.body
        # Fuzz only with inputs that do not exist, so no job ever does heavy work.
        if isinstance(body, dict) and isinstance(body.get("input"), str) and os.path.lexists(body["input"]):
            body["input"] = missing
        response = case.call(base_url=service.url, headers=auth, timeout=20)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                             response.text[:500])

    check()
    assert seen and all(code < 500 for code in seen)
    assert any(code in (400, 422) for code in seen), "the fuzzer reached the validation paths"
    assert service.http.get("/health").status_code == 200
    assert service.process.poll() is None
