"""The one window generator: where tiles start along an axis, and grids of windows over a scene.

Tiling (training patches), the seam-free stitcher (infer-scene, evaluate, serve) and rank-scenes all
place windows with ``window_starts``: every ``size - overlap`` px, the last window flush with the edge.
"""

from collections.abc import Iterator

from rasterio.windows import Window


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``size - overlap``, the last window ending on the edge.

    An axis no longer than one window gets the single start 0 (callers that need whole windows check
    ``length >= size`` themselves).
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")
    if length <= size:
        return [0]
    starts = list(range(0, length - size, size - overlap))
    starts.append(length - size)
    return starts


def fit_tile(height: int, width: int, tile: int, overlap: int, multiple: int = 32) -> tuple[int, int]:
    """(tile, overlap) for a scene: a scene smaller than the tile gets a tile of its own size (rounded up to
    ``multiple``) instead of being padded to the full tile (a 256 px scene under a 512 px bundle: 4x the pixels)."""
    side = -(-max(height, width) // multiple) * multiple
    if side >= tile:
        return tile, overlap
    return side, overlap if overlap < side else side // 4


def fresh_spans(starts: list[int], size: int) -> list[tuple[int, int]]:
    """Per window, the absolute [start, stop) not covered by the windows before it (they tile the axis)."""
    spans, covered = [], 0
    for start in starts:
        spans.append((max(covered, start), start + size))
        covered = start + size
    return spans


def grid_windows(height: int, width: int, size: int, overlap: int) -> Iterator[tuple[Window, Window]]:
    """Row-major (window, fresh part of it) pairs covering a height x width scene exactly once."""
    rows, cols = window_starts(height, size, overlap), window_starts(width, size, overlap)
    for row, (r0, r1) in zip(rows, fresh_spans(rows, size)):
        for col, (c0, c1) in zip(cols, fresh_spans(cols, size)):
            yield Window(col, row, size, size), Window(c0, r0, c1 - c0, r1 - r0)
