"""Benchmark `aerialseg serve`: per-request latency and time per phase, fp32 and int8; or a load test.

    .venv/bin/python bench/bench_serve.py [--model BUNDLE] [--size 1024] [--requests 10]     # latency
    .venv/bin/python bench/bench_serve.py --load [--requests 200] [--concurrency 8]          # load test

Latency (default): for the fp32 bundle and its int8 twin, the real server (`python -m aerialseg.cli serve`,
uvicorn, API key set) on a free loopback port answers ``--requests`` sequential POST /v1/predict calls of a
``--size``² PNG cut from the embedded sample scenes (after one warm-up call): p50/p95 from send to parsed
JSON. Then the same request runs in-process through serve's own functions, timed per phase (median of
``--requests``): decode (JSON, base64, image header), read (pixel decoding + the scene reader), forward
(the model's batches), stitch (tiling + blending around them), polygonise (the shape converter).
Without ``--model`` the bundle is the default architecture (params.yaml model.name) with seeded RANDOM
weights (no trained model in models/): the output says so; its polygon count is that of a random model.
The int8 twin is made with `aerialseg quantize`'s own code (static QDQ, calibrated and gated on sample
tiles) into a copy of the bundle; serve picks it up from model.int8.onnx + quantize.json.

Load (``--load``): ``--requests`` calls, ``--concurrency`` at a time (random-init ``--arch``, default
pspnet_resnet18, tile 256), with the server's resident memory sampled every 50 ms: the peak over the first
and over the last quarter of the requests should match (no growth). Every request must succeed.
Prints one JSON object (also written to reports/bench_serve.json with ``--write``).
"""

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import rasterio
import torch
import yaml

import aerialseg  # noqa: F401
from aerialseg.stages.bundle import build_bundle
from aerialseg.models import create_model, save_model

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"


def sample_images(size: int, count: int = 4) -> list[bytes]:
    """``count`` PNGs of size x size px cut (and resized when smaller) from the sample scenes."""
    images = []
    for n in range(1, count + 1):
        with rasterio.open(REPO / "data" / "sample" / "scenes" / f"dubai_tile{n}.tif") as ds:
            rgb = ds.read(window=((0, min(size, ds.height)), (0, min(size, ds.width)))).transpose(1, 2, 0)
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR) if rgb.shape[:2] != (size, size) else rgb
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
        images.append(buf.tobytes())
    return images


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/<pid>/status, MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024


class MemorySampler(threading.Thread):
    """Samples a process's VmRSS every ``period`` s as (time, MB) until stopped."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
            time.sleep(self.period)

    def peak_between(self, start: float, end: float) -> float:
        return max((mb for t, mb in self.samples if start <= t <= end), default=float("nan"))


def start_server(bundle: Path, folder: Path, queue: int, device: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`aerialseg serve` on a free port (``env`` added to this process's, e.g. PYTHONPATH of older code)."""
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"queue": queue, "device": device}}))
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "aerialseg.cli", "serve", "--model", str(bundle), "--port", "0",
                             "--params", str(params)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {}), "AERIALSEG_API_KEY": KEY})
    deadline = time.monotonic() + 300
    while not (match := re.search(r"Uvicorn running on (http://\S+:\d+)", (folder / "server.log").read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, match.group(1)


def one_request(client: httpx.Client, url: str, model: str, image: bytes) -> tuple[float, int, int, float, float]:
    """(seconds, HTTP status, shapes, sent time, done time) of one prediction."""
    body = {"model": model, "image": "data:image/png;base64," + base64.b64encode(image).decode(), "params": {}}
    sent = time.monotonic()
    response = client.post(f"{url}/v1/predict", json=body, headers={"Token": KEY})
    shapes = len(response.json().get("data", {}).get("shapes", [])) if response.status_code == 200 else -1
    done = time.monotonic()
    return done - sent, response.status_code, shapes, sent, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle to serve (default: a random-init bundle)")
    parser.add_argument("--load", action="store_true", help="load test instead of latency + phases")
    parser.add_argument("--arch", default=None, help="random-init architecture (default: params model.name; "
                                                      "--load: pspnet_resnet18)")
    parser.add_argument("--tile", type=int, default=None, help="tile size of the random-init bundle")
    parser.add_argument("--requests", type=int, default=None, help="latency: 10, load: 200")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-int8", action="store_true", help="latency: skip the int8 twin")
    parser.add_argument("--no-fp32", action="store_true", help="latency: a bundle carrying int8: skip its fp32 twin")
    parser.add_argument("--before", type=Path, help="latency: also serve with the package at this path (e.g. "
                                                    "another checkout's pipeline/), requests interleaved")
    parser.add_argument("--write", action="store_true", help="also write reports/bench_serve.json")
    args = parser.parse_args()
    if not args.load:
        from bench_serve_latency import latency_main

        return latency_main(args)
    args.arch, args.tile = args.arch or "pspnet_resnet18", args.tile or 256
    args.requests = args.requests or 200

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        bundle = args.model
        if bundle is None:
            torch.manual_seed(0)
            save_model(create_model(args.arch), folder / "trained", args.arch, extra={"gsd_m": 0.5})
            bundle = build_bundle(folder / "trained", folder / "bundle", tile_size=args.tile, overlap=args.tile // 8,
                                  onnx=False)
        model_id = Path(bundle).stem
        images = sample_images(args.size)
        proc, url = start_server(Path(bundle), folder, queue=2 * args.concurrency, device=args.device)
        sampler = MemorySampler(proc.pid)
        try:
            with httpx.Client(timeout=600) as client:
                warm = one_request(client, url, model_id, images[0])  # first call: lazy allocations
                rss_after_warmup = rss_mb(proc.pid)
                sampler.start()
                start = time.monotonic()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(lambda i: one_request(client, url, model_id, images[i % len(images)]),
                                            range(args.requests)))
                wall = time.monotonic() - start
                sampler.stopped.set()
                sampler.join()
            rss_end, hwm = rss_mb(proc.pid), rss_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        latencies = np.array([r[0] for r in results])
        errors = sum(r[1] != 200 for r in results)
        quarter = max(1, args.requests // 4)
        by_done = sorted(results, key=lambda r: r[4])
        first, last = by_done[:quarter], by_done[-quarter:]
        summary = {
            "model": f"{args.arch if args.model is None else args.model} (tile {args.tile})",
            "requests": args.requests, "concurrency": args.concurrency, "image_px": f"{args.size}x{args.size}",
            "errors": int(errors), "status_counts": {str(s): int(sum(r[1] == s for r in results))
                                                     for s in sorted({r[1] for r in results})},
            "shapes_per_response": float(np.mean([r[2] for r in results if r[1] == 200])) if errors < len(results)
            else 0.0,
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
            "latency_max_s": round(float(latencies.max()), 3),
            "first_request_s": round(warm[0], 3),
            "throughput_req_per_s": round(args.requests / wall, 3),
            "throughput_mpx_per_s": round(args.requests * args.size**2 / 1e6 / wall, 3),
            "wall_s": round(wall, 1),
            "rss_after_warmup_mb": round(rss_after_warmup, 1),
            "rss_peak_first_quarter_mb": round(sampler.peak_between(min(r[3] for r in first),
                                                                     max(r[4] for r in first)), 1),
            "rss_peak_last_quarter_mb": round(sampler.peak_between(min(r[3] for r in last),
                                                                    max(r[4] for r in last)), 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_high_water_mb": round(hwm, 1),
            "cpu_threads": torch.get_num_threads(),
        }
        summary["rss_growth_last_vs_first_quarter"] = round(
            summary["rss_peak_last_quarter_mb"] / summary["rss_peak_first_quarter_mb"], 3)
    print(json.dumps(summary, indent=2))
    if args.write:
        (REPO / "reports").mkdir(exist_ok=True)
        (REPO / "reports" / "bench_serve.json").write_text(json.dumps(summary, indent=2) + "\n")
    if errors:
        raise SystemExit(f"{errors} request(s) failed")


if __name__ == "__main__":
    main()
