"""The committed sample (data/sample): georeferenced scenes whose labels paint back to the Dubai masks."""

import importlib.util
import json

import numpy as np
import pytest
import rasterio

from aerialseg.core.config import load_params
from aerialseg.stages.masks import run as masks_stage
from conftest import REPO, SHARED_DATA

SAMPLE = REPO / "data" / "sample"
TILES = (1, 2, 3, 4, 5, 6)


def make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample_masks(tmp_path_factory):
    """The sample's labels converted with the repository's params.yaml (data.labels -> masks)."""
    params = load_params(REPO / "params.yaml")
    assert params["data"]["labels"] == "data/sample/labels" and params["data"]["images"] == "data/sample/scenes"
    out = tmp_path_factory.mktemp("masks")
    masks_stage(params, labels=[SAMPLE / "labels"], out=out)
    return out


def test_sample_layout_and_size():
    scenes = sorted(p.name for p in (SAMPLE / "scenes").glob("*.tif"))
    labels = sorted(p.name for p in (SAMPLE / "labels").glob("*.json"))
    assert scenes == [f"dubai_tile{t}.tif" for t in TILES] and labels == [f"dubai_tile{t}.json" for t in TILES]
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 8.5e6, f"data/sample is {total / 1e6:.1f} MB"
    readme = (SAMPLE / "README.md").read_text()
    assert "CC0" in readme and "EPSG:32640" in readme and "make_sample.py" in readme


def test_sample_is_georeferenced_without_overlap():
    module = make_sample_module()
    bounds = []
    for tile in TILES:
        with rasterio.open(SAMPLE / "scenes" / f"dubai_tile{tile}.tif") as ds:
            assert ds.crs.to_epsg() == 32640 and ds.count == 3 and ds.dtypes[0] == "uint8"
            assert ds.transform == module.scene_transform(tile) and ds.res == (0.5, 0.5)
            assert 700 <= min(ds.width, ds.height) and max(ds.width, ds.height) <= 1700
            bounds.append(ds.bounds)
    for i, a in enumerate(bounds):
        for b in bounds[i + 1:]:
            assert a.right <= b.left or b.right <= a.left or a.top <= b.bottom or b.top <= a.bottom


def test_sample_labels_convert_to_georeferenced_masks(sample_masks):
    index = json.loads((sample_masks / "index.json").read_text())
    assert len(index) == len(TILES) and all(e["georeferenced"] for e in index)
    for entry in index:
        with rasterio.open(REPO / entry["scene"]) as scene, rasterio.open(entry["mask"]) as mask:
            assert (mask.crs, mask.transform, mask.shape) == (scene.crs, scene.transform, scene.shape)
        assert entry["shape_counts"]["polygon"] == entry["shape_counts"]["total"] > 100
        assert all(entry["class_pixels"][c] > 0 for c in ("background", "road", "water", "tree", "building"))


@pytest.mark.parametrize("tile", TILES)
def test_sample_matches_the_dubai_source(tile, sample_masks):
    source = SHARED_DATA / "dubai-aerial-cc0"
    if not source.is_dir():
        pytest.skip(f"shared data missing: {source}")
    image, expected = make_sample_module().sample_tile(source, tile)
    with rasterio.open(sample_masks / f"dubai_tile{tile}.tif") as ds:
        mask = ds.read(1)
    with rasterio.open(SAMPLE / "scenes" / f"dubai_tile{tile}.tif") as ds:
        pixels = ds.read().transpose(1, 2, 0)
    agreement = float((mask == expected).mean())
    jpeg_error = float(np.abs(pixels.astype(np.int16) - image).mean())
    print(f"dubai_tile{tile}: label agreement with the source mask {agreement:.4%}, "
          f"mean |image - source| {jpeg_error:.2f} (JPEG q85)")
    assert agreement >= 0.995 and jpeg_error < 8  # two swapped parts give ~13, a 1-px shift ~23
