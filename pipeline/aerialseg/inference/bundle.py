"""The model bundle: everything needed to run a trained model on a new scene, in one folder or .zip.

Layout (a directory, or a .zip holding the same files at its top level):
- ``model.safetensors`` + ``model.json``: weights and how to rebuild them (aerialseg.models.save_model);
- ``model.onnx``: the same model for ONNX Runtime, outputting logits (``infer-scene --backend onnx``);
- ``model.deepness.onnx``: the model for the QGIS Deepness plugin: probabilities + Deepness metadata
  (both from aerialseg.compression.onnx_export);
- ``model.int8.onnx`` + ``quantize.json`` (optional): the quantize stage's int8 model, carried only when its
  ΔmIoU gate passed and it was made from these weights (aerialseg.inference.bundle_int8; serve runs it);
- ``bundle.json``: the manifest — classes and colours, band order, normalisation, tile size, overlap,
  training GSD, training data hash and metrics (copied from model.json extras), file checksums, and what
  each ONNX file is for (output, IR version, opset, parity report).

A plain model directory without bundle.json still opens, with a warning that nothing in it is verified: its
manifest is derived from model.json. A folder with an ONNX export but no bundle.json (a bundle whose manifest
was deleted) and a .zip without one are refused unless the user trusts them (``aerialseg --trust-unverified``,
which sets $AERIALSEG_TRUST_UNVERIFIED). A .zip's members are size-checked before extraction (core.limits).
"""

import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from aerialseg.core.classes import CLASS_NAMES, COLORS
from aerialseg.core.errors import AerialsegError
from aerialseg.geo.scene import BandPolicy
from aerialseg.core.limits import check_zip
from aerialseg.core.safety import environment_error, temp_dir
from aerialseg.inference.bundle_check import verify_bundle
from aerialseg.inference.bundle_int8 import INT8_FILES, carry_int8
from aerialseg.core.fileio import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
CONFIG = "model.json"
ONNX = "model.onnx"
DEEPNESS_ONNX = "model.deepness.onnx"
ONNX_FILES = (ONNX, DEEPNESS_ONNX)
BUNDLE_FILES = (WEIGHTS, CONFIG, *ONNX_FILES, *INT8_FILES, MANIFEST)
_RECORD_KEYS = {"name", "classes", "in_channels", "kwargs", "preprocessing"}
_DATA_HASH_KEYS = ("training_data_sha256", "data_hash", "dataset_hash", "train_data_hash", "data_sha256")


def read_model_record(model_dir: Path) -> dict[str, Any]:
    """model.json of a saved model (clear error when missing or unreadable)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise AerialsegError("no model.json here", model_dir, "point at a directory written by `aerialseg train`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AerialsegError(f"model.json is not valid JSON (line {exc.lineno})", path, "re-save the model") from None
    return _mapping(record, path, "re-save the model")


def _mapping(data: Any, path: Path, fix: str) -> dict[str, Any]:
    """A manifest's top level must be a JSON object (a list or a number is one clear error, not a traceback)."""
    if not isinstance(data, dict):
        kind = "null" if data is None else {list: "list", str: "string"}.get(type(data), type(data).__name__)
        raise AerialsegError(f"{path.name} must be a mapping (a JSON object), got a {kind}", path, fix)
    return data


def class_table(count: int) -> list[dict[str, Any]]:
    """[{id, name, color}] for a model with ``count`` output classes (aerialseg names when they fit)."""
    names = CLASS_NAMES if count == len(CLASS_NAMES) else tuple(f"class_{i}" for i in range(count))
    return [{"id": i, "name": name, "color": list(COLORS[i % len(COLORS)])} for i, name in enumerate(names)]


def make_manifest(record: dict[str, Any], tile_size: int | None = None, overlap: int | None = None,
                  gsd_m: float | None = None) -> dict[str, Any]:
    """A bundle manifest from a model.json record; explicit arguments win over the record's extras."""
    pre = record.get("preprocessing") or {}
    extras = {k: v for k, v in record.items() if k not in _RECORD_KEYS}
    tile = int(tile_size or extras.get("tile_size") or pre.get("tile_size") or 512)
    overlap = int(overlap if overlap is not None else extras.get("overlap", tile // 8))
    if not 0 <= overlap < tile:
        raise AerialsegError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}",
                             fix="set bundle.overlap in params.yaml")
    gsd = gsd_m if gsd_m is not None else extras.get("gsd_m")
    return {
        "format": "aerialseg-bundle",
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": record["name"], "classes": int(record["classes"]),
                  "in_channels": int(record["in_channels"]), "kwargs": record.get("kwargs") or {}},
        "classes": class_table(int(record["classes"])),
        "band_order": list(pre.get("band_order") or ("red", "green", "blue")[: int(record["in_channels"])]),
        "band_policy": BandPolicy(int(record["in_channels"]), _value_range(extras)).to_json(),
        "normalization": {"mean": list(pre.get("mean") or (0.485, 0.456, 0.406)),
                          "std": list(pre.get("std") or (0.229, 0.224, 0.225)),
                          "formula": "(pixel / 255 - mean) / std"},
        "pad_multiple": int(pre.get("pad_multiple") or 32),
        "tile_size": tile,
        "overlap": overlap,
        "gsd_m": float(gsd) if gsd is not None else None,
        "data_hash": next((extras[k] for k in _DATA_HASH_KEYS if extras.get(k)), None),
        "labelled_classes": extras.get("labelled_classes"),  # classes with training data (null: not recorded)
        "metrics": extras.get("metrics"),
        "training": extras,
        **({"adapted": extras["adapted"]} if extras.get("adapted") else {}),  # aerialseg adapt: to what, how
    }


def _value_range(extras: dict[str, Any]) -> tuple[float, float] | None:
    """The training data's declared value range (model.json ``value_range``), if any."""
    vr = extras.get("value_range")
    return (float(vr[0]), float(vr[1])) if vr else None


def manifest_for(model_dir: str | Path, overlap: int | None = None) -> dict[str, Any]:
    """bundle.json of a bundle directory, or a manifest derived from model.json when there is none."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise AerialsegError(f"bundle.json is not valid JSON ({type(exc).__name__})", path,
                                 "rebuild it with `aerialseg bundle`") from None
        return _mapping(manifest, path, "rebuild it with `aerialseg bundle`")
    return make_manifest(read_model_record(model_dir), overlap=overlap)


def file_records(bundle_dir: Path) -> dict[str, Any]:
    """{file name: {bytes, sha256}} for the bundle files present in a directory."""
    return {name: {"bytes": (bundle_dir / name).stat().st_size, "sha256": sha256_file(bundle_dir / name)}
            for name in (WEIGHTS, CONFIG, *ONNX_FILES, *INT8_FILES) if (bundle_dir / name).is_file()}


def update_manifest_files(bundle_dir: str | Path, onnx: dict[str, Any] | None = None,
                          int8: dict[str, Any] | None = None) -> None:
    """Refresh the checksums in an existing bundle.json (no-op without one).

    ``onnx`` ({file name: what it is for, IR, opset, parity}) replaces the ``onnx`` section; entries whose
    file is gone are dropped either way. ``int8`` (carried or why not) replaces the ``int8`` section.
    """
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / MANIFEST).is_file():
        return
    manifest = manifest_for(bundle_dir)
    manifest["files"] = file_records(bundle_dir)
    records = onnx if onnx is not None else manifest.get("onnx") or {}
    manifest["onnx"] = {name: rec for name, rec in records.items() if (bundle_dir / name).is_file()}
    if int8 is not None:
        manifest["int8"] = int8
    write_json(bundle_dir / MANIFEST, manifest)


def assemble_bundle(model_dir: str | Path, out: str | Path | None = None, tile_size: int | None = None,
                    overlap: int | None = None, gsd_m: float | None = None, archive: bool = False,
                    export: Callable[[Path], object] | None = None, int8_from: str | Path | None = None) -> Path:
    """Bundle a trained model directory: copy weights, write bundle.json, run ``export`` on the staged folder
    (the ONNX export: aerialseg.stages.bundle.build_bundle passes it), carry the int8 model of the folder
    ``int8_from`` when it is usable (aerialseg.inference.bundle_int8), then checksum the files.

    ``out`` None bundles in place. The bundle is assembled in a temp folder beside ``out`` and renamed
    into place (or zipped to ``out`` with a .zip suffix when ``archive``). Returns the bundle path.
    """
    model_dir = Path(model_dir)
    record = read_model_record(model_dir)
    if not (model_dir / WEIGHTS).is_file():
        raise AerialsegError("no model.safetensors here", model_dir,
                             "point at a directory written by `aerialseg train`")
    out = Path(out) if out is not None else model_dir
    manifest = make_manifest(record, tile_size, overlap, gsd_m)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".aerialseg-tmp-bundle-", dir=out.parent) as tmp_name:
        stage = Path(tmp_name)
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(model_dir / name, stage / name)
        write_json(stage / MANIFEST, manifest)
        if export is not None:
            export(stage)
        int8 = None if int8_from is None else carry_int8(Path(int8_from), stage, stage / WEIGHTS,
                                                          int(manifest["tile_size"]))
        if int8 is not None and not int8["carried"]:
            log.info("bundle: no int8 model: %s", int8["reason"])
        update_manifest_files(stage, int8=int8)
        if archive:
            return _write_zip(stage, out.with_suffix(".zip"))
        return _install_dir(stage, out, in_place=out.resolve() == model_dir.resolve())


def _write_zip(stage: Path, dest: Path) -> Path:
    """Zip the bundle files of ``stage`` (flat) atomically to ``dest``."""
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in BUNDLE_FILES:
                if (stage / name).is_file():
                    zf.write(stage / name, arcname=name)
    return dest


def _install_dir(stage: Path, dest: Path, in_place: bool = False) -> Path:
    """Put the staged bundle files into ``dest``: file by file (atomic renames) when it exists, else one rename.

    Bundling in place (dest = the model dir) keeps the trained files; an ONNX file the stage lacks is removed,
    and so is an int8 model unless in place (there it is the quantize stage's output; unlisted, nothing runs it).
    """
    if dest.exists():
        for name in BUNDLE_FILES:
            if (stage / name).is_file():
                os.replace(stage / name, dest / name)
            elif name in ONNX_FILES or (name in INT8_FILES and not in_place):
                (dest / name).unlink(missing_ok=True)  # a stale export would not match the new weights
        return dest
    os.replace(stage, dest)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest, 0o777 & ~umask)  # the temp folder was private (0700)
    stage.mkdir()  # TemporaryDirectory cleans up the (now empty) stage path
    return dest


@dataclass
class Bundle:
    """An opened bundle: its folder and manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def tile_size(self) -> int:
        return int(self.manifest["tile_size"])

    @property
    def overlap(self) -> int:
        return int(self.manifest["overlap"])

    @property
    def in_channels(self) -> int:
        return int(self.manifest["model"]["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["classes"])

    @property
    def gsd_m(self) -> float | None:
        gsd = self.manifest.get("gsd_m")
        return float(gsd) if gsd else None

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in self.manifest["normalization"]["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.manifest["normalization"]["std"]]

    @property
    def band_policy(self) -> BandPolicy:
        """How scenes are read for this model (aerialseg.geo.scene); older bundles: 8-bit, in_channels."""
        return BandPolicy.from_json(self.manifest.get("band_policy") or {"channels": self.in_channels})

    @property
    def labelled_ids(self) -> list[int] | None:
        """Ids of the classes that had training data (bundle.json ``labelled_classes``); None: not recorded."""
        names = [c["name"] for c in self.manifest["classes"]]
        ids = [names.index(n) for n in self.manifest.get("labelled_classes") or () if n in names]
        return ids or None

    @property
    def onnx_path(self) -> Path:
        return self.root / ONNX

    def load_torch(self) -> nn.Module:
        """The PyTorch model in eval mode (weights-only load)."""
        from aerialseg.models import load_model

        return load_model(self.root)[0]


TRUST_ENV = "AERIALSEG_TRUST_UNVERIFIED"


def trusted() -> bool:
    """True when the user accepts bundles without bundle.json (``aerialseg --trust-unverified``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _unverified(root: Path, shown: Path, archive: bool) -> None:
    """No bundle.json: a plain trained-model folder runs with a warning; a .zip or a folder holding an ONNX
    export (a bundle whose manifest is gone) is refused unless trusted."""
    looks_bundled = archive or any((root / name).is_file() for name in ONNX_FILES)
    if looks_bundled and not trusted():
        raise AerialsegError("bundle has no bundle.json: its files cannot be verified (deleted or replaced?)", shown,
                             "rebuild it with `aerialseg bundle`, or pass `aerialseg --trust-unverified ...` "
                             "to run it anyway")
    log.warning("%s: no bundle.json: %s, its files are not verified against checksums", shown,
                "trusted by --trust-unverified" if looks_bundled else "a plain trained-model folder")


@contextmanager
def open_bundle(path: str | Path, overlap: int | None = None) -> Iterator[Bundle]:
    """Open a bundle directory or .zip (extracted to a run-named temp folder removed on exit), verified:
    every file's size and SHA-256 as bundle.json lists them, and the manifest's and model.json's schemas."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            _unverified(path, path, archive=False)
        bundle = Bundle(path, manifest_for(path, overlap=overlap))
        verify_bundle(path, bundle.manifest)
        yield bundle
        return
    if not path.is_file():
        raise AerialsegError("model bundle not found", path, "give a bundle directory or .zip (`aerialseg bundle`)")
    if not zipfile.is_zipfile(path):
        raise AerialsegError("not a bundle directory or .zip archive", path, "rebuild it with `aerialseg bundle --zip`")
    with temp_dir(tempfile.gettempdir(), "bundle") as root:
        _extract(path, root)
        if not (root / MANIFEST).is_file():
            _unverified(root, path, archive=True)
        manifest = manifest_for(root, overlap=overlap)
        verify_bundle(root, manifest, source=path)
        yield Bundle(root, manifest)


def _extract(path: Path, root: Path) -> None:
    """Extract the bundle files of the archive (known flat names only: no path traversal), after checking
    their count and uncompressed sizes against the caps and the free space (core.limits.check_zip)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {Path(i.filename).name: i for i in zf.infolist() if Path(i.filename).name in BUNDLE_FILES}
            check_zip(path, zf, list(members.values()), root)
            for name, member in members.items():
                with zf.open(member) as src, open(root / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise AerialsegError(f"cannot unpack the archive ({type(exc).__name__})", path,
                             "rebuild it with `aerialseg bundle --zip`") from None
    except OSError as exc:
        raise (environment_error(exc, path) or exc) from None
