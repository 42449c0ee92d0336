"""Static int8 calibration sweep over several trained models (issue 28): which quantize settings keep
ΔmIoU <= 1 point on every seed, and at what int8 speed.

    python bench/bench_int8_seeds.py models/int8_seeds/s0 models/int8_seeds/s1 ... [--params params.yaml]

Each model is exported to fp32 ONNX once; every variant below quantizes that same file (ONNX Runtime QDQ,
calibrated on train patches) and is scored against fp32 on the val patches, as the quantize stage's gate
does. Prints one row per (model, variant) and a summary per variant (worst and mean Δ, passes, int8 ms),
and writes the whole result as JSON (--out).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from aerialseg.compression.quantize import (QuantizeConfig, TileCalibrationReader, export_fp32, onnx_latency_ms,
                                            onnx_scores, quantize_static_int8, session)
from aerialseg.compression.prune import load_model_dir
from aerialseg.core.config import load_params, section
from aerialseg.models import get_spec
from aerialseg.stages.quantize import split_tiles

VARIANTS = {  # name -> overrides of the quantize section
    "minmax_32": {},
    "minmax_128": {"calibration_tiles": 128},
    "percentile_32": {"calibrate_method": "Percentile"},
    "entropy_32": {"calibrate_method": "Entropy"},
    "minmax_32_fp32_ends": {"keep_fp32": ["first_conv", "last_conv"]},
    "percentile_128_fp32_ends": {"calibrate_method": "Percentile", "calibration_tiles": 128,
                                 "keep_fp32": ["first_conv", "last_conv"]},
    "minmax_32_per_tensor": {"per_channel": False},
    "minmax_32_no_preprocess": {"preprocess": False},
}


def sweep_model(model_dir: Path, base: QuantizeConfig, params: dict, variants: list[str]) -> list[dict]:
    """Every variant on one model: ΔmIoU points against fp32 on the val patches, int8 latency."""
    model, meta = load_model_dir(model_dir)
    spec = get_spec(meta["name"])
    size = int(base.tile_size or spec.tile_size)
    most = max(replace(base, **VARIANTS[v]).calibration_tiles for v in variants)
    calibration, _ = split_tiles(params, "train", most)
    val_images, val_masks = split_tiles(params, "val", base.val_tiles)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        export_fp32(model, meta, fp32, size, base)
        fp32_scores, fp32_preds = onnx_scores(session(fp32, base.threads), val_images, val_masks, spec, "fp32")
        fp32_ms = onnx_latency_ms(fp32, base.threads, 10, 2)
        for name in variants:
            config = replace(base, **VARIANTS[name])
            int8 = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            quantize_static_int8(fp32, int8, TileCalibrationReader(calibration[: config.calibration_tiles], spec,
                                                                   size), config)
            seconds = time.perf_counter() - start
            int8_scores, int8_preds = onnx_scores(session(int8, base.threads), val_images, val_masks, spec, "int8")
            agree = sum(int((a == b).sum()) for a, b in zip(fp32_preds, int8_preds)) / sum(a.size for a in fp32_preds)
            row = {"model": str(model_dir), "variant": name,
                   "delta_miou_points": round(100 * (fp32_scores["mIoU"] - int8_scores["mIoU"]), 4),
                   "fp32_mIoU": fp32_scores["mIoU"], "int8_mIoU": int8_scores["mIoU"], "agreement": round(agree, 6),
                   "val_tiles": len(val_images), "quantize_s": round(seconds, 1),
                   "int8_ms": onnx_latency_ms(int8, base.threads, 10, 2), "fp32_ms": fp32_ms}
            print(f"{model_dir.name:>10} {name:<26} Δ {row['delta_miou_points']:6.2f} points  int8 "
                  f"{row['int8_ms']:6.1f} ms  fp32 {row['fp32_ms']:6.1f} ms", flush=True)
            rows.append(row)
    return rows


def summary(rows: list[dict], max_delta: float) -> list[dict]:
    """Per variant: worst and mean Δ over the models, how many pass the gate, median int8/fp32 latency."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        deltas = [r["delta_miou_points"] for r in mine]
        out.append({"variant": name, "models": len(mine), "worst_delta": max(deltas),
                    "mean_delta": round(statistics.mean(deltas), 3),
                    "passed": sum(d <= max_delta for d in deltas),
                    "int8_over_fp32_latency": round(statistics.median(r["int8_ms"] / r["fp32_ms"] for r in mine), 3)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="trained model dirs (model.json + weights)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_int8_seeds.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    base = QuantizeConfig.from_params(section(params, "quantize"))
    variants = [v for v in args.variants.split(",") if v]
    rows = [row for model_dir in args.models for row in sweep_model(model_dir, base, params, variants)]
    table = summary(rows, base.max_delta_miou)
    print("\n| variant | models | worst Δ | mean Δ | pass ≤ {:g} | int8 / fp32 latency |".format(base.max_delta_miou))
    print("|---|---:|---:|---:|---:|---:|")
    for s in table:
        print(f"| {s['variant']} | {s['models']} | {s['worst_delta']:.2f} | {s['mean_delta']:.2f} | "
              f"{s['passed']}/{s['models']} | {s['int8_over_fp32_latency']:.2f} |")
    args.out.write_text(json.dumps({"rows": rows, "summary": table}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
