"""Benchmark infer-survey on local Dask clusters: throughput with 1 and 2 workers, Dask's overhead per task
as a share of the model's forward time, peak memory per worker, and the cost of splitting a scene into blocks.

    .venv/bin/python bench/bench_survey.py [--size 4096] [--scenes 4] [--workers 1,2] [--model NAME]
                                           [--block-rows 2048]

Scenes: ``--scenes`` square GeoTIFFs of ``--size`` px cut from the embedded sample's real pixels (tiled,
deflate, EPSG:32640, 0.5 m, side by side). Model: ``--model`` (default unet_efficientnet_lite0) with random
weights, bundled with ONNX (speed does not depend on the weights); backend ONNX Runtime on the CPU.

For each worker count a fresh ``LocalCluster(processes=True, threads_per_worker=1)`` maps every scene (one
task each) into a fresh folder. Printed per run:
- Mpx/s: scene pixels / the wall time of the mapping phase (submit to last result);
- task s, forward s: a task's wall time on its worker (hashing the scene, mapping, hashing the outputs) and the
  time spent inside the model's forward (both means over the tasks);
- dask overhead per task: (workers x (first submit to last result) - sum of task times) / tasks, i.e.
  scheduling, transfer, the client's manifest writes and idle slots, as a share of the forward time (goal
  <= 2 % on 4096^2 scenes). Idle tails (fewer tasks left than workers) count here too: use scenes = a
  multiple of the workers. The run's fixed costs (connecting, registering the model plugin, building the
  VRT) are in "map s" but not here;
- in-task other / fwd: (task s - forward s - model load s) / forward s, what a task does besides the model
  (reading, blending, writing the COG, hashing the scene and outputs): infer-scene's own work, not Dask's (the
  model load, once per worker on its first task, is left out: a fixed cost per worker, not per task);
- peak RSS per worker: VmHWM of each worker process (fresh per run).

Blocks (``--block-rows``, 0 = skip): the first scene mapped on a fresh 1-worker cluster with ``survey.block_rows``
= 0 (one task) and = ``--block-rows`` (bands + the task that assembles them); printed: tiles predicted, forward
and map seconds of each, their ratios, and whether the two maps are the same bytes.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "scenes"


def make_scenes(work: Path, size: int, count: int) -> list[Path]:
    """``count`` size x size scenes tiled from the sample's pixels (each from another sample scene)."""
    sources = sorted(SAMPLE.glob("*.tif"))
    scenes = []
    for i in range(count):
        dest = work / f"scene_{size}_{i}.tif"
        scenes.append(dest)
        if dest.is_file():
            continue
        with rasterio.open(sources[i % len(sources)]) as src:
            pixels = src.read([1, 2, 3])
        reps = (1, -(-size // pixels.shape[1]), -(-size // pixels.shape[2]))
        data = np.tile(pixels, reps)[:, :size, :size]
        transform = Affine(0.5, 0, 330000.0 + i * size * 0.5, 0, -0.5, 2790000.0)
        with rasterio.open(dest, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:32640", transform=transform, tiled=True, blockxsize=512, blockysize=512,
                           compress="deflate") as dst:
            dst.write(data)
    return scenes


def make_bundle(work: Path, model: str) -> Path:
    """A random-init bundle of a registered model, with model.onnx."""
    from aerialseg.models import create_model, save_model
    from aerialseg.stages.bundle import build_bundle

    bundle = work / f"bundle_{model}"
    if not (bundle / "bundle.json").is_file():
        import torch

        torch.manual_seed(0)
        trained = save_model(create_model(model), work / f"trained_{model}", model)
        build_bundle(trained, bundle, overlap=64, gsd_m=0.5, onnx=True)
    return bundle


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def survey(scenes: list[Path], bundle: Path, workers: int, work: Path,
           block_rows: int = 0) -> tuple[dict, list, dict, Path]:
    """Map the scenes on a fresh local cluster of ``workers`` single-thread worker processes; returns
    (summary, done records, {worker: peak RSS MB}, out folder)."""
    from distributed import Client, LocalCluster

    from aerialseg.inference.scene import InferOptions
    from aerialseg.inference.survey import SurveyOptions, run_survey

    out = Path(tempfile.mkdtemp(prefix=f"survey_w{workers}_b{block_rows}_", dir=work))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        options = InferOptions(backend="onnx", device="cpu", preview=False, progress=False)
        summary = run_survey(scenes, bundle, options, SurveyOptions(out=str(out), scheduler=cluster.scheduler_address,
                                                                    progress=False, block_rows=block_rows))
        peaks = client.run(vm_hwm_mb)
    records = [r for r in json.loads((out / "survey.json").read_text())["scenes"].values() if r["state"] == "done"]
    return summary, records, peaks, out


def run(scenes: list[Path], bundle: Path, workers: int, work: Path) -> dict:
    """Throughput, Dask's overhead per task and peak RSS with ``workers`` workers (one task per scene)."""
    summary, records, peaks, _ = survey(scenes, bundle, workers, work)
    tasks = sum(r["seconds"] for r in records)
    forward = sum(r["forward_seconds"] for r in records)
    loads = sum(r.get("load_seconds", 0.0) for r in records)
    overhead = (workers * summary["tasks_seconds"] - tasks) / len(records)
    return {"workers": workers, "scenes": len(records), "mpx": summary["mapped_mpx"],
            "mpx_per_s": summary["mpx_per_s"], "map_s": summary["map_seconds"],
            "task_s": tasks / len(records), "forward_s": forward / len(records),
            "overhead_s": overhead, "overhead_share": overhead / (forward / len(records)),
            "in_task_share": (tasks - forward - loads) / forward,
            "peak_rss_mb": sorted(round(v) for v in peaks.values()), "failed": summary["failed"]}


def blocks_cost(scene: Path, bundle: Path, work: Path, block_rows: int) -> None:
    """One scene mapped whole and in bands of ``block_rows`` rows on a 1-worker cluster: tiles, times, same bytes."""
    rows = []
    for rows_per_block in (0, block_rows):
        summary, records, peaks, out = survey([scene], bundle, 1, work, rows_per_block)
        rec = records[0]
        rows.append((rows_per_block, len(rec.get("blocks", [])) or 1, rec["tiles"], rec["forward_seconds"],
                     summary["map_seconds"], max(peaks.values()), next(out.glob("*_landcover.tif")).read_bytes()))
    print(f"\nblocks: one {scene.name} on 1 worker, whole vs bands of {block_rows} rows")
    print(f"{'block_rows':>10} {'blocks':>6} {'tiles':>6} {'fwd s':>7} {'map s':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r[0]:>10} {r[1]:>6} {r[2]:>6} {r[3]:>7.1f} {r[4]:>7.1f} {r[5]:>11.0f}")
    (_, _, t0, f0, m0, _, map0), (_, _, t1, f1, m1, _, map1) = rows
    print(f"blocked / whole: tiles x{t1 / t0:.3f}, forward x{f1 / f0:.3f}, map wall x{m1 / m0:.3f}; "
          f"maps {'identical' if map0 == map1 else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--model", default="unet_efficientnet_lite0")
    parser.add_argument("--block-rows", type=int, default=2048, help="blocks' cost on the first scene (0: skip)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aerialseg-bench" / "survey")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "pipeline"))
    start = time.perf_counter()
    scenes = make_scenes(args.work, args.size, args.scenes)
    bundle = make_bundle(args.work, args.model)
    print(f"{args.scenes} scenes of {args.size}^2 px, model {args.model} (random weights, ONNX Runtime CPU), "
          f"{os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'Mpx/s':>7} {'map s':>7} {'task s':>7} {'fwd s':>7} {'dask ovh/task':>14} "
          f"{'of fwd':>7} {'in-task other/fwd':>17}  peak RSS/worker MB")
    for workers in (int(w) for w in args.workers.split(",")):
        r = run(scenes, bundle, workers, args.work)
        print(f"{r['workers']:>7} {r['mpx_per_s']:>7.3f} {r['map_s']:>7.1f} {r['task_s']:>7.2f} {r['forward_s']:>7.2f} "
              f"{r['overhead_s']:>13.3f}s {100 * r['overhead_share']:>6.2f}% {100 * r['in_task_share']:>16.1f}%  "
              f"{r['peak_rss_mb']}" + (f"  ({r['failed']} failed)" if r["failed"] else ""), flush=True)
    if args.block_rows:
        blocks_cost(scenes[0], bundle, args.work, args.block_rows)
    print(f"total bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
