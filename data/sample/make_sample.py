"""Build the embedded sample (data/sample) from the CC0 Dubai aerial dataset.

    .venv/bin/python data/sample/make_sample.py [--source ../shared/data/dubai-aerial-cc0] [--scale 0.5]
                                                [--labels-only]

For each tile 1..6: the 3x3 parts (row-major 001..009) are joined into one scene (parts of a row are cut to
the row's smallest height, parts of a column to the column's smallest width: sizes differ by <= 1 px), the
image is downscaled with INTER_AREA and the mask with INTER_NEAREST (same output size), the scene is saved
as a tiled JPEG-in-TIFF (YCbCr, quality 85) GeoTIFF with a synthetic georeference, and its labels as
AnyLabeling JSON made by aerialseg's mask-to-label (exact polygons, vertices on pixel centres: the annotation
tools' convention, docs/labels.md). Colours -> classes per the dataset's SOURCE.md; #9B9B9B (unlabeled) and
#000000 (undocumented) -> 255 ignore. The script checks that the JSON paints back to the downscaled mask
exactly. --labels-only rewrites the JSON and keeps the scene files.
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import rasterio
from affine import Affine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "dubai-aerial-cc0"
TILES = (1, 2, 3, 4, 5, 6)
SCALE = 0.5
CRS = "EPSG:32640"  # WGS 84 / UTM zone 40N, which covers Dubai
PIXEL_M = 0.5  # synthetic pixel size of the downscaled scenes (the source GSD is undocumented)
ORIGIN_E, ORIGIN_N, SPACING_M = 300_000.0, 2_790_000.0, 1_000.0  # scene t's top-left: E + (t-1)*spacing
COLOURS: dict[tuple[int, int, int], int] = {  # SOURCE.md table (verified against the mask pixels)
    (60, 16, 152): 4,  # #3C1098 building
    (132, 41, 246): 0,  # #8429F6 land (unpaved) -> background
    (110, 193, 228): 1,  # #6EC1E4 road
    (254, 221, 58): 3,  # #FEDD3A vegetation -> tree
    (226, 169, 41): 2,  # #E2A929 water
    (155, 155, 155): 255,  # #9B9B9B unlabeled -> ignore
    (0, 0, 0): 255,  # #000000 undocumented -> ignore
}


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a JPEG or PNG (palette PNGs are expanded)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"error: cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def colours_to_classes(rgb: np.ndarray, path: Path) -> np.ndarray:
    """RGB mask -> class ids; a colour not in COLOURS is an error."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, 254, np.uint8)
    for (r, g, b), cls in COLOURS.items():
        out[code == (r << 16 | g << 8 | b)] = cls
    if (out == 254).any():
        raise SystemExit(f"error: {path}: colours outside the SOURCE.md table")
    return out


def assemble(parts: list[np.ndarray]) -> np.ndarray:
    """Join 9 row-major parts into one array, cutting each to its row's height and column's width."""
    heights = [min(p.shape[0] for p in parts[r * 3:r * 3 + 3]) for r in range(3)]
    widths = [min(parts[r * 3 + c].shape[1] for r in range(3)) for c in range(3)]
    return np.vstack([np.hstack([parts[r * 3 + c][:heights[r], :widths[c]] for c in range(3)]) for r in range(3)])


def load_tile(source: Path, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution RGB scene and class mask of one tile."""
    folder = source / f"tile_{tile}"
    names = [f"image_part_{i:03d}" for i in range(1, 10)]
    image = assemble([read_rgb(folder / "images" / f"{n}.jpg") for n in names])
    mask = assemble([colours_to_classes(read_rgb(folder / "masks" / f"{n}.png"), folder / "masks" / f"{n}.png")
                     for n in names])
    return image, mask


def sample_tile(source: Path, tile: int, scale: float = SCALE) -> tuple[np.ndarray, np.ndarray]:
    """The sample's scene and mask of one tile: INTER_AREA for the image, nearest for the mask."""
    image, mask = load_tile(source, tile)
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def scene_transform(tile: int) -> Affine:
    """Synthetic georeference: 0.5 m pixels, scenes 1 km apart along the easting (no overlap)."""
    return Affine(PIXEL_M, 0.0, ORIGIN_E + (tile - 1) * SPACING_M, 0.0, -PIXEL_M, ORIGIN_N)


def write_scene(dest: Path, image: np.ndarray, transform: Affine) -> None:
    from aerialseg.core.fileio import atomic_path

    profile = {"driver": "GTiff", "width": image.shape[1], "height": image.shape[0], "count": 3,
               "dtype": "uint8", "crs": CRS, "transform": transform, "compress": "JPEG",
               "photometric": "YCBCR", "jpeg_quality": 85, "interleave": "pixel", "tiled": True,
               "blockxsize": 256, "blockysize": 256}
    with atomic_path(dest) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(image.transpose(2, 0, 1))


def write_labels(dest: Path, mask: np.ndarray, scene: Path) -> None:
    from aerialseg.annotations.anylabeling import dumps_label_json
    from aerialseg.annotations.polygonize import label_document
    from aerialseg.core.fileio import write_text

    write_text(dest, dumps_label_json(label_document(mask, scene, dest)))  # exact: simplify 0


def check_round_trip(label_file: Path, mask: np.ndarray) -> float:
    """Fraction of pixels label-to-mask (default rule) paints back as in `mask` (1.0 expected)."""
    from aerialseg.annotations.anylabeling import LabelTable, load_label_json, parse_shapes
    from aerialseg.annotations.rasterize import rasterize_shapes

    table = LabelTable({"background": 0, "road": 1, "water": 2, "tree": 3, "building": 4, "__ignore__": 255})
    h, w = mask.shape
    shapes, _ = parse_shapes(load_label_json(label_file), label_file, table)
    return float((rasterize_shapes(shapes, w, h) == mask).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--scale", type=float, default=SCALE)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--labels-only", action="store_true", help="rewrite the label JSON, keep the scenes")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "pipeline"))
    import aerialseg  # noqa: F401

    for tile in TILES:
        image, mask = sample_tile(args.source, tile, args.scale)
        scene = args.out / "scenes" / f"dubai_tile{tile}.tif"
        label_file = args.out / "labels" / f"dubai_tile{tile}.json"
        if not args.labels_only:
            write_scene(scene, image, scene_transform(tile))
        write_labels(label_file, mask, scene)
        agree = check_round_trip(label_file, mask)
        print(f"{scene.name}: {image.shape[1]}x{image.shape[0]} px, {scene.stat().st_size / 1e6:.2f} MB; "
              f"{label_file.name}: {label_file.stat().st_size / 1e6:.2f} MB, round trip {agree:.4%}")
        if agree < 1.0:
            raise SystemExit(f"error: {label_file} paints back only {agree:.4%} of the mask")


if __name__ == "__main__":
    main()
