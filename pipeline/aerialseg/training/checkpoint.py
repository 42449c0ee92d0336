"""Repeatability and resume: deterministic kernels, RNG states, ``checkpoints/last.pt`` written and restored.

A checkpoint holds the model, optimizer, scheduler, AMP scaler, EMA, RNG states, loop state and config,
written with ``torch.save`` of tensors and plain containers only and read back with
``torch.load(weights_only=True)``, so no file can run code.
"""

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path
from aerialseg.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"


class Resumable(Protocol):
    """What a checkpoint saves and restores of a run (``aerialseg.training.loop.Job`` is one)."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None


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


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels (repeatable runs) or cuDNN autotuning (faster GPU runs)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


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


def save_checkpoint(path: Path, job: Resumable, state: LoopState) -> None:
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


def restore(path: Path, job: Resumable) -> LoopState:
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
