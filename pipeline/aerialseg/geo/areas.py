"""Ground areas and pixel sizes in true metres, in any CRS, through pyproj.

A CRS's map units are ground metres only in an equal-area projection: Web Mercator (EPSG:3857) inflates
areas by about sec² of the latitude (1.60x at 37.85° N), UTM by up to a few % far from its central
meridian, and a geographic CRS (EPSG:4326) counts square degrees. So, on the ellipsoid of the CRS:

- pixel areas (per-class areas from pixel counts, the GSD): the geodesic lengths of the pixel's two
  mid-lines times the sine of their angle (``pyproj.Geod.inv`` on the pixel's points transformed to the
  CRS's lon/lat; exact to second order in pixel size / earth radius);
- polygon areas (GeoPackage ``area_m2``): ``Geod.geometry_area_perimeter`` of the polygons transformed to
  lon/lat, edges first cut so they follow the map's straight lines;
- an equal-area CRS (1 map unit² = 1 m² on the ground wherever the scene lies) keeps planar areas.

Per-class areas walk the class raster in bands of rows with one pixel area per row and per 256-column
bin, so memory follows the scene's width, not its size. Every result names its ``area_method``.
"""

import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Geod, Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from aerialseg.core.classes import CLASS_NAMES, IGNORE

COL_BIN = 256  # columns that share one pixel area (its variation over 256 px is < 1e-4 at any GSD < 10 m)
BAND_PIXELS = 2**21  # pixels per band of rows in class_ground_areas (16 MB of float64 areas)
EQUAL_AREA_TOL = 1e-7  # |ground m² / map unit² - 1| under which a projected CRS counts as equal-area
PLANAR = "planar (equal-area CRS)"


@lru_cache(maxsize=16)
def _crs(wkt: str) -> CRS:
    return CRS.from_wkt(wkt)


def pyproj_crs(crs: Any) -> CRS | None:
    """A pyproj CRS from a rasterio/pyproj CRS or user input (None stays None)."""
    if crs is None:
        return None
    return _crs(crs.to_wkt() if hasattr(crs, "to_wkt") else CRS.from_user_input(crs).to_wkt())


@lru_cache(maxsize=16)
def _to_geographic(wkt: str) -> Transformer:
    crs = _crs(wkt)
    return Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)


def _geod(crs: CRS) -> Geod:
    return crs.get_geod() or Geod(ellps="WGS84")


def _ellipsoid(crs: CRS) -> str:
    return crs.ellipsoid.name if crs.ellipsoid is not None else "WGS 84"


def _unit(crs: CRS) -> float:
    """Metres per map unit of a projected CRS."""
    axis = crs.axis_info[0] if crs.axis_info else None
    return float(axis.unit_conversion_factor) if axis is not None and axis.unit_conversion_factor else 1.0


def _apply(transform: Affine, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of pixel coordinates (arrays)."""
    t = transform
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def _cell_areas(crs: CRS, transform: Affine, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ground m² of the cells of ``transform`` centred on pixel points (cols, rows): the geodesic lengths of
    the cell's two mid-lines times the sine of their angle (pyproj Geod.inv, vectorised; exact to second
    order in cell size / earth radius)."""
    to_ll = _to_geographic(crs.to_wkt())
    points = [(cols - 0.5, rows), (cols + 0.5, rows), (cols, rows - 0.5), (cols, rows + 0.5), (cols, rows)]
    (lon_l, lat_l), (lon_r, lat_r), (lon_t, lat_t), (lon_b, lat_b), (lon_c, lat_c) = (
        to_ll.transform(*_apply(transform, c, r)) for c, r in points)
    geod = _geod(crs)
    across = geod.inv(lon_l, lat_l, lon_r, lat_r)[2]
    down = geod.inv(lon_t, lat_t, lon_b, lat_b)[2]
    angle = np.radians(geod.inv(lon_c, lat_c, lon_r, lat_r)[0] - geod.inv(lon_c, lat_c, lon_b, lat_b)[0])
    return np.asarray(across * down * np.abs(np.sin(angle)), dtype=np.float64)


def _planar_m2(crs: CRS, transform: Affine) -> float:
    """A pixel's map area in square map units x (metres per unit)² (ground m² only in an equal-area CRS)."""
    return abs(transform.a * transform.e - transform.b * transform.d) * _unit(crs) ** 2


def is_equal_area(crs: CRS, transform: Affine, width: int, height: int) -> bool:
    """True for a projected CRS whose 1-unit map squares have their map area on the ground at the grid's
    corners, edge middles and centre."""
    if not crs.is_projected:
        return False
    x, y = _apply(transform, *np.meshgrid([0.0, width / 2, width], [0.0, height / 2, height]))
    ground = _cell_areas(crs, Affine.identity(), x.ravel(), y.ravel())  # 1 x 1 map-unit squares
    return bool(np.all(np.abs(ground / _unit(crs) ** 2 - 1.0) < EQUAL_AREA_TOL))


def area_method(crs: Any, transform: Affine, width: int, height: int) -> str:
    """How this grid's areas are computed, in words (the ``area_method`` of every area output)."""
    crs = pyproj_crs(crs)
    if is_equal_area(crs, transform, width, height):
        return PLANAR
    return f"geodesic ({_ellipsoid(crs)} ellipsoid)"


def pixel_areas(crs: CRS, transform: Affine, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Ground area in m² of the pixel at each (row, col) of the grid rows x cols: (len(rows), len(cols))."""
    c, r = np.meshgrid(np.asarray(cols, np.float64) + 0.5, np.asarray(rows, np.float64) + 0.5)
    return _cell_areas(crs, transform, c.ravel(), r.ravel()).reshape(c.shape)


def centre_pixel_area_m2(crs: Any, transform: Affine, width: int, height: int) -> float:
    """Ground area in m² of the scene's centre pixel."""
    crs = pyproj_crs(crs)
    return float(pixel_areas(crs, transform, np.array([height // 2]), np.array([width // 2]))[0, 0])


def _row_bands(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, rows):
        yield top, min(rows, height - top)


def class_ground_areas(ds: rasterio.DatasetReader, rows: int | None = None) -> np.ndarray:
    """Ground area in m² per pixel value (256,) of a single-band class raster, band by band of rows
    (default: as many rows as keep a band's per-pixel areas under BAND_PIXELS values, at most 256)."""
    rows = rows or max(1, min(256, BAND_PIXELS // max(ds.width, 1)))
    crs = pyproj_crs(ds.crs)
    bins = np.arange(0, ds.width, COL_BIN)
    bin_of_col = np.arange(ds.width) // COL_BIN
    centres = np.minimum(bins + COL_BIN // 2, ds.width - 1)
    equal_area = is_equal_area(crs, ds.transform, ds.width, ds.height)
    totals = np.zeros(256, dtype=np.float64)
    for top, count in _row_bands(ds.height, rows):
        values = ds.read(1, window=Window(0, top, ds.width, count))
        if equal_area:
            totals += np.bincount(values.ravel(), minlength=256) * _planar_m2(crs, ds.transform)
            continue
        grid = pixel_areas(crs, ds.transform, np.arange(top, top + count), centres)
        totals += np.bincount(values.ravel(), weights=grid[:, bin_of_col].ravel(), minlength=256)
    return totals


def polygon_ground_areas(geoms: np.ndarray, crs: Any, max_segment: float | None = None) -> tuple[np.ndarray, str]:
    """Ground areas in m² of polygons in ``crs`` map coordinates, and the method used.

    Planar in an equal-area CRS; otherwise geodesic on the CRS's ellipsoid, with edges first cut into
    pieces of at most ``max_segment`` map units (a straight map edge is not a geodesic).
    """
    crs = pyproj_crs(crs)
    if not len(geoms):
        return np.zeros(0), "no polygons"
    minx, miny, maxx, maxy = shapely.total_bounds(geoms)
    extent = Affine(maxx - minx or 1.0, 0, minx, 0, -(maxy - miny or 1.0), maxy)
    method = area_method(crs, extent, 1, 1)
    if method == PLANAR:
        return shapely.area(geoms) * _unit(crs) ** 2, method
    if max_segment:
        geoms = shapely.segmentize(geoms, max_segment)
    transformer = _to_geographic(crs.to_wkt())
    geographic = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    geod = _geod(crs)
    areas = np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geographic], dtype=np.float64)
    return areas, method


def class_areas(pixel_counts: np.ndarray, ground_m2: np.ndarray | float | None,
                class_names: tuple[str, ...] = CLASS_NAMES, reason: str | None = None,
                method: str | None = None, pixel_area_m2: float | None = None) -> dict[str, Any]:
    """Per-class pixel counts (+ ground m² per value, or one pixel area) -> {units, area_method, classes: {name:
    pixels, share, m2, ha}}; pixel counts only when the scene has no ground units."""
    counts = np.asarray(pixel_counts, dtype=np.int64)
    if ground_m2 is not None and np.ndim(ground_m2) == 0:
        pixel_area_m2 = pixel_area_m2 or float(ground_m2)
        ground_m2 = counts * float(ground_m2)
    n = len(class_names)
    valid = int(counts[:n].sum())
    metric = ground_m2 is not None
    result: dict[str, Any] = {
        "units": "m2" if metric else "pixels",
        "area_method": (method or PLANAR) if metric else "pixel counts",
        "pixel_area_m2": pixel_area_m2 if metric else None,
        "valid_pixels": valid,
        "nodata_pixels": int(counts[IGNORE]) if len(counts) > IGNORE else 0,
        "classes": {},
    }
    if not metric:
        result["note"] = reason or "scene not georeferenced: areas are pixel counts"
    for i, name in enumerate(class_names):
        pixels = int(counts[i]) if i < len(counts) else 0
        entry: dict[str, Any] = {"id": i, "pixels": pixels, "share": pixels / valid if valid else 0.0}
        if metric:
            entry["m2"] = float(ground_m2[i]) if i < len(ground_m2) else 0.0
            entry["ha"] = entry["m2"] / 10_000.0
        result["classes"][name] = entry
    if metric:
        result["total_m2"] = float(np.sum(ground_m2[:n]))
        result["total_ha"] = result["total_m2"] / 10_000.0
    return result


def scene_areas(class_raster: str | Path, counts: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """class_areas of a class raster on a scene's grid: true ground m² in any CRS, pixel counts without one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(class_raster) as ds:
            crs = ds.crs if ds.crs is not None and not ds.transform.is_identity else None
            if crs is None or not (crs.is_projected or crs.is_geographic):
                return class_areas(counts, None, class_names, "scene not georeferenced: areas are pixel counts")
            return class_areas(counts, class_ground_areas(ds), class_names,
                               method=area_method(crs, ds.transform, ds.width, ds.height),
                               pixel_area_m2=centre_pixel_area_m2(crs, ds.transform, ds.width, ds.height))


def point_pixel_areas(crs: Any, transform: Affine, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ground m² of one pixel at each pixel-centre point (cols, rows: pixel indices, fractional allowed)."""
    cols, rows = np.asarray(cols, np.float64), np.asarray(rows, np.float64)
    if not cols.size:
        return np.zeros(0)
    return _cell_areas(pyproj_crs(crs), transform, cols + 0.5, rows + 0.5)
