"""int8 models: ONNX Runtime static quantization (QDQ, per-channel weights), calibrated on training tiles.

Route (see ../shared/research/environment.md): export fp32 ONNX at a fixed tile size (aerialseg.compression.onnx_export),
gate its parity with PyTorch (max |logit difference|), run ``quant_pre_process`` (shape inference and graph
optimisation), calibrate activation ranges on N training tiles normalised with the model's spec, write
QDQ int8 (QUInt8 activations, QInt8 per-channel weights: the fast pair on x86 with VNNI), then gate the
int8 model on validation tiles: ΔmIoU = mIoU(fp32) - mIoU(int8) in points against the labels must stay
within ``quantize.max_delta_miou``. Dynamic int8 is measured on request only: it is slower than fp32 on
conv nets (activations are re-quantized at run time for every conv).

Outputs in the model directory: model.int8.onnx and quantize.json (sizes MB, parity, ΔmIoU, latencies).
``compression_table`` builds the paper's Table II (backbone x pruned x quantized) into reports/.
"""

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
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

from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.compression.prune import load_model_dir
from aerialseg.core.errors import AerialsegError
from aerialseg.compression.onnx_export import INPUT_NAME, check_parity, export_onnx, parity_tiles
from aerialseg.core.fileio import atomic_path, write_json, write_text
from aerialseg.evaluation.metrics import BoundaryF1, ConfusionMatrix
from aerialseg.models import ModelSpec, count_parameters, get_spec
from aerialseg.core.config import typed_section
from aerialseg.core.timing import median_ms

log = logging.getLogger(__name__)

QUANT_TYPES = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
# Entropy is left out: quantize_static cannot pass it more histogram bins than quantized bins (128/128),
# so in ONNX Runtime 1.31 it returns exactly the MinMax ranges.
CALIBRATION_METHODS = {"MinMax": CalibrationMethod.MinMax, "Percentile": CalibrationMethod.Percentile}
# Normalisation layers stay fp32: with per-channel weights ONNX Runtime 1.31 quantizes their 1-D scale on
# axis 1, which breaks GroupNorm/InstanceNorm graphs (DAS-Net) at run time and gains nothing in speed.
FP32_OP_TYPES = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
STATIC_OP_TYPES = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - FP32_OP_TYPES)
INT8_NAME = "model.int8.onnx"
REPORT_NAME = "quantize.json"


@dataclass
class QuantizeConfig:
    """Knobs of the quantize stage (params.yaml section ``quantize``)."""

    model_dir: str | None = None            # None = train.out
    out: str | None = None                  # where model.int8.onnx + quantize.json go; None = the model dir
    tile_size: int | None = None            # fixed ONNX input size; None = the model's spec.tile_size
    calibration_tiles: int = 32             # training patches used to calibrate activation ranges
    val_tiles: int | None = 64              # validation patches for the ΔmIoU gate (None = all)
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    reduce_range: bool = False              # True only for x86 CPUs without VNNI
    calibrate_method: str = "MinMax"        # MinMax | Percentile (99.999th)
    preprocess: bool = True                 # onnxruntime quant_pre_process before quantizing
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
            quantize_static(
                str(source), str(out), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OP_TYPES,
                per_channel=config.per_channel, reduce_range=config.reduce_range,
                activation_type=QUANT_TYPES[config.activation_type], weight_type=QUANT_TYPES[config.weight_type],
                calibrate_method=CALIBRATION_METHODS[config.calibrate_method])
            copy_metadata(fp32_path, out, {"aerialseg_quantization": json.dumps(quantization_record(config))})
    return int8_path


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
    """Export, quantize, gate and time one model directory; writes model.int8.onnx and quantize.json
    into ``out_dir`` (default: the model directory).

    Raises AerialsegError (and writes nothing) when fp32 parity or the ΔmIoU gate fails.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    model, meta = load_model_dir(model_dir)
    spec = get_spec(meta["name"])
    size = int(config.tile_size or spec.tile_size)
    with tempfile.TemporaryDirectory(prefix="aerialseg-int8-") as tmp:
        fp32_path, int8_tmp = Path(tmp) / "model.fp32.onnx", Path(tmp) / INT8_NAME
        parity = export_fp32(model, meta, fp32_path, size, config)
        reader = TileCalibrationReader(calibration[: config.calibration_tiles], spec, size)
        quantize_static_int8(fp32_path, int8_tmp, reader, config)
        accuracy = delta_miou(session(fp32_path, config.threads), session(int8_tmp, config.threads),
                              val_images, val_masks, spec)
        if accuracy["delta_miou_points"] > config.max_delta_miou:
            raise AerialsegError(
                f"int8 mIoU {100 * accuracy['int8']['mIoU']:.2f} is {accuracy['delta_miou_points']:.2f} points "
                f"below fp32 {100 * accuracy['fp32']['mIoU']:.2f} (allowed {config.max_delta_miou})", model_dir,
                "calibrate on more tiles (quantize.calibration_tiles), try calibrate_method Percentile, "
                "or raise quantize.max_delta_miou")
        timing = latencies(model, fp32_path, int8_tmp, size, meta["in_channels"], config, Path(tmp))
        report = {
            "model": meta["name"], "model_dir": str(model_dir), "out_dir": str(out_dir),
            "pruned": "pruning" in meta, "tile_size": size, "params": count_parameters(model),
            "calibration_tiles": reader.fed,
            "size_mb": {"weights_fp32": size_mb(model_dir / "model.safetensors"), "onnx_fp32": size_mb(fp32_path),
                        "onnx_int8": size_mb(int8_tmp)},
            "parity_fp32": parity, "accuracy": accuracy, "max_delta_miou": config.max_delta_miou,
            "latency_ms": timing, "quantization": quantization_record(config),
        }
        with atomic_path(out_dir / INT8_NAME) as dest:
            os.replace(int8_tmp, dest)
    write_json(out_dir / REPORT_NAME, report)
    return report


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


# --- compression table (paper Table II) -------------------------------------------------------


@dataclass
class TableConfig:
    """``quantize.table``: which model directories form the table and where it goes."""

    entries: list[dict[str, Any]] = field(default_factory=list)  # [{backbone, model_dir, pruned_dir}]
    val_tiles: int | None = None
    tile_size: int = 512
    out_json: str = "reports/compression.json"
    out_md: str = "reports/compression.md"


def table_rows_for(model_dir: Path, backbone: str, calibration: Sequence[np.ndarray],
                   val_images: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], config: QuantizeConfig,
                   tile: int) -> list[dict[str, Any]]:
    """Two rows (fp32, int8) for one model directory: accuracy, size, params, CPU latency."""
    model, meta = load_model_dir(model_dir)
    spec, pruned = get_spec(meta["name"]), "pruning" in meta
    base = {"backbone": backbone, "model": meta["name"], "model_dir": str(model_dir), "pruned": pruned,
            "params_m": round(count_parameters(model) / 1e6, 3)}
    runs, warmup, threads = config.latency_runs, config.latency_warmup, config.threads
    rows = []
    with tempfile.TemporaryDirectory(prefix="aerialseg-table-") as tmp:
        fp32_path = Path(tmp) / "model.fp32.onnx"
        export_fp32(model, meta, fp32_path, tile, config)
        int8_path, int8_source = model_dir / INT8_NAME, "model dir"
        if not int8_path.is_file() or onnx_input_size(session(int8_path)) != tile:
            int8_path, int8_source = Path(tmp) / INT8_NAME, f"built for the table at {tile}px"
            log.warning("%s: no %s at %d px; quantizing it for the table", model_dir, INT8_NAME, tile)
            reader = TileCalibrationReader(calibration[: config.calibration_tiles], spec, tile)
            quantize_static_int8(fp32_path, int8_path, reader, config)
        for quantized, path in ((False, fp32_path), (True, int8_path)):
            scores, _ = onnx_scores(session(path, threads), val_images, val_masks, spec,
                                    f"{backbone} {'P' if pruned else '-'}{'Q' if quantized else '-'}")
            row = {**base, "quantized": quantized, "pixel_accuracy": scores["pixel_accuracy"],
                   "mIoU": scores["mIoU"], "bf1": scores["bf1"],
                   "size_mb": size_mb(path if quantized else model_dir / "model.safetensors"),
                   "latency_ms": onnx_latency_ms(path, threads, runs, warmup), "runtime": "onnxruntime"}
            if quantized:
                row["int8_source"] = int8_source
            else:
                row["torch_latency_ms"] = torch_latency_ms(model, tile, meta["in_channels"], threads, runs, warmup)
            rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def table_markdown(rows: Sequence[dict[str, Any]], tile: int, threads: int, tiles: int,
                   skipped: Sequence[dict[str, Any]] = ()) -> str:
    """The table in the layout of the paper's Table II, what pruning cost per backbone, and the model dirs
    left out (and why)."""
    lines = [
        "# Compression: Taylor pruning (P) and int8 quantization (Q)",
        "",
        f"Validation tiles: {tiles}. Latency: median ONNX Runtime CPU ms per {tile}x{tile} tile, {threads} "
        "threads (PyTorch eager fp32 in brackets). Size: model.safetensors (fp32) or model.int8.onnx (int8).",
        "",
        "| Backbone | P | Q | Pixel acc % | mIoU % | BF1 % | Size MB | Params M | CPU ms / tile |",
        "|---|:-:|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = f"{r['latency_ms']:.1f}" + (f" ({r['torch_latency_ms']:.1f})" if "torch_latency_ms" in r else "")
        lines.append(f"| {r['backbone']} | {'x' if r['pruned'] else ''} | {'x' if r['quantized'] else ''} | "
                     f"{_pct(r['pixel_accuracy'])} | {_pct(r['mIoU'])} | {_pct(r['bf1'])} | {r['size_mb']:.2f} | "
                     f"{r['params_m']:.2f} | {latency} |")
    lines += ["", *pruning_verdict(rows),
              *(f"Not in the table: {s['backbone']} pruned (`{s['model_dir']}`): {s['reason']}." for s in skipped)]
    return "\n".join(lines).rstrip() + "\n"


PRUNING_BUDGET_POINTS = 2.0  # a pruned model may lose at most this much val mIoU (issue 13, the seed paper: 1-3)


def pruning_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One line per backbone: what pruning cost in mIoU points and bought in ONNX Runtime latency (fp32 rows)."""
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        fp32 = {r["pruned"]: r for r in rows if r["backbone"] == backbone and not r["quantized"]}
        if True not in fp32 or False not in fp32:
            continue
        full, pruned = fp32[False], fp32[True]
        delta = 100 * (pruned["mIoU"] - full["mIoU"])
        speed = pruned["latency_ms"] / full["latency_ms"]
        met = "within" if -delta <= PRUNING_BUDGET_POINTS and speed < 1 else "**outside**"
        lines.append(f"Pruning {backbone}: {delta:+.1f} mIoU points at {speed:.2f}x the ONNX Runtime latency "
                     f"({full['params_m']:.2f} M -> {pruned['params_m']:.2f} M parameters): {met} the budget of "
                     f"-{PRUNING_BUDGET_POINTS:g} points with a latency gain (docs/training.md, section 2).")
    return lines


def pruning_disabled(directory: Path) -> str | None:
    """Why a pruned_dir holds no model (prune.json of a disabled prune stage), or None."""
    marker = directory / "prune.json"
    if (directory / "model.json").is_file() or not marker.is_file():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    return None if record.get("enabled", True) else str(record.get("reason", "pruning is disabled"))


def compression_table(entries: Sequence[dict[str, Any]], calibration: Sequence[np.ndarray],
                      val_images: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], config: QuantizeConfig,
                      table: TableConfig) -> dict[str, Any]:
    """Rows backbone x pruned x quantized; writes table.out_json and table.out_md."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for entry in entries:
        pruned = Path(entry["pruned_dir"]) if entry.get("pruned_dir") else None
        reason = pruning_disabled(pruned) if pruned else None
        if reason:
            skipped.append({"backbone": str(entry.get("backbone", pruned.name)), "model_dir": str(pruned),
                            "reason": reason})
        dirs = [entry.get("model_dir"), None if reason else pruned]
        for directory in [Path(d) for d in dirs if d]:
            if not (directory / "model.json").is_file():
                raise AerialsegError("model directory not found", directory / "model.json",
                                     "train/prune it first or fix quantize.table.entries")
            rows.extend(table_rows_for(directory, str(entry.get("backbone", directory.name)), calibration,
                                       val_images, val_masks, config, table.tile_size))
    result = {"tile_size": table.tile_size, "threads": config.threads, "val_tiles": len(val_images),
              "class_names": list(CLASS_NAMES), "ignore_index": IGNORE, "out_json": table.out_json,
              "out_md": table.out_md, "rows": rows, "skipped": skipped}
    write_json(table.out_json, result)
    write_text(table.out_md, table_markdown(rows, table.tile_size, config.threads, len(val_images), skipped))
    return result
