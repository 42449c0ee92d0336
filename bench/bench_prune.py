"""Does Taylor filter pruning make the model faster where it runs? ONNX Runtime latency vs pruning ratio.

    .venv/bin/python bench/bench_prune.py [--model NAME] [--model-dir models/default] [--ratios 0.1,0.2,0.34,0.5]
        [--round-to 8,16] [--tile 512] [--threads 1] [--rounds 5] [--runs 3] [--quick] [--json out.json]
    .venv/bin/python bench/bench_prune.py --dirs models/default,models/pruned [--tile 512] [--threads 1]

For every (total ratio, round_to) the model is pruned structurally the way ``aerialseg prune`` does
(aerialseg.compression.prune.prune_model, local scope, Taylor scores over a few batches; ``iterations``
rounds of ``1 - (1 - total)^(1/iterations)``), exported to fp32 ONNX at ``--tile``, and timed with ONNX
Runtime (``--threads`` intra-op threads). Latency does not depend on what the weights hold, so the
pruned weights are not fine-tuned here; accuracy is measured by ``aerialseg prune`` + ``compression-table``.
The models are timed interleaved (each round times every model once, ``--runs`` runs, median) and the
table shows the median over rounds of the per-round ratio to the unpruned model. ``--dirs`` times saved
model dirs (plain or pruned, e.g. the outputs of ``aerialseg train`` and ``aerialseg prune``) instead, the
first one being the baseline.
"""

import aerialseg  # noqa: F401  (first: offline defaults and OMP_WAIT_POLICY=PASSIVE, set before torch loads)
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aerialseg.compression.onnx_export import export_onnx
from aerialseg.compression.prune import PruneConfig, load_model_dir, prune_model
from aerialseg.compression.quantize import session
from aerialseg.core.fileio import write_json
from aerialseg.models import count_parameters, create_model, get_spec


def score_batches(spec: Any, count: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Smooth random images with a class mask that depends on them (a loss with real gradients)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.rand(2, 5, size // 16, size // 16, generator=gen)
        field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        images = (field[:, :3] * 255).to(torch.uint8)
        out.append((spec.normalize(images), field.argmax(1)))
    return out


def pruned_copy(model_name: str, model_dir: Path | None, total: float, round_to: int | None, iterations: int,
                size: int) -> torch.nn.Module:
    """A fresh (or loaded) model pruned by ``total`` of its channels in ``iterations`` Taylor rounds."""
    torch.manual_seed(0)
    model = load_model_dir(model_dir)[0] if model_dir else create_model(model_name)
    if total <= 0:
        return model.eval()
    per_round = 1.0 - (1.0 - total) ** (1.0 / iterations)
    config = PruneConfig(iterations=iterations, ratio_per_iteration=per_round, score_batches=2, round_to=round_to,
                         example_size=64)
    model, _ = prune_model(model, score_batches(get_spec(model_name), 2, 64), config)
    return model.eval()


def time_once(sess: Any, x: np.ndarray, runs: int) -> float:
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet_efficientnet_lite0")
    parser.add_argument("--model-dir", type=Path, default=None, help="trained model dir (else registry init)")
    parser.add_argument("--ratios", default="0.1,0.2,0.34,0.5", help="total share of channels removed")
    parser.add_argument("--round-to", default="8,16", help="channel multiples tried (0 = none)")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CI size: 128 px, 1 ratio, 2 rounds")
    parser.add_argument("--dirs", default="", help="comma-separated model dirs to time (first = baseline)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tile, args.ratios, args.round_to, args.rounds, args.runs, args.iterations = 128, "0.34", "8", 2, 1, 2
    ratios = [float(r) for r in args.ratios.split(",") if r]
    round_tos = [int(r) or None for r in args.round_to.split(",") if r]
    dirs = [Path(d) for d in args.dirs.split(",") if d]
    variants = [("unpruned", 0.0, None)] + [(f"-{r:.0%} r{t or 1}", r, t) for r in ratios for t in round_tos]
    if dirs:
        variants = [(str(d), 0.0, None) for d in dirs]
    x = np.random.default_rng(0).standard_normal((1, 3, args.tile, args.tile)).astype(np.float32)
    sessions, params = {}, {}
    with tempfile.TemporaryDirectory(prefix="aerialseg-bench-prune-") as tmp:
        for name, total, round_to in variants:
            if dirs:
                model = load_model_dir(name)[0].eval()
            else:
                model = pruned_copy(args.model, args.model_dir, total, round_to, args.iterations, args.tile)
            params[name] = count_parameters(model)
            path = Path(tmp) / f"{len(sessions)}.onnx"
            export_onnx(model, path, args.tile, 3)
            sessions[name] = session(path, args.threads)
            sessions[name].run(None, {sessions[name].get_inputs()[0].name: x})  # warm-up
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for _ in range(args.rounds):
            for name, _, _ in variants:
                times[name].append(time_once(sessions[name], x, args.runs))
    rows = []
    for name, total, round_to in variants:
        ratios_to_base = [t / b for t, b in zip(times[name], times[variants[0][0]])]
        rows.append({"variant": name, "removed": total, "round_to": round_to, "params_m": round(params[name] / 1e6, 3),
                     "onnx_ms": round(statistics.median(times[name]), 2),
                     "latency_vs_unpruned": round(statistics.median(ratios_to_base), 3)})
    print(f"{args.model}{' from ' + str(args.model_dir) if args.model_dir else ''}: ONNX Runtime fp32, "
          f"{args.tile}² batch 1, {args.threads} thread(s), {args.rounds} interleaved rounds x {args.runs} runs")
    print("| variant | params M | ONNX ms (median) | latency / unpruned (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['params_m']:.2f} | {r['onnx_ms']:.1f} | {r['latency_vs_unpruned']:.3f} |")
    result = {"model": args.model, "tile": args.tile, "threads": args.threads, "rounds": args.rounds, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
