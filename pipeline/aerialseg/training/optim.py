"""Optimisation: parameter groups (the encoder's own LR), the optimizer, the per-iteration LR schedule, EMA."""

import math
from typing import Any

import torch
from torch import nn

from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.training.config import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters, the encoder's in a group of its own at ``lr * encoder_lr_scale``."""
    if cfg.encoder_lr_scale == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise AerialsegError(f"train.encoder_lr_scale needs a model with an encoder; {cfg.model} has none",
                             DEFAULT_PARAMS, "set train.encoder_lr_scale: 1.0 for this model")
    in_encoder = {id(p) for p in encoder.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) in in_encoder], "lr": cfg.lr * cfg.encoder_lr_scale},
            {"params": [p for p in trainable if id(p) not in in_encoder]}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (momentum, Nesterov) over the trainable parameters (``parameter_groups``)."""
    params = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LRFactor:
    """Per-iteration LR multiplier: linear warmup, then poly / cosine decay to ``min_ratio``."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, power: float, min_ratio: float):
        self.schedule = schedule
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, warmup_steps)
        self.power = power
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "poly":
            factor = (1.0 - progress) ** self.power
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per iteration over ``epochs * steps_per_epoch`` iterations."""
    factor = LRFactor(cfg.schedule, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                      cfg.poly_power, cfg.min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (None when ``decay`` is 0)."""
    if decay <= 0:
        return None
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)
