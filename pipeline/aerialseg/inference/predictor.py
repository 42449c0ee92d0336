"""The one Predictor: uint8 tiles -> class probabilities, with the model's normalisation, padding and TTA.

infer-scene, evaluate (through the same stitched map) and serve all predict through it, with either
backend: PyTorch (CUDA fp16 autocast when present) or ONNX Runtime (the bundle's model.onnx).
"""

from collections.abc import Callable

import numpy as np
import torch

from aerialseg.core.errors import AerialsegError
from aerialseg.inference.bundle import Bundle

BACKENDS = ("torch", "onnx")
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class Predictor:
    """uint8 (N, C, T, T) -> float32 (N, K, T, T) probabilities: normalise, reflect-pad, run, softmax, TTA."""

    def __init__(self, logits_fn: LogitsFn, mean: list[float], std: list[float], device: torch.device,
                 tta: bool = False, pad_multiple: int = 1, activation: str = "softmax"):
        self.logits_fn, self.device, self.tta = logits_fn, device, tta
        self.pad_multiple, self.activation = max(1, int(pad_multiple)), activation
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.scale, self.shift = 1.0 / std_t, -mean_t / std_t

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str = "torch", device: torch.device | str = "auto",
                    tta: bool = False, labelled_only: bool = True) -> "Predictor":
        """The bundle's model on ``backend`` (torch | onnx). ``labelled_only``: when the bundle records which
        classes had training data (bundle.json ``labelled_classes``), the others are never predicted: their
        probability is 0 and each pixel goes to the most likely labelled class."""
        from aerialseg.models.runtime import resolve_device  # here: the models package loads smp and timm

        device = resolve_device(device) if isinstance(device, str) else device
        if backend not in BACKENDS:
            raise AerialsegError(f"unknown backend '{backend}'", fix=f"use one of: {', '.join(BACKENDS)}")
        keep = bundle.labelled_ids if labelled_only else None
        if backend == "onnx":
            return cls(only_classes(_onnx_logits(bundle, device), keep), bundle.mean, bundle.std, device, tta)
        pad = int(bundle.manifest.get("pad_multiple") or 1)
        logits = only_classes(_torch_logits(bundle.load_torch().to(device), device), keep)
        return cls(logits, bundle.mean, bundle.std, device, tta, pad)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits_fn(x).float()
        return torch.softmax(out, dim=1) if self.activation == "softmax" else out

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, torch.float32, copy=True)
            x = x.mul_(self.scale).add_(self.shift)  # (x - mean) / std, in place
            h, w = x.shape[-2:]
            ph, pw = (-h) % self.pad_multiple, (-w) % self.pad_multiple
            if ph or pw:
                x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
            probs = self._run(x)
            if self.tta:
                for dims in FLIPS[1:]:
                    probs = probs + self._run(x.flip(dims)).flip(dims)
                probs = probs / len(FLIPS)
            return probs[..., :h, :w].cpu().numpy()


def only_classes(logits_fn: LogitsFn, keep: list[int] | None) -> LogitsFn:
    """``logits_fn`` with the logits of classes not in ``keep`` (None: keep all) set to -inf."""
    if keep is None:
        return logits_fn

    def logits_of_kept(x: torch.Tensor) -> torch.Tensor:
        out = logits_fn(x).float()
        drop = torch.tensor([i for i in range(out.shape[1]) if i not in keep], device=out.device, dtype=torch.long)
        return out.index_fill(1, drop, float("-inf"))

    return logits_of_kept


def _torch_logits(model: torch.nn.Module, device: torch.device) -> LogitsFn:
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    return logits_fn


def _onnx_logits(bundle: Bundle, device: torch.device) -> LogitsFn:
    from aerialseg.models.runtime import onnx_session, run_onnx

    if not bundle.onnx_path.is_file():
        raise AerialsegError("the bundle has no model.onnx", bundle.root,
                             "run `aerialseg export-onnx` on it, or use --backend torch")
    session = onnx_session(bundle.onnx_path, "cuda" if device.type == "cuda" else "cpu")

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_onnx(session, x.cpu().numpy())).to(device)

    return logits_fn
