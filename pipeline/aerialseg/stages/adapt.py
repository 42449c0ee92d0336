"""`aerialseg adapt --model BUNDLE SCENES... --out DIR` (params ``adapt``; ONNX parity gate from ``export``).

Adapts a bundle or trained model dir to unlabelled target scenes (aerialseg.training.adapt: AdaBN, TENT,
self-training or all three) and writes a new verified bundle (weights + bundle.json, and the ONNX files
unless ``adapt.onnx`` is false) recording what it was adapted to and how. Not a DVC stage: the scenes are the
user's survey, named on the command line.
"""

from functools import partial
from pathlib import Path
from typing import Any

from aerialseg.compression.onnx_export import export_bundle_onnx
from aerialseg.core.config import section
from aerialseg.training.adapt import AdaptOptions, adapt_bundle


def adapt_options(params: dict[str, Any], **overrides: Any) -> AdaptOptions:
    """AdaptOptions from params ``adapt`` (less ``onnx``); overrides that are not None win."""
    values = {k: v for k, v in section(params, "adapt").items() if k != "onnx"}
    return AdaptOptions(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


def exporter(params: dict[str, Any], onnx: bool | None = None) -> partial | None:
    """The bundle stage's ONNX export with params ``export``'s gate, or None (``adapt.onnx`` false)."""
    if not (section(params, "adapt").get("onnx", True) if onnx is None else onnx):
        return None
    exp = section(params, "export")
    return partial(export_bundle_onnx, max_abs_diff=float(exp.get("max_abs_diff", 1e-3)),
                   opset=int(exp.get("opset", 18)))


def run(params: dict[str, Any], model: str | Path, scenes: list[Path], out: str | Path, method: str | None = None,
        onnx: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """Adapt ``model`` to ``scenes`` with ``method`` (else adapt.method); returns the ``adapted`` record + bundle."""
    options = adapt_options(params, method=method, **overrides)
    return adapt_bundle(model, scenes, out, options, exporter(params, onnx))


def summary(done: dict[str, Any]) -> str:
    """The command's line about an adaptation."""
    return (f"adapted ({done['method']}) to {len(done['scenes'])} scene(s), {done['windows']} windows, "
            f"{done['seconds']} s -> {done['bundle']}")
