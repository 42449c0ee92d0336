"""Seam-free blending of overlapping tiles, one band of tile rows at a time.

Tiles of ``tile`` px overlap by at least ``overlap`` px; the last tile of a row or column is shifted
back so it ends on the scene's edge (a scene smaller than a tile gets one reflect-padded tile).

Weights: per axis, every tile gets a 1D weight ``w_i(x)`` built from the *actual* overlaps with its
neighbours: zero in the outer ``margin`` px of an inner overlap, a linear ramp across the rest of the
overlap, one elsewhere and one up to the scene's edges. Left/right ramps are complementary and the
weights are normalised, so ``sum_i w_i(x) = 1`` at every pixel (a partition of unity). The 2D weight of
a tile is the outer product of its row and column weights, so the 2D weights sum to one as well: an
identity model reproduces its input, and a model whose receptive field radius is at most ``margin``
reproduces the whole-image result exactly.

Memory: ``BandAccumulator`` holds one band, float32 ``C x tile x W`` (W = scene width); it never
depends on the scene's height.
"""

from collections.abc import Callable, Iterator

import numpy as np

from aerialseg.geo.windows import fit_tile, window_starts

Predict = Callable[[np.ndarray], np.ndarray]
ReadRows = Callable[[int, int], np.ndarray]


def _ramp(overlap_px: int, margin: int) -> np.ndarray:
    """Weight of the *later* tile across an overlap of ``overlap_px`` px (the earlier tile gets 1 - ramp)."""
    j = np.arange(overlap_px, dtype=np.float64)
    m = min(margin, overlap_px // 2)
    width = overlap_px - 2 * m
    if width <= 0:
        return (j >= overlap_px / 2).astype(np.float64)
    return np.clip((j - m + 0.5) / width, 0.0, 1.0)


def axis_weights(length: int, tile: int, starts: list[int], margin: int = 0) -> np.ndarray:
    """(n_tiles, tile) float64 weights along one axis; at every pixel < length they sum to one."""
    n = len(starts)
    raw = np.ones((n, tile), dtype=np.float64)
    for i in range(1, n):
        overlap_px = starts[i - 1] + tile - starts[i]
        if overlap_px <= 0:
            continue
        ramp = _ramp(overlap_px, margin)
        raw[i, :overlap_px] *= ramp
        raw[i - 1, tile - overlap_px:] *= 1.0 - ramp
    total = np.zeros(max(length, tile), dtype=np.float64)
    for start, weights in zip(starts, raw):
        total[start:start + tile] += weights
    if np.any(total[:length] <= 0):
        raise ValueError("tile weights leave a pixel uncovered")
    for i, start in enumerate(starts):
        raw[i] /= np.where(total[start:start + tile] > 0, total[start:start + tile], 1.0)
    return raw


def pad_reflect(stripe: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (C, h, w) at bottom/right to (C, height, width) by reflection (edge-repeat for 1-px sides)."""
    ph, pw = height - stripe.shape[1], width - stripe.shape[2]
    if ph <= 0 and pw <= 0:
        return stripe
    mode = "reflect" if min(stripe.shape[1:]) > 1 else "symmetric"
    return np.pad(stripe, ((0, 0), (0, max(ph, 0)), (0, max(pw, 0))), mode=mode)


class BandAccumulator:
    """Weighted sum of tile outputs over one band of rows: float32 (C, tile, W), rolled down the scene."""

    def __init__(self, channels: int, tile: int, width: int):
        self.width = width
        self.sum = np.zeros((channels, tile, width), dtype=np.float32)
        self.top = 0  # scene row of self.sum[:, 0]

    def add(self, output: np.ndarray, weight: np.ndarray, row: int, col: int) -> None:
        """Add ``output * weight`` (C, t, t) / (t, t) of the tile at scene (row, col), cropped to the scene."""
        r0 = row - self.top
        h = min(output.shape[1], self.sum.shape[1] - r0)
        w = min(output.shape[2], self.width - col)
        self.sum[:, r0:r0 + h, col:col + w] += output[:, :h, :w] * weight[:h, :w]

    def finished(self, rows: int) -> np.ndarray:
        """A view of the top ``rows`` rows, which no later tile touches (valid until ``roll``)."""
        return self.sum[:, :rows]

    def roll(self, rows: int) -> None:
        """Drop the top ``rows`` rows and move the band down the scene by that many."""
        keep = self.sum.shape[1] - rows
        if keep > 0:
            self.sum[:, :keep] = self.sum[:, rows:]
        self.sum[:, max(keep, 0):] = 0.0
        self.top += rows


def blend_scene(read_rows: ReadRows, height: int, width: int, predict: Predict, channels: int, tile: int,
                overlap: int, margin: int = 0, batch: int = 8, on_tiles: Callable[[int], None] | None = None,
                rows: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Run ``predict`` over overlapping tiles; yield (first row, blended (C, rows, W) float32) bands.

    ``read_rows(row, rows)`` returns the scene's (bands, rows, width) pixels; ``predict`` maps a batch
    (N, bands, tile, tile) to (N, channels, tile, tile). Bands come out top to bottom and cover every
    row exactly once. A yielded band is a view into the accumulator: use (or copy) it before asking for
    the next one. ``on_tiles(n)`` is called after each batch (progress bars).

    ``rows=(lo, hi)``: only rows lo..hi-1 (a block of a survey): the tile rows that touch them, on the whole
    scene's grid, in the same batches and order, so every pixel gets the same sums as in the whole run.
    """
    tile, overlap = fit_tile(height, width, tile, overlap)
    rows_at, cols_at = window_starts(height, tile, overlap), window_starts(width, tile, overlap)
    row_w = axis_weights(height, tile, rows_at, margin).astype(np.float32)
    col_w = axis_weights(width, tile, cols_at, margin).astype(np.float32)
    lo, hi = rows or (0, height)
    band = BandAccumulator(channels, tile, width)
    first = next(i for i, row in enumerate(rows_at) if row + tile > lo or i == len(rows_at) - 1)
    band.top = rows_at[first]  # no earlier tile row touches a row >= lo: they add nothing there
    for iy, row in enumerate(rows_at[first:], first):
        stripe = pad_reflect(read_rows(row, min(tile, height - row)), tile, max(width, tile))
        for first in range(0, len(cols_at), batch):
            cols = cols_at[first:first + batch]
            outputs = predict(np.stack([stripe[:, :, c:c + tile] for c in cols]))
            for k, col in enumerate(cols):
                weight = row_w[iy][:, None] * col_w[first + k][None, :]
                band.add(outputs[k], weight, row, col)
            if on_tiles is not None:
                on_tiles(len(cols))
        done = (rows_at[iy + 1] if iy + 1 < len(rows_at) else height) - band.top
        start, stop = max(band.top, lo), min(band.top + done, hi)
        if stop > start:
            yield start, band.finished(stop - band.top)[:, start - band.top:]
        if band.top + done >= hi:
            return
        band.roll(done)
