"""The plugin with a remote backend: a real `idgbr serve` over HTTPS (self-signed certificate, token file) chosen
in the settings. The toolbox and the dock run through it unchanged: the same pixels as a local run, the dock's
extra files, clear errors for a wrong token, an untrusted certificate or an unreachable backend, cancel, and
nothing left behind on either side. Small extents and one step keep each run to seconds."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
)
from qgis.PyQt.QtWidgets import QApplication

from idgbr_qgis import remote_config
from idgbr_qgis.backend_client import BackendError, RemoteBackendClient, remote_url_problem
from idgbr_qgis.backend_process import BackendManager, RemoteUnavailable
from idgbr_qgis.jobs import inputs
from idgbr_qgis.jobs.outcome import JobCancelled, JobError
from idgbr_qgis.jobs.remote import put_in_place, upload_names
from idgbr_qgis.jobs.runner import JobRunner
from idgbr_qgis.jobs.spec import JobExtent, JobSpec
from idgbr_qgis.ui.refine_task import RefineTask
from idgbr_qgis.ui.settings_dialog import SettingsDialog

pytestmark = [pytest.mark.usefixtures("idgbr_provider"), pytest.mark.timeout(300)]

UTM = QgsCoordinateReferenceSystem("EPSG:32640")
# 64 m x 64 m = 128 x 128 px of the sample (EPSG:32640, 0.5 m pixels, upper-left corner 320000, 2790000).
SMALL = "320100,320164,2789836,2789900 [EPSG:32640]"
SMALL_RECT = QgsRectangle(320100, 2789836, 320164, 2789900)
REMOTE_PLACE = "Settings… ▸ Remote backend"


def run(params: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run("idgbr:refine", params, feedback=feedback or QgsProcessingFeedback())


class TextFeedback(QgsProcessingFeedback):
    """Records the progress texts (QGIS 3.22's feedback has no signal for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def setProgressText(self, text: str) -> None:  # noqa: N802 - QGIS API
        self.texts.append(text)
        super().setProgressText(text)


def pixels(path: Path) -> bytes:
    dataset = gdal.Open(str(path))
    try:
        assert dataset is not None, path
        return b"".join(dataset.GetRasterBand(i + 1).ReadRaster() for i in range(dataset.RasterCount))
    finally:
        dataset = None


def grid(path: Path) -> tuple:
    dataset = gdal.Open(str(path))
    try:
        return dataset.GetGeoTransform(), dataset.RasterXSize, dataset.RasterYSize, dataset.GetProjection()
    finally:
        dataset = None


def wait_until_clean(service, timeout: float = 60.0) -> None:
    """The service removes a cancelled job's folder once its run has stopped."""
    deadline = time.monotonic() + timeout
    while service.files() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.files() == []


@pytest.fixture
def use_remote(remote_service, remote_settings):
    """The remote backend enabled as the settings dialog stores it; afterwards the session's manager forgets it."""
    remote_settings(url=remote_service.url, token_file=remote_service.token_file, ca_file=remote_service.ca)
    yield remote_service
    BackendManager.instance().forget()


# ----------------------------------------------------------------------------------------------------------------
# Toolbox and dock
# ----------------------------------------------------------------------------------------------------------------
def test_toolbox_refine_on_the_remote_backend_gives_the_pixels_of_a_local_run(idgbr_backend, remote_service,
                                                                              remote_settings, sample_raster,
                                                                              tmp_path):
    params = {"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1}
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    remote_settings(enabled=False)
    run({**params, "OUTPUT": str(local / "r.tif"), "CONFIDENCE": str(local / "c.tif")})
    assert not idgbr_backend.client().remote

    remote_settings(url=remote_service.url, token_file=remote_service.token_file, ca_file=remote_service.ca)
    try:
        client = idgbr_backend.client()
        assert client.remote and client.base_url == remote_service.url
        feedback = TextFeedback()
        texts = feedback.texts
        result = run({**params, "OUTPUT": str(remote / "r.tif"), "CONFIDENCE": str(remote / "c.tif")}, feedback)
    finally:
        idgbr_backend.forget()
    assert Path(result["OUTPUT"]) == remote / "r.tif"
    for name in ("r.tif", "c.tif"):
        assert grid(local / name) == grid(remote / name), name
        assert pixels(local / name) == pixels(remote / name), name
    assert (remote / "r.tif.aux.xml").is_file()  # the class names came along
    assert any("Uploading" in text for text in texts), texts
    # No temporary file here, no upload or job folder there.
    assert sorted(p.name for p in remote.iterdir() if not p.name.endswith(".aux.xml")) == ["c.tif", "r.tif"]
    assert remote_service.files() == []


def test_dock_run_with_its_coarse_map_and_changed_pixels_on_the_remote_backend(use_remote, sample_raster,
                                                                               tmp_path):
    layer = QgsRasterLayer(str(sample_raster), "sample")
    outputs = {name: tmp_path / f"{name}.tif" for name in ("refined", "coarse", "changes", "confidence")}
    spec = JobSpec(mode="refine", input=inputs.describe(layer), output=outputs["refined"], steps=1,
                   extent=JobExtent(SMALL_RECT, UTM), coarse_output=outputs["coarse"], changes=outputs["changes"],
                   confidence=outputs["confidence"], transform_context=QgsProject.instance().transformContext())
    task = RefineTask(BackendManager.instance(), spec, "sample")
    assert task.run(), task.error and task.error.message
    result = task.result
    assert result.coarse == outputs["coarse"] and result.changes == outputs["changes"]
    assert f"at 127.0.0.1:{use_remote.port}" in result.device
    assert result.classes and result.model
    for path in outputs.values():
        assert QgsRasterLayer(str(path), path.stem, "gdal").isValid(), path
    assert grid(outputs["coarse"])[:3] == grid(outputs["refined"])[:3]
    changes = gdal.Open(str(outputs["changes"]))
    try:
        histogram = changes.GetRasterBand(1).GetHistogram(-0.5, 255.5, 256, False, False)
    finally:
        changes = None
    assert {value for value, count in enumerate(histogram) if count} <= {0, 1}
    wait_until_clean(use_remote)


def test_cancel_cancels_the_remote_job_and_leaves_nothing(use_remote, sample_raster, tmp_path):
    layer = QgsRasterLayer(str(sample_raster), "sample")
    output = tmp_path / "refined.tif"
    spec = JobSpec(mode="refine", input=inputs.describe(layer), output=output, steps=1,
                   extent=JobExtent(QgsRectangle(320000, 2789700, 320200, 2789900), UTM),
                   confidence=tmp_path / "confidence.tif")
    cancelled = []

    def progress(percent: float, message: str) -> None:
        # Once the job runs there (after the uploads), the user presses Cancel.
        if percent > 15.0 and not message.startswith("Uploading"):
            cancelled.append(True)

    runner = JobRunner(BackendManager.instance(), on_progress=progress, is_cancelled=lambda: bool(cancelled))
    with pytest.raises(JobCancelled):
        runner.run(spec)
    assert cancelled and list(tmp_path.iterdir()) == []
    wait_until_clean(use_remote)


# ----------------------------------------------------------------------------------------------------------------
# Errors: each names the fix and leaves no output
# ----------------------------------------------------------------------------------------------------------------
def _refused(params: dict) -> str:
    with pytest.raises(QgsProcessingException) as caught:
        run(params)
    return str(caught.value)


def test_a_wrong_token_names_the_fix_and_leaves_no_output(remote_service, remote_settings, sample_raster,
                                                          tmp_path):
    bad = tmp_path / "old.token"
    bad.write_text("not-the-token-0123456789abcdef\n")
    remote_settings(url=remote_service.url, token_file=bad, ca_file=remote_service.ca)
    out = tmp_path / "out"
    out.mkdir()
    try:
        message = _refused({"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out / "r.tif")})
    finally:
        BackendManager.instance().forget()
    assert "refused the token" in message and str(bad) in message and "token file" in message
    assert REMOTE_PLACE in message and remote_service.url in message
    assert list(out.iterdir()) == []
    assert remote_service.files() == []


def test_an_untrusted_certificate_names_the_fix_and_leaves_no_output(remote_service, remote_settings,
                                                                     sample_raster, tmp_path):
    remote_settings(url=remote_service.url, token_file=remote_service.token_file)  # no CA certificate
    out = tmp_path / "r.tif"
    try:
        message = _refused({"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out)})
    finally:
        BackendManager.instance().forget()
    assert "certificate" in message and "not trusted" in message
    assert "--tls-cert" in message and "CA certificate" in message and REMOTE_PLACE in message
    assert not out.exists()


def test_an_unreachable_backend_and_a_bad_url_are_named(remote_service, remote_settings, sample_raster, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = BackendManager(locate=lambda: pytest.fail("a remote backend starts nothing here"))
    remote_settings(url=f"https://127.0.0.1:{port}", token_file=remote_service.token_file)
    with pytest.raises(RemoteUnavailable) as caught:
        manager.client()
    assert f"cannot reach the backend at https://127.0.0.1:{port}" in str(caught.value)
    assert "connection was refused" in str(caught.value)
    remote_settings(url="gpu-server:8443", token_file=remote_service.token_file)
    with pytest.raises(RemoteUnavailable) as caught:
        manager.client()
    assert "is not a backend URL" in str(caught.value) and "https://gpu-server:8443" in str(caught.value)
    # The job layer words it for the toolbox and the dock, and no local setup is offered as the fix.
    runner = JobRunner(manager)
    layer = QgsRasterLayer(str(sample_raster), "sample")
    with pytest.raises(JobError) as failed:
        runner.run(JobSpec(mode="segment", input=inputs.describe(layer), output=tmp_path / "s.tif"))
    assert "remote IDGBR backend cannot be used" in failed.value.message and not failed.value.setup_needed
    assert not (tmp_path / "s.tif").exists()


def test_a_plain_http_url_to_an_https_service_is_explained(remote_service):
    client = RemoteBackendClient(f"http://127.0.0.1:{remote_service.port}", remote_service.token)
    with pytest.raises(BackendError) as caught:
        client.health()
    assert "https://" in str(caught.value)


# ----------------------------------------------------------------------------------------------------------------
# The settings dialog
# ----------------------------------------------------------------------------------------------------------------
def _wait(results: list, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not results:
        assert time.monotonic() < deadline, "timed out waiting for the remote test"
        QApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture
def private_token_file(tmp_path, monkeypatch):
    """A pasted token goes here instead of the test profile's idgbr folder."""
    path = tmp_path / "profile" / "idgbr" / "remote.token"
    monkeypatch.setattr(remote_config, "pasted_token_file", lambda: path)
    monkeypatch.setattr("idgbr_qgis.ui.settings_dialog.pasted_token_file", lambda: path)
    return path


def test_settings_dialog_stores_and_reloads_the_remote_backend(remote_service, remote_settings,
                                                               private_token_file):
    remote_settings(enabled=False)
    dialog = SettingsDialog(BackendManager())
    assert not dialog.remoteCheck.isChecked()
    dialog.remoteCheck.setChecked(True)
    dialog.remoteUrlEdit.setText(remote_service.url)
    dialog.remoteTokenFile.setFilePath(str(remote_service.token_file))
    dialog.remoteCaFile.setFilePath(str(remote_service.ca))
    dialog.accept()
    assert dialog.result() == dialog.Accepted
    stored = remote_config.RemoteSettings.load(QgsSettings())
    assert stored == remote_config.RemoteSettings(True, remote_service.url, str(remote_service.token_file),
                                                  str(remote_service.ca))
    again = SettingsDialog(BackendManager())
    assert again.remoteCheck.isChecked() and again.remoteUrlEdit.text() == remote_service.url
    assert again.remoteTokenFile.filePath() == str(remote_service.token_file)
    assert again.remoteCaFile.filePath() == str(remote_service.ca)

    # A pasted token is written to a private file, and only that file's path is stored.
    again.remoteTokenEdit.setText(remote_service.token)
    again.accept()
    assert private_token_file.read_text().strip() == remote_service.token
    if os.name == "posix":
        assert private_token_file.stat().st_mode & 0o777 == 0o600
    settings = QgsSettings()
    values = [str(settings.value(key, "")) for key in remote_config.KEYS]
    assert str(private_token_file) in values and not any(remote_service.token in value for value in values)
    third = SettingsDialog(BackendManager())
    assert third.remoteTokenFile.filePath() == str(private_token_file) and third.remoteTokenEdit.text() == ""
    third.reject()


def test_settings_dialog_refuses_incomplete_remote_settings(remote_settings, tmp_path, private_token_file):
    remote_settings(enabled=False)
    dialog = SettingsDialog(BackendManager())
    dialog.remoteCheck.setChecked(True)
    dialog.remoteUrlEdit.setText("gpu-server")
    dialog.accept()
    assert dialog.result() != dialog.Accepted and "is not a backend URL" in dialog.testLabel.text()
    dialog.remoteUrlEdit.setText("https://gpu-server:8443")
    dialog.accept()
    assert "token file" in dialog.testLabel.text()
    dialog.remoteTokenFile.setFilePath(str(tmp_path / "missing.token"))
    dialog.accept()
    assert "missing.token does not exist" in dialog.testLabel.text()
    dialog.remoteTokenFile.setFilePath("")
    dialog.remoteTokenEdit.setText("two words")
    dialog.accept()
    assert "without spaces" in dialog.testLabel.text()
    assert not remote_config.RemoteSettings.load(QgsSettings()).enabled and not private_token_file.exists()
    dialog.reject()


def test_settings_dialog_tests_the_remote_backend(remote_service, remote_settings, tmp_path, private_token_file):
    remote_settings(enabled=False)
    dialog = SettingsDialog(BackendManager())
    results: list[tuple[bool, str]] = []
    dialog.remoteTestFinished.connect(lambda ok, text: results.append((ok, text)))
    dialog.remoteUrlEdit.setText(remote_service.url)
    dialog.remoteTokenFile.setFilePath(str(remote_service.token_file))
    dialog.remoteCaFile.setFilePath(str(remote_service.ca))
    dialog.test_remote()
    _wait(results)
    ok, text = results.pop()
    assert ok, text
    assert re.search(rf"IDGBR \d+\.\d+\S* at {re.escape(remote_service.url)}", text), text
    assert "Device:" in text and "GPU:" in text

    dialog.remoteCaFile.setFilePath("")  # self-signed, not trusted by this computer
    dialog.test_remote()
    _wait(results)
    ok, text = results.pop()
    assert not ok and "not trusted" in text and "CA certificate" in text

    dialog.remoteCaFile.setFilePath(str(remote_service.ca))
    dialog.remoteTokenEdit.setText("not-the-token-0123456789abcdef")  # typed, not saved: the test uses it
    dialog.test_remote()
    _wait(results)
    ok, text = results.pop()
    assert not ok and "refused the token" in text and "token file" in text

    dialog.remoteUrlEdit.setText("ftp://gpu-server")
    dialog.test_remote()
    _wait(results)
    ok, text = results.pop()
    assert not ok and "is not a backend URL" in text
    dialog.reject()
    assert not private_token_file.exists()


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------
def test_remote_urls_are_checked():
    assert remote_url_problem("https://gpu-server:8443") is None
    assert remote_url_problem("http://10.0.0.5:8000") is None
    for bad in ("", "gpu-server:8443", "https://", "https://host:99999", "https://host:8443/?x=1",
                "https://user:pw@host:8443", "https://host:0"):
        assert remote_url_problem(bad), bad


def test_upload_names_keep_a_raster_and_its_side_files_paired():
    files = [Path("/d/my map.tif"), Path("/d/my map.tif.aux.xml"), Path("/d/my map.tfw")]
    assert upload_names(files) == ["my_map.tif", "my_map.tif.aux.xml", "my_map.tfw"]
    assert upload_names([Path("/d/.hidden.tif"), Path("/d/.hidden.tif.aux.xml")]) == [
        "f.hidden.tif", "f.hidden.tif.aux.xml"]


def test_results_go_in_place_together_or_not_at_all(tmp_path):
    old = tmp_path / "r.tif"
    old.write_text("old")
    stale = tmp_path / "r.tif.aux.xml"
    stale.write_text("stale")
    new = tmp_path / ".r.tif.1.part"
    new.write_text("new")
    put_in_place([(old, new), (stale, None)])
    assert old.read_text() == "new" and not stale.exists() and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.tif"]

    # The second move fails (its temporary file is gone): the first target is put back as it was.
    first = tmp_path / ".r.tif.2.part"
    first.write_text("newer")
    with pytest.raises(JobError):
        put_in_place([(old, first), (tmp_path / "c.tif", tmp_path / ".missing.part")])
    assert old.read_text() == "new" and not (tmp_path / "c.tif").exists()
