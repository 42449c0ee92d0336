"""Bundles are verified before use: checksums of every file, manifest and model.json schemas, ONNX, weights."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from aerialseg.core.errors import AerialsegError
from aerialseg.inference.bundle_check import check_onnx, validate_manifest, validate_model_record, verify_bundle
from helpers.safety import make_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("safety_bundle"))


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    shutil.copytree(pristine.parent, tmp_path / "b")  # the bundle and the trained model folder beside it
    return tmp_path / "b" / "bundle"


def _manifest(root: Path) -> dict:
    return json.loads((root / "bundle.json").read_text())


def _verify(root: Path, source=None) -> None:
    verify_bundle(root, _manifest(root) if (root / "bundle.json").is_file() else _derived(root), source)


def _derived(root: Path) -> dict:
    from aerialseg.inference.bundle import manifest_for

    return manifest_for(root)


def test_a_fresh_bundle_verifies(bundle):
    _verify(bundle)
    _verify(bundle.parent / "trained")  # a plain model folder: no checksums, model.json checked


def test_flipped_bytes_in_the_weights_are_caught(bundle):
    """4 KiB of flipped bytes once ran with exit 0 and changed 99.96 % of the map."""
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    weights.write_bytes(bytes(data))
    with pytest.raises(AerialsegError, match=r"model\.safetensors: SHA-256 differs .* — fix: rebuild the bundle"):
        _verify(bundle)


def test_truncated_weights_named_in_one_line(bundle, tmp_path):
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AerialsegError, match=r"model\.safetensors: is \d+ bytes, bundle\.json records"):
        _verify(bundle)
    from aerialseg.models import load_model

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(bundle / "model.json", plain / "model.json")
    (plain / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes()[:200])
    with pytest.raises(AerialsegError, match=r"model\.safetensors: cannot read the weights .* truncated or corrupt"):
        load_model(plain)


def test_garbage_onnx(bundle, tmp_path):
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(AerialsegError, match=r"model\.onnx is in the bundle but has no checksum"):
        _verify(bundle)
    plain = bundle.parent / "trained"
    (plain / "model.onnx").write_bytes(b"\xff\xfe not protobuf" * 50)
    with pytest.raises(AerialsegError, match=r"model\.onnx: not a readable ONNX model"):
        _verify(plain)
    with pytest.raises(AerialsegError, match="not a readable ONNX model|empty graph"):
        check_onnx(plain / "model.onnx")


def test_every_listed_file_is_verified(bundle):
    """Files other helpers add to bundles (e.g. a Deepness ONNX) are checked the same way."""
    from aerialseg.core.fileio import sha256_file

    (bundle / "model.int8.onnx").write_bytes(b"not part of the bundle format")  # e.g. a bundle built in place
    verify_bundle(bundle, _manifest(bundle))
    extra = bundle / "model.deepness.onnx"
    extra.write_bytes(b"onnx bytes")
    manifest = _manifest(bundle)
    with pytest.raises(AerialsegError, match="model.deepness.onnx is in the bundle but has no checksum"):
        verify_bundle(bundle, manifest)
    manifest["files"][extra.name] = {"bytes": extra.stat().st_size, "sha256": sha256_file(extra)}
    verify_bundle(bundle, manifest)
    extra.write_bytes(b"onnx bytez")
    with pytest.raises(AerialsegError, match="model.deepness.onnx: SHA-256 differs"):
        verify_bundle(bundle, manifest)
    manifest["files"]["../escape.onnx"] = manifest["files"].pop(extra.name)
    extra.unlink()
    with pytest.raises(AerialsegError, match="not a plain file name"):
        verify_bundle(bundle, manifest)


def test_missing_and_unlisted_files(bundle):
    manifest = _manifest(bundle)
    (bundle / "model.safetensors").unlink()
    with pytest.raises(AerialsegError, match="listed in bundle.json but missing"):
        verify_bundle(bundle, manifest)
    del manifest["files"]
    with pytest.raises(AerialsegError, match="lists no checksums"):
        verify_bundle(bundle, manifest)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(tile_size=0), "tile_size must be a whole number from 1"),
    (lambda m: m.update(tile_size="512"), "tile_size must be a whole number"),
    (lambda m: m.update(overlap=600, tile_size=512), "overlap 600 must be smaller than tile_size 512"),
    (lambda m: m["classes"].pop(), "classes must list 5 classes"),
    (lambda m: m["classes"][2].update(color=[0, 300, 0]), r"classes\[2\]\.color"),
    (lambda m: m.pop("normalization"), "normalization must be a mapping, got null"),
    (lambda m: m["normalization"].update(std=[0.2, 0.0, 0.2]), r"normalization\.std\[1\] must be > 0"),
    (lambda m: m["normalization"].update(mean=[0.4, 0.4]), "normalization.mean must be a list of 3 numbers"),
    (lambda m: m["model"].update(classes="5"), "model.classes must be a whole number"),
    (lambda m: m.update(gsd_m=-1), "gsd_m must be > 0"),
    (lambda m: m.update(version=7), "bundle version 7 is newer"),
    (lambda m: m.update(band_policy={"channels": 3, "value_range": [10, 10]}), "value_range .* is empty"),
])
def test_manifest_schema(pristine, edit, message):
    manifest = copy.deepcopy(_manifest(pristine))
    edit(manifest)
    with pytest.raises(AerialsegError, match=message) as info:
        validate_manifest(manifest, "b/bundle.json")
    assert str(info.value).startswith("b/bundle.json: ") and "— fix: rebuild the bundle" in str(info.value)


def test_manifest_and_model_json_must_agree(bundle):
    record = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**record, "classes": 4}))
    manifest = _manifest(bundle)  # checksums refreshed as if rebuilt carelessly: the schema still disagrees
    from aerialseg.core.fileio import sha256_file

    manifest["files"]["model.json"] = {"bytes": (bundle / "model.json").stat().st_size,
                                       "sha256": sha256_file(bundle / "model.json")}
    with pytest.raises(AerialsegError, match="model.classes is 5 but model.json says 4"):
        verify_bundle(bundle, manifest)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(name=7), "name must be a non-empty string"),
    (lambda r: r.update(name="no_such_model"), "unknown model 'no_such_model'"),
    (lambda r: r.update(classes=0), "classes must be a whole number from 1"),
    (lambda r: r.update(in_channels=True), "in_channels must be a whole number"),
    (lambda r: r.update(kwargs=[1, 2]), "kwargs must be a mapping"),
])
def test_model_record_schema(pristine, edit, message):
    record = json.loads((pristine / "model.json").read_text())
    edit(record)
    with pytest.raises(AerialsegError, match=message) as info:
        validate_model_record(record, "m/model.json")
    assert str(info.value).startswith("m/model.json: ")


def test_bogus_kwargs_and_broken_model_json_at_load(bundle):
    from aerialseg.models import load_model

    record = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**record, "kwargs": {"dropout": 0.5}}))
    with pytest.raises(AerialsegError, match=r"model\.json: model 'toy_fcn_safety' cannot be built from its kwargs"):
        load_model(bundle)
    (bundle / "model.json").write_text('{"name": ')
    with pytest.raises(AerialsegError, match=r"model\.json: model\.json is not valid JSON"):
        load_model(bundle)


def test_zip_errors_name_the_archive(bundle):
    (bundle / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(AerialsegError, match=r"^models/b\.zip/model\.safetensors: is 10 bytes"):
        _verify(bundle, "models/b.zip")
