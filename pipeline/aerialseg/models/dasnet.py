"""DAS-Net (Kim & Kim 2026): U-Net with dynamic convolution, attention gates and deep supervision.

Four registered variants, the paper's ablation table (flags of one ``DynamicUNet``):

| name | encoder | decoder | attention gates | deep supervision | paper params | here |
|---|---|---|---|---|---|---|
| thin_dyunet | DyConv | 2 x (conv-BN-LeakyReLU) | - | - | 1.34 M | 1,341,385 |
| full_dyunet | DyConv | DyConv | - | - | 1.63 M | 1,628,581 |
| deepsup_dyunet | DyConv | 2 x conv | - | yes (lambda 0.4) | 1.34 M | 1,341,580 |
| dasnet | DyConv | DyConv | yes | yes (lambda 0.4) | 1.66 M | 1,657,672 |

Widths: the paper's text leaves them open. The authors' released configs (github.com/niceyoungjae/DAS-net,
``configs/config_*.yaml``: ``start_out_channels: 64``, ``num_blocks: 7``, ``num_padding: 1``,
``is_upsample: True``) give a constant width of 64 at every one of 8 encoder levels (7 max-pools),
bilinear x2 upsampling and 3x3 "same" convs; these reproduce all four counts above (counts for 1 class).

- ``DyConvBlock``: K = 2 kernels; attention = softmax(MLP(global average pool(x)) / temperature) mixes
  them per sample into one kernel (one conv's cost), then GroupNorm(8) + LeakyReLU. Temperature 30 as
  in the authors' code (it keeps the mixture near-uniform early in training, as in Chen et al. 2020).
  Each kernel starts like an ``nn.Conv2d`` (Kaiming-uniform; the authors' code draws N(0, 1)). During
  export/tracing the same result is computed as K plain convs mixed afterwards (batch-size free graph).
- Attention gate (Oktay et al. 2018) on every skip: ``skip * sigmoid(psi(relu(Wg g + Wx skip)))`` with
  g the upsampled decoder feature; 1x1 convs to width/2.
- Deep supervision: a 1x1 head after each of the last three decoder stages, upsampled to the input
  size. In train mode the model returns ``(logits, [aux, aux, aux])`` (``spec.aux_weight`` = 0.4); in
  eval mode only logits, so the heads never enter an exported graph.
- Head: 3x3 conv + 1x1 conv (both with bias), as in the authors' ``OutputBlock``.

Input sides must be multiples of 2**depth = 128 (``pad_multiple``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.models.registry import register_model

PAPER_PARAMS = {"thin_dyunet": 1.34e6, "full_dyunet": 1.63e6, "deepsup_dyunet": 1.34e6, "dasnet": 1.66e6}


def _exporting() -> bool:
    """True while torch.export / ONNX export / TorchScript tracing runs the model."""
    return bool(torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


class DyConvBlock(nn.Module):
    """Dynamic 3x3 conv: K kernels mixed per sample by input-dependent attention, then GN + LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernels: int = 2, temperature: float = 30.0,
                 groups_norm: int = 8):
        super().__init__()
        hidden = kernels if in_channels <= 4 else in_channels // 4 + 1
        self.kernels = kernels
        self.temperature = temperature
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, kernels, 1),
        )
        self.weight = nn.Parameter(torch.empty(kernels, out_channels, in_channels, 3, 3))
        for k in range(kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        self.norm = nn.GroupNorm(groups_norm, out_channels)
        self.act = nn.LeakyReLU(inplace=True)

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) softmax attention over the K kernels."""
        return torch.softmax(self.attention(x).flatten(1) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.mixing_weights(x)
        out = self._mix_outputs(x, attn) if _exporting() else self._mix_kernels(x, attn)
        return self.act(self.norm(out))

    def _mix_kernels(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """One grouped conv with a per-sample aggregated kernel (the cost of a single conv)."""
        n, c, h, w = x.shape
        kernel = (attn @ self.weight.flatten(1)).view(n * self.weight.shape[1], c, 3, 3)
        out = F.conv2d(x.reshape(1, n * c, h, w), kernel, padding=1, groups=n)
        return out.view(n, -1, h, w)

    def _mix_outputs(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Same result from K plain convs (linear in the kernel); batch-size free, for export."""
        k, cout = self.weight.shape[:2]
        out = F.conv2d(x, self.weight.flatten(0, 1), padding=1)
        out = out.unflatten(1, (k, cout)) * attn[:, :, None, None, None]
        return out.sum(dim=1)


class ConvStack(nn.Module):
    """ThinDyUNet's decoder block: ``n`` x (3x3 conv, BN, LeakyReLU)."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.LeakyReLU(inplace=True)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class AttentionGate(nn.Module):
    """Additive attention gate: scales the skip feature by a [0, 1] map computed from it and the gate."""

    def __init__(self, gate_channels: int, skip_channels: int, inner_channels: int):
        super().__init__()
        self.w_gate = nn.Conv2d(gate_channels, inner_channels, 1, bias=False)
        self.w_skip = nn.Conv2d(skip_channels, inner_channels, 1, bias=False)
        self.psi = nn.Conv2d(inner_channels, 1, 1, bias=False)

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.w_gate(gate) + self.w_skip(skip))))
        return skip * alpha


class DynamicUNet(nn.Module):
    """The DAS-Net family; flags choose the ablation variant (see the module docstring)."""

    def __init__(self, classes: int = 5, in_channels: int = 3, width: int = 64, depth: int = 7,
                 dyconv_decoder: bool = True, attention_gates: bool = True, deep_supervision: bool = True,
                 kernels: int = 2, temperature: float = 30.0, aux_stages: int = 3):
        super().__init__()
        self.depth = depth
        self.encoder = nn.ModuleList(
            DyConvBlock(in_channels if i == 0 else width, width, kernels, temperature) for i in range(depth + 1))
        self.decoder = nn.ModuleList(
            DyConvBlock(2 * width, width, kernels, temperature) if dyconv_decoder else ConvStack(2 * width, width)
            for _ in range(depth))
        self.gates = nn.ModuleList(AttentionGate(width, width, width // 2) for _ in range(depth)) \
            if attention_gates else None
        self.aux_heads = nn.ModuleList(nn.Conv2d(width, classes, 1) for _ in range(min(aux_stages, depth))) \
            if deep_supervision else None
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[-2:]
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        want_aux = self.training and self.aux_heads is not None
        aux: list[torch.Tensor] = []
        first_aux = self.depth - (len(self.aux_heads) if self.aux_heads is not None else 0)
        for i, block in enumerate(self.decoder):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            if self.gates is not None:
                skip = self.gates[i](x, skip)
            x = block(torch.cat([x, skip], dim=1))
            if want_aux and i >= first_aux:
                aux.append(F.interpolate(self.aux_heads[i - first_aux](x), size=size, mode="bilinear",
                                         align_corners=True))
        logits = self.head(x)
        return (logits, aux) if want_aux else logits


VARIANTS = {
    "thin_dyunet": dict(dyconv_decoder=False, attention_gates=False, deep_supervision=False),
    "full_dyunet": dict(dyconv_decoder=True, attention_gates=False, deep_supervision=False),
    "deepsup_dyunet": dict(dyconv_decoder=False, attention_gates=False, deep_supervision=True),
    "dasnet": dict(dyconv_decoder=True, attention_gates=True, deep_supervision=True),
}
_DESCRIPTIONS = {
    "thin_dyunet": "ThinDyUNet: DyConv encoder, plain conv decoder (DAS-Net ablation baseline, 1.34 M)",
    "full_dyunet": "FullDyUNet: DyConv encoder and decoder (DAS-Net ablation, 1.63 M)",
    "deepsup_dyunet": "DeepSupDyUNet: ThinDyUNet + deep supervision (DAS-Net ablation, 1.34 M)",
    "dasnet": "DAS-Net: dynamic conv + attention gates + deep supervision (Kim & Kim 2026, 1.66 M)",
}


def _register(name: str) -> None:
    flags = VARIANTS[name]

    @register_model(name, pad_multiple=128, tile_size=512, family="dasnet", description=_DESCRIPTIONS[name],
                    aux_weight=0.4 if flags["deep_supervision"] else 0.0)
    def build(classes: int = 5, in_channels: int = 3, **kwargs) -> DynamicUNet:
        return DynamicUNet(classes=classes, in_channels=in_channels, **{**flags, **kwargs})

    build.__name__ = f"build_{name}"


for _name in VARIANTS:
    _register(_name)
