"""Segmentation losses (cross-entropy, Dice, focal, combinations) and the distillation KL term.

All losses take logits (N, C, H, W) and labels (N, H, W) int64 where ``ignore_index`` pixels count for
nothing. ``build_loss(params_loss)`` reads the ``train.loss`` section of params.yaml:

    name: ce | dice | focal | softiou | lovasz | ce+dice | focal+dice | ce+softiou | ce+lovasz
          (softiou: LW-IRSTNet's Soft-IoU; lovasz: the Lovász-softmax IoU surrogate, Berman et al. 2018,
          segmentation_models_pytorch's implementation)
    class_weights: null | [w_background, w_road, w_water, w_tree, w_building]
    label_smoothing: 0.0      (cross-entropy only)
    focal_gamma: 2.0
    dice_weight: 1.0          (weight of the Dice / Soft-IoU / Lovász part in the ce+... / focal+... pairs)
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from aerialseg.core.classes import IGNORE, NUM_CLASSES
from aerialseg.core.errors import AerialsegError
from aerialseg.core.config import DEFAULT_PARAMS

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES = ("ce", "dice", "focal", "softiou", "lovasz", "ce+dice", "focal+dice", "ce+softiou", "ce+lovasz")


def _weights(class_weights: list[float] | None, logits: torch.Tensor) -> torch.Tensor | None:
    if class_weights is None:
        return None
    return torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: list[float] | None = None,
                  ignore_index: int = IGNORE, label_smoothing: float = 0.0) -> torch.Tensor:
    """Pixel-wise cross-entropy; 0 (with a gradient path) when every pixel is ignored."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=_weights(class_weights, logits),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               class_weights: list[float] | None = None, ignore_index: int = IGNORE) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): CE scaled by (1 - p_true)^gamma, mean over labelled pixels."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    log_probs = F.log_softmax(logits.float(), dim=1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_pt = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    weights = _weights(class_weights, logits)
    if weights is not None:
        loss = loss * weights[safe_target]
    return loss[valid].mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean over classes present in the batch (truth or prediction)."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    safe_target = torch.where(target == ignore_index, torch.zeros_like(target), target)
    onehot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    cardinality = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth)
    present = onehot.sum(dims) > 0
    if not present.any():
        return logits.sum() * 0.0
    return 1.0 - dice[present].mean()


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None,
                    temperature: float = 1.0, ignore_index: int = IGNORE) -> torch.Tensor:
    """Per-pixel KL(teacher || student) at temperature T, times T^2, mean over pixels not ignored.

    KL = sum_c p_t,c (log p_t,c - log p_s,c) with p = softmax(logits / T); the T^2 factor keeps the
    gradient scale independent of T (Hinton et al. 2015). Pixels labelled ``ignore_index`` in
    ``target`` are left out (``target=None`` keeps every pixel).
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
    if target is not None:
        valid = target != ignore_index
        if not valid.any():
            return student_logits.sum() * 0.0
        kl = kl[valid]
    return kl.mean() * t * t


def lovasz_loss(ignore_index: int = IGNORE) -> LossFn:
    """Lovász-softmax over the batch's pixels (classes present only), ignored pixels left out; 0 when all are."""
    from segmentation_models_pytorch.losses import LovaszLoss

    lovasz = LovaszLoss("multiclass", per_image=False, ignore_index=ignore_index)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != ignore_index).any():
            return logits.sum() * 0.0
        return lovasz(logits.float(), target)

    return loss


def region_term(name: str, ignore_index: int = IGNORE) -> LossFn | None:
    """The IoU-type term a loss name asks for (Soft-IoU or Lovász-softmax), None for the others."""
    if "softiou" in name:
        from aerialseg.models.lwirstnet import SoftIoULoss

        return SoftIoULoss(ignore_index=ignore_index)
    if "lovasz" in name:
        return lovasz_loss(ignore_index)
    return None


def build_loss(cfg: dict[str, Any] | None, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE) -> LossFn:
    """A ``loss(logits, target)`` function from the ``train.loss`` params (see the module docstring)."""
    cfg = dict(cfg or {})
    name = str(cfg.get("name", "ce")).lower()
    if name not in LOSS_NAMES:
        raise AerialsegError(f"unknown loss '{name}'", DEFAULT_PARAMS, f"set train.loss.name to one of {LOSS_NAMES}")
    weights = cfg.get("class_weights")
    if weights is not None and (len(weights) != num_classes or any(float(w) < 0 for w in weights)):
        raise AerialsegError(f"train.loss.class_weights needs {num_classes} non-negative numbers, got {weights}",
                             DEFAULT_PARAMS, "give one weight per class or null")
    weights = None if weights is None else [float(w) for w in weights]
    smoothing = float(cfg.get("label_smoothing", 0.0))
    gamma = float(cfg.get("focal_gamma", 2.0))
    dice_weight = float(cfg.get("dice_weight", 1.0))
    region_loss = region_term(name, ignore_index)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if name.startswith("focal"):
            value = focal_loss(logits, target, gamma, weights, ignore_index)
        elif name.startswith("ce"):
            value = cross_entropy(logits, target, weights, ignore_index, smoothing)
        else:
            value = logits.sum() * 0.0
        if "dice" in name:
            value = value + (dice_weight if "+" in name else 1.0) * dice_loss(logits, target, ignore_index)
        if region_loss is not None:
            value = value + (dice_weight if "+" in name else 1.0) * region_loss(logits, target)
        return value

    return loss
