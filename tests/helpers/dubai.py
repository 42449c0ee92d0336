"""Real Dubai scenes reassembled from their 3x3 parts, GeoTIFF scene/mask pairs, an index and data-stage params:
shared by the data stage tests (tiling, split, augment, datasets)."""

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from rasterio.transform import from_origin

from aerialseg.core.classes import IGNORE
from conftest import shared_path

# Colour -> class of the Dubai masks (SOURCE.md's verified table; unlabeled and black -> ignore).
DUBAI_COLORS = {(60, 16, 152): 4, (132, 41, 246): 0, (110, 193, 228): 1, (254, 221, 58): 3, (226, 169, 41): 2}


@lru_cache(maxsize=8)
def dubai_scene(tile: str) -> tuple[np.ndarray, np.ndarray]:
    """A real Dubai scene reassembled from its row-major 3x3 parts: (RGB HxWx3, classes HxW)."""
    images, masks = [], []
    for k in range(1, 10):
        image = cv2.imread(str(shared_path("dubai-aerial-cc0", tile, "images", f"image_part_{k:03d}.jpg")))
        colours = cv2.imread(str(shared_path("dubai-aerial-cc0", tile, "masks", f"image_part_{k:03d}.png")))
        colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
        mask = np.full(colours.shape[:2], IGNORE, np.uint8)
        for colour, cls in DUBAI_COLORS.items():
            mask[np.all(colours == colour, axis=-1)] = cls
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        masks.append(mask)
    h, w = min(i.shape[0] for i in images), min(i.shape[1] for i in images)  # parts differ by <= 1 px
    rgb = np.vstack([np.hstack([i[:h, :w] for i in images[r:r + 3]]) for r in (0, 3, 6)])
    classes = np.vstack([np.hstack([m[:h, :w] for m in masks[r:r + 3]]) for r in (0, 3, 6)])
    return rgb, classes


def write_pair(folder: Path, name: str, rgb: np.ndarray, mask: np.ndarray, alpha: np.ndarray | None = None,
               nodata: int | None = None, transform: Any = None) -> dict[str, Any]:
    """Scene GeoTIFF (RGB, or RGBA with alpha) + mask GeoTIFF on the same synthetic UTM grid; index entry."""
    folder.mkdir(parents=True, exist_ok=True)
    transform = transform or from_origin(500_000, 2_780_000, 0.5, 0.5)  # stated synthetic grid, EPSG:32640
    profile = dict(driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], crs="EPSG:32640",
                   transform=transform, dtype="uint8")
    bands = rgb.transpose(2, 0, 1) if alpha is None else np.concatenate([rgb.transpose(2, 0, 1), alpha[None]])
    scene, mask_path = folder / f"{name}.tif", folder / f"{name}_mask.tif"
    with rasterio.open(scene, "w", count=len(bands), nodata=nodata, **profile) as ds:
        ds.write(bands)
        if alpha is not None:
            ds.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                              rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
    with rasterio.open(mask_path, "w", count=1, nodata=255, **profile) as ds:
        ds.write(mask, 1)
    return {"scene": str(scene), "mask": str(mask_path), "labels": None, "georeferenced": True}


def write_index(folder: Path, entries: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder / "index.json"


def stage_params(root: Path, tiles: dict | None = None, split: dict | None = None,
                 augment: dict | None = None) -> dict[str, Any]:
    """params for the data stages with every folder under root."""
    return {
        "masks": {"out": str(root / "masks")},
        "tiles": {"out": str(root / "tiles"), "size": 256, "overlap": 64, "keep_empty_fraction": 0.0,
                  "seed": 42, **(tiles or {})},
        "split": {"out": str(root / "split"), "fractions": [0.8, 0.1, 0.1], "group": "block",
                  "block_px": 1024, "seed": 42, **(split or {})},
        "augment": {"out": str(root / "augmented"), "copies": 1, "seed": 42, **(augment or {}),
                    "pipeline": (augment or {}).get("pipeline", [
                        {"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
                        {"name": "RandomRotate90", "p": 0.5},
                        {"name": "RandomBrightnessContrast", "p": 0.3, "brightness_limit": 0.15,
                         "contrast_limit": 0.15}])},
    }


def dubai_pairs(root: Path, tiles: tuple[str, ...]) -> list[dict[str, Any]]:
    """Write real reassembled Dubai scenes as GeoTIFF pairs under root/masks with an index.json."""
    entries = []
    for i, tile in enumerate(tiles):
        rgb, mask = dubai_scene(tile)
        entries.append(write_pair(root / "masks", tile, rgb, mask,
                                  transform=from_origin(500_000 + 5_000 * i, 2_780_000, 0.5, 0.5)))
    write_index(root / "masks", entries)
    return entries


def synthetic_pair(root: Path, name: str = "synth", height: int = 512, width: int = 1024,
                   **kwargs: Any) -> dict[str, Any]:
    """A textured scene whose left half holds buildings (class 4), right half only background."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2][rng.random((height, width // 2)) < 0.3] = 4
    return write_pair(root / "masks", name, rgb, mask, **kwargs)
