"""OpenEarthMap pretraining: pairing, remap to the 5 classes, GSD resampling, the stage end to end."""

import json
import shutil

import cv2
import numpy as np
import pytest
import rasterio
import torch

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.models import create_model, load_model
from aerialseg.stages import pretrain as pretrain_stage
from aerialseg.training.pretrain import (OpenEarthMapDataset, find_pairs, oem_lut, pretrain_datasets,
                                         pretrain_enabled, split_names)
from aerialseg.training.weights import init_weights
from conftest import shared_path

# SOURCE.md: OEM value -> (paper class) -> aerialseg class.
SOURCE_MAPPING = {0: IGNORE, 1: 0, 2: 0, 3: 0, 4: 1, 5: 3, 6: 2, 7: 0, 8: 4}



@pytest.fixture(scope="module")
def oem():
    return shared_path("openearthmap-samples")


def raw_labels(oem, name):
    with rasterio.open(oem / "labels" / f"{name}.tif") as ds:
        return ds.read(1)


def expected_classes(raw):
    out = np.full(raw.shape, 99, np.uint8)
    for value, cls in SOURCE_MAPPING.items():
        out[raw == value] = cls
    return out


def test_pairs_and_remap_match_source_md(oem):
    pairs = find_pairs(oem)
    assert [p[0].name for p in pairs] == ["houston_16.tif", "palu_8.tif"]
    ds = OpenEarthMapDataset(oem, patch_size=1024, resample=1.0, mode="grid")
    assert len(ds) == 2
    (h_img, h_mask), (p_img, p_mask) = ds[0], ds[1]
    assert h_img.shape == (1024, 1024, 3) and h_img.dtype == np.uint8 and h_mask.dtype == np.uint8
    # SOURCE.md: houston_16 holds {0 (183 px), 2, 3, 4, 5, 6, 8}; palu_8 {2, 3, 4, 5, 6, 8}
    assert int((h_mask == IGNORE).sum()) == 183 and int((p_mask == IGNORE).sum()) == 0
    assert set(np.unique(h_mask)) == {0, 1, 2, 3, 4, IGNORE} and set(np.unique(p_mask)) == {0, 1, 2, 3, 4}
    assert np.array_equal(h_mask, expected_classes(raw_labels(oem, "houston_16")))
    assert np.array_equal(p_mask, expected_classes(raw_labels(oem, "palu_8")))
    with rasterio.open(oem / "images" / "palu_8.tif") as src:
        assert np.array_equal(p_img, src.read().transpose(1, 2, 0))


def test_classes_override_the_mapping_by_openearthmap_name(oem):
    """pretrain.classes: rangeland (2) and agriculture (7) as tree for a survey whose tree labels cover grass."""
    table = oem_lut({"rangeland": "tree", "agriculture": "tree", "unknown": "background"})
    assert table[2] == table[7] == 3 and table[0] == 0 and table[1] == 0 and table[8] == 4
    assert np.array_equal(oem_lut(), oem_lut({}))
    train, val = pretrain_datasets(oem, 0.5, patch_size=1024, classes={"rangeland": "tree"})
    grass = raw_labels(oem, val.pairs[0][0].stem) == 2
    assert grass.any() and set(np.unique(val[0][1][grass])) == {3}
    assert train.fingerprint != pretrain_datasets(oem, 0.5, patch_size=1024)[0].fingerprint
    for bad in ({"grass": "tree"}, {"rangeland": "shrub"}):
        with pytest.raises(AerialsegError, match="pretrain.classes"):
            oem_lut(bad)


def test_a_misspelt_pretrain_key_is_an_error(tmp_path):
    with pytest.raises(AerialsegError, match="unknown pretrain key.*clases"):
        pretrain_stage.run({"pretrain": {"enabled": False, "clases": {"rangeland": "tree"}}}, tmp_path / "pt")
    assert not (tmp_path / "pt").exists()


def test_resampling_area_images_nearest_labels(oem):
    ds = OpenEarthMapDataset(oem, patch_size=256, resample=0.5, mode="grid")
    assert len(ds) == 2 * 4  # each 1024 px tile becomes 512 px: 2 x 2 crops of 256
    image, mask = ds[0]
    assert image.shape == (256, 256, 3) and mask.shape == (256, 256)
    full = expected_classes(raw_labels(oem, "houston_16"))
    assert np.array_equal(mask, cv2.resize(full[:512, :512], (256, 256), interpolation=cv2.INTER_NEAREST))
    with rasterio.open(oem / "images" / "houston_16.tif") as src:
        rgb = src.read().transpose(1, 2, 0)[:512, :512]
    assert np.array_equal(image, cv2.resize(np.ascontiguousarray(rgb), (256, 256), interpolation=cv2.INTER_AREA))
    up = OpenEarthMapDataset(oem, patch_size=128, resample=2.0, mode="grid")
    assert len(up) == 2 * 16 * 16  # 2048 px after upsampling
    assert up[0][0].shape == (128, 128, 3)


def test_random_crops_are_seeded(oem):
    ds = OpenEarthMapDataset(oem, patch_size=128, mode="random", crops_per_image=3)
    assert len(ds) == 6
    np.random.seed(3)
    first = [ds[i][1] for i in range(6)]
    np.random.seed(3)
    again = [ds[i][1] for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(first[0], m) for m in first[1:3])


def write_tif(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype="uint8") as dst:
        dst.write(bands)


def test_folder_errors_and_region_layout(tmp_path):
    rgb, labels = np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 4, np.uint8)
    write_tif(tmp_path / "aachen" / "images" / "aachen_1.tif", rgb)
    write_tif(tmp_path / "aachen" / "labels" / "aachen_1.tif", labels)
    write_tif(tmp_path / "kyoto" / "images" / "kyoto_2.tif", rgb)
    with pytest.raises(AerialsegError, match="without a label"):
        find_pairs(tmp_path)
    write_tif(tmp_path / "kyoto" / "labels" / "kyoto_2.tif", labels[:32])
    with pytest.raises(AerialsegError, match="label is 64x32, image 64x64"):
        OpenEarthMapDataset(tmp_path, patch_size=32)
    write_tif(tmp_path / "kyoto" / "labels" / "kyoto_2.tif", labels)
    ds = OpenEarthMapDataset(tmp_path, patch_size=32, mode="grid")
    assert len(ds) == 8 and set(np.unique(ds[0][1])) == {1}  # OEM 4 = road
    (tmp_path / "train.txt").write_text("aachen_1.tif\n")
    (tmp_path / "val.txt").write_text("kyoto_2.tif\n")
    assert split_names(tmp_path, 0.1) == ({"aachen_1.tif"}, {"kyoto_2.tif"})
    (tmp_path / "val.txt").write_text("kyoto_2.tif\nosaka_3.tif\n")
    with pytest.raises(AerialsegError, match="not found"):
        find_pairs(tmp_path, split_names(tmp_path, 0.1)[1])
    with pytest.raises(AerialsegError, match="not found"):
        find_pairs(tmp_path / "nowhere")


def test_disabled_stage_writes_a_marker_that_train_skips(tmp_path):
    record = pretrain_stage.run({"pretrain": {"enabled": False}}, tmp_path / "pre")
    assert record["enabled"] is False
    assert json.loads((tmp_path / "pre" / "pretrain.json").read_text())["enabled"] is False
    assert init_weights(create_model("pspnet_resnet18"), tmp_path / "pre", "pspnet_resnet18") is None


def test_auto_runs_only_when_the_root_holds_images(tmp_path):
    missing = {"enabled": "auto", "root": str(tmp_path / "oem")}
    enabled, reason = pretrain_enabled("auto", missing["root"])
    assert not enabled and "holds no OpenEarthMap images" in reason
    record = pretrain_stage.run({"pretrain": {**missing}}, tmp_path / "pre")
    assert record == {"enabled": False, "reason": reason}
    (tmp_path / "oem" / "images").mkdir(parents=True)
    assert pretrain_enabled("auto", missing["root"]) == (True, "")
    (tmp_path / "regions" / "aachen" / "images").mkdir(parents=True)
    assert pretrain_enabled("auto", str(tmp_path / "regions"))[0]
    assert not pretrain_enabled("auto", None)[0]
    with pytest.raises(AerialsegError, match="true, false or auto"):
        pretrain_enabled("yes", None)


def test_pretrain_on_oem_samples_then_init_train(oem, tmp_path):
    root = tmp_path / "oem"  # a temporary copy: the CC BY-NC-SA samples never enter the repository
    shutil.copytree(oem / "images", root / "images")
    shutil.copytree(oem / "labels", root / "labels")
    params = {"model": {"name": "pspnet_resnet18"}, "train": {"batch_size": 4, "init_from": "ignored"},
              "pretrain": {"enabled": True, "root": str(root), "patch_size": 64, "resample_factor": 0.125,
                           "crops_per_image": 4, "train": {"epochs": 1}}}
    record = pretrain_stage.run(params, tmp_path / "pre")
    assert record["enabled"] and record["train_images"] == 1 and record["val_images"] == 1
    assert record["epochs_run"] == 1
    meta = json.loads((tmp_path / "pre" / "model.json").read_text())
    assert meta["name"] == "pspnet_resnet18" and meta["gsd_m"] is None and meta["init_from"] is None
    model = create_model("pspnet_resnet18")
    assert init_weights(model, tmp_path / "pre", "pspnet_resnet18") == str(tmp_path / "pre")
    saved, _ = load_model(tmp_path / "pre")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
