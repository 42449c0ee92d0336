"""Model bundles: manifest contents, checksums, zip archives, plain model dirs, and the `bundle` CLI."""

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aerialseg import cli
from aerialseg.core.fileio import sha256_file
from aerialseg.inference.bundle import MANIFEST, make_manifest, open_bundle
from aerialseg.stages.bundle import build_bundle
from aerialseg.core.errors import AerialsegError
from aerialseg.models import list_models, register_model, save_model

TOY = "toy_fcn_bundle"
DATA_SHA = "9f2c" * 16  # model.json's training_data_sha256, as aerialseg train writes it


def _build_toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=128, pad_multiple=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   band_order=("red", "green", "blue"))(_build_toy)


@pytest.fixture()
def trained(tmp_path) -> Path:
    torch.manual_seed(0)
    extra = {"gsd_m": 0.08, "training_data_sha256": DATA_SHA, "metrics": {"mIoU": 0.61}, "epochs": 3}
    return save_model(_build_toy(), tmp_path / "trained", TOY, extra=extra)


def test_bundle_manifest_and_checksums(trained, tmp_path):
    out = build_bundle(trained, tmp_path / "bundle", overlap=16)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == {"name": TOY, "classes": 5, "in_channels": 3, "kwargs": {}}
    assert [c["name"] for c in manifest["classes"]] == ["background", "road", "water", "tree", "building"]
    assert manifest["classes"][3]["color"] == [60, 180, 75]
    assert manifest["band_order"] == ["red", "green", "blue"]
    assert manifest["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert manifest["tile_size"] == 128 and manifest["overlap"] == 16 and manifest["gsd_m"] == 0.08
    assert manifest["data_hash"] == DATA_SHA and manifest["metrics"] == {"mIoU": 0.61}
    assert manifest["training"]["epochs"] == 3
    for name in ("model.safetensors", "model.json", "model.onnx", "model.deepness.onnx"):
        assert manifest["files"][name]["sha256"] == sha256_file(out / name)
    assert manifest["onnx"]["model.onnx"]["output"] == "logits"
    assert manifest["onnx"]["model.deepness.onnx"]["output"] == "probabilities"
    assert manifest["onnx"]["model.onnx"]["parity"]["max_abs_diff"] < 1e-3
    assert not list(tmp_path.glob(".aerialseg-tmp-*")), "no temp folders left behind"
    assert (out.stat().st_mode & 0o777) != 0o700
    rebuilt = build_bundle(trained, out, overlap=16, onnx=False)  # over an existing bundle: no stale ONNX
    assert not list(rebuilt.glob("*.onnx"))
    manifest = json.loads((rebuilt / MANIFEST).read_text())
    assert manifest["onnx"] == {} and not [name for name in manifest["files"] if name.endswith(".onnx")]


def test_data_hash_from_older_keys_or_none(tmp_path):
    record = json.loads((save_model(_build_toy(), tmp_path / "m", TOY, extra={"data_hash": "x"}) / "model.json")
                        .read_text())
    assert make_manifest(record)["data_hash"] == "x"
    record = {**record, "data_hash": None, "training_data_sha256": None}
    assert make_manifest(record)["data_hash"] is None


def test_zip_bundle_carries_both_onnx_files(trained, tmp_path):
    archive = build_bundle(trained, tmp_path / "z", archive=True)
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["bundle.json", "model.deepness.onnx", "model.json", "model.onnx",
                                         "model.safetensors"]
    with open_bundle(archive) as bundle:
        assert (bundle.root / "model.deepness.onnx").is_file() and bundle.onnx_path.is_file()


def test_zip_bundle_opens_and_cleans_up(trained, tmp_path):
    archive = build_bundle(trained, tmp_path / "b", onnx=False, archive=True, gsd_m=0.1)
    assert archive.suffix == ".zip" and not (tmp_path / "b").exists()
    with open_bundle(archive) as bundle:
        root = bundle.root
        assert bundle.tile_size == 128 and bundle.gsd_m == 0.1 and bundle.in_channels == 3
        model = bundle.load_torch()
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 32, 32)
    assert not root.exists()


def test_zip_members_outside_the_bundle_are_ignored(trained, tmp_path, monkeypatch):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(trained / "model.json", "nested/model.json")
        zf.write(trained / "model.safetensors", "model.safetensors")
        zf.writestr("../escape.txt", "x")
    monkeypatch.setenv("AERIALSEG_TRUST_UNVERIFIED", "0")
    with pytest.raises(AerialsegError, match="no bundle.json"):  # a .zip without its manifest: not verifiable
        with open_bundle(archive):
            pass
    monkeypatch.setenv("AERIALSEG_TRUST_UNVERIFIED", "1")  # aerialseg --trust-unverified
    with open_bundle(archive) as bundle:
        assert sorted(p.name for p in bundle.root.iterdir()) == ["model.json", "model.safetensors"]
        assert bundle.manifest["model"]["name"] == TOY  # derived from model.json
    assert not (tmp_path.parent / "escape.txt").exists()


def test_plain_model_dir_and_in_place_bundle(trained):
    with open_bundle(trained, overlap=24) as bundle:
        assert bundle.overlap == 24 and bundle.gsd_m == 0.08 and "files" not in bundle.manifest
    assert build_bundle(trained, onnx=False) == trained
    assert (trained / MANIFEST).is_file() and not (trained / "model.onnx").exists()


def test_bundle_errors(tmp_path, trained):
    with pytest.raises(AerialsegError, match="no model.json"):
        build_bundle(tmp_path, tmp_path / "x")
    with pytest.raises(AerialsegError, match="not found"):
        with open_bundle(tmp_path / "missing"):
            pass
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(AerialsegError, match="not a bundle"):
        with open_bundle(tmp_path / "junk.zip"):
            pass
    with pytest.raises(AerialsegError, match="overlap"):
        make_manifest(json.loads((trained / "model.json").read_text()), overlap=128)


def test_bundle_cli(trained, tmp_path, capsys, repo_root):
    old = sys.argv
    sys.argv = ["aerialseg", "bundle", str(trained), "--out", str(tmp_path / "cli_bundle"), "--no-onnx",
                "--overlap", "8", "--params", str(repo_root / "params.yaml")]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.app()
    finally:
        sys.argv = old
    assert exc.value.code in (0, None) and "wrote bundle" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli_bundle" / MANIFEST).read_text())
    assert manifest["overlap"] == 8 and manifest["gsd_m"] == 0.08  # model.json's GSD wins over data.gsd_m
    assert np.isclose(manifest["normalization"]["std"][0], 0.5)
