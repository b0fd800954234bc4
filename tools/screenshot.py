"""`make screenshot`: the real QGIS main window with the IDGBR dock, a drawn extent and the refined layer.

Run as a program it starts `/usr/bin/qgis` under `xvfb-run` with a throw-away profile that enables the
plugin from this checkout, and passes itself to QGIS with `--code`. Inside QGIS (IDGBR_SCREENSHOT_OUT
set) it loads the sample raster, opens the dock, sets an extent, runs the refiner, waits for the styled
layer to be drawn, grabs the window with QWidget.grab() and closes QGIS (which unloads the plugin and
stops the backend service it started).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# QGIS's --code runs this file with exec(), where __file__ is not defined (and not needed).
REPO = Path(globals().get("__file__") or ".").resolve().parents[1 if "__file__" in globals() else 0]
SAMPLE = REPO / "resources" / "sample" / "dubai_sample.tif"
ENV_OUT = "IDGBR_SCREENSHOT_OUT"
ENV_SAMPLE = "IDGBR_SCREENSHOT_SAMPLE"
WIDTH, HEIGHT = 1600, 1000


# ------------------------------------------------------------------------------------------ inside QGIS


def _in_qgis() -> None:
    """Runs in QGIS's Python (via --code): everything is scheduled on QGIS's event loop."""
    from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsMessageLog, QgsProject, QgsRectangle
    from qgis.PyQt.QtCore import QTimer
    from qgis.utils import iface, loadPlugin, plugins, startPlugin

    out = Path(os.environ[ENV_OUT])
    state: dict = {}

    def fail(message: str) -> None:
        QgsMessageLog.logMessage(message, "IDGBR", Qgis.Critical)
        (out.parent / (out.name + ".error")).write_text(message, encoding="utf-8")
        close()

    def close() -> None:
        # The results lie under /tmp here, which QGIS counts as temporary layers and asks about on exit.
        QgsProject.instance().clear()
        QgsProject.instance().setDirty(False)  # no "save project?" question
        iface.mainWindow().close()

    def start() -> None:
        window = iface.mainWindow()
        # Xvfb has no window manager to maximise windows: fill the virtual screen by hand.
        window.showNormal()
        window.setGeometry(0, 0, WIDTH, HEIGHT)
        if "idgbr_qgis" not in plugins and not (loadPlugin("idgbr_qgis") and startPlugin("idgbr_qgis")):
            fail("The IDGBR plugin could not be loaded from QGIS_PLUGINPATH.")
            return
        layer = iface.addRasterLayer(os.environ[ENV_SAMPLE], "dubai_sample")
        if layer is None or not layer.isValid():
            fail(f"QGIS cannot open {os.environ[ENV_SAMPLE]}")
            return
        QgsProject.instance().setCrs(layer.crs())
        full = layer.extent()
        canvas = iface.mapCanvas()
        canvas.setExtent(full.buffered(-full.width() * 0.08))
        plugin = plugins["idgbr_qgis"]
        plugin.show_dock()
        dock = plugin.dock
        dock.layerCombo.setLayer(layer)
        # A 400 × 300 px extent in the middle of the sample (0.5 m pixels).
        cx, cy = full.center().x(), full.center().y()
        dock.set_drawn_extent(QgsRectangle(cx - 110, cy - 60, cx + 90, cy + 90), QgsCoordinateReferenceSystem(
            layer.crs()))
        dock.runFinished.connect(finished)
        state["dock"] = dock
        # Give the backend check (started when the dock showed) a moment, then run.
        QTimer.singleShot(3000, run)

    def run() -> None:
        if state["dock"].run() is None:
            fail("The dock refused to run: see the message bar.")

    def finished(ok: bool, message: str) -> None:
        if not ok:
            fail(f"The refine run failed: {message}")
            return
        # Legend: the result group open with its classes, the input image folded.
        root = QgsProject.instance().layerTreeRoot()
        for node in root.findLayers():
            node.setExpanded(node.layer().name().endswith("IDGBR refined"))
        for group in root.findGroups():
            group.setExpanded(False)  # toggled: the legend view follows the change signal
            group.setExpanded(True)
        canvas = iface.mapCanvas()
        canvas.mapCanvasRefreshed.connect(lambda: QTimer.singleShot(1500, grab))
        canvas.refresh()
        QTimer.singleShot(20000, grab)  # in case no refresh signal comes

    def grab() -> None:
        if state.get("grabbed"):
            return
        state["grabbed"] = True
        pixmap = iface.mainWindow().grab()
        tmp = out.with_name(f".{out.stem}.tmp.png")
        if not pixmap.save(str(tmp), "PNG"):
            fail(f"Could not write {tmp}")
            return
        os.replace(tmp, out)
        close()

    def guarded(step):
        def call(*args):
            try:
                step(*args)
            except Exception as exc:  # an error dialog would block QGIS until the driver's timeout
                fail(f"{type(exc).__name__}: {exc}")
        return call

    start, run, finished, grab = guarded(start), guarded(run), guarded(finished), guarded(grab)
    QTimer.singleShot(1500, start)


# --------------------------------------------------------------------------------------------- driver


def _stop(process: subprocess.Popen, state: Path) -> None:
    """Kill QGIS's process group and the backend service it started (that one runs in its own session)."""
    import json
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, ProcessLookupError):
        pid = int(json.loads((state / "service.json").read_text(encoding="utf-8"))["pid"])
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot of QGIS with the IDGBR dock (docs/images/dock.png).")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "dock.png")
    parser.add_argument("--qgis", default=shutil.which("qgis") or "/usr/bin/qgis")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before QGIS is stopped")
    args = parser.parse_args(argv)
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        print("screenshot: xvfb-run is missing: apt install xvfb xauth (or run `make install`)", file=sys.stderr)
        return 1
    if not Path(args.qgis).exists():
        print(f"screenshot: QGIS not found at {args.qgis}: apt install qgis (or run `make install`)", file=sys.stderr)
        return 1
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    error_file = out.parent / (out.name + ".error")
    error_file.unlink(missing_ok=True)
    before = out.stat().st_mtime if out.exists() else None
    sys.path.insert(0, str(REPO))
    from idgbr_qgis.backend_process import development_python

    with tempfile.TemporaryDirectory(prefix="idgbr_screenshot_") as scratch:
        work = Path(scratch)
        profile = work / "profiles" / "default" / "QGIS"
        profile.mkdir(parents=True)
        # Enabled as after "Install from ZIP"; no welcome or news panels in the picture.
        (profile / "QGIS3.ini").write_text(
            "[PythonPlugins]\nidgbr_qgis=true\n\n[qgis]\ncheckVersion=false\nallowVersionCheck=false\n"
            "showTips=false\n",
            encoding="utf-8",
        )
        sample = work / SAMPLE.name
        shutil.copy2(SAMPLE, sample)  # QGIS writes .aux.xml statistics beside the files it opens
        env = {
            **os.environ,
            "QT_QPA_PLATFORM": "xcb",  # a real (virtual) screen, not the offscreen test platform
            "QGIS_PLUGINPATH": str(REPO),
            "IDGBR_PYTHON": str(development_python()),
            "IDGBR_STATE_DIR": str(work / "state"),
            ENV_OUT: str(out),
            ENV_SAMPLE: str(sample),
        }
        command = [xvfb, "-a", "-s", f"-screen 0 {WIDTH}x{HEIGHT}x24", args.qgis, "--nologo", "--noversioncheck",
                   "--profiles-path", str(work), "--code", str(Path(__file__).resolve())]
        started = time.monotonic()
        # Own process group: on a timeout xvfb-run, Xvfb and QGIS go together (Linux tool: xvfb-run).
        process = subprocess.Popen(command, env=env, cwd=str(work), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _stop(process, work / "state")
            print(f"screenshot: QGIS did not finish within {args.timeout:.0f} s", file=sys.stderr)
            return 1
    if error_file.exists():
        print(f"screenshot: {error_file.read_text(encoding='utf-8')}", file=sys.stderr)
        error_file.unlink()
        return 1
    if not out.exists() or (before is not None and out.stat().st_mtime <= before):
        print("screenshot: QGIS ended without writing the screenshot", file=sys.stderr)
        return 1
    print(f"{out} written in {time.monotonic() - started:.0f} s")
    return 0


if os.environ.get(ENV_OUT) and "qgis.utils" in sys.modules:
    _in_qgis()
elif __name__ == "__main__":
    sys.exit(main())
