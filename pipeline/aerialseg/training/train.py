"""Training: one loop for plain training, OpenEarthMap pretraining and distillation (optional teacher).

``train_model(cfg, datasets, out_dir)`` trains ``cfg.model`` on the train dataset and validates on the val
dataset every epoch (the train stage, ``aerialseg.stages.train``, builds both from params). It writes, into
``out_dir`` (rank 0 only under torchrun):

- ``model.safetensors`` + ``model.json``: the weights of the best epoch (validation mIoU) and how to
  rebuild them (``aerialseg.models.save_model``; training data hash, metrics, GSD, seed);
- ``checkpoints/last.pt``: everything needed to resume (model, optimizer, scheduler, AMP scaler, RNG
  states, epoch, history, early-stopping state), written with ``torch.save`` of tensors and plain
  containers only and read back with ``torch.load(weights_only=True)``, so no file can run code;
- ``history.csv`` (epoch, train_loss, val_loss, val_mIoU, lr, seconds) and ``curves.png``;
- ``train_summary.json`` (model, seed, epochs run, best epoch and mIoU, time).

Repeatability: every epoch starts from seeds derived from ``(train.seed, epoch, rank)`` (Python,
NumPy, torch, the sampler, DataLoader workers and the albumentations pipeline), and with
``train.deterministic`` torch uses deterministic kernels, so two CPU runs give identical weights and
a resumed run ends where an uninterrupted one does. On CUDA the loop uses autocast (float16) with a
GradScaler (``train.amp``).
"""

import csv
import inspect
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from aerialseg.training import ddp
from aerialseg.data.augment import seed_transform
from aerialseg.core.classes import IGNORE, NUM_CLASSES
from aerialseg.data.datasets import PatchDataset, collate_patches
from aerialseg.data.tiling import class_counts
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, fingerprint, write_json  # fingerprint: re-exported
from aerialseg.training.losses import LossFn, build_loss, distillation_kl
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.models import (ModelSpec, count_parameters, create_model, get_spec, load_model, load_state,
                              pad_to_multiple, save_model)
from aerialseg.core.config import DEFAULT_PARAMS, check_keys

log = logging.getLogger(__name__)

DEFAULT_MODEL = "unet_efficientnet_lite0"
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_mIoU", "lr", "seconds")
CHECKPOINT = "checkpoints/last.pt"
EpochHook = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainConfig:
    """The knobs of one training run (params.yaml ``model`` + ``train`` sections)."""

    model: str = DEFAULT_MODEL
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 14
    batch_size: int = 8
    patch_size: int | None = 192  # one random crop per batch; None = the whole patch
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0  # the encoder's LR = lr x this (e.g. 0.1 keeps pretrained features closer)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "poly"  # poly | cosine | constant, per iteration
    poly_power: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "ce", "class_weights": None, "label_smoothing": 0.0,
                                                          "focal_gamma": 2.0, "dice_weight": 1.0})
    seed: int = 42
    patience: int = 0  # early stopping: epochs without a better val mIoU (0 = off)
    init_from: str | None = None
    device: str = "auto"
    amp: bool = True
    num_workers: int | str = "auto"
    deterministic: bool = True
    grad_clip: float | None = None
    threads: int | None = None  # torch CPU threads (None = torch's default)
    online_augment: bool = True  # also apply augment.pipeline on the fly (offline copies are used either way)
    channels_last: bool = True  # NHWC memory format for model and batches: faster on CPU (bench/bench_train.py)
    sampling: str = "uniform"  # uniform: every patch once per epoch | balanced: drawn by rare-class content
    class_mix: float = 0.0  # probability per patch of ClassMix: half the classes of another patch of the batch
    # (their pixels and labels) pasted onto it (0 = off)
    ema: float = 0.0  # decay per step of an exponential moving average of the weights, which is then the model
    # validated and saved (0 = off; 0.99 averages over ~100 steps)
    alpha: float = 0.5  # distillation weight of the KL term
    temperature: float = 4.0  # distillation temperature (of the first epoch when annealed)
    final_temperature: float | None = 1.0  # distillation temperature of the last epoch (None = constant)
    init_from_teacher: bool = False  # distillation: the student's encoder starts as the teacher's (same names/shapes)

    @classmethod
    def from_sections(cls, model: dict[str, Any], train: dict[str, Any], distil: dict[str, Any]) -> "TrainConfig":
        """Build from the params ``model``, ``train`` and ``distil`` sections; unknown ``train`` keys are an
        error (typos must not pass silently); ``train.out`` is the stage's output path, not a knob."""
        train = {k: v for k, v in train.items() if k != "out"}
        known = {f.name for f in cls.__dataclass_fields__.values()} - {"model", "model_kwargs"}
        check_keys("train", train, sorted(known))
        cfg = cls(model=str(model.get("name", DEFAULT_MODEL)), model_kwargs=dict(model.get("kwargs") or {}),
                  **train)
        cfg.alpha = float(distil.get("alpha", cfg.alpha))
        cfg.temperature = float(distil.get("temperature", cfg.temperature))
        final = distil.get("final_temperature", cfg.final_temperature)
        cfg.final_temperature = None if final is None else float(final)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Reject values that would fail later or silently do nothing."""
        problems = []
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("train.epochs and train.batch_size must be >= 1")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            problems.append(f"train.optimizer '{self.optimizer}' is not adamw, adam or sgd")
        if self.schedule not in ("poly", "cosine", "constant"):
            problems.append(f"train.schedule '{self.schedule}' is not poly, cosine or constant")
        if self.sampling not in ("uniform", "balanced"):
            problems.append(f"train.sampling '{self.sampling}' is not uniform or balanced")
        if not 0.0 <= self.class_mix <= 1.0:
            problems.append(f"train.class_mix {self.class_mix} is not a probability in [0, 1]")
        if not 0.0 <= self.ema < 1.0:
            problems.append(f"train.ema {self.ema} is not in [0, 1)")
        if self.encoder_lr_scale <= 0:
            problems.append(f"train.encoder_lr_scale {self.encoder_lr_scale} must be > 0")
        if self.init_from_teacher and self.init_from:
            problems.append("distil.init_from_teacher and distil.init_from both set a starting point: keep one")
        if self.lr <= 0 or self.temperature <= 0 or (self.final_temperature is not None and self.final_temperature <= 0):
            problems.append("train.lr, distil.temperature and distil.final_temperature must be > 0")
        if problems:
            raise AerialsegError("; ".join(problems), DEFAULT_PARAMS)

    def temperature_at(self, epoch: int) -> float:
        """Distillation temperature of ``epoch`` (0-based): linear from ``temperature`` to ``final_temperature``."""
        if self.final_temperature is None or self.epochs < 2:
            return self.temperature
        progress = min(max(epoch, 0), self.epochs - 1) / (self.epochs - 1)
        return self.temperature + (self.final_temperature - self.temperature) * progress


# --- data ----------------------------------------------------------------------------------------

class ArrayPatchDataset(Dataset):
    """In-memory patches: a list of (image uint8 HxWx3, mask uint8 HxW); optional albumentations transform."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], transform: Callable[..., Any] | None = None):
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def item_class_counts(self) -> np.ndarray:
        """(items, 6) pixel counts [background, road, water, tree, building, ignore] of each mask."""
        return np.array([class_counts(mask) for _, mask in self.pairs], dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.pairs[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask


def _find_transform(dataset: Any) -> Any:
    """The albumentations pipeline of a dataset (looking through Subset wrappers), if any."""
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if transform is not None:
            return transform
        dataset = getattr(dataset, "dataset", None)
    return None


def seed_everything(seed: int, dataset: Any = None) -> None:
    """Seed Python, NumPy, torch and the dataset's albumentations pipeline."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transform = _find_transform(dataset)
    if transform is not None and hasattr(transform, "set_random_state"):
        seed_transform(transform, seed)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed_everything(torch.initial_seed(), info.dataset if info else None)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed every RNG is reset to at the start of an epoch."""
    return (int(seed) * 1_000_003 + epoch * 1009 + rank) % (2**31)


# --- model, optimizer, schedule ------------------------------------------------------------------

def resolve_device(name: str, info: ddp.DistInfo | None = None) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU."""
    info = info or ddp.env_info()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AerialsegError("CUDA requested but not available", DEFAULT_PARAMS, "set train.device: auto or cpu")
    return torch.device(name)


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels (repeatable runs) or cuDNN autotuning (faster GPU runs)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def saved_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs to store in model.json: rebuilding from saved weights needs no ImageNet init."""
    params = inspect.signature(get_spec(name).builder).parameters
    return {**kwargs, "pretrained_encoder": False} if "pretrained_encoder" in params else dict(kwargs)


def init_weights(model: nn.Module, init_from: str | Path, model_name: str) -> str | None:
    """Load a pretrained model dir (or weights file) into ``model``; returns what was loaded, or None.

    A model dir of a different architecture is skipped with a warning (e.g. pretraining ran for another
    model); a dir written by a disabled ``aerialseg pretrain`` holds no weights and is skipped too.
    """
    path = Path(init_from)
    if path.is_file():
        load_state(model, path)
        return str(path)
    if not path.is_dir():
        raise AerialsegError("train.init_from not found", path, "run `aerialseg pretrain` first (it writes the "
                             "folder even when disabled), or set train.init_from: null")
    marker = path / "pretrain.json"
    if marker.is_file() and not json.loads(marker.read_text(encoding="utf-8")).get("enabled", True):
        log.info("init_from %s: pretraining was disabled, starting from the default init", path)
        return None
    if not (path / "model.json").is_file():
        raise AerialsegError("no model.json in train.init_from", path, "point it at a dir written by train/pretrain")
    meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
    if meta.get("name") != model_name:
        log.warning("init_from %s holds %s, not %s: not used", path, meta.get("name"), model_name)
        return None
    load_state(model, path / "model.safetensors")
    log.info("initialised %s from %s", model_name, path)
    return str(path)


def copy_teacher_weights(model: nn.Module, teacher: "Teacher | None", teacher_dir: str | Path | None) -> str:
    """Start a student's encoder from its teacher's: every encoder tensor of the same name and shape (e.g. the
    stages ``unet_efficientnet_lite0_slim`` keeps of ``unet_efficientnet_lite0``); the rest keeps its own init
    (a decoder of other widths learns other features even where a shape happens to agree). Returns what was
    loaded, for model.json."""
    if teacher is None:
        raise AerialsegError("train.init_from_teacher is set but this run has no teacher", DEFAULT_PARAMS,
                             "use it only for distillation (distil.init_from_teacher)")
    source, target = teacher.model.state_dict(), model.state_dict()
    shared = {k: v for k, v in source.items()
              if k.startswith("encoder.") and k in target and target[k].shape == v.shape}
    if not shared:
        raise AerialsegError(f"student {type(model).__name__} shares no encoder tensor (name and shape) with teacher "
                             f"{teacher.name}", teacher_dir, "set distil.init_from_teacher: false")
    model.load_state_dict(shared, strict=False)
    log.info("student starts from %d of its %d tensors copied from teacher %s", len(shared), len(target), teacher_dir)
    return f"{teacher_dir} (teacher's encoder: {len(shared)} of {len(target)} tensors)"


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory format for every 4-D parameter and buffer, in place (higher-rank ones, e.g. DAS-Net's
    dynamic kernels, which ``model.to(memory_format=...)`` refuses, stay as they are)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters, the encoder's in a group of its own at ``lr * encoder_lr_scale``."""
    if cfg.encoder_lr_scale == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise AerialsegError(f"train.encoder_lr_scale needs a model with an encoder; {cfg.model} has none",
                             DEFAULT_PARAMS, "set train.encoder_lr_scale: 1.0 for this model")
    in_encoder = {id(p) for p in encoder.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) in in_encoder], "lr": cfg.lr * cfg.encoder_lr_scale},
            {"params": [p for p in trainable if id(p) not in in_encoder]}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (momentum, Nesterov) over the trainable parameters (``parameter_groups``)."""
    params = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LRFactor:
    """Per-iteration LR multiplier: linear warmup, then poly / cosine decay to ``min_ratio``."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, power: float, min_ratio: float):
        self.schedule = schedule
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, warmup_steps)
        self.power = power
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "poly":
            factor = (1.0 - progress) ** self.power
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per iteration over ``epochs * steps_per_epoch`` iterations."""
    factor = LRFactor(cfg.schedule, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                      cfg.poly_power, cfg.min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- forward passes ------------------------------------------------------------------------------

def split_output(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Model output -> (logits, auxiliary logits); deep-supervision models return (logits, [aux, ...])."""
    if isinstance(output, (tuple, list)):
        aux = output[1] if len(output) > 1 else []
        aux = list(aux) if isinstance(aux, (tuple, list)) else [aux]
        return output[0], aux
    return output, []


def forward_logits(model: nn.Module, spec: ModelSpec, images: torch.Tensor,
                   train: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 (N, 3, H, W) on the model's device -> logits (N, C, H, W) (+ aux logits at H, W)."""
    x, (h, w) = pad_to_multiple(spec.normalize(images), spec.pad_multiple)
    logits, aux = split_output(model(x))
    logits = logits[..., :h, :w]
    if train:
        aux = [F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w] for a in aux]
    return logits, aux


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """float16 autocast on CUDA; disabled (plain fp32) elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


@dataclass
class Teacher:
    """A frozen trained model whose soft predictions the student learns from."""

    model: nn.Module
    spec: ModelSpec
    name: str

    @torch.no_grad()
    def logits(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out, _ = forward_logits(self.model, self.spec, images)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
        return out.float()


def load_teacher(model_dir: str | Path, device: torch.device) -> Teacher:
    """Load a trained model dir as a frozen teacher (eval mode, no gradients)."""
    model, meta = load_model(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model.to(device).eval(), get_spec(meta["name"]), meta["name"])


# --- checkpoints and outputs ---------------------------------------------------------------------

@dataclass
class LoopState:
    """Progress that a resumed run must restore."""

    epoch: int = 0  # next epoch to run
    best_miou: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    init_from: str | None = None  # the pretrained weights the run started from


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the states saved by ``rng_states``."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, job: "Job", state: LoopState) -> None:
    """Full training state with ``torch.save`` (tensors and plain containers only), atomically."""
    payload = {"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
               "scheduler": job.scheduler.state_dict(), "scaler": job.scaler.state_dict(), "rng": rng_states(),
               "loop": asdict(state), "config": asdict(job.cfg)}
    if job.ema is not None:
        payload["ema"] = job.ema.state_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise AerialsegError("no checkpoint to resume from", path, "run without --resume to start afresh")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a pickle with code, or a corrupt file
        raise AerialsegError(f"refusing to load checkpoint ({type(exc).__name__}: not tensors and plain data)",
                             path, "only load checkpoints written by aerialseg") from None


def write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """history.csv (for ``dvc plots``) and curves.png (loss and mIoU per epoch)."""
    with atomic_path(out_dir / "history.csv") as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
    plot_history(history, out_dir / "curves.png")


def plot_history(history: list[dict[str, Any]], dest: Path) -> Path:
    """Two panels: train/val loss and val mIoU against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_miou.plot(epochs, [row["val_mIoU"] for row in history], "o-", color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return dest


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Job:
    """Everything one epoch needs."""

    cfg: TrainConfig
    spec: ModelSpec
    model: nn.Module  # the bare model (saved, validated)
    net: nn.Module  # what the training step calls (DDP wrapper or the model)
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    info: ddp.DistInfo
    teacher: Teacher | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None  # moving average of ``model`` (train.ema)
    epoch: int = 0  # the epoch being trained (0-based): the distillation temperature follows it

    @property
    def result(self) -> nn.Module:
        """The weights that are validated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (None when ``decay`` is 0)."""
    if decay <= 0:
        return None
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)


def _num_workers(cfg: TrainConfig, device: torch.device, info: ddp.DistInfo) -> int:
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    return 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 1) // info.world_size))


def rare_class_weights(counts: np.ndarray) -> np.ndarray:
    """Per-item draw weights: the mean over an item's labelled pixels of (class share in the split)^-1/2,
    so a patch of a rare class is drawn more often than one of background (1 where nothing is labelled)."""
    shares = counts.sum(axis=0) / max(counts.sum(), 1)
    class_weight = np.zeros(len(shares))
    class_weight[shares > 0] = shares[shares > 0] ** -0.5
    labelled = counts.sum(axis=1)
    return np.where(labelled > 0, counts @ class_weight / np.maximum(labelled, 1), 1.0)


class BalancedSampler(Sampler[int]):
    """``len(dataset)`` draws per epoch with replacement, weighted by ``rare_class_weights``; each rank
    takes its share of one seeded draw (reseeded per epoch with ``set_epoch``)."""

    def __init__(self, weights: np.ndarray, seed: int, info: ddp.DistInfo):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.info, self.epoch = seed, info, 0
        self.num_samples = math.ceil(len(weights) / info.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.info.world_size, True, generator=generator)
        return iter(draws[self.info.rank::self.info.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_train_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, info: ddp.DistInfo) -> DataLoader:
    """Shuffled (or drawn by rare-class content, ``train.sampling: balanced``), sharded per rank, reseeded each
    epoch, last short batch dropped."""
    if len(dataset) < 2:
        raise AerialsegError(f"only {len(dataset)} training patch(es)", fix="label more area or lower tiles.size")
    if cfg.sampling == "balanced":
        if not hasattr(dataset, "item_class_counts"):
            raise AerialsegError(f"train.sampling: balanced needs per-patch class counts, which {type(dataset).__name__} "
                                 "lacks", DEFAULT_PARAMS, "set train.sampling: uniform (e.g. for pretraining)")
        counts = dataset.item_class_counts()[:, :NUM_CLASSES]
        sampler: Sampler[int] = BalancedSampler(rare_class_weights(counts), cfg.seed, info)
    else:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed)
    drop_last = len(sampler) > cfg.batch_size
    workers = _num_workers(cfg, device, info)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_patches,
                      num_workers=workers, worker_init_fn=_worker_init if workers else None, drop_last=drop_last,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def make_eval_loader(dataset: Dataset, batch_size: int, info: ddp.DistInfo, workers: int = 0) -> DataLoader:
    """In order; rank r takes items r, r + world, ... (no padding, so nothing is counted twice)."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.distributed else dataset
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_patches, num_workers=workers)


def random_crop(images: torch.Tensor, masks: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size`` crop for the whole batch (a no-op when the patches are not larger)."""
    h, w = masks.shape[-2:]
    if not size or (h <= size and w <= size):
        return images, masks
    ch, cw = min(size, h), min(size, w)
    top, left = random.randint(0, h - ch), random.randint(0, w - cw)
    return images[..., top:top + ch, left:left + cw], masks[..., top:top + ch, left:left + cw]


def class_mix(images: torch.Tensor, masks: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al., WACV 2021) with labels on both sides: with probability ``p`` a patch gets the pixels
    and labels of a random half of the classes of another patch of the batch (ignore is never pasted)."""
    if p <= 0 or len(masks) < 2:
        return images, masks
    partners = (torch.arange(len(masks)) + torch.randint(1, len(masks), (1,))) % len(masks)
    mixed_images, mixed_masks = images.clone(), masks.clone()
    for target, source in enumerate(partners.tolist()):
        present = [c for c in torch.unique(masks[source]).tolist() if c != IGNORE]
        if not present or float(torch.rand(())) >= p:
            continue
        chosen = torch.tensor(present)[torch.randperm(len(present))[:(len(present) + 1) // 2]]
        paste = torch.isin(masks[source], chosen)
        mixed_images[target] = torch.where(paste, images[source], images[target])
        mixed_masks[target] = torch.where(paste, masks[source], masks[target])
    return mixed_images, mixed_masks


def train_step(job: Job, images: torch.Tensor, masks: torch.Tensor) -> float:
    """One optimisation step (AMP on CUDA); returns the loss."""
    images, masks = random_crop(images, masks, job.cfg.patch_size)
    images, masks = class_mix(images, masks, job.cfg.class_mix)
    images = images.to(job.device, non_blocking=True)
    masks = masks.to(job.device, non_blocking=True)
    if job.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(job.device, job.cfg.amp):
        logits, aux = forward_logits(job.net, job.spec, images, train=True)
        loss = job.loss_fn(logits, masks)
        for aux_logits in aux:
            loss = loss + job.spec.aux_weight * job.loss_fn(aux_logits, masks)
        if job.teacher is not None:
            teacher_logits = job.teacher.logits(images, tuple(logits.shape[-2:]))
            loss = loss + job.cfg.alpha * distillation_kl(logits, teacher_logits, masks,
                                                          job.cfg.temperature_at(job.epoch))
    job.optimizer.zero_grad(set_to_none=True)
    job.scaler.scale(loss).backward()
    if job.cfg.grad_clip:
        job.scaler.unscale_(job.optimizer)
        nn.utils.clip_grad_norm_(job.model.parameters(), job.cfg.grad_clip)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.scheduler.step()
    if job.ema is not None:
        job.ema.update_parameters(job.model)
    return float(loss.detach())


def train_epoch(job: Job, loader: DataLoader, epoch: int) -> float:
    """One pass over this rank's shard; returns the mean loss over all ranks."""
    job.net.train()
    job.epoch = epoch
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(job.cfg.seed, epoch, job.info.rank))
    seed_everything(epoch_seed(job.cfg.seed, epoch, job.info.rank), loader.dataset)
    total = torch.zeros(2, dtype=torch.float64)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{job.cfg.epochs}", unit="batch", leave=False,
               disable=not job.info.is_main)
    for images, masks in bar:
        loss = train_step(job, images, masks)
        total += torch.tensor([loss * len(masks), len(masks)], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss:.4f}")
    if job.info.distributed:
        total = ddp.all_reduce_sum(total.to(job.device)).cpu()
        ddp.broadcast_buffers(job.model)
    return float(total[0] / max(total[1], 1))


@torch.no_grad()
def validate(job: Job, loader: DataLoader) -> tuple[float, ConfusionMatrix]:
    """Validation loss and confusion matrix of ``job.result``, summed over ranks."""
    model = job.result.eval()
    matrix = ConfusionMatrix(NUM_CLASSES, IGNORE)
    total = torch.zeros(2, dtype=torch.float64)
    for images, masks in loader:
        images, masks = images.to(job.device), masks.to(job.device)
        with autocast(job.device, job.cfg.amp):
            logits, _ = forward_logits(model, job.spec, images)
            loss = job.loss_fn(logits.float(), masks)
        matrix.update(logits.argmax(1), masks)
        total += torch.tensor([float(loss) * len(masks), len(masks)], dtype=torch.float64)
    if job.info.distributed:
        total = ddp.all_reduce_sum(total.to(job.device)).cpu()
        counts = ddp.all_reduce_sum(torch.from_numpy(matrix.matrix).to(job.device)).cpu().numpy()
        matrix.matrix = counts.astype(np.int64)
    return float(total[0] / max(total[1], 1)), matrix


def _restore(path: Path, job: Job) -> LoopState:
    """Load checkpoints/last.pt into the job; returns the loop state to continue from."""
    ckpt = load_checkpoint(path, "cpu")  # RNG states must stay CPU tensors; load_state_dict moves the rest
    saved = ckpt["config"]
    if saved.get("model") != job.cfg.model:
        raise AerialsegError(f"checkpoint is for model {saved.get('model')}, not {job.cfg.model}", path,
                             "resume with the same model, or train without --resume")
    defaults = asdict(TrainConfig())  # a key the checkpoint predates held its default
    changed = sorted(k for k, v in asdict(job.cfg).items() if saved.get(k, defaults[k]) != v)
    if changed:
        log.warning("resuming with changed settings %s: the result will differ from an uninterrupted run", changed)
    groups = len(ckpt["optimizer"]["param_groups"])
    if groups != len(job.optimizer.param_groups):
        raise AerialsegError(f"checkpoint's optimizer has {groups} parameter group(s), this run "
                             f"{len(job.optimizer.param_groups)} (train.encoder_lr_scale changed)", path,
                             "resume with the checkpoint's train.encoder_lr_scale, or train without --resume")
    job.model.load_state_dict(ckpt["model"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    job.scheduler.load_state_dict(ckpt["scheduler"])
    job.scaler.load_state_dict(ckpt["scaler"])
    if job.ema is not None and "ema" in ckpt:
        job.ema.load_state_dict(ckpt["ema"])
    set_rng_states(ckpt["rng"])
    state = LoopState(**ckpt["loop"])
    log.info("resuming %s after epoch %d (best val mIoU %.4f at epoch %d)", path.parent.parent, state.epoch,
             state.best_miou, state.best_epoch)
    return state


def _model_record(job: Job, state: LoopState, row: dict[str, Any], val_summary: dict[str, Any],
                  extra: dict[str, Any]) -> dict[str, Any]:
    val = {k: v for k, v in val_summary.items() if k != "confusion_matrix"}
    return {"seed": job.cfg.seed, "epoch": row["epoch"], "metrics": {"val_mIoU": row["val_mIoU"],
            "val_loss": row["val_loss"], "val": val}, "train": asdict(job.cfg),
            "teacher": job.teacher.name if job.teacher else None, **extra}


def run_epoch(job: Job, loaders: tuple[DataLoader, DataLoader], epoch: int, state: LoopState, out_dir: Path,
              extra: dict[str, Any]) -> dict[str, Any]:
    """Train one epoch, validate, keep the best weights, checkpoint; returns the history row."""
    start = time.time()
    lr = job.optimizer.param_groups[-1]["lr"]  # train.lr's group (the encoder's may be scaled)
    train_loss = train_epoch(job, loaders[0], epoch)
    val_loss, matrix = validate(job, loaders[1])
    val_summary = matrix.summary()
    miou = val_summary["mIoU"] or 0.0
    row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
           "val_mIoU": round(miou, 6), "lr": lr, "seconds": round(time.time() - start, 2)}
    improved = miou > state.best_miou
    state.best_miou, state.best_epoch = (miou, epoch + 1) if improved else (state.best_miou, state.best_epoch)
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    state.history.append(row)
    state.epoch = epoch + 1
    state.seconds += row["seconds"]
    if job.info.is_main:
        if improved:
            save_model(job.result, out_dir, job.cfg.model, NUM_CLASSES, 3, saved_kwargs(job.cfg.model,
                       job.cfg.model_kwargs), _model_record(job, state, row, val_summary, extra))
        save_checkpoint(out_dir / CHECKPOINT, job, state)
        write_history(out_dir, state.history)
    if job.info.is_main:
        tqdm.write(f"epoch {row['epoch']}/{job.cfg.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                   f"val mIoU {miou:.4f}, {row['seconds']:.1f} s")
    return row


def _summary(job: Job, state: LoopState, sizes: tuple[int, int], extra: dict[str, Any],
             stopped_early: bool) -> dict[str, Any]:
    runs = len(state.history)
    return {"model": job.cfg.model, "seed": job.cfg.seed, "epochs": job.cfg.epochs, "epochs_run": state.epoch,
            "early_stopped": stopped_early, "best_epoch": state.best_epoch, "best_val_mIoU": round(state.best_miou, 6),
            "final_train_loss": state.history[-1]["train_loss"] if runs else None,
            "seconds": round(state.seconds, 2), "seconds_per_epoch": round(state.seconds / max(runs, 1), 2),
            "device": str(job.device), "world_size": job.info.world_size, "train_patches": sizes[0],
            "val_patches": sizes[1], "parameters": count_parameters(job.model),
            "teacher": job.teacher.name if job.teacher else None, **extra}


def fit(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, out_dir: str | Path, resume: bool = False,
        teacher_dir: str | Path | None = None, extra: dict[str, Any] | None = None,
        on_epoch_end: EpochHook | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The training loop; returns the model as after the last epoch run and the summary.

    ``extra`` goes into model.json and train_summary.json (data hash, GSD, ...); ``on_epoch_end(epoch,
    row)`` is called after each epoch's checkpoint is written.
    """
    out_dir, extra = Path(out_dir), dict(extra or {})
    device = resolve_device(cfg.device)
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = ddp.init_distributed(device.type)
    set_determinism(cfg.deterministic)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed)
    if len(val_ds) == 0:
        raise AerialsegError("the validation split is empty", fix="check split.fractions and the tiles")
    model = create_model(cfg.model, **cfg.model_kwargs)
    init_used = init_weights(model, cfg.init_from, cfg.model) if cfg.init_from and not resume else None
    teacher = load_teacher(teacher_dir, device) if teacher_dir else None
    if cfg.init_from_teacher and not resume:
        init_used = copy_teacher_weights(model, teacher, teacher_dir)
    model.to(device)
    if cfg.channels_last:
        to_channels_last(model)
    loaders = (make_train_loader(train_ds, cfg, device, info), make_eval_loader(val_ds, cfg.batch_size, info))
    optimizer = build_optimizer(model, cfg)
    job = Job(cfg, get_spec(cfg.model), model, model, build_loss(cfg.loss), optimizer,
              build_scheduler(optimizer, cfg, len(loaders[0])),
              torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"), device, info,
              teacher, weight_average(model, cfg.ema))
    state = _restore(out_dir / CHECKPOINT, job) if resume else LoopState(init_from=init_used)
    extra["init_from"] = state.init_from
    if info.distributed:
        job.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    stopped_early = False
    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc=f"train {cfg.model}", unit="epoch",
               disable=not info.is_main)
    for epoch in range(state.epoch, cfg.epochs):
        row = run_epoch(job, loaders, epoch, state, out_dir, extra)
        bar.update(1)
        bar.set_postfix(loss=row["train_loss"], val_mIoU=row["val_mIoU"], best=round(state.best_miou, 4))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
        if cfg.patience and state.bad_epochs >= cfg.patience:
            stopped_early = epoch + 1 < cfg.epochs
            log.info("early stop: no better val mIoU for %d epochs", state.bad_epochs)
            break
    bar.close()
    summary = _summary(job, state, (len(train_ds), len(val_ds)), extra, stopped_early)
    if info.is_main:
        write_json(out_dir / "train_summary.json", summary)
    ddp.barrier()
    if joined_here:
        ddp.cleanup()
    return model, summary


# --- entry points ---------------------------------------------------------------------------------

def patch_datasets(manifest: Path, split_file: Path, augmented_dir: Path | None,
                   transform: Callable[..., Any] | None) -> tuple[tuple[Dataset, Dataset], dict[str, Any]]:
    """Train and val datasets of the tiles/split outputs, and their identity; the train one gets the
    offline augmented copies in ``augmented_dir`` (when it exists) and the on-the-fly ``transform``."""
    augmented = augmented_dir if augmented_dir is not None and augmented_dir.is_dir() else None
    train = PatchDataset(manifest, split_file, "train", transform, augmented)
    val = PatchDataset(manifest, split_file, "val", None, None)
    identity = {"training_data_sha256": fingerprint([manifest, split_file]),
                "data": {"manifest": str(manifest), "split": str(split_file)}}
    return (train, val), identity


def train_model(cfg: TrainConfig, datasets: tuple[Dataset, Dataset], out_dir: str | Path, resume: bool = False,
                teacher_dir: str | Path | None = None, identity: dict[str, Any] | None = None,
                gsd_m: float | None = None, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on (train, val) datasets; returns the summary (also train_summary.json).

    ``identity`` (training data hash, paths) goes into model.json, by default the train dataset's
    ``fingerprint``; the GSD recorded is the train dataset's ``gsd_m`` when it has one, else ``gsd_m``;
    ``teacher_dir`` adds the distillation term (``cfg.alpha``, ``cfg.temperature_at``).
    """
    if identity is None:
        identity = {"training_data_sha256": getattr(datasets[0], "fingerprint", None)}
    identity = {**identity, "gsd_m": datasets[0].gsd_m if hasattr(datasets[0], "gsd_m") else gsd_m}
    _, summary = fit(cfg, datasets[0], datasets[1], out_dir, resume, teacher_dir, identity, on_epoch_end)
    return summary
