"""ONNX export: names, dynamic batch, the parity gate, PSPNet's adaptive pooling, the Deepness model.

How Deepness itself reads and runs the Deepness model: tests/inference/test_deepness.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aerialseg import cli
from aerialseg.inference.bundle import MANIFEST
from aerialseg.stages.bundle import build_bundle
from aerialseg.core.errors import AerialsegError
from aerialseg.compression.onnx_export import (DEEPNESS_MAX_OPSET, check_parity, deepness_metadata,
                                               deepness_overlap_percent, export_bundle_onnx, export_onnx,
                                               parity_tiles, probabilities_model)
from aerialseg.models.runtime import onnx_session, run_onnx
from aerialseg.models import create_model, list_models, register_model, save_model

TOY = "toy_fcn_export"


def _toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=64, pad_multiple=1)(_toy)


def test_export_names_batch_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = _toy(in_channels=4).eval()
    path = export_onnx(model, tmp_path / "m.onnx", tile_size=32, in_channels=4, metadata={"model_type": '"Segmentor"'})
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert {p.key: p.value for p in proto.metadata_props}["model_type"] == '"Segmentor"'
    assert not list(tmp_path.glob("*.data")), "weights embedded: one file"
    session = onnx_session(path, device="cpu")
    x = np.random.default_rng(0).standard_normal((3, 4, 32, 32)).astype(np.float32)
    got = run_onnx(session, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert session.get_inputs()[0].shape[1:] == [4, 32, 32]


def test_parity_gate_passes_and_fails(tmp_path):
    torch.manual_seed(1)
    model, other = _toy().eval(), _toy().eval()
    path = export_onnx(model, tmp_path / "m.onnx", tile_size=32)
    tiles = parity_tiles(3, 32, [0.5] * 3, [0.25] * 3)
    report = check_parity(model, path, tiles, max_abs=1e-3)
    assert report["max_abs_diff"] < 1e-4 and report["argmax_agreement"] == 1.0 and report["tiles"] == 2
    with pytest.raises(AerialsegError, match="differ from PyTorch"):
        check_parity(other, path, tiles.numpy(), max_abs=1e-3)


def test_deepness_metadata_format():
    manifest = {"classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "road"}], "tile_size": 512,
                "overlap": 64, "gsd_m": 0.05, "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    meta = {k: json.loads(v) for k, v in deepness_metadata(manifest).items()}
    assert meta == {"model_type": "Segmentor", "class_names": {"0": "background", "1": "road"},
                    "resolution": 5.0, "tile_size": 512, "tiles_size": 512, "tiles_overlap": 13,
                    "standardization_mean": [0.5, 0.5, 0.5], "standardization_std": [0.5, 0.5, 0.5],
                    "seg_thresh": 0.0, "seg_small_segment": 0}
    del manifest["gsd_m"]
    assert "resolution" not in deepness_metadata(manifest), "no GSD: Deepness keeps the layer's resolution"


def test_deepness_standardisation_folds_in_a_declared_value_range():
    """A uint16 model (value_range 1000..5000 -> 0..255): Deepness's raw / 255 input must give aerialseg's."""
    manifest = {"classes": [{"id": 0, "name": "background"}], "tile_size": 64, "overlap": 8,
                "band_policy": {"channels": 3, "value_range": [1000, 5000]},
                "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.1]}}
    meta = {k: json.loads(v) for k, v in deepness_metadata(manifest).items()}
    raw = np.array([1000.0, 2345.0, 5000.0])[:, None]
    mean, std = np.array(manifest["normalization"]["mean"]), np.array(manifest["normalization"]["std"])
    aerialseg = ((raw - 1000) * 255 / 4000 / 255 - mean) / std
    deepness = (raw / 255 - np.array(meta["standardization_mean"])) / np.array(meta["standardization_std"])
    np.testing.assert_allclose(deepness, aerialseg, atol=1e-9)


@pytest.mark.parametrize("tile", [64, 100, 256, 512, 1000])
def test_deepness_overlap_is_the_smallest_percent_covering_the_overlap(tile):
    def deepness_px(percent: int) -> int:  # Deepness's ProcessingOverlap, percent -> pixels
        return int(tile * percent / 100 * 2) // 2

    for overlap in range(0, tile // 2):
        percent = deepness_overlap_percent(tile, overlap)
        assert deepness_px(percent) >= overlap and (percent == 0 or deepness_px(percent - 1) < overlap)


def test_pspnet_adaptive_pooling_exports(tmp_path):
    model = create_model("pspnet_resnet18").eval()
    path = export_onnx(model, tmp_path / "psp.onnx", tile_size=64)
    tiles = torch.randn(2, 3, 64, 64)
    assert check_parity(model, path, tiles, max_abs=1e-3)["argmax_agreement"] > 0.999


def test_export_bundle_onnx_writes_both_files_and_updates_manifest(tmp_path, capsys, repo_root):
    torch.manual_seed(0)
    trained = save_model(create_model(TOY), tmp_path / "trained", TOY, extra={"gsd_m": 0.1})
    bundle = build_bundle(trained, tmp_path / "bundle", onnx=False)
    result = export_bundle_onnx(bundle)
    assert Path(result["onnx"]) == bundle / "model.onnx"
    assert Path(result["deepness_onnx"]) == bundle / "model.deepness.onnx"
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert {"model.onnx", "model.deepness.onnx"} <= set(manifest["files"])
    logits, probs = manifest["onnx"]["model.onnx"], manifest["onnx"]["model.deepness.onnx"]
    assert logits["output"] == "logits" and "infer-scene" in logits["for"] and logits["parity"]["max_abs_diff"] < 1e-3
    assert probs["output"] == "probabilities" and "Deepness" in probs["for"]
    assert probs["ir_version"] <= 9 and probs["opset"] <= DEEPNESS_MAX_OPSET
    assert probs["parity"]["max_sum_error"] < 1e-5 and probs["parity"]["argmax_agreement"] > 0.999

    plain = onnx.load(str(bundle / "model.onnx"))
    props = {p.key: p.value for p in plain.metadata_props}
    assert [o.name for o in plain.graph.output] == ["logits"] and json.loads(props["aerialseg_output"]) == "logits"
    assert "model_type" not in props, "the logits file must not pass for a Deepness model"
    assert json.loads(props["aerialseg_manifest"])["model"]["name"] == TOY
    deepness = onnx.load(str(bundle / "model.deepness.onnx"))
    props = {p.key: p.value for p in deepness.metadata_props}
    assert [o.name for o in deepness.graph.output] == ["probabilities"]
    assert json.loads(props["resolution"]) == 10.0 and json.loads(props["tile_size"]) == 64

    old = sys.argv
    sys.argv = ["aerialseg", "export-onnx", str(trained), "--out", str(tmp_path / "x.onnx"),
                "--params", str(repo_root / "params.yaml")]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.app()
    finally:
        sys.argv = old
    printed = capsys.readouterr().out
    assert exc.value.code in (0, None) and "argmax agreement 1.0000" in printed and "x.deepness.onnx" in printed
    assert (tmp_path / "x.onnx").is_file() and (tmp_path / "x.deepness.onnx").is_file()


def test_failed_gate_leaves_neither_file(tmp_path):
    trained = save_model(create_model(TOY), tmp_path / "trained", TOY)
    with pytest.raises(AerialsegError, match="differ from PyTorch"):
        export_bundle_onnx(trained, max_abs_diff=-1.0)
    assert not list(trained.glob("*.onnx"))


def _logits_graph(opset: int) -> onnx.ModelProto:
    """input (N, 3, 4, 4) -> logits = 3 * input, at ``opset`` (stand-in for an exported model)."""
    from onnx import TensorProto, helper, numpy_helper

    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    graph = helper.make_graph([helper.make_node("Mul", ["input", "three"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [three])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize(("opset", "ir"), [(13, 7), (17, 8), (18, 8), (20, 9)])
def test_probabilities_model_is_a_softmax_at_the_lowest_ir(tmp_path, opset, ir):
    proto = probabilities_model(_logits_graph(opset))
    assert proto.ir_version == ir and [o.name for o in proto.graph.output] == ["probabilities"]
    onnx.save(proto, str(tmp_path / "p.onnx"))
    x = np.random.default_rng(opset).standard_normal((2, 3, 4, 4)).astype(np.float32) * 20
    got = run_onnx(onnx_session(tmp_path / "p.onnx", device="cpu"), x)
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(3 * x), dim=1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [12, DEEPNESS_MAX_OPSET + 1])
def test_probabilities_model_refuses_opsets_deepness_cannot_use(opset):
    with pytest.raises(AerialsegError, match="opset"):
        probabilities_model(_logits_graph(opset))


def test_export_failure_is_one_clear_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("cannot trace me")

    with pytest.raises(AerialsegError, match="ONNX export failed"):
        export_onnx(Broken(), tmp_path / "b.onnx", tile_size=16)
    assert not (tmp_path / "b.onnx").exists()
