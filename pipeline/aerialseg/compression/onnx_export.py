"""ONNX export at a fixed tile size, the QGIS Deepness model, and a PyTorch/ONNX parity gate.

Two files per model (both take ``input`` (N, C, tile, tile) float32, normalised as the ModelSpec says,
(pixel / 255 - mean) / std; the batch dimension is dynamic when the exporter manages it):

- ``model.onnx`` returns ``logits`` (N, classes, tile, tile): infer-scene's ``--backend onnx`` applies softmax,
  blends overlapping tiles and flips for TTA itself. Metadata: ``aerialseg_manifest`` only.
- ``model.deepness.onnx`` returns ``probabilities`` (softmax over the classes inside the graph) for the QGIS
  Deepness plugin, which thresholds the raw output as probabilities and takes the argmax. It is the logits
  graph plus a softmax, stamped with the lowest IR version its opset allows (IR 8 for opset 18), so it loads
  in onnxruntime 1.17.0, the newest that Deepness 0.6.5 installs (its requirement: ``>=1.12.1,<=1.17.0``).
  Metadata (``metadata_props``, JSON-encoded values): every key Deepness reads, set to reproduce
  aerialseg's own map (see ``deepness_metadata``).
"""

import contextlib
import copy
import io
import json
import logging
import math
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
PROBS_NAME = "probabilities"
DEEPNESS_SUFFIX = ".deepness.onnx"
# onnxruntime 1.17.0 (what QGIS Deepness 0.6.5 installs) loads IR <= 9 and ai.onnx opset <= 20.
DEEPNESS_ONNXRUNTIME = "1.17.0"
DEEPNESS_MAX_IR, DEEPNESS_MAX_OPSET = 9, 20


def deepness_overlap_percent(tile: int, overlap: int) -> int:
    """Smallest whole percent whose Deepness overlap in pixels, int(tile * p / 100 * 2) // 2, is >= overlap."""
    percent = math.ceil(100 * overlap / tile)
    while int(tile * percent / 100 * 2) // 2 < overlap:
        percent += 1
    return percent


def deepness_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The Deepness metadata_props of a bundle manifest (every value JSON-encoded, as Deepness reads it).

    Deepness reads ``tile_size`` (its docs say ``tiles_size``: both are written); ``seg_thresh`` 0 unticks its
    probability threshold and ``seg_small_segment`` 0 its median filter, so the map is the plain argmax;
    ``tiles_overlap`` is the bundle overlap in whole percent, rounded up. Deepness applies resolution,
    overlap, threshold and filter only when the user clicks "Load default parameters".
    Deepness feeds raw band values / 255 whatever the layer's type: a model trained on a declared value
    range (band_policy, non-8-bit scenes mapped onto 0..255) gets that mapping folded into the
    standardisation, so Deepness computes the same input (values outside the range are not clipped).
    """
    norm = manifest["normalization"]
    tile, overlap = int(manifest["tile_size"]), int(manifest["overlap"])
    low, high = (manifest.get("band_policy") or {}).get("value_range") or (0.0, 255.0)
    span = (float(high) - float(low)) / 255.0  # raw / 255 = low / 255 + span * (8-bit value / 255)
    meta: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(c["id"]): c["name"] for c in manifest["classes"]},
        "tile_size": tile,
        "tiles_size": tile,
        "tiles_overlap": deepness_overlap_percent(tile, overlap),
        "standardization_mean": [float(low) / 255.0 + float(v) * span for v in norm["mean"]],
        "standardization_std": [float(v) * span for v in norm["std"]],
        "seg_thresh": 0.0,
        "seg_small_segment": 0,
    }
    if manifest.get("gsd_m"):
        meta["resolution"] = round(float(manifest["gsd_m"]) * 100.0, 2)  # cm/px; Deepness's box has 2 decimals
    return {key: json.dumps(value) for key, value in meta.items()}


def deepness_path(onnx_path: str | Path) -> Path:
    """The Deepness model beside a logits model: model.onnx -> model.deepness.onnx."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + DEEPNESS_SUFFIX)


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


def _main_opset(proto: Any) -> int:
    """The model's ai.onnx opset (0 when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def lowest_ir_version(opset: int) -> int:
    """IR version of the first ONNX release with ``opset`` (onnx.helper.VERSION_TABLE): 8 for opset 18."""
    from onnx import helper

    return min(row[1] for row in helper.VERSION_TABLE if row[2] >= opset)


def _softmax_nodes(logits: str, opset: int) -> tuple[list[Any], Any]:
    """Softmax over the class axis as exp(x - max) / sum (nodes, axes initializer).

    ONNX Runtime runs this faster than a Softmax node on axis 1 of an NCHW tensor (bench/bench_deepness.py).
    ReduceMax takes its axes as an input from opset 18, as an attribute before.
    """
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "softmax/class_axis")
    reduce_max = (helper.make_node("ReduceMax", [logits, axes.name], ["softmax/max"], keepdims=1) if opset >= 18
                  else helper.make_node("ReduceMax", [logits], ["softmax/max"], axes=[1], keepdims=1))
    nodes = [reduce_max,
             helper.make_node("Sub", [logits, "softmax/max"], ["softmax/shifted"]),
             helper.make_node("Exp", ["softmax/shifted"], ["softmax/exp"]),
             helper.make_node("ReduceSum", ["softmax/exp", axes.name], ["softmax/sum"], keepdims=1),
             helper.make_node("Div", ["softmax/exp", "softmax/sum"], [PROBS_NAME])]
    return nodes, axes


def _strip_value_metadata(graph: Any) -> None:
    """Drop metadata_props of the graph, its nodes and values (IR 10 fields; the dynamo exporter fills them
    with stack traces), so that a lower IR version stamp is true."""
    for item in (graph, *graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if "metadata_props" in type(item).DESCRIPTOR.fields_by_name:
            del item.metadata_props[:]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _strip_value_metadata(sub)


def probabilities_model(logits_model: Any) -> Any:
    """A copy of a logits model (N, K, H, W) that outputs per-class probabilities, loadable by Deepness.

    Appends a softmax over the classes, drops per-node metadata and stamps the lowest IR version the opset
    allows. Raises AerialsegError for opsets outside 13 (single-axis softmax) .. DEEPNESS_MAX_OPSET.
    """
    import onnx

    proto = copy.deepcopy(logits_model)
    opset = _main_opset(proto)
    if not 13 <= opset <= DEEPNESS_MAX_OPSET:
        raise AerialsegError(f"ONNX opset {opset}: QGIS Deepness needs 13..{DEEPNESS_MAX_OPSET} "
                             f"(onnxruntime {DEEPNESS_ONNXRUNTIME})",
                             fix=f"set export.opset to 13..{DEEPNESS_MAX_OPSET}")
    logits = proto.graph.output[0]
    probs = copy.deepcopy(logits)
    probs.name = PROBS_NAME
    nodes, axes = _softmax_nodes(logits.name, opset)
    proto.graph.initializer.append(axes)
    proto.graph.node.extend(nodes)
    del proto.graph.output[:]
    proto.graph.output.append(probs)
    _strip_value_metadata(proto.graph)
    proto.ir_version = min(proto.ir_version, lowest_ir_version(opset))
    onnx.checker.check_model(proto)
    return proto


def write_deepness_onnx(logits_path: str | Path, out: str | Path, metadata: dict[str, str]) -> Path:
    """Write the Deepness model of a logits ONNX file (probabilities, ``metadata`` as metadata_props); atomic."""
    import onnx

    proto = probabilities_model(onnx.load(str(logits_path)))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    proto.doc_string = "aerialseg land-cover model for QGIS Deepness: per-class probabilities"
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out)


def check_parity(model: nn.Module, onnx_path: Path, tiles: np.ndarray | torch.Tensor, max_abs: float,
                 softmax: bool = False) -> dict:
    """Compare PyTorch and ONNX Runtime outputs on the same normalised float tiles (N, C, H, W).

    ``softmax``: the ONNX graph outputs probabilities, compared with the softmax of the PyTorch logits (the
    report then also holds the largest |sum of probabilities - 1|). Returns max/mean absolute difference and
    the share of pixels whose argmax agrees; raises AerialsegError when the max absolute difference exceeds
    ``max_abs``.
    """
    inputs = torch.as_tensor(np.asarray(tiles) if not isinstance(tiles, torch.Tensor) else tiles).float().cpu()
    with torch.no_grad():
        expected = model.eval().cpu()(inputs)
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        expected = (torch.softmax(expected.float(), dim=1) if softmax else expected).numpy()
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
    if softmax:
        report["max_sum_error"] = float(np.abs(actual.astype(np.float64).sum(1) - 1.0).max())
    if report["max_abs_diff"] > max_abs:
        what = "probabilities" if softmax else "logits"
        raise AerialsegError(f"ONNX {what} differ from PyTorch by {report['max_abs_diff']:.3g} "
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


def onnx_record(path: Path, output: str, use: str, parity: dict[str, Any]) -> dict[str, Any]:
    """What an exported file is, for bundle.json: output kind, use, IR version, opset, parity report."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {"output": output, "for": use, "ir_version": int(proto.ir_version), "opset": _main_opset(proto),
            "parity": parity}


def export_bundle_onnx(model_dir: str | Path, out: str | Path | None = None, max_abs_diff: float = 1e-3,
                       opset: int = 18, parity_count: int = 2) -> dict[str, Any]:
    """Export a saved model (or bundle) directory to its two ONNX files and run the parity gate on both.

    Writes ``model_dir/model.onnx`` (logits) unless ``out`` is given, and the Deepness model beside it
    (``model.deepness.onnx``: probabilities + Deepness metadata); updates bundle.json when present.
    Returns {"onnx", "deepness_onnx": paths, "parity", "deepness_parity": reports}. Nothing is left behind
    when a gate fails.
    """
    from aerialseg.inference.bundle import manifest_for, update_manifest_files
    from aerialseg.models import load_model

    model_dir = Path(model_dir)
    model, _ = load_model(model_dir)
    manifest = manifest_for(model_dir)
    out = Path(out) if out is not None else model_dir / "model.onnx"
    deepness_out = deepness_path(out)
    record = json.dumps({k: v for k, v in manifest.items() if k not in ("files", "onnx")})
    tile, channels = int(manifest["tile_size"]), int(manifest["model"]["in_channels"])
    norm = manifest["normalization"]
    tiles = parity_tiles(channels, tile, norm["mean"], norm["std"], count=parity_count)
    try:
        export_onnx(model, out, tile, channels, {"aerialseg_manifest": record, "aerialseg_output": '"logits"'}, opset)
        parity = check_parity(model, out, tiles, max_abs_diff)
        write_deepness_onnx(out, deepness_out, deepness_metadata(manifest)
                            | {"aerialseg_manifest": record, "aerialseg_output": '"probabilities"'})
        deepness_parity = check_parity(model, deepness_out, tiles, max_abs_diff, softmax=True)
    except AerialsegError:
        out.unlink(missing_ok=True)
        deepness_out.unlink(missing_ok=True)
        raise
    if out.parent.resolve() == model_dir.resolve():
        update_manifest_files(model_dir, onnx={
            out.name: onnx_record(out, "logits", "aerialseg infer-scene --backend onnx", parity),
            deepness_out.name: onnx_record(deepness_out, "probabilities", "QGIS Deepness plugin", deepness_parity)})
    log.debug("exported %s (max |dlogit| %.2e) and %s (max |dp| %.2e)", out.name, parity["max_abs_diff"],
              deepness_out.name, deepness_parity["max_abs_diff"])
    return {"onnx": str(out), "deepness_onnx": str(deepness_out), "parity": parity,
            "deepness_parity": deepness_parity}
