"""`idgbr batch`: many rasters, one output each in a folder, and a summary of them all (JSON and a text table).

Rasters run one after another on this computer, or side by side on a Dask cluster (``--workers`` /
``--scheduler``, ``idgbr.distributed.Cluster``), one raster per task; there each worker writes its raster's
output itself, atomically like any run. An output that exists is kept unless --overwrite; a raster that fails
is reported and the others go on; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import Cancelled, IdgbrError
from .limits import MODES
from .raster.io import FILE_MODE

log = logging.getLogger("idgbr")

RASTER_SUFFIXES = (".tif", ".tiff")  # the files taken from a folder given as INPUT
OUTPUT_SUFFIX = {"refine": "_refined.tif", "segment": "_segmented.tif"}
SUMMARY_JSON = "batch_summary.json"
SUMMARY_TEXT = "batch_summary.txt"
CANCEL_GRACE_S = 10.0  # after Ctrl-C, how long rasters running on a cluster get to stop and clean up
WATCH_S = 0.5  # how often a raster on a worker looks for the batch's cancel


@dataclass
class Item:
    """One raster of the batch and what became of it."""

    input: Path
    output: Path
    status: str = "pending"  # done | skipped | failed | cancelled
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    classes: dict[str, int] = field(default_factory=dict)  # written pixels per class name
    error: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input"], data["output"] = str(self.input), str(self.output)
        return data


# ------------------------------------------------------------------------------------------------------------
# Which rasters, which outputs
# ------------------------------------------------------------------------------------------------------------

def collect_inputs(paths: list[Path]) -> list[Path]:
    """The rasters of the batch: files as given, and the GeoTIFFs directly inside folders (sorted by name,
    hidden files left out), each once."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir()
                            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in RASTER_SUFFIXES)
            if not inside:
                raise IdgbrError(f"The folder {path} holds no GeoTIFFs (*.tif, *.tiff). Give rasters or folders "
                                 "of GeoTIFFs as INPUT.")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise IdgbrError(f"INPUT not found: {path}. Check the path (and the working folder).")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def plan(inputs: list[Path], output_dir: Path, mode: str) -> list[Item]:
    """An item per raster, its output ``<name>_refined.tif`` (or ``_segmented.tif``) in ``output_dir``. A raster
    that is another's output (a folder holding an earlier batch's results) is left out."""
    items = [Item(path, output_dir / f"{path.stem}{OUTPUT_SUFFIX[mode]}") for path in inputs]
    outputs = {item.output.resolve() for item in items}
    items = [item for item in items if item.input.resolve() not in outputs]
    seen: dict[Path, Path] = {}
    for item in items:
        other = seen.setdefault(item.output.resolve(), item.input)
        if other is not item.input:
            raise IdgbrError(f"{other} and {item.input} would both be written to {item.output}. Rename one of them "
                             "or run them in two batches with different --output-dir.")
    if not items:
        raise IdgbrError("Every INPUT is the output of another one; give the rasters to process.")
    return items


# ------------------------------------------------------------------------------------------------------------
# Running one raster (here or on a worker)
# ------------------------------------------------------------------------------------------------------------

def run_one(fields: dict, cancel: threading.Event | None = None, progress: Any = None) -> dict:
    """Run one raster with ``RunOptions(**fields)``: the item's results as a dict, errors included."""
    from .pipeline import RunOptions, run

    started = time.perf_counter()
    try:
        result = run(RunOptions(**fields), progress=progress, cancel=cancel)
    except Cancelled:
        return {"status": "cancelled", "seconds": time.perf_counter() - started}
    except IdgbrError as exc:
        return {"status": "failed", "error": str(exc), "seconds": time.perf_counter() - started}
    except Exception as exc:  # noqa: BLE001 - one raster's crash must not stop the batch; it is reported
        log.debug("raster failed", exc_info=True)
        return {"status": "failed", "error": f"internal error ({type(exc).__name__}: {exc})",
                "seconds": time.perf_counter() - started}
    names = {int(c["id"]): str(c["name"]) for c in result.classes}
    return {"status": "done", "width": result.width, "height": result.height, "seconds": result.seconds,
            "classes": {names.get(k, str(k)): n for k, n in sorted(result.class_pixels.items())}}


def run_on_worker(fields: dict, threads: int | None, cancel_name: str) -> dict:
    """``run_one`` as a Dask task: stops like Ctrl-C when the batch's cancel event (``cancel_name``) is set."""
    import distributed

    from .distributed import _set_threads

    _set_threads(threads)
    cancel, finished = threading.Event(), threading.Event()
    event = distributed.Event(cancel_name, client=distributed.get_client())

    def watch() -> None:
        while not finished.is_set():
            with contextlib.suppress(Exception):  # a lost scheduler: the run goes on, nothing to stop it for
                if event.wait(timeout=WATCH_S):
                    cancel.set()
                    return

    watcher = threading.Thread(target=watch, name="idgbr-batch-cancel", daemon=True)
    watcher.start()
    try:
        return run_one(fields, cancel)
    finally:
        finished.set()


def _apply(item: Item, answer: dict) -> None:
    item.status = answer["status"]
    item.error = answer.get("error")
    item.seconds = answer.get("seconds")
    item.width, item.height = answer.get("width"), answer.get("height")
    item.classes = answer.get("classes", {})


# ------------------------------------------------------------------------------------------------------------
# The batch
# ------------------------------------------------------------------------------------------------------------

def _report(index: int, total: int, item: Item) -> None:
    what = {"done": f"done in {item.seconds or 0:.1f} s", "skipped": "skipped (its output exists; --overwrite "
            "redoes it)", "cancelled": "cancelled", "failed": f"failed: {item.error}"}[item.status]
    log.info(f"[{index}/{total}] {item.input.name}: {what}")


def run_here(items: list[Item], fields: dict, quiet: bool) -> None:
    from .cli import TerminalProgress

    for n, item in enumerate(items, 1):
        bar = None if quiet or not sys.stderr.isatty() else TerminalProgress(sys.stderr)
        try:
            _apply(item, run_one({**fields, "input": item.input, "output": item.output}, progress=bar))
        finally:
            if bar is not None:
                bar.close()
        _report(n, len(items), item)


def run_on_cluster(items: list[Item], fields: dict, cluster: Any) -> None:
    import distributed

    from .model_bundle import resolve_model_path

    model = resolve_model_path(fields.get("model")).absolute()
    cluster.check_workers([item.input.absolute() for item in items], [items[0].output.parent.absolute()], model,
                          fields.get("device", "auto"), fields.get("precision"))
    client = cluster.client
    batch_id = uuid.uuid4().hex[:12]
    cancel_name = f"idgbr-batch-{batch_id}"
    futures = {}
    for n, item in enumerate(items):
        task = {**fields, "input": item.input.absolute(), "output": item.output.absolute()}
        # One try per raster: run_on_worker never raises for a raster that fails, and Dask itself runs the task
        # of a lost worker again.
        future = client.submit(run_on_worker, task, cluster.threads, cancel_name, key=f"idgbr-batch-{batch_id}-{n}",
                               pure=False)
        futures[future] = item
    done = 0
    try:
        for future in distributed.as_completed(list(futures), loop=client.loop):
            item = futures[future]
            try:
                _apply(item, future.result())
            except Exception as exc:  # noqa: BLE001 - workers dying again and again on it, a lost scheduler
                item.status, item.error = "failed", f"on {cluster.where}: {type(exc).__name__}: {exc}"
            done += 1
            _report(done, len(items), item)
    except BaseException:
        running = [f for f, item in futures.items() if item.status == "pending"]
        with contextlib.suppress(Exception):
            distributed.Event(cancel_name, client=client).set()
            distributed.wait(running, timeout=CANCEL_GRACE_S)  # they remove their temporary files
        with contextlib.suppress(Exception):
            client.cancel(running)
        raise


def write_summary(output_dir: Path, items: list[Item], mode: str, seconds: float) -> tuple[Path, Path]:
    """``batch_summary.json`` and ``batch_summary.txt`` in ``output_dir``, each written whole or not at all."""
    counts = {status: sum(item.status == status for item in items)
              for status in ("done", "skipped", "failed", "cancelled")}
    finished = datetime.datetime.now().isoformat(timespec="seconds")
    data = {"mode": mode, "output_dir": str(output_dir), "finished": finished, "seconds": round(seconds, 2),
            "counts": counts, "rasters": [item.to_dict() for item in items]}
    paths = (output_dir / SUMMARY_JSON, output_dir / SUMMARY_TEXT)
    for path, text in zip(paths, (json.dumps(data, indent=2) + "\n", summary_table(items, counts))):
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=output_dir)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(name, FILE_MODE)  # the usual permissions of a file the user writes, not mkstemp's 0600
            os.replace(name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
    return paths


def _classes_text(classes: dict[str, int]) -> str:
    total = sum(classes.values())
    if not total:
        return ""
    shares = sorted(classes.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in shares)


def summary_table(items: list[Item], counts: dict[str, int]) -> str:
    rows = [("raster", "size", "seconds", "classes", "status", "error")]
    for item in items:
        size = f"{item.width} x {item.height}" if item.width is not None else ""
        seconds = f"{item.seconds:.1f}" if item.seconds is not None else ""
        rows.append((item.input.name, size, seconds, _classes_text(item.classes), item.status,
                     (item.error or "").replace("\n", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines = [line.rstrip() for line in lines]
    lines.append("")
    lines.append(", ".join(f"{n} {status}" for status, n in counts.items()) + ".")
    return "\n".join(lines) + "\n"


def batch_command(args: argparse.Namespace) -> int:
    from .cli import EXIT_CANCELLED, EXIT_ERROR, Stopped, cluster_from, model_fields, stop_signals_like_ctrl_c

    fields = {"mode": args.mode, **model_fields(args)}
    cluster = cluster_from(args)
    output_dir: Path = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise IdgbrError(f"--output-dir is a file: {output_dir}. Give a folder (it is created if missing).")
    items = plan(collect_inputs(args.inputs), output_dir, args.mode)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdgbrError(f"Cannot create the output folder {output_dir} ({exc.strerror or exc}). Choose a folder "
                         "you can write to.") from exc
    for item in items:
        if item.output.exists() and not args.overwrite:
            item.status = "skipped"
            with contextlib.suppress(Exception):
                import rasterio

                with rasterio.open(item.output) as done:
                    item.width, item.height = done.width, done.height
    todo = [item for item in items if item.status == "pending"]
    started = time.perf_counter()
    interrupted: BaseException | None = None
    try:
        with stop_signals_like_ctrl_c():
            if todo and cluster is not None:
                with cluster:
                    run_on_cluster(todo, fields, cluster)
            elif todo:
                run_here(todo, fields, args.quiet)
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:
        for item in items:
            if item.status == "pending":
                item.status = "cancelled"
        summary = write_summary(output_dir, items, args.mode, time.perf_counter() - started)
    failed = sum(item.status == "failed" for item in items)
    if not args.quiet:
        print(summary_table(items, {s: sum(i.status == s for i in items)
                                    for s in ("done", "skipped", "failed", "cancelled")}), end="")
        print(f"Summary: {summary[0]} and {summary[1]}.")
    if interrupted is not None:
        signum = interrupted.signum if isinstance(interrupted, Stopped) else None
        print(f"idgbr: {'stopped' if signum else 'interrupted'}; the rasters finished before are kept, the ones "
              "cancelled left no output.", file=sys.stderr)
        return 128 + signum if signum else EXIT_CANCELLED
    return EXIT_ERROR if failed else 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from .cli import add_cluster_arguments, add_model_arguments

    parser = subparsers.add_parser(
        "batch", help="refine or segment many rasters into a folder, with a summary",
        description="Run every INPUT raster (files, or folders of GeoTIFFs) into --output-dir, one output per "
                    "raster (NAME_refined.tif or NAME_segmented.tif). Outputs that exist are kept unless "
                    "--overwrite; a raster that fails does not stop the others. Writes batch_summary.json and "
                    "batch_summary.txt to the folder; exits with 1 when any raster failed.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="a raster, or a folder whose GeoTIFFs (*.tif, *.tiff) are all taken")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                        help="folder for the outputs and the summary (created if missing)")
    parser.add_argument("--mode", choices=MODES, default="refine",
                        help="refine (default): coarse segmentation then refinement; segment: the coarse "
                             "segmenter alone")
    parser.add_argument("--overwrite", action="store_true", help="run rasters whose output exists again")
    add_model_arguments(parser, refine=True)
    add_cluster_arguments(parser, "the rasters run side by side on a Dask cluster, one per worker task; the "
                                  "workers write the outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, no table; the summary files only")
    parser.set_defaults(func=batch_command)
