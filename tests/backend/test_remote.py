"""A remote backend: `idgbr serve` over HTTPS (--tls-cert, --tls-key) with uploads, and `idgbr refine --backend`
against it: the same pixels as a local run, clear errors (token, certificate, upload limit, checksum), nothing
left behind on either side."""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import httpx
import numpy as np
import pytest
import rasterio

from idgbr import cli

READY = "IDGBR READY port="

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------------------------------------------
# Certificates and services
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, certificate_maker: Callable) -> types.SimpleNamespace:
    return certificate_maker(tmp_path_factory.mktemp("tls"))


class RemoteService:
    """An HTTPS `python -m idgbr serve` child process, with an httpx client that trusts its certificate."""

    def __init__(self, tmp: Path, tls: types.SimpleNamespace, extra: List[str]) -> None:
        self.token_file = tmp / "token"
        self.scratch = tmp / "scratch"
        self.ca = tls.cert
        self.log = tmp / "serve.log"
        env = {**os.environ, "IDGBR_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "idgbr", "serve", "--port", "0", "--token-file", str(self.token_file),
                 "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--scratch-dir", str(self.scratch), *extra],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp))
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline().decode()), daemon=True).start()
        try:
            self.ready = lines.get(timeout=120).strip()
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"no ready line; log: {self.log.read_text()}") from None
        assert self.ready.startswith(READY), f"{self.ready!r}; log: {self.log.read_text()}"
        self.port = int(self.ready[len(READY):].split()[0])
        self.url = f"https://127.0.0.1:{self.port}"
        self.token = self.token_file.read_text().strip()
        self.http = httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=str(tls.cert)),
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=60.0, trust_env=False)

    def files(self) -> List[Path]:
        """Every file in the service's scratch folder (uploads, job folders)."""
        return sorted(p for p in self.scratch.rglob("*") if p.is_file()) if self.scratch.exists() else []

    def upload(self, data: bytes, name: str = "a.tif") -> str:
        created = self.http.post("/uploads", json={"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                   "name": name})
        assert created.status_code == 201, created.text
        sent = self.http.put(f"/uploads/{created.json()['id']}", content=data)
        assert sent.status_code == 200, sent.text
        return str(created.json()["id"])

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.http.post("/shutdown")
                self.process.wait(timeout=30)
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
        self.http.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tls: types.SimpleNamespace) -> Iterator[RemoteService]:
    svc = RemoteService(tmp_path_factory.mktemp("remote"), tls, [])
    yield svc
    svc.stop()
    assert not list(svc.scratch.glob("serve-*")), "the service removes its uploads and job folders when it stops"


def wait_finished(svc: RemoteService, job_id: str, timeout: float = 240.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = svc.http.get(f"/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def small_extent(sample: Path, col: int = 400, row: int = 300, size: int = 64) -> str:
    with rasterio.open(sample) as src:
        x0, y0 = src.transform * (col, row)
        x1, y1 = src.transform * (col + size, row + size)
    return f"{min(x0, x1)},{min(y0, y1)},{max(x0, x1)},{max(y0, y1)}"


def remote_args(svc: RemoteService, ca: bool = True) -> List[str]:
    return ["--backend", svc.url, "--token-file", str(svc.token_file)] + (["--ca-cert", str(svc.ca)] if ca else [])


# ----------------------------------------------------------------------------------------------------------------
# idgbr refine --backend
# ----------------------------------------------------------------------------------------------------------------
def test_service_says_https(service: RemoteService) -> None:
    assert service.ready.endswith(" scheme=https")
    health = service.http.get("/health").json()
    assert health["tls"] is True and health["max_upload_bytes"] == 2048 * 1024 * 1024
    assert f"listening on https://127.0.0.1:{service.port}" in service.log.read_text()


def test_remote_refine_gives_the_pixels_of_a_local_run(service: RemoteService, sample_raster: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    # fp32: bf16 kernels round differently with the batch and thread count, so only fp32 is bit-identical.
    options = ["--steps", "1", "--extent", small_extent(sample_raster), "--seed", "3", "--precision", "fp32"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    assert cli.main(["refine", str(sample_raster), "-o", str(local / "r.tif"), "--confidence",
                     str(local / "c.tif"), "-q", *options]) == 0
    assert cli.main(["refine", str(sample_raster), "-o", str(remote / "r.tif"), "--confidence",
                     str(remote / "c.tif"), *options, *remote_args(service)]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {remote / 'r.tif'}: 64 x 64 px" in out and f"at {service.url}" in out
    for name in ("r.tif", "c.tif"):
        with rasterio.open(local / name) as a, rasterio.open(remote / name) as b:
            if name == "r.tif":
                assert np.array_equal(a.read(), b.read()), name
            else:  # torch's float sums depend on its thread count, which the service may not share
                assert np.allclose(a.read(), b.read(), rtol=0, atol=1e-5), name
            assert a.transform == b.transform and a.crs == b.crs and a.tags() == b.tags()
    assert (local / "r.tif.aux.xml").read_bytes() == (remote / "r.tif.aux.xml").read_bytes()  # class names
    assert sorted(p.name for p in remote.iterdir()) == ["c.tif", "r.tif", "r.tif.aux.xml"]  # no temporary files
    # Downloaded, then deleted on the service: no upload and no job folder is left.
    assert service.files() == []


def test_files_beside_the_raster_travel_with_it(service: RemoteService, crop_raster: Any, tmp_path: Path) -> None:
    """A raster georeferenced by a world file (and a name with a space): the service reads both, as here."""
    placed = crop_raster(48, 48, col=100, row=100)
    with rasterio.open(placed) as src:
        transform = src.transform
    source = crop_raster(48, 48, col=100, row=100, name="my crop.tif", crs=None, transform=None)
    a, _b, c, d, e, f = transform[:6]
    (tmp_path / "my crop.tfw").write_text(f"{a}\n{d}\n0\n{e}\n{c + a / 2}\n{f + e / 2}\n")
    local, remote = tmp_path / "l.tif", tmp_path / "r.tif"
    assert cli.main(["segment", str(source), "-o", str(local), "-q"]) == 0
    assert cli.main(["segment", str(source), "-o", str(remote), "-q", *remote_args(service)]) == 0
    with rasterio.open(local) as x, rasterio.open(remote) as y:
        assert x.transform.almost_equals(transform) and y.transform == x.transform
        assert np.array_equal(x.read(), y.read())
    assert service.files() == []


def test_remote_refine_with_a_coarse_map(service: RemoteService, crop_raster: Any, sample_labels: Path,
                                         tmp_path: Path) -> None:
    source = crop_raster(64, 64, col=400, row=300)
    coarse = crop_raster(64, 64, col=400, row=300, source=sample_labels)
    local, remote = tmp_path / "l.tif", tmp_path / "r.tif"
    options = ["--coarse", str(coarse), "--steps", "1", "--band", "off", "--precision", "fp32", "-q"]
    assert cli.main(["refine", str(source), "-o", str(local), *options]) == 0
    assert cli.main(["refine", str(source), "-o", str(remote), *options, *remote_args(service)]) == 0
    with rasterio.open(local) as a, rasterio.open(remote) as b:
        assert np.array_equal(a.read(), b.read())
    assert service.files() == []


def test_wrong_token_is_refused_and_nothing_is_written(service: RemoteService, crop_raster: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "token"
    bad.write_text("not-the-token-0123456789abcdef\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["refine", str(crop_raster(32, 32)), "-o", str(out_dir / "o.tif"), "--steps", "1",
            "--backend", service.url, "--token-file", str(bad), "--ca-cert", str(service.ca)]
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "refused the token" in err and "--token-file" in err and service.url in err
    assert list(out_dir.iterdir()) == []
    assert service.files() == []


def test_self_signed_certificate_needs_ca_cert(service: RemoteService, crop_raster: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.tif"
    assert cli.main(["refine", str(crop_raster(32, 32)), "-o", str(out), *remote_args(service, ca=False)]) == 1
    err = capsys.readouterr().err
    assert "certificate" in err and "--ca-cert" in err and "not trusted" in err
    assert not out.exists()


def test_unreachable_backend_names_the_url(crop_raster: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("some-token-0123456789abcdef\n")
    out = tmp_path / "o.tif"
    assert cli.main(["segment", str(crop_raster(16, 16)), "-o", str(out), "--backend", f"https://127.0.0.1:{port}",
                     "--token-file", str(token)]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the backend at https://127.0.0.1:{port}" in err
    assert not out.exists()


def test_a_job_that_fails_on_the_service_reports_its_message(service: RemoteService, crop_raster: Any,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.tif"
    assert cli.main(["segment", str(crop_raster(16, 16)), "-o", str(out), "--bands", "1,2,7",
                     *remote_args(service)]) == 1
    err = capsys.readouterr().err
    assert "the job failed on the backend" in err and "Band 7 does not exist" in err
    assert not out.exists()
    assert service.http.get("/health").status_code == 200  # and it keeps serving
    assert service.files() == []


def test_options_go_with_the_token_only(crop_raster: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = str(crop_raster(16, 16))
    assert cli.main(["segment", source, "-o", str(tmp_path / "o.tif"), "--backend", "https://x:1"]) == 1
    assert "--backend needs --token-file" in capsys.readouterr().err
    assert cli.main(["segment", source, "-o", str(tmp_path / "o.tif"), "--ca-cert", "c.pem"]) == 1
    assert "--ca-cert only applies with --backend" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tls: types.SimpleNamespace) -> Iterator[RemoteService]:
    svc = RemoteService(tmp_path_factory.mktemp("tiny"), tls, ["--max-upload-mb", "0.01"])
    yield svc
    svc.stop()


def test_upload_over_the_limit_is_refused_and_leaves_nothing(tiny: RemoteService, crop_raster: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.tif"
    assert cli.main(["segment", str(crop_raster(96, 96)), "-o", str(out), *remote_args(tiny)]) == 1
    err = capsys.readouterr().err
    assert "over the upload limit" in err and "--max-upload-mb" in err
    assert not out.exists()

    limit = tiny.http.get("/health").json()["max_upload_bytes"]
    assert limit == int(0.01 * 1024 * 1024)
    big = tiny.http.post("/uploads", json={"size": limit + 1, "sha256": "0" * 64, "name": "big.tif"})
    assert big.status_code == 413, big.text
    assert big.json()["code"] == "too_large" and "--max-upload-mb" in big.json()["message"]
    # More bytes than announced, streamed without a length: cut off, nothing kept.
    data = b"x" * 100
    created = tiny.http.post("/uploads", json={"size": 100, "sha256": hashlib.sha256(data).hexdigest()})
    assert created.status_code == 201
    upload_id = created.json()["id"]
    sent = tiny.http.put(f"/uploads/{upload_id}", content=iter([data, b"y" * limit]))
    assert sent.status_code == 413 and sent.json()["code"] == "too_large", sent.text
    assert tiny.files() == []
    assert tiny.http.delete(f"/uploads/{upload_id}").status_code == 200


def test_checksum_mismatch_is_refused_and_nothing_is_kept(service: RemoteService) -> None:
    data = b"raster bytes " * 100
    created = service.http.post("/uploads", json={"size": len(data), "sha256": hashlib.sha256(b"other").hexdigest(),
                                                  "name": "a.tif"})
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    sent = service.http.put(f"/uploads/{upload_id}", content=data)
    assert sent.status_code == 400, sent.text
    body = sent.json()
    assert body["code"] == "checksum_mismatch" and body["parameter"] == "sha256" and "SHA-256" in body["message"]
    assert service.files() == []
    job = service.http.post("/jobs", json={"input_upload": upload_id, "mode": "segment"})
    assert job.status_code == 400 and "not complete" in job.json()["message"]
    assert service.http.delete(f"/uploads/{upload_id}").status_code == 200


def test_an_interrupted_upload_leaves_nothing(service: RemoteService, tls: types.SimpleNamespace) -> None:
    data = b"z" * 200_000
    created = service.http.post("/uploads", json={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    upload_id = created.json()["id"]
    context = ssl.create_default_context(cafile=str(tls.cert))
    with socket.create_connection(("127.0.0.1", service.port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        conn.sendall(f"PUT /uploads/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {service.token}"
                     f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:50_000])
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while service.files() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.files() == []
    # The upload can be sent again in full.
    assert service.http.put(f"/uploads/{upload_id}", content=data).status_code == 200
    assert service.http.delete(f"/uploads/{upload_id}").status_code == 200
    assert service.files() == []


def test_a_job_reads_only_its_own_uploads(service: RemoteService, crop_raster: Any) -> None:
    data = crop_raster(32, 32).read_bytes()
    upload_id = service.upload(data, "crop.tif")
    first = service.http.post("/jobs", json={"input_upload": upload_id, "mode": "segment"})
    assert first.status_code == 201, first.text
    job_id = first.json()["id"]
    second = service.http.post("/jobs", json={"input_upload": upload_id, "mode": "segment"})
    assert second.status_code == 400
    assert second.json()["parameter"] == "input_upload" and "belongs to another job" in second.json()["message"]
    # Nor by path: the service's upload folder is off limits to path-based jobs.
    inside = next(p for p in service.files() if p.name == "crop.tif")
    by_path = service.http.post("/jobs", json={"input": str(inside), "output": str(inside.with_name("x.tif")),
                                               "mode": "segment"})
    assert by_path.status_code == 400 and "folder for uploads" in by_path.json()["message"]

    status = wait_finished(service, job_id)
    assert status["state"] == "succeeded", status
    files = status["result"]["files"]
    assert set(files) == {"output.tif", "output.tif.aux.xml"}
    download = service.http.get(f"/jobs/{job_id}/files/output.tif")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"] \
        == files["output.tif"]["sha256"]
    assert service.http.get(f"/jobs/{job_id}/files/input.tif").status_code == 404
    assert [p.name for p in service.files()] == ["output.tif", "output.tif.aux.xml"]  # the input went with the run
    deleted = service.http.delete(f"/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json()["files_deleted"] is True
    assert service.files() == []
    assert service.http.get(f"/jobs/{job_id}/files/output.tif").status_code == 404


def test_upload_jobs_take_no_paths(service: RemoteService) -> None:
    cases = [
        ({"input_upload": "0" * 32, "input": "/a.tif"}, "cannot be given with input_upload"),
        ({"input_upload": "0" * 32, "output": "/a.tif"}, "cannot be given with input_upload"),
        ({"write_confidence": True, "input": "/a.tif", "output": "/b.tif"}, "go with input_upload"),
        ({"input_upload": "0" * 32, "mode": "segment", "write_confidence": True}, "only for refine mode"),
        ({"input_upload": "x"}, "input_upload"),
        ({}, "give input and output"),
    ]
    for fields, words in cases:
        response = service.http.post("/jobs", json=fields)
        assert response.status_code == 422, (fields, response.text)
        assert words in response.json()["message"], (fields, response.json())
    unknown = service.http.post("/jobs", json={"input_upload": "0" * 32})
    assert unknown.status_code == 400 and "no upload" in unknown.json()["message"]


# ----------------------------------------------------------------------------------------------------------------
# `idgbr serve` refusals (before it listens, so checked in this process)
# ----------------------------------------------------------------------------------------------------------------
def _serve(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple:
    from idgbr.service.app import main

    code = main(["serve", "--token-file", str(tmp_path / "token"), *args])
    out, err = capsys.readouterr()
    assert READY not in out
    return code, err


def test_remote_bind_without_tls_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _serve(tmp_path, capsys, "--host", "0.0.0.0", "--allow-remote")
    assert code == 2 and err.startswith("IDGBR ERROR:")
    assert "plain HTTP" in err and "--tls-cert" in err and "--insecure-http" in err
    # --insecure-http lets it through with a warning (here it then stops at the bad port, before listening).
    code, err = _serve(tmp_path, capsys, "--host", "0.0.0.0", "--allow-remote", "--insecure-http", "--port", "70000")
    assert code == 2 and "WARNING: serving plain HTTP on 0.0.0.0" in err and "out of range" in err


def test_bad_certificate_files_are_named(tmp_path: Path, tls: types.SimpleNamespace,
                                         capsys: pytest.CaptureFixture, certificate_maker: Callable) -> None:
    other = certificate_maker(tmp_path, "other")
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (["--tls-cert", str(missing), "--tls-key", str(tls.key)], f"--tls-cert {missing} does not exist"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(missing)], f"--tls-key {missing} does not exist"),
        (["--tls-cert", str(text), "--tls-key", str(tls.key)], f"--tls-cert {text} holds no PEM certificate"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(text)], f"--tls-key {text} holds no PEM private key"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(other.key)], "is not the private key of --tls-cert"),
        (["--tls-cert", str(tls.cert)], "--tls-cert needs --tls-key"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--insecure-http"], "contradicts"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0"),
    ]
    for args, words in cases:
        code, err = _serve(tmp_path, capsys, *args)
        assert code == 2 and words in err, (args, err)


def test_plain_local_service_keeps_its_ready_line(tmp_path: Path) -> None:
    from idgbr.service.app import _announce_ready

    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            raise OSError("no descriptor")

    saved = sys.stdout
    plain, secure = Out(), Out()
    try:
        sys.stdout = plain  # type: ignore[assignment]
        _announce_ready(1234)
        sys.stdout = secure  # type: ignore[assignment]
        _announce_ready(1234, "https")
    finally:
        sys.stdout = saved
    assert plain.text == "IDGBR READY port=1234\n"  # what the plugin's client parses
    assert secure.text == "IDGBR READY port=1234 scheme=https\n"

