"""A bundle carries the quantize stage's int8 model only when serve may run it (gate passed, same weights, same
tile, checksummed), and serve's tiling places only the tiles an image needs."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from aerialseg.core.fileio import sha256_file
from aerialseg.inference.bundle import MANIFEST, open_bundle
from aerialseg.inference.bundle_int8 import INT8_NAME, QUANTIZE_REPORT, carry_int8, unusable
from aerialseg.inference.runtime_choice import int8_candidate
from aerialseg.inference.serve_map import predict_array
from aerialseg.models import list_models, register_model, save_model
from aerialseg.stages.bundle import build_bundle, int8_source
from aerialseg.stages.quantize import record_in_bundle

TOY = "toy_fcn_int8"
TILE = 64


def _toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=TILE, pad_multiple=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   band_order=("red", "green", "blue"))(_toy)


@pytest.fixture()
def trained(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(_toy(), tmp_path / "trained", TOY, extra={"gsd_m": 0.5})


def quantized(folder: Path, weights: Path, passed: bool = True, tile: int = TILE, **extra: object) -> Path:
    """A folder as the quantize stage leaves it: quantize.json (+ model.int8.onnx when the gate passed)."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {"weights_sha256": sha256_file(weights), "tile_size": tile,
              "accuracy": {"delta_miou_points": 0.2 if passed else 3.0},
              "gate": {"passed": passed, "reason": None if passed else "int8 mIoU is 3 points below fp32"}, **extra}
    (folder / QUANTIZE_REPORT).write_text(json.dumps(report))
    (folder / (INT8_NAME if passed else "model.int8.rejected.onnx")).write_bytes(b"int8 model bytes")
    return folder


def test_bundle_carries_int8_only_when_its_gate_passed(trained, tmp_path):
    source = quantized(tmp_path / "int8", trained / "model.safetensors")
    bundle = build_bundle(trained, tmp_path / "bundle", onnx=False, int8_from=source)
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["int8"]["carried"] is True and manifest["int8"]["gate"]["passed"] is True
    assert {INT8_NAME, QUANTIZE_REPORT} <= set(manifest["files"])  # checksummed like every bundle file
    with open_bundle(bundle) as opened:
        path, why = int8_candidate(opened)
    assert path == bundle / INT8_NAME and why["gate"]["passed"] is True

    failed = quantized(tmp_path / "int8-failed", trained / "model.safetensors", passed=False)
    bundle = build_bundle(trained, tmp_path / "bundle", onnx=False, int8_from=failed)  # rebuilt over the first
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["int8"] == {"carried": False, "reason": "accuracy gate failed (int8 mIoU is 3 points below fp32)"}
    assert not (bundle / INT8_NAME).exists() and not (bundle / QUANTIZE_REPORT).exists()  # the stale one is gone
    with open_bundle(bundle) as opened:
        assert int8_candidate(opened)[0] is None


@pytest.mark.parametrize("case, reason", [
    ("other weights", "other weights"), ("other tile", "the bundle's tile"), ("disabled", "enabled is false"),
    ("no weights recorded", "does not say which weights"), ("no report", "no readable quantize.json"),
])
def test_int8_that_does_not_fit_the_bundle_is_not_carried(trained, tmp_path, case, reason):
    tile = TILE * 2 if case == "other tile" else TILE
    source = quantized(tmp_path / "int8", trained / "model.safetensors", tile=tile)
    report = json.loads((source / QUANTIZE_REPORT).read_text())
    if case == "other weights":
        report["weights_sha256"] = "0" * 64
    elif case == "disabled":
        report = {"enabled": False, "reason": "quantize.enabled is false"}
    elif case == "no weights recorded":
        del report["weights_sha256"]
    (source / QUANTIZE_REPORT).write_text(json.dumps(report))
    if case == "no report":
        (source / QUANTIZE_REPORT).unlink()
    stage = tmp_path / "stage"
    stage.mkdir()
    record = carry_int8(source, stage, trained / "model.safetensors", TILE)
    assert record["carried"] is False and reason in record["reason"]
    assert not any(stage.iterdir())


def test_serve_ignores_an_int8_model_bundle_json_does_not_list(trained, tmp_path):
    bundle = build_bundle(trained, tmp_path / "bundle", onnx=False)
    quantized(bundle, trained / "model.safetensors")  # copied in by hand: no checksums
    with open_bundle(bundle) as opened:
        path, why = int8_candidate(opened)
    assert path is None and "not listed in bundle.json" in why["int8"]
    record_in_bundle(bundle, json.loads((bundle / QUANTIZE_REPORT).read_text()))  # what `quantize --out BUNDLE` does
    with open_bundle(bundle) as opened:
        assert int8_candidate(opened)[0] == bundle / INT8_NAME
    assert json.loads((bundle / MANIFEST).read_text())["int8"]["carried"] is True


def test_unusable_reasons_and_int8_source():
    report = {"gate": {"passed": True}, "weights_sha256": "a" * 64, "tile_size": 512}
    assert unusable(report, "a" * 64, 512) is None
    assert unusable({"accuracy": {"delta_miou_points": 0.1}}, "a" * 64, 512) is None  # before gate/weights existed
    assert "other weights" in unusable(report, "b" * 64, 512)
    params = {"quantize": {"out": "models/int8"}, "train": {"out": "models/default"}}
    assert int8_source(params) == Path("models/int8")
    assert int8_source({"quantize": {"out": None}, "train": {"out": "models/x"}}) == Path("models/x")


@pytest.mark.parametrize("overlap, size, tiles", [(0, 1024, 4), (None, 1024, 9), (0, 1000, 4), (0, 300, 1)])
def test_serve_places_only_the_tiles_the_image_needs(overlap, size, tiles):
    calls = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        probs = np.zeros((len(batch), 5, *batch.shape[2:]), np.float32)
        probs[:, 2] = 0.9  # water everywhere, confidence 0.9
        return probs

    bundle = SimpleNamespace(tile_size=512, overlap=64, num_classes=5)
    model = SimpleNamespace(bundle=bundle, predict=predict, batch=8, overlap=overlap)
    classes, confidence = predict_array(model, np.zeros((3, size, size), np.uint8))
    assert sum(calls) == tiles
    assert (classes == 2).all() and np.allclose(confidence, 0.9)
