"""Build the installable plugin ZIP: `make package` → dist/idgbr_qgis-<version>.zip.

The archive holds one folder, `idgbr_qgis/`, as QGIS's Plugin Manager ("Install from ZIP") expects:
the plugin's Python code, metadata.txt and resources/ (the repo keeps both as symlinks, stored here as
real files), LICENSE, the backend source at idgbr_qgis/backend/ (for the first-run setup) and the default
weights, icons, styles and the sample image. Never caches, build leftovers or training data. Every entry
has ordinary permissions (files 0644, folders 0755) whatever the checkout's modes are, and the archive is
checked against the rules of the official QGIS plugin repository (plugins.qgis.org) that need no network.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "idgbr_qgis"

# Names never shipped, anywhere in the tree.
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".mypy_cache", "build", "dist", ".git"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp", ".tmp", ".pt", ".pth", ".ckpt", ".pkl"}
# resources/ sub-folders the plugin needs at run time; anything else there (training data) stays out.
_RESOURCE_DIRS = ("icons", "styles", "models", "sample")
# Label rasters are training data: the sample image ships for trying the plugin, its labels do not.
_SKIP_RESOURCE_GLOBS = ("*_labels.tif", "*.aux.xml")
# The official plugin repository's upload limit and the metadata it requires.
MAX_UPLOAD_BYTES = 25_000_000
REQUIRED_METADATA = ("name", "description", "version", "qgisMinimumVersion", "author", "email", "about",
                     "tracker", "repository")
URL_METADATA = ("homepage", "tracker", "repository")
# Unix modes stored in the archive: the unpacked plugin is readable by everyone, writable by its owner only.
FILE_MODE = stat.S_IFREG | 0o644
DIR_MODE = stat.S_IFDIR | 0o755
_MSDOS_DIRECTORY = 0x10


class PackageError(Exception):
    """The tree cannot be packaged; the message says what to fix."""


def plugin_version(metadata: Path) -> str:
    """The `version=` of metadata.txt."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(metadata, encoding="utf-8")
    try:
        version = parser["general"]["version"].strip()
    except KeyError as exc:
        raise PackageError(f"{metadata} has no [general] version=. Add one, e.g. version=0.1.0.") from exc
    if not version:
        raise PackageError(f"{metadata}: version= is empty. Set it, e.g. version=0.1.0.")
    return version


def _skipped(path: Path) -> bool:
    return (
        any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in path.parts)
        or path.suffix in _SKIP_SUFFIXES
        or path.name.startswith(".")
    )


def _walk(root: Path) -> Iterator[Path]:
    """Files under root (following symlinked folders), sorted for a reproducible archive."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not _skipped(path.relative_to(root)):
                yield path


def collect(repo: Path = REPO) -> dict[str, Path]:
    """Archive name → source file for everything the ZIP holds."""
    plugin = repo / PLUGIN
    if not (plugin / "__init__.py").is_file():
        raise PackageError(f"{plugin}/__init__.py is missing: the plugin cannot load without classFactory.")
    files: dict[str, Path] = {}
    for path in _walk(plugin):
        rel = path.relative_to(plugin)
        if rel.parts[0] in ("resources", "backend") or rel.name == "metadata.txt":
            continue  # added below from their real locations
        files[f"{PLUGIN}/{rel.as_posix()}"] = path
    metadata = (plugin / "metadata.txt").resolve()
    if not metadata.is_file():
        raise PackageError(f"{plugin / 'metadata.txt'} is missing or a broken link. Restore metadata.txt.")
    files[f"{PLUGIN}/metadata.txt"] = metadata
    if (repo / "LICENSE").is_file():
        files[f"{PLUGIN}/LICENSE"] = repo / "LICENSE"
    resources = (plugin / "resources").resolve()
    for sub in _RESOURCE_DIRS:
        folder = resources / sub
        if not folder.is_dir():
            continue
        for path in _walk(folder):
            if any(path.match(g) for g in _SKIP_RESOURCE_GLOBS):
                continue
            files[f"{PLUGIN}/resources/{sub}/{path.relative_to(folder).as_posix()}"] = path
    backend = repo / "backend"
    if not (backend / "pyproject.toml").is_file() or not (backend / "idgbr" / "__init__.py").is_file():
        raise PackageError(f"{backend} must hold pyproject.toml and the idgbr package.")
    files[f"{PLUGIN}/backend/pyproject.toml"] = backend / "pyproject.toml"
    if (backend / "README.md").is_file():
        # pyproject.toml names it as the readme: building the backend fails without it.
        files[f"{PLUGIN}/backend/README.md"] = backend / "README.md"
    for path in _walk(backend / "idgbr"):
        files[f"{PLUGIN}/backend/idgbr/{path.relative_to(backend / 'idgbr').as_posix()}"] = path
    return files


def check(files: dict[str, Path]) -> None:
    """Refuse a package QGIS would not load or that lacks what the plugin needs at run time."""
    needed = [f"{PLUGIN}/__init__.py", f"{PLUGIN}/metadata.txt", f"{PLUGIN}/LICENSE",
              f"{PLUGIN}/backend/pyproject.toml"]
    missing = [n for n in needed if n not in files]
    if missing:
        raise PackageError(f"The package would lack {', '.join(missing)}.")
    if not any(n.startswith(f"{PLUGIN}/resources/models/") and n.endswith(".safetensors") for n in files):
        raise PackageError(
            "No model weights in resources/models/*.safetensors: the plugin would have nothing to run. "
            "Train or copy the bundled model first (see README, 'Train your own model')."
        )
    problems = metadata_problems(files[f"{PLUGIN}/metadata.txt"])
    if problems:
        raise PackageError("metadata.txt: " + " ".join(problems))


def read_metadata(metadata: Path) -> dict[str, str]:
    """The [general] section of metadata.txt, keys as written (QGIS reads them case-sensitively)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(metadata, encoding="utf-8")
    return dict(parser["general"]) if parser.has_section("general") else {}


def metadata_problems(metadata: Path) -> list[str]:
    """What the plugin repository would refuse in metadata.txt: missing fields, links that are no web address."""
    fields = read_metadata(metadata)
    problems = [f"{key}= is missing or empty." for key in REQUIRED_METADATA if not fields.get(key, "").strip()]
    for key in URL_METADATA:
        url = fields.get(key, "").strip()
        parts = urlparse(url)
        if url and (parts.scheme not in ("http", "https") or not parts.netloc):
            problems.append(f"{key}={url} is not a web address.")
    if "/" in fields.get("author", ""):
        problems.append("author= must not contain '/'.")
    return problems


def publication_problems(archive_path: Path) -> list[str]:
    """The plugin repository's checks that need no network, applied to a built ZIP; [] when it would pass."""
    problems = []
    size = archive_path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        problems.append(f"{archive_path.name} is {size / 1e6:.1f} MB; the plugin repository accepts at most "
                        f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
    with zipfile.ZipFile(archive_path) as archive:
        names = archive.namelist()
        if archive.testzip() is not None:
            problems.append("The archive is damaged.")
    top = {n.split("/", 1)[0] for n in names}
    if top != {PLUGIN} or not PLUGIN.isidentifier():
        problems.append(f"The archive must hold exactly one folder, {PLUGIN}/, named like a Python module.")
    for name in names:
        parts = name.split("/")
        if ".." in name or name.startswith("/") or ".pyc" in name or {"__MACOSX", ".git", "__pycache__"} & set(parts):
            problems.append(f"{name} is not allowed in a plugin archive.")
    for needed in ("__init__.py", "metadata.txt", "LICENSE"):
        if f"{PLUGIN}/{needed}" not in names:
            problems.append(f"{PLUGIN}/{needed} is missing.")
    return problems


def _entry(name: str, mode: int, mtime: float) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime(max(mtime, 315532800))[:6])  # ZIP dates start in 1980
    info.create_system = 3  # Unix: the mode bits below are honoured when unpacking
    info.external_attr = mode << 16
    if stat.S_ISDIR(mode):
        info.external_attr |= _MSDOS_DIRECTORY
    return info


def folders(names: list[str]) -> list[str]:
    """Every folder above the archive names, as `a/b/` entries."""
    found = set()
    for name in names:
        parts = name.split("/")[:-1]
        found.update("/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    return sorted(found)


def build(out_dir: Path, repo: Path = REPO) -> Path:
    """Write dist/idgbr_qgis-<version>.zip atomically and return its path."""
    files = collect(repo)
    check(files)
    version = plugin_version(files[f"{PLUGIN}/metadata.txt"])
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PLUGIN}-{version}.zip"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            # Folder entries first, so that unpacking tools create them with their mode.
            stamp = files[f"{PLUGIN}/metadata.txt"].stat().st_mtime
            for name in folders(sorted(files)):
                archive.writestr(_entry(name, DIR_MODE, stamp), b"")
            for name in sorted(files):
                source = files[name]
                info = _entry(name, FILE_MODE, source.stat().st_mtime)
                # Weights do not compress; storing them keeps packaging fast.
                stored = name.endswith((".safetensors", ".tif"))
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                with open(source, "rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the package is meant to be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    try:
        target = build(args.out)
    except PackageError as exc:
        print(f"package_plugin: {exc}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(target) as archive:
        count = sum(1 for n in archive.namelist() if not n.endswith("/"))
    print(f"{target} ({count} files, {target.stat().st_size / 1e6:.1f} MB)")
    for problem in publication_problems(target):
        print(f"package_plugin: warning: plugins.qgis.org would refuse this archive: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
