"""infer-scene's side files: plain JPEG/PNG photos on their pixel grid (one warning), a legend on the
preview, a QGIS style with the COG's colours, ground areas and GSD of a Web Mercator scene, the rate text."""

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from aerialseg.core.classes import CLASS_NAMES
from aerialseg.core.timing import rate_text
from aerialseg.geo.areas import class_ground_areas
from aerialseg.inference.scene import InferOptions, infer_scene

from conftest import shared_path
from helpers.toy_bundle import bundle  # noqa: F401  (a fixture: the tiny bundle, training GSD 0.1 m)


def _opts(**kw) -> InferOptions:
    return InferOptions(progress=False, **kw)


def _pixels(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8), (width, height))
    return base.astype(np.uint8)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("aerialseg")]


def _check_style(qml: Path, cog: Path) -> None:
    """The .qml parses, lists every class by name with the colour of the COG's colour table."""
    entries = ET.parse(qml).getroot().findall("./pipe/rasterrenderer[@type='paletted']/colorPalette/paletteEntry")
    with rasterio.open(cog) as ds:
        table = ds.colormap(1)
    assert [e.get("label") for e in entries] == list(CLASS_NAMES)
    for entry in entries:
        r, g, b, _ = table[int(entry.get("value"))]
        assert entry.get("color") == f"#{r:02x}{g:02x}{b:02x}"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_plain_photo_maps_on_its_pixel_grid_with_one_warning(bundle, tmp_path, caplog, suffix):  # noqa: F811
    scene = tmp_path / f"photo{suffix}"
    cv2.imwrite(str(scene), _pixels(200, 300))
    with caplog.at_level(logging.WARNING):
        result = infer_scene(scene, bundle, tmp_path / "photo_map.tif", _opts(areas=True))
    assert len(_warnings(caplog)) == 1 and "without georeference" in _warnings(caplog)[0]
    with rasterio.open(result.outputs["map"]) as out:
        assert out.crs is None and out.shape == (200, 300)
    areas = json.loads(Path(result.outputs["areas"]).read_text())
    assert areas["units"] == "pixels" and areas["area_method"] == "pixel counts"
    preview = cv2.imread(result.outputs["preview"])
    assert preview.shape[0] == 200 and preview.shape[1] > 300 + 60  # the legend panel on the right
    assert (preview[:, 300:] == 255).mean() > 0.5  # white panel with swatches and names
    assert result.outputs["style"] == str(tmp_path / "photo_map.qml")
    _check_style(Path(result.outputs["style"]), Path(result.outputs["map"]))
    caplog.clear()  # evaluate maps its scenes with allow_ungeoreferenced: no warning per scene there
    with caplog.at_level(logging.WARNING):
        infer_scene(scene, bundle, tmp_path / "again.tif", _opts(allow_ungeoreferenced=True, preview=False))
    assert not _warnings(caplog)


def test_shared_jpeg_scene(bundle, tmp_path, caplog):  # noqa: F811
    scene = shared_path("dubai-aerial-cc0", "tile_2", "images", "image_part_001.jpg")
    with caplog.at_level(logging.WARNING):
        result = infer_scene(scene, bundle, tmp_path / "dubai.tif", _opts(preview=False))
    assert len(_warnings(caplog)) == 1
    with rasterio.open(scene) as src, rasterio.open(result.outputs["map"]) as out:
        assert out.shape == src.shape


def test_web_mercator_scene_areas_and_gsd(bundle, tmp_path, caplog):  # noqa: F811
    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(-122.27, 37.85)
    scene = tmp_path / "tile.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=from_origin(x, y, 1.194328566, 1.194328566)) as dst:
        dst.write(_pixels(256, 256).transpose(2, 0, 1))
    with caplog.at_level(logging.WARNING):
        result = infer_scene(scene, bundle, tmp_path / "tile_map.tif",
                             _opts(areas=True, vectors=True, resample=False, preview=False))
    assert any("pixel size 0.94" in m for m in _warnings(caplog)), _warnings(caplog)  # not the Mercator 1.19 m
    areas = json.loads(Path(result.outputs["areas"]).read_text())
    assert areas["area_method"] == "geodesic (WGS 84 ellipsoid)"
    with rasterio.open(result.outputs["map"]) as out:
        expected = class_ground_areas(out)
    for i, name in enumerate(CLASS_NAMES):
        assert areas["classes"][name]["m2"] == pytest.approx(expected[i])
    assert areas["total_m2"] == pytest.approx(256 * 256 * 1.194328566 ** 2 / 1.6065, rel=2e-3)  # not x1.6
    _check_style(Path(result.outputs["style"]), Path(result.outputs["map"]))


def test_rate_text_keeps_significant_digits():
    assert rate_text(12.44) == "12.4 Mpx/s" and rate_text(0.5) == "0.5 Mpx/s"
    assert rate_text(0.0035) == "3.5 kpx/s" and rate_text(2e-6) == "2 px/s"
