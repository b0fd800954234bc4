"""Runs on a Dask cluster (``dask.distributed``): the tiles of one run spread over workers (``DaskPasses``), and
the cluster itself (``Cluster``: a local one of N worker processes, or an existing one by its scheduler's
address). ``idgbr.batch`` also uses ``Cluster`` to spread whole rasters.

A pass of the tile engine over a grid becomes tasks, one per part: a range of output rows times a column
block. Each task opens INPUT (and the coarse map) on its worker, builds the same tile engine for its part
(``Engine(rows=..., block=...)``) and returns the part's finished rows in memory; this process writes them
through the run's own writers, part after part in order, with a bounded number of parts in flight. A part's
rows are bit for bit those of the whole run (raster/engine.py), and the passes at other resolutions, the
temporary coarse map and the writers are those of ``pipeline._process``, so the output is the single-process
one. The networks' float results depend on torch's thread count, so "the same" means: as a run here with
as many torch threads as each worker has (e.g. ``OMP_NUM_THREADS=1 idgbr refine ...`` for workers of one).

Tasks are pure: they read the rasters and return values, write nothing, and can run again anywhere; Dask
runs a lost worker's tasks again on another one. Errors the user can fix come back as values, not
exceptions, so Dask does not run a task again only to fail the same way.

Workers must have this backend installed (same version) and see INPUT, the coarse map, the model file and
the output's folder at the same paths as this computer (the temporary coarse map of a run at two
resolutions lies beside OUTPUT).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rasterio.windows import Window

from . import __version__
from .errors import Cancelled, IdgbrError
from .raster.engine import Engine, EngineConfig, EngineStats, RowCollector, RowWriter, replay, work_units
from .raster.windows import OUTPUT_BLOCK, TileGrid, column_blocks

if TYPE_CHECKING:
    import torch

    from .pipeline import PassCoarse, RunOptions
    from .raster.bands import PixelScaler
    from .raster.resample import VirtualGrid

log = logging.getLogger("idgbr")

ROW_ALIGN = OUTPUT_BLOCK  # parts start on GeoTIFF block rows, so the output's blocks are written whole
TASK_TILE_ROWS = 8  # tile rows per part: fewer repeat more tiles at part edges, more hold more rows per result
IN_FLIGHT_PER_WORKER = 2  # parts submitted per worker thread ahead of the one being written: bounds memory
TASK_RETRIES = 2  # a task that raises (not a user error) runs again this often before the run fails
CONNECT_TIMEOUT_S = 10.0  # for the scheduler to answer
WORKERS_TIMEOUT_S = 30.0  # for an existing scheduler to have at least one worker
POLL_S = 0.25  # how often a wait for results looks at the cancel event
THREADS_ENV = "IDGBR_TORCH_THREADS"  # on a worker: torch threads per task (default: its cores / its Dask threads)
# Test hook: "once:PATH" makes the first task that can create PATH kill its worker process, "always" every task,
# so tests can check that a lost worker's parts run again and that a part that keeps killing workers fails.
KILL_ENV = "IDGBR_TEST_KILL_WORKER"
NANNY_ENV = "distributed.nanny.pre-spawn-environ"  # variables Dask sets in the worker processes it starts

_MODEL_CACHE: dict[tuple, Any] = {}  # on a worker: the last model loaded, for the next tasks
_MODEL_LOCK = threading.Lock()


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise IdgbrError("--workers and --scheduler need Dask in the backend's environment: install it with "
                         "pip install 'idgbr[distributed]' (the packages dask and distributed).") from exc
    return distributed


# ------------------------------------------------------------------------------------------------------------
# On the workers
# ------------------------------------------------------------------------------------------------------------

def _torch_threads(requested: int | None) -> int:
    """Torch threads for a task: as asked, else $IDGBR_TORCH_THREADS, else the cores shared by the worker's
    Dask threads (Dask sets OMP_NUM_THREADS=1 in its workers, so torch would use one core)."""
    if requested:
        return requested
    env = os.environ.get(THREADS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    nthreads = 1
    with contextlib.suppress(Exception):  # not inside a worker: one task at a time
        from distributed import get_worker

        worker = get_worker()
        nthreads = int(getattr(getattr(worker, "state", worker), "nthreads", 1) or 1)
    return max(1, (os.cpu_count() or 1) // nthreads)


def _set_threads(requested: int | None) -> None:
    import torch

    threads = _torch_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _model(path: str, device: str) -> Any:
    """The model on this worker, loaded once and kept for the next tasks (a new file or device replaces it)."""
    from . import pipeline

    try:
        stat = Path(path).stat()
        key: tuple = (path, device, stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = (path, device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = pipeline.load_bundle(path, device)
        return _MODEL_CACHE[key]


def _kill_hook() -> None:
    value = os.environ.get(KILL_ENV, "")
    if value == "always":
        os._exit(70)
    if value.startswith("once:"):
        try:
            os.close(os.open(value[5:], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(70)


def _sha256(path: str) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def probe_worker(request: dict) -> dict:
    """Run on every worker before a job: what it can see and which device and precision it would use."""
    from .model_bundle import select_device
    from .precision import resolve_precision

    answer: dict[str, Any] = {"version": __version__, "cores": os.cpu_count() or 1,
                              "threads": _torch_threads(request.get("threads"))}
    answer["missing"] = [p for p in request["paths"] if not Path(p).exists()]
    answer["missing"] += [p for p in request["folders"] if not Path(p).is_dir()]
    answer["model"] = _sha256(request["model"])
    answer["trim_threshold"] = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    try:
        device = select_device(request["device"])
        answer["device"] = device.type
        answer["precision"] = resolve_precision(request["precision"], device)
    except IdgbrError as exc:
        answer["error"] = str(exc)
    return answer


@dataclass(frozen=True)
class PartSpec:
    """What a worker needs to build the tile engine of a pass: all plain values."""

    input: str
    window: tuple[int, int, int, int]  # INPUT's processed window: col_off, row_off, width, height
    grid: tuple[int, int] | None  # the pass's grid, (width, height) of a VirtualGrid over the window; None: INPUT's
    coarse: str | None  # the class-id map the refine pass reads (None: the model's coarse pass)
    coarse_own: tuple[int, int] | None  # the grid that map is on, (width, height) over the window; None: INPUT's
    bands: list[int]
    scaler: PixelScaler
    masked: bool
    config: EngineConfig
    model: str
    device: str
    threads: int | None  # torch threads per task; None: the worker's share of its cores
    confidence: bool


@dataclass
class PartResult:
    writes: list = field(default_factory=list)  # (values, row, col) of the class ids, in order
    confidence: list | None = None  # the same for the confidence
    stats: EngineStats | None = None
    error: str | None = None  # an IdgbrError's message (the task did not fail: see the module's docstring)
    parameter: str | None = None


def run_part(spec: PartSpec, rows: tuple[int, int], block: int) -> PartResult:
    """One part of a pass on a worker: output rows ``rows`` of column block ``block``."""
    from .raster.io import CoarseSource, gdal_env, open_raster
    from .raster.resample import GridCoarse, VirtualGrid

    _kill_hook()
    _set_threads(spec.threads)
    try:
        bundle = _model(spec.model, spec.device)
        with gdal_env(), contextlib.ExitStack() as stack:
            src = stack.enter_context(open_raster(Path(spec.input)))
            window = Window(*spec.window)
            grid = VirtualGrid(src, window, *spec.grid) if spec.grid is not None else None
            coarse: CoarseSource | GridCoarse | None = None
            if spec.coarse is not None:
                own = VirtualGrid(src, window, *spec.coarse_own) if spec.coarse_own is not None else None
                source = CoarseSource(Path(spec.coarse), own if own is not None else src, bundle.card.num_classes)
                stack.callback(source.close)
                coarse = source if grid is None else GridCoarse(source, own, grid)
            out = RowCollector()
            confidence = RowCollector() if spec.confidence else None
            engine = Engine(bundle, grid if grid is not None else src,
                            Window(0, 0, grid.width, grid.height) if grid is not None else window, spec.bands,
                            spec.scaler, spec.masked, coarse, spec.config, out, confidence_writer=confidence,
                            rows=rows, block=block)
            stats = engine.run()
        return PartResult(out.writes, confidence.writes if confidence is not None else None, stats)
    except IdgbrError as exc:
        return PartResult(error=str(exc), parameter=exc.parameter)


def _ignore_ctrl_c_plugin(distributed: Any) -> Any:
    """A worker plugin that makes local worker processes ignore Ctrl-C: the terminal sends it to them too, and
    this process stops them itself (each would print a traceback otherwise)."""

    class IgnoreCtrlC(distributed.WorkerPlugin):
        name = "idgbr-ignore-ctrl-c"

        def setup(self, worker: Any) -> None:
            with contextlib.suppress(ValueError):  # signals are set from the main thread only
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return IgnoreCtrlC()


# ------------------------------------------------------------------------------------------------------------
# Here
# ------------------------------------------------------------------------------------------------------------

def part_rows(grid: TileGrid, slots: int = 1, blocks: int = 1) -> list[tuple[int, int]]:
    """The (top, bottom) output rows of each part, starting on multiples of ``ROW_ALIGN``: at most about
    ``TASK_TILE_ROWS`` tile rows each, and the rows shared out evenly so that the parts (times the column
    ``blocks``) are a multiple of the cluster's ``slots``: parts of 8 and 1 tile rows on 2 workers left one
    worker idle for most of the run."""
    tile_rows = len(grid.rows)
    parts = -(-tile_rows // TASK_TILE_ROWS)
    while (parts * blocks) % slots and parts < tile_rows:
        parts += 1
    aligned = -(-grid.height // ROW_ALIGN)  # the height in alignment units
    parts = max(1, min(parts, aligned))
    edges = [min(grid.height, round(i * aligned / parts) * ROW_ALIGN) for i in range(parts + 1)]
    return [(top, bottom) for top, bottom in zip(edges, edges[1:]) if bottom > top]


def merge_stats(total: EngineStats, part: EngineStats) -> None:
    total.tiles += part.tiles
    total.tiles_refined += part.tiles_refined
    total.coarse_tiles += part.coarse_tiles
    total.changed_pixels += part.changed_pixels
    total.nodata_pixels += part.nodata_pixels
    for klass, count in part.class_pixels.items():
        total.class_pixels[klass] = total.class_pixels.get(klass, 0) + count


def _forget_trim_threshold_left_by_dask(dask: Any) -> None:
    """Drop Dask's MALLOC_TRIM_THRESHOLD_ from this process's environment if a Dask nanny put it there.

    Nannies of another cluster started in this process (with Dask's defaults) write the variable into
    os.environ before they spawn, and every worker process started later would inherit it from there."""
    dask_value = dask.config.get(f"{NANNY_ENV}.MALLOC_TRIM_THRESHOLD_", default=None)
    if dask_value is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(dask_value):
        del os.environ["MALLOC_TRIM_THRESHOLD_"]


class Cluster:
    """A Dask cluster for the runs inside the ``with`` block: ``workers`` local worker processes (stopped at
    the end, also on Ctrl-C), or the existing cluster whose scheduler is at ``scheduler`` (left running).

    Local workers run one task at a time with ``threads`` torch threads each (default: the cores shared out);
    an existing cluster's workers take $IDGBR_TORCH_THREADS, else their cores shared by their Dask threads."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None, threads: int | None = None) -> None:
        if (workers is None) == (scheduler is None):
            raise IdgbrError("Give either --workers N (a local cluster) or --scheduler ADDRESS (an existing one).")
        if workers is not None and (isinstance(workers, bool) or not 1 <= workers <= 1024):
            raise IdgbrError(f"--workers must be a whole number from 1 to 1024 (got {workers!r}).")
        if threads is not None and (isinstance(threads, bool) or not 1 <= threads <= 1024):
            raise IdgbrError(f"--threads must be a whole number from 1 to 1024 (got {threads!r}).")
        if scheduler is not None and "://" not in scheduler:
            scheduler = f"tcp://{scheduler}"  # "host:8786" as Dask's own tools accept it
        self.workers, self.scheduler = workers, scheduler
        self.threads = threads if threads is not None or workers is None else max(1, (os.cpu_count() or 1) // workers)
        self.client: Any = None
        self.local: Any = None
        self.note = ""

    # ----------------------------------------------------------------- lifetime

    def __enter__(self) -> Cluster:
        distributed = _distributed()
        try:
            if self.scheduler is not None:
                self._connect(distributed)
            else:
                # One task at a time per worker process: torch's own threads share out the cores. No dashboard;
                # the scheduler's status page on a free port of this computer only.
                import dask

                # Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which turns off glibc's adaptive mmap
                # threshold: every tensor then is a fresh mmap and its pages fault in anew, and the networks ran
                # 2.5 times slower than in one process. Local workers keep the allocator's default.
                _forget_trim_threshold_left_by_dask(dask)
                with dask.config.set({f"{NANNY_ENV}.MALLOC_TRIM_THRESHOLD_": None}):
                    self.local = distributed.LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                          processes=True, host="127.0.0.1",
                                                          dashboard_address="127.0.0.1:0",
                                                          scheduler_kwargs={"dashboard": False},
                                                          silence_logs=logging.ERROR)
                self.client = distributed.Client(self.local, set_as_default=False)
                self.client.register_plugin(_ignore_ctrl_c_plugin(distributed))
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, distributed: Any) -> None:
        try:
            self.client = distributed.Client(self.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise IdgbrError(f"Could not reach the Dask scheduler at {self.scheduler} ({exc}). Check that "
                             "'dask scheduler' runs there, the host name and port (8786 unless changed) and that "
                             "no firewall blocks them; or run on this computer with --workers N.") from exc
        try:
            self.client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except TimeoutError as exc:
            raise IdgbrError(f"The Dask scheduler at {self.scheduler} has no workers (waited "
                             f"{WORKERS_TIMEOUT_S:g} s). Start some with 'dask worker {self.scheduler}' on "
                             "computers with the IDGBR backend installed.") from exc

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect; stop the local cluster (its worker processes end)."""
        for part in (self.client, self.local):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        self.client = self.local = None

    @property
    def where(self) -> str:
        return f"the Dask scheduler at {self.scheduler}" if self.scheduler else "the local Dask cluster"

    def slots(self) -> int:
        """Tasks the cluster runs at once (its workers' Dask threads)."""
        return max(1, sum(self.client.nthreads().values()))

    # ----------------------------------------------------------------- before a run

    def check_workers(self, paths: list[Path], folders: list[Path], model: Path, device: str,
                      precision: str | None) -> dict[str, dict]:
        """Ask every worker what it sees; raise IdgbrError naming the first worker that cannot do the job."""
        request = {"paths": [str(p) for p in paths], "folders": [str(f) for f in folders], "model": str(model),
                   "device": device, "precision": precision, "threads": self.threads}
        try:
            answers: dict[str, dict] = self.client.run(probe_worker, request)
        except Exception as exc:  # noqa: BLE001 - whatever stops a worker from running our code
            raise IdgbrError(f"The workers of {self.where} cannot run the IDGBR backend ({type(exc).__name__}: "
                             f"{exc}). Install it on every worker with the same version as here ({__version__}): "
                             "pip install 'idgbr[distributed]'.") from exc
        if not answers:
            raise IdgbrError(f"{self.where[:1].upper()}{self.where[1:]} has no workers.")
        own_model = _sha256(str(model))
        for address, answer in sorted(answers.items()):
            if answer["version"] != __version__:
                raise IdgbrError(f"The worker {address} has IDGBR {answer['version']}, this computer {__version__}: "
                                 "install the same version on every worker, so all parts are computed alike.")
            if answer["missing"]:
                raise IdgbrError(f"The worker {address} cannot see {answer['missing'][0]}. Workers must see the "
                                 "input rasters, the model file and the output folder at the same paths as this "
                                 "computer (a shared folder mounted at the same place).")
            if answer["model"] is None:
                raise IdgbrError(f"The worker {address} cannot read the model file {model}. Workers must see it at "
                                 "the same path: install the backend at the same place on every computer, or give "
                                 "--model a file in a shared folder.")
            if answer["model"] != own_model:
                raise IdgbrError(f"The model file {model} on the worker {address} differs from the one here. Give "
                                 "every worker the same model file.")
            if "error" in answer:
                raise IdgbrError(f"The worker {address}: {answer['error']}")
        kinds = {(a["device"], a["precision"]) for a in answers.values()}
        if len(kinds) > 1:
            listed = ", ".join(f"{addr}: {a['device']} {a['precision']}" for addr, a in sorted(answers.items()))
            raise IdgbrError(f"The workers would not compute alike ({listed}). Give --device and --precision, "
                             "or use workers of one kind.", "device")
        return answers

    def prepare(self, options: RunOptions, inputs: list[Path], outputs: list[Path]) -> tuple[torch.device, str]:
        """Check the workers for a run; its device and precision (the workers'); sets ``note``."""
        import torch

        from .model_bundle import resolve_model_path

        model = resolve_model_path(options.model).absolute()
        folders = [(p.parent if str(p.parent) else Path(".")).absolute() for p in outputs]
        answers = self.check_workers([p.absolute() for p in inputs], folders, model, options.device,
                                     options.precision)
        first = next(iter(answers.values()))
        threads = sorted({a["threads"] for a in answers.values()})
        self.note = (f"Ran on {self.where}: {len(answers)} worker{'s' if len(answers) != 1 else ''}, "
                     f"{'/'.join(map(str, threads))} torch thread{'s' if threads != [1] else ''} per task.")
        trimmed = sorted(address for address, answer in answers.items() if answer.get("trim_threshold"))
        if trimmed:
            self.note += (f" The worker{'s' if len(trimmed) != 1 else ''} {', '.join(trimmed)} run with "
                          "MALLOC_TRIM_THRESHOLD_ set (Dask's default for workers it starts), which makes the "
                          "networks about 2.5 times slower: start them with "
                          "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None in the "
                          "environment.")
        return torch.device(first["device"]), first["precision"]

    def passes(self, input_path: Path, window: Window, bands: list[int], scaler: PixelScaler, masked: bool,
               model: str | Path | None, device: torch.device, size_multiple: int,
               cancel: threading.Event | None) -> DaskPasses:
        from .model_bundle import resolve_model_path

        return DaskPasses(self, input_path.absolute(), window, bands, scaler, masked,
                          resolve_model_path(model).absolute(), device.type, size_multiple, cancel)

    # ----------------------------------------------------------------- tasks

    def wait(self, future: Any, cancel: threading.Event | None, what: str) -> Any:
        """The result of ``future``, checking ``cancel`` meanwhile; a lost cause becomes an IdgbrError."""
        distributed = _distributed()

        def lost(reason: str) -> IdgbrError:
            return IdgbrError(f"Lost {self.where} while running {what} ({reason}); nothing was written. Check the "
                              "scheduler and run again.")

        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("Cancelled; no output was written.")
            try:
                return future.result(timeout=POLL_S)
            except TimeoutError:
                continue
            except distributed.KilledWorker as exc:
                raise IdgbrError(f"Dask workers died again and again running {what}; the run is stopped and "
                                 "nothing was written. A worker may lack the memory for a part: give "
                                 "the workers more memory, or use fewer workers per computer.") from exc
            except (distributed.CancelledError, OSError) as exc:
                raise lost(f"{type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - a task's own error after its retries
                if getattr(future, "status", None) == "cancelled":
                    # The scheduler dropped the task (e.g. it lost this client under load); some distributed
                    # versions then raise an unrelated error from inside their own polling.
                    raise lost("the scheduler cancelled the task") from exc
                raise IdgbrError(f"A worker failed running {what} ({type(exc).__name__}: {exc}); nothing was "
                                 "written.") from exc


class DaskPasses:
    """``pipeline.Passes`` on a cluster: each pass as parts on the workers, written here in order."""

    def __init__(self, cluster: Cluster, input_path: Path, window: Window, bands: list[int], scaler: PixelScaler,
                 masked: bool, model: Path, device: str, size_multiple: int, cancel: threading.Event | None) -> None:
        self.cluster = cluster
        self.input_path = input_path
        self.window = window
        self.bands, self.scaler, self.masked = bands, scaler, masked
        self.model, self.device = model, device
        self.multiple = size_multiple
        self.cancel = cancel

    def run(self, grid: VirtualGrid | None, window: Window, coarse: PassCoarse | None, config: EngineConfig,
            writer: RowWriter, confidence_writer: RowWriter | None,
            progress: Callable[[float, str], None] | None) -> EngineStats:
        w = self.window
        spec = PartSpec(
            input=str(self.input_path), window=(int(w.col_off), int(w.row_off), int(w.width), int(w.height)),
            grid=(grid.width, grid.height) if grid is not None else None,
            coarse=str(coarse.path.absolute()) if coarse is not None else None,
            coarse_own=(coarse.own.width, coarse.own.height) if coarse is not None and coarse.own is not None else None,
            bands=self.bands, scaler=self.scaler, masked=self.masked, config=config, model=str(self.model),
            device=self.device, threads=self.cluster.threads,
            confidence=confidence_writer is not None and config.mode == "refine")
        height, width = int(window.height), int(window.width)
        tiles = TileGrid(height, width, config.tile, config.overlap, self.multiple)
        refining, model_coarse = config.mode == "refine", coarse is None
        blocks = column_blocks(tiles, config.max_block_width, refining and model_coarse)
        parts = [(span, b) for span in part_rows(tiles, self.cluster.slots(), len(blocks)) for b in range(len(blocks))]
        units = [work_units(tiles, [blocks[b]], *rows, refining, model_coarse, config.steps) for rows, b in parts]
        total_units = max(1.0, sum(units))
        stats = EngineStats(tile_shape=(tiles.tile_h, tiles.tile_w))
        client = self.cluster.client
        run_id = uuid.uuid4().hex[:12]
        limit = max(2, IN_FLIGHT_PER_WORKER * self.cluster.slots())
        futures: dict[int, Any] = {}
        started, done_units = time.perf_counter(), 0.0
        try:
            for index, ((top, bottom), block) in enumerate(parts):
                # Keep ``limit`` parts submitted: the workers stay busy while this one is written.
                while len(futures) < limit and index + len(futures) < len(parts):
                    n = index + len(futures)
                    futures[n] = client.submit(run_part, spec, *parts[n], key=f"idgbr-part-{run_id}-{n}",
                                               retries=TASK_RETRIES, pure=False)
                what = f"rows {top}-{bottom - 1}" + (f" of column block {block + 1}" if len(blocks) > 1 else "")
                result: PartResult = self.cluster.wait(futures[index], self.cancel, what)
                futures.pop(index).release()
                if result.error is not None:
                    raise IdgbrError(result.error, result.parameter)
                replay(result.writes, writer)
                if confidence_writer is not None and result.confidence is not None:
                    replay(result.confidence, confidence_writer)
                assert result.stats is not None  # set with the rows
                merge_stats(stats, result.stats)
                done_units += units[index]
                if progress is not None:
                    fraction = done_units / total_units
                    elapsed = time.perf_counter() - started
                    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
                    progress(fraction, f"parts {index + 1}/{len(parts)} on {self.cluster.slots()} workers, "
                                       f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        finally:
            if futures:
                with contextlib.suppress(Exception):
                    client.cancel(list(futures.values()))
        return stats
