"""Training throughput (patches/s, forward + backward + optimizer step) of a model on this CPU.

    .venv/bin/python bench/bench_train.py [--model NAME] [--batch 8] [--size 256] [--rounds 5] [--steps 2]
        [--threads 1,2] [--workers 0,1,2] [--compile/--no-compile] [--quick] [--json out.json]

Compute variants, each with its own model and AdamW optimizer, measured on the same synthetic batch:
- ``fp32``: the training loop as it is (NCHW, float32) -- the baseline every ratio refers to;
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward + loss (fast only on CPUs with
  native bf16 dot products, AVX512-BF16 or AMX; emulated elsewhere);
- ``channels_last``: model and input in NHWC memory format (oneDNN's preferred layout);
- ``channels_last+bf16``;
- ``compile``: ``torch.compile`` (inductor) of the fp32 model; its compile time is printed apart;
- ``fp32 tN``: the baseline at N torch threads (``--threads``).
Data loading: the whole loop (DataLoader -> train step) at each ``--workers`` count on the data stage's
train split with the online augmentation of params.yaml (synthetic patches when the data stage has not run).

The machine is shared, so the variants are interleaved: every round times each variant once (``--steps``
steps after one untimed step), the ratio to the baseline is taken within each round, and the table shows
medians over ``--rounds`` rounds with the min-max spread. ``--quick`` (tests): 64 px, batch 2, 2 rounds,
1 step, no compile, workers 0 and 1, synthetic data.
"""

import aerialseg  # noqa: F401  (first: offline defaults and OMP_WAIT_POLICY=PASSIVE, set before torch loads)
import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aerialseg.core.config import load_params, section
from aerialseg.core.fileio import write_json
from aerialseg.models import create_model, get_spec
from aerialseg.training.losses import build_loss
from aerialseg.data.datasets import ArrayPatchDataset
from aerialseg.training.batch import forward_logits, to_channels_last

REPO = Path(__file__).resolve().parents[1]
BASELINE = "fp32"


@dataclass(frozen=True)
class Variant:
    """One way of running the training step."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # None = the bench's --base-threads


@dataclass
class Runner:
    """A model, its optimizer and the step that trains it one batch."""

    variant: Variant
    step: Callable[[torch.Tensor, torch.Tensor], float]
    setup_s: float = 0.0  # first (untimed) step: includes torch.compile's compilation


def build_runner(model_name: str, variant: Variant, loss_cfg: dict[str, Any], seed: int = 0) -> Runner:
    """Model + AdamW for one variant; the step mirrors aerialseg.training.loop.train_step."""
    torch.manual_seed(seed)
    kwargs = {"pretrained_encoder": False} if model_name == "unet_efficientnet_lite0" else {}
    model = create_model(model_name, **kwargs).train()
    if variant.channels_last:
        to_channels_last(model)
    net = torch.compile(model) if variant.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec, loss_fn = get_spec(model_name), build_loss(loss_cfg)

    def step(images: torch.Tensor, masks: torch.Tensor) -> float:
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
            logits, aux = forward_logits(net, spec, images, train=True)
            loss = loss_fn(logits, masks)
            for aux_logits in aux:
                loss = loss + spec.aux_weight * loss_fn(aux_logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return Runner(variant, step)


def synthetic_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, S, S) and int64 masks (N, S, S) with 5 classes."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, 5, (batch, size, size), generator=gen)
    return images, masks


def timed(fn: Callable[[], Any], threads: int) -> float:
    """Seconds one call of ``fn`` takes at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_compute(runners: list[Runner], batch: tuple[torch.Tensor, torch.Tensor], rounds: int, steps: int,
                    base_threads: int) -> dict[str, list[float]]:
    """patches/s per variant and round, the variants interleaved within every round."""
    n = len(batch[1])
    for runner in runners:  # warm-up (and compilation), untimed in the rates
        runner.setup_s = timed(lambda r=runner: r.step(*batch), runner.variant.threads or base_threads)
    rates: dict[str, list[float]] = {r.variant.name: [] for r in runners}
    for _ in range(rounds):
        for runner in runners:
            seconds = timed(lambda r=runner: [r.step(*batch) for _ in range(steps)],
                            runner.variant.threads or base_threads)
            rates[runner.variant.name].append(steps * n / seconds)
    return rates


def train_dataset(size: int, synthetic: bool, count: int = 64) -> tuple[Any, str]:
    """The data stage's train split with online augmentation, or synthetic patches when absent or asked."""
    params = load_params(REPO / "params.yaml")
    from aerialseg.data.augment import build_transform

    transform = build_transform(section(params, "augment"))
    if not synthetic:
        try:
            from aerialseg.core.paths import augmented_dir, data_stage_outputs
            from aerialseg.data.datasets import PatchDataset

            manifest, split_file, augmented = (*data_stage_outputs(params), augmented_dir(params))
            manifest, split_file, augmented = REPO / manifest, REPO / split_file, REPO / augmented
            if manifest.is_file() and split_file.is_file():
                dataset = PatchDataset(manifest, split_file, "train", transform,
                                       augmented if augmented.is_dir() else None)
                return dataset, f"data stage train split ({len(dataset)} patches, online augmentation)"
        except Exception as exc:  # a half-run data stage: fall back to synthetic patches
            print(f"note: data stage outputs not usable ({exc}); using synthetic patches", file=sys.stderr)
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.integers(0, 5, (size, size), dtype=np.uint8))
             for _ in range(count)]
    return ArrayPatchDataset(pairs, transform), f"synthetic ({count} patches of {size}², online augmentation)"


def measure_loader(runner: Runner, dataset: Any, workers: list[int], batch: int, size: int, rounds: int,
                   steps: int, threads: int) -> dict[str, list[float]]:
    """patches/s of DataLoader + train step at each worker count (fresh workers every pass, as an epoch)."""
    from torch.utils.data import DataLoader

    from aerialseg.data.datasets import collate_patches

    rates: dict[str, list[float]] = {f"workers {w}": [] for w in workers}

    def one_pass(w: int) -> None:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w, collate_fn=collate_patches,
                            generator=torch.Generator().manual_seed(0))
        for i, (images, masks) in enumerate(loader):
            if i == steps:
                break
            runner.step(images[..., :size, :size], masks[..., :size, :size])

    for _ in range(rounds):
        for w in workers:
            rates[f"workers {w}"].append(steps * batch / timed(lambda w=w: one_pass(w), threads))
    return rates


def summarize(rates: dict[str, list[float]], baseline: str) -> list[dict[str, Any]]:
    """Median and spread of patches/s, and the median of the per-round ratio to ``baseline``."""
    rows = []
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates[baseline])]
        rows.append({"variant": name, "patches_per_s": round(statistics.median(values), 3),
                     "min": round(min(values), 3), "max": round(max(values), 3),
                     "ratio_vs_" + baseline.replace(" ", "_"): round(statistics.median(ratios), 3), "rounds": len(values)})
    return rows


def print_table(title: str, rows: list[dict[str, Any]], setup: dict[str, float] | None = None) -> None:
    ratio_key = next(k for k in rows[0] if k.startswith("ratio_vs_"))
    print(f"\n{title}")
    print(f"| variant | patches/s (median) | min–max | × {ratio_key[9:]} (median of per-round ratios) |"
          + (" first step s |" if setup else ""))
    print("|---|---:|---:|---:|" + ("---:|" if setup else ""))
    for r in rows:
        extra = f" {setup[r['variant']]:.1f} |" if setup else ""
        print(f"| {r['variant']} | {r['patches_per_s']:.3f} | {r['min']:.3f}–{r['max']:.3f} | "
              f"{r[ratio_key]:.2f} |{extra}")


def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide whether bf16 / int8 kernels are native."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registered model [params.yaml model.name]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--base-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--threads", default="1,2", help="thread counts tried for the fp32 baseline")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts tried")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--synthetic", action="store_true", help="synthetic patches for the loader part")
    parser.add_argument("--only", default="", help="comma-separated compute variants to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="CI size: 64 px, batch 2, 2 rounds, no compile")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.rounds, args.steps = 2, 64, 2, 1
        args.compile, args.synthetic, args.workers = False, True, "0,1"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    params = load_params(REPO / "params.yaml")
    model_name = args.model or str(section(params, "model").get("name", "unet_efficientnet_lite0"))
    loss_cfg = dict(section(params, "train").get("loss") or {})
    threads = [int(t) for t in str(args.threads).split(",") if t]
    variants = [Variant(BASELINE), Variant("bf16", bf16=True), Variant("channels_last", channels_last=True),
                Variant("channels_last+bf16", bf16=True, channels_last=True)]
    variants += [Variant(f"fp32 t{t}", threads=t) for t in threads if t != args.base_threads]
    if args.compile:
        variants.append(Variant("compile", compile=True))
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    variants = [v for v in variants if not only or v.name in only or v.name == BASELINE]
    print(f"model {model_name}, batch {args.batch} x {args.size}², {args.rounds} rounds x {args.steps} steps, "
          f"{args.base_threads} threads (torch default {torch.get_num_threads()}), OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}, CPU flags {cpu_flags()}")
    runners = [build_runner(model_name, v, loss_cfg) for v in variants]
    compute = measure_compute(runners, synthetic_batch(args.batch, args.size), args.rounds, args.steps,
                              args.base_threads)
    setup = {r.variant.name: r.setup_s for r in runners}
    compute_rows = summarize(compute, BASELINE)
    print_table("Compute (synthetic batch; ratio to fp32 NCHW)", compute_rows, setup)

    workers = [int(w) for w in str(args.workers).split(",") if w]
    dataset, source = train_dataset(args.size, args.synthetic)
    loader = measure_loader(runners[0], dataset, workers, args.batch, args.size, args.rounds,
                            max(args.steps, 2), args.base_threads)
    loader_rows = summarize(loader, f"workers {workers[0]}")
    print_table(f"DataLoader + fp32 step ({source}; ratio to {workers[0]} workers)", loader_rows)
    result = {"model": model_name, "batch": args.batch, "size": args.size, "rounds": args.rounds, "steps": args.steps,
              "base_threads": args.base_threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "torch": torch.__version__, "cpu_flags": cpu_flags(),
              "variants": [asdict(v) for v in variants], "compute": compute_rows,
              "first_step_s": {k: round(v, 2) for k, v in setup.items()}, "loader": loader_rows,
              "loader_data": source}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
