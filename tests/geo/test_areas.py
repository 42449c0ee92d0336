"""Areas and GSD in true ground metres in any CRS: Web Mercator, geographic, UTM far from its meridian.

Each scene is a synthetic GeoTIFF built here; the reference is pyproj's geodesic area of the same
pixel-edge polygons (edges cut at every pixel so they follow the grid), transformed to lon/lat.
"""

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import CRS, Geod, Transformer
from rasterio.transform import from_origin

from aerialseg.geo.areas import PLANAR, class_ground_areas, polygon_ground_areas, scene_areas
from aerialseg.geo.raster import pixel_area_m2
from aerialseg.geo.scene import scene_gsd_m
from aerialseg.geo.vectorize import pixel_to_world, polygonize_blocks, vectorize_raster

MERCATOR_PX = 1.194328566  # web-map zoom 17 pixel (m of EPSG:3857)
BOXES = {1: (10, 20, 150, 90), 3: (160, 5, 290, 190), 4: (20, 120, 120, 195)}  # class: col0, row0, col1, row1


def _grid(epsg: int, lon: float, lat: float, pixel: float) -> tuple[str, object]:
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    return f"EPSG:{epsg}", from_origin(x, y, pixel, pixel)


SCENES = {
    "web_mercator": _grid(3857, -122.27, 37.85, MERCATOR_PX),
    "geographic": _grid(4326, 24.9, 60.2, 1e-3),  # ~55 x 111 m pixels, 0.2° of latitude
    "utm_far": _grid(32633, 9.5, 45.0, 0.5),  # 5.5° west of UTM 33N's central meridian
    "equal_area": _grid(6933, 10.0, 45.0, 2.0),  # EASE-Grid 2.0 (cylindrical equal-area)
}


def _mask() -> np.ndarray:
    mask = np.zeros((200, 300), dtype=np.uint8)
    for cls, (c0, r0, c1, r1) in BOXES.items():
        mask[r0:r1, c0:c1] = cls
    mask[195:, :] = 255  # nodata rows
    return mask


def _write(path: Path, crs: str, transform) -> Path:
    mask = _mask()
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=1, dtype="uint8", nodata=255,
                       crs=crs, transform=transform) as dst:
        dst.write(mask, 1)
    return path


def _geodesic_m2(crs: str, transform, box_px: tuple[int, int, int, int]) -> float:
    """pyproj's geodesic area of a pixel-edge box, vertices every pixel, in the CRS's lon/lat."""
    poly = shapely.segmentize(shapely.box(*box_px), 1.0)
    world = pixel_to_world(np.array([poly]), transform)[0]
    to_ll = Transformer.from_crs(crs, CRS(crs).geodetic_crs, always_xy=True)
    lonlat = shapely.transform(world, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    return abs(Geod(ellps="WGS84").geometry_area_perimeter(lonlat)[0])


@pytest.mark.parametrize("name", sorted(SCENES))
def test_class_and_polygon_areas_match_geodesic(tmp_path, name):
    crs, transform = SCENES[name]
    path = _write(tmp_path / f"{name}.tif", crs, transform)
    expected = {cls: _geodesic_m2(crs, transform, box) for cls, box in BOXES.items()}
    with rasterio.open(path) as ds:
        per_value = class_ground_areas(ds, rows=64)
    for cls, m2 in expected.items():
        assert per_value[cls] == pytest.approx(m2, rel=1e-3)
    counts = np.bincount(_mask().ravel(), minlength=256)
    areas = scene_areas(path, counts)
    assert areas["units"] == "m2" and areas["classes"]["tree"]["m2"] == pytest.approx(expected[3], rel=1e-3)
    assert areas["area_method"] == (PLANAR if name == "equal_area" else "geodesic (WGS 84 ellipsoid)")
    counts_gpkg = vectorize_raster(path, tmp_path / "v.gpkg", block=128, skip=(0,))
    assert counts_gpkg == {"road": 1, "tree": 1, "building": 1}
    _, _, _, fields = pyogrio.raw.read(tmp_path / "v.gpkg")
    for cls, m2 in zip(fields[0], fields[3]):
        assert m2 == pytest.approx(expected[int(cls)], rel=1e-3)
    method = pyogrio.read_info(tmp_path / "v.gpkg")["layer_metadata"]["area_method"]
    assert method == (PLANAR if name == "equal_area" else "geodesic (WGS 84 ellipsoid)")


def test_web_mercator_gsd_is_the_ground_pixel(tmp_path):
    crs, transform = SCENES["web_mercator"]
    with rasterio.open(_write(tmp_path / "m.tif", crs, transform)) as ds:
        gsd = scene_gsd_m(ds)
        assert gsd == pytest.approx(0.943, abs=2e-3)  # the Mercator pixel is 1.194 m
        assert pixel_area_m2(ds) == pytest.approx(gsd ** 2)
        planar = MERCATOR_PX ** 2 * 140 * 70  # class 1: 140 x 70 px
        assert planar / class_ground_areas(ds)[1] == pytest.approx(1.60, abs=0.01)  # the old error


def test_geographic_gsd_and_no_polygons(tmp_path):
    crs, transform = SCENES["geographic"]
    with rasterio.open(_write(tmp_path / "g.tif", crs, transform)) as ds:
        assert scene_gsd_m(ds) == pytest.approx(np.sqrt(55.5 * 111.3), rel=0.01)
    assert polygon_ground_areas(np.array([], dtype=object), CRS(crs))[0].size == 0


def test_polygonize_and_ground_areas_of_block_merged_polygons(tmp_path):
    crs, transform = SCENES["utm_far"]
    path = _write(tmp_path / "u.tif", crs, transform)
    ids, geoms = polygonize_blocks(path, block=64, skip=(0,))
    areas, method = polygon_ground_areas(pixel_to_world(geoms, transform), CRS(crs), max_segment=32.0)
    assert method == "geodesic (WGS 84 ellipsoid)"
    planar = shapely.area(geoms) * 0.25
    assert np.all(areas / planar < 1 / 1.003)  # UTM 5.5° off its meridian: map areas ~0.4 % too large
