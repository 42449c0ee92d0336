"""ONNX export at a fixed tile size, Deepness-readable metadata, and a PyTorch/ONNX parity gate.

The graph takes ``input`` (N, C, tile, tile) float32, normalised as the model's ModelSpec says
((pixel / 255 - mean) / std), and returns ``logits`` (N, classes, tile, tile); the batch dimension is
dynamic when the exporter manages it. Metadata (``metadata_props``, JSON-encoded values) follows the
QGIS Deepness plugin: model_type, class_names, resolution (cm/px), tiles_size, tiles_overlap (percent of
the tile), standardization_mean/std (on the 0..1 scale).
"""

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path
from aerialseg.models.runtime import onnx_session, run_onnx

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def deepness_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The Deepness metadata_props of a bundle manifest (every value JSON-encoded, as Deepness reads it)."""
    norm = manifest["normalization"]
    tile, overlap = int(manifest["tile_size"]), int(manifest["overlap"])
    meta: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(c["id"]): c["name"] for c in manifest["classes"]},
        "tiles_size": tile,
        "tiles_overlap": int(round(100 * overlap / tile)),
        "standardization_mean": [float(v) for v in norm["mean"]],
        "standardization_std": [float(v) for v in norm["std"]],
    }
    if manifest.get("gsd_m"):
        meta["resolution"] = round(float(manifest["gsd_m"]) * 100.0, 4)
    return {key: json.dumps(value) for key, value in meta.items()}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the exporters' INFO chatter (the CLI logs at INFO) for the duration of the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_proto(model: nn.Module, example: torch.Tensor, opset: int, dynamo: bool, dynamic_batch: bool) -> Any:
    """One torch.onnx.export attempt; returns the in-memory ModelProto (weights embedded)."""
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if dynamo:
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
        quiet = _quiet("onnxscript", "onnx_ir", "torch.onnx")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False, **kwargs)
        return program.model_proto
    import onnx

    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def export_onnx(model: nn.Module, path: Path, tile_size: int, in_channels: int = 3,
                metadata: dict[str, str] | None = None, opset: int = 18) -> Path:
    """Export ``model`` to ONNX at (N, in_channels, tile_size, tile_size) with metadata; atomic, one file.

    Tries the dynamo exporter with a dynamic batch, then with a fixed batch of 1, then the legacy
    exporter (dynamic batch). Raises AerialsegError when every attempt fails.
    """
    import onnx

    path = Path(path)
    model = model.eval().cpu()
    example = torch.zeros(1, in_channels, tile_size, tile_size)
    errors = []
    proto = None
    for dynamo, dynamic_batch in ((True, True), (True, False), (False, True)):
        try:
            with torch.no_grad():
                proto = _export_proto(model, example, opset, dynamo, dynamic_batch)
            break
        except Exception as exc:  # exporter failures are many and varied; try the next route
            errors.append(f"{'dynamo' if dynamo else 'legacy'}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            log.debug("ONNX export attempt failed: %s", errors[-1])
    if proto is None:
        raise AerialsegError(f"ONNX export failed ({'; '.join(errors)})", path,
                             "check the model runs at this tile size; see --verbose")
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    proto.producer_name = "aerialseg"
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def check_parity(model: nn.Module, onnx_path: Path, tiles: np.ndarray | torch.Tensor, max_abs: float) -> dict:
    """Compare PyTorch and ONNX Runtime logits on the same normalised float tiles (N, C, H, W).

    Returns max/mean absolute difference and the share of pixels whose argmax agrees; raises
    AerialsegError when the max absolute difference exceeds ``max_abs``.
    """
    inputs = torch.as_tensor(np.asarray(tiles) if not isinstance(tiles, torch.Tensor) else tiles).float().cpu()
    with torch.no_grad():
        expected = model.eval().cpu()(inputs)
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).numpy()
    actual = run_onnx(onnx_session(onnx_path, device="cpu"), inputs.numpy())
    if actual.shape != expected.shape:
        raise AerialsegError(f"ONNX output shape {actual.shape} differs from PyTorch {expected.shape}", onnx_path,
                             "re-export the model")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    report = {
        "tiles": int(inputs.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float((actual.argmax(1) == expected.argmax(1)).mean()),
        "max_abs_allowed": float(max_abs),
    }
    if report["max_abs_diff"] > max_abs:
        raise AerialsegError(f"ONNX logits differ from PyTorch by {report['max_abs_diff']:.3g} "
                             f"(allowed {max_abs:g})", onnx_path,
                             "check the export (opset, unsupported ops) or raise export.max_abs_diff")
    return report


def parity_tiles(in_channels: int, tile_size: int, mean: list[float], std: list[float], count: int = 2,
                 seed: int = 0) -> torch.Tensor:
    """Normalised tiles of smooth random texture (deterministic) for the parity gate."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, in_channels, max(tile_size // 16, 1), max(tile_size // 16, 1), generator=gen)
    pixels = torch.nn.functional.interpolate(coarse, size=(tile_size, tile_size), mode="bilinear",
                                             align_corners=False) * 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels / 255.0 - m) / s


def export_bundle_onnx(model_dir: str | Path, out: str | Path | None = None, max_abs_diff: float = 1e-3,
                       opset: int = 18, parity_count: int = 2) -> dict[str, Any]:
    """Export a saved model (or bundle) directory to ONNX with Deepness metadata, then run the parity gate.

    Writes ``model_dir/model.onnx`` unless ``out`` is given; updates bundle.json when present.
    Returns {"onnx": path, "parity": {...}}.
    """
    from aerialseg.inference.bundle import manifest_for, update_manifest_files
    from aerialseg.models import load_model

    model_dir = Path(model_dir)
    model, _ = load_model(model_dir)
    manifest = manifest_for(model_dir)
    out = Path(out) if out is not None else model_dir / "model.onnx"
    metadata = deepness_metadata(manifest)
    metadata["aerialseg_manifest"] = json.dumps({k: v for k, v in manifest.items() if k != "files"})
    export_onnx(model, out, int(manifest["tile_size"]), int(manifest["model"]["in_channels"]), metadata, opset)
    norm = manifest["normalization"]
    tiles = parity_tiles(int(manifest["model"]["in_channels"]), int(manifest["tile_size"]), norm["mean"],
                         norm["std"], count=parity_count)
    try:
        parity = check_parity(model, out, tiles, max_abs_diff)
    except AerialsegError:
        out.unlink(missing_ok=True)
        raise
    if out.parent.resolve() == model_dir.resolve():
        update_manifest_files(model_dir, parity=parity)
    log.debug("exported %s (max |dlogit| %.2e, argmax agreement %.4f)", out.name, parity["max_abs_diff"],
             parity["argmax_agreement"])
    return {"onnx": str(out), "parity": parity}
