"""Batch operations of the training step: the random crop, ClassMix, forward passes (aux logits), autocast."""

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.core.classes import IGNORE
from aerialseg.models import ModelSpec, pad_to_multiple


def random_crop(images: torch.Tensor, masks: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size`` crop for the whole batch (a no-op when the patches are not larger)."""
    h, w = masks.shape[-2:]
    if not size or (h <= size and w <= size):
        return images, masks
    ch, cw = min(size, h), min(size, w)
    top, left = random.randint(0, h - ch), random.randint(0, w - cw)
    return images[..., top:top + ch, left:left + cw], masks[..., top:top + ch, left:left + cw]


def class_mix(images: torch.Tensor, masks: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al., WACV 2021) with labels on both sides: with probability ``p`` a patch gets the pixels
    and labels of a random half of the classes of another patch of the batch (ignore is never pasted)."""
    if p <= 0 or len(masks) < 2:
        return images, masks
    partners = (torch.arange(len(masks)) + torch.randint(1, len(masks), (1,))) % len(masks)
    mixed_images, mixed_masks = images.clone(), masks.clone()
    for target, source in enumerate(partners.tolist()):
        present = [c for c in torch.unique(masks[source]).tolist() if c != IGNORE]
        if not present or float(torch.rand(())) >= p:
            continue
        chosen = torch.tensor(present)[torch.randperm(len(present))[:(len(present) + 1) // 2]]
        paste = torch.isin(masks[source], chosen)
        mixed_images[target] = torch.where(paste, images[source], images[target])
        mixed_masks[target] = torch.where(paste, masks[source], masks[target])
    return mixed_images, mixed_masks


def split_output(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Model output -> (logits, auxiliary logits); deep-supervision models return (logits, [aux, ...])."""
    if isinstance(output, (tuple, list)):
        aux = output[1] if len(output) > 1 else []
        aux = list(aux) if isinstance(aux, (tuple, list)) else [aux]
        return output[0], aux
    return output, []


def forward_logits(model: nn.Module, spec: ModelSpec, images: torch.Tensor, train: bool = False,
                   normalised: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 (N, 3, H, W) on the model's device (``normalised``: float, already through ``spec.normalize``)
    -> logits (N, C, H, W) (+ aux logits at H, W)."""
    x, (h, w) = pad_to_multiple(images if normalised else spec.normalize(images), spec.pad_multiple)
    logits, aux = split_output(model(x))
    logits = logits[..., :h, :w]
    if train:
        aux = [F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w] for a in aux]
    return logits, aux


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """float16 autocast on CUDA; disabled (plain fp32) elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory format for every 4-D parameter and buffer, in place (higher-rank ones, e.g. DAS-Net's
    dynamic kernels, which ``model.to(memory_format=...)`` refuses, stay as they are)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model
