"""Frozen DINOv2 ViT encoder + transposed-conv U-Net decoder (the AeroScapes seed, paper 001).

- Encoder: timm ``vit_small_patch14_dinov2`` (384 channels) or ``vit_base_patch14_dinov2`` (768), built
  with ``pretrained=False`` at ``img_size=518`` (the DINOv2 37x37 position grid, so official and timm
  checkpoints load as they are) and ``dynamic_img_size=True`` (the position embedding is interpolated
  for any input). Frozen by default: no gradients, and kept in eval mode when the model trains.
- Input: padded (replicate) at the bottom/right to a multiple of 14; the output is resized from the
  16x-upsampled token grid to the padded size and cropped back to the input size (the seed's centre
  crop of 592 -> 512 would misalign pixels whenever the 16/14 scale is ignored).
- Decoder: four blocks, each a 2x2 stride-2 transposed conv + BN + ReLU (the seed's), widths
  embed_dim -> 512 -> 256 -> 128 -> 64, and a 1x1 head. ``refine=True`` adds a 3x3 conv + BN + ReLU
  to each block so neighbouring tokens mix (smoother borders; at 518x518 ViT-S: 90.9 instead of
  39.2 GMACs).
- ``skips=True`` (the seed's own "next step"): the outputs of blocks at 3/4, 1/2 and 1/4 depth are
  projected (1x1 conv + BN) and added after decoder blocks 1, 2, 3, resized to their grids.
- ``encoder_weights``: a local .safetensors / .pt / .pth file, timm key layout or the official DINOv2
  one (``mask_token`` dropped; a position grid of another size is resampled by timm's filter). A
  missing file is an ``AerialsegError``. Without it the encoder keeps its random initialisation.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.core.errors import AerialsegError
from aerialseg.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model

PATCH = 14
DECODER_WIDTHS = (512, 256, 128, 64)
ENCODERS = {"small": "vit_small_patch14_dinov2", "base": "vit_base_patch14_dinov2"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (safetensors, or torch with weights_only=True); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise AerialsegError("encoder weights file not found", path,
                             "give the path of a local DINOv2 weights file or leave encoder_weights empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code, or a corrupt file
        raise AerialsegError(f"cannot load weights safely ({type(exc).__name__})", path,
                             "provide a plain state dict (.pt/.pth with tensors only) or .safetensors") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise AerialsegError("weights file holds no state dict", path, "save model.state_dict()")
    return state


def load_encoder_weights(vit: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load DINOv2 weights (timm or official layout, optional ``backbone.`` prefix) into a timm ViT."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path) if state is None else state
    for prefix in ("backbone.", "encoder.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = checkpoint_filter_fn({k: v for k, v in state.items() if k != "mask_token"}, vit)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AerialsegError(f"weights do not fit the ViT ({str(exc).splitlines()[0][:160]})", path,
                             "use weights of the same DINOv2 size (small = ViT-S/14, base = ViT-B/14)") from None


class UpBlock(nn.Module):
    """2x2 stride-2 transposed conv + BN + ReLU (+ 3x3 conv + BN + ReLU with ``refine``)."""

    def __init__(self, in_channels: int, out_channels: int, refine: bool = False):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if refine:
            layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        self.post = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.up(x))


class DinoV2UNet(nn.Module):
    """DINOv2 ViT (frozen) -> four transposed-conv blocks -> 1x1 head; logits at the input size."""

    def __init__(self, classes: int = 5, in_channels: int = 3, size: str = "small", skips: bool = False,
                 refine: bool = False, freeze_encoder: bool = True, encoder_weights: str | Path | None = None,
                 img_size: int = 518):
        super().__init__()
        import timm

        if size not in ENCODERS:
            raise AerialsegError(f"unknown DINOv2 size '{size}'", fix=f"use one of: {', '.join(ENCODERS)}")
        weights = read_state_dict(encoder_weights) if encoder_weights else None  # fail before building
        self.encoder = timm.create_model(ENCODERS[size], pretrained=False, img_size=img_size,
                                         dynamic_img_size=True, in_chans=in_channels, num_classes=0)
        if weights is not None:
            load_encoder_weights(self.encoder, encoder_weights, weights)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        depth, dim = len(self.encoder.blocks), self.encoder.embed_dim
        self.skip_blocks = [3 * depth // 4 - 1, depth // 2 - 1, depth // 4 - 1] if skips else []
        self.skip_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, width, 1, bias=False), nn.BatchNorm2d(width))
            for width in DECODER_WIDTHS[: len(self.skip_blocks)])
        widths = (dim, *DECODER_WIDTHS)
        self.decoder = nn.ModuleList(UpBlock(widths[i], widths[i + 1], refine) for i in range(len(DECODER_WIDTHS)))
        self.head = nn.Conv2d(DECODER_WIDTHS[-1], classes, 1)

    def train(self, mode: bool = True) -> "DinoV2UNet":
        """Train the decoder; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normalised patch features (N, D, H/14, W/14) and the skip features, deepest first."""
        depth = len(self.encoder.blocks)
        indices = [*self.skip_blocks, depth - 1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder.forward_intermediates(x, indices=indices, norm=True, output_fmt="NCHW",
                                                       intermediates_only=True)
        by_index = dict(zip(sorted(indices), feats))
        return by_index[depth - 1], [by_index[i] for i in self.skip_blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % PATCH, (-w) % PATCH
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        y, skip_feats = self.encode(x)
        for i, block in enumerate(self.decoder):
            y = block(y)
            if i < len(skip_feats):
                skip = self.skip_proj[i](skip_feats[i])
                y = y + F.interpolate(skip, size=y.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(y)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def _register(size: str) -> None:
    @register_model(f"dinov2_unet_{size}", mean=IMAGENET_MEAN, std=IMAGENET_STD, pad_multiple=PATCH,
                    tile_size=518, family="dinov2",
                    description=f"frozen DINOv2 ViT-{size[0].upper()}/14 encoder + transposed-conv U-Net decoder")
    def build(classes: int = 5, in_channels: int = 3, encoder_weights: str | Path | None = None,
              pretrained_encoder: bool = True, **kwargs) -> DinoV2UNet:
        """``pretrained_encoder=False`` ignores ``encoder_weights`` (train.py sets it when saving a run,
        so a trained model rebuilds from its own weights even after the DINOv2 file has moved)."""
        return DinoV2UNet(classes=classes, in_channels=in_channels, size=size,
                          encoder_weights=encoder_weights if pretrained_encoder else None, **kwargs)

    build.__name__ = f"build_dinov2_unet_{size}"


for _size in ENCODERS:
    _register(_size)
