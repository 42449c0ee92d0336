"""tiles stage (`aerialseg tiles`, params ``tiles``): index patch windows of every masked scene, drop empty ones.

Writes ``tiles.out``/manifest.json (the window index; no patch images), summary.json and previews/.
"""

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aerialseg.core.config import DEFAULT_PARAMS, section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json, write_text
from aerialseg.data.tiling import (COUNT_KEYS, MANIFEST_NAME, TileParams, count_windows, manifest_text, raster_shape,
                                   read_mask_index, scene_names, tile_scene, totals, write_png)

log = logging.getLogger(__name__)


def tile_params(params: dict[str, Any]) -> TileParams:
    """Read and check params.yaml `tiles`."""
    tiles = section(params, "tiles")
    try:
        tp = TileParams(size=int(tiles.get("size", 256)), overlap=int(tiles.get("overlap", 64)),
                        keep_empty_fraction=float(tiles.get("keep_empty_fraction", 0.0)),
                        seed=int(tiles.get("seed", 42)))
    except (TypeError, ValueError) as exc:
        raise AerialsegError(f"tiles: {exc}", DEFAULT_PARAMS, "use numbers for size, overlap, "
                             "keep_empty_fraction and seed") from None
    if tp.size < 8:
        raise AerialsegError(f"tiles.size must be at least 8 (got {tp.size})", DEFAULT_PARAMS)
    if not 0 <= tp.overlap < tp.size:
        raise AerialsegError(f"tiles.overlap must be in [0, size) (got {tp.overlap})", DEFAULT_PARAMS,
                             f"set tiles.overlap between 0 and {tp.size - 1}")
    if not 0.0 <= tp.keep_empty_fraction <= 1.0:
        raise AerialsegError(f"tiles.keep_empty_fraction must be in [0, 1] (got {tp.keep_empty_fraction})",
                             DEFAULT_PARAMS)
    return tp



def run(params: dict[str, Any]) -> Path:
    """Tile every scene of data/masks/index.json; write manifest.json, summary.json (no patch list), previews/."""
    tp = tile_params(params)
    index_path = Path(section(params, "masks").get("out", "data/masks")) / "index.json"
    out_dir = Path(section(params, "tiles").get("out", "data/tiles"))
    entries = read_mask_index(index_path)
    names = scene_names(entries)
    total = sum(count_windows(*raster_shape(str(e["scene"])), tp) for e in entries)
    patches, scenes = [], []
    with tqdm(total=total, desc="tiles", unit="win", leave=False, disable=None) as progress:
        for entry, name in zip(entries, names):
            result = tile_scene(entry, name, tp, progress)
            preview = write_png(out_dir / "previews" / f"{name}.png", result.preview)
            scenes.append({**result.summary, "preview": str(preview)})
            patches.extend(result.patches)
    if not patches:
        raise AerialsegError("no patch holds a road, water, tree or building pixel", index_path,
                             "check the masks, or raise tiles.keep_empty_fraction")
    manifest = {
        "version": 1, "size": tp.size, "overlap": tp.overlap, "stride": tp.stride,
        "keep_empty_fraction": tp.keep_empty_fraction, "seed": tp.seed, "count_keys": list(COUNT_KEYS),
        "totals": totals(scenes, patches), "scenes": scenes, "patches": patches,
    }
    write_json(out_dir / "summary.json", {k: v for k, v in manifest.items() if k != "patches"})
    for stale in (out_dir / "previews").glob("*.png"):
        if stale.stem not in names:
            stale.unlink()
    return write_text(out_dir / MANIFEST_NAME, manifest_text(manifest))
