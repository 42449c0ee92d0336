"""A survey unlike the embedded sample, built on the fly: labelme 5.8 JSON beside plain JPEGs that label only
tree and building (circles, rectangles, polygons), and the same kind of scenes as GeoTIFFs in EPSG:3857 (at
37.85° N, web-map tiles) and EPSG:4326. Deterministic for a seed; nothing is downloaded."""

import json
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageDraw
from rasterio.transform import from_origin

SIZE = 256
LAT, LON = 37.85, -122.3
MERCATOR_PX = 1.194  # m per pixel of a zoom-17 web-map tile in EPSG:3857 units
DEGREE_PX = 0.94 / 111_320.0  # ~0.94 m ground pixels in EPSG:4326


def _shapes(rng: np.random.Generator) -> list[dict]:
    """2-4 trees (circles or polygons) and 1-3 buildings (rectangles), labelme shape records."""
    shapes = []
    for _ in range(int(rng.integers(2, 5))):
        cx, cy, r = (float(v) for v in (*rng.integers(30, SIZE - 30, 2), rng.integers(12, 28)))
        if rng.random() < 0.5:
            shapes.append({"label": "tree", "points": [[cx, cy], [cx + r, cy]], "shape_type": "circle"})
        else:
            angles = np.linspace(0, 2 * np.pi, 7)[:-1]
            points = [[cx + r * np.cos(a), cy + r * np.sin(a)] for a in angles]
            shapes.append({"label": "tree", "points": points, "shape_type": "polygon"})
    for _ in range(int(rng.integers(1, 4))):
        x, y = (float(v) for v in rng.integers(10, SIZE - 60, 2))
        w, h = (float(v) for v in rng.integers(20, 50, 2))
        shapes.append({"label": "building", "points": [[x, y], [x + w, y + h]], "shape_type": "rectangle"})
    return [{**s, "group_id": None, "description": "", "flags": {}, "mask": None} for s in shapes]


def _paint(shapes: list[dict], rng: np.random.Generator) -> np.ndarray:
    """RGB pixels: sandy ground, green canopies, grey/red roofs (what the labels say, with noise)."""
    ground = rng.normal((190, 170, 130), 12, (SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(ground)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        (x0, y0), (x1, y1) = s["points"][0], s["points"][-1]
        if s["shape_type"] == "circle":
            r = float(np.hypot(x1 - x0, y1 - y0))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=(40, 110, 45))
        elif s["shape_type"] == "polygon":
            draw.polygon([tuple(p) for p in s["points"]], fill=(35, 95, 40))
        else:
            draw.rectangle([x0, y0, x1, y1], fill=(150, 60, 50) if rng.random() < 0.5 else (120, 120, 125))
    return np.asarray(image)


def _label(name: str, shapes: list[dict]) -> dict:
    return {"version": "5.8.1", "flags": {}, "shapes": shapes, "imagePath": name, "imageData": None,
            "imageHeight": SIZE, "imageWidth": SIZE}


def _geotiff(path: Path, pixels: np.ndarray, crs: str, index: int) -> None:
    if crs == "EPSG:3857":
        x0, y0 = -13_614_000.0 + index * SIZE * MERCATOR_PX, 4_557_000.0
        transform = from_origin(x0, y0, MERCATOR_PX, MERCATOR_PX)
    else:
        step = DEGREE_PX / np.cos(np.radians(LAT))
        transform = from_origin(LON + index * SIZE * step, LAT, step, DEGREE_PX)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs=crs,
                       transform=transform) as ds:
        ds.write(pixels.transpose(2, 0, 1))


def make_survey(root: Path, jpegs: int = 20, geotiffs: int = 2, seed: int = 7) -> tuple[Path, Path]:
    """labels/ (JSON) and images/ (JPEG + GeoTIFF scenes) under ``root``; returns (labels, images)."""
    rng = np.random.default_rng(seed)
    labels, images = root / "labels", root / "images"
    labels.mkdir(parents=True)
    images.mkdir(parents=True)
    names = [f"tile_{i:03d}.jpg" for i in range(jpegs)]
    names += [f"mercator_{i}.tif" for i in range(geotiffs)] + [f"wgs84_{i}.tif" for i in range(geotiffs)]
    for name in names:
        shapes = _shapes(rng)
        pixels = _paint(shapes, rng)
        if name.endswith(".jpg"):
            Image.fromarray(pixels).save(images / name, quality=92)
        else:
            crs = "EPSG:3857" if name.startswith("mercator") else "EPSG:4326"
            _geotiff(images / name, pixels, crs, int(name.split("_")[1].split(".")[0]))
        label = _label(f"../images/{name}", shapes)
        (labels / Path(name).with_suffix(".json").name).write_text(json.dumps(label, indent=1), encoding="utf-8")
    return labels, images
