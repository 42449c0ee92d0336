"""One contract for every registered model: build offline, any padded size, eval forward shape, save/load."""

import pytest
import torch

from aerialseg.models import create_model, get_spec, list_models, load_model, save_model

NAMES = sorted(n for n in list_models() if not n.startswith("_"))  # test modules register "_" toys
LIGHT = {"pretrained_encoder": False}


def _build(name: str) -> torch.nn.Module:
    try:
        return create_model(name, **LIGHT)
    except TypeError:  # only the ImageNet-initialised default takes pretrained_encoder
        return create_model(name)


def test_registry_holds_the_thesis_and_seed_families():
    assert {"pspnet_resnet18", "segformer_b0", "segformer_b3", "segformer_b5", "fpn_resnet50", "unet_resnet50",
            "upernet_convnext_tiny", "upernet_convnext_base", "dasnet", "lwirstnet", "dinov2_unet_small",
            "deeplabv3plus_resnet50", "unet_efficientnet_lite0"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_model_contract(name, tmp_path):
    spec = get_spec(name)
    assert len(spec.mean) == len(spec.std) == 3 and spec.tile_size % spec.pad_multiple == 0
    torch.manual_seed(0)
    model = _build(name).eval()
    size = (spec.pad_multiple * 2, spec.pad_multiple * 3)  # not square, not a power of two
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = model(x)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    assert logits.shape == (1, 5, *size) and torch.isfinite(logits).all()
    save_model(model, tmp_path / "m", name, kwargs=LIGHT if name == "unet_efficientnet_lite0" else None)
    loaded, meta = load_model(tmp_path / "m")
    with torch.no_grad():
        again = loaded(x)
    again = again[0] if isinstance(again, (tuple, list)) else again
    assert meta["name"] == name and torch.equal(again, logits)
