"""Polygons merged across block borders equal whole-raster polygons; GeoPackage in the scene's CRS; areas."""

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from aerialseg.core.classes import OEM_TO_AERIALSEG, lut
from aerialseg.geo.areas import class_areas
from aerialseg.geo.vectorize import polygonize_blocks, vectorize_raster, write_gpkg

from conftest import shared_path


def _write(path: Path, mask: np.ndarray, transform=None, crs="EPSG:32633") -> Path:
    profile = {"driver": "GTiff", "width": mask.shape[1], "height": mask.shape[0], "count": 1, "dtype": "uint8",
               "nodata": 255, "crs": crs, "transform": transform or from_origin(500000, 6000000, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask, 1)
    return path


def _synthetic() -> np.ndarray:
    mask = np.zeros((100, 90), dtype=np.uint8)
    mask[5:60, 10:80] = 1  # big block over many block borders
    mask[20:40, 30:50] = 0  # ... with a hole
    mask[70:95, 5:40] = 2
    mask[70:75, 40:85] = 2  # L-shape crossing borders
    mask[62:64, 62:64] = 3  # tiny: dropped by min_area
    mask[80:88, 60:68] = 4
    mask[88:96, 68:76] = 4  # touches the other square only at a corner: 4-connectivity keeps two parts
    mask[:3, :] = 255  # nodata
    return mask


def _by_class(ids: np.ndarray, geoms: np.ndarray) -> dict[int, list]:
    out: dict[int, list] = {}
    for i, g in zip(ids, geoms):
        out.setdefault(int(i), []).append(g)
    return {k: sorted(v, key=lambda g: (g.area, g.bounds)) for k, v in out.items()}


def test_blocks_merge_to_the_whole_raster_result(tmp_path):
    path = _write(tmp_path / "m.tif", _synthetic())
    whole = _by_class(*polygonize_blocks(path, block=4096, skip=(0,)))
    blocked = _by_class(*polygonize_blocks(path, block=16, skip=(0,)))
    assert whole.keys() == blocked.keys() == {1, 2, 3, 4}
    for cls in whole:
        assert len(whole[cls]) == len(blocked[cls])
        for a, b in zip(whole[cls], blocked[cls]):
            assert a.symmetric_difference(b).area == 0
    assert len(blocked[1]) == 1 and len(blocked[1][0].interiors) == 1  # the hole survives the merge
    assert len(blocked[4]) == 2


def test_min_area_drops_small_parts(tmp_path):
    path = _write(tmp_path / "m.tif", _synthetic())
    ids, geoms = polygonize_blocks(path, block=16, skip=(0,), min_area_px=5)
    assert 3 not in set(ids.tolist())
    assert all(g.area >= 5 for g in geoms)


def test_real_label_raster_blocked_equals_whole(tmp_path):
    label = shared_path("openearthmap-samples", "labels", "palu_8.tif")
    with rasterio.open(label) as ds:
        mask = lut(OEM_TO_AERIALSEG)[ds.read(1, window=rasterio.windows.Window(0, 0, 512, 400))]
    path = _write(tmp_path / "palu.tif", mask)
    ids_w, geoms_w = polygonize_blocks(path, block=4096, skip=(0,))
    ids_b, geoms_b = polygonize_blocks(path, block=96, skip=(0,))
    assert len(ids_w) == len(ids_b) > 10
    for cls in range(1, 5):
        area = float(shapely.area(geoms_b[ids_b == cls]).sum())
        assert area == float((mask == cls).sum()) == float(shapely.area(geoms_w[ids_w == cls]).sum())


def test_geopackage_is_in_the_scene_crs(tmp_path):
    transform = from_origin(500000, 6000000, 0.5, 0.5)
    path = _write(tmp_path / "m.tif", _synthetic(), transform)
    counts = vectorize_raster(path, tmp_path / "v.gpkg", block=32, skip=(0,), min_area_px=5)
    assert counts == {"road": 1, "water": 1, "building": 2}
    info = pyogrio.read_info(tmp_path / "v.gpkg")
    assert info["crs"] == "EPSG:32633" and info["features"] == 4 and info["geometry_type"] == "Polygon"
    _, _, wkb, fields = pyogrio.raw.read(tmp_path / "v.gpkg")
    geoms = shapely.from_wkb(wkb)
    area_px, area_m2 = fields[2], fields[3]
    # ground areas: easting 500 km is UTM 33N's central meridian, where the map scale is 0.9996
    np.testing.assert_allclose(area_m2, area_px * 0.25 / 0.9996 ** 2, rtol=1e-5)
    np.testing.assert_allclose(shapely.area(geoms), area_px * 0.25)  # map units
    minx, miny, maxx, maxy = shapely.total_bounds(geoms)
    assert 500000 <= minx < maxx <= 500045 and 5999950 <= miny < maxy <= 6000000


def test_empty_vectors_still_write_a_layer(tmp_path):
    path = _write(tmp_path / "bg.tif", np.zeros((20, 20), np.uint8))
    assert vectorize_raster(path, tmp_path / "e.gpkg", skip=(0,)) == {}
    assert pyogrio.read_info(tmp_path / "e.gpkg")["features"] == 0


def test_class_areas_metric_and_pixels():
    counts = np.zeros(256, np.int64)
    counts[:5] = [100, 50, 0, 25, 25]
    counts[255] = 7
    metric = class_areas(counts, 0.04)
    assert metric["units"] == "m2" and metric["valid_pixels"] == 200 and metric["nodata_pixels"] == 7
    assert metric["classes"]["road"]["m2"] == pytest.approx(2.0)
    assert metric["classes"]["road"]["ha"] == pytest.approx(2e-4)
    assert metric["classes"]["background"]["share"] == pytest.approx(0.5)
    pixels = class_areas(counts, None)
    assert pixels["units"] == "pixels" and "m2" not in pixels["classes"]["road"] and "pixel" in pixels["note"]


def test_write_gpkg_without_crs(tmp_path):
    geoms = np.array([shapely.box(0, 0, 2, 3)], dtype=object)
    write_gpkg(tmp_path / "p.gpkg", np.array([1]), geoms, from_origin(0, 0, 1, -1), None)
    info = pyogrio.read_info(tmp_path / "p.gpkg")
    assert info["crs"] is None and info["features"] == 1
