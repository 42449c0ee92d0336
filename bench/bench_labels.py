"""Timing of label-to-mask (and mask-to-label) on a real-sized synthetic survey scene, against labelme.

    .venv/bin/python bench/bench_labels.py [--width 6480 --height 4320 --polygons 5000]

Writes a 28-megapixel RGB GeoTIFF (deflate, tiled, nodata 0 in one corner so the valid-data mask is read
window by window) and an AnyLabeling JSON with N shapes (star-shaped polygons of 6-40 vertices, some
rectangles, circles and road centre lines, overlapping), then times each phase of label-to-mask and the whole
conversion. In the same run it times labelme's own ``shape_to_mask`` over the same shapes (from the
reference-tools venv of tests/helpers/reference_tools.py, built on first use) and prints the ratio
aerialseg / labelme (<= 1.0: label-to-mask is no slower than labelme).
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

import aerialseg  # noqa: F401
from aerialseg.annotations.anylabeling import LabelTable, load_label_json, parse_shapes, resolve_scene
from aerialseg.annotations.labels import apply_valid_mask, labels_to_masks
from aerialseg.annotations.polygonize import mask_to_shapes
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes, self_intersecting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference_tools  # noqa: E402

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
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:7.2f} s")
    return result, seconds


def labelme_seconds(labels: Path, line_width: int, shapes: int) -> dict[str, float] | None:
    """labelme's shape_to_mask timed in the reference venv (None when it cannot be built)."""
    try:
        python = reference_tools.reference_venv()
    except reference_tools.ReferenceUnavailable as exc:
        print(f"  labelme: not timed ({exc})")
        return None
    job = {"tool": "labelme-timing", "json": str(labels), "line_width": line_width, "full_image_shapes": 20}
    timing = reference_tools.run_reference([job], python)[0]
    print(f"  {'labelme shape_to_mask, each shape on its box':<44} {timing['cropped_s']:7.2f} s")
    print(f"  {'labelme shape_to_mask on the full image':<44} {timing['full_image_per_shape_s'] * 1e3:7.1f} ms per "
          f"shape (as labelme's shapes_to_label calls it; ~{timing['full_image_per_shape_s'] * shapes:.0f} s "
          f"for all {shapes}, from 20 shapes)")
    return timing


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
        doc, t_json = timed("parse JSON", load_label_json, labels)
        info, _ = timed("resolve scene (header only)", resolve_scene, doc, labels, None)
        (shapes, _), t_shapes = timed("check shapes", parse_shapes, doc, labels, table)
        mask, t_paint = timed("paint (tools' rule, Pillow)", rasterize_shapes, shapes, info.width, info.height,
                              options)
        crossing, t_report = timed("self-intersection report", self_intersecting, shapes)
        timed("valid-data mask, 1024-row strips", apply_valid_mask, mask, info)
        print(f"  -> {len(shapes)} shapes painted ({len(crossing)} self-intersecting), "
              f"{(mask == 255).sum()} nodata px set to ignore")
        _, t_total = timed("TOTAL labels_to_masks (read, check, write)", labels_to_masks, [labels], tmp / "masks",
                           table, options)
        corner = MaskOptions(vertex_convention="corner")
        timed("paint (GIS corner rule, rasterio)", rasterize_shapes, shapes, info.width, info.height, corner)
        timing = labelme_seconds(labels, options.line_width_px, args.polygons)
        if timing:
            ours = t_json + t_shapes + t_paint + t_report
            print(f"ratio aerialseg / labelme (JSON -> checked, painted mask in memory vs shape_to_mask on each box): "
                  f"{ours:.2f} s / {timing['cropped_s']:.2f} s = {ours / timing['cropped_s']:.2f}")
        crop = mask[: min(2048, mask.shape[0]), : min(2048, mask.shape[1])]
        shapes_out, _ = timed(f"mask_to_shapes on a {crop.shape[1]}x{crop.shape[0]} crop", mask_to_shapes, crop)
        print(f"  -> {len(shapes_out)} polygons, {sum(len(s['points']) for s in shapes_out)} vertices")


if __name__ == "__main__":
    main()
