"""Timing of label-to-mask (and mask-to-label) on a real-sized synthetic survey scene.

    .venv/bin/python bench/bench_labels.py [--width 6480 --height 4320 --polygons 5000]

Writes a 28-megapixel RGB GeoTIFF (deflate, tiled, nodata 0 in one corner so the valid-data mask is read
window by window) and an AnyLabeling JSON with N shapes (star-shaped polygons of 6-40 vertices, some
rectangles, circles and road centre lines, overlapping), then times each phase and the whole conversion.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

import aerialseg  # noqa: F401
from aerialseg.annotations.labels import (LabelTable, MaskOptions, apply_valid_mask, labels_to_masks, load_label_json,
                              parse_shapes, rasterize_shapes, resolve_scene)
from aerialseg.annotations.polygonize import mask_to_shapes

LABELS = ("building", "road", "water", "tree", "background")


def make_scene(path: Path, width: int, height: int) -> None:
    """Smooth RGB gradient with a nodata (0) triangle in the top-left corner, written in row strips."""
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8", "nodata": 0,
               "crs": "EPSG:32640", "transform": Affine(0.05, 0, 300000, 0, -0.05, 2790000),
               "compress": "deflate", "tiled": True, "blockxsize": 512, "blockysize": 512}
    cols = np.arange(width)
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, height, 512):
            rows = np.arange(row, min(row + 512, height))[:, None]
            band = (1 + (cols[None, :] + rows) % 254).astype(np.uint8)
            band[cols[None, :] + rows < min(width, height) // 4] = 0
            ds.write(np.stack([band, band, band]), window=((row, row + len(rows)), (0, width)))


def random_shape(rng: np.random.Generator, width: int, height: int) -> dict:
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    radius = rng.uniform(10, 150)
    label = LABELS[rng.integers(len(LABELS))]
    kind = rng.choice(["polygon"] * 8 + ["rectangle", "circle", "line"])
    if kind == "polygon":
        n = int(rng.integers(6, 41))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = radius * rng.uniform(0.5, 1.0, n)
        points = np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]
    elif kind == "rectangle":
        points = np.array([[cx - radius, cy - radius / 2], [cx + radius, cy + radius / 2]])
    elif kind == "circle":
        points = np.array([[cx, cy], [cx + radius, cy]])
    else:
        label, kind = "road", "linestrip"
        points = np.c_[cx + np.cumsum(rng.uniform(-200, 200, 5)), cy + np.cumsum(rng.uniform(-200, 200, 5))]
    return {"label": label, "points": points.round(2).tolist(), "group_id": None, "description": "",
            "shape_type": kind, "flags": {}}


def make_labels(path: Path, scene: Path, width: int, height: int, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    doc = {"version": "2.4.0", "flags": {}, "shapes": [random_shape(rng, width, height) for _ in range(count)],
           "imagePath": scene.name, "imageData": None, "imageHeight": height, "imageWidth": width}
    path.write_text(json.dumps(doc), encoding="utf-8")


def timed(label: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"  {label:<38} {time.perf_counter() - start:7.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6480)
    parser.add_argument("--height", type=int, default=4320)
    parser.add_argument("--polygons", type=int, default=5000)
    args = parser.parse_args()
    table = LabelTable({name: i for i, name in enumerate(("background", "road", "water", "tree", "building"))})
    options = MaskOptions()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene, labels = tmp / "scene.tif", tmp / "scene.json"
        make_scene(scene, args.width, args.height)
        make_labels(labels, scene, args.width, args.height, args.polygons)
        mp = args.width * args.height / 1e6
        print(f"label-to-mask: {args.width}x{args.height} ({mp:.1f} MP) GeoTIFF, {args.polygons} shapes, "
              f"JSON {labels.stat().st_size / 1e6:.1f} MB")
        doc = timed("parse JSON", load_label_json, labels)
        info = timed("resolve scene (header only)", resolve_scene, doc, labels, None)
        shapes, _ = timed("shapes -> geometries (+ make_valid)", parse_shapes, doc, labels, table,
                          info.width, info.height, options)
        mask = timed("rasterize (one GDAL call)", rasterize_shapes, shapes, info.width, info.height, options)
        timed("valid-data mask, 1024-row strips", apply_valid_mask, mask, info)
        print(f"  -> {len(shapes)} area shapes burnt, {(mask == 255).sum()} nodata px set to ignore")
        start = time.perf_counter()
        labels_to_masks([labels], tmp / "masks", table, options)
        print(f"  {'TOTAL labels_to_masks (validate+write)':<38} {time.perf_counter() - start:7.2f} s")
        crop = mask[: min(2048, mask.shape[0]), : min(2048, mask.shape[1])]
        shapes_out = timed(f"mask_to_shapes on a {crop.shape[1]}x{crop.shape[0]} crop", mask_to_shapes, crop)
        print(f"  -> {len(shapes_out)} polygons")


if __name__ == "__main__":
    main()
