"""Verify a model bundle before anything in it is used: checksums, manifest schema, model record, ONNX.

- ``verify_bundle(root, manifest)``: when the bundle has a bundle.json, every file it lists must be there with
  its recorded size and SHA-256, and no bundle file may be present unlisted; the manifest and model.json must
  follow their schema (types, ranges, class count = colour table, tile size > 0, normalisation present) and
  agree with each other. A plain model folder (no bundle.json) has nothing recorded: its model.json is checked
  and a model.onnx in it must parse as ONNX.
- ``validate_model_record(record, path)``: the schema of model.json alone (also for plain model folders).

Every problem is one AerialsegError naming the file, what is wrong and the fix.
"""

import math
import re
from pathlib import Path
from typing import Any

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file

MANIFEST, WEIGHTS, CONFIG, ONNX = "bundle.json", "model.safetensors", "model.json", "model.onnx"
DEEPNESS_ONNX = "model.deepness.onnx"
MODEL_FILES = (WEIGHTS, CONFIG, ONNX, DEEPNESS_ONNX)  # the bundle format's files: each must carry a checksum
SUPPORTED_VERSION = 1
REBUILD = "rebuild the bundle with `aerialseg bundle MODEL_DIR` (or copy it again)"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Checker:
    """Collects the path shown in errors and the fix; raises on the first problem."""

    def __init__(self, path: Path | str, fix: str):
        self.path, self.fix = path, fix

    def fail(self, what: str) -> None:
        raise AerialsegError(what, self.path, self.fix)

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{key} must be a mapping, got {_kind(value)}")
        return value

    def whole(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(f"{key} must be a whole number from {low} to {high}, got {value!r}")
        return value

    def number(self, value: Any, key: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(f"{key} must be a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(f"{key} must be > 0, got {value!r}")
        return float(value)

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{key} must be a non-empty string, got {value!r}")
        return value

    def vector(self, value: Any, key: str, length: int, positive: bool = False) -> list[float]:
        if not isinstance(value, list) or len(value) != length:
            self.fail(f"{key} must be a list of {length} numbers (one per input band), got {value!r}")
        return [self.number(v, f"{key}[{i}]", positive) for i, v in enumerate(value)]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- model.json ----------------------------------------------------------------------------------------

def validate_model_record(record: Any, path: Path | str) -> None:
    """model.json: name (a registered model), classes, in_channels, kwargs, preprocessing (when present)."""
    check = _Checker(path, "restore model.json from the trained model (or re-save the model)")
    record = check.mapping(record, "model.json")
    name = check.text(record.get("name"), "name")
    classes = check.whole(record.get("classes"), "classes", 1, 1024)
    channels = check.whole(record.get("in_channels"), "in_channels", 1, 64)
    check.mapping(record.get("kwargs", {}) if record.get("kwargs") is not None else {}, "kwargs")
    pre = record.get("preprocessing")
    if pre is not None:
        pre = check.mapping(pre, "preprocessing")
        if "mean" in pre or "std" in pre:
            check.vector(pre.get("mean"), "preprocessing.mean", channels)
            check.vector(pre.get("std"), "preprocessing.std", channels, positive=True)
        if "tile_size" in pre:
            check.whole(pre["tile_size"], "preprocessing.tile_size", 1, 16384)
        if "pad_multiple" in pre:
            check.whole(pre["pad_multiple"], "preprocessing.pad_multiple", 1, 4096)
    from aerialseg.models import list_models

    if name not in list_models():
        check.fail(f"unknown model '{name}' (classes {classes})")


# --- bundle.json ---------------------------------------------------------------------------------------

def validate_manifest(manifest: Any, path: Path | str) -> None:
    """The manifest's schema: model, classes + colours, normalisation, tiles, GSD, band policy."""
    check = _Checker(path, REBUILD)
    manifest = check.mapping(manifest, "bundle.json")
    if "format" in manifest and manifest["format"] != "aerialseg-bundle":
        check.fail(f"format is {manifest['format']!r}, not 'aerialseg-bundle'")
    if "version" in manifest and check.whole(manifest["version"], "version", 1, 10**6) > SUPPORTED_VERSION:
        check.fail(f"bundle version {manifest['version']} is newer than this aerialseg reads ({SUPPORTED_VERSION})")
    model = check.mapping(manifest.get("model"), "model")
    check.text(model.get("name"), "model.name")
    n_classes = check.whole(model.get("classes"), "model.classes", 1, 1024)
    channels = check.whole(model.get("in_channels"), "model.in_channels", 1, 64)
    check.mapping(model.get("kwargs", {}), "model.kwargs")
    _check_classes(check, manifest.get("classes"), n_classes)
    norm = check.mapping(manifest.get("normalization"), "normalization")
    check.vector(norm.get("mean"), "normalization.mean", channels)
    check.vector(norm.get("std"), "normalization.std", channels, positive=True)
    tile = check.whole(manifest.get("tile_size"), "tile_size", 1, 16384)
    overlap = check.whole(manifest.get("overlap"), "overlap", 0, 16384)
    if overlap >= tile:
        check.fail(f"overlap {overlap} must be smaller than tile_size {tile}")
    if "pad_multiple" in manifest:
        check.whole(manifest["pad_multiple"], "pad_multiple", 1, 4096)
    if manifest.get("gsd_m") is not None:
        check.number(manifest["gsd_m"], "gsd_m", positive=True)
    if manifest.get("band_order") is not None:
        order = manifest["band_order"]
        if not isinstance(order, list) or len(order) != channels or not all(isinstance(b, str) for b in order):
            check.fail(f"band_order must list {channels} band names, got {order!r}")
    if manifest.get("band_policy") is not None:
        _check_band_policy(check, manifest["band_policy"], channels)
    labelled, names = manifest.get("labelled_classes"), [c.get("name") for c in manifest["classes"]]
    if labelled is not None and (not isinstance(labelled, list) or not labelled
                                 or not all(isinstance(n, str) and n in names for n in labelled)):
        check.fail(f"labelled_classes must list class names of the bundle ({', '.join(names)}), got {labelled!r}")


def _check_classes(check: _Checker, classes: Any, count: int) -> None:
    if not isinstance(classes, list) or len(classes) != count:
        check.fail(f"classes must list {count} classes (model.classes), got "
                   f"{len(classes) if isinstance(classes, list) else _kind(classes)}")
    for i, entry in enumerate(classes):
        entry = check.mapping(entry, f"classes[{i}]")
        if entry.get("id") != i or isinstance(entry.get("id"), bool):
            check.fail(f"classes[{i}].id must be {i}, got {entry.get('id')!r}")
        check.text(entry.get("name"), f"classes[{i}].name")
        color = entry.get("color")
        if not isinstance(color, list) or len(color) not in (3, 4) or \
                not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            check.fail(f"classes[{i}].color must be [r, g, b] with 0..255, got {color!r}")


def _check_band_policy(check: _Checker, policy: Any, channels: int) -> None:
    policy = check.mapping(policy, "band_policy")
    if check.whole(policy.get("channels", channels), "band_policy.channels", 1, 64) != channels:
        check.fail(f"band_policy.channels {policy.get('channels')} differs from model.in_channels {channels}")
    value_range = policy.get("value_range")
    if value_range is not None:
        if not isinstance(value_range, list) or len(value_range) != 2:
            check.fail(f"band_policy.value_range must be [low, high], got {value_range!r}")
        low, high = (check.number(v, "band_policy.value_range") for v in value_range)
        if not high > low:
            check.fail(f"band_policy.value_range {value_range} is empty (high must exceed low)")


# --- files ---------------------------------------------------------------------------------------------

def verify_files(root: Path, manifest: dict[str, Any], shown: Path | str) -> None:
    """Every file listed in bundle.json is present with its size and SHA-256; no bundle model file (weights,
    model.json, the two ONNX files) is present unlisted."""
    check = _Checker(f"{shown}/{MANIFEST}" if shown else root / MANIFEST, REBUILD)
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        check.fail("lists no checksums for the bundle's files (no 'files' with model.safetensors)")
    for name in MODEL_FILES:  # other files (a bundle built in place keeps checkpoints, reports) are not used
        if (root / name).is_file() and name not in files:
            check.fail(f"{name} is in the bundle but has no checksum in bundle.json")
    for name, record in files.items():
        where = _Checker(f"{shown}/{name}" if shown else root / name, REBUILD)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            check.fail(f"lists a file that is not a plain file name: {name!r}")
        record = check.mapping(record, f"files.{name}")
        expected = record.get("sha256")
        if not isinstance(expected, str) or not _SHA256.match(expected):
            check.fail(f"files.{name}.sha256 is not a SHA-256 hex digest: {expected!r}")
        path = root / name
        if not path.is_file():
            where.fail("listed in bundle.json but missing from the bundle")
        size = path.stat().st_size
        if isinstance(record.get("bytes"), int) and record["bytes"] != size:
            where.fail(f"is {size} bytes, bundle.json records {record['bytes']} (truncated or replaced)")
        if sha256_file(path) != expected:
            where.fail("SHA-256 differs from the one recorded in bundle.json: the file is corrupt or was changed")


def check_onnx(path: Path, shown: Path | str | None = None) -> None:
    """A model.onnx must parse as an ONNX model with a graph (a garbage file is one clear error)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError) as exc:
        raise AerialsegError(f"not a readable ONNX model ({type(exc).__name__})", shown or path,
                             "export it again (aerialseg export-onnx) or rebuild the bundle") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise AerialsegError("ONNX model has an empty graph", shown or path,
                             "export it again (aerialseg export-onnx) or rebuild the bundle")


def verify_bundle(root: Path, manifest: dict[str, Any], source: Path | str | None = None) -> None:
    """Verify an opened bundle (directory or extracted .zip) before use; ``source`` names it in errors (a .zip).

    With a bundle.json: checksums of every file, manifest schema, model.json schema and agreement with the
    manifest. Without one (a plain trained-model folder): model.json schema, and model.onnx parses.
    """
    root = Path(root)
    shown = Path(source) if source is not None else None

    def name(file: str) -> Path | str:
        return f"{shown}/{file}" if shown else root / file

    has_manifest = (root / MANIFEST).is_file()
    if has_manifest:
        _Checker(name(MANIFEST), REBUILD).mapping(manifest, "bundle.json")  # before any key is looked up
        verify_files(root, manifest, shown or "")
        validate_manifest(manifest, name(MANIFEST))
    if (root / CONFIG).is_file():
        record = _read_json(root / CONFIG, name(CONFIG))
        validate_model_record(record, name(CONFIG))
        if has_manifest:
            _check_agreement(manifest, record, name(MANIFEST))
    if not has_manifest:  # derived from model.json; nothing recorded to check the files against
        validate_manifest(manifest, name(CONFIG))
        if (root / ONNX).is_file():
            check_onnx(root / ONNX, name(ONNX))


def _read_json(path: Path, shown: Path | str) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AerialsegError(f"not valid JSON ({type(exc).__name__})", shown, REBUILD) from None


def _check_agreement(manifest: dict[str, Any], record: dict[str, Any], shown: Path | str) -> None:
    model = manifest["model"]
    for key in ("name", "classes", "in_channels"):
        if model.get(key) != record.get(key):
            raise AerialsegError(f"model.{key} is {model.get(key)!r} but model.json says {record.get(key)!r}",
                                 shown, REBUILD)
