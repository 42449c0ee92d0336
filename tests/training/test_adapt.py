"""Adaptation to unlabelled scenes (`aerialseg adapt`) and leave-one-scene-out folds (`aerialseg loso`)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from aerialseg.core.config import load_params
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file
from aerialseg.inference.bundle import MANIFEST, open_bundle
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.models import list_models, load_model, register_model, save_model
from aerialseg.stages import adapt as adapt_stage
from aerialseg.training.adapt import (AdaptOptions, Normalise, TargetWindows, adabn, adapt_bundle, bn_layers, draw,
                                      read_target_windows, tent)
from aerialseg.geo.scene import BandPolicy

from helpers.sample_stages import SAMPLE, run_sample_data_stages, sample_data_params
from helpers.cli import exit_and_stderr

TOY = "toy_bn_adapt"
SCENE = SAMPLE / "scenes" / "dubai_tile2.tif"


def _build_toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=128, pad_multiple=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(_build_toy)


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(_build_toy().eval(), tmp_path / "toy", TOY, extra={"gsd_m": 0.5, "labelled_classes": None})


def _windows(count: int = 6, size: int = 64) -> TargetWindows:
    opts = AdaptOptions(windows=count, window=size)
    return read_target_windows([SCENE], opts, size, BandPolicy(), 0.5)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_code_defaults_equal_params_yaml():
    shipped = {k: v for k, v in load_params()["adapt"].items() if k != "onnx"}
    assert shipped == dataclasses.asdict(AdaptOptions())


def test_target_windows_are_capped_and_valid():
    windows = _windows(5, 64)
    assert windows.images.shape == (5, 3, 64, 64) and windows.images.dtype == np.uint8
    assert windows.valid.shape == (5, 64, 64) and windows.valid.all()


def _scene(path: Path, height: int, width: int, nodata_cols: int = 0, gsd: float = 0.5) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    pixels[:, :, :nodata_cols] = 0
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32640", transform=from_origin(300000, 2790000, gsd, gsd)) as ds:
        ds.write(pixels)
    return path


def test_windows_of_small_resampled_and_nodata_scenes(tmp_path):
    small = _scene(tmp_path / "small.tif", 50, 50)  # smaller than a window: padded, the padding invalid
    collar = _scene(tmp_path / "collar.tif", 256, 256, nodata_cols=192)  # 3/4 nodata
    coarse = _scene(tmp_path / "coarse.tif", 64, 64, gsd=1.0)  # 2x the model's GSD: read at 0.5 m
    windows = read_target_windows([small, collar, coarse], AdaptOptions(windows=100, window=64, min_valid=0.5),
                                  64, BandPolicy(), 0.5)
    assert len(windows) == 1 + 4 + 4  # small: its one window; collar: the 4 of 16 without nodata; coarse: 2 x 2
    assert sorted(round(float(v.mean()), 3) for v in windows.valid)[0] == round(2500 / 4096, 3)
    with pytest.raises(AerialsegError, match="no window of the target"):
        read_target_windows([_scene(tmp_path / "empty.tif", 64, 64, nodata_cols=64)], AdaptOptions(window=64),
                            64, BandPolicy(), 0.5)


def test_window_draws_are_distinct_and_need_no_index_of_every_window():
    picked = draw(10**12, 5, seed=0)
    assert len(set(picked)) == 5 and picked == sorted(picked) and draw(3, 5, 0) == [0, 1, 2]


def test_adabn_changes_batchnorm_statistics_and_nothing_else(model_dir):
    model, _ = load_model(model_dir)
    before = _state(model)
    adabn(model, _windows(), Normalise((0.5,) * 3, (0.5,) * 3, torch.device("cpu")), batch=4)
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"1.running_mean", "1.running_var"} <= changed
    assert changed <= {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert not model.training and all(m.momentum == 0.1 for m in bn_layers(model))


def test_tent_updates_only_batchnorm_affine_parameters(model_dir):
    model, _ = load_model(model_dir)
    before = _state(model)
    opts = AdaptOptions(tent_steps=3, tent_lr=0.01, batch=2)
    losses = tent(model, _windows(4), Normalise((0.5,) * 3, (0.5,) * 3, torch.device("cpu")), opts)
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight", "1.bias"} and len(losses) == 3
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["adabn", "all"])
def test_adapted_bundle_is_verified_records_its_scenes_and_maps(model_dir, tmp_path, method):
    opts = AdaptOptions(method=method, windows=4, window=64, batch=2, tent_steps=2, self_rounds=1, self_steps=2,
                        threshold=0.2)
    done = adapt_bundle(model_dir, [SCENE], tmp_path / "adapted", opts)
    manifest = json.loads((tmp_path / "adapted" / MANIFEST).read_text())
    assert manifest["adapted"]["method"] == method
    assert manifest["adapted"]["scenes"] == [{"path": str(SCENE), "sha256": sha256_file(SCENE)}]
    assert manifest["adapted"]["params"]["windows"] == 4 and done["windows"] == 4
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(tmp_path / "adapted" / "model.safetensors")
    assert set(done["steps"]) == ({"adabn", "tent", "self"} if method == "all" else {"adabn"})
    with open_bundle(tmp_path / "adapted") as bundle:  # verified like any bundle
        assert bundle.tile_size == 128
    result = infer_scene(SCENE, tmp_path / "adapted", tmp_path / "map.tif", InferOptions(progress=False, preview=False))
    with rasterio.open(result.outputs["map"]) as ds:
        assert (ds.width, ds.height) == (764, 816) and set(np.unique(ds.read(1))) <= {0, 1, 2, 3, 4}


def test_adapt_refuses_to_overwrite_its_input(model_dir, tmp_path):
    with pytest.raises(AerialsegError, match="destroy the input"):
        adapt_bundle(model_dir, [SCENE], model_dir, AdaptOptions())
    with pytest.raises(AerialsegError, match="inside the input model"):
        adapt_bundle(model_dir, [SCENE], model_dir / "adapted", AdaptOptions())


def test_one_line_errors_for_a_missing_scene_and_a_non_raster(model_dir, tmp_path, capsys, repo_root):
    params = str(repo_root / "params.yaml")
    code, err = exit_and_stderr(["adapt", str(tmp_path / "nope.tif"), "--model", str(model_dir), "--out",
                      str(tmp_path / "out"), "--params", params], capsys)
    assert code == 2 and err.count("\n") == 1 and "nope.tif: file not found" in err
    text = tmp_path / "notes.tif"
    text.write_text("not a raster\n")
    code, err = exit_and_stderr(["adapt", str(text), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                      "--params", params], capsys)
    assert code == 2 and err.count("\n") == 1 and "notes.tif" in err and "fix:" in err
    code, err = exit_and_stderr(["adapt", str(SCENE), "--model", str(model_dir), "--out", str(model_dir), "--params", params],
                     capsys)
    assert code == 2 and err.count("\n") == 1 and "destroy the input" in err
    assert not (tmp_path / "out").exists()


def test_adapt_stage_writes_onnx_and_the_adapted_bundle_maps(model_dir, tmp_path, repo_root):
    params = load_params(repo_root / "params.yaml")
    params["adapt"] = {**params["adapt"], "windows": 3, "window": 64}
    done = adapt_stage.run(params, model_dir, [SCENE], tmp_path / "bundle", "adabn")
    assert (tmp_path / "bundle" / "model.onnx").is_file() and "adabn" in adapt_stage.summary(done)
    opts = InferOptions(progress=False, preview=False, backend="onnx")
    infer_scene(SCENE, tmp_path / "bundle", tmp_path / "map.tif", opts)


@pytest.mark.slow
def test_two_fold_loso_writes_per_fold_and_mean_figures(tmp_path):
    from aerialseg.stages import loso

    params = sample_data_params(tmp_path)
    run_sample_data_stages(params)
    params["model"] = {"name": TOY, "kwargs": {}}
    params["train"] = {**params["train"], "epochs": 1, "init_from": None, "batch_size": 8, "warmup_epochs": 0}
    params["bundle"] = {**params["bundle"], "overlap": 16}
    params["adapt"] = {**params["adapt"], "windows": 4, "window": 64}
    record = loso.run(params, folds="0,1", adapt=["adabn"], out=tmp_path / "loso")
    saved = json.loads((tmp_path / "loso" / "loso.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [f["scene"] for f in saved["folds"]] == ["dubai_tile2", "dubai_tile3"]
    for fold in saved["folds"]:
        assert set(fold["variants"]) == {"base", "adabn"} and fold["minutes"] >= 0
        assert 0 <= fold["variants"]["base"]["mIoU"] <= 1 and "tree" in fold["variants"]["base"]["iou"]
    base = saved["summary"]["base"]
    assert base["folds"] == 2 and base["mIoU_mean"] == pytest.approx(
        np.mean([f["variants"]["base"]["mIoU"] for f in saved["folds"]]), abs=1e-6)
    assert base["mIoU_std"] >= 0 and set(saved["summary"]["adabn"]["gate"]) == {"mean_gain", "worst_fold", "passes"}
    assert "| mean |" in (tmp_path / "loso" / "loso.md").read_text()
    again = loso.run(params, folds=[1], out=tmp_path / "loso")  # fold.json reused: nothing trained again
    assert again["folds"][0]["variants"]["base"] == saved["folds"][1]["variants"]["base"]
    with pytest.raises(AerialsegError, match="fold 5 does not exist"):
        loso.run(params, folds="5", out=tmp_path / "loso")
