"""DINOv2 ViT + U-Net decoder: input-sized logits, a frozen encoder, local weights only, it trains."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aerialseg.core.errors import AerialsegError
from aerialseg.models import count_parameters, create_model, get_spec, load_model, save_model
from aerialseg.models.dinov2_unet import DinoV2UNet
from aerialseg.models.registry import IMAGENET_MEAN



@pytest.fixture(scope="module")
def small_skips() -> DinoV2UNet:
    torch.manual_seed(0)
    return create_model("dinov2_unet_small", classes=5, skips=True)


@pytest.mark.parametrize("size", [(70, 100), (14, 14), (57, 29)])
def test_odd_sizes_give_input_sized_logits(small_skips: DinoV2UNet, size: tuple[int, int]) -> None:
    with torch.no_grad():
        out = small_skips.eval()(torch.randn(1, 3, *size))
    assert out.shape == (1, 5, *size)
    spec = get_spec("dinov2_unet_small")
    assert spec.pad_multiple == 14 and spec.mean == IMAGENET_MEAN


def test_encoder_frozen_and_kept_in_eval(small_skips: DinoV2UNet) -> None:
    model = small_skips.train()
    assert not model.encoder.training and model.decoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert count_parameters(model, trainable_only=True) < count_parameters(model) - 21e6  # ViT-S/14: ~22 M
    model.zero_grad()
    model(torch.randn(2, 3, 28, 42)).logsumexp(1).mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.skip_proj.parameters())  # skips take part
    assert model.decoder[0].up.weight.grad.abs().sum() > 0


def test_decoder_widths() -> None:
    small = DinoV2UNet(classes=3)
    assert [b.up.in_channels for b in small.decoder] == [384, 512, 256, 128]
    assert [b.up.out_channels for b in small.decoder] == [512, 256, 128, 64]
    assert small.head.in_channels == 64 and small.head.out_channels == 3 and len(small.skip_proj) == 0
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in small.decoder.modules())
    refined = DinoV2UNet(classes=3, refine=True).eval()
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in refined.decoder.modules()) == 4
    with torch.no_grad():
        assert refined(torch.randn(1, 3, 20, 33)).shape == (1, 3, 20, 33)


def test_base_encoder_widths() -> None:
    base = create_model("dinov2_unet_base", classes=2)
    assert base.encoder.embed_dim == 768 and base.decoder[0].up.in_channels == 768
    with torch.no_grad():
        assert base.eval()(torch.randn(1, 3, 30, 44)).shape == (1, 2, 30, 44)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AerialsegError, match="encoder weights file not found"):
        create_model("dinov2_unet_small", encoder_weights=tmp_path / "dinov2_vits14.pth")
    # rebuilding a trained run (train.py saves pretrained_encoder=False) does not need the file any more
    create_model("dinov2_unet_small", encoder_weights=tmp_path / "dinov2_vits14.pth", pretrained_encoder=False)


def test_loads_official_and_timm_layouts(tmp_path: Path, small_skips: DinoV2UNet) -> None:
    state = {k: v.clone() for k, v in small_skips.encoder.state_dict().items()}
    official = {**state, "mask_token": torch.zeros(1, 384)}  # facebookresearch/dinov2 checkpoint keys
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "timm.safetensors"))
    for path in (tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "timm.safetensors"):
        model = DinoV2UNet(classes=5, encoder_weights=path)
        for key, value in state.items():
            torch.testing.assert_close(model.encoder.state_dict()[key], value)
    torch.save({"cls_token": torch.zeros(1, 1, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(AerialsegError, match="do not fit"):
        DinoV2UNet(encoder_weights=tmp_path / "wrong.pth")


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = DinoV2UNet(classes=3).train()
    images = torch.randn(2, 3, 42, 56)
    target = torch.zeros(2, 42, 56, dtype=torch.long)
    target[:, :21] = 1
    target[:, 21:, 28:] = 2
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_save_and_load_roundtrip(tmp_path: Path, small_skips: DinoV2UNet) -> None:
    save_model(small_skips, tmp_path / "run", "dinov2_unet_small", classes=5, kwargs={"skips": True})
    loaded, meta = load_model(tmp_path / "run")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small_skips.eval()(x))
    assert meta["preprocessing"]["pad_multiple"] == 14
