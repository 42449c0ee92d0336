"""The knobs of one training run: ``TrainConfig`` (params ``model`` + ``train``, distillation from ``distil``).

Torch-free: stages build and check a config without loading the training engine.
"""

import os
from dataclasses import dataclass, field
from typing import Any

from aerialseg.core.config import DEFAULT_PARAMS, check_keys
from aerialseg.core.errors import AerialsegError

DEFAULT_MODEL = "unet_efficientnet_lite0"


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

    def workers(self, device_type: str, world_size: int = 1) -> int:
        """DataLoader workers: ``num_workers``, or for ``auto`` 0 on CPU and up to 8 per GPU."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        return 0 if device_type == "cpu" else min(8, max(1, (os.cpu_count() or 1) // world_size))

    def temperature_at(self, epoch: int) -> float:
        """Distillation temperature of ``epoch`` (0-based): linear from ``temperature`` to ``final_temperature``."""
        if self.final_temperature is None or self.epochs < 2:
            return self.temperature
        progress = min(max(epoch, 0), self.epochs - 1) / (self.epochs - 1)
        return self.temperature + (self.final_temperature - self.temperature) * progress
