"""A tiny registered model (receptive field 2 px) and a module-scoped bundle of it (training GSD 0.1 m, tile 256,
overlap 32): infer-scene's plumbing without a real network."""

from pathlib import Path

import pytest
import torch
from torch import nn

from aerialseg.models import list_models, register_model, save_model
from aerialseg.stages.bundle import build_bundle

TOY = "toy_fcn_infer"


def _build_toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    """Receptive field radius 2 px (3x3, 3x3, 1x1): well inside the default margin (overlap // 4)."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(4, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=256, pad_multiple=1, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))(_build_toy)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny bundle (weights + ONNX + manifest), training GSD 0.1 m, tile 256, overlap 32."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    save_model(_build_toy(), root / "trained", TOY, extra={"gsd_m": 0.1, "data_hash": "test"})
    return build_bundle(root / "trained", root / "bundle", overlap=32, onnx=True)
