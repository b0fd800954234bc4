"""Outside the QGIS window: standalone PyQGIS scripts and qgis_process use the interpreter chosen in Settings
(saved in the QGIS profile), and the environment variable IDGBR_PYTHON wins over it for one run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"
SAMPLE = REPO_ROOT / "resources" / "sample" / "dubai_sample.tif"


def _profile(root: Path, python: Path) -> Path:
    """A QGIS profile folder as QGIS leaves it after Settings… chose `python` (and the plugin is enabled)."""
    ini = root / "profiles" / "default" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[PythonPlugins]\nidgbr_qgis=true\n\n[idgbr]\npython={python.as_posix()}\n", encoding="utf-8")
    return root


def _environment(profile: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(profile), "QT_QPA_PLATFORM": "offscreen", **extra}
    if "IDGBR_PYTHON" not in extra:
        env.pop("IDGBR_PYTHON", None)
    return env


def _fake_interpreter(folder: Path, name: str) -> Path:
    path = folder / name / "python"
    path.parent.mkdir(parents=True)
    path.write_text("")  # only looked up here, never started
    return path


def _standalone_find_python(profile: Path, workdir: Path, **extra: str) -> dict:
    script = workdir / "find.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from qgis.core import QgsApplication
        app = QgsApplication([], False)
        app.initQgis()
        from idgbr_qgis import backend_process
        try:
            path, source = backend_process.find_python()
            print("RESULT " + json.dumps({{"path": str(path), "source": source}}))
        except backend_process.BackendUnavailable as exc:
            print("RESULT " + json.dumps({{"error": str(exc)}}))
    """), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], env=_environment(profile, **extra), capture_output=True,
                          text=True, timeout=300, cwd=str(workdir))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1][len("RESULT "):])


def test_a_standalone_script_uses_the_interpreter_chosen_in_settings(tmp_path):
    chosen = _fake_interpreter(tmp_path, "chosen")
    profile = _profile(tmp_path / "qgis", chosen)
    found = _standalone_find_python(profile, tmp_path)
    assert Path(found.get("path", "")) == chosen, found
    assert "setting" in found["source"]


def test_idgbr_python_wins_over_the_setting_in_a_script(tmp_path):
    profile = _profile(tmp_path / "qgis", _fake_interpreter(tmp_path, "chosen"))
    override = _fake_interpreter(tmp_path, "override")
    found = _standalone_find_python(profile, tmp_path, IDGBR_PYTHON=str(override))
    assert Path(found.get("path", "")) == override, found
    assert "IDGBR_PYTHON" in found["source"]


@pytest.mark.skipif(not Path(QGIS_PROCESS).exists(), reason="qgis_process is not installed")
def test_qgis_process_uses_the_setting_and_idgbr_python(tmp_path):
    # Interpreters that do not exist: the run stops at once with a message naming the one it would use.
    profile = _profile(tmp_path / "qgis", tmp_path / "chosen" / "python")
    override = tmp_path / "override" / "python"
    command = [QGIS_PROCESS, "run", "idgbr:segment", "--", f"INPUT={SAMPLE}", f"OUTPUT={tmp_path / 'out.tif'}"]
    runs = {
        "setting": _environment(profile, QGIS_PLUGINPATH=str(REPO_ROOT)),
        "variable": _environment(profile, QGIS_PLUGINPATH=str(REPO_ROOT), IDGBR_PYTHON=str(override)),
    }
    for case, env in runs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        expected = (tmp_path / "chosen" / "python") if case == "setting" else override
        assert f"does not exist: {expected}" in output, output
    assert not (tmp_path / "out.tif").exists()
