"""Class raster -> GeoPackage polygons (merged across block borders) and per-class areas.

Polygonising runs block by block (``rasterio.features.shapes``, 4-connectivity) in pixel coordinates,
so memory follows the block size and the number of polygons, not the scene. Pieces that touch an inner
block border are unioned per class with shapely (exact: pixel-edge coordinates are integers) and split
back into connected parts; then the LW-IRSTNet-style size filter drops parts under ``min_area_px`` and
the survivors are mapped to the scene's CRS with its affine transform.
"""

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from rasterio.windows import Window
from shapely.geometry import shape

from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.fileio import atomic_path
from aerialseg.geo.areas import polygon_ground_areas

SEGMENT_PX = 256  # polygon edges cut every 256 px before geodesic areas (a straight map edge is no geodesic)


def _blocks(height: int, width: int, block: int) -> Iterator[Window]:
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(block, height - row))


def _touches_inner_border(bounds: tuple[float, ...], win: Window, height: int, width: int) -> bool:
    minx, miny, maxx, maxy = bounds
    right, bottom = win.col_off + win.width, win.row_off + win.height
    return ((minx <= win.col_off and win.col_off > 0) or (maxx >= right and right < width)
            or (miny <= win.row_off and win.row_off > 0) or (maxy >= bottom and bottom < height))


def polygonize_blocks(path: str | Path, block: int = 2048, skip: Iterable[int] = (IGNORE,),
                      min_area_px: float = 0.0, simplify_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of a single-band class raster, in pixel coordinates: (class ids, shapely polygons).

    Block-border pieces of one class are merged; parts smaller than ``min_area_px`` are dropped.
    """
    skip = set(skip) | {IGNORE}
    ids: list[int] = []
    polys: list[Any] = []
    border: dict[int, list[Any]] = defaultdict(list)
    with rasterio.open(path) as ds:
        for win in _blocks(ds.height, ds.width, block):
            data = ds.read(1, window=win)
            keep = ~np.isin(data, list(skip))
            if not keep.any():
                continue
            offset = Affine.translation(win.col_off, win.row_off)
            for geom, value in shapes(data, mask=keep, connectivity=4, transform=offset):
                poly = shape(geom)
                if _touches_inner_border(poly.bounds, win, ds.height, ds.width):
                    border[int(value)].append(poly)
                else:
                    ids.append(int(value))
                    polys.append(poly)
    for cls, pieces in border.items():
        for part in shapely.get_parts(shapely.union_all(pieces)):
            ids.append(cls)
            polys.append(part)
    geoms = np.array(polys, dtype=object)
    class_ids = np.array(ids, dtype=np.int32)
    if simplify_px > 0 and len(geoms):
        geoms = shapely.simplify(geoms, simplify_px, preserve_topology=True)
    if len(geoms):
        big = shapely.area(geoms) >= min_area_px
        geoms, class_ids = geoms[big], class_ids[big]
    order = np.argsort(class_ids, kind="stable")
    return class_ids[order], geoms[order]


def pixel_to_world(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Apply a raster's affine transform to geometries in pixel (col, row) coordinates."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def apply(coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0], coords[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return shapely.transform(geoms, apply)


def write_gpkg(dest: str | Path, class_ids: np.ndarray, geoms_px: np.ndarray, transform: Affine,
               crs: Any, class_names: tuple[str, ...] = CLASS_NAMES, layer: str = "landcover") -> Path:
    """Write polygons (pixel coordinates) as a GeoPackage layer in the scene's CRS, atomically.

    ``area_m2`` is the true ground area in any CRS (geo.areas; NaN without a CRS); the layer's metadata
    ``area_method`` says how it was computed.
    """
    from pyogrio.raw import write

    area_px = shapely.area(geoms_px) if len(geoms_px) else np.zeros(0)
    world = pixel_to_world(geoms_px, transform) if len(geoms_px) else geoms_px
    if crs is not None and (crs.is_projected or crs.is_geographic):
        pixel = max(abs(transform.a), abs(transform.b), abs(transform.d), abs(transform.e))
        area_m2, method = polygon_ground_areas(world, crs, max_segment=SEGMENT_PX * pixel)
    else:
        area_m2, method = np.full(len(geoms_px), np.nan), "none (no CRS: area_px only)"
    names = np.array([class_names[i] if i < len(class_names) else f"class_{i}" for i in class_ids], dtype=object)
    pyogrio_log = logging.getLogger("pyogrio")
    level = pyogrio_log.level
    pyogrio_log.setLevel(logging.WARNING)  # no "Created N records" at the CLI's INFO level
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*crs.*not provided")  # a scene without georeference
        tmp.unlink()  # GPKG: a fresh file, not an empty one GDAL would try to open
        write(tmp, shapely.to_wkb(world) if len(world) else np.array([], dtype=object),
              [np.asarray(class_ids, dtype=np.int32), names, area_px.astype(np.float64),
               area_m2.astype(np.float64)],
              ["class_id", "class_name", "area_px", "area_m2"], layer=layer, driver="GPKG",
              geometry_type="Polygon", crs=crs.to_wkt() if crs else None,
              layer_metadata={"area_method": method})
    pyogrio_log.setLevel(level)
    return Path(dest)


def vectorize_raster(path: str | Path, dest: str | Path, block: int = 2048, skip: Iterable[int] = (IGNORE,),
                     min_area_px: float = 0.0, simplify_px: float = 0.0,
                     class_names: tuple[str, ...] = CLASS_NAMES) -> dict[str, int]:
    """Polygonise a class GeoTIFF into a GeoPackage; returns the polygon count per class name."""
    from aerialseg.geo.raster import open_raster

    class_ids, geoms = polygonize_blocks(path, block, skip, min_area_px, simplify_px)
    with open_raster(path) as ds:
        write_gpkg(dest, class_ids, geoms, ds.transform, ds.crs, class_names)
    counts = np.bincount(class_ids, minlength=len(class_names)) if len(class_ids) else np.zeros(len(class_names), int)
    return {class_names[i] if i < len(class_names) else f"class_{i}": int(n) for i, n in enumerate(counts) if n}

