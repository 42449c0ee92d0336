"""Benchmark infer-survey on local Dask clusters: throughput with 1 and 2 workers, Dask's overhead per task
as a share of the model's forward time, peak memory per worker.

    .venv/bin/python bench/bench_survey.py [--size 4096] [--scenes 4] [--workers 1,2] [--model NAME]

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
- peak RSS per worker: VmHWM of each worker process (fresh per run).
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


def run(scenes: list[Path], bundle: Path, workers: int, work: Path) -> dict:
    """Map all scenes on a fresh local cluster of ``workers`` single-thread worker processes."""
    from distributed import Client, LocalCluster

    from aerialseg.inference.scene import InferOptions
    from aerialseg.inference.survey import SurveyOptions, run_survey

    out = Path(tempfile.mkdtemp(prefix=f"survey_w{workers}_", dir=work))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        options = InferOptions(backend="onnx", device="cpu", preview=False, progress=False)
        summary = run_survey(scenes, bundle, options, SurveyOptions(out=str(out), scheduler=cluster.scheduler_address,
                                                                    progress=False))
        peaks = client.run(vm_hwm_mb)
    records = [r for r in json.loads((out / "survey.json").read_text())["scenes"].values() if r["state"] == "done"]
    tasks = sum(r["seconds"] for r in records)
    forward = sum(r["forward_seconds"] for r in records)
    overhead = (workers * summary["tasks_seconds"] - tasks) / len(records)
    return {"workers": workers, "scenes": len(records), "mpx": summary["mapped_mpx"],
            "mpx_per_s": summary["mpx_per_s"], "map_s": summary["map_seconds"],
            "task_s": tasks / len(records), "forward_s": forward / len(records),
            "overhead_s": overhead, "overhead_share": overhead / (forward / len(records)),
            "peak_rss_mb": sorted(round(v) for v in peaks.values()), "failed": summary["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--model", default="unet_efficientnet_lite0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/aerialseg-bench/survey"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "pipeline"))
    start = time.perf_counter()
    scenes = make_scenes(args.work, args.size, args.scenes)
    bundle = make_bundle(args.work, args.model)
    print(f"{args.scenes} scenes of {args.size}^2 px, model {args.model} (random weights, ONNX Runtime CPU), "
          f"{os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'Mpx/s':>7} {'map s':>7} {'task s':>7} {'fwd s':>7} {'dask ovh/task':>14} "
          f"{'of fwd':>7}  peak RSS/worker MB")
    for workers in (int(w) for w in args.workers.split(",")):
        r = run(scenes, bundle, workers, args.work)
        print(f"{r['workers']:>7} {r['mpx_per_s']:>7.3f} {r['map_s']:>7.1f} {r['task_s']:>7.2f} {r['forward_s']:>7.2f} "
              f"{r['overhead_s']:>13.3f}s {100 * r['overhead_share']:>6.1f}%  {r['peak_rss_mb']}"
              + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    print(f"total bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
