"""LW-IRSTNet (Kou et al., IEEE TGRS 2023): a 0.16 M-parameter ENet-style encoder-decoder, and soft-IoU loss.

Six stages, as in the paper (section III-B, tables I, IV-VIII) and the authors' public ablation code:

1. initial downsampling: 3x3 stride-2 conv (``widths[0] - in_channels`` = 5 channels) concatenated with a
   3x3 stride-2 max-pool of the input (3 channels) -> 8 channels, BN, PReLU;
2. a downsampling module (8 -> 32) and four regular bottlenecks (dropout 0.01);
3. a downsampling module (32 -> 64) and four DAAA modules (dropout 0.1). A DAAA module is four
   bottlenecks: depthwise 3x3 (1x1 expansion x2), atrous 3x3 (1x1 compression /4), asymmetric 7x1 + 1x7
   (compression /4), atrous 3x3 (compression /4); atrous rates (2, 4) in DAAA 1 and 3, (8, 16) in 2 and 4;
4. 3x3 stride-2 deconvolution 64 -> 32, sum with stage 2, two regular bottlenecks;
5. deconvolution 32 -> 8, sum with stage 1, one regular bottleneck;
6. deconvolution 8 -> classes (the logits).

Bottlenecks: 1x1 reduce/expand, the main conv, 1x1 restore, each with BN + activation; spatial dropout;
identity shortcut; activation after the sum. Downsampling modules replace the first 1x1 conv by a 2x2
stride-2 conv; their shortcut is a 2x2 max-pool zero-padded to the output channels. PReLU in the encoder
(stages 1-3), ReLU in the decoder; no bias anywhere. Input sides must be multiples of 8 (``pad_multiple``).

Size at 3x256x256, binary head (``classes=1``): 163,236 parameters (paper: 0.1632 M). The paper's
"303.53 M FLOPs" come from thop, so they are multiply-accumulates (MACs), not 2 x MACs, counted with
thop's conventions (``thop_style_macs``): this model gives 304.05 M that way. The 0.52 M (0.17 %) over
is the authors' code using ReLU, not PReLU, after the depthwise 3x3 (thop counts PReLU, not ReLU); here
the paper's text (PReLU throughout the encoder) is followed. True MACs (``FlopCounterMode`` / 2) are
192.9 M: thop charges a stride-2 deconvolution 4x its real cost and adds BN/PReLU element operations.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.models.registry import register_model

PAPER_PARAMS = 0.1632e6  # table II
PAPER_FLOPS = 303.53e6  # table II, thop "FLOPs" (= MACs) at 3x256x256, one output channel


def _act(prelu: bool) -> nn.Module:
    return nn.PReLU() if prelu else nn.ReLU(inplace=True)


def _conv_bn_act(cin: int, cout: int, kernel: int | tuple[int, int], prelu: bool, stride: int = 1,
                 padding: int | tuple[int, int] = 0, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        _act(prelu),
    )


class InitialBlock(nn.Module):
    """Stage 1: concat(3x3 stride-2 conv, 3x3 stride-2 max-pool) -> BN -> PReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels <= in_channels:
            raise AerialsegError(f"LW-IRSTNet stage-1 width {out_channels} must exceed in_channels {in_channels}",
                                 fix="raise widths[0] (the max-pool branch carries the input bands)")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class Bottleneck(nn.Module):
    """Residual bottleneck: 1x1 -> main conv -> 1x1, each BN + act; spatial dropout; identity sum; act.

    ``kind``: "regular" (3x3), "atrous" (3x3, dilation), "asymmetric" (kx1 then 1xk), "depthwise"
    (depthwise 3x3 on ``channels * expansion`` channels).
    """

    def __init__(self, channels: int, kind: str = "regular", dilation: int = 1, kernel: int = 3,
                 compression: int = 4, expansion: int = 2, dropout: float = 0.0, prelu: bool = True):
        super().__init__()
        inner = channels * expansion if kind == "depthwise" else channels // compression
        if kind == "regular":
            main: nn.Module = _conv_bn_act(inner, inner, 3, prelu, padding=1)
        elif kind == "atrous":
            main = _conv_bn_act(inner, inner, 3, prelu, padding=dilation, dilation=dilation)
        elif kind == "asymmetric":
            main = nn.Sequential(_conv_bn_act(inner, inner, (kernel, 1), prelu, padding=(kernel // 2, 0)),
                                 _conv_bn_act(inner, inner, (1, kernel), prelu, padding=(0, kernel // 2)))
        elif kind == "depthwise":
            main = _conv_bn_act(inner, inner, 3, prelu, padding=1, groups=inner)
        else:
            raise ValueError(f"unknown bottleneck kind '{kind}'")
        self.branch = nn.Sequential(_conv_bn_act(channels, inner, 1, prelu), main,
                                    _conv_bn_act(inner, channels, 1, prelu), nn.Dropout2d(dropout))
        self.act = _act(prelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


class Downsampling(nn.Module):
    """Halve H, W: 2x2 stride-2 conv branch plus a max-pool shortcut zero-padded to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, compression: int = 4, dropout: float = 0.0,
                 prelu: bool = True):
        super().__init__()
        inner = in_channels // compression
        self.extra_channels = out_channels - in_channels
        self.pool = nn.MaxPool2d(2, stride=2)
        self.branch = nn.Sequential(
            _conv_bn_act(in_channels, inner, 2, prelu, stride=2),
            _conv_bn_act(inner, inner, 3, prelu, padding=1),
            _conv_bn_act(inner, out_channels, 1, prelu),
            nn.Dropout2d(dropout),
        )
        self.act = _act(prelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra_channels))  # zero channels at the end
        return self.act(shortcut + self.branch(x))


def daaa_module(channels: int, rates: tuple[int, int], kernel: int = 7, expansion: int = 2, compression: int = 4,
                dropout: float = 0.1) -> nn.Sequential:
    """Depthwise -> atrous(rates[0]) -> asymmetric(kernel) -> atrous(rates[1]) bottlenecks (PReLU)."""
    return nn.Sequential(
        Bottleneck(channels, "depthwise", expansion=expansion, dropout=dropout),
        Bottleneck(channels, "atrous", dilation=rates[0], compression=compression, dropout=dropout),
        Bottleneck(channels, "asymmetric", kernel=kernel, compression=compression, dropout=dropout),
        Bottleneck(channels, "atrous", dilation=rates[1], compression=compression, dropout=dropout),
    )


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    """3x3 stride-2 deconvolution that exactly doubles H and W."""
    return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False)


class LWIRSTNet(nn.Module):
    """LW-IRSTNet; eval and train both return logits (N, classes, H, W). H, W multiples of 8."""

    def __init__(self, classes: int = 1, in_channels: int = 3, widths: tuple[int, int, int] = (8, 32, 64),
                 rates: tuple[int, int, int, int] = (2, 4, 8, 16), asym_kernel: int = 7, expansion: int = 2,
                 compression: int = 4, dropout: tuple[float, float] = (0.01, 0.1)):
        super().__init__()
        w1, w2, w3 = widths
        shallow, deep = dropout
        self.initial = InitialBlock(in_channels, w1)
        self.stage2 = nn.Sequential(Downsampling(w1, w2, dropout=shallow),
                                    *[Bottleneck(w2, "regular", dropout=shallow) for _ in range(4)])
        daaa = [daaa_module(w3, pair, asym_kernel, expansion, compression, deep)
                for pair in [rates[:2], rates[2:]] * 2]
        self.stage3 = nn.Sequential(Downsampling(w2, w3, dropout=deep), *daaa)
        self.up4 = _deconv(w3, w2)
        self.stage4 = nn.Sequential(*[Bottleneck(w2, "regular", dropout=deep, prelu=False) for _ in range(2)])
        self.up5 = _deconv(w2, w1)
        self.stage5 = Bottleneck(w1, "regular", dropout=deep, prelu=False)
        self.up6 = _deconv(w1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.initial(x)
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(self.up4(x3) + x2)
        x5 = self.stage5(self.up5(x4) + x1)
        return self.up6(x5)


@register_model("lwirstnet", pad_multiple=8, tile_size=512, family="lightweight",
                description="LW-IRSTNet (Kou et al. 2023): 0.16 M-parameter ENet-style net with DAAA modules")
def build_lwirstnet(classes: int = 5, in_channels: int = 3, **kwargs) -> LWIRSTNet:
    """Registry builder; ``classes=1`` (or 2) gives the paper's binary head."""
    return LWIRSTNet(classes=classes, in_channels=in_channels, **kwargs)


def thop_style_macs(model: nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    """Operation counts the way thop (the counter behind the paper's "FLOPs") makes them, by kind.

    - ``conv``: multiply-accumulates of regular convs, ``output elements x in_channels/groups x kernel
      area`` (what ``FlopCounterMode`` reports / 2);
    - ``deconv``: transposed convs charged with the same formula on their *output*, 4x their true MACs at
      stride 2 (``FlopCounterMode`` charges the true count);
    - ``norm``: 4 per BN input element (affine), ``prelu``: 1 per PReLU input element (eval mode).
    ReLU, pooling, dropout and the residual sums count 0, as in thop.
    """
    counts = {"conv": 0, "deconv": 0, "norm": 0, "prelu": 0}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv"
            kernel_area = module.weight.shape[2] * module.weight.shape[3]
            counts[kind] += output.numel() * (module.in_channels // module.groups) * kernel_area
        elif isinstance(module, nn.BatchNorm2d):
            counts["norm"] += 4 * args[0].numel()
        elif isinstance(module, nn.PReLU):
            counts["prelu"] += args[0].numel()

    was_training = model.training
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    counts["total"] = sum(counts.values())
    return counts


class SoftIoULoss(nn.Module):
    """Soft (Jaccard) IoU loss, 1 - (sum(p t) + s) / (sum(p + t - p t) + s), from probabilities.

    One output channel: sigmoid probabilities against a {0, 1} target (binary, the paper's setting).
    Several channels: softmax probabilities against one-hot class ids; the IoU is averaged over the
    classes present in the batch's target (``present_only``; an absent class otherwise dominates the
    loss until its probabilities are ~0 everywhere), or over ``classes`` when given. Pixels equal to
    ``ignore_index`` count for nothing. Sums run over the whole batch (the paper's SoftIoULoss, from
    AGPCNet, averages per image; the batch-level sum is steadier with empty tiles).
    """

    def __init__(self, ignore_index: int = IGNORE, smooth: float = 1.0, classes: Iterable[int] | None = None,
                 present_only: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.classes = list(classes) if classes is not None else None
        self.present_only = present_only

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim():  # (N, 1, H, W) targets
            target = target[:, 0]
        valid = (target != self.ignore_index).unsqueeze(1).to(torch.float32)
        target = torch.where(target == self.ignore_index, torch.zeros_like(target), target).long()
        if logits.shape[1] == 1:
            probs = torch.sigmoid(logits.float())
            onehot = target.unsqueeze(1).clamp(0, 1).float()
        else:
            probs = torch.softmax(logits.float(), dim=1)
            onehot = F.one_hot(target.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
        probs, onehot = probs * valid, onehot * valid
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        union = (probs + onehot).sum(dims) - inter
        iou = (inter + self.smooth) / (union + self.smooth)
        if self.classes is not None:
            iou = iou[self.classes]
        elif self.present_only and logits.shape[1] > 1:
            present = onehot.sum(dims) > 0
            iou = iou[present] if bool(present.any()) else iou
        return 1.0 - iou.mean()
