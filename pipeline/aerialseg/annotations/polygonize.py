"""mask-to-label: a class mask (GeoTIFF or PNG of class ids) -> AnyLabeling JSON that paints back to it.

How the polygons reproduce the mask (AnyLabeling polygons have no holes):
- ``rasterio.features.shapes`` (4-connectivity) splits the mask into connected regions of one class; each
  region's outer ring becomes one polygon of that class. Its vertices lie on pixel edges (integers), so
  label-to-mask's pixel-centre rule gives back exactly the region plus whatever fills its holes.
- Every hole of a region is filled by other regions, which lie inside the outer ring. Shapes are written in
  order of nesting depth (the number of holes around a region), larger first within a depth; since
  label-to-mask paints later shapes over earlier ones, each pixel ends with its own region's class.
  (This needs file order: keep ``masks.priority`` empty when reading these files back.)
- Background regions that no other region surrounds are left out (unlabelled pixels are background);
  ignore (255) regions are written as label ``__ignore__`` so they stay ignore.
- ``simplify_px`` > 0 simplifies each ring (Douglas-Peucker, topology-preserving) and ``min_area_px`` drops
  regions smaller than that many pixels (they take the class of what surrounds them): both trade exactness
  at edges for smaller files.
"""

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import shapely
from shapely.geometry import Polygon

from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_text
from aerialseg.annotations.labels import IMAGE_SUFFIXES
from aerialseg.core.config import section
from aerialseg.geo.raster import open_raster

log = logging.getLogger(__name__)

ANYLABELING_FORMAT_VERSION = "2.4.0"  # the X-AnyLabeling file format written (readable by labelme too)
IGNORE_LABEL = "__ignore__"
VALID_VALUES = (*range(len(CLASS_NAMES)), IGNORE)
EXACT_SIMPLIFY_PX = 0.25  # below sqrt(2)/4: the polygons still paint back to exactly the same pixels


def label_name(value: int) -> str:
    return IGNORE_LABEL if value == IGNORE else CLASS_NAMES[value]


def _regions(mask: np.ndarray) -> tuple[list[Polygon], np.ndarray]:
    """Connected regions of a class mask as polygons (with holes) and their class values."""
    polys, values = [], []
    for geom, value in rasterio.features.shapes(mask, connectivity=4):
        polys.append(shapely.geometry.shape(geom))
        values.append(int(value))
    return polys, np.asarray(values, dtype=np.int64)


def _nesting_depth(polys: Sequence[Polygon]) -> np.ndarray:
    """For each region, how many holes (of any region) surround it."""
    holes = [Polygon(ring) for p in polys for ring in p.interiors]
    if not holes:
        return np.zeros(len(polys), dtype=np.int64)
    inside = shapely.point_on_surface(np.asarray(polys, dtype=object))
    idx_in, _ = shapely.STRtree(holes).query(inside, predicate="within")
    return np.bincount(idx_in, minlength=len(polys))


def mid_edge_ring(ring: np.ndarray) -> np.ndarray:
    """Midpoints of the unit pixel edges along an axis-aligned closed ring (integer vertices).

    This is the marching-squares contour between the pixel centres inside and outside the ring: every
    pixel centre is at least sqrt(2)/4 = 0.354 px from it, so it rasterises back exactly (pixel-centre rule)
    and stays exact after simplifying with a tolerance below that. A 1-px staircase becomes a straight line.
    """
    start, step = ring[:-1], np.diff(ring, axis=0)
    length = np.abs(step).sum(axis=1).round().astype(np.int64)
    keep = length > 0
    start, step, length = start[keep], step[keep], length[keep]
    edge = np.repeat(np.arange(len(length)), length)
    k = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    return start[edge] + step[edge] / length[edge, None] * (k[:, None] + 0.5)


def _ring_points(poly: Polygon, simplify_px: float) -> list[list[float]] | None:
    """The simplified mid-edge contour of a region's outer ring as [x, y] pairs (None if it vanishes)."""
    outer = Polygon(mid_edge_ring(np.asarray(poly.exterior.coords)))
    outer = shapely.simplify(outer, simplify_px, preserve_topology=True)
    if outer.is_empty or outer.area == 0 or outer.geom_type != "Polygon":
        return None
    return [[_num(x), _num(y)] for x, y in outer.exterior.coords[:-1]]


def _num(value: float) -> float | int:
    """Coordinates are multiples of 0.5: write 12 rather than 12.0 (smaller files, same value)."""
    return int(value) if float(value).is_integer() else float(value)


def mask_to_shapes(mask: np.ndarray, simplify_px: float = EXACT_SIMPLIFY_PX,
                   min_area_px: float = 0.0) -> list[dict[str, Any]]:
    """AnyLabeling polygon shapes (in painting order) that label-to-mask turns back into `mask`.

    mask: (H, W) uint8 classes 0..4 and 255 (ignore). See the module docstring for the method.
    """
    check_class_values(mask)
    polys, values = _regions(np.ascontiguousarray(mask, dtype=np.uint8))
    depth = _nesting_depth(polys)
    outer_area = np.array([Polygon(p.exterior).area for p in polys])
    shapes = []
    for i in np.lexsort((-outer_area, depth)):
        if (values[i] == 0 and depth[i] == 0) or polys[i].area < min_area_px:
            continue
        points = _ring_points(polys[i], simplify_px)
        if points is not None:
            shapes.append({"label": label_name(int(values[i])), "points": points, "group_id": None,
                           "description": "", "shape_type": "polygon", "flags": {}})
    return shapes


def anylabeling_document(shapes: list[dict[str, Any]], image_path: str, width: int, height: int) -> dict[str, Any]:
    """A complete AnyLabeling label file (imageData null, imagePath relative to the JSON)."""
    return {"version": ANYLABELING_FORMAT_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": None, "imageHeight": int(height), "imageWidth": int(width)}


def dumps_label_json(doc: dict[str, Any]) -> str:
    """JSON text with one shape per line: readable, diff-friendly and a fraction of indent=2's size."""
    head = {k: v for k, v in doc.items() if k != "shapes"}
    shapes = ",\n".join("    " + json.dumps(s, ensure_ascii=False, separators=(",", ":")) for s in doc["shapes"])
    body = json.dumps(head, indent=2, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    return f'{body},\n  "shapes": [\n{shapes}\n  ]\n}}\n' if shapes else f'{body},\n  "shapes": []\n}}\n'


def check_class_values(mask: np.ndarray, path: str | Path | None = None) -> None:
    """Fail unless every value is a class id 0..4 or 255 (ignore)."""
    if mask.ndim != 2:
        raise AerialsegError(f"mask must be 2-D (H, W), got shape {mask.shape}", path)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise AerialsegError(f"mask values span {mask.min()}..{mask.max()}, expected class ids", path)
    counts = np.bincount(mask.astype(np.uint8, copy=False).ravel(), minlength=256)
    stray = [int(v) for v in np.flatnonzero(counts) if v not in VALID_VALUES]
    if stray:
        raise AerialsegError(f"mask holds value(s) {stray[:10]} outside the classes {VALID_VALUES}", path,
                             "map the values to class ids 0-4 (255 = ignore) first")


def read_class_mask(path: str | Path) -> np.ndarray:
    """Band 1 of a single-band class raster (GeoTIFF, palette or grey PNG), checked for valid class values."""
    with open_raster(path) as ds:
        if ds.count != 1 or ds.dtypes[0] != "uint8":
            raise AerialsegError(f"mask has {ds.count} band(s) of {ds.dtypes[0]}; expected one uint8 band of "
                                 f"class ids {VALID_VALUES}", path,
                                 "pass a class mask (e.g. from label-to-mask), not a colour rendering")
        mask = ds.read(1)
    check_class_values(mask, path)
    return mask


def find_image_for(mask_path: Path, image: Path | None) -> Path:
    """The image a mask belongs to: IMAGE itself, <stem>.* inside folder IMAGE, or <stem>.* beside the mask."""
    if image is not None and image.is_file():
        return image
    folder = image if image is not None else mask_path.parent
    if image is not None and not image.is_dir():
        raise AerialsegError("image not found", image, "pass the image file (or a folder of images) via --image")
    for sfx in IMAGE_SUFFIXES:
        for cand in (folder / f"{mask_path.stem}{sfx}", folder / f"{mask_path.stem}{sfx.upper()}"):
            if cand.is_file() and cand.resolve() != mask_path.resolve():
                return cand
    raise AerialsegError(f"no image named {mask_path.stem}.* in {folder} for this mask", mask_path,
                         "pass --image IMAGE (the image file, or a folder holding it)")


def mask_file_to_label(mask_path: str | Path, out_dir: str | Path | None = None, image: str | Path | None = None,
                       simplify_px: float = 0.0, min_area_px: float = 0.0) -> Path:
    """Write <out_dir>/<image stem>.json for one mask; out_dir defaults to the image's folder."""
    mask_path = Path(mask_path)
    mask = read_class_mask(mask_path)
    image_path = find_image_for(mask_path, Path(image) if image else None)
    with open_raster(image_path) as ds:
        if (ds.height, ds.width) != mask.shape:
            raise AerialsegError(f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                                 f"{ds.width}x{ds.height}", mask_path, "pass the image this mask was made from")
    out = Path(out_dir) if out_dir else image_path.parent
    rel = Path(_relpath(image_path, out)).as_posix()
    shapes = mask_to_shapes(mask, simplify_px, min_area_px)
    dest = write_text(out / f"{image_path.stem}.json",
                      dumps_label_json(anylabeling_document(shapes, rel, mask.shape[1], mask.shape[0])))
    log.info("%s: %d polygon(s) -> %s", mask_path, len(shapes), dest)
    return dest


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def masks_to_labels(masks: Sequence[str | Path], params: dict[str, Any], out_dir: str | Path | None = None,
                    image: str | Path | None = None, simplify_px: float | None = None,
                    min_area_px: float | None = None) -> list[Path]:
    """CLI `mask-to-label`: every mask -> AnyLabeling JSON; defaults from params masks.simplify_px/min_area_px."""
    cfg = section(params, "masks")
    simplify = float(cfg.get("simplify_px", 0.0) if simplify_px is None else simplify_px)
    min_area = float(cfg.get("min_area_px", 0.0) if min_area_px is None else min_area_px)
    if simplify < 0 or min_area < 0:
        raise AerialsegError("--simplify and --min-area must be >= 0", None, "pass 0 or a positive number")
    if image and Path(image).is_file() and len(masks) > 1:
        raise AerialsegError("one --image file for several masks", image, "pass a folder of images via --image")
    return [mask_file_to_label(m, out_dir, image, simplify, min_area) for m in masks]
