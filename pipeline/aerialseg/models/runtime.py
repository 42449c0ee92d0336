"""Running exported models: ONNX Runtime sessions (CUDA provider when present) and batched runs."""

from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.core.errors import AerialsegError


def onnx_session(path: str | Path, device: str = "auto") -> Any:
    """An ONNX Runtime session: CUDA provider when available (and device allows), else CPU."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AerialsegError("ONNX model not found", path, "run `aerialseg export-onnx MODEL_DIR` first")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def run_onnx(session: Any, inputs: np.ndarray) -> np.ndarray:
    """Run a session on (N, C, H, W) float32; loops one tile at a time when the graph's batch is fixed."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    batch_dim = session.get_inputs()[0].shape[0]
    name = session.get_inputs()[0].name
    if isinstance(batch_dim, int) and batch_dim != inputs.shape[0]:
        return np.concatenate([session.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])
    return session.run(None, {name: inputs})[0]
