"""infer-scene end to end on real GeoTIFFs with a tiny random-init model: grid, nodata, COG, atomicity."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from aerialseg import cli
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.predictor import Predictor
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.geo.raster import valid_mask

from conftest import SHARED_DATA, shared_path
from helpers.toy_bundle import bundle  # noqa: F401  (a fixture)
from helpers.cli import exit_and_stderr

GEOTIFFS = ["deepforest/OSBS_029.tif", "deepforest/2018_SJER_3_252000_4107000_image_477.tif",
            "deepforest/5b90f92da0d7280005fab355_4310.tif", "deepforest/5dded5bc0140b80006d2e565_23.tif",
            "deepforest/test_tiled.tif", "deepforest/australia.tif", "webodm/orthophoto.tif"]
GEOTIFFS = sorted(set(GEOTIFFS) | {str(p.relative_to(SHARED_DATA / "geotiff-samples"))
                                   for p in SHARED_DATA.glob("geotiff-samples/*/*.tif*")})


def _opts(**kw) -> InferOptions:
    return InferOptions(progress=False, preview=False, **kw)


def _whole_image_classes(bundle: Path, scene: Path) -> np.ndarray:
    from aerialseg.models import load_model

    model, _ = load_model(bundle)
    predict = Predictor(model, [0.4] * 3, [0.2] * 3, torch.device("cpu"))
    with rasterio.open(scene) as ds:
        return predict(ds.read([1, 2, 3])[None])[0].argmax(0)


@pytest.mark.parametrize("name", GEOTIFFS)
def test_every_sample_geotiff_keeps_grid_and_nodata(bundle, tmp_path, name):
    scene = shared_path("geotiff-samples", name)
    result = infer_scene(scene, bundle, tmp_path / "map.tif", _opts(areas=True, resample=False))
    with rasterio.open(scene) as src, rasterio.open(result.outputs["map"]) as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert out.count == 1 and out.dtypes[0] == "uint8" and out.nodata == 255
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.colormap(1)[4][:3] == (255, 200, 0)
        if max(out.shape) > 1024:
            assert out.overviews(1), "large maps carry overviews"
        classes, valid = out.read(1), valid_mask(src)
        assert np.all(classes[~valid] == 255) and np.all(classes[valid] < 5)
        georeferenced = src.crs is not None
    areas = json.loads(Path(result.outputs["areas"]).read_text())
    assert areas["units"] == ("m2" if georeferenced else "pixels") and areas["valid_pixels"] == int(valid.sum())
    assert sum(c["pixels"] for c in areas["classes"].values()) == areas["valid_pixels"]


def test_rgba_orthophoto_transparent_area_is_nodata(bundle, tmp_path):
    scene = shared_path("geotiff-samples", "webodm", "orthophoto.tif")
    result = infer_scene(scene, bundle, tmp_path / "odm.tif", _opts())
    with rasterio.open(scene) as src, rasterio.open(result.outputs["map"]) as out:
        alpha = src.read(4)
        assert (alpha == 0).sum() > 500
        np.testing.assert_array_equal(out.read(1) == 255, alpha == 0)


def test_map_equals_whole_image_prediction(bundle, tmp_path):
    """Seam-free: tiles + blending give the same classes as one forward pass over the whole scene."""
    scene = shared_path("geotiff-samples", "deepforest", "test_tiled.tif")  # 1000 px, tile 256
    result = infer_scene(scene, bundle, tmp_path / "m.tif", _opts(resample=False, batch=3))
    with rasterio.open(result.outputs["map"]) as out:
        stitched = out.read(1)
    assert (stitched == _whole_image_classes(bundle, scene)).mean() > 0.9999
    assert result.tiles == 25


def test_tiff_without_georeference_reports_pixels(bundle, tmp_path):
    src = tmp_path / "plain.tif"
    crop = rasterio.open(shared_path("geotiff-samples", "deepforest", "test_tiled.tif")).read(
        window=rasterio.windows.Window(0, 0, 300, 220))
    with rasterio.open(src, "w", driver="GTiff", width=300, height=220, count=3, dtype="uint8") as dst:
        dst.write(crop)
    with pytest.raises(AerialsegError, match="not georeferenced.*--allow-ungeoreferenced"):
        infer_scene(src, bundle, tmp_path / "plain_map.tif", _opts(areas=True))
    result = infer_scene(src, bundle, tmp_path / "plain_map.tif",
                         _opts(areas=True, vectors=True, allow_ungeoreferenced=True))
    with rasterio.open(result.outputs["map"]) as out:
        assert out.crs is None and out.shape == (220, 300)
    areas = json.loads(Path(result.outputs["areas"]).read_text())
    assert areas["units"] == "pixels" and "pixel" in areas["note"] and "m2" not in areas["classes"]["road"]
    assert Path(result.outputs["vectors"]).is_file()


def _write_scene(path: Path, pixels: np.ndarray, nodata: int | None = None, **extra) -> Path:
    profile = {"driver": "GTiff", "width": pixels.shape[2], "height": pixels.shape[1], "count": pixels.shape[0],
               "dtype": str(pixels.dtype), "crs": "EPSG:32640", "transform": from_origin(300000, 2800000, 0.1, 0.1),
               "nodata": nodata, **extra}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def _real_pixels(height: int, width: int) -> np.ndarray:
    with rasterio.open(shared_path("geotiff-samples", "deepforest", "5dded5bc0140b80006d2e565_23.tif")) as ds:
        return ds.read(window=rasterio.windows.Window(600, 700, width, height))


def test_nodata_collar_and_scene_smaller_than_a_tile(bundle, tmp_path):
    pixels = _real_pixels(150, 97)  # smaller than the 256 px tile: padded, not dropped
    pixels[:, :12, :] = 0
    pixels[:, :, -9:] = 0
    scene = _write_scene(tmp_path / "collar.tif", pixels, nodata=0)
    result = infer_scene(scene, bundle, tmp_path / "collar_map.tif", _opts(confidence=True))
    with rasterio.open(result.outputs["map"]) as out, rasterio.open(result.outputs["confidence"]) as conf:
        classes, confidence = out.read(1), conf.read(1)
    assert np.all(classes[:12] == 255) and np.all(classes[:, -9:] == 255)
    assert np.all(classes[12:, :-9] < 5)
    assert np.all(confidence[classes == 255] == 0) and np.all(confidence[classes < 5] >= 255 // 5)
    assert result.tiles == 1


def test_onnx_backend_matches_torch(bundle, tmp_path):
    scene = shared_path("geotiff-samples", "deepforest", "OSBS_029.tif")
    maps = []
    for backend in ("torch", "onnx"):
        result = infer_scene(scene, bundle, tmp_path / f"{backend}.tif", _opts(backend=backend, tta=True))
        with rasterio.open(result.outputs["map"]) as out:
            maps.append(out.read(1))
    assert (maps[0] == maps[1]).mean() > 0.999


def test_gsd_mismatch_warns_and_resamples(bundle, tmp_path, caplog):
    coarse = rasterio.open(shared_path("geotiff-samples", "deepforest", "test_tiled.tif")).read(
        window=rasterio.windows.Window(100, 100, 300, 260))
    scene = _write_scene(tmp_path / "coarse.tif", coarse, transform=from_origin(300000, 2800000, 0.25, 0.25))
    with caplog.at_level(logging.WARNING, logger="aerialseg.inference.scene"):
        result = infer_scene(scene, bundle, tmp_path / "rs.tif", _opts(confidence=True))
    # 0.25 m map pixels are 0.24998 m on the ground (UTM 40N, 200 km from its central meridian)
    assert "training GSD" in caplog.text and result.scale == pytest.approx(2.5, rel=1e-3)
    assert result.tiles == 4 * 3  # 750 x 650 model-grid px in 256 px tiles, stride 224
    with rasterio.open(scene) as src, rasterio.open(result.outputs["map"]) as out:
        assert out.shape == src.shape and out.transform == src.transform
        assert np.all(out.read(1) < 5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aerialseg.inference.scene"):
        native = infer_scene(scene, bundle, tmp_path / "native.tif", _opts(resample=False))
    assert "--resample" in caplog.text and native.scale == 1.0 and native.tiles == 4


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_interrupted_run_leaves_no_output(bundle, tmp_path, monkeypatch, error):
    import aerialseg.inference.scene as infer_mod

    real = infer_mod.Predictor.from_bundle

    def failing(*args, **kwargs):
        predict, calls = real(*args, **kwargs), []

        def wrapped(tiles):
            calls.append(1)
            if len(calls) == 3:
                raise error("stop")
            return predict(tiles)

        return wrapped

    monkeypatch.setattr(infer_mod.Predictor, "from_bundle", failing)
    out_dir = tmp_path / "out"
    scene = shared_path("geotiff-samples", "deepforest", "test_tiled.tif")
    with pytest.raises(error):
        infer_scene(scene, bundle, out_dir / "map.tif",
                    _opts(batch=2, resample=False, confidence=True, vectors=True, areas=True))
    assert list(out_dir.iterdir()) == []


def test_scenes_are_read_as_training_reads_them(bundle, tmp_path, capsys, repo_root):
    """The one scene reader: grey repeats its band, RGBN maps as its RGB, two bands are refused."""
    rgb = _real_pixels(64, 64)
    four = _write_scene(tmp_path / "rgbn.tif", np.concatenate([rgb, rgb[:1]]), photometric="minisblack")
    three = _write_scene(tmp_path / "rgb.tif", rgb)
    infer_scene(four, bundle, tmp_path / "four.tif", _opts())
    infer_scene(three, bundle, tmp_path / "three.tif", _opts())
    with rasterio.open(tmp_path / "four.tif") as a, rasterio.open(tmp_path / "three.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    grey = _write_scene(tmp_path / "gray.tif", rgb[:1])
    infer_scene(grey, bundle, tmp_path / "grey.tif", _opts())
    two = _write_scene(tmp_path / "two.tif", rgb[:2], photometric="minisblack")
    code, err = exit_and_stderr(["infer-scene", str(two), "--model", str(bundle), "--out", str(tmp_path / "x.tif"),
                          "--params", str(repo_root / "params.yaml")], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "2 image band" in err and "reads 3" in err
    assert not (tmp_path / "x.tif").exists()


def test_uint16_scene_is_refused_unless_its_range_is_declared(bundle, tmp_path):
    rgb16 = _real_pixels(64, 64).astype(np.uint16) * 200
    scene = _write_scene(tmp_path / "u16.tif", rgb16)
    with pytest.raises(AerialsegError, match="uint16"):
        infer_scene(scene, bundle, tmp_path / "u16_map.tif", _opts())
    assert not (tmp_path / "u16_map.tif").exists()


def test_cli_infer_scene_writes_map(bundle, tmp_path, capsys, repo_root):
    scene = shared_path("geotiff-samples", "deepforest", "OSBS_029.tif")
    old = sys.argv
    sys.argv = ["aerialseg", "infer-scene", str(scene), "--model", str(bundle), "--out", str(tmp_path / "c.tif"),
                "--batch", "4", "--vectors", "--areas", "--params", str(repo_root / "params.yaml")]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.app()
    finally:
        sys.argv = old
    assert exc.value.code in (0, None)
    assert "infer-scene: 400x400 px" in capsys.readouterr().out
    for name in ("c.tif", "c_polygons.gpkg", "c_areas.json", "c_preview.png"):
        assert (tmp_path / name).is_file(), name


def test_anylabeling_format(bundle, tmp_path):
    """--format anylabeling: the one converter's polygons, painting back to the GeoTIFF map (specks merged)."""
    from aerialseg.annotations.anylabeling import parse_shapes
    from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes
    from aerialseg.annotations.regions import find_regions
    from aerialseg.core.classes import IGNORE
    from aerialseg.stages.masks import label_table
    from aerialseg.core.config import load_params
    from conftest import REPO

    pixels = _real_pixels(120, 160)
    scene = _write_scene(tmp_path / "scene.tif", pixels)
    result = infer_scene(scene, bundle, None, _opts(format="anylabeling"))
    label = json.loads(Path(result.outputs["map"]).read_text())
    assert Path(result.outputs["map"]) == tmp_path / "scene.json"
    assert label["imagePath"] == "scene.tif" and label["imageHeight"] == 120 and label["imageWidth"] == 160
    assert label["shapes"] and all(s["label"] in ("road", "water", "tree", "building") for s in label["shapes"])
    geotiff = infer_scene(scene, bundle, tmp_path / "map.tif", _opts())
    with rasterio.open(geotiff.outputs["map"]) as ds:
        found = find_regions(ds.read(1), 16)
    big = (found.pixels >= 16)[found.labels] & (found.mask != 0) & (found.mask != IGNORE)
    assert len(label["shapes"]) == len({int(v) for v in np.unique(found.labels[big])})  # one per region
    shapes, _ = parse_shapes(label, tmp_path / "scene.json", label_table(load_params(REPO / "params.yaml")))
    painted = rasterize_shapes(shapes, 160, 120, MaskOptions())
    assert np.array_equal(painted, np.where(big, found.mask, 0))
    with pytest.raises(AerialsegError, match="already exists"):
        infer_scene(scene, bundle, None, _opts(format="anylabeling"))


def test_options_are_checked():
    with pytest.raises(AerialsegError, match="unknown backend"):
        InferOptions(backend="tensorrt").check()
    with pytest.raises(AerialsegError, match="unknown infer key"):
        InferOptions.from_params({"batchsize": 4})
    assert InferOptions.from_params({"batch": 4}, batch=None, tta=True).batch == 4
    assert InferOptions.from_params({"batch": 4}, batch=2).batch == 2
