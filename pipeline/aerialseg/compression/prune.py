"""Taylor filter pruning with real structural removal, then a short fine-tune (paper 002, Sec. 2.2).

Method:
- importance of an output filter W_i of a conv/linear layer: Phi(W_i) = |(1/M) sum_m dL/dw_im * w_im|
  (first-order Taylor, Molchanov et al.; eq. 8 of the paper), computed per training batch in eval mode
  (batch-norm statistics are not touched) and averaged over ``score_batches`` batches;
- filters coupled by the network (residual adds, concatenations, depthwise convs) form one torch-pruning
  dependency group; a group's importance per channel is the mean of its coupled filters' scores;
- ``iterations`` rounds each remove ``ratio_per_iteration`` of the remaining channels of every group
  (scope ``local``) or the least important channels network-wide (scope ``global``, scores normalised by
  their group mean), re-scoring before every round; the layers giving the classes are never pruned;
- a fine-tune follows through the training loop's own step (``aerialseg.training.loop.train_step``: the
  ``train.loss`` + the model's aux losses, AdamW or SGD with Nesterov momentum at a constant LR, on CPU).

A pruned model is saved as model.safetensors + model.json whose ``pruning`` record holds the replayable
torch-pruning history (layer name, out/in, channel indices): loading rebuilds the registry model, replays
the plan and loads the weights, so no pickled module is ever read.
"""

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm import tqdm

from aerialseg.core.classes import IGNORE, NUM_CLASSES
from aerialseg.core.errors import AerialsegError
from aerialseg.training.losses import cross_entropy
from aerialseg.models.pruning_plan import PLAN_FORMAT, apply_pruning_plan  # noqa: F401
from aerialseg.models import ModelSpec, count_parameters, create_model, get_spec, load_model, load_state, save_model
from aerialseg.core.config import typed_section
from aerialseg.training.config import TrainConfig
from aerialseg.training.ddp import DistInfo
from aerialseg.training.loop import make_job, train_step

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (images float normalised NCHW, masks int64 NHW)
PRUNABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
OUT_CHANNEL_FNS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)
TRANSFORMER_HINTS = ("segformer", "mit_", "vit", "dinov2", "swin", "transformer")


@dataclass
class PruneConfig:
    """Knobs of the pruning stage (params.yaml section ``prune``)."""

    enabled: bool = False                     # False: the stage writes only prune.json saying so
    iterations: int = 1                       # rounds (the paper: 60 small ones)
    ratio_per_iteration: float = 0.34         # share of the remaining channels removed per round
    score_batches: int = 8                    # training batches averaged for the Taylor scores
    scope: str = "local"                      # local: every group loses the ratio | global: lowest scores net-wide
    max_layer_ratio: float = 0.9              # never remove more than this share of one layer (global scope)
    round_to: int | None = 16                 # keep channel counts multiples of this (16: ONNX Runtime's AVX-512 block)
    ignored_layers: list[str] = field(default_factory=lambda: ["segmentation_head"])
    retrain_epochs: int = 1
    retrain_optimizer: str = "adamw"          # adamw | sgd (Nesterov momentum: the training loop's optimizer)
    retrain_lr: float = 1e-4
    retrain_momentum: float = 0.9             # sgd only
    retrain_weight_decay: float = 1e-4
    example_size: int = 64                    # H = W of the dummy input used to trace the dependency graph
    batch_size: int = 4
    max_patches: int | None = None            # train patches per pass (None = all)
    seed: int = 0
    model_dir: str | None = None              # trained model (None = train.out)
    out: str = "models/pruned"

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> "PruneConfig":
        """Build from the params.yaml section; unknown keys are an error (typos must not pass silently)."""
        return typed_section(cls, "prune", values)

    def validate(self) -> None:
        """Reject values that cannot work, naming the key."""
        if not 0.0 < self.ratio_per_iteration < 1.0:
            raise AerialsegError("prune.ratio_per_iteration must be in (0, 1)", "params.yaml", "e.g. 0.1")
        if self.iterations < 1 or self.score_batches < 1:
            raise AerialsegError("prune.iterations and prune.score_batches must be >= 1", "params.yaml")
        if self.scope not in ("local", "global"):
            raise AerialsegError(f"prune.scope '{self.scope}' is not local or global", "params.yaml")
        if self.retrain_epochs < 0:
            raise AerialsegError("prune.retrain_epochs must be >= 0", "params.yaml")
        if self.retrain_optimizer not in ("sgd", "adamw"):
            raise AerialsegError(f"prune.retrain_optimizer '{self.retrain_optimizer}' is not sgd or adamw",
                                 "params.yaml")


@dataclass
class PruneResult:
    """A pruned (and fine-tuned) model with its replayable plan and what happened to it."""

    model: nn.Module
    plan: dict[str, Any]
    report: dict[str, Any]


# --- loss -------------------------------------------------------------------------------------


Criterion = Callable[[Any, torch.Tensor], torch.Tensor]


def main_logits(outputs: Any) -> torch.Tensor:
    """The main logits of a model output ``logits`` or ``(logits, [aux, ...])``."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def make_criterion(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   aux_weight: float = 0.0) -> Criterion:
    """Training loss on a model output: ``loss_fn`` (default cross-entropy, ignore 255) on the main
    logits plus ``aux_weight`` x the same loss on each auxiliary output (upsampled to the mask)."""
    base = loss_fn or cross_entropy

    def criterion(outputs: Any, masks: torch.Tensor) -> torch.Tensor:
        loss = base(main_logits(outputs), masks)
        if isinstance(outputs, (tuple, list)) and len(outputs) > 1 and aux_weight > 0:
            aux_list = outputs[1] if isinstance(outputs[1], (list, tuple)) else outputs[1:]
            for aux in aux_list:
                aux = F.interpolate(aux, size=masks.shape[-2:], mode="bilinear", align_corners=False)
                loss = loss + aux_weight * base(aux, masks)
        return loss

    return criterion


# --- Taylor importance --------------------------------------------------------------------------


def _filter_view(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """(out_channels, -1) view of a weight-shaped tensor (transposed convs keep out on dim 1)."""
    if isinstance(layer, nn.ConvTranspose2d):
        tensor = tensor.transpose(0, 1)
    return tensor.reshape(tensor.shape[0], -1)


def taylor_filter_scores(model: nn.Module, batches: Iterable[Batch], max_batches: int,
                         criterion: Criterion | None = None) -> dict[nn.Module, torch.Tensor]:
    """Per conv/linear layer: |mean over the filter of dL/dw * w| for every output filter, batch-averaged.

    The model runs in eval mode (batch-norm running statistics stay as they are); gradients are cleared.
    """
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_LAYERS)]
    scores = {m: torch.zeros(_filter_view(m, m.weight).shape[0], dtype=torch.float64) for m in layers}
    criterion = criterion or make_criterion()
    model.eval()
    used = 0
    for images, masks in itertools.islice(batches, max_batches):
        model.zero_grad(set_to_none=True)
        if not bool((masks != IGNORE).any()):
            continue  # a batch of only-ignore pixels has no gradient signal
        loss = criterion(model(images), masks)
        loss.backward()
        with torch.no_grad():
            for layer in layers:
                if layer.weight.grad is None:
                    continue  # not on the forward path (e.g. PSPNet's unused encoder stages)
                contrib = _filter_view(layer, layer.weight.grad * layer.weight).mean(dim=1).abs()
                scores[layer] += contrib.double().cpu()
        used += 1
    model.zero_grad(set_to_none=True)
    if used == 0:
        raise AerialsegError("no training batch with labelled pixels to score filters on",
                             fix="check the training split has labelled patches")
    return {m: (s / used).float() for m, s in scores.items()}


class TaylorFilterImportance(tp.importance.Importance):
    """Group importance from precomputed per-filter Taylor scores (mean over the group's coupled filters)."""

    def __init__(self, scores: dict[nn.Module, torch.Tensor] | None = None, normalize: bool = False):
        self.scores = scores or {}
        self.normalize = normalize

    def __call__(self, group: Any) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        total = torch.zeros(n_root, dtype=torch.float64)
        count = torch.zeros(n_root, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in OUT_CHANNEL_FNS or layer not in self.scores:
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            root = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, root, self.scores[layer][list(idxs)].double())
            count.scatter_add_(0, root, torch.ones(len(root_idxs), dtype=torch.float64))
        if not bool((count > 0).any()):
            return None  # no scored filter in this group: leave it alone
        imp = torch.where(count > 0, total / count.clamp(min=1), total.new_tensor(float("inf")))
        if self.normalize:
            finite = imp[torch.isfinite(imp)]
            imp = imp / finite.mean().clamp(min=1e-12)
        return imp.float()


# --- pruning ------------------------------------------------------------------------------------


STANDARD_PARAM_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                         nn.LayerNorm, nn.PReLU, nn.Embedding)


def check_prunable(model: nn.Module, name: str = "") -> None:
    """Refuse models filter pruning cannot handle: attention/LayerNorm blocks, custom parameter layers."""
    label = name or type(model).__name__
    has_attention = any(isinstance(m, (nn.MultiheadAttention, nn.LayerNorm)) for m in model.modules())
    if has_attention or any(h in name.lower() for h in TRANSFORMER_HINTS):
        raise AerialsegError(f"model '{label}' has attention or LayerNorm blocks (transformer / ConvNeXt); "
                             "Taylor filter pruning supports CNNs only",
                             fix="prune a CNN (deeplabv3plus_*, pspnet_*, unet_*, lwirstnet)")
    custom = [f"{mod_name}.{p_name}".lstrip(".") for mod_name, module in model.named_modules()
              if not isinstance(module, STANDARD_PARAM_LAYERS) for p_name, _ in module.named_parameters(recurse=False)]
    if custom:
        raise AerialsegError(f"model '{label}' holds weights outside standard layers ({', '.join(custom[:3])}"
                             f"{', ...' if len(custom) > 3 else ''}), e.g. dynamic convolution kernels; "
                             "their channels cannot be traced, so Taylor filter pruning supports plain CNNs only",
                             fix="prune a CNN (deeplabv3plus_*, pspnet_*, unet_*, lwirstnet)")


def output_layers(model: nn.Module, classes: int, ignored_names: Sequence[str] = ()) -> list[nn.Module]:
    """Layers that must keep their width: named ones and every conv/linear giving ``classes`` channels."""
    keep: list[nn.Module] = []
    for name, module in model.named_modules():
        named = any(name == n or name.startswith(n + ".") for n in ignored_names)
        gives_classes = isinstance(module, PRUNABLE_LAYERS) and _filter_view(module, module.weight).shape[0] == classes
        if (named and isinstance(module, PRUNABLE_LAYERS)) or gives_classes:
            keep.append(module)
    return keep


def _reiterable(batches: Iterable[Batch]) -> Iterable[Batch]:
    """A one-shot iterator becomes a list so that every round can walk it again."""
    return list(batches) if iter(batches) is batches else batches


def _cumulative_schedule(ratio_per_iteration: float) -> Callable[[float, int], list[float]]:
    """torch-pruning scheduler: after k rounds a share 1 - (1 - r)^k of the initial channels is gone."""
    def schedule(_total: float, steps: int) -> list[float]:
        return [1.0 - (1.0 - ratio_per_iteration) ** k for k in range(steps + 1)]
    return schedule


def build_pruner(model: nn.Module, config: PruneConfig, classes: int, in_channels: int,
                 importance: TaylorFilterImportance) -> tp.pruner.BasePruner:
    """torch-pruning pruner over the model's dependency graph, output layers ignored."""
    example = torch.randn(1, in_channels, config.example_size, config.example_size)
    final = 1.0 - (1.0 - config.ratio_per_iteration) ** config.iterations
    try:
        return tp.pruner.BasePruner(
            model, example, importance=importance, pruning_ratio=final, iterative_steps=config.iterations,
            iterative_pruning_ratio_scheduler=_cumulative_schedule(config.ratio_per_iteration),
            ignored_layers=output_layers(model, classes, config.ignored_layers),
            global_pruning=config.scope == "global", max_pruning_ratio=config.max_layer_ratio,
            round_to=config.round_to)
    except Exception as exc:  # tracing failures of exotic modules
        raise AerialsegError(f"cannot trace the model's channel dependencies ({type(exc).__name__}: "
                             f"{str(exc)[:160]})", fix="prune a plain CNN model") from None


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv/linear layer, by module name."""
    return {n: _filter_view(m, m.weight).shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE_LAYERS)}


def prune_model(model: nn.Module, batches: Iterable[Batch], config: PruneConfig, classes: int = NUM_CLASSES,
                in_channels: int = 3, criterion: Criterion | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Iterative Taylor pruning in place; returns the model and its replayable plan."""
    batches = _reiterable(batches)
    importance = TaylorFilterImportance(normalize=config.scope == "global")
    pruner = build_pruner(model, config, classes, in_channels, importance)
    rounds = []
    for step in tqdm(range(config.iterations), desc="prune", unit="round"):
        importance.scores = taylor_filter_scores(model, batches, config.score_batches, criterion)
        pruner.step()
        rounds.append({"round": step + 1, "params": count_parameters(model)})
        log.info("prune round %d/%d: %.2f M parameters", step + 1, config.iterations, rounds[-1]["params"] / 1e6)
    model.zero_grad(set_to_none=True)
    plan = {"format": PLAN_FORMAT, "example_size": config.example_size, "in_channels": in_channels,
            "history": _json_history(pruner.pruning_history()), "rounds": rounds}
    return model, plan


def _json_history(history: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


# --- fine-tune ----------------------------------------------------------------------------------


def mean_loss(model: nn.Module, batches: Iterable[Batch], criterion: Criterion | None = None) -> float:
    """Mean training loss over the batches in eval mode (no gradients; all-ignore batches skipped)."""
    criterion = criterion or make_criterion()
    model.eval()
    losses = []
    with torch.no_grad():
        for images, masks in batches:
            if bool((masks != IGNORE).any()):
                losses.append(float(criterion(model(images), masks)))
    return sum(losses) / max(len(losses), 1)


def fine_tune(model: nn.Module, batches: Iterable[Batch], epochs: int, spec: ModelSpec, lr: float = 1e-3,
              momentum: float = 0.9, weight_decay: float = 1e-3, optimizer: str = "sgd",
              loss: dict[str, Any] | None = None) -> list[float]:
    """Retrain the pruned model with the training loop's step (``loss``: the ``train.loss`` params, plus the
    spec's aux losses; SGD with Nesterov momentum, or AdamW; constant LR; CPU); returns each epoch's mean loss."""
    batches = _reiterable(batches)
    cfg = TrainConfig(model=spec.name, epochs=max(epochs, 1), optimizer=optimizer, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, schedule="constant", warmup_epochs=0.0, patch_size=None,
                      amp=False, channels_last=False, loss=dict(loss or {"name": "ce"}))
    job = make_job(cfg, model, torch.device("cpu"), DistInfo(), 1, spec=spec)
    job.normalised = True  # PatchBatches normalise with the spec already
    history = []
    for epoch in range(epochs):
        model.train()
        losses = []
        for images, masks in tqdm(batches, desc=f"retrain {epoch + 1}/{epochs}", unit="batch", leave=False):
            if not bool((masks != IGNORE).any()):
                continue
            losses.append(train_step(job, images, masks))
            if not math.isfinite(losses[-1]):
                raise AerialsegError(f"retrain loss is {losses[-1]} at epoch {epoch + 1}", fix="lower prune.retrain_lr")
        history.append(sum(losses) / max(len(losses), 1))
        log.info("retrain epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    model.eval()
    return history


def prune_and_retrain(model: nn.Module, train_batches: Iterable[Batch], config: PruneConfig, name: str = "",
                      classes: int = NUM_CLASSES, in_channels: int = 3, criterion: Criterion | None = None,
                      retrain: Callable[[nn.Module], list[float]] | None = None,
                      loss: dict[str, Any] | None = None) -> PruneResult:
    """Prune, then fine-tune (``fine_tune`` of registry model ``name`` with the ``train.loss`` params ``loss``);
    ``retrain`` (model -> epoch losses) replaces it."""
    check_prunable(model, name)
    train_batches = _reiterable(train_batches)
    score_set = list(itertools.islice(iter(train_batches), config.score_batches))
    before = {"params": count_parameters(model), "loss": mean_loss(model, score_set, criterion),
              "channels": channel_counts(model)}
    start = time.perf_counter()
    model, plan = prune_model(model, train_batches, config, classes, in_channels, criterion)
    pruned_loss = mean_loss(model, score_set, criterion)
    if retrain is not None:
        epoch_losses = retrain(model)
    else:
        epoch_losses = fine_tune(model, train_batches, config.retrain_epochs, get_spec(name), config.retrain_lr,
                                 config.retrain_momentum, config.retrain_weight_decay, config.retrain_optimizer, loss)
    after_channels = channel_counts(model)
    report = {
        "params_before": before["params"], "params_after": count_parameters(model),
        "param_ratio": round(count_parameters(model) / max(before["params"], 1), 4),
        "loss_before": round(before["loss"], 5), "loss_after_pruning": round(pruned_loss, 5),
        "loss_after_retrain": round(mean_loss(model, score_set, criterion), 5),
        "retrain_epoch_losses": [round(x, 5) for x in epoch_losses],
        "channels": {n: [before["channels"][n], c] for n, c in after_channels.items() if c != before["channels"][n]},
        "seconds": round(time.perf_counter() - start, 1), "config": asdict(config),
    }
    return PruneResult(model=model.eval(), plan=plan, report=report)


# --- save / load --------------------------------------------------------------------------------


def save_pruned_model(model: nn.Module, directory: str | Path, name: str, plan: dict[str, Any],
                      classes: int = NUM_CLASSES, in_channels: int = 3, kwargs: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """model.safetensors + model.json whose ``pruning`` record rebuilds the structure."""
    return save_model(model, directory, name, classes=classes, in_channels=in_channels, kwargs=kwargs,
                      extra={"pruning": plan, "params": count_parameters(model), **(extra or {})})


def load_pruned_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registry model, replay the pruning plan, load the weights (safetensors, no pickle)."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise AerialsegError("no model.json in the model directory", directory, "run `aerialseg prune` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "pruning" not in meta:
        raise AerialsegError("model.json has no pruning record", meta_path, "use load_model for unpruned models")
    model = create_model(meta["name"], classes=meta["classes"], in_channels=meta["in_channels"], **meta["kwargs"])
    apply_pruning_plan(model, meta["pruning"])
    load_state(model, directory / "model.safetensors")
    return model.eval(), meta


def load_model_dir(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load any model directory: pruned ones through their plan, others through the registry."""
    meta_path = Path(directory) / "model.json"
    if meta_path.is_file() and "pruning" in json.loads(meta_path.read_text(encoding="utf-8")):
        return load_pruned_model(directory)
    return load_model(directory)


# --- batches ------------------------------------------------------------------------------------


class PatchBatches:
    """Re-iterable normalised batches of a patch dataset (items (uint8 HxWxC image, uint8 HxW mask)),
    streamed, not held in memory."""

    def __init__(self, dataset: Sequence[tuple[np.ndarray, np.ndarray]], spec: ModelSpec, batch_size: int = 4,
                 limit: int | None = None, shuffle: bool = False, seed: int = 0):
        self.dataset = dataset
        self.spec, self.batch_size, self.limit, self.shuffle, self.seed = spec, batch_size, limit, shuffle, seed
        self._epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        return -(-n // self.batch_size)

    def indices(self) -> list[int]:
        """Patch indices of one pass (shuffled per pass when asked)."""
        order = list(range(len(self.dataset)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self._epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
            self._epoch += 1
        return order if self.limit is None else order[: self.limit]

    def __iter__(self) -> Iterator[Batch]:
        order = self.indices()
        for start in range(0, len(order), self.batch_size):
            items = [self.dataset[i] for i in order[start:start + self.batch_size]]
            images = torch.from_numpy(np.stack([img for img, _ in items])).permute(0, 3, 1, 2)
            masks = torch.from_numpy(np.stack([m for _, m in items])).long()
            yield self.spec.normalize(images), masks
