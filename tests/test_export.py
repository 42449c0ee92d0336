"""ONNX export: names, dynamic batch, Deepness metadata, the parity gate, PSPNet's adaptive pooling."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aerialseg import cli
from aerialseg.inference.bundle import MANIFEST, build_bundle
from aerialseg.core.errors import AerialsegError
from aerialseg.compression.onnx_export import (check_parity, deepness_metadata, export_bundle_onnx, export_onnx,
                                               parity_tiles)
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
                    "resolution": 5.0, "tiles_size": 512, "tiles_overlap": 12,
                    "standardization_mean": [0.5, 0.5, 0.5], "standardization_std": [0.5, 0.5, 0.5]}


def test_pspnet_adaptive_pooling_exports(tmp_path):
    model = create_model("pspnet_resnet18").eval()
    path = export_onnx(model, tmp_path / "psp.onnx", tile_size=64)
    tiles = torch.randn(2, 3, 64, 64)
    assert check_parity(model, path, tiles, max_abs=1e-3)["argmax_agreement"] > 0.999


def test_export_bundle_onnx_updates_manifest_and_cli(tmp_path, capsys, repo_root):
    torch.manual_seed(0)
    trained = save_model(create_model(TOY), tmp_path / "trained", TOY, extra={"gsd_m": 0.1})
    bundle = build_bundle(trained, tmp_path / "bundle", onnx=False)
    result = export_bundle_onnx(bundle)
    assert Path(result["onnx"]) == bundle / "model.onnx"
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert "model.onnx" in manifest["files"] and manifest["onnx_parity"]["max_abs_diff"] < 1e-3
    props = {p.key: p.value for p in onnx.load(str(bundle / "model.onnx")).metadata_props}
    assert json.loads(props["resolution"]) == 10.0 and json.loads(props["tiles_size"]) == 64
    assert json.loads(props["aerialseg_manifest"])["model"]["name"] == TOY
    old = sys.argv
    sys.argv = ["aerialseg", "export-onnx", str(trained), "--out", str(tmp_path / "x.onnx"),
                "--params", str(repo_root / "params.yaml")]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.app()
    finally:
        sys.argv = old
    assert exc.value.code in (0, None) and "argmax agreement 1.0000" in capsys.readouterr().out
    assert (tmp_path / "x.onnx").is_file()


def test_export_failure_is_one_clear_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("cannot trace me")

    with pytest.raises(AerialsegError, match="ONNX export failed"):
        export_onnx(Broken(), tmp_path / "b.onnx", tile_size=16)
    assert not (tmp_path / "b.onnx").exists()
