"""One string-keyed model registry: every model aerialseg can train, with its preprocessing.

A builder is registered with ``@register_model(name, ...)`` and takes
``(classes, in_channels, **kwargs) -> nn.Module``. The record beside it (``ModelSpec``) carries
the preprocessing the weights expect, so callers never keep mean/std in their heads.

Conventions every model follows:
- input: float tensor (N, in_channels, H, W) normalised with ``spec.normalize``; any H, W that is a
  multiple of ``spec.pad_multiple`` (callers pad with ``pad_to_multiple``);
- output in eval mode: logits (N, classes, H, W) at the input size;
- in train mode a model with deep supervision may return ``(logits, [aux_logits, ...])``;
  ``spec.aux_weight`` weighs the auxiliary losses.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs from its caller: preprocessing, tile size, padding, aux loss weight."""

    name: str
    builder: Callable[..., nn.Module] = field(repr=False, compare=False)
    mean: tuple[float, ...] = IMAGENET_MEAN  # on the 0..1 scale, per input band
    std: tuple[float, ...] = IMAGENET_STD
    band_order: tuple[str, ...] = ("red", "green", "blue")
    tile_size: int = 512
    pad_multiple: int = 32
    aux_weight: float = 0.0
    family: str = ""
    description: str = ""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) or float 0..255 -> normalised float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0
        return (images.float() - mean) / std

    def preprocessing(self) -> dict[str, Any]:
        """JSON-able preprocessing record (for manifests and ONNX metadata)."""
        d = asdict(self)
        d.pop("builder")
        return d


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, **spec: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder ``fn(classes, in_channels, **kwargs) -> nn.Module`` under name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = ModelSpec(name=name, builder=builder, **spec)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry record of a model; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise AerialsegError(f"unknown model '{name}'", fix=f"use one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, classes: int = 5, in_channels: int = 3, weights: str | Path | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model; ``weights`` loads a local state dict (never downloads)."""
    model = get_spec(name).builder(classes=classes, in_channels=in_channels, **kwargs)
    if weights is not None:
        load_state(model, weights)
    return model


def load_state(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load weights from .safetensors or a torch file with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise AerialsegError("weights file not found", path, "give the path of a local weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # SafetensorError: truncated or corrupt header/data
            raise AerialsegError(f"cannot read the weights ({str(exc).splitlines()[0][:120]})", path,
                                 "the file is truncated or corrupt: copy it again or rebuild it") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle with code, or corrupt
            raise AerialsegError(f"cannot load weights safely ({type(exc).__name__})", path,
                                 "provide a plain state dict (.pt with tensors only) or .safetensors") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise AerialsegError(f"weights do not fit the model ({str(exc).splitlines()[0][:160]})", path,
                             "check the model name and classes") from None


def save_model(model: nn.Module, directory: str | Path, name: str, classes: int = 5, in_channels: int = 3,
               kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save weights (model.safetensors) and how to rebuild them (model.json) into a directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    record = {"name": name, "classes": classes, "in_channels": in_channels, "kwargs": kwargs or {},
              "preprocessing": get_spec(name).preprocessing(), **(extra or {})}
    write_json(directory / "model.json", record)
    return directory


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``save_model``; returns (model in eval mode, its model.json record)."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise AerialsegError("no model.json in the model directory", directory,
                             "point at a directory written by `aerialseg train`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AerialsegError(f"model.json is not valid JSON ({str(exc)[:80]})", meta_path,
                             "restore the file or re-save the model") from None
    model = _build_from_record(meta, meta_path)
    if "pruning" in meta:  # a pruned model: replay its channel-removal plan (plain JSON) before loading weights
        from aerialseg.models.pruning_plan import apply_pruning_plan

        apply_pruning_plan(model, meta["pruning"])
    load_state(model, directory / "model.safetensors")
    return model.eval(), meta


def _build_from_record(meta: Any, path: Path) -> nn.Module:
    """The model a model.json record describes; a malformed record or bogus kwargs are one clear error."""
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise AerialsegError("model.json has no model name", path, "restore the file or re-save the model")
    classes, channels, kwargs = meta.get("classes"), meta.get("in_channels"), meta.get("kwargs") or {}
    for key, value in (("classes", classes), ("in_channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise AerialsegError(f"{key} must be a whole number from 1 to 1024, got {value!r}", path,
                                 "restore the file or re-save the model")
    if not isinstance(kwargs, dict):
        raise AerialsegError(f"kwargs must be a mapping, got {type(kwargs).__name__}", path,
                             "restore the file or re-save the model")
    if meta["name"] not in _REGISTRY:
        raise AerialsegError(f"unknown model '{meta['name']}'", path, f"use one of: {', '.join(list_models())}")
    try:
        return create_model(meta["name"], classes=classes, in_channels=channels, **kwargs)
    except AerialsegError:
        raise
    except Exception as exc:  # a builder refusing its kwargs: TypeError, ValueError, KeyError, ...
        raise AerialsegError(f"model '{meta['name']}' cannot be built from its kwargs {kwargs} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})", path,
                             "restore model.json (or re-save the model)") from None


def pad_to_multiple(images: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at bottom/right to a multiple; returns the padded tensor and the original (H, W)."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = mode if (ph < h and pw < w) else "replicate"
        images = F.pad(images, (0, pw, 0, ph), mode=mode)
    return images, (h, w)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that require grad)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


