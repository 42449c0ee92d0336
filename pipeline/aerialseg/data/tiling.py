"""tiles stage: cut every scene into overlapping patch windows, drop empty ones, write a window index.

No patch is written as an image: ``data/tiles/manifest.json`` lists the windows (scene, mask, row/col
offset, size, class pixel counts) and the loader reads them from the rasters on the fly. Windows step by
``stride = size - overlap``; the last row and column of windows is shifted to end flush with the scene
edge, so every pixel is covered and no padding is needed.

A patch is *empty* when it holds no pixel of class 1..4 (only background, ignore or nodata); empty
patches are dropped except for a seeded random ``keep_empty_fraction`` of them. A patch with no labelled
pixel at all (only ignore or nodata) is always dropped.
"""

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES, colorize
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, read_stage_json
from aerialseg.geo.scene import SceneReader, window_label
from aerialseg.geo.windows import grid_windows, window_starts
from aerialseg.geo.raster import is_georeferenced, open_raster, valid_mask

log = logging.getLogger(__name__)

COUNT_KEYS: tuple[str, ...] = (*CLASS_NAMES, "ignore")  # order of every "counts" list
PREVIEW_PX = 1024  # longest side of a scene preview
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TileParams:
    """The knobs of the tiles stage (params.yaml `tiles`)."""

    size: int = 256
    overlap: int = 64
    keep_empty_fraction: float = 0.0
    seed: int = 42

    @property
    def stride(self) -> int:
        return self.size - self.overlap


# --- window geometry ------------------------------------------------------------------------------

# --- reading windows (shared with data.py and augment.py) ------------------------------------------

def read_rgb(ds: rasterio.DatasetReader, window: Window, path: str | Path = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a window of a scene, read by the one scene reader (aerialseg.geo.scene)."""
    return SceneReader(ds, path or ds.name).read_hwc(window)


def read_labels(mask_ds: rasterio.DatasetReader, scene_ds: rasterio.DatasetReader, window: Window,
                mask_path: str | Path = "") -> np.ndarray:
    """(H, W) uint8 class mask of a window; nodata/alpha pixels of the scene become ignore (255)."""
    return read_labels_valid(mask_ds, scene_ds, window, mask_path)[0]


def read_labels_valid(mask_ds: rasterio.DatasetReader, scene_ds: rasterio.DatasetReader, window: Window,
                      mask_path: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """The class mask of a window (nodata/alpha -> 255) and the scene's valid-data mask there."""
    try:
        labels = mask_ds.read(1, window=window)
        valid = valid_mask(scene_ds, window)
    except RasterioError as exc:
        raise AerialsegError(f"cannot read window {window_label(window)} ({str(exc)[:100]})",
                             mask_path or mask_ds.name, "re-export the file; it is corrupt or truncated") from None
    labels[~valid] = IGNORE
    return labels, valid


# --- counting and keeping -------------------------------------------------------------------------

def class_counts(labels: np.ndarray, mask_path: str | Path = "") -> list[int]:
    """Pixel counts [background, road, water, tree, building, ignore]; other values are an error."""
    hist = np.bincount(labels.ravel(), minlength=256)
    stray = np.flatnonzero(hist[NUM_CLASSES:IGNORE])
    if stray.size:
        raise AerialsegError(f"mask holds value {int(stray[0]) + NUM_CLASSES}, expected 0..{NUM_CLASSES - 1} "
                             f"or {IGNORE}", mask_path, "rebuild it with aerialseg label-to-mask")
    return [int(c) for c in hist[:NUM_CLASSES]] + [int(hist[IGNORE])]


def patch_uniform(seed: int, patch_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, patch id): independent of scene order."""
    digest = hashlib.sha256(f"{seed}:{patch_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patch_fate(counts: list[int], tp: TileParams, patch_id: str) -> str:
    """'kept', 'kept_empty', 'dropped_empty' or 'dropped_no_label' (only ignore/nodata)."""
    if sum(counts[:NUM_CLASSES]) == 0:
        return "dropped_no_label"
    if sum(counts[1:NUM_CLASSES]) > 0:
        return "kept"
    keep = patch_uniform(tp.seed, patch_id) < tp.keep_empty_fraction
    return "kept_empty" if keep else "dropped_empty"


def patch_id(scene_name: str, row: int, col: int) -> str:
    return f"{scene_name}_r{row}_c{col}"


# --- the mask index -------------------------------------------------------------------------------

def read_mask_index(path: Path) -> list[dict[str, Any]]:
    """data/masks/index.json: a list of {scene, mask, labels, georeferenced}."""
    entries = read_stage_json(path, "mask index", "label-to-mask")
    if isinstance(entries, dict):  # tolerate {"scenes": [...]}
        entries = entries.get("scenes", entries.get("entries"))
    if not isinstance(entries, list) or not entries:
        raise AerialsegError("mask index must be a non-empty list of {scene, mask}", path,
                             "rerun aerialseg label-to-mask")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("scene") or not entry.get("mask"):
            raise AerialsegError(f"entry {i} lacks 'scene' or 'mask'", path, "rerun aerialseg label-to-mask")
    return entries


def scene_names(entries: list[dict[str, Any]]) -> list[str]:
    """A unique short name per scene: the file stem, prefixed by its folder when stems repeat."""
    stems = [Path(e["scene"]).stem for e in entries]
    names = [s if stems.count(s) == 1 else f"{Path(e['scene']).parent.name}_{s}" for s, e in zip(stems, entries)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def check_pair(scene_ds: rasterio.DatasetReader, mask_ds: rasterio.DatasetReader, scene_path: str,
               mask_path: str, size: int) -> None:
    """Scene and mask must share a grid, hold 8-bit data, and be at least one patch large."""
    SceneReader(scene_ds, scene_path)  # refuses scenes the models cannot read (dtype, bands)
    if mask_ds.dtypes[0] != "uint8":
        raise AerialsegError(f"mask is {mask_ds.dtypes[0]}, expected uint8 classes", mask_path,
                             "rebuild it with aerialseg label-to-mask")
    if (mask_ds.height, mask_ds.width) != (scene_ds.height, scene_ds.width):
        raise AerialsegError(f"mask is {mask_ds.width}x{mask_ds.height} px but its scene {scene_path} is "
                             f"{scene_ds.width}x{scene_ds.height}", mask_path,
                             "rebuild the mask from this scene with aerialseg label-to-mask")
    if is_georeferenced(scene_ds) and is_georeferenced(mask_ds) and (
            mask_ds.crs != scene_ds.crs or not mask_ds.transform.almost_equals(scene_ds.transform)):
        raise AerialsegError(f"mask is not on the grid (CRS/transform) of its scene {scene_path}", mask_path,
                             "rebuild the mask from this scene with aerialseg label-to-mask")
    if scene_ds.height < size or scene_ds.width < size:
        raise AerialsegError(f"scene is {scene_ds.width}x{scene_ds.height} px, smaller than one "
                             f"{size}x{size} patch", scene_path,
                             f"lower tiles.size to at most {min(scene_ds.height, scene_ds.width)}")


# --- one scene ------------------------------------------------------------------------------------

@dataclass
class SceneTiles:
    """What tiling one scene produced."""

    patches: list[dict[str, Any]]
    summary: dict[str, Any]
    preview: np.ndarray  # RGB thumbnail with the kept patches outlined


class Thumbnail:
    """Nearest-neighbour thumbnail of a scene and its mask, filled from the windows as they are read."""

    def __init__(self, height: int, width: int, longest: int = PREVIEW_PX):
        self.step = max(1, math.ceil(max(height, width) / longest))
        self.image = np.zeros((math.ceil(height / self.step), math.ceil(width / self.step), 3), np.uint8)
        self.labels = np.full(self.image.shape[:2], IGNORE, np.uint8)

    def paste(self, window: Window, fresh: Window, rgb: np.ndarray, labels: np.ndarray) -> None:
        """Copy the sampled pixels of the fresh part of a window."""
        k = self.step
        r0, c0 = -(-int(fresh.row_off) // k), -(-int(fresh.col_off) // k)
        r1 = -(-int(fresh.row_off + fresh.height) // k)
        c1 = -(-int(fresh.col_off + fresh.width) // k)
        rows = np.arange(r0, r1) * k - int(window.row_off)
        cols = np.arange(c0, c1) * k - int(window.col_off)
        self.image[r0:r1, c0:c1] = rgb[np.ix_(rows, cols)]
        self.labels[r0:r1, c0:c1] = labels[np.ix_(rows, cols)]

    def render(self, patches: list[dict[str, Any]]) -> np.ndarray:
        """Scene with its mask blended in, kept patches outlined, everything no kept patch covers dimmed."""
        overlay = colorize(self.labels)
        labelled = self.labels != IGNORE
        out = self.image.copy()
        out[labelled] = (0.6 * out[labelled] + 0.4 * overlay[labelled]).astype(np.uint8)
        covered = np.zeros(self.labels.shape, dtype=bool)
        for p in patches:
            covered[p["row"] // self.step:-(-(p["row"] + p["height"]) // self.step),
                    p["col"] // self.step:-(-(p["col"] + p["width"]) // self.step)] = True
        out[~covered] //= 3
        for p in patches:
            colour = (255, 255, 255) if not p["empty"] else (128, 128, 128)
            top_left = (p["col"] // self.step, p["row"] // self.step)
            bottom_right = ((p["col"] + p["width"]) // self.step - 1, (p["row"] + p["height"]) // self.step - 1)
            cv2.rectangle(out, top_left, bottom_right, colour, 1)
        return out


def tile_scene(entry: dict[str, Any], name: str, tp: TileParams, progress: tqdm | None = None) -> SceneTiles:
    """Read one scene window by window; count classes; keep or drop each patch."""
    scene_path, mask_path = str(entry["scene"]), str(entry["mask"])
    with open_raster(scene_path) as scene_ds, open_raster(mask_path) as mask_ds:
        check_pair(scene_ds, mask_ds, scene_path, mask_path, tp.size)
        thumb = Thumbnail(scene_ds.height, scene_ds.width)
        fates = dict.fromkeys(("kept", "kept_empty", "dropped_empty", "dropped_no_label"), 0)
        scene_counts = np.zeros(len(COUNT_KEYS), np.int64)
        valid_pixels, patches = 0, []
        for window, fresh in grid_windows(scene_ds.height, scene_ds.width, tp.size, tp.overlap):
            rgb = read_rgb(scene_ds, window, scene_path)
            labels, valid = read_labels_valid(mask_ds, scene_ds, window, mask_path)
            counts = class_counts(labels, mask_path)
            fresh_part = np.s_[int(fresh.row_off - window.row_off):, int(fresh.col_off - window.col_off):]
            scene_counts += class_counts(labels[fresh_part], mask_path)
            valid_pixels += int(valid[fresh_part].sum())
            thumb.paste(window, fresh, rgb, labels)
            row, col = int(window.row_off), int(window.col_off)
            pid = patch_id(name, row, col)
            fate = patch_fate(counts, tp, pid)
            fates[fate] += 1
            if fate.startswith("kept"):
                patches.append({"id": pid, "scene": scene_path, "mask": mask_path, "scene_name": name,
                                "row": row, "col": col, "height": tp.size, "width": tp.size,
                                "counts": counts, "empty": fate == "kept_empty"})
            if progress is not None:
                progress.update(1)
        if valid_pixels == 0:
            raise AerialsegError("scene holds no valid pixel (nodata or transparent everywhere)", scene_path,
                                 "check its nodata value / alpha band, or leave it out")
        summary = {"scene_name": name, "scene": scene_path, "mask": mask_path, **grid_record(scene_ds),
                   "windows": sum(fates.values()), **fates,
                   "valid_fraction": round(valid_pixels / (scene_ds.height * scene_ds.width), 6),
                   "counts": [int(c) for c in scene_counts]}
    return SceneTiles(patches, summary, thumb.render(patches))


def grid_record(ds: rasterio.DatasetReader) -> dict[str, Any]:
    """Size, CRS and geotransform of a scene (JSON-able)."""
    geo = is_georeferenced(ds)
    return {"width": ds.width, "height": ds.height, "georeferenced": geo,
            "crs": ds.crs.to_string() if geo else None, "transform": list(ds.transform)[:6] if geo else None}


def count_windows(height: int, width: int, tp: TileParams) -> int:
    if height < tp.size or width < tp.size:
        return 0
    return len(window_starts(height, tp.size, tp.overlap)) * len(window_starts(width, tp.size, tp.overlap))


def raster_shape(path: str) -> tuple[int, int]:
    with open_raster(path) as ds:
        return ds.height, ds.width


def write_png(dest: Path, rgb: np.ndarray) -> Path:
    """Write an RGB array as PNG atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {dest}")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data.tobytes())
    return dest


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as indented JSON with one line per patch (compact for 10^5 patches, still diffable)."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "patches"}, indent=2, ensure_ascii=False)
    rows = ",\n".join("    " + json.dumps(p, ensure_ascii=False) for p in manifest["patches"])
    return f'{head[:-2]},\n  "patches": [\n{rows}\n  ]\n}}\n'


def totals(scenes: list[dict[str, Any]], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over scenes: windows, fates, scene pixel counts and kept-patch pixel counts."""
    keys = ("windows", "kept", "kept_empty", "dropped_empty", "dropped_no_label")
    out: dict[str, Any] = {"scenes": len(scenes), **{k: sum(s[k] for s in scenes) for k in keys}}
    out["scene_counts"] = [int(sum(s["counts"][i] for s in scenes)) for i in range(len(COUNT_KEYS))]
    out["patch_counts"] = [int(sum(p["counts"][i] for p in patches)) for i in range(len(COUNT_KEYS))]
    return out


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read data/tiles/manifest.json with a clear error when it is missing or broken."""
    path = Path(path)
    manifest = read_stage_json(path, "tile manifest", "tiles")
    if not isinstance(manifest, dict) or "patches" not in manifest:
        raise AerialsegError("not a tile manifest (no 'patches')", path, "rerun aerialseg tiles")
    return manifest


def describe(manifest: dict[str, Any]) -> str:
    """A short human summary of a manifest (printed by the CLI)."""
    t = manifest["totals"]
    lines = [f"{t['scenes']} scene(s), {t['windows']} windows of {manifest['size']} px "
             f"(stride {manifest['stride']}): kept {t['kept']} + {t['kept_empty']} empty, "
             f"dropped {t['dropped_empty']} empty and {t['dropped_no_label']} without labels"]
    for s in manifest["scenes"]:
        lines.append(f"  {s['scene_name']}: {s['width']}x{s['height']} px, {s['windows']} windows, "
                     f"kept {s['kept'] + s['kept_empty']}, valid {100 * s['valid_fraction']:.1f}%")
    return "\n".join(lines)
