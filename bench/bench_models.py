"""Benchmark every registered model: size, FLOPs, CPU latency (PyTorch fp32, ONNX fp32, ONNX int8), GPU FPS.

    .venv/bin/python bench/bench_models.py [--models a,b] [--model-dir models/run ...] [--threads 2]
        [--tile 512] [--runs 10] [--warmup 3] [--dynamic] [--quick] [--out reports/bench_models.json]

Per model, side by side in one run:
- parameters (all, as count_parameters) and FLOPs of one forward pass at tile x tile (batch 1), counted by
  torch.utils.flop_counter.FlopCounterMode: FLOPs = 2 x multiply-accumulates (conv and matmul);
- CPU latency, median of ``--runs`` after ``--warmup``, one tile, ``--threads`` threads for both PyTorch
  (eager, inference_mode) and ONNX Runtime (intra-op threads, all graph optimisations): PyTorch fp32, ONNX
  fp32 (aerialseg.compression.onnx_export at a fixed tile size), ONNX int8 (static QDQ, per-channel, aerialseg.compression.quantize;
  calibrated on the data stage's train tiles with ``--model-dir``, else on smooth random tiles), and with
  ``--dynamic`` dynamic int8 too (slower than fp32 on conv nets);
- int8 speed-up over PyTorch fp32 (goal >= 2.5x) and, with ``--model-dir`` (trained models), the ΔmIoU
  of int8 against fp32 on the data stage's validation tiles (goal <= 1 point);
- GPU FPS (CUDA, fp32, batch 1, tile x tile) when CUDA is available, else "no GPU".
``--quick`` (tests): 128 px tiles, 2 runs, 2 warmup, 2 calibration tiles.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import aerialseg  # noqa: F401  (offline defaults and the torchvision fix come first)
from aerialseg.compression.prune import load_model_dir
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.models import count_parameters, create_model, get_spec, list_models
from aerialseg.compression.quantize import (
    INT8_NAME,
    QuantizeConfig,
    TileCalibrationReader,
    delta_miou,
    export_fp32,
    onnx_latency_ms,
    quantize_dynamic_int8,
    quantize_static_int8,
    session,
    size_mb,
    torch_latency_ms,
)

from aerialseg.stages.quantize import split_tiles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("pspnet_resnet18", "deeplabv3plus_resnet18", "unet_efficientnet_lite0", "lwirstnet", "dasnet")
log = logging.getLogger("bench_models")


def smooth_tiles(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 (size, size, 3) tiles of smooth random texture (calibration stand-in for untrained models)."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, max(size // 16, 2), max(size // 16, 2)), dtype=np.float32))
        fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        noise = rng.normal(0, 0.03, (size, size, 3))
        tiles.append(np.clip((fine[0].permute(1, 2, 0).numpy() + noise) * 255, 0, 255).astype(np.uint8))
    return tiles


def count_flops(model: torch.nn.Module, size: int, in_channels: int = 3) -> int:
    """FLOPs (2 x MACs) of one eval-mode forward pass at (1, C, size, size)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(torch.randn(1, in_channels, size, size))
    return int(counter.get_total_flops())


def gpu_fps(model: torch.nn.Module, size: int, in_channels: int, runs: int, warmup: int) -> float | None:
    """Frames per second on CUDA (fp32, batch 1); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    net = model.to(device).eval()
    x = torch.randn(1, in_channels, size, size, device=device)
    with torch.inference_mode():
        for _ in range(warmup):
            net(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            net(x)
        torch.cuda.synchronize()
    model.cpu()
    return round(runs / (time.perf_counter() - start), 1)


def load_target(target: str) -> tuple[torch.nn.Module, dict[str, Any], str | None]:
    """A registered name (random init) or a trained model directory."""
    path = Path(target)
    if (path / "model.json").is_file():
        model, meta = load_model_dir(path)
        return model, meta, str(path)
    torch.manual_seed(0)
    model = create_model(target)
    return model.eval(), {"name": target, "classes": 5, "in_channels": 3}, None


def bench_one(target: str, args: argparse.Namespace, data: dict[str, Any] | None) -> dict[str, Any]:
    """All figures for one model (see the module docstring)."""
    model, meta, model_dir = load_target(target)
    spec, size, in_ch = get_spec(meta["name"]), args.tile, meta["in_channels"]
    config = QuantizeConfig(tile_size=size, calibration_tiles=args.calibration_tiles, threads=args.threads,
                            latency_runs=args.runs, latency_warmup=args.warmup, max_abs_diff=args.max_abs_diff)
    label = f"{meta['name']} ({Path(model_dir).name})" if model_dir else meta["name"]
    row: dict[str, Any] = {"model": meta["name"], "label": label, "model_dir": model_dir,
                           "pruned": "pruning" in meta, "tile": size, "threads": args.threads,
                           "runs": args.runs, "params_m": round(count_parameters(model) / 1e6, 3),
                           "gflops": round(count_flops(model, size, in_ch) / 1e9, 2)}
    row["torch_fp32_ms"] = torch_latency_ms(model, size, in_ch, args.threads, args.runs, args.warmup)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        fp32, int8 = Path(tmp) / "model.fp32.onnx", Path(tmp) / INT8_NAME
        row["parity_max_abs"] = export_fp32(model, meta, fp32, size, config)["max_abs_diff"]
        calibration = data["train"] if data else smooth_tiles(args.calibration_tiles, min(size, 256))
        row["calibration"] = "train tiles" if data else "smooth random tiles"
        quantize_static_int8(fp32, int8, TileCalibrationReader(calibration[: args.calibration_tiles], spec, size),
                             config)
        row["onnx_fp32_ms"] = onnx_latency_ms(fp32, args.threads, args.runs, args.warmup)
        row["onnx_int8_ms"] = onnx_latency_ms(int8, args.threads, args.runs, args.warmup)
        if args.dynamic:
            row["onnx_int8_dynamic_ms"] = onnx_latency_ms(quantize_dynamic_int8(fp32, Path(tmp) / "dyn.onnx"),
                                                          args.threads, args.runs, args.warmup)
        row["onnx_fp32_mb"], row["onnx_int8_mb"] = size_mb(fp32), size_mb(int8)
        if data and model_dir:
            acc = delta_miou(session(fp32, args.threads), session(int8, args.threads), data["val_images"],
                             data["val_masks"], spec)
            row.update(miou_fp32=acc["fp32"]["mIoU"], miou_int8=acc["int8"]["mIoU"],
                       delta_miou_points=acc["delta_miou_points"], val_tiles=acc["tiles"])
    row["speedup_int8_vs_torch"] = round(row["torch_fp32_ms"] / row["onnx_int8_ms"], 2)
    row["speedup_onnx_fp32_vs_torch"] = round(row["torch_fp32_ms"] / row["onnx_fp32_ms"], 2)
    row["gpu_fps"] = gpu_fps(model, size, in_ch, args.runs, args.warmup)
    return row


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of the rows (printed and stored beside the JSON)."""
    head = ("model", "params M", "GFLOPs", "torch ms", "onnx ms", "int8 ms", "dyn8 ms", "int8 x", "ΔmIoU pt",
            "GPU fps")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']} | error: {r['error']}")
            continue
        lines.append(" | ".join([r["label"], _fmt(r["params_m"], 2), _fmt(r["gflops"], 2), _fmt(r["torch_fp32_ms"]),
                                 _fmt(r["onnx_fp32_ms"]), _fmt(r["onnx_int8_ms"]), _fmt(r.get("onnx_int8_dynamic_ms")),
                                 _fmt(r["speedup_int8_vs_torch"], 2), _fmt(r.get("delta_miou_points"), 2),
                                 _fmt(r["gpu_fps"]) if r["gpu_fps"] is not None else "no GPU"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated registered names (default: the light models present)")
    parser.add_argument("--model-dir", action="append", default=[], help="trained model dir (repeatable)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml for the data stage paths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-tiles", type=int, default=16)
    parser.add_argument("--val-tiles", type=int, default=64)
    parser.add_argument("--max-abs-diff", type=float, default=1e-3)
    parser.add_argument("--dynamic", action="store_true", help="also time dynamic int8")
    parser.add_argument("--quick", action="store_true", help="128 px, 2 runs, 2 warmup, 2 calibration tiles")
    parser.add_argument("--out", default=str(REPO / "reports" / "bench_models.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tile, args.runs, args.warmup, args.calibration_tiles = 128, 2, 2, 2
    return args


def targets(args: argparse.Namespace) -> list[str]:
    """Registered names (filtered) followed by trained model directories."""
    known = list_models()
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in known]
        if unknown:
            raise AerialsegError(f"unknown model(s) {', '.join(unknown)}", fix=f"use: {', '.join(known)}")
    elif args.model_dir:
        names = []
    else:
        names = [m for m in DEFAULT_MODELS if m in known]
    return names + list(args.model_dir)


def load_data(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train (calibration) and val tiles of the data stage, for trained model directories only."""
    if not args.model_dir:
        return None
    from aerialseg.core.config import load_params

    params = load_params(args.params)
    train, _ = split_tiles(params, "train", args.calibration_tiles)
    val_images, val_masks = split_tiles(params, "val", args.val_tiles)
    return {"train": train, "val_images": val_images, "val_masks": val_masks}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args)
    rows = []
    for target in targets(args):
        start = time.perf_counter()
        try:
            rows.append(bench_one(target, args, data if Path(target).is_dir() else None))
        except Exception as exc:  # one model failing (export, ORT kernel) must not hide the others' figures
            rows.append({"model": target, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(f"{target}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    result = {"tile": args.tile, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
              "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "flops_convention": "FLOPs = 2 x MACs (torch.utils.flop_counter)", "rows": rows}
    write_json(args.out, result)
    print(table(rows))
    if not torch.cuda.is_available():
        print("no GPU: GPU FPS skipped")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except AerialsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
