"""Object post-processing: banded 8-connected components must equal whole-image cv2 labelling."""

import csv
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from affine import Affine
from typer.testing import CliRunner

from aerialseg.core.errors import AerialsegError
from aerialseg.geo.raster import open_raster
from aerialseg.inference.postprocess import (
    ObjectFilter,
    UnionFind,
    border_pairs,
    postprocess,
    resolve_classes,
    scan_objects,
)
from aerialseg.stages.postprocess import run as postprocess_stage
from conftest import shared_path
from helpers.dubai import DUBAI_COLORS



def write_raster(path: Path, mask: np.ndarray, georef: bool = True, nodata: int | None = 255) -> Path:
    extra = {"crs": "EPSG:32617", "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)} if georef else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                           dtype=mask.dtype, nodata=nodata, **extra) as ds:
            ds.write(mask, 1)
    return path


def cv2_reference(mask: np.ndarray, class_ids: list[int]) -> list[tuple]:
    """Objects of the whole image straight from cv2: sorted (class, area, bbox, centroid) tuples."""
    rows = []
    for c in class_ids:
        n, _, stats, cents = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        for i in range(1, n):
            x, y, w, h, area = stats[i]
            rows.append((c, int(area), int(x), int(y), int(x + w - 1), int(y + h - 1), *cents[i]))
    return sorted(rows)


def banded(path: Path, class_ids: list[int], band_rows: int) -> list[tuple]:
    with open_raster(path) as ds:
        objects, _, _ = scan_objects(ds, class_ids, band_rows)
    keys = ("class_id", "area_px", "col_min", "row_min", "col_max", "row_max", "centroid_col", "centroid_row")
    return sorted(tuple(objects[k][i].item() for k in keys) for i in range(len(objects["class_id"])))


def assert_same_objects(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    got_a, want_a = np.array(got, dtype=np.float64), np.array(want, dtype=np.float64)
    np.testing.assert_array_equal(got_a[:, :6], want_a[:, :6])  # class, area, bbox: identical
    np.testing.assert_allclose(got_a[:, 6:], want_a[:, 6:], rtol=0, atol=1e-9)  # centroids


def constructed_mask() -> np.ndarray:
    """Shapes that cross band borders in every way that matters, on random multi-class noise."""
    rng = np.random.default_rng(7)
    mask = rng.choice([0, 1, 2, 3, 4], size=(96, 83), p=[0.55, 0.15, 0.1, 0.1, 0.1]).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.03] = 255
    mask[:, 60:] = 0
    mask[2:40, 62:64] = 4  # U: two arms, separate in the first bands, joined at the bottom
    mask[2:40, 70:72] = 4
    mask[38:40, 62:72] = 4
    for i in range(40):  # a diagonal line: consecutive pixels touch only at corners
        mask[45 + i, 61 + i % 20] = 3 if i < 20 else 0
    mask[50:95, 80] = 1  # a column spanning many bands
    return mask


@pytest.mark.parametrize("band_rows", [1, 5, 8, 13, 96, 500])
def test_banded_components_equal_whole_image(tmp_path: Path, band_rows: int) -> None:
    mask = constructed_mask()
    path = write_raster(tmp_path / "classes.tif", mask)
    want = cv2_reference(mask, [1, 2, 3, 4])
    assert len(want) > 200  # noise gives many objects, lots of them cut by band borders
    assert_same_objects(banded(path, [1, 2, 3, 4], band_rows), want)


def test_objects_merge_across_borders_once(tmp_path: Path) -> None:
    mask = np.zeros((40, 30), dtype=np.uint8)
    mask[0:30, 2] = mask[0:30, 8] = mask[29, 2:9] = 4  # U whose arms meet 6 bands later
    for i in range(12):  # diagonal staircase: 8-connected only
        mask[5 + i, 15 + i] = 2
    path = write_raster(tmp_path / "u.tif", mask)
    objects = banded(path, [2, 4], band_rows=5)
    assert [(o[0], o[1]) for o in objects] == [(2, 12), (4, 30 + 30 + 5)]
    assert objects[1][2:6] == (2, 0, 8, 29)


def test_union_find_and_border_pairs() -> None:
    upper = np.array([-1, 0, -1, -1, 1])
    lower = np.array([2, -1, -1, 3, -1])
    assert border_pairs(upper, lower).tolist() == [[0, 2], [1, 3]]  # both diagonal contacts
    sets = UnionFind()
    sets.union(5, 3)
    sets.union(3, 1)
    assert sets.roots(7).tolist() == [0, 1, 2, 1, 4, 1, 6]


def test_postprocess_outputs_filter_and_clean(tmp_path: Path) -> None:
    mask = np.zeros((64, 48), dtype=np.uint8)
    mask[1:5, 1:5] = 4  # 16 px square, aspect 1
    mask[10:12, 2:30] = 1  # 2x28 strip, aspect 14
    mask[20:40, 10:20] = 4  # 200 px, aspect 2, crosses band borders at 32
    mask[50, 40] = 3  # 1 px speck
    mask[60:64, 0:48] = 255  # nodata
    path = write_raster(tmp_path / "scene.tif", mask)
    flt = ObjectFilter(min_area=2.0, max_aspect=5.0)
    summary = postprocess(path, tmp_path / "out", classes="road,tree,4", object_filter=flt, band_rows=16,
                          clean=True)
    assert (summary["objects"], summary["kept"]) == (4, 2)
    ground = 0.25 / 0.9996 ** 2  # true ground m² of a 0.5 m pixel on UTM 17N's central meridian (scale 0.9996)
    assert summary["classes"]["building"] == {"class_id": 4, "objects": 2, "kept": 2, "kept_area_px": 216,
                                              "kept_area_m2": round(216 * ground, 3)}
    rows = list(csv.DictReader((tmp_path / "out" / "scene.objects.csv").open()))
    assert [int(r["area_px"]) for r in rows] == [16, 200]
    big = rows[1]
    assert float(big["area_m2"]) == pytest.approx(200 * ground, abs=1e-3)
    assert float(big["centroid_x"]) == pytest.approx(500000 + 15.0 * 0.5)  # mean col 14.5 -> centre 15.0
    assert float(big["centroid_y"]) == pytest.approx(4000000 - 30.0 * 0.5)  # mean row 29.5 -> centre 30.0
    assert (float(big["bbox_xmin"]), float(big["bbox_xmax"])) == (500005.0, 500010.0)
    assert (float(big["bbox_ymin"]), float(big["bbox_ymax"])) == (3999980.0, 3999990.0)
    assert float(big["aspect_ratio"]) == 2.0
    geo = json.loads((tmp_path / "out" / "scene.objects.geojson").read_text())
    assert geo["crs"]["properties"]["name"].endswith("32617") and len(geo["features"]) == 2
    assert geo["features"][1]["geometry"]["coordinates"] == [500007.5, 3999985.0]
    with rasterio.open(tmp_path / "out" / "scene.clean.tif") as ds:
        cleaned = ds.read(1)
        assert ds.crs.to_epsg() == 32617 and ds.nodata == 255
    expected = mask.copy()
    expected[10:12, 2:30] = 0  # aspect 14 > 5
    expected[50, 40] = 0  # area 1 < 2
    np.testing.assert_array_equal(cleaned, expected)
    assert (tmp_path / "out" / "scene.objects.png").stat().st_size > 0


def test_clean_raster_matches_whole_image_filter(tmp_path: Path) -> None:
    mask = constructed_mask()
    path = write_raster(tmp_path / "noise.tif", mask)
    postprocess(path, tmp_path / "out", classes=[1, 2, 3, 4], object_filter=ObjectFilter(min_area=4),
                band_rows=7, clean=True, preview=False)
    expected = mask.copy()
    for c in (1, 2, 3, 4):
        n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < 4)
        expected[np.isin(labels, small[small > 0])] = 0
    with rasterio.open(tmp_path / "out" / "noise.clean.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), expected)


def dubai_classes(tile: str, part: str) -> np.ndarray:
    bgr = cv2.imread(str(shared_path("dubai-aerial-cc0", tile, "masks", f"image_part_{part}.png")), cv2.IMREAD_COLOR)
    rgb = bgr[:, :, ::-1]
    classes = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for colour, class_id in DUBAI_COLORS.items():
        classes[np.all(rgb == colour, axis=-1)] = class_id
    return classes


def test_real_dubai_mask_banded_equals_whole(tmp_path: Path) -> None:
    mask = dubai_classes("tile_2", "001")
    assert (mask == 4).mean() > 0.02  # buildings are there
    path = write_raster(tmp_path / "dubai.tif", mask, georef=False)
    assert_same_objects(banded(path, [1, 2, 3, 4], band_rows=37), cv2_reference(mask, [1, 2, 3, 4]))
    summary = postprocess(path, tmp_path / "out", classes=["building"], object_filter=ObjectFilter(min_area=50))
    assert summary["georeferenced"] is False and summary["classes"]["building"]["kept_area_m2"] is None
    assert 0 < summary["kept"] < summary["objects"]
    geo = json.loads((tmp_path / "out" / "dubai.objects.geojson").read_text())
    assert "crs" not in geo and geo["coordinate_space"].startswith("pixel")
    assert len(geo["features"]) == summary["kept"]


def test_errors(tmp_path: Path) -> None:
    floats = write_raster(tmp_path / "prob.tif", np.zeros((8, 8), dtype=np.float32), nodata=None)
    with pytest.raises(AerialsegError, match="not a class raster"):
        postprocess(floats, tmp_path / "out")
    plain = write_raster(tmp_path / "plain.tif", np.ones((8, 8), dtype=np.uint8), georef=False)
    with pytest.raises(AerialsegError, match="georeferenced raster"):
        postprocess(plain, tmp_path / "out", object_filter=ObjectFilter(min_area=1, area_unit="m2"))
    with pytest.raises(AerialsegError, match="nodata"):
        postprocess(plain, tmp_path / "out", classes="255")
    with pytest.raises(AerialsegError, match="unknown class"):
        resolve_classes("roads")
    with pytest.raises(AerialsegError, match="file not found"):
        postprocess(tmp_path / "missing.tif", tmp_path / "out")
    with pytest.raises(AerialsegError, match="above"):
        postprocess_stage({"postprocess": {"min_area": 5, "max_area": 1}}, plain)
    with pytest.raises(AerialsegError, match="unknown postprocess key\\(s\\) min_aera"):
        postprocess_stage({"postprocess": {"min_aera": 5}}, plain)
    assert resolve_classes(["Road", 4, "2"]) == [1, 2, 4] and resolve_classes(None) == [1, 2, 3, 4]


def test_cli_postprocess(tmp_path: Path) -> None:
    from aerialseg.cli import app

    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:6, 2:6] = mask[10:12, 10:19] = 1
    path = write_raster(tmp_path / "roads.tif", mask)
    params = tmp_path / "params.yaml"
    params.write_text(f"postprocess:\n  out: {tmp_path / 'objs'}\n  classes: [road]\n  band_rows: 4\n")
    result = CliRunner().invoke(app, ["postprocess", str(path), "--params", str(params), "--max-aspect", "3"])
    assert result.exit_code == 0, result.output
    assert "1 of 2 objects kept" in result.output
    summary = json.loads((tmp_path / "objs" / "roads.objects.json").read_text())
    assert summary["band_rows"] == 4 and summary["filter"]["max_aspect"] == 3.0


def test_real_georeferenced_scene_in_metres(tmp_path: Path) -> None:
    """A class raster on a real orthophoto's grid (NEON, EPSG:32617, 0.1 m): m² areas and map coordinates."""
    with open_raster(shared_path("geotiff-samples", "deepforest", "OSBS_029.tif")) as src:
        rgb = src.read().astype(np.float32)
        profile = {"crs": src.crs, "transform": src.transform, "bounds": src.bounds}
    greenness = 2 * rgb[1] - rgb[0] - rgb[2]
    mask = np.where(greenness > np.percentile(greenness, 70), 3, 0).astype(np.uint8)  # "tree" blobs
    path = tmp_path / "osbs_classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                       dtype="uint8", nodata=255, crs=profile["crs"], transform=profile["transform"]) as ds:
        ds.write(mask, 1)
    assert_same_objects(banded(path, [3], band_rows=50), cv2_reference(mask, [3]))
    summary = postprocess(path, tmp_path / "out", classes="tree", band_rows=50,
                          object_filter=ObjectFilter(min_area=0.5, area_unit="m2"))
    assert summary["pixel_area_m2"] == pytest.approx(0.01, rel=1e-3) and summary["crs"] == "EPSG:32617"
    rows = list(csv.DictReader((tmp_path / "out" / "osbs_classes.objects.csv").open()))
    assert len(rows) == summary["kept"] > 0
    left, bottom, right, top = (round(v, 3) for v in profile["bounds"])  # the CSV keeps mm
    for row in rows:
        x = [float(row[k]) for k in ("bbox_xmin", "centroid_x", "bbox_xmax")]
        y = [float(row[k]) for k in ("bbox_ymin", "centroid_y", "bbox_ymax")]
        assert left <= x[0] <= x[1] <= x[2] <= right and bottom <= y[0] <= y[1] <= y[2] <= top
        assert float(row["area_m2"]) >= 0.5
        assert float(row["area_m2"]) == pytest.approx(int(row["area_px"]) * summary["pixel_area_m2"], abs=1e-3)
        width_m = float(row["bbox_xmax"]) - float(row["bbox_xmin"])
        assert width_m == pytest.approx(int(row["width_px"]) * 0.1, abs=2e-3)
