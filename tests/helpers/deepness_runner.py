"""Run a segmentation ONNX the way QGIS Deepness 0.6.5 does, in whatever onnxruntime this Python has.

    python deepness_runner.py MODEL.onnx TILES.npz OUT.npz

TILES.npz holds ``tiles``, uint8 (N, H, W, C). OUT.npz gets ``output`` (the raw model output), ``classes``
(N, H, W: Deepness's threshold, then argmax), ``onnxruntime`` (its version) and ``settings`` (JSON of the
dock's state after "Load default parameters"). Needs only numpy and onnxruntime (see deepness_rules.py),
so it also runs in the throwaway onnxruntime 1.17 venv of tests/inference/test_deepness.py.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepness_rules as rules  # noqa: E402


def run(model: str | Path, tiles: np.ndarray) -> dict[str, Any]:
    """Load the model as Deepness does, click "Load default parameters", run one batch of uint8 tiles."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    settings = rules.load_default_parameters(rules.load_model(meta, session.get_inputs()[0].shape), meta)
    output = session.run(None, {session.get_inputs()[0].name: rules.preprocess(tiles, settings)})[0]
    return {"output": output, "classes": rules.class_map(output, settings), "onnxruntime": ort.__version__,
            "settings": settings}


def main(model: str, tiles_path: str, out: str) -> None:
    result = run(model, np.load(tiles_path)["tiles"])
    settings = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(result["settings"]).items()}
    np.savez(out, output=result["output"], classes=result["classes"], onnxruntime=result["onnxruntime"],
             settings=json.dumps(settings))


if __name__ == "__main__":
    main(*sys.argv[1:4])
