"""Model table: parameters, FLOPs at a tile size and CPU latency per tile (PyTorch, optionally ONNX Runtime).

Conventions (stated in the table as well):
- params total: every parameter of the module (smp PSPNet, for one, keeps encoder stages it never runs);
  params used: those some operation of one eval-mode forward pass reads (seen by a TorchFunctionMode,
  so frozen parameters and parameters used under no_grad count); params trained: those that receive a
  gradient from one train-mode backward pass of all outputs (a frozen encoder does not);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` at batch 1, in_channels x tile x tile. It counts
  2 FLOPs per multiply-accumulate of convolutions, matrix products and attention, and nothing for
  element-wise ops, normalisation, pooling or resizing; GMACs = GFLOPs / 2;
- latency: batch 1, fp32, eval mode under ``torch.inference_mode``; the median (and 10th/90th
  percentile) of ``runs`` timed forward passes after ``warmup`` untimed ones, with ``threads`` intra-op
  threads (0 = all threads torch uses by default). ONNX Runtime: CPUExecutionProvider, the same input
  size and thread count.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json, write_text
from aerialseg.core.timing import call_times_ms
from aerialseg.models import count_parameters, create_model, get_spec, load_model


def example_input(tile: int, in_channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-looking input (1, C, tile, tile)."""
    return torch.randn(1, in_channels, tile, tile, generator=torch.Generator().manual_seed(seed))


class _ParameterUse(TorchFunctionMode):
    """Records which of the watched parameters any torch function receives as an argument."""

    def __init__(self, watched: dict[int, nn.Parameter]):
        super().__init__()
        self.watched = watched
        self.used: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched:
                self.used.add(id(leaf))
        return func(*args, **kwargs)


def count_used_parameters(model: nn.Module, sample: torch.Tensor) -> int:
    """Parameters that some operation of one eval-mode forward pass reads (frozen or under no_grad too)."""
    watched = {id(p): p for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _ParameterUse(watched) as use:
            model(sample)
    finally:
        model.train(was_training)
    return int(sum(watched[i].numel() for i in use.used))


def count_trained_parameters(model: nn.Module, sample: torch.Tensor) -> int:
    """Parameters that receive a gradient from one train-mode backward pass of every output (main and
    auxiliary logits) on a batch of two tiles; buffers (BatchNorm statistics) are restored afterwards."""
    params = list(model.parameters())
    buffers = [b.detach().clone() for b in model.buffers()]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    try:
        model.train()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            outputs = [t for t in tree_flatten(model(sample.repeat(2, 1, 1, 1)))[0] if isinstance(t, torch.Tensor)]
            torch.stack([t.float().sum() for t in outputs if t.requires_grad] or [torch.zeros(())]).sum().backward()
        return int(sum(p.numel() for p in params if p.grad is not None))
    finally:
        with torch.no_grad():
            for live, saved in zip(model.buffers(), buffers):
                live.copy_(saved)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        model.train(was_training)


def count_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Total FLOPs of one eval-mode forward (FlopCounterMode: 2 per multiply-accumulate)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(sample)
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], Any], runs: int = 10, warmup: int = 3) -> dict[str, float | int]:
    """Median, 10th and 90th percentile milliseconds of ``runs`` calls after ``warmup`` calls."""
    if runs < 1:
        raise AerialsegError("runs must be at least 1", fix="set report.profile.runs >= 1")
    p10, median, p90 = np.percentile(call_times_ms(fn, runs, warmup), [10, 50, 90])
    return {"median_ms": round(float(median), 3), "p10_ms": round(float(p10), 3),
            "p90_ms": round(float(p90), 3), "runs": runs, "warmup": warmup}


class _Threads:
    """Context manager: torch intra-op threads set to n (0 = leave as is)."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.n > 0:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def torch_latency(model: nn.Module, sample: torch.Tensor, threads: int = 0, runs: int = 10,
                  warmup: int = 3) -> dict[str, Any]:
    """CPU latency of one forward pass in PyTorch eager mode."""
    model.eval()
    with _Threads(threads) as used, torch.inference_mode():
        timing = time_calls(lambda: model(sample), runs, warmup)
    return {**timing, "threads": used}


def onnx_latency(path: str | Path, tile: int, in_channels: int = 3, threads: int = 0, runs: int = 10,
                 warmup: int = 3) -> dict[str, Any]:
    """CPU latency of one ONNX Runtime run; dynamic input dims take (1, in_channels, tile, tile)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AerialsegError("ONNX file not found", path, "export the model first or drop --onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for broken files
        raise AerialsegError(f"ONNX Runtime cannot load it (...{str(exc).splitlines()[0][-160:]})", path) from None
    spec = session.get_inputs()[0]
    default = (1, in_channels, tile, tile)
    shape = tuple(d if isinstance(d, int) and d > 0 else default[i] for i, d in enumerate(spec.shape))
    rng = np.random.default_rng(0)
    if spec.type == "tensor(uint8)":
        feed = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        feed = rng.standard_normal(shape).astype(np.float32)
    timing = time_calls(lambda: session.run(None, {spec.name: feed}), runs, warmup)
    return {**timing, "threads": options.intra_op_num_threads, "input_shape": list(shape), "path": str(path)}


def resolve_model(ref: str | nn.Module) -> tuple[nn.Module, str, str, int]:
    """(model, registry name, source, in_channels) from a module, a registered name or a model directory."""
    if isinstance(ref, nn.Module):
        return ref, type(ref).__name__, "module", 3
    path = Path(ref)
    if (path / "model.json").is_file():
        model, meta = load_model(path)
        return model, meta["name"], str(path), int(meta.get("in_channels", 3))
    if path.exists() and path.is_dir():
        raise AerialsegError("no model.json in the model directory", path, "point at a run from `aerialseg train`")
    return create_model(str(ref)), str(ref), "registry (random init)", 3


def _round_tile(tile: int, name: str) -> int:
    try:
        multiple = get_spec(name).pad_multiple
    except AerialsegError:
        return tile
    return int(-(-tile // multiple) * multiple)


def profile_model(ref: str | nn.Module, tile: int = 512, threads: int = 0, runs: int = 10, warmup: int = 3,
                  onnx: str | Path | None = None) -> dict[str, Any]:
    """One row of the model table (see the module docstring for the conventions)."""
    model, name, source, in_channels = resolve_model(ref)
    tile = _round_tile(tile, name)
    sample = example_input(tile, in_channels)
    flops = count_flops(model, sample)
    row: dict[str, Any] = {
        "model": name, "source": source, "tile": tile,
        "params_total_M": round(count_parameters(model) / 1e6, 6),
        "params_used_M": round(count_used_parameters(model, sample) / 1e6, 6),
        "params_trained_M": round(count_trained_parameters(model, sample) / 1e6, 6),
        "gflops": round(flops / 1e9, 4), "gmacs": round(flops / 2e9, 4),
        "cpu": torch_latency(model, sample, threads, runs, warmup),
    }
    if onnx is not None:
        row["onnx"] = onnx_latency(onnx, tile, in_channels, threads, runs, warmup)
    return row


def profile_models(refs: Sequence[str], tile: int = 512, threads: int = 0, runs: int = 10, warmup: int = 3,
                   onnx: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for several models; ``onnx`` maps a model reference to its ONNX file."""
    onnx = onnx or {}
    return [profile_model(ref, tile, threads, runs, warmup, onnx.get(ref))
            for ref in tqdm(refs, desc="profile", unit="model")]


def markdown_table(rows: Sequence[dict[str, Any]], miou: dict[str, str] | None = None) -> str:
    """The model table as Markdown; ``miou`` maps model name or source to a formatted mIoU cell."""
    miou = miou or {}
    lines = ["| model | source | params M (total) | params M (used) | params M (trained) | GFLOPs @ tile "
             "| CPU ms/tile (median) | ONNX Runtime ms/tile | mIoU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = r["cpu"]
        onnx = f"{r['onnx']['median_ms']:.1f}" if r.get("onnx") else "–"
        score = miou.get(r["source"], miou.get(r["model"], "–"))
        trained = f"{r['params_trained_M']:.3f}" if r.get("params_trained_M") is not None else "–"
        lines.append(f"| {r['model']} | {r['source']} | {r['params_total_M']:.3f} | {r['params_used_M']:.3f} | "
                     f"{trained} | "
                     f"{r['gflops']:.2f} @ {r['tile']} | {cpu['median_ms']:.1f} ({cpu['threads']} thr) | "
                     f"{onnx} | {score} |")
    return "\n".join(lines) + "\n"


def write_model_table(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """models.json (rows + conventions) and models.md beside it."""
    out = Path(out)
    conventions = __doc__.split("\n\n", 1)[1].strip()
    write_json(out, {"rows": rows, "conventions": conventions, "torch": torch.__version__})
    write_text(out.with_suffix(".md"), "# Model table\n\n" + markdown_table(rows) + "\n" + conventions + "\n")
    return out


def read_model_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a models.json written by ``write_model_table``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(data.get("rows", [])) if isinstance(data, dict) else []
