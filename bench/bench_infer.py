"""Benchmark infer-scene: overhead over the pure forward pass, flat memory, throughput, naive baseline.

    .venv/bin/python bench/make_big_scene.py                       # 8192 x 8192 real-pixel scene
    .venv/bin/python bench/bench_infer.py [--parts ratio,throughput,memory,naive] [--gigapixel]

Parts (each result is merged into reports/bench_infer.json and printed as a table):
- ratio: infer-scene wall time (bundle load, reads, blending, COG, everything) / the model's pure forward
  time over the same tiles, on a ``--ratio-size`` square crop of the scene, with the default model
  (unet_efficientnet_lite0, or ``--model``). Two denominators: the time spent inside the model's forward
  during that same run (immune to the load of a shared machine changing between runs), and a separate
  run of the forward alone over the same tiles and batches (inputs prepared outside the timer);
- throughput: Mpx/s of infer-scene with the PyTorch and the ONNX Runtime backends (same crop, model);
- memory: peak RSS (VmHWM of a fresh subprocess; its ru_maxrss is also recorded, but on Linux it counts
  the parent's pages inherited through fork/exec) at 1x and 4x the scene's area, 4x = the same width
  and 4x the height (memory depends on the width, not the height: see aerialseg.inference.scene); with a tiny
  fully convolutional model (``bench_tiny_fcn``, 3x3 conv 3->8 + 1x1 conv 8->5) so the large runs finish
  in minutes on 2 shared cores; ``--wide`` also runs 2x width x 2x height (expected to grow with width);
- naive: the same 1x scene through a naive implementation that holds the whole scene and a full
  C x H x W float32 probability array (same tiny model), for comparison;
- ``--gigapixel``: peak RSS at a gigapixel's width, 32768 x 8192 px (4 x 1 mosaic; height does not count,
  as the memory part shows), or 32768 x 32768 px with ``--gigapixel-full``; tiny model.
Larger scenes are VRT mosaics of the 1x file (no extra disk), so every run reads real pixels.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import torch
from torch import nn

import aerialseg  # noqa: F401
from aerialseg.inference.bundle import Bundle, open_bundle
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.models import create_model, list_models, register_model, save_model
from aerialseg.geo.windows import window_starts
from aerialseg.stages.bundle import build_bundle

REPO = Path(__file__).resolve().parents[1]
TINY = "bench_tiny_fcn"
DEFAULT_MODEL = "unet_efficientnet_lite0"
GSD_M = 0.5  # the synthetic georeference of make_big_scene.py: no resampling


def _build_tiny(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))


if TINY not in list_models():
    register_model(TINY, tile_size=512, pad_multiple=1, description="benchmark-only tiny FCN")(_build_tiny)


# --- scenes ----------------------------------------------------------------------------------

def mosaic_vrt(src: Path, dest: Path, nx: int = 1, ny: int = 1, size: int | None = None) -> Path:
    """A VRT repeating ``src`` nx x ny times (or cropping it to size x size): real pixels, no extra disk."""
    with rasterio.open(src) as ds:
        w, h, count, crs, t = ds.width, ds.height, ds.count, ds.crs, ds.transform
    sw, sh = (size, size) if size else (w, h)
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(src.resolve()))}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{sw}\" ySize=\"{sh}\"/>"
            f'<DstRect xOff="{i * sw}" yOff="{j * sh}" xSize="{sw}" ySize="{sh}"/></SimpleSource>'
            for j in range(ny) for i in range(nx))
        interp = ("Red", "Green", "Blue")[b - 1] if count == 3 else "Undefined"
        bands.append(f'<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{interp}</ColorInterp>'
                     f"{sources}</VRTRasterBand>")
    xml = (f'<VRTDataset rasterXSize="{sw * nx}" rasterYSize="{sh * ny}"><SRS>{escape(crs.to_wkt())}</SRS>'
           f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>{''.join(bands)}</VRTDataset>")
    dest.write_text(xml, encoding="utf-8")
    return dest


# --- models ----------------------------------------------------------------------------------

def prepare_bundle(model: str, work: Path, onnx: bool) -> Path:
    """A bundle for a registered model name (cached under work/), or the given bundle path as is."""
    if Path(model).exists():
        return Path(model)
    dest = work / f"bundle_{model}"
    if (dest / "bundle.json").is_file() and (not onnx or (dest / "model.onnx").is_file()):
        return dest
    torch.manual_seed(0)
    trained = save_model(create_model(model), work / f"model_{model}", model)
    return build_bundle(trained, dest, overlap=64, gsd_m=GSD_M, onnx=onnx)


# --- the measurements ------------------------------------------------------------------------

def pure_forward_seconds(scene: Path, bundle_path: Path, batch: int, overlap: int) -> tuple[float, int]:
    """Model forward time over exactly infer-scene's tiles and batches (inputs prepared off the clock)."""
    with open_bundle(bundle_path) as bundle, rasterio.open(scene) as ds:
        model, tile = bundle.load_torch(), bundle.tile_size
        mean = torch.tensor(bundle.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(bundle.std).view(1, -1, 1, 1) * 255
        rows, cols = window_starts(ds.height, tile, overlap), window_starts(ds.width, tile, overlap)
        total, tiles = 0.0, 0
        with torch.inference_mode():
            model(torch.zeros(batch, bundle.in_channels, tile, tile))  # warm-up at the batch shape
            for row in rows:
                stripe = ds.read([1, 2, 3], window=((row, row + tile), (0, ds.width)))
                for first in range(0, len(cols), batch):
                    x = torch.from_numpy(np.stack([stripe[:, :, c:c + tile] for c in cols[first:first + batch]]))
                    x = (x.float() - mean) / std
                    start = time.perf_counter()
                    model(x)
                    total += time.perf_counter() - start
                    tiles += len(x)
    return total, tiles


class TimedModel(nn.Module):
    """Wraps a model and adds up the wall time spent in its forward (CPU: synchronous)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seconds = inner, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - start
        return out


def run_infer(scene: Path, bundle: Path, out: Path, batch: int, backend: str = "torch") -> dict:
    """One infer-scene run in this process; for torch also the time spent inside the model's forward."""
    timed: list[TimedModel] = []
    real_load = Bundle.load_torch

    def load_timed(self: Bundle) -> nn.Module:
        timed.append(TimedModel(real_load(self)))
        return timed[-1]

    Bundle.load_torch = load_timed
    try:
        options = InferOptions(batch=batch, backend=backend, progress=False, preview=False)
        result = infer_scene(scene, bundle, out, options)
    finally:
        Bundle.load_torch = real_load
    return {"seconds": result.seconds, "tiles": result.tiles, "mpx_per_s": result.mpx_per_s,
            "width": result.width, "height": result.height,
            "forward_in_run_s": timed[0].seconds if timed else None}


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss, not inflated by the parent's pages
    that a fork/exec child inherits in its high-water mark on Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, scene: Path, bundle: Path, out: Path, batch: int) -> None:
    """Subprocess body: run once, print {peak_rss_mb, rss_before_mb, ...} as JSON on the last line."""
    before = vm_hwm_mb()
    start = time.perf_counter()
    if kind == "infer":
        info = run_infer(scene, bundle, out, batch)
    else:
        info = naive_infer(scene, bundle, out, batch)
    info.update(seconds=time.perf_counter() - start, rss_before_mb=before, peak_rss_mb=vm_hwm_mb(),
                ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(info))


def naive_infer(scene: Path, bundle_path: Path, out: Path, batch: int) -> dict:
    """The naive way: whole scene in memory, a full C x H x W float32 sum + H x W weights, then argmax."""
    with open_bundle(bundle_path) as bundle, rasterio.open(scene) as ds:
        model, tile, overlap = bundle.load_torch(), bundle.tile_size, bundle.overlap
        image = ds.read([1, 2, 3])
        probs = np.zeros((bundle.num_classes, ds.height, ds.width), dtype=np.float32)
        weight = np.zeros((ds.height, ds.width), dtype=np.float32)
        mean = torch.tensor(bundle.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(bundle.std).view(1, -1, 1, 1) * 255
        spots = [(r, c) for r in window_starts(ds.height, tile, overlap) for c in window_starts(ds.width, tile, overlap)]
        with torch.inference_mode():
            for first in range(0, len(spots), batch):
                group = spots[first:first + batch]
                x = torch.from_numpy(np.stack([image[:, r:r + tile, c:c + tile] for r, c in group]))
                p = torch.softmax(model((x.float() - mean) / std), 1).numpy()
                for k, (r, c) in enumerate(group):
                    probs[:, r:r + tile, c:c + tile] += p[k]
                    weight[r:r + tile, c:c + tile] += 1
        classes = (probs / weight).argmax(0).astype(np.uint8)
        profile = {"driver": "GTiff", "width": ds.width, "height": ds.height, "count": 1, "dtype": "uint8",
                   "crs": ds.crs, "transform": ds.transform, "tiled": True, "compress": "deflate"}
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(classes, 1)
    return {"tiles": len(spots), "width": int(classes.shape[1]), "height": int(classes.shape[0])}


def in_subprocess(kind: str, scene: Path, bundle: Path, out: Path, batch: int) -> dict:
    """Run ``child`` in a fresh interpreter (its own VmHWM); returns its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--scene", str(scene),
           "--model", str(bundle), "--child-out", str(out), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- driver ----------------------------------------------------------------------------------

def part_ratio(scene: Path, work: Path, args: argparse.Namespace) -> dict:
    crop = mosaic_vrt(scene, work / f"crop_{args.ratio_size}.vrt", size=args.ratio_size)
    bundle = prepare_bundle(args.model, work, onnx="throughput" in args.parts)
    overlap = json.loads((bundle / "bundle.json").read_text())["overlap"] if bundle.is_dir() else 64
    forward, tiles = pure_forward_seconds(crop, bundle, args.batch, overlap)  # first: it warms the kernels
    infer = run_infer(crop, bundle, work / "ratio_map.tif", args.batch)
    assert tiles == infer["tiles"]
    return {"model": args.model, "scene_px": f"{args.ratio_size}x{args.ratio_size}", "tiles": tiles,
            "batch": args.batch, "infer_s": infer["seconds"], "forward_in_run_s": infer["forward_in_run_s"],
            "ratio_in_run": infer["seconds"] / infer["forward_in_run_s"], "forward_separate_s": forward,
            "ratio_vs_separate_forward": infer["seconds"] / forward, "torch_mpx_per_s": infer["mpx_per_s"]}


def part_throughput(scene: Path, work: Path, args: argparse.Namespace, ratio: dict | None) -> dict:
    crop = mosaic_vrt(scene, work / f"crop_{args.ratio_size}.vrt", size=args.ratio_size)
    bundle = prepare_bundle(args.model, work, onnx=True)
    torch_run = ratio["torch_mpx_per_s"] if ratio else run_infer(crop, bundle, work / "t.tif", args.batch)["mpx_per_s"]
    onnx_run = run_infer(crop, bundle, work / "onnx_map.tif", args.batch, backend="onnx")
    return {"model": args.model, "scene_px": f"{args.ratio_size}x{args.ratio_size}",
            "torch_mpx_per_s": torch_run, "onnx_mpx_per_s": onnx_run["mpx_per_s"], "onnx_s": onnx_run["seconds"]}


def part_memory(scene: Path, work: Path, args: argparse.Namespace) -> dict:
    bundle = prepare_bundle(TINY, work, onnx=False)
    scenes = {"1x": scene, "4x_tall": mosaic_vrt(scene, work / "tall_1x4.vrt", 1, 4)}
    if args.wide:
        scenes["4x_wide"] = mosaic_vrt(scene, work / "wide_2x2.vrt", 2, 2)
    runs = {}
    for name, path in scenes.items():
        runs[name] = in_subprocess("infer", path, bundle, work / f"mem_{name}.tif", args.batch)
        print(f"  memory {name}: {runs[name]}", flush=True)
    out = {"model": TINY, "runs": runs,
           "ratio_4x_tall_over_1x": runs["4x_tall"]["peak_rss_mb"] / runs["1x"]["peak_rss_mb"]}
    if args.wide:
        out["ratio_4x_wide_over_1x"] = runs["4x_wide"]["peak_rss_mb"] / runs["1x"]["peak_rss_mb"]
    return out


def part_naive(scene: Path, work: Path, args: argparse.Namespace) -> dict:
    bundle = prepare_bundle(TINY, work, onnx=False)
    naive = in_subprocess("naive", scene, bundle, work / "naive.tif", args.batch)
    return {"model": TINY, **naive}


def part_gigapixel(scene: Path, work: Path, args: argparse.Namespace) -> dict:
    """Peak RSS at a gigapixel's width (32768 px): 4 x 1 mosaic (same peak as 4 x 4, height does not
    count, see memory), or the full 32768 x 32768 mosaic with --gigapixel-full."""
    bundle = prepare_bundle(TINY, work, onnx=False)
    ny = 4 if args.gigapixel_full else 1
    giga = in_subprocess("infer", mosaic_vrt(scene, work / f"giga_4x{ny}.vrt", 4, ny), bundle, work / "giga.tif",
                         args.batch)
    return {"model": TINY, "full_gigapixel": bool(args.gigapixel_full), **giga}


def table(results: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    if "ratio" in results:
        r = results["ratio"]
        lines.append(f"| infer-scene wall / forward inside the same run ({r['model']}, {r['scene_px']}, "
                     f"{r['tiles']} tiles) | {r['ratio_in_run']:.3f} ({r['infer_s']:.1f} s / "
                     f"{r['forward_in_run_s']:.1f} s) |")
        lines.append(f"| infer-scene wall / separate pure-forward run (same tiles, batches) | "
                     f"{r['ratio_vs_separate_forward']:.3f} ({r['infer_s']:.1f} s / {r['forward_separate_s']:.1f} s) |")
    if "throughput" in results:
        t = results["throughput"]
        lines.append(f"| throughput torch / onnx ({t['model']}) | {t['torch_mpx_per_s']:.3f} / "
                     f"{t['onnx_mpx_per_s']:.3f} Mpx/s |")
    if "memory" in results:
        for name, run in results["memory"]["runs"].items():
            lines.append(f"| peak RSS {name} ({run['width']}x{run['height']}, {run['tiles']} tiles, "
                         f"{run['seconds']:.0f} s) | {run['peak_rss_mb']:.0f} MB (after imports "
                         f"{run['rss_before_mb']:.0f} MB) |")
        lines.append(f"| peak RSS 4x tall / 1x | {results['memory']['ratio_4x_tall_over_1x']:.3f} |")
    if "naive" in results:
        n = results["naive"]
        lines.append(f"| naive full-array ({n['width']}x{n['height']}) | {n['peak_rss_mb']:.0f} MB, "
                     f"{n['seconds']:.0f} s |")
    for key in ("gigapixel", "gigapixel_full"):
        if key in results:
            g = results[key]
            lines.append(f"| peak RSS at gigapixel width ({g['width']}x{g['height']}, {g['tiles']} tiles, "
                         f"{g['seconds']:.0f} s) | {g['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=Path, default=Path("/tmp/aerialseg-bench/dubai_8192.tif"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name or a bundle path")
    parser.add_argument("--parts", default="ratio,throughput,memory,naive")
    parser.add_argument("--gigapixel", action="store_true", help="peak RSS at 32768 px width (x 8192 px)")
    parser.add_argument("--gigapixel-full", action="store_true", help="with --gigapixel: 32768 x 32768 px")
    parser.add_argument("--wide", action="store_true", help="memory: also 2x width x 2x height")
    parser.add_argument("--ratio-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/aerialseg-bench/work"))
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench_infer.json")
    parser.add_argument("--child", choices=["infer", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.scene, Path(args.model), args.child_out, args.batch)
    if not args.scene.is_file():
        raise SystemExit(f"{args.scene} not found: run bench/make_big_scene.py first")
    if args.model == DEFAULT_MODEL and DEFAULT_MODEL not in list_models():
        raise SystemExit(f"{DEFAULT_MODEL} is not registered: pass --model NAME_OR_BUNDLE")
    args.parts = [p for p in args.parts.split(",") if p] + (["gigapixel"] if args.gigapixel else [])
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_avg_at_start": os.getloadavg()[0], "device": "cpu"}
    for part in args.parts:
        start = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "ratio":
            results["ratio"] = part_ratio(args.scene, args.work, args)
        elif part == "throughput":
            results["throughput"] = part_throughput(args.scene, args.work, args, results.get("ratio"))
        elif part == "memory":
            results["memory"] = part_memory(args.scene, args.work, args)
        elif part == "naive":
            results["naive"] = part_naive(args.scene, args.work, args)
        elif part == "gigapixel":
            part = "gigapixel_full" if args.gigapixel_full else "gigapixel"
            results[part] = part_gigapixel(args.scene, args.work, args)
        results[part]["load_avg_after"] = os.getloadavg()[0]
        print(f"   {part} done in {time.perf_counter() - start:.0f} s: {json.dumps(results[part])}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
