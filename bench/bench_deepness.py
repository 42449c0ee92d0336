"""Speed of the bundle's two ONNX files: why model.onnx stays logits, and how the Deepness softmax is built.

    .venv/bin/python bench/bench_deepness.py [--model unet_efficientnet_lite0] [--tile 512] [--batch 4]
        [--runs 7] [--threads 2] [--ort-python ~/.cache/aerialseg-tests/onnxruntime-1.17.0-py311/bin/python]

Per batch of ``--batch`` tiles of ``--tile``² px on the CPU (interleaved runs, medians, random weights):
- ``logits + torch softmax``: model.onnx in ONNX Runtime, then torch.softmax: what ``infer-scene --backend
  onnx`` does (it needs logits: it applies softmax, blends overlapping tiles and averages TTA flips itself);
- ``model.deepness.onnx``: probabilities inside the graph, as exp(x - max) / sum over the classes;
- ``Softmax node``: the same graph ending in one ONNX Softmax(axis=1) node, the alternative not taken.
``--ort-python``: a Python with another onnxruntime (e.g. the 1.17.0 venv tests/inference/test_deepness.py builds)
also times the two probability graphs, as QGIS Deepness would run them.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from aerialseg.compression.onnx_export import lowest_ir_version
from aerialseg.stages.bundle import build_bundle
from aerialseg.models import create_model, save_model

TIMER = """
import json, sys, time, numpy as np, onnxruntime as ort
paths, batch, tile, runs, threads = sys.argv[1:-4], *map(int, sys.argv[-4:])
options = ort.SessionOptions(); options.intra_op_num_threads = threads; options.log_severity_level = 3
sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
x = np.random.default_rng(0).standard_normal((batch, 3, tile, tile)).astype(np.float32)
times = [[] for _ in sessions]
for _ in range(runs + 1):
    for s, t in zip(sessions, times):
        start = time.perf_counter(); s.run(None, {"input": x}); t.append(time.perf_counter() - start)
print(json.dumps({"onnxruntime": ort.__version__, "ms": [1000 * float(np.median(t[1:])) for t in times]}))
"""


def softmax_node_copy(deepness: Path, logits: Path, dest: Path) -> Path:
    """model.onnx + one Softmax(axis=1) node, stamped like the Deepness file."""
    proto = onnx.load(str(logits))
    out = proto.graph.output[0]
    probs = onnx.ValueInfoProto()
    probs.CopyFrom(out)
    probs.name = "probabilities"
    proto.graph.node.append(helper.make_node("Softmax", [out.name], ["probabilities"], axis=1))
    del proto.graph.output[:]
    proto.graph.output.append(probs)
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.ir_version = onnx.load(str(deepness), load_external_data=False).ir_version
    assert proto.ir_version == lowest_ir_version(proto.opset_import[0].version)
    onnx.save(proto, str(dest))
    return dest


def median_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time of each function, runs interleaved (one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t[1:])) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet_efficientnet_lite0")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-python", help="a Python whose onnxruntime also times the probability graphs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        trained = save_model(create_model(args.model), work / "trained", args.model)
        bundle = build_bundle(trained, work / "bundle", tile_size=args.tile, overlap=args.tile // 8, gsd_m=0.5)
        files = {"model.deepness.onnx": bundle / "model.deepness.onnx",
                 "Softmax node": softmax_node_copy(bundle / "model.deepness.onnx", bundle / "model.onnx",
                                                   work / "softmax_node.onnx")}
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = args.threads, 3
        session = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                   for name, path in {"logits": bundle / "model.onnx", **files}.items()}
        x = np.random.default_rng(0).standard_normal((args.batch, 3, args.tile, args.tile)).astype(np.float32)
        fns = {"logits + torch softmax": lambda: torch.softmax(torch.from_numpy(
                   session["logits"].run(None, {"input": x})[0]), dim=1)}
        fns |= {name: (lambda s=session[name]: s.run(None, {"input": x})) for name in files}
        rows = [(name, ort.__version__, ms) for name, ms in median_ms(fns, args.runs).items()]
        if args.ort_python:
            done = subprocess.run([args.ort_python, "-c", TIMER, *map(str, files.values()), str(args.batch),
                                   str(args.tile), str(args.runs), str(args.threads)],
                                  capture_output=True, text=True, check=True)
            other = json.loads(done.stdout)
            rows += [(name, other["onnxruntime"], ms) for name, ms in zip(files, other["ms"])]
    print(f"{args.model}, batch {args.batch} x {args.tile}² px, {args.threads} threads, median of {args.runs}")
    print("| graph | onnxruntime | ms / batch |\n|---|---|---:|")
    for name, version, ms in rows:
        print(f"| {name} | {version} | {ms:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
