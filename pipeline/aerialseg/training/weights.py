"""Where a model's weights start: a pretrained dir (``train.init_from``), the teacher's encoder, and the
frozen teacher itself (distillation); ``saved_kwargs`` says how model.json rebuilds the result."""

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.models import ModelSpec, get_spec, load_model, load_state
from aerialseg.training.batch import forward_logits

log = logging.getLogger(__name__)


def saved_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs to store in model.json: rebuilding from saved weights needs no ImageNet init."""
    params = inspect.signature(get_spec(name).builder).parameters
    return {**kwargs, "pretrained_encoder": False} if "pretrained_encoder" in params else dict(kwargs)


def init_weights(model: nn.Module, init_from: str | Path, model_name: str) -> str | None:
    """Load a pretrained model dir (or weights file) into ``model``; returns what was loaded, or None.

    A model dir of a different architecture is skipped with a warning (e.g. pretraining ran for another
    model); a dir written by a disabled ``aerialseg pretrain`` holds no weights and is skipped too.
    """
    path = Path(init_from)
    if path.is_file():
        load_state(model, path)
        return str(path)
    if not path.is_dir():
        raise AerialsegError("train.init_from not found", path, "run `aerialseg pretrain` first (it writes the "
                             "folder even when disabled), or set train.init_from: null")
    marker = path / "pretrain.json"
    if marker.is_file() and not json.loads(marker.read_text(encoding="utf-8")).get("enabled", True):
        log.info("init_from %s: pretraining was disabled, starting from the default init", path)
        return None
    if not (path / "model.json").is_file():
        raise AerialsegError("no model.json in train.init_from", path, "point it at a dir written by train/pretrain")
    meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
    if meta.get("name") != model_name:
        log.warning("init_from %s holds %s, not %s: not used", path, meta.get("name"), model_name)
        return None
    load_state(model, path / "model.safetensors")
    log.info("initialised %s from %s", model_name, path)
    return str(path)


@dataclass
class Teacher:
    """A frozen trained model whose soft predictions the student learns from."""

    model: nn.Module
    spec: ModelSpec
    name: str

    @torch.no_grad()
    def logits(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out, _ = forward_logits(self.model, self.spec, images)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
        return out.float()


def load_teacher(model_dir: str | Path, device: torch.device) -> Teacher:
    """Load a trained model dir as a frozen teacher (eval mode, no gradients)."""
    model, meta = load_model(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model.to(device).eval(), get_spec(meta["name"]), meta["name"])


def copy_teacher_weights(model: nn.Module, teacher: "Teacher | None", teacher_dir: str | Path | None) -> str:
    """Start a student's encoder from its teacher's: every encoder tensor of the same name and shape (e.g. the
    stages ``unet_efficientnet_lite0_slim`` keeps of ``unet_efficientnet_lite0``); the rest keeps its own init
    (a decoder of other widths learns other features even where a shape happens to agree). Returns what was
    loaded, for model.json."""
    if teacher is None:
        raise AerialsegError("train.init_from_teacher is set but this run has no teacher", DEFAULT_PARAMS,
                             "use it only for distillation (distil.init_from_teacher)")
    source, target = teacher.model.state_dict(), model.state_dict()
    shared = {k: v for k, v in source.items()
              if k.startswith("encoder.") and k in target and target[k].shape == v.shape}
    if not shared:
        raise AerialsegError(f"student {type(model).__name__} shares no encoder tensor (name and shape) with teacher "
                             f"{teacher.name}", teacher_dir, "set distil.init_from_teacher: false")
    model.load_state_dict(shared, strict=False)
    log.info("student starts from %d of its %d tensors copied from teacher %s", len(shared), len(target), teacher_dir)
    return f"{teacher_dir} (teacher's encoder: {len(shared)} of {len(target)} tensors)"
