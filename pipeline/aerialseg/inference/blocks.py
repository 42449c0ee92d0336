"""A very large scene mapped as blocks (infer-survey, ``survey.block_rows``) and stitched back into the map that
infer-scene makes of it, byte for byte.

A block is a band of the scene's rows, full width, cut where a tile row starts (on the model's grid). Its task
predicts every tile that touches its rows, on the whole scene's tile grid, in the same batches (a tile row's
tiles, ``infer.batch`` at a time from its left edge) and adds them in the same order as infer-scene
(``stitch.blend_scene(rows=...)``): each pixel's float32 sum is the same sequence of the same numbers, so its
class and confidence are the same bytes. The block writes its rows (class + confidence GeoTIFFs) into a folder
on ``--out``; ``assemble`` copies the blocks in order into the scene's stripe file and makes every output from
it exactly as infer-scene does (COG, confidence, polygons, areas), each renamed into place.

Why bands and not squares: a model's output for one tile may depend on the other tiles of its batch (how many,
which algorithm the runtime picks for that shape; GPUs especially), so a block must run infer-scene's very
batches. A square block would have to run the whole batches its edge tiles belong to (up to ``batch - 1`` extra
tiles per tile row on each side); a band runs whole tile rows and pays one tile row per cut (the row that
straddles it, computed by both blocks): ``tile / block_rows`` extra, 512 / 16384 = 3 %. Memory per block task
is infer-scene's (it depends on the scene's width, not its height).
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, sha256_file
from aerialseg.geo.raster import open_raster
from aerialseg.geo.windows import fit_tile, window_starts
from aerialseg.inference.scene import (Grid, InferOptions, class_writers, open_scene, predict_scene,
                                       resample_scale, write_outputs)


def cut_rows(height: int, width: int, scale: float, tile: int, overlap: int, block_rows: int) -> list[tuple[int, int]]:
    """Scene-row ranges [y0, y1) of the blocks: ceil(height / block_rows) bands of about equal height, each cut
    at the tile row start nearest its share (on the model grid); one block when the scene is not taller than
    ``block_rows`` or it is 0."""
    if not block_rows or height <= block_rows:
        return [(0, height)]
    grid = Grid(height, width, scale)
    mh, n = grid.model_height, -(-height // block_rows)
    starts = window_starts(mh, *fit_tile(mh, grid.model_width, tile, overlap))
    cuts = sorted({min(starts, key=lambda s: abs(s - k * mh / n)) for k in range(1, n)} - {0})
    if scale != 1.0:  # model row -> the first scene row that reads it
        index = grid.model_index(height, mh)
        cuts = [int(np.searchsorted(index, c, side="left")) for c in cuts]
    bounds = [0, *cuts, height]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The scene's warnings (e.g. its GSD) are logged by the tasks that map it, not again by the planner."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plan_blocks(scene: Path, bundle: Any, options: InferOptions, block_rows: int) -> list[tuple[int, int]]:
    """The blocks of one scene (one block = map it whole); an unreadable scene is one block (its task says why)."""
    if not block_rows:
        return [(0, 0)]
    try:
        with _quiet("aerialseg.inference.scene"), open_raster(scene) as ds:
            scale = resample_scale(ds, bundle, options, scene)
            overlap = bundle.overlap if options.overlap is None else int(options.overlap)
            return cut_rows(ds.height, ds.width, scale, bundle.tile_size, overlap, block_rows)
    except Exception:  # noqa: BLE001  (the scene's own task reports the error)
        return [(0, 0)]


def _rows_file(folder: Path, rows: tuple[int, int], role: str) -> Path:
    return folder / f"rows-{rows[0]:09d}-{rows[1]:09d}-{role}.tif"


def map_block(scene: Path, model: Path, bundle: Any, predict: Any, out: Path, rows: tuple[int, int], folder: Path,
              options: InferOptions) -> dict[str, Any]:
    """Map scene rows [y0, y1) into ``folder`` (class + confidence GeoTIFFs, renamed into place); returns
    {rows, tiles, counts, files: {role: {file, sha256}}}. ``out`` is the scene's map (checked as infer-scene)."""
    with open_scene(scene, model, bundle, out, options) as job:
        if not 0 <= rows[0] < rows[1] <= job.ds.height:
            raise AerialsegError(f"block rows {list(rows)} outside the scene's {job.ds.height}", scene,
                                 "the scene changed since the survey was planned: run infer-survey again")
        paths = {"map": _rows_file(folder, rows, "classes")}
        if options.confidence:
            paths["confidence"] = _rows_file(folder, rows, "confidence")
        with ExitStack() as stack:
            tmp = {role: stack.enter_context(atomic_path(path)) for role, path in paths.items()}
            counts, tiles = predict_scene(job.reader, predict, bundle.num_classes, bundle.tile_size, job.overlap,
                                          job.margin, options.batch, job.grid, tmp["map"], tmp.get("confidence"),
                                          options.cog_blocksize, False, rows)
        files = {role: {"file": p.name, "sha256": sha256_file(p)} for role, p in paths.items()}
    return {"rows": list(rows), "tiles": tiles, "files": files,
            "counts": {int(v): int(n) for v, n in enumerate(counts) if n}}


def _check_blocks(blocks: list[dict[str, Any]], folder: Path, height: int, scene: Path) -> None:
    """The blocks cover rows 0..height-1 once, in order, and each file hashes as its task recorded."""
    bounds = [tuple(b["rows"]) for b in blocks]
    if [b[0] for b in bounds] != [0, *(b[1] for b in bounds[:-1])] or bounds[-1][1] != height:
        raise AerialsegError(f"blocks {bounds} do not cover the scene's {height} rows", scene,
                             "run infer-survey again")
    for block in blocks:
        for role, rec in block["files"].items():
            path = folder / rec["file"]
            if not path.is_file() or sha256_file(path) != rec["sha256"]:
                raise AerialsegError(f"block file {rec['file']} is missing or changed", path, "run infer-survey again")


def _copy_rows(sources: list[Path], writer: Any, chunk: int) -> None:
    """Append every row of the block files, in order, to a RowWriter (``chunk`` rows in memory at a time)."""
    for source in sources:
        with rasterio.open(source) as ds:
            for row in range(0, ds.height, chunk):
                writer.write(ds.read(1, window=Window(0, row, ds.width, min(chunk, ds.height - row))))


def assemble(scene: Path, model: Path, bundle: Any, out: Path, blocks: list[dict[str, Any]], folder: Path,
             options: InferOptions) -> dict[str, Any]:
    """The scene's outputs from its blocks (ordered by rows), as infer-scene writes them; returns map_with's dict."""
    blocks = sorted(blocks, key=lambda b: b["rows"][0])
    with open_scene(scene, model, bundle, out, options) as job:
        _check_blocks(blocks, folder, job.ds.height, scene)
        counts = np.zeros(256, dtype=np.int64)
        for block in blocks:
            for value, n in block["counts"].items():
                counts[int(value)] += n

        def fill(work: Path) -> tuple[np.ndarray, int]:
            conf = work / "confidence.tif" if options.confidence else None
            with ExitStack() as stack, warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                writers = class_writers(stack, job.ds, work / "classes.tif", conf, options.cog_blocksize)
                for writer, role in zip(writers, ("map", "confidence")):
                    _copy_rows([folder / b["files"][role]["file"] for b in blocks], writer, options.cog_blocksize)
                    writer.close()
            return counts, sum(b["tiles"] for b in blocks)

        return write_outputs(job, scene, options, fill)
