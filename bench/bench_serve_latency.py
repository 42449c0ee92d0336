"""bench_serve.py's latency mode: p50/p95 of one request and time per phase, fp32 and int8 (see bench_serve.py).

A bundle that carries an int8 model (bundle.json lists it) is served as it is (int8 if usable) and as its fp32
twin (a copy without the int8 files). ``--before PKG`` starts the same servers with PYTHONPATH=PKG too (older
code), and every server answers request i before any answers i + 1, so load affects all alike: the ratios
after/before hold even on a busy machine."""

import argparse
import base64
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import rasterio
import torch

from bench_serve import KEY, REPO, one_request, sample_images, start_server

import aerialseg.inference.serve_map as serve_map
import aerialseg.inference.server as server
from aerialseg.inference.bundle import update_manifest_files
from aerialseg.inference.bundle_int8 import INT8_FILES
from aerialseg.annotations.anylabeling import load_label_json, parse_shapes, resolve_scene
from aerialseg.annotations.rasterize import rasterize_shapes
from aerialseg.core.config import load_params
from aerialseg.inference.prelabel import scored_shapes
from aerialseg.models import create_model, save_model
from aerialseg.stages.bundle import build_bundle
from aerialseg.stages.masks import label_table


def random_bundle(folder: Path, arch: str, tile: int | None) -> Path:
    """A bundle of ``arch`` with seeded random weights (no trained model needed)."""
    torch.manual_seed(0)
    save_model(create_model(arch), folder / "trained", arch, extra={"gsd_m": 0.5})
    return build_bundle(folder / "trained", folder / "bundle", tile_size=tile, onnx=False)


def labelled_scene(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample scene ``n``: (RGB (3, H, W) uint8, its label mask from label-to-mask's own code)."""
    path = REPO / "data" / "sample" / "labels" / f"dubai_tile{n}.json"
    doc = load_label_json(path)
    scene = resolve_scene(doc, path, None)
    shapes, _ = parse_shapes(doc, path, label_table(load_params(REPO / "params.yaml")))
    with rasterio.open(scene.path) as ds:
        return ds.read([1, 2, 3]), rasterize_shapes(shapes, scene.width, scene.height)


def sample_tiles(size: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` (H, W, 3) uint8 tiles of the sample scenes and their label masks."""
    images, masks = [], []
    for n in range(1, 7):
        chw, mask = labelled_scene(n)
        rgb = chw.transpose(1, 2, 0)
        for y in range(0, min(rgb.shape[0], mask.shape[0]) - size + 1, size):
            images.append(rgb[y:y + size, :size])
            masks.append(mask[y:y + size, :size])
    return images[:count], masks[:count]


def int8_twin(bundle: Path, model_dir: Path, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of ``bundle`` holding model.int8.onnx + quantize.json from `aerialseg quantize`'s own code."""
    from aerialseg.compression.quantize import QuantizeConfig, quantize_model_dir
    from aerialseg.inference.bundle import open_bundle

    with open_bundle(bundle) as b:
        tile = b.tile_size
    twin = folder / "bundle-int8"
    shutil.copytree(bundle, twin)
    images, masks = sample_tiles(tile, 16)
    config = QuantizeConfig(tile_size=tile, calibration_tiles=8, val_tiles=8, latency_runs=1, latency_warmup=0,
                            max_delta_miou=100.0)
    report = quantize_model_dir(model_dir, images[:8], images[8:], masks[8:], config, out_dir=twin)
    record = json.loads((twin / "quantize.json").read_text())
    record["gate"] = {"passed": True, "note": "bench: random weights, gate not meaningful"}
    (twin / "quantize.json").write_text(json.dumps(record))
    update_manifest_files(twin, int8={"carried": True, "note": "bench: random weights, gate not meaningful"})
    return twin, report["accuracy"]


def fp32_twin(bundle: Path, folder: Path) -> Path:
    """A copy of ``bundle`` without its int8 files (bundle.json updated): what serve runs without int8."""
    twin = folder / f"{Path(bundle).stem}-fp32"
    shutil.copytree(bundle, twin)
    for name in INT8_FILES:
        (twin / name).unlink(missing_ok=True)
    update_manifest_files(twin, int8={"carried": False, "reason": "bench: fp32 twin"})
    return twin


def http_latency(variants: dict[str, tuple[Path, dict[str, str]]], folder: Path, images: list[bytes],
                 requests: int, device: str) -> dict[str, dict[str, Any]]:
    """p50/p95 of sequential requests per variant (bundle, extra env), one server each, requests interleaved;
    also what /v1/models says runs."""
    servers, out = {}, {}
    try:
        for name, (bundle, env) in variants.items():
            run_dir = folder / f"run-{len(servers)}"
            run_dir.mkdir()
            servers[name] = (*start_server(Path(bundle), run_dir, queue=4, device=device, env=env), Path(bundle).stem)
        with httpx.Client(timeout=600) as client:
            runtime = {name: next(iter(client.get(f"{url}/v1/models", headers={"Token": KEY}).json()["data"].values()))
                       for name, (_, url, _) in servers.items()}
            for _, url, model in servers.values():
                one_request(client, url, model, images[0])  # warm-up
            results: dict[str, list] = {name: [] for name in servers}
            for i in range(requests):
                for name, (_, url, model) in servers.items():
                    results[name].append(one_request(client, url, model, images[i % len(images)]))
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for name, rows in results.items():
        seconds = np.array([r[0] for r in rows])
        if any(r[1] != 200 for r in rows):
            raise SystemExit(f"{name}: failed requests: {[r[1] for r in rows]}")
        out[name] = {"runtime": runtime[name].get("runtime", {"precision": "fp32 (older code: not reported)"}),
                     "p50_s": round(float(np.percentile(seconds, 50)), 3),
                     "p95_s": round(float(np.percentile(seconds, 95)), 3),
                     "shapes": int(np.median([r[2] for r in rows]))}
    return out


def phases(bundle: Path, image: bytes, runs: int, device: str) -> dict[str, float]:
    """Median seconds per phase of serve's own request path, in-process."""
    from contextlib import ExitStack

    options = server.ServeOptions(device=device)
    with ExitStack() as stack:
        model = next(iter(server.load_models([bundle], options, stack).values()))
        inner, blend = model.predict, serve_map.predict_array
        spent: dict[str, float] = {}

        def forward(tiles: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            out = inner(tiles)
            spent["forward"] += time.perf_counter() - start
            return out

        def stitched(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = blend(*args, **kwargs)
            spent["blend"] += time.perf_counter() - start
            return out

        model.predict, serve_map.predict_array = forward, stitched
        body = json.dumps({"model": model.model_id, "image": base64.b64encode(image).decode()}).encode()
        rows = []
        for _ in range(runs + 1):  # the first run warms caches
            spent.update(forward=0.0, blend=0.0)
            t0 = time.perf_counter()
            raw = server.decode_base64_image(server.parse_request(body).image)
            with server.open_image(raw, options) as ds:
                t1 = time.perf_counter()
                classes, confidence = serve_map.predict_dataset(model, ds, options.max_megapixels * 1e6)
            t2 = time.perf_counter()
            scored_shapes(classes, confidence, model.class_names, 0.0, 0.0, options.min_area_px)
            t3 = time.perf_counter()
            rows.append({"decode": t1 - t0, "read": t2 - t1 - spent["blend"], "forward": spent["forward"],
                         "stitch": spent["blend"] - spent["forward"], "polygonise": t3 - t2, "total": t3 - t0})
        serve_map.predict_array = blend
    return {k: round(statistics.median(r[k] for r in rows[1:]), 3) for k in rows[0]}


def latency_main(args: argparse.Namespace) -> None:
    arch = args.arch or load_params(REPO / "params.yaml")["model"]["name"]
    requests = args.requests or 10
    images = sample_images(args.size)
    summary: dict[str, Any] = {"image_px": f"{args.size}x{args.size}", "requests": requests,
                               "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        if args.model is None:
            bundle = random_bundle(folder, arch, args.tile)
            summary["model"] = f"{arch} with RANDOM weights (no trained bundle; shapes are a random model's)"
        else:
            bundle = args.model
            summary["model"] = str(bundle)
        bundles = {"fp32": bundle}
        if (Path(bundle) / "model.int8.onnx").is_file():
            bundles = {"int8": bundle} if args.no_fp32 else {"fp32": fp32_twin(Path(bundle), folder), "int8": bundle}
        elif not args.no_int8 and args.model is not None:
            summary["int8"] = "the bundle has no model.int8.onnx: run `aerialseg quantize --out BUNDLE`"
        elif not args.no_int8:
            start = time.perf_counter()
            bundles["int8"], accuracy = int8_twin(bundle, folder / "trained", folder)
            summary["int8_made_in_s"] = round(time.perf_counter() - start, 1)
            summary["int8_agreement_with_fp32"] = accuracy["prediction_agreement"]
        variants = {f"{name} (this code)": (Path(path), {}) for name, path in bundles.items()}
        if args.before is not None:
            before = {"PYTHONPATH": str(Path(args.before).resolve())}
            variants.update({f"{name} (before: {args.before})": (Path(path), before) for name, path in bundles.items()})
        summary["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
        summary["http"] = http_latency(variants, folder, images, requests, args.device)
        summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.before is not None:
            summary["p50_after_over_before"] = {
                name: round(summary["http"][f"{name} (this code)"]["p50_s"]
                            / summary["http"][f"{name} (before: {args.before})"]["p50_s"], 3) for name in bundles}
        summary["phases_s (this code, in-process medians)"] = {
            name: phases(Path(path), images[0], max(3, requests // 2), args.device) for name, path in bundles.items()}
    print(json.dumps(summary, indent=2))
    if args.write:
        (REPO / "reports").mkdir(exist_ok=True)
        (REPO / "reports" / "bench_serve.json").write_text(json.dumps(summary, indent=2) + "\n")
