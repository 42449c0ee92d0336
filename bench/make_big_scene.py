"""Build a large benchmark orthophoto from real pixels: the Dubai aerial parts, reassembled and mosaicked.

    .venv/bin/python bench/make_big_scene.py [--size 8192] [--out /tmp/aerialseg-bench/dubai_8192.tif]

Each Dubai tile's 3x3 parts are reassembled into its scene (6 scenes, 1527-3378 px a side); the canvas
is then filled with 1520 x 1520 px cells, each a crop of the next scene (cycling through the 6 scenes and
4 orientations, crop offsets varied), so every pixel is a real aerial pixel. Written as a tiled, deflate
RGB GeoTIFF (512 px blocks) in row stripes.

Georeference (synthetic, stated): EPSG:32640 (WGS 84 / UTM 40N, the zone of Dubai), upper-left corner
(330000 E, 2790000 N), 0.5 m pixels. The Dubai data carries no georeference and its GSD is undocumented.
"""

import argparse
import itertools
from pathlib import Path

import cv2
import numpy as np
import rasterio
from affine import Affine

DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai-aerial-cc0"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "scenes"  # fallback: the embedded sample
CELL = 1520
CRS = "EPSG:32640"
TRANSFORM = Affine(0.5, 0.0, 330000.0, 0.0, -0.5, 2790000.0)


def reassemble(tile_dir: Path) -> np.ndarray:
    """The 3x3 parts of one Dubai tile as one RGB scene (parts differ by <= 1 px: crop to the smallest)."""
    parts = [cv2.imread(str(tile_dir / "images" / f"image_part_{i:03d}.jpg"), cv2.IMREAD_COLOR)[:, :, ::-1]
             for i in range(1, 10)]
    h = min(p.shape[0] for p in parts)
    w = min(p.shape[1] for p in parts)
    rows = [np.concatenate([p[:h, :w] for p in parts[r * 3:r * 3 + 3]], axis=1) for r in range(3)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def read_sample(path: Path) -> np.ndarray:
    """One embedded sample scene as (H, W, 3) RGB."""
    with rasterio.open(path) as ds:
        return np.ascontiguousarray(np.moveaxis(ds.read([1, 2, 3]), 0, 2))


def orient(image: np.ndarray, k: int) -> np.ndarray:
    """One of four orientations: as is, mirrored left-right, upside down, rotated 180 degrees."""
    return [image, image[:, ::-1], image[::-1], image[::-1, ::-1]][k % 4]


def build_canvas(scenes: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Fill (height, width, 3) with CELL x CELL crops of the scenes, cycling scenes and orientations."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for (i, top), (j, left) in itertools.product(enumerate(range(0, height, CELL)), enumerate(range(0, width, CELL))):
        n = i * 7 + j
        scene = orient(scenes[(j + 2 * i) % len(scenes)], i + j)
        h, w = min(CELL, height - top), min(CELL, width - left)
        oy = (n * 97) % max(scene.shape[0] - h + 1, 1)
        ox = (n * 131) % max(scene.shape[1] - w + 1, 1)
        crop = scene[oy:oy + h, ox:ox + w]
        canvas[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    return canvas


def write_scene(path: Path, canvas: np.ndarray) -> None:
    """Tiled deflate RGB GeoTIFF with the stated synthetic georeference, written in 512-row stripes."""
    height, width = canvas.shape[:2]
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
               "crs": CRS, "transform": TRANSFORM, "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "deflate", "photometric": "rgb", "bigtiff": "if_safer"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, height, 512):
            stripe = canvas[row:row + 512]
            dst.write(np.moveaxis(stripe, 2, 0), window=((row, row + stripe.shape[0]), (0, width)))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="width = height in px (>= 8000 for the bench)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/aerialseg-bench/dubai_8192.tif"))
    parser.add_argument("--dubai", type=Path, default=DUBAI)
    args = parser.parse_args()
    tiles = sorted(p for p in args.dubai.glob("tile_*") if p.is_dir())
    if tiles:
        scenes = [reassemble(t) for t in tiles]
    else:  # no ../shared: the embedded sample's scenes (the same Dubai pixels at half resolution)
        print(f"no Dubai tiles under {args.dubai}: using the embedded sample {SAMPLE}")
        scenes = [read_sample(p) for p in sorted(SAMPLE.glob("*.tif"))]
    write_scene(args.out, build_canvas(scenes, args.size, args.size))
    sizes = ", ".join(f"{s.shape[1]}x{s.shape[0]}" for s in scenes)
    print(f"wrote {args.out}: {args.size}x{args.size} px from {len(scenes)} Dubai scenes ({sizes}); "
          f"{CRS}, 0.5 m (synthetic georeference)")


if __name__ == "__main__":
    main()
