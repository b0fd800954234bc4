"""First-run backend setup: plan a dedicated virtual environment with PyTorch and the bundled backend.

Standard library only, so it loads inside QGIS without torch and is testable without Qt. The steps are
plain command lines; `ui/setup_dialog.py` runs them one by one with QProcess so QGIS stays responsive.
"""

from __future__ import annotations

import configparser
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

# torch publishes wheels for these CPython versions (64-bit only); the backend needs >= 3.9.
MIN_PYTHON = (3, 9)
MAX_PYTHON = (3, 13)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu121"
# Room for the download cache plus the unpacked packages (a CUDA torch is ~2.5 GB zipped, ~5 GB installed).
SPACE_CPU_BYTES = 2 * 1024**3
SPACE_CUDA_BYTES = 7 * 1024**3
PIP_FLAGS = ["--disable-pip-version-check", "--no-input"]
# Written into the environment only after its check passed: an environment without it is a leftover of a
# setup that failed or was interrupted, never a backend.
COMPLETE_MARKER = "idgbr-setup-complete.json"
# pip settings that say where packages come from (an environment variable, or a key in a pip config file).
_PIP_INDEX_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")
_PIP_INDEX_KEYS = ("index-url", "extra-index-url", "find-links", "no-index")

_WINDOWS = sys.platform.startswith("win")


class SetupError(Exception):
    """A setup problem the user can fix; the message says how."""


@dataclass(frozen=True)
class PythonInfo:
    """What a candidate interpreter is and can do."""

    path: Path
    version: tuple[int, int, int]
    bits: int
    has_venv: bool
    has_torch: bool
    has_idgbr: bool

    @property
    def version_text(self) -> str:
        return ".".join(str(v) for v in self.version)

    def incompatibility(self) -> Optional[str]:
        """Why this Python cannot run the backend, or None when it can."""
        if self.version[:2] < MIN_PYTHON or self.version[:2] > MAX_PYTHON:
            return (
                f"Python {self.version_text} at {self.path} is not supported by PyTorch "
                f"(needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} to {MAX_PYTHON[0]}.{MAX_PYTHON[1]}). "
                "Install Python 3.11 from python.org (or your package manager) and choose it with "
                "'Use an existing Python'."
            )
        if self.bits != 64:
            return (
                f"Python at {self.path} is a {self.bits}-bit build; PyTorch needs 64-bit. "
                "Install the 64-bit Python 3.11 from python.org."
            )
        return None


@dataclass(frozen=True)
class Step:
    """One command of the installation, run with the working directory left as is."""

    title: str
    program: str
    arguments: list[str]
    # Rough share of the whole installation's time, for the progress bar.
    weight: int = 1
    # A failing optional step is logged and skipped (an old pip still installs everything).
    optional: bool = False

    def command_line(self) -> str:
        return " ".join(_quote(a) for a in [self.program, *self.arguments])


@dataclass
class InstallPlan:
    """Everything the dialog needs to run and report an installation."""

    base_python: PythonInfo
    venv: Path
    python: Path
    cuda: bool
    backend_source: Path
    steps: list[Step] = field(default_factory=list)
    # True for the dedicated environment: it gets the completion marker, or is removed when the setup fails.
    dedicated: bool = False
    # Decisions worth telling the user before the log starts (where PyTorch comes from, and why).
    notes: list[str] = field(default_factory=list)

    @property
    def total_weight(self) -> int:
        return sum(s.weight for s in self.steps) or 1


@dataclass(frozen=True)
class BackendCheck:
    """The result of importing torch and idgbr in an interpreter."""

    python: Path
    torch_version: str
    cuda_available: bool
    gpu_name: str
    idgbr_version: str

    @property
    def device_text(self) -> str:
        return f"GPU ({self.gpu_name})" if self.cuda_available else "CPU"


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg


def _no_window_flags() -> int:
    # Without this every probe flashes a console window on Windows.
    return getattr(subprocess, "CREATE_NO_WINDOW", 0) if _WINDOWS else 0


# ----------------------------------------------------------------------------------------------- locations


def setup_root(profile_dir: Path) -> Path:
    """The plugin's folder inside the QGIS profile (QgsApplication.qgisSettingsDirPath())."""
    return Path(profile_dir) / "idgbr"


def venv_dir(profile_dir: Path) -> Path:
    """Where the dedicated environment lives."""
    return setup_root(profile_dir) / "venv"


def venv_python(venv: Path) -> Path:
    """The interpreter inside a virtual environment, on this platform."""
    return Path(venv) / ("Scripts/python.exe" if _WINDOWS else "bin/python")


def is_complete(venv: Path) -> bool:
    """Whether a setup finished in this environment: its interpreter exists and its check passed."""
    return (Path(venv) / COMPLETE_MARKER).is_file() and venv_python(venv).is_file()


def mark_complete(venv: Path, check: BackendCheck) -> None:
    """Record that the environment passed its check (written last, so a crash never leaves a false marker)."""
    marker = Path(venv) / COMPLETE_MARKER
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(json.dumps({
        "python": str(check.python), "torch": check.torch_version, "cuda": check.cuda_available,
        "gpu": check.gpu_name, "idgbr": check.idgbr_version,
    }), encoding="utf-8")
    os.replace(partial, marker)


def unmark(venv: Path) -> None:
    """Withdraw the marker before an environment is rebuilt: until its check passes again it is no backend."""
    with contextlib.suppress(FileNotFoundError):
        (Path(venv) / COMPLETE_MARKER).unlink()


def remove_incomplete(venv: Path) -> bool:
    """Delete an environment whose setup did not finish (a few GB); True when one was removed.

    Files that cannot be deleted (Windows keeps files in use locked) stay behind, but without the marker
    they never count as a backend, and the next setup replaces them.
    """
    venv = Path(venv)
    if not venv.exists() or is_complete(venv):
        return False
    shutil.rmtree(venv, ignore_errors=True)
    return not venv.exists()


def plugin_dir() -> Path:
    """The installed plugin folder (idgbr_qgis/)."""
    return Path(__file__).resolve().parent


def backend_source_dir(plugin: Optional[Path] = None) -> Path:
    """The bundled backend source: `<plugin>/backend` in a packaged plugin, the repo's `backend/` in a checkout."""
    plugin = Path(plugin) if plugin else plugin_dir()
    for candidate in (plugin / "backend", plugin.parent / "backend"):
        if (candidate / "pyproject.toml").is_file() and (candidate / "idgbr").is_dir():
            return candidate
    raise SetupError(
        f"The IDGBR backend source is missing from {plugin} (expected a 'backend' folder with pyproject.toml). "
        "Reinstall the plugin from its ZIP file with the Plugin Manager."
    )


# ---------------------------------------------------------------------------------------------- interpreters


def candidate_base_pythons(
    executable: Optional[str] = None,
    base_prefix: Optional[str] = None,
    prefix: Optional[str] = None,
) -> list[Path]:
    """Interpreters that may create the venv, best first, existing files only, without duplicates.

    Inside QGIS `sys.executable` is often qgis.exe (Windows) or the QGIS binary (macOS), so the Python
    that QGIS embeds is looked for beside it and under `sys.base_prefix`.
    """
    executable = executable if executable is not None else sys.executable
    base_prefix = base_prefix if base_prefix is not None else sys.base_prefix
    prefix = prefix if prefix is not None else sys.prefix
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    names = (
        ["python.exe", "python3.exe"] if _WINDOWS else [f"python{minor}", "python3", "python"]
    )
    found: list[Path] = []
    exe = Path(executable) if executable else None
    if exe and exe.name.lower().startswith("python"):
        found.append(exe)
    folders: list[Path] = []
    for root in (base_prefix, prefix):
        if root:
            folders += [Path(root), Path(root) / "bin"]
    if exe:
        # QGIS.app/Contents/MacOS/bin/python3; OSGeo4W's bin/ next to qgis-bin.exe.
        folders += [exe.parent, exe.parent / "bin"]
    for folder in folders:
        found += [folder / n for n in names]
    for name in ("python3", "python"):
        which = shutil.which(name)
        if which:
            found.append(Path(which))
    unique: list[Path] = []
    seen: set[str] = set()
    for path in found:
        key = os.path.normcase(str(path))
        if key in seen or not path.is_file():
            continue
        seen.add(key)
        unique.append(path)
    return unique


_PROBE = (
    "import importlib.util as u, json, struct, sys\n"
    "def has(m):\n"
    "    try:\n"
    "        return u.find_spec(m) is not None\n"
    "    except Exception:\n"
    "        return False\n"
    "print(json.dumps({'version': list(sys.version_info[:3]), 'bits': struct.calcsize('P') * 8,"
    " 'venv': has('venv') and has('ensurepip'), 'torch': has('torch'), 'idgbr': has('idgbr')}))\n"
)


def probe_python(path: Path, timeout: float = 30.0) -> PythonInfo:
    """Ask an interpreter what it is, without importing torch (fast)."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"No Python interpreter at {path}. Choose the python executable (python.exe on Windows).")
    env = _clean_env()
    try:
        done = subprocess.run(
            [str(path), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            creationflags=_no_window_flags(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"{path} could not be run as Python ({exc}). Choose a Python interpreter.") from exc
    if done.returncode != 0:
        raise SetupError(
            f"{path} is not a working Python interpreter: {(done.stderr or done.stdout).strip()[-300:]} "
            "Choose another one."
        )
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return PythonInfo(
            path=path,
            version=tuple(int(v) for v in data["version"]),  # type: ignore[arg-type]
            bits=int(data["bits"]),
            has_venv=bool(data["venv"]),
            has_torch=bool(data["torch"]),
            has_idgbr=bool(data["idgbr"]),
        )
    except (ValueError, KeyError, IndexError) as exc:
        raise SetupError(f"{path} did not answer like a Python interpreter. Choose another one.") from exc


def find_base_python(candidates: Optional[Iterable[Path]] = None) -> PythonInfo:
    """The first candidate that can create a venv for PyTorch; SetupError explains when there is none."""
    problems: list[str] = []
    for path in candidates if candidates is not None else candidate_base_pythons():
        try:
            info = probe_python(path)
        except SetupError as exc:
            problems.append(str(exc))
            continue
        why = info.incompatibility()
        if why:
            problems.append(why)
            continue
        if not info.has_venv:
            problems.append(
                f"Python {info.version_text} at {path} lacks the venv/ensurepip modules "
                "(on Debian/Ubuntu: apt install python3-venv)."
            )
            continue
        return info
    detail = " ".join(problems[:3]) if problems else "No Python interpreter was found next to QGIS or on PATH."
    raise SetupError(
        f"No compatible Python to create the IDGBR environment. {detail} "
        "Install Python 3.11 (64-bit) from python.org, then choose it with 'Use an existing Python', "
        "or retry the setup."
    )


def _clean_env() -> dict[str, str]:
    """The environment for child Pythons: QGIS's PYTHONHOME/PYTHONPATH would make them load QGIS's stdlib."""
    env = dict(os.environ)
    for key in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__"):
        env.pop(key, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONUTF8"] = "1"
    return env


def child_environment(proxy_url: Optional[str] = None) -> dict[str, str]:
    """Environment for the setup's commands; QGIS's proxy (when set) is passed to pip through the environment."""
    env = _clean_env()
    if proxy_url:
        # In the environment, not on the command line, where a password would show in the process list.
        env["HTTP_PROXY"] = env["HTTPS_PROXY"] = proxy_url
        env["http_proxy"] = env["https_proxy"] = proxy_url
    return env


# ------------------------------------------------------------------------------------------- package index


def pip_config_files(env: Optional[Mapping[str, str]] = None) -> list[Path]:
    """The pip configuration files pip would read on this platform (existing or not), as pip looks for them."""
    env = os.environ if env is None else env
    chosen = env.get("PIP_CONFIG_FILE", "")
    if chosen == os.devnull:
        return []  # pip reads no configuration file at all then
    home = Path(env.get("USERPROFILE" if _WINDOWS else "HOME") or Path.home())
    if _WINDOWS:
        global_files = [Path(env.get("PROGRAMDATA") or r"C:\ProgramData") / "pip" / "pip.ini"]
        user_files = [home / "pip" / "pip.ini"]
        if env.get("APPDATA"):
            user_files.append(Path(env["APPDATA"]) / "pip" / "pip.ini")
    else:
        dirs = (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep)
        global_files = [Path(d) / "pip" / "pip.conf" for d in dirs if d] + [Path("/etc/pip.conf")]
        config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        user_files = [home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf"]
        if sys.platform == "darwin":
            global_files.append(Path("/Library/Application Support/pip/pip.conf"))
            user_files.append(home / "Library" / "Application Support" / "pip" / "pip.conf")
    if chosen and Path(chosen).exists():
        user_files = []  # an existing PIP_CONFIG_FILE replaces the user's own file
    return global_files + user_files + ([Path(chosen)] if chosen else [])


def user_index_source(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Where the user's pip settings name a package index or wheel folder (a variable or a file), else None.

    Such a setting is the user's (an offline mirror, a company proxy's index): the setup must keep it.
    """
    env = os.environ if env is None else env
    for key in _PIP_INDEX_ENV:
        if env.get(key, "").strip():
            return key
    for path in pip_config_files(env):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # pip itself reports an unreadable file; it names no index we could keep
        for section in ("global", "install"):
            if not parser.has_section(section):
                continue
            keys = {k.replace("_", "-") for k, v in parser.items(section) if v.strip()}
            if keys.intersection(_PIP_INDEX_KEYS):
                return str(path)
    return None


def index_reachable(url: str, proxy_url: Optional[str] = None, timeout: float = 5.0) -> bool:
    """Whether a package index answers for torch within `timeout` s.

    Checked before planning: pip retries an unreachable index for minutes, once per package.
    """
    proxies = {"http": proxy_url, "https": proxy_url} if proxy_url else urllib.request.getproxies()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    request = urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD")
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status) < 400
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False


def torch_index(cuda: bool) -> Optional[str]:
    """PyTorch's own index for the chosen build; None where the default index has the right build already."""
    if cuda:
        return TORCH_CUDA_INDEX
    # PyPI's Linux torch is the multi-GB CUDA build; PyTorch's CPU index has the small one.
    # (macOS wheels on PyPI are CPU/MPS builds already.)
    return None if sys.platform == "darwin" else TORCH_CPU_INDEX


# ------------------------------------------------------------------------------------------------- planning


def has_nvidia_gpu(timeout: float = 10.0) -> bool:
    """True when `nvidia-smi` exists and lists a GPU (then the CUDA build of torch is worth installing)."""
    smi = shutil.which("nvidia-smi")
    if not smi and _WINDOWS:
        default = Path(os.environ.get("SYSTEMROOT", r"C:\Windows")) / "System32" / "nvidia-smi.exe"
        smi = str(default) if default.is_file() else None
    if not smi:
        return False
    try:
        done = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=timeout, creationflags=_no_window_flags()
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def backend_requirements(backend_source: Path) -> list[str]:
    """The backend's dependencies from its pyproject.toml, torch excluded (it comes from PyTorch's index)."""
    text = (Path(backend_source) / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    if not match:
        raise SetupError(
            f"{backend_source / 'pyproject.toml'} has no dependency list. Reinstall the plugin from its ZIP file."
        )
    body = "\n".join(line.split("#", 1)[0] for line in match.group(1).splitlines())
    requirements = re.findall(r'"([^"]+)"|\'([^\']+)\'', body)
    names = [a or b for a, b in requirements]
    return [r for r in names if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() != "torch"]


def required_space(cuda: bool) -> int:
    return SPACE_CUDA_BYTES if cuda else SPACE_CPU_BYTES


def check_disk_space(folder: Path, cuda: bool) -> None:
    """Fail early with a clear message instead of half way through a 2 GB download."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(str(probe)).free
    need = required_space(cuda)
    if free < need:
        raise SetupError(
            f"Not enough disk space for the IDGBR environment in {folder}: {free / 1024**3:.1f} GB free, "
            f"about {need / 1024**3:.0f} GB needed. Free some space on that drive and retry."
        )


def plan_install(
    base: PythonInfo,
    venv: Path,
    backend_source: Path,
    cuda: bool,
    reuse_venv: bool = False,
    index_url: str = "",
    proxy_url: Optional[str] = None,
) -> InstallPlan:
    """The commands that build the environment: venv, pip, torch, the backend's dependencies, the backend.

    torch is installed first (CPU or CUDA build), then the backend's other libraries, then the backend
    itself with `--no-deps`, so pip cannot swap that torch for another build. Where packages come from:

    - `index_url` (the Settings' package index, e.g. a company mirror): every package, from there only;
    - else PyTorch's own index for torch, when it answers: in place of the default index, or added to it
      when the user's pip settings name an index (never overriding them);
    - else the default index (pip's configuration, or PyPI).
    """
    why = base.incompatibility()
    if why:
        raise SetupError(why)
    venv = Path(venv)
    python = venv_python(venv)
    py = str(python)
    notes: list[str] = []
    index_args = ["--index-url", index_url] if index_url else []
    torch_args = ["-m", "pip", "install", *PIP_FLAGS, *index_args, "torch"]
    pytorch = None if index_url else torch_index(cuda)
    if index_url:
        notes.append(f"Packages come from the package index set in Settings: {index_url}")
    elif pytorch:
        user_index = user_index_source()
        if not index_reachable(pytorch, proxy_url):
            notes.append(f"PyTorch's package index {pytorch} cannot be reached: PyTorch comes from the default "
                         "package index instead, whose build may differ from the one chosen.")
        elif user_index:
            torch_args += ["--extra-index-url", pytorch]
            notes.append(f"Your pip settings name a package index ({user_index}): they are kept, and PyTorch's "
                         f"index {pytorch} is only added.")
        else:
            torch_args += ["--index-url", pytorch]
    steps: list[Step] = []
    if not reuse_venv:
        steps.append(
            Step("Creating the virtual environment", str(base.path), ["-m", "venv", "--clear", str(venv)], 1)
        )
    steps.append(
        Step("Updating pip", py, ["-m", "pip", "install", *PIP_FLAGS, *index_args, "--upgrade", "pip"], 1,
             optional=True)
    )
    steps.append(Step("Installing PyTorch (" + ("CUDA build" if cuda else "CPU build") + ")", py, torch_args, 8))
    requirements = backend_requirements(backend_source)
    if requirements:
        steps.append(Step("Installing the backend's libraries", py,
                          ["-m", "pip", "install", *PIP_FLAGS, *index_args, *requirements], 4))
    steps.append(_backend_step(py, backend_source, index_args))
    steps.append(Step("Checking the backend", py, verify_arguments(), 1))
    return InstallPlan(base_python=base, venv=venv, python=python, cuda=cuda, backend_source=backend_source,
                       steps=steps, dedicated=True, notes=notes)


def _backend_step(python: str, backend_source: Path, index_args: Sequence[str] = ()) -> Step:
    # Editable: the backend then runs from the plugin folder, so it finds the bundled weights in
    # <plugin>/resources/models and follows plugin upgrades without a reinstall. The index arguments matter
    # here too: pip fetches the build backend (setuptools) from an index.
    return Step(
        "Installing the IDGBR backend",
        python,
        ["-m", "pip", "install", *PIP_FLAGS, *index_args, "--no-deps", "--upgrade", "--editable",
         str(backend_source)],
        1,
    )


def plan_backend_into(python: PythonInfo, backend_source: Path, index_url: str = "") -> InstallPlan:
    """Install only the backend into an existing Python that already has torch (keeps that torch)."""
    py = str(python.path)
    index_args = ["--index-url", index_url] if index_url else []
    steps = [
        Step(
            "Installing the backend's libraries",
            py,
            ["-m", "pip", "install", *PIP_FLAGS, *index_args, *backend_requirements(backend_source)],
            4,
        ),
        _backend_step(py, backend_source, index_args),
        Step("Checking the backend", py, verify_arguments(), 1),
    ]
    return InstallPlan(base_python=python, venv=python.path.parent, python=python.path, cuda=False,
                       backend_source=backend_source, steps=steps)


# ------------------------------------------------------------------------------------------------ checking

_VERIFY = (
    "import json, torch, idgbr\n"
    "cuda = bool(torch.cuda.is_available())\n"
    "print('IDGBR-CHECK ' + json.dumps({'torch': torch.__version__, 'cuda': cuda,"
    " 'gpu': torch.cuda.get_device_name(0) if cuda else '',"
    " 'idgbr': getattr(idgbr, '__version__', '?')}))\n"
)


def verify_arguments() -> list[str]:
    """Arguments that make a Python print one `IDGBR-CHECK {json}` line: torch version, CUDA, GPU name."""
    return ["-c", _VERIFY]


def parse_verify_output(python: Path, output: str) -> BackendCheck:
    """Read the line printed by `verify_arguments()`; SetupError with the reason when it is missing."""
    for line in reversed(output.splitlines()):
        if line.startswith("IDGBR-CHECK "):
            data = json.loads(line[len("IDGBR-CHECK "):])
            return BackendCheck(
                python=Path(python),
                torch_version=str(data["torch"]),
                cuda_available=bool(data["cuda"]),
                gpu_name=str(data["gpu"]),
                idgbr_version=str(data["idgbr"]),
            )
    if "No module named 'torch'" in output:
        raise SetupError(
            f"{python} has no PyTorch. Use 'Set up backend' to create a dedicated environment, "
            "or choose a Python where 'import torch' works."
        )
    if "No module named 'idgbr'" in output:
        raise SetupError(
            f"{python} has PyTorch but not the IDGBR backend. Use 'Set up backend' and choose "
            "'Use an existing Python' to install it there."
        )
    raise SetupError(f"{python} could not load PyTorch and the IDGBR backend: {explain_output_tail(output)}")


def check_backend(python: Path, timeout: float = 180.0) -> BackendCheck:
    """Import torch and idgbr in `python` (blocking: call it from a worker thread, not the Qt main thread)."""
    try:
        done = subprocess.run(
            [str(python), *verify_arguments()],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            creationflags=_no_window_flags(),
        )
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{python} took over {timeout:.0f} s to import PyTorch. Retry; if it persists, "
                         "check that antivirus software is not scanning the environment.") from exc
    except OSError as exc:
        raise SetupError(f"{python} could not be run ({exc}). Choose a Python interpreter.") from exc
    return parse_verify_output(Path(python), done.stdout + "\n" + done.stderr)


def explain_output_tail(output: str, lines: int = 3) -> str:
    tail = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    return " | ".join(tail[-lines:]) if tail else "no output"


# ------------------------------------------------------------------------------------------------- failures

# Checked in order: the first match explains the failure. Patterns come from pip's and Python's messages.
_FAILURES: Sequence[tuple[str, str]] = (
    (
        r"No space left on device|Errno 28|not enough space on the disk|WinError 112",
        "The disk is full. Free a few GB on the drive that holds your QGIS profile and retry.",
    ),
    (
        r"ProxyError|407 Proxy Authentication|Cannot connect to proxy|Tunnel connection failed",
        "The proxy refused the connection. Set the proxy (with user and password if needed) in QGIS under "
        "Settings › Options › Network, or set HTTPS_PROXY, then retry.",
    ),
    (
        r"CERTIFICATE_VERIFY_FAILED|SSLError|SSL: |certificate verify failed",
        "Secure connections to the package index are blocked (often a company proxy that inspects HTTPS). "
        "Ask your IT for the proxy's certificate and set PIP_CERT to it, or install on another network.",
    ),
    (
        r"Failed to establish a new connection|Name or service not known|Temporary failure in name resolution|"
        r"getaddrinfo failed|Network is unreachable|Max retries exceeded|Read timed out|ConnectTimeout|"
        r"No connection could be made",
        "The package index could not be reached. Check the internet connection (and the proxy in QGIS's "
        "Settings › Options › Network), then retry. Where packages come from a mirror of your organisation, "
        "enter its address as the package index in Plugins ▸ IDGBR ▸ Settings…. Without internet, choose an "
        "existing Python that has PyTorch with 'Use an existing Python'.",
    ),
    (
        r"No matching distribution found for torch|Requires-Python|requires a different Python|"
        r"is not a supported wheel on this platform",
        "No PyTorch build was found for this Python: either PyTorch has none for this Python version or "
        "platform (then install Python 3.11 64-bit from python.org and choose it with 'Use an existing "
        "Python'), or the index could not be reached (check the internet connection and QGIS's proxy in "
        "Settings › Options › Network, then retry).",
    ),
    (
        r"No matching distribution found|Could not find a version that satisfies",
        "A required package could not be found. Check the internet connection and proxy settings, then retry.",
    ),
    (
        r"externally-managed-environment",
        "This Python is managed by the operating system and refuses pip installs. Choose 'Create a dedicated "
        "environment' instead.",
    ),
    (
        r"Permission denied|Access is denied|WinError 5|WinError 32",
        "A file could not be written (permissions, a file in use, or antivirus software). Close other "
        "programs using the environment, allow the folder in your antivirus, and retry.",
    ),
    (
        r"No module named (venv|ensurepip)|ensurepip is not available|python3-venv",
        "This Python cannot create virtual environments. On Debian/Ubuntu install python3-venv; elsewhere "
        "install Python 3.11 from python.org and choose it with 'Use an existing Python'.",
    ),
)


def explain_failure(log: str, exit_code: Optional[int] = None) -> str:
    """What to do after a failed step, from the text the step printed."""
    for pattern, advice in _FAILURES:
        if re.search(pattern, log, re.I):
            return advice
    code = f" (exit code {exit_code})" if exit_code is not None else ""
    return (
        f"The step failed{code}: {explain_output_tail(log)}. Read the log above; retry, or choose an existing "
        "Python with PyTorch with 'Use an existing Python'."
    )
