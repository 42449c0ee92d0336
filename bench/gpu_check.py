"""Helpers of bench/gpu_check.sh: the merged params file, the speed figures and the summary.

    python bench/gpu_check.py params --out params.yaml [--profile profiles/gpu.yaml] [--tiny] [--oem DIR]
    python bench/gpu_check.py speed [--tiny] [--models a,b,c] [--size 512] [--json speed.json]
    python bench/gpu_check.py summary WORKDIR [--speed speed.json]

``params``: params.yaml with profile overlays merged in order by ``aerialseg.core.config.merge_profile`` (what
``aerialseg apply-profile`` does: mappings merge key by key, anything else replaces), then the short-run settings
(``SHORT``), then with ``--tiny`` the CPU settings (``TINY``) that keep the whole check under a minute on
two cores. ``speed``: training images/s of the teacher (synthetic batch, AMP on CUDA) and inference FPS
at size x size, batch 1, fp32 and fp16 (fp16 on CUDA only) for the default model, DAS-Net and SegFormer-B0.
``summary``: the val mIoU of each model the short run trained, from its train_summary.json, and the seconds
`aerialseg adapt --method all` took on the teacher (models/adapted/bundle.json).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FPS_MODELS = ("unet_efficientnet_lite0", "dasnet", "segformer_b0")

# A short version of the recipe (<= 8 min on one GPU, OpenEarthMap included when given).
SHORT: dict[str, Any] = {
    "pretrain": {"crops_per_image": 2, "train": {"epochs": 2}},
    "train": {"epochs": 6, "patience": 0},
    "distil": {"train": {"epochs": 6}},
    "adapt": {"onnx": False},  # the adapted teacher is timed, not exported
}
# CPU, CI-size: one small scene, 64 px patches (32 px training crops), one epoch each.
TINY: dict[str, Any] = {
    "data": {"labels": "data/sample/labels-tiny"},
    "tiles": {"size": 64, "overlap": 0},
    "split": {"block_px": 256, "fractions": [0.4, 0.3, 0.3]},
    "augment": {"copies": 0},
    "pretrain": {"patch_size": 64, "resample_factor": 0.25, "crops_per_image": 4, "train": {"epochs": 1, "batch_size": 4}},
    "train": {"epochs": 1, "batch_size": 8, "patch_size": 32, "warmup_epochs": 0, "num_workers": 0, "threads": 1},
    "distil": {"train": {"epochs": 1}},
    "adapt": {"windows": 4, "window": 64, "batch": 2, "tent_steps": 1, "self_rounds": 1, "self_steps": 1},
}


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        sys.exit(f"error: {path}: top level must be a mapping — fix: write `section: {{key: value}}` entries")
    return data


def build_params(profiles: list[Path], tiny: bool, oem: str | None, base: Path = REPO / "params.yaml") -> dict:
    """params.yaml + profiles + the short-run settings (+ the tiny CPU settings)."""
    from aerialseg.core.config import merge_profile

    params = read_yaml(base)
    for profile in profiles:
        params = merge_profile(params, read_yaml(profile))
    params = merge_profile(params, SHORT)
    if tiny:
        params = merge_profile(params, TINY)
    if oem:
        params = merge_profile(params, {"pretrain": {"enabled": True, "root": str(Path(oem).resolve())}})
    return params


def train_images_per_s(name: str, batch: int, size: int, device: Any, amp: bool, steps: int) -> float:
    """Images/s of forward + backward + AdamW step on a synthetic batch (AMP float16 on CUDA)."""
    import torch

    from aerialseg.models import create_model, get_spec
    from aerialseg.training.losses import build_loss
    from aerialseg.training.batch import autocast, forward_logits

    model = create_model(name).to(device).train()
    spec, loss_fn = get_spec(name), build_loss({"name": "ce"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 5, (batch, size, size), device=device)

    def step() -> None:
        with autocast(device, amp):
            logits, _ = forward_logits(model, spec, images, train=True)
            loss = loss_fn(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_fps(name: str, size: int, device: Any, half: bool, runs: int, warmup: int) -> float:
    """Frames/s of one size x size tile, batch 1 (median of ``runs`` timed passes)."""
    import torch

    from aerialseg.models import create_model

    model = create_model(name).to(device).eval()
    x = torch.randn(1, 3, size, size, device=device)
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=half):
        for i in range(warmup + runs):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def speed(models: list[str], teacher: str, size: int, batch: int, runs: int, warmup: int,
          steps: int) -> dict[str, Any]:
    """Training images/s of the teacher and inference FPS of each model, fp32 and (CUDA) fp16."""
    import aerialseg  # noqa: F401  (first: offline defaults, OMP_WAIT_POLICY before torch loads)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "size": size, "train": {}, "fps": {}}
    torch.manual_seed(0)
    result["train"] = {"model": teacher, "batch": batch, "amp": device.type == "cuda",
                       "images_per_s": round(train_images_per_s(teacher, batch, size, device, True, steps), 2)}
    for name in models:
        result["fps"][name] = {"fp32": _fps_or_error(name, size, device, False, runs, warmup),
                               "fp16": _fps_or_error(name, size, device, True, runs, warmup)
                               if device.type == "cuda" else None}
    return result


def _fps_or_error(name: str, size: int, device: Any, half: bool, runs: int, warmup: int) -> float | str:
    """FPS rounded, or the error in one line: one model failing must not hide the other figures."""
    try:
        return round(inference_fps(name, size, device, half, runs, warmup), 2)
    except Exception as exc:  # e.g. a kernel without float16 support on this GPU
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def print_speed(result: dict[str, Any]) -> None:
    t = result["train"]
    print(f"training: {t['model']} {t['batch']} x {result['size']}² on {result['device']} "
          f"(AMP {'on' if t['amp'] else 'off'}): {t['images_per_s']:.2f} images/s")
    print(f"\n| model | FPS {result['size']}² bs 1 fp32 | fp16 |")
    print("|---|---:|---:|")
    def cell(value: float | str | None) -> str:
        return "n/a (no CUDA)" if value is None else value if isinstance(value, str) else f"{value:.2f}"

    for name, fps in result["fps"].items():
        print(f"| {name} | {cell(fps['fp32'])} | {cell(fps['fp16'])} |")


def summary(workdir: Path) -> dict[str, Any]:
    """val mIoU and time of each run of the short recipe (pretrain, teacher, student)."""
    runs = {"pretrain (OpenEarthMap)": workdir / "models/pretrained", "teacher": workdir / "models/default",
            "student (distilled)": workdir / "models/student"}
    rows: dict[str, Any] = {}
    for label, run in runs.items():
        path = run / "train_summary.json"
        if path.is_file():
            s = json.loads(path.read_text(encoding="utf-8"))
            rows[label] = {"model": s["model"], "val_mIoU": s["best_val_mIoU"], "epochs": s["epochs_run"],
                           "seconds": s["seconds"], "train_patches": s["train_patches"],
                           "images_per_s_run": round(s["train_patches"] * s["epochs_run"] / max(s["seconds"], 1e-9), 2),
                           "parameters": s["parameters"]}
        else:
            rows[label] = None
    adapted = workdir / "models/adapted/bundle.json"
    if adapted.is_file():
        record = json.loads(adapted.read_text(encoding="utf-8"))["adapted"]
        rows["adapted (adapt --method all)"] = {"method": record["method"], "windows": record["windows"],
                                                "seconds": record["seconds"],
                                                "steps": {k: v["seconds"] for k, v in record["steps"].items()}}
    return rows


def print_summary(rows: dict[str, Any]) -> None:
    print("\n| run | model | params M | epochs | train patches | s | images/s (run, incl. val) | val mIoU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        if r is not None and "method" in r:
            print(f"\n{label}: {r['windows']} windows, {r['seconds']:.1f} s ({r['steps']})")
            continue
        if r is None:
            print(f"| {label} | not run | | | | | | |")
            continue
        print(f"| {label} | {r['model']} | {r['parameters'] / 1e6:.2f} | {r['epochs']} | {r['train_patches']} | "
              f"{r['seconds']:.1f} | {r['images_per_s_run']:.2f} | {r['val_mIoU']:.4f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile", type=Path, action="append", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--oem", default=None)
    s = sub.add_parser("speed")
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--models", default=",".join(FPS_MODELS))
    s.add_argument("--teacher", default="upernet_convnext_tiny")
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--json", type=Path, default=None)
    r = sub.add_parser("summary")
    r.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "params":
        profiles = args.profile or [REPO / "profiles/gpu.yaml"]
        params = build_params(profiles, args.tiny, args.oem)
        args.out.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        print(f"wrote {args.out} (params.yaml + {', '.join(str(p) for p in profiles)} + short run"
              f"{' + tiny CPU' if args.tiny else ''})")
    elif args.command == "speed":
        size, batch, runs, warmup, steps = (128, 2, 2, 1, 1) if args.tiny else (args.size, 16, 20, 5, 10)
        if args.tiny:
            import aerialseg  # noqa: F401  (first: offline defaults, OMP_WAIT_POLICY before torch loads)
            import torch

            torch.set_num_threads(1)
        result = speed([m for m in args.models.split(",") if m], args.teacher, size, batch, runs, warmup, steps)
        print_speed(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    else:
        rows = summary(args.workdir)
        print_summary(rows)
        (args.workdir / "gpu_check.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
