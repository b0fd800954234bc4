"""The tile scheduler: streams a raster window through the coarse segmenter and the refiner.

Memory stays bounded by the tile size and a column block's width, never the raster's height or width:
- the window is cut into column blocks (``windows.column_blocks``) processed one after another;
- inside a block, tiles run in row-major order; blended logits are held only for the band of rows that
  still has unprocessed tiles, and rows are argmax-ed, written and dropped as soon as no later tile covers
  them;
- the refine pass trails the coarse pass by about one tile row (a refine tile needs the blended coarse map
  over its whole area, which needs the coarse tiles below it).

Reads and writes run on a background thread (``iothread.IoThread``), in order: the next tile row is read
while the current one runs through the model, and finished rows are written behind it.

A run may be one part of the window: a range of its output rows (``rows``) and one column block (``block``).
The part runs exactly the tiles of the whole run that cover its rows (for the refine pass, also the coarse
tiles those need), on the same tile grid, and adds them to its blends in the same order, so its rows are bit
for bit those of the whole run; tiles are counted by the part that holds their first row. Parts need nothing
from one another: ``idgbr.distributed`` runs them on other processes, each writing into a ``RowCollector``.

Both passes blend per-tile log-probabilities (normalised logits) with raised-cosine weights. Log-probs,
rather than raw logits, because tiles without a class boundary skip the refiner and contribute a fixed
near-one-hot distribution instead: the two must be on one scale to blend.

The refiner's band and vocabulary rules act inside the sampler (``bundle.refine``); the confidence gate acts
here, on the blended distribution of each final row (``constraints.gate_changes``): a pixel takes the
refiner's class only where the refiner prefers it over the coarse class with at least ``min_confidence``,
else it keeps the coarse class. The optional confidence output is the probability of the class written (1.0
where only boundary-free tiles, which skip the refiner, cover a pixel; ``CONFIDENCE_NODATA`` where the class
output is nodata). The networks may run in half precision (``EngineConfig.precision``); log-probabilities,
blending and the gate are float32.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from scipy import ndimage

from ..card import ModelCard
from ..errors import Cancelled
from ..models.constraints import gate_changes
from .bands import PixelScaler
from .io import CONFIDENCE_NODATA, NODATA, CoarseSource, read_pixels
from .iothread import InlineIo, IoThread
from .windows import OUTPUT_BLOCK, ColumnBlock, TileGrid, column_blocks, pad_tile, padded_size

if TYPE_CHECKING:
    from .resample import GridCoarse

ProgressFn = Callable[[float, str], None]

SKIP_PROB = 0.999  # probability a skipped (boundary-free) tile gives its single class
READ_AHEAD = 1  # tile rows read ahead of the one in use: a row of tiles takes far longer to run than to read


@dataclass
class EngineConfig:
    mode: str  # "refine" | "segment"
    tile: int
    overlap: int
    batch: int
    steps: int
    seed: int
    band: int = -1  # the refiner may change pixels only within this many px of a coarse boundary; -1: off
    vocabulary: int = -1  # ... only to classes the coarse map has within this many px; -1: off
    min_confidence: float = 0.0  # ... only where the new class is preferred with this; <= 0.5: off, 1: never
    max_block_width: int = 8192
    precision: str = "fp32"  # of the networks: fp32, bf16 or fp16 (idgbr.precision)
    io_thread: bool = True  # reads and writes on a background thread (False: in the engine's own thread)


class RowWriter(Protocol):
    """Where the engine puts finished rows: ``values`` (rows, cols) at (``row``, ``col``) of its grid."""

    def write(self, values: np.ndarray, row: int, col: int) -> None: ...


class RowCollector:
    """A writer that keeps the rows it gets, in order, for another process to write (``replay``)."""

    def __init__(self) -> None:
        self.writes: list[tuple[np.ndarray, int, int]] = []

    def write(self, values: np.ndarray, row: int, col: int) -> None:
        self.writes.append((values, row, col))


def replay(writes: list[tuple[np.ndarray, int, int]], writer: RowWriter) -> None:
    """Write collected rows into ``writer`` in the order they were produced."""
    for values, row, col in writes:
        writer.write(values, row, col)


def part_tile_rows(grid: TileGrid, start: int, stop: int, coarse_first: bool) -> tuple[range, range]:
    """The tile rows (indices into ``grid.rows``) a part with output rows [start, stop) runs: those of the final
    pass, and those of the coarse pass. With ``coarse_first`` (the refine pass on the model's coarse map) the
    coarse pass also covers every row the final pass's tiles read, so their coarse ids are final; otherwise
    both are the tiles touching the rows."""
    final = grid.tile_rows_touching(start, stop)
    if not coarse_first:
        return final, final
    top, bottom = grid.rows[final.start], grid.rows[final.stop - 1] + grid.tile_h
    return final, grid.tile_rows_touching(top, bottom)


def work_units(grid: TileGrid, blocks: list[ColumnBlock], start: int, stop: int, refining: bool,
               model_coarse: bool, steps: int) -> float:
    """The work of output rows [start, stop) over ``blocks``: a coarse tile counts 1, a refine tile ``steps``."""
    final, coarse = part_tile_rows(grid, start, stop, refining and model_coarse)
    units = 0.0
    for block in blocks:
        if model_coarse:
            units += len(coarse) * len(block.coarse_cols)
        if refining:
            units += len(final) * len(block.refine_cols) * max(1, steps)
    return units


@dataclass
class EngineStats:
    tiles: int = 0  # tiles of the final pass (refine tiles in refine mode, coarse tiles in segment mode)
    tiles_refined: int = 0
    coarse_tiles: int = 0
    changed_pixels: int = 0  # written pixels whose class differs from the coarse map (refine mode)
    class_pixels: dict[int, int] = field(default_factory=dict)
    nodata_pixels: int = 0
    tile_shape: tuple[int, int] = (0, 0)  # (rows, cols) of every tile, before padding


class RollingRows:
    """Rows [base, base + n) of a (..., rows, width) array; grows on demand, drops rows from the top."""

    def __init__(self, lead: tuple[int, ...], width: int, dtype: type, fill: float = 0, base: int = 0) -> None:
        self.lead, self.width, self.dtype, self.fill = lead, width, dtype, fill
        self.base = base
        self.data: np.ndarray = np.full((*lead, 0, width), fill, dtype=dtype)

    def view(self, start: int, stop: int) -> np.ndarray:
        if stop - self.base > self.data.shape[-2]:
            grown: np.ndarray = np.full((*self.lead, stop - self.base, self.width), self.fill, dtype=self.dtype)
            grown[..., : self.data.shape[-2], :] = self.data
            self.data = grown
        assert start >= self.base, (start, self.base)
        return self.data[..., start - self.base : stop - self.base, :]

    def release(self, upto: int) -> None:
        drop = upto - self.base
        if drop <= 0:
            return
        rows = self.data.shape[-2]
        if drop >= rows:
            self.data[...] = self.fill
        else:
            self.data[..., : rows - drop, :] = self.data[..., drop:, :]
            self.data[..., rows - drop :, :] = self.fill
        self.base = upto


class Pass:
    """Bookkeeping of one pass (coarse or refine) over a block: its tiles (those of ``tile_rows``), which are
    done, which rows are final."""

    def __init__(self, grid: TileGrid, cols: tuple[int, ...], tile_rows: range) -> None:
        self.rows = grid.rows
        self.tile_h = grid.tile_h
        self.stop = tile_rows.stop
        self.tiles = [(i, x) for i in tile_rows for x in cols]
        self.per_row = len(cols)
        self.done = [0] * len(self.rows)
        self.next = 0  # index of the next tile to hand out
        self.first_open = tile_rows.start  # first tile row with undone tiles
        # Rows [first row of the pass, final_end) will not change any more (as far as this pass's tiles go).
        self.final_end = self.rows[tile_rows.start]

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.tiles)

    @property
    def finished(self) -> bool:
        return self.first_open >= self.stop

    def mark(self, row_index: int) -> tuple[int, int]:
        """Record one finished tile; return the rows that became final (possibly empty)."""
        self.done[row_index] += 1
        start = self.final_end
        while self.first_open < self.stop and self.done[self.first_open] == self.per_row:
            self.first_open += 1
        # Past the pass's last tile row, the rows it covers are done too (for the whole grid: all rows).
        self.final_end = (self.rows[self.first_open] if self.first_open < self.stop
                          else self.rows[self.stop - 1] + self.tile_h)
        return start, max(start, self.final_end)


class Engine:
    def __init__(self, bundle, src: rasterio.io.DatasetReader, window: Window, bands: list[int],
                 scaler: PixelScaler, masked: bool, coarse: CoarseSource | GridCoarse | None, config: EngineConfig,
                 writer: RowWriter, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                 confidence_writer: RowWriter | None = None, rows: tuple[int, int] | None = None,
                 block: int | None = None) -> None:
        """``rows`` (output rows [start, stop) of the window) and ``block`` (index of a column block) make the
        run one part of the window (None: all rows, all blocks)."""
        self.bundle = bundle
        self.src = src
        self.window = window
        self.row0, self.col0 = int(window.row_off), int(window.col_off)
        self.bands = bands
        self.scaler = scaler
        self.masked = masked
        self.coarse_source = coarse
        self.config = config
        self.writer = writer
        self.confidence_writer = confidence_writer if config.mode == "refine" else None
        self.progress = progress
        self.cancel = cancel
        card: ModelCard = bundle.card
        self.num_classes = card.num_classes
        self.multiple = card.size_multiple
        self.fill_8bit = np.asarray(card.normalization.mean, dtype=np.float32)[:, None, None]
        self.grid = TileGrid(int(window.height), int(window.width), config.tile, config.overlap, self.multiple)
        self.refining = config.mode == "refine"
        self.model_coarse = coarse is None
        blocks = column_blocks(self.grid, config.max_block_width, self.refining and self.model_coarse)
        self.blocks = blocks if block is None else [blocks[block]]
        start, stop = (0, self.grid.height) if rows is None else rows
        self.part = (max(0, int(start)), min(self.grid.height, int(stop)))
        if self.part[1] <= self.part[0]:
            raise ValueError(f"empty row range {rows} of a {self.grid.height}-row grid")
        self.final_rows, self.coarse_rows = part_tile_rows(self.grid, *self.part, self.refining and self.model_coarse)
        self.stats = EngineStats(tile_shape=(self.grid.tile_h, self.grid.tile_w))
        self.class_hist = np.zeros(256, dtype=np.int64)
        # Progress in work units: a coarse tile is 1, a refined tile about ``steps`` denoiser calls.
        self.refine_cost = max(1, config.steps)
        self.total_units = max(1.0, work_units(self.grid, self.blocks, *self.part, self.refining, self.model_coarse,
                                               config.steps))
        self.done_units = 0.0
        self.tiles_done = 0
        self.tiles_total = sum((len(self.coarse_rows) * len(b.coarse_cols) if self.model_coarse else 0)
                               + (len(self.final_rows) * len(b.refine_cols) if self.refining else 0)
                               for b in self.blocks)
        self.started = time.perf_counter()
        self.megapixels = self.grid.height * self.grid.width / 1e6
        self.io: IoThread | InlineIo = InlineIo()
        self.read_ahead = READ_AHEAD if config.io_thread else 0
        self.writes: deque = deque()  # submitted writes, oldest first

    # ----------------------------------------------------------------- public

    def run(self) -> EngineStats:
        self._report()
        self.io = IoThread() if self.config.io_thread else InlineIo()
        try:
            with torch.inference_mode():
                for block in self.blocks:
                    _BlockRun(self, block).run()
            while self.writes:
                self.writes.popleft().result()
        finally:
            self.io.close()
        self.stats.class_pixels = {i: int(n) for i, n in enumerate(self.class_hist[: self.num_classes]) if n}
        self.stats.nodata_pixels = int(self.class_hist[NODATA])
        return self.stats

    # ----------------------------------------------------------------- shared helpers

    def owns(self, i: int) -> bool:
        """Whether tile row ``i`` is counted in this part's statistics: the part holding its first row."""
        return self.part[0] <= self.grid.rows[i] < self.part[1]

    def write(self, writer: RowWriter, values: np.ndarray, row: int, col: int) -> None:
        """Queue ``values`` for ``writer.write``; raises the error of any earlier write that failed."""
        # A copy: the caller's rows are overwritten as soon as this returns.
        self.writes.append(self.io.submit(writer.write, values.copy(), row, col))
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("Cancelled; no output was written.")

    def advance(self, units: float, tiles: int) -> None:
        self.done_units += units
        self.tiles_done += tiles
        self._report()

    def _report(self) -> None:
        if self.progress is None:
            return
        fraction = min(1.0, self.done_units / self.total_units)
        elapsed = time.perf_counter() - self.started
        rate = self.megapixels * fraction / elapsed if elapsed > 0 and fraction > 0 else 0.0
        if fraction > 0 and elapsed > 0:
            eta = elapsed * (1 - fraction) / fraction
            eta_text = f"ETA {int(eta // 60)}:{int(eta % 60):02d}"
        else:
            eta_text = "ETA --:--"
        self.progress(fraction, f"tiles {self.tiles_done}/{self.tiles_total}, {rate:.2f} MP/s, {eta_text}")

    def model_input(self, tiles: list[np.ndarray], valid: list[np.ndarray | None], height: int, width: int
                    ) -> torch.Tensor:
        """Raw tiles -> one normalised, padded batch tensor."""
        batch = []
        for pixels, ok in zip(tiles, valid):
            values = self.scaler.to_8bit(pixels)
            if ok is not None and not ok.all():
                # Nodata pixels get the training mean: neutral input that does not invent edges.
                values = np.where(ok[None], values, self.fill_8bit)
            batch.append(pad_tile(values, height, width))
        return self.bundle.normalize(np.stack(batch))

    def weighted_log_probs(self, logits: torch.Tensor, weights: np.ndarray) -> np.ndarray:
        """(B, K, H, W) float32 log-probabilities of the tiles times their (B, H, W) blending weights, cropped
        to the weights' size, on the host: what the blend adds up."""
        height, width = weights.shape[-2:]
        log_p = torch.log_softmax(logits[:, :, :height, :width].float(), dim=1)
        if log_p.device.type == "cuda":
            # One transfer per batch, so the GPU does the softmax and the weighting and the host only adds.
            return (log_p * torch.from_numpy(weights).to(log_p.device)[:, None]).cpu().numpy()
        return log_p.numpy() * weights[:, None]


class _BlockRun:
    """One column block through both passes."""

    def __init__(self, engine: Engine, block: ColumnBlock) -> None:
        self.e = engine
        self.block = block
        grid = engine.grid
        self.grid = grid
        self.th, self.tw = grid.tile_h, grid.tile_w
        self.ph, self.pw = padded_size(self.th, engine.multiple), padded_size(self.tw, engine.multiple)
        cols = block.coarse_cols if engine.model_coarse else block.refine_cols
        self.lo, self.hi = min(cols), max(cols) + self.tw
        span = self.hi - self.lo
        k = engine.num_classes
        self.coarse = Pass(grid, block.coarse_cols, engine.coarse_rows) if engine.model_coarse else None
        self.refine = Pass(grid, block.refine_cols, engine.final_rows) if engine.refining else None
        # The first tile row either pass runs (the coarse pass's reaches at least as far up) and the last.
        first_row = (engine.coarse_rows if self.coarse else engine.final_rows).start
        self.last_row = max(engine.coarse_rows.stop if self.coarse else 0, engine.final_rows.stop) - 1
        top = grid.rows[first_row]
        self.coarse_acc = RollingRows((k,), span, np.float32, base=top) if self.coarse else None
        self.refine_acc = RollingRows((k,), span, np.float32, base=top) if self.refine else None
        # Per pixel: the sum of the blending weights of all refine tiles, and of those the model refined.
        self.refine_weight = RollingRows((2,), span, np.float32, base=top) if self.refine else None
        self.coarse_ids = RollingRows((), span, np.uint8, base=top) if self.refine else None
        self.valid = RollingRows((), span, bool, fill=True, base=top)
        first_out = engine.part[0]
        self.out = RollingRows((), block.out_stop - block.out_start, np.uint8, fill=NODATA, base=first_out)
        self.confidence = (RollingRows((), block.out_stop - block.out_start, np.float32, fill=CONFIDENCE_NODATA,
                                       base=first_out)
                           if engine.confidence_writer is not None else None)
        self.emitted = first_out
        self.flushed = first_out
        self.strips: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.reads: dict[int, Future] = {}  # tile rows being read, by index
        self.next_read = first_row  # index of the next tile row to read
        self.pending: list[tuple[int, int]] = []  # refine tiles waiting for a model batch
        self.log_skip_hi = math.log(SKIP_PROB)
        self.log_skip_lo = math.log((1 - SKIP_PROB) / max(1, k - 1))

    # ----------------------------------------------------------------- reading

    def strip(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels of tile row ``i`` over the block's columns, read once and kept until both passes are
        done with that row. Rows are asked for in order; the next ones are read ahead in the background."""
        if i in self.strips:
            return self.strips[i]
        e = self.e
        while self.next_read <= min(i + e.read_ahead, self.last_row):
            y = self.grid.rows[self.next_read]
            window = Window(e.col0 + self.lo, e.row0 + y, self.hi - self.lo, self.th)
            self.reads[self.next_read] = e.io.submit(read_strip, e.src, e.bands, window, e.masked, e.coarse_source)
            self.next_read += 1
        pixels, valid, ids = self.reads.pop(i).result()
        y = self.grid.rows[i]
        if ids is not None:
            assert self.coarse_ids is not None  # an external coarse map means refine mode
            self.coarse_ids.view(y, y + self.th)[...] = ids
        if valid is not None:
            self.valid.view(y, y + self.th)[...] = valid
        self.strips[i] = (pixels, valid)
        return self.strips[i]

    def drop_strips(self) -> None:
        for i in list(self.strips):
            coarse_done = self.coarse is None or self.coarse.first_open > i
            refine_done = self.refine is None or self.refine.first_open > i
            if coarse_done and refine_done:
                del self.strips[i]

    def tile_pixels(self, i: int, x: int) -> tuple[np.ndarray, np.ndarray | None]:
        pixels, valid = self.strip(i)
        c = x - self.lo
        return pixels[:, :, c : c + self.tw], None if valid is None else valid[:, c : c + self.tw]

    def weights(self, i: int, x: int) -> np.ndarray:
        return self.grid.row_weights(self.grid.rows[i])[:, None] * self.grid.col_weights(x)[None, :]

    # ----------------------------------------------------------------- passes

    def run_coarse_batch(self) -> None:
        e, p = self.e, self.coarse
        assert p is not None and self.coarse_acc is not None  # called only with a coarse pass
        tiles = p.tiles[p.next : p.next + e.config.batch]
        p.next += len(tiles)
        data = [self.tile_pixels(i, x) for i, x in tiles]
        images = e.model_input([d[0] for d in data], [d[1] for d in data], self.ph, self.pw)
        weights = np.stack([self.weights(i, x) for i, x in tiles])
        weighted = e.weighted_log_probs(e.bundle.segment(images, precision=e.config.precision), weights)
        for (i, x), wlp in zip(tiles, weighted):
            y, c = self.grid.rows[i], x - self.lo
            self.coarse_acc.view(y, y + self.th)[:, :, c : c + self.tw] += wlp
            start, stop = p.mark(i)
            if stop > start:
                self.coarse_rows_final(start, stop)
        e.stats.coarse_tiles += sum(e.owns(i) for i, _ in tiles)
        e.advance(len(tiles), len(tiles))

    def coarse_rows_final(self, start: int, stop: int) -> None:
        assert self.coarse_acc is not None  # called only with a coarse pass
        ids = self.coarse_acc.view(start, stop).argmax(axis=0)
        self.coarse_acc.release(stop)
        if self.refine is None:
            self.emit(start, stop, ids)
        else:
            assert self.coarse_ids is not None  # set with the refine pass
            self.coarse_ids.view(start, stop)[...] = ids

    def refine_ready(self, i: int) -> bool:
        if self.coarse is None:
            return True
        y = self.grid.rows[i]
        return self.coarse.final_end >= min(y + self.th, self.grid.height)

    def gather_refine(self) -> None:
        """Move ready refine tiles to the pending batch; tiles without a class boundary are settled here."""
        e, p = self.e, self.refine
        # Called only with a refine pass, which sets these buffers too.
        assert p is not None
        assert self.coarse_ids is not None and self.refine_acc is not None and self.refine_weight is not None
        while not p.exhausted and len(self.pending) < e.config.batch:
            i, x = p.tiles[p.next]
            if not self.refine_ready(i):
                return
            self.strip(i)
            p.next += 1
            y, c = self.grid.rows[i], x - self.lo
            ids = self.coarse_ids.view(y, y + self.th)[:, c : c + self.tw]
            valid = self.valid.view(y, y + self.th)[:, c : c + self.tw]
            values = ids if valid.all() else ids[valid]
            if values.size and values.min() != values.max():
                self.pending.append((i, x))
                continue
            # No boundary: nothing to refine (the band and vocabulary rules would keep the coarse class), so
            # skip the model.
            klass = int(values.min()) if values.size else 0
            acc = self.refine_acc.view(y, y + self.th)[:, :, c : c + self.tw]
            w = self.weights(i, x)
            acc += w * self.log_skip_lo
            acc[klass] += w * (self.log_skip_hi - self.log_skip_lo)
            self.refine_weight.view(y, y + self.th)[0, :, c : c + self.tw] += w
            e.stats.tiles += int(e.owns(i))
            self.finish_refine_tile(i)
            e.advance(e.refine_cost, 1)

    def run_refine_batch(self) -> None:
        e = self.e
        # Called only with a refine pass, which sets these buffers.
        assert self.coarse_ids is not None and self.refine_acc is not None and self.refine_weight is not None
        tiles, self.pending = self.pending[: e.config.batch], self.pending[e.config.batch :]
        data = [self.tile_pixels(i, x) for i, x in tiles]
        images = e.model_input([d[0] for d in data], [d[1] for d in data], self.ph, self.pw)
        ids = []
        origins = []
        for i, x in tiles:
            y, c = self.grid.rows[i], x - self.lo
            tile_ids = self.coarse_ids.view(y, y + self.th)[:, c : c + self.tw].astype(np.int64)
            ids.append(pad_tile(tile_ids, self.ph, self.pw))
            origins.append((e.row0 + y, e.col0 + x))
        coarse = torch.from_numpy(np.stack(ids))
        logits = e.bundle.refine(images, coarse, origins, steps=e.config.steps, seed=e.config.seed,
                                 band=e.config.band, vocabulary=e.config.vocabulary, precision=e.config.precision)
        weights = np.stack([self.weights(i, x) for i, x in tiles])
        weighted = e.weighted_log_probs(logits, weights)
        for (i, x), wlp, w in zip(tiles, weighted, weights):
            y, c = self.grid.rows[i], x - self.lo
            self.refine_acc.view(y, y + self.th)[:, :, c : c + self.tw] += wlp
            self.refine_weight.view(y, y + self.th)[:, :, c : c + self.tw] += w
            self.finish_refine_tile(i)
        owned = sum(e.owns(i) for i, _ in tiles)
        e.stats.tiles += owned
        e.stats.tiles_refined += owned
        e.advance(e.refine_cost * len(tiles), len(tiles))

    def finish_refine_tile(self, i: int) -> None:
        # Called only with a refine pass, which sets these buffers too.
        assert self.refine is not None
        assert self.coarse_ids is not None and self.refine_acc is not None and self.refine_weight is not None
        start, stop = self.refine.mark(i)
        if stop > start:
            # The coarse ids of these rows are released only below, after the gate has used them.
            ids, confidence = self.decide(start, stop)
            self.refine_acc.release(stop)
            self.refine_weight.release(stop)
            self.emit(start, stop, ids, confidence, coarse=self.coarse_ids.view(start, stop))
            first_needed = self.grid.rows[self.refine.first_open] if not self.refine.finished else stop
            self.coarse_ids.release(min(first_needed, stop))

    def decide(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Class ids and confidence of final rows [start, stop) from the blended log-probabilities, through
        the confidence gate."""
        # Called only with a refine pass, which sets these buffers.
        assert self.coarse_ids is not None and self.refine_acc is not None and self.refine_weight is not None
        weight = self.refine_weight.view(start, stop)
        # Weighted mean of the tiles' log-probs (the weights need not sum to 1 where tiles overlap more than
        # the ramps), so the probabilities are those of one tile wherever only one tile counts.
        mean = self.refine_acc.view(start, stop) / np.maximum(weight[0], 1e-12)
        coarse = self.coarse_ids.view(start, stop).astype(np.int64)
        # At 1 no change can pass: float32 rounds a near-certain probability to exactly 1.0.
        threshold = self.e.config.min_confidence if self.e.config.min_confidence < 1.0 else math.inf
        ids, probs = gate_changes(torch.from_numpy(mean[None]), torch.from_numpy(coarse[None]), threshold)
        confidence = probs[0].numpy()
        # Pixels only boundary-free tiles cover were never the refiner's to change: certain, not SKIP_PROB.
        confidence[weight[1] <= 0] = 1.0
        return ids[0].numpy(), confidence

    # ----------------------------------------------------------------- output

    def emit(self, start: int, stop: int, ids: np.ndarray, confidence: np.ndarray | None = None,
             coarse: np.ndarray | None = None) -> None:
        """Rows [start, stop) of the block are final: mask nodata, queue for writing. Only the part's own rows
        are kept (those around them are not final: tiles outside the part cover them too)."""
        lo, hi = max(start, self.e.part[0]), min(stop, self.e.part[1])
        if hi > lo:
            rows = slice(lo - start, hi - start)
            a, b = self.block.out_start - self.lo, self.block.out_stop - self.lo
            out = ids[rows, a:b].astype(np.uint8)
            valid = self.valid.view(lo, hi)[:, a:b]
            out[~valid] = NODATA
            self.out.view(lo, hi)[...] = out
            if self.confidence is not None and confidence is not None:
                self.confidence.view(lo, hi)[...] = np.where(valid, confidence[rows, a:b], CONFIDENCE_NODATA)
            if coarse is not None:
                self.e.stats.changed_pixels += int(((out != coarse[rows, a:b]) & valid).sum())
            self.emitted = hi
            self.e.class_hist += np.bincount(out.ravel(), minlength=256)
        self.valid.release(stop)
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write whole 256-row bands (each compressed GeoTIFF block written once), the rest at the end."""
        ready = self.emitted - self.flushed
        rows = ready if final else (ready // OUTPUT_BLOCK) * OUTPUT_BLOCK
        if rows <= 0:
            return
        e = self.e
        e.write(e.writer, self.out.view(self.flushed, self.flushed + rows), self.flushed, self.block.out_start)
        if self.confidence is not None:
            assert e.confidence_writer is not None  # self.confidence exists only with a confidence writer
            e.write(e.confidence_writer, self.confidence.view(self.flushed, self.flushed + rows), self.flushed,
                    self.block.out_start)
        self.flushed += rows
        self.out.release(self.flushed)
        if self.confidence is not None:
            self.confidence.release(self.flushed)

    # ----------------------------------------------------------------- schedule

    def run(self) -> None:
        e = self.e
        while True:
            e.check_cancel()
            if self.refine is not None:
                self.gather_refine()
                coarse_left = self.coarse is not None and not self.coarse.exhausted
                if len(self.pending) >= e.config.batch or (self.pending and not coarse_left):
                    self.run_refine_batch()
                    self.drop_strips()
                    continue
                if coarse_left:
                    self.run_coarse_batch()
                    self.drop_strips()
                    continue
                if self.refine.exhausted and not self.pending:
                    break
                continue
            assert self.coarse is not None  # segment mode always runs the coarse pass
            if self.coarse.exhausted:
                break
            self.run_coarse_batch()
            self.drop_strips()
        self.flush(final=True)


def read_strip(src, bands: list[int], window: Window, masked: bool, coarse: CoarseSource | GridCoarse | None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Raw pixels, validity (None: all valid) and, with an external coarse map, its class ids over ``window``.
    Touches nothing but the rasters it reads, so it may run on the I/O thread."""
    pixels, valid = read_pixels(src, bands, window, masked)
    if pixels.dtype.kind == "f":
        # NaN or inf without a nodata value: the model cannot use them, treat them as nodata.
        finite = np.isfinite(pixels).all(axis=0)
        if not finite.all():
            valid = finite if valid is None else valid & finite
    ids = None
    if coarse is not None:
        ids, coarse_valid = coarse.read(window)
        if not coarse_valid.all():
            ids = fill_nearest(ids, coarse_valid)
        valid = coarse_valid if valid is None else valid & coarse_valid
    return pixels, valid, ids


def fill_nearest(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Give invalid pixels the id of the nearest valid one, so the refiner sees no fake boundaries there
    (those pixels are written as nodata anyway)."""
    if not valid.any():
        return np.zeros_like(ids)
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return ids[rows, cols]
