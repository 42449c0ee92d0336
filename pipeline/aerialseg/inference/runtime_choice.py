"""Which model serve runs for a bundle: its int8 ONNX model when it has one whose accuracy gate passed, else fp32.

A bundle may carry ``model.int8.onnx`` with ``quantize.json`` beside it (the pipeline's bundle stage carries
them from the quantize stage; ``aerialseg quantize --out BUNDLE`` writes them in). The int8 model is used on
CPU when aerialseg.inference.bundle_int8 says it is usable: gate passed, made from the bundle's weights, input
= the bundle's tile, listed with checksums in bundle.json. Otherwise the bundle's PyTorch fp32 model runs.
Either way one session is built per model at load time and warmed with one batch, so the first request pays
no start-up cost.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aerialseg.inference.bundle import WEIGHTS, Bundle
from aerialseg.inference.bundle_int8 import INT8_FILES, INT8_NAME, QUANTIZE_REPORT, read_gate, read_report, unusable
from aerialseg.inference.predictor import Predictor
from aerialseg.inference.stitch import Predict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """A bundle's tile function and what /v1/models says about it."""

    predict: Predict
    precision: str  # "int8" | "fp32"
    info: dict[str, Any] = field(default_factory=dict)


def int8_candidate(bundle: Bundle) -> tuple[Path | None, dict[str, Any]]:
    """(the int8 model to run or None, why): see the module docstring."""
    path = bundle.root / INT8_NAME
    if not path.is_file():
        return None, {"int8": "no model.int8.onnx in the bundle"}
    record = read_report(bundle.root)
    if record is None:
        return None, {"int8": f"{INT8_NAME} present but {QUANTIZE_REPORT} missing or unreadable"}
    summary = {"accuracy": _accuracy_summary(record.get("accuracy") or {}), "gate": read_gate(record)}
    files = bundle.manifest.get("files")
    if isinstance(files, dict) and not all(name in files for name in INT8_FILES):
        return None, {"int8": f"{INT8_NAME} is not listed in bundle.json (unverified): rebuild the bundle or "
                              "rerun `aerialseg quantize --out BUNDLE`", **summary}
    weights = files.get(WEIGHTS, {}).get("sha256") if isinstance(files, dict) else None
    why = unusable(record, weights, bundle.tile_size)
    if why is not None:
        return None, {"int8": why, **summary}
    return path, summary


def _accuracy_summary(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The headline accuracy figures of quantize.json (mIoU fp32 / int8, delta in points)."""
    out = {"delta_miou_points": accuracy.get("delta_miou_points")}
    for name in ("fp32", "int8"):
        if isinstance(accuracy.get(name), dict):
            out[f"miou_{name}"] = accuracy[name].get("mIoU")
    return out


def build_runtime(bundle: Bundle, device: str = "auto") -> Runtime:
    """The runtime serve uses for ``bundle`` (see the module docstring), warmed with one batch."""
    from aerialseg.models.runtime import resolve_device  # here: the models package loads smp and timm

    torch_device = resolve_device(device)
    path, why = int8_candidate(bundle)
    runtime = None
    if path is not None and torch_device.type != "cpu":
        why = {**why, "int8": "int8 runs on CPU only; this server uses CUDA"}
    elif path is not None:
        runtime = _int8_runtime(bundle, path, why)
        if runtime is None:
            why = {**why, "int8": "its input size is not the bundle's tile size"}
    if runtime is None:
        predictor = Predictor.from_bundle(bundle, "torch", torch_device)
        runtime = Runtime(predictor, "fp32", {"backend": f"torch ({torch_device.type})", **why})
    runtime.predict(np.zeros((1, bundle.in_channels, bundle.tile_size, bundle.tile_size), np.uint8))
    return runtime


def _int8_runtime(bundle: Bundle, path: Path, why: dict[str, Any]) -> Runtime | None:
    """ONNX Runtime int8 session as a Predictor, or None when its input size is not the bundle's tile."""
    from aerialseg.models.runtime import onnx_session, run_onnx

    session = onnx_session(path, "cpu")
    side = session.get_inputs()[0].shape[-2:]
    if all(isinstance(s, int) for s in side) and tuple(side) != (bundle.tile_size, bundle.tile_size):
        log.warning("serve: %s takes %s px tiles, the bundle %d px: running fp32", path, side, bundle.tile_size)
        return None

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_onnx(session, x.numpy()))

    predictor = Predictor(logits, bundle.mean, bundle.std, torch.device("cpu"))
    return Runtime(predictor, "int8", {"backend": "onnxruntime (cpu)", "model": INT8_NAME, **why})
