"""Loss selection from params: Soft-IoU wiring and bad names."""

import pytest
import torch

from aerialseg.core.errors import AerialsegError
from aerialseg.training.losses import LOSS_NAMES, build_loss


def _confident(target: torch.Tensor, classes: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2).float() * 50


def test_softiou_is_near_zero_for_a_perfect_prediction_and_ignores_255() -> None:
    target = torch.randint(0, 5, (2, 16, 16))
    logits = _confident(target)
    target[:, :4] = 255  # ignored pixels: the (wrong) logits there must not count
    assert build_loss({"name": "softiou"})(logits, target).item() < 1e-3
    wrong = _confident((target + 1) % 5)
    assert build_loss({"name": "softiou"})(wrong, target).item() > 0.9


def test_every_loss_name_builds_and_backpropagates() -> None:
    target = torch.randint(0, 5, (2, 8, 8))
    for name in LOSS_NAMES:
        logits = torch.randn(2, 5, 8, 8, requires_grad=True)
        value = build_loss({"name": name})(logits, target)
        value.backward()
        assert torch.isfinite(value) and logits.grad is not None, name


def test_unknown_loss_name_is_a_user_error() -> None:
    with pytest.raises(AerialsegError, match="unknown loss 'lovasz-hinge'"):
        build_loss({"name": "lovasz-hinge"})
