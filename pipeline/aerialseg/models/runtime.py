"""Where models run: the torch device (``resolve_device``, the one rule for train, distil and inference) and
ONNX Runtime sessions (CUDA provider when present) with batched runs. Torch and onnxruntime load on first use."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aerialseg.core.errors import AerialsegError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, local_rank: int | None = None, path: str | Path | None = None,
                   fix: str = "use --device cpu or auto") -> "torch.device":
    """``auto`` -> CUDA when available, else CPU; with ``local_rank`` (training under torchrun) ``auto`` and
    ``cuda`` mean this rank's GPU. CUDA asked for but absent is a one-line error (``path``, ``fix``)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AerialsegError("CUDA requested but not available", path, fix)
    try:
        return torch.device(name)
    except RuntimeError:
        raise AerialsegError(f"unknown device '{name}'", path, "use auto, cpu, cuda or cuda:N") from None


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
