"""int8 models: ONNX Runtime static quantization (QDQ, per-channel weights), calibrated on training tiles.

Route (see ../shared/research/environment.md): export fp32 ONNX at a fixed tile size (aerialseg.compression.onnx_export),
gate its parity with PyTorch (max |logit difference|), run ``quant_pre_process`` (shape inference and graph
optimisation), calibrate activation ranges on N training tiles normalised with the model's spec, write
QDQ int8 (QUInt8 activations, QInt8 per-channel weights: the fast pair on x86 with VNNI), then gate the
int8 model on validation tiles: ΔmIoU = mIoU(fp32) - mIoU(int8) in points against the labels must stay
within ``quantize.max_delta_miou``, or the model is recorded as rejected. Dynamic int8 is measured on
request only: it is slower than fp32 on conv nets (activations are re-quantized at run time for every conv).

Outputs in the out directory: quantize.json (sizes MB, parity, ΔmIoU, the gate's verdict, latencies) and
model.int8.onnx, or model.int8.rejected.onnx when the gate failed (a result, not an error: the pipeline goes
on and the compression table and report say why). aerialseg.compression.table builds the paper's Table II.
"""

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from tqdm import tqdm

from aerialseg.core.errors import AerialsegError
from aerialseg.compression.onnx_export import INPUT_NAME, check_parity, export_onnx, parity_tiles
from aerialseg.core.fileio import atomic_path, sha256_file, write_json
from aerialseg.evaluation.metrics import BoundaryF1, ConfusionMatrix
from aerialseg.inference.bundle_int8 import INT8_NAME, QUANTIZE_REPORT as REPORT_NAME
from aerialseg.inference.bundle_int8 import read_gate  # noqa: F401  (the one gate reader; compression.table)
from aerialseg.models import ModelSpec, count_parameters, get_spec, load_model  # pruned ones too (their plan)
from aerialseg.core.config import typed_section
from aerialseg.core.timing import median_ms

log = logging.getLogger(__name__)

QUANT_TYPES = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
# Entropy is left out: quantize_static cannot pass it more histogram bins than quantized bins (128/128),
# so in ONNX Runtime 1.31 it returns exactly the MinMax ranges.
CALIBRATION_METHODS = {"MinMax": CalibrationMethod.MinMax, "Percentile": CalibrationMethod.Percentile,
                       "Entropy": CalibrationMethod.Entropy}
KEEP_FP32_CHOICES = ("first_conv", "last_conv")  # quantize.keep_fp32: convolutions left in fp32
# Normalisation layers stay fp32: with per-channel weights ONNX Runtime 1.31 quantizes their 1-D scale on
# axis 1, which breaks GroupNorm/InstanceNorm graphs (DAS-Net) at run time and gains nothing in speed.
FP32_OP_TYPES = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
STATIC_OP_TYPES = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - FP32_OP_TYPES)
DISABLED_REASON = "quantize.enabled is false: no int8 model and no compression table (set it true to quantize)"
REJECTED_NAME = "model.int8.rejected.onnx"  # an int8 model that failed the ΔmIoU gate


@dataclass
class QuantizeConfig:
    """Knobs of the quantize stage (params.yaml section ``quantize``)."""

    enabled: bool = True                    # False: the stage writes only quantize.json saying so (profiles/quick)
    model_dir: str | None = None            # None = train.out
    out: str | None = None                  # where model.int8.onnx + quantize.json go; None = the model dir
    tile_size: int | None = None            # fixed ONNX input size; None = the model's spec.tile_size
    calibration_tiles: int = 32             # training patches used to calibrate activation ranges
    val_tiles: int | None = 64              # validation patches for the ΔmIoU gate (None = all)
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    reduce_range: bool = False              # True only for x86 CPUs without VNNI
    calibrate_method: str = "MinMax"        # MinMax | Percentile (99.999th) | Entropy
    preprocess: bool = True                 # onnxruntime quant_pre_process before quantizing
    keep_fp32: list[str] = field(default_factory=list)  # first_conv / last_conv: left unquantized
    max_delta_miou: float = 1.0             # points: fail when fp32 mIoU - int8 mIoU exceeds this
    max_abs_diff: float = 1e-3              # fp32 export parity: max |logit difference| allowed
    threads: int = 2                        # CPU threads for the latency figures
    latency_runs: int = 10                  # timed runs (median reported) after latency_warmup
    latency_warmup: int = 2
    measure_dynamic: bool = False           # also time dynamic int8 (slower on conv nets)
    opset: int = 18
    table: dict[str, Any] = field(default_factory=dict)  # `aerialseg compression-table` knobs

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> "QuantizeConfig":
        """Build from the params.yaml section; unknown keys are an error."""
        return typed_section(cls, "quantize", values)

    def validate(self) -> None:
        """Reject values ONNX Runtime would not take, naming the key."""
        for key, value, allowed in (("activation_type", self.activation_type, QUANT_TYPES),
                                    ("weight_type", self.weight_type, QUANT_TYPES),
                                    ("calibrate_method", self.calibrate_method, CALIBRATION_METHODS)):
            if value not in allowed:
                raise AerialsegError(f"quantize.{key} '{value}' is not one of {', '.join(allowed)}", "params.yaml")
        unknown = sorted(set(self.keep_fp32) - set(KEEP_FP32_CHOICES))
        if unknown:
            raise AerialsegError(f"quantize.keep_fp32 names {', '.join(unknown)}", "params.yaml",
                                 f"use a list of: {', '.join(KEEP_FP32_CHOICES)}")
        if self.calibration_tiles < 1 or self.latency_runs < 1:
            raise AerialsegError("quantize.calibration_tiles and quantize.latency_runs must be >= 1", "params.yaml")


# --- tiles --------------------------------------------------------------------------------------


def to_model_input(image: np.ndarray, spec: ModelSpec, size: int) -> np.ndarray:
    """uint8 (H, W, C) with H, W <= size -> normalised float32 (1, C, size, size), reflect-padded."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise AerialsegError(f"tile {h}x{w} is larger than the model input {size}x{size}",
                             fix="set quantize.tile_size to at least the patch size")
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    x = spec.normalize(chw)
    if (h, w) != (size, size):
        mode = "reflect" if (size - h < h and size - w < w) else "replicate"
        x = torch.nn.functional.pad(x, (0, size - w, 0, size - h), mode=mode)
    return x.numpy().astype(np.float32)


class TileCalibrationReader(CalibrationDataReader):
    """Feeds N uint8 tiles (H, W, C), normalised with the model's spec, one by one to the calibrator."""

    def __init__(self, tiles: Sequence[np.ndarray], spec: ModelSpec, size: int, input_name: str = INPUT_NAME):
        if len(tiles) == 0:
            raise AerialsegError("no calibration tiles", fix="check the train split has patches")
        self.tiles, self.spec, self.size, self.input_name = tiles, spec, size, input_name
        self._iter: Iterator[np.ndarray] = iter(self.tiles)
        self.fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        tile = next(self._iter, None)
        if tile is None:
            return None
        self.fed += 1
        return {self.input_name: to_model_input(tile, self.spec, self.size)}

    def rewind(self) -> None:
        self._iter = iter(self.tiles)


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """CPU ONNX Runtime session with all graph optimisations; ``threads`` 0 = ORT's default."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_input_size(sess: ort.InferenceSession) -> int:
    """The fixed H (= W) of a session's input."""
    shape = sess.get_inputs()[0].shape
    if not isinstance(shape[-1], int):
        raise AerialsegError("ONNX input has a dynamic size; export at a fixed tile size")
    return int(shape[-1])


def onnx_predict(sess: ort.InferenceSession, image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Class map (H, W) of one uint8 tile (H, W, C) through a fixed-size ONNX model."""
    h, w = image.shape[:2]
    x = to_model_input(image, spec, onnx_input_size(sess))
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return logits[0, :, :h, :w].argmax(0).astype(np.uint8)


# --- quantization -------------------------------------------------------------------------------


def quantize_static_int8(fp32_path: str | Path, int8_path: str | Path, reader: CalibrationDataReader,
                         config: QuantizeConfig) -> Path:
    """Static QDQ int8 of an fp32 ONNX file, calibrated with ``reader``; written atomically."""
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(prefix="aerialseg-quant-") as tmp:
        source = prepare(fp32_path, Path(tmp)) if config.preprocess else Path(fp32_path)
        with atomic_path(int8_path) as out:
            with ort_warnings_summarised(str(int8_path)):
                quantize_static(
                    str(source), str(out), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=STATIC_OP_TYPES, per_channel=config.per_channel,
                    reduce_range=config.reduce_range, activation_type=QUANT_TYPES[config.activation_type],
                    weight_type=QUANT_TYPES[config.weight_type],
                    calibrate_method=CALIBRATION_METHODS[config.calibrate_method],
                    nodes_to_exclude=fp32_nodes(source, config.keep_fp32))
            copy_metadata(fp32_path, out, {"aerialseg_quantization": json.dumps(quantization_record(config))})
    return int8_path


def fp32_nodes(path: str | Path, keep: Sequence[str]) -> list[str]:
    """Names of the convolutions ``keep`` leaves in fp32: the graph's first and/or last Conv node."""
    if not keep:
        return []
    convs = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]
    picked = {convs[0]} if convs and "first_conv" in keep else set()
    return sorted(picked | ({convs[-1]} if convs and "last_conv" in keep else set()))


class _CountOrtWarnings(logging.Filter):
    """Swallows ONNX Runtime quantization's per-tensor warnings (root logger), counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.first = 0, ""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname or record.levelno > logging.WARNING:
            return True
        self.count += 1
        self.first = self.first or record.getMessage()[:160]
        return False


@contextmanager
def ort_warnings_summarised(what: str) -> Iterator[None]:
    """ONNX Runtime's per-weight scale warnings during quantization become one summary line."""
    counter = _CountOrtWarnings()
    logging.getLogger().addFilter(counter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(counter)
        if counter.count:
            log.warning("%s: ONNX Runtime quantization gave %d warnings (first: %s)", what, counter.count,
                        counter.first)


def prepare(fp32_path: str | Path, tmp: Path) -> Path:
    """onnxruntime quant_pre_process (ONNX shape inference + graph optimisation) into tmp; the input on failure."""
    prepared = tmp / "prepared.onnx"
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        return prepared
    except Exception as exc:  # shape inference fails on some graphs; quantizing still works without it
        log.warning("quant_pre_process skipped (%s: %s)", type(exc).__name__, str(exc)[:120])
        return Path(fp32_path)


def quantize_dynamic_int8(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 (weights int8, activations quantized at run time) — for comparison only."""
    with tempfile.TemporaryDirectory(prefix="aerialseg-dyn-") as tmp, atomic_path(out_path) as out:
        quantize_dynamic(str(prepare(fp32_path, Path(tmp))), str(out), weight_type=QuantType.QInt8)
    return Path(out_path)


def quantization_record(config: QuantizeConfig) -> dict[str, Any]:
    """How the int8 model was made (stored in its metadata and in quantize.json)."""
    return {"format": "QDQ", "mode": "static", "per_channel": config.per_channel,
            "activation_type": config.activation_type, "weight_type": config.weight_type,
            "reduce_range": config.reduce_range, "calibrate_method": config.calibrate_method,
            "calibration_tiles": config.calibration_tiles, "preprocess": config.preprocess,
            "keep_fp32": list(config.keep_fp32),
            "fp32_op_types": sorted(FP32_OP_TYPES), "onnxruntime": ort.__version__}


def copy_metadata(source: str | Path, dest: str | Path, extra: dict[str, str] | None = None) -> None:
    """Copy metadata_props (e.g. Deepness keys) from the fp32 model onto the quantized one."""
    src = onnx.load(str(source), load_external_data=False)
    model = onnx.load(str(dest))
    props = {p.key: p.value for p in src.metadata_props} | dict(extra or {})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(dest))


# --- accuracy and speed -------------------------------------------------------------------------


def onnx_scores(sess: ort.InferenceSession, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                spec: ModelSpec, desc: str = "evaluate") -> tuple[dict[str, Any], list[np.ndarray]]:
    """Pixel accuracy, mIoU and boundary F1 of an ONNX model on labelled tiles; also the predictions."""
    matrix, bf1 = ConfusionMatrix(), BoundaryF1()
    preds = []
    for image, mask in tqdm(list(zip(images, masks)), desc=desc, unit="tile", leave=False):
        pred = onnx_predict(sess, image, spec)
        matrix.update(pred, mask)
        bf1.update(pred, mask)
        preds.append(pred)
    summary = matrix.summary()
    scores = {"pixel_accuracy": summary["pixel_accuracy"], "mIoU": summary["mIoU"], "bf1": bf1.summary()["bf1"],
              "iou": summary["iou"], "pixels": summary["pixels"]}
    return scores, preds


def delta_miou(fp32_sess: ort.InferenceSession, int8_sess: ort.InferenceSession, images: Sequence[np.ndarray],
               masks: Sequence[np.ndarray], spec: ModelSpec) -> dict[str, Any]:
    """mIoU of fp32 and int8 against the labels, their difference in points, and pixel agreement."""
    fp32, fp32_preds = onnx_scores(fp32_sess, images, masks, spec, "fp32")
    int8, int8_preds = onnx_scores(int8_sess, images, masks, spec, "int8")
    if fp32["mIoU"] is None or int8["mIoU"] is None:
        raise AerialsegError("validation tiles have no labelled pixels", fix="check the val split")
    agree = sum(int((a == b).sum()) for a, b in zip(fp32_preds, int8_preds))
    total = sum(a.size for a in fp32_preds)
    return {"tiles": len(images), "fp32": fp32, "int8": int8,
            "delta_miou_points": round(100.0 * (fp32["mIoU"] - int8["mIoU"]), 4),
            "prediction_agreement": round(agree / max(total, 1), 6)}


def onnx_latency_ms(path: str | Path, threads: int, runs: int = 10, warmup: int = 2) -> float:
    """Median CPU latency (ms) of one fixed-size input through an ONNX model."""
    sess = session(path, threads)
    meta = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in meta.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return round(median_ms(lambda: sess.run(None, {meta.name: x}), runs, warmup), 2)


def torch_latency_ms(model: nn.Module, size: int, in_channels: int = 3, threads: int = 0, runs: int = 10,
                     warmup: int = 2) -> float:
    """Median CPU latency (ms) of PyTorch eager fp32 on one (1, C, size, size) input."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    x = torch.randn(1, in_channels, size, size)
    model = model.eval()
    try:
        with torch.inference_mode():
            return round(median_ms(lambda: model(x), runs, warmup), 2)
    finally:
        torch.set_num_threads(previous)


def size_mb(path: str | Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 3)


# --- the stage ----------------------------------------------------------------------------------


def export_fp32(model: nn.Module, meta: dict[str, Any], dest: Path, size: int, config: QuantizeConfig) -> dict:
    """fp32 ONNX at a fixed size + the parity gate (export.check_parity); returns the parity report."""
    spec = get_spec(meta["name"])
    record = {"name": meta["name"], "classes": meta["classes"], "preprocessing": spec.preprocessing(),
              "pruned": "pruning" in meta, "tile_size": size}
    export_onnx(model, dest, size, meta["in_channels"], {"aerialseg_model": json.dumps(record)}, config.opset)
    tiles = parity_tiles(meta["in_channels"], size, list(spec.mean), list(spec.std), count=2)
    return check_parity(model, dest, tiles, config.max_abs_diff)


def quantize_model_dir(model_dir: str | Path, calibration: Sequence[np.ndarray], val_images: Sequence[np.ndarray],
                       val_masks: Sequence[np.ndarray], config: QuantizeConfig,
                       out_dir: str | Path | None = None) -> dict[str, Any]:
    """Export, quantize, gate and time one model directory; writes quantize.json and the int8 model into
    ``out_dir`` (default: the model directory).

    The ΔmIoU gate's verdict is a result, recorded in ``report["gate"]``: a passing model is written as
    model.int8.onnx (what bundles and serve may use), a failing one as model.int8.rejected.onnx (measured in
    the compression table, used by nothing) and any earlier model.int8.onnx there is removed. A failed fp32
    parity check is a broken export: AerialsegError, nothing written.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    model, meta = load_model(model_dir)
    spec = get_spec(meta["name"])
    size = int(config.tile_size or spec.tile_size)
    with tempfile.TemporaryDirectory(prefix="aerialseg-int8-") as tmp:
        fp32_path, int8_tmp = Path(tmp) / "model.fp32.onnx", Path(tmp) / INT8_NAME
        parity = export_fp32(model, meta, fp32_path, size, config)
        reader = TileCalibrationReader(calibration[: config.calibration_tiles], spec, size)
        quantize_static_int8(fp32_path, int8_tmp, reader, config)
        accuracy = delta_miou(session(fp32_path, config.threads), session(int8_tmp, config.threads),
                              val_images, val_masks, spec)
        gate = gate_verdict(accuracy, config.max_delta_miou)
        timing = latencies(model, fp32_path, int8_tmp, size, meta["in_channels"], config, Path(tmp))
        name = INT8_NAME if gate["passed"] else REJECTED_NAME
        report = {
            "model": meta["name"], "model_dir": str(model_dir), "out_dir": str(out_dir), "int8_file": name,
            "pruned": "pruning" in meta, "tile_size": size, "params": count_parameters(model),
            "weights_sha256": sha256_file(model_dir / "model.safetensors"),
            "calibration_tiles": reader.fed,
            "size_mb": {"weights_fp32": size_mb(model_dir / "model.safetensors"), "onnx_fp32": size_mb(fp32_path),
                        "onnx_int8": size_mb(int8_tmp)},
            "parity_fp32": parity, "accuracy": accuracy, "max_delta_miou": config.max_delta_miou, "gate": gate,
            "latency_ms": timing, "quantization": quantization_record(config),
        }
        with atomic_path(out_dir / name) as dest:
            os.replace(int8_tmp, dest)
    stale = out_dir / (REJECTED_NAME if gate["passed"] else INT8_NAME)
    stale.unlink(missing_ok=True)  # never leave an int8 model that this report does not describe
    write_json(out_dir / REPORT_NAME, report)
    if not gate["passed"]:
        log.warning("%s: int8 gate failed: %s; kept as %s, used by nothing", model_dir, gate["reason"], name)
    return report


def gate_verdict(accuracy: dict[str, Any], max_delta: float) -> dict[str, Any]:
    """Whether the int8 model's mIoU stays within ``max_delta`` points of fp32, and why not."""
    delta = float(accuracy["delta_miou_points"])
    passed = delta <= max_delta
    reason = None if passed else (
        f"int8 mIoU {100 * accuracy['int8']['mIoU']:.2f} is {delta:.2f} points below fp32 "
        f"{100 * accuracy['fp32']['mIoU']:.2f} (allowed {max_delta:g}) on {accuracy['tiles']} val tiles")
    return {"passed": passed, "delta_miou_points": delta, "max_delta_miou": max_delta, "reason": reason}


def latencies(model: nn.Module, fp32_path: Path, int8_path: Path, size: int, in_channels: int,
              config: QuantizeConfig, tmp: Path) -> dict[str, Any]:
    """PyTorch fp32, ONNX fp32 and ONNX int8 (and dynamic int8 on request) median ms, side by side."""
    runs, warmup, threads = config.latency_runs, config.latency_warmup, config.threads
    timing = {"threads": threads, "runs": runs, "tile": size,
              "torch_fp32": torch_latency_ms(model, size, in_channels, threads, runs, warmup),
              "onnx_fp32": onnx_latency_ms(fp32_path, threads, runs, warmup),
              "onnx_int8": onnx_latency_ms(int8_path, threads, runs, warmup)}
    if config.measure_dynamic:
        dynamic = quantize_dynamic_int8(fp32_path, tmp / "model.dynamic.onnx")
        timing["onnx_int8_dynamic"] = onnx_latency_ms(dynamic, threads, runs, warmup)
    timing["speedup_int8_vs_torch"] = round(timing["torch_fp32"] / timing["onnx_int8"], 2)
    timing["speedup_int8_vs_onnx_fp32"] = round(timing["onnx_fp32"] / timing["onnx_int8"], 2)
    return timing
