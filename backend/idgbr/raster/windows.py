"""Tile layout along the raster grid, blending weights and column blocks.

Tiles sit on one global grid per run (it depends only on the processed window, the tile size and the
overlap), so every part of the engine that needs "the tiles covering these pixels" gets the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

OUTPUT_BLOCK = 256  # block size of the written GeoTIFF; column blocks and row flushes align to it


def axis_layout(length: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """Tile size and start offsets along one axis of ``length`` pixels.

    ``tile`` is the largest tile allowed. The fewest tiles that keep at least ``overlap`` px between
    neighbours are spread evenly, and the tile shrinks to just cover the axis (rounded up to ``multiple`` so
    the model needs no padding): a 1000 px axis with 512 px tiles and 64 px overlap takes three 376 px
    tiles, not three 512 px ones. All tiles along an axis have one size, so any tiles can share a batch.
    """
    if length <= tile:
        return length, [0]
    count = max(1, math.ceil((length - overlap) / (tile - overlap)))
    size = math.ceil((length + (count - 1) * overlap) / count)
    size = min(length, math.ceil(size / multiple) * multiple) if multiple > 1 else size
    if count == 1:
        return size, [0]
    offsets = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return size, offsets


def ramp_weights(offset: int, size: int, length: int, overlap: int) -> np.ndarray:
    """1-D blending weights of one tile: a raised-cosine ramp over ``overlap`` px on each side that has a
    neighbour, 1 elsewhere. Strictly positive, so every covered pixel gets a defined blend, and near zero at
    an inner tile edge, so a tile's border (where its context is weakest) barely counts."""
    weights = np.ones(size, dtype=np.float32)
    ramp_len = min(overlap, size // 2)
    if ramp_len <= 0:
        return weights
    ramp = (np.sin(np.pi / 2 * (np.arange(ramp_len, dtype=np.float32) + 0.5) / ramp_len) ** 2).astype(np.float32)
    if offset > 0:
        weights[:ramp_len] = ramp
    if offset + size < length:
        weights[size - ramp_len:] = np.minimum(weights[size - ramp_len:], ramp[::-1])
    return weights


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a window of ``height`` x ``width`` pixels (window-local coordinates)."""

    height: int
    width: int
    tile: int
    overlap: int
    multiple: int = 1
    # (tile size, offsets) per axis, from ``axis_layout``; set once in ``__post_init__``.
    _rows: tuple[int, list[int]] = field(init=False, repr=False, compare=False)
    _cols: tuple[int, list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: cache the layouts once (they are used for every tile).
        object.__setattr__(self, "_rows", axis_layout(self.height, self.tile, self.overlap, self.multiple))
        object.__setattr__(self, "_cols", axis_layout(self.width, self.tile, self.overlap, self.multiple))

    @property
    def tile_h(self) -> int:
        return self._rows[0]

    @property
    def tile_w(self) -> int:
        return self._cols[0]

    @property
    def rows(self) -> list[int]:
        return self._rows[1]

    @property
    def cols(self) -> list[int]:
        return self._cols[1]

    def row_weights(self, y: int) -> np.ndarray:
        return ramp_weights(y, self.tile_h, self.height, self.overlap)

    def col_weights(self, x: int) -> np.ndarray:
        return ramp_weights(x, self.tile_w, self.width, self.overlap)

    def tile_rows_touching(self, start: int, stop: int) -> range:
        """Indices (into ``rows``) of the tile rows that cover any row in [start, stop)."""
        first = next((i for i, y in enumerate(self.rows) if y + self.tile_h > start), len(self.rows))
        stop_index = next((i for i, y in enumerate(self.rows) if y >= stop), len(self.rows))
        return range(first, max(first, stop_index))

    def cols_touching(self, start: int, stop: int) -> list[int]:
        """Column offsets of the tiles that cover any column in [start, stop)."""
        return [x for x in self.cols if x < stop and x + self.tile_w > start]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


@dataclass(frozen=True)
class ColumnBlock:
    """A vertical slab of the output processed on its own so that buffers scale with the slab width, not
    the raster width. ``out`` is the output column range; ``refine_cols``/``coarse_cols`` the tile offsets
    needed to get those columns exactly as an unblocked run would (the refine tiles touching the output
    range, and the coarse tiles touching those refine tiles)."""

    out_start: int
    out_stop: int
    refine_cols: tuple[int, ...]
    coarse_cols: tuple[int, ...]

    def span(self, cols: tuple[int, ...], tile_w: int) -> tuple[int, int]:
        return min(cols), max(cols) + tile_w


def column_blocks(grid: TileGrid, max_width: int, with_refine: bool) -> list[ColumnBlock]:
    """Split the window into column blocks at most ``max_width`` wide (a multiple of the output block size,
    so each write covers whole GeoTIFF blocks). Narrow windows are a single block with no duplicated work;
    wider ones recompute the tiles that straddle a block edge (a few per cent)."""
    width = grid.width
    step = max(OUTPUT_BLOCK, (max_width // OUTPUT_BLOCK) * OUTPUT_BLOCK)
    if width <= max_width:
        bounds = [(0, width)]
    else:
        bounds = [(start, min(width, start + step)) for start in range(0, width, step)]
    blocks = []
    for start, stop in bounds:
        refine_cols = tuple(grid.cols_touching(start, stop))
        if with_refine:
            lo, hi = min(refine_cols), max(refine_cols) + grid.tile_w
            coarse_cols = tuple(grid.cols_touching(lo, hi))
        else:
            coarse_cols = refine_cols
        blocks.append(ColumnBlock(start, stop, refine_cols, coarse_cols))
    return blocks


def padded_size(size: int, multiple: int) -> int:
    return max(multiple, int(math.ceil(size / multiple)) * multiple)


def pad_tile(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad the last two axes up to (height, width) by reflection (edge replication where the tile is too
    small to reflect, e.g. a 1x1 raster), so the model sees plausible content rather than zeros."""
    pad_h, pad_w = height - array.shape[-2], width - array.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    mode: Literal["reflect", "edge"] = "reflect" if min(array.shape[-2:]) > 1 else "edge"
    return np.pad(array, widths, mode=mode)
