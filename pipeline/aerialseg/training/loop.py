"""The one training loop, for plain training, OpenEarthMap pretraining, distillation (a frozen teacher)
and pruning's fine-tune: ``fit`` runs ``run_epoch`` (``train_epoch`` of ``train_step``s, then ``validate``).

``train_model(cfg, datasets, out_dir)`` trains ``cfg.model`` on the train dataset and validates on the val
dataset every epoch (the train stage, ``aerialseg.stages.train``, builds both from params). It writes, into
``out_dir`` (rank 0 only under torchrun):

- ``model.safetensors`` + ``model.json``: the weights of the best epoch (validation mIoU) and how to
  rebuild them (``aerialseg.models.save_model``; training data hash, metrics, GSD, seed);
- ``checkpoints/last.pt``: everything needed to resume (``aerialseg.training.checkpoint``);
- ``history.csv`` and ``curves.png`` (``aerialseg.training.history``);
- ``train_summary.json`` (model, seed, epochs run, best epoch and mIoU, time).

Repeatability: every epoch starts from seeds derived from ``(train.seed, epoch, rank)`` (Python,
NumPy, torch, the sampler, DataLoader workers and the albumentations pipeline; ``aerialseg.data.loaders``),
and with ``train.deterministic`` torch uses deterministic kernels, so two CPU runs give identical weights and
a resumed run ends where an uninterrupted one does. On CUDA the loop uses autocast (float16) with a
GradScaler (``train.amp``).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from aerialseg.core.classes import IGNORE, NUM_CLASSES
from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.data.loaders import make_eval_loader, make_train_loader, seed_everything, start_epoch
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.models import ModelSpec, count_parameters, create_model, get_spec, save_model
from aerialseg.models.runtime import resolve_device
from aerialseg.training import ddp
from aerialseg.training.batch import autocast, class_mix, forward_logits, random_crop, to_channels_last
from aerialseg.training.checkpoint import CHECKPOINT, LoopState, restore, save_checkpoint, set_determinism
from aerialseg.training.config import TrainConfig
from aerialseg.training.history import write_history
from aerialseg.training.losses import LossFn, build_loss, distillation_kl
from aerialseg.training.optim import build_optimizer, build_scheduler, weight_average
from aerialseg.training.weights import Teacher, copy_teacher_weights, init_weights, load_teacher, saved_kwargs

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, Any]], None]


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
    normalised: bool = False  # batches arrive normalised floats (pruning's PatchBatches), not uint8

    @property
    def result(self) -> nn.Module:
        """The weights that are validated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def train_device(name: str) -> torch.device:
    """``train.device`` for this process: ``resolve_device`` with the torchrun local rank (``auto``: its GPU)."""
    return resolve_device(name, ddp.env_info().local_rank, DEFAULT_PARAMS, "set train.device: auto or cpu")


def make_job(cfg: TrainConfig, model: nn.Module, device: torch.device, info: ddp.DistInfo, steps_per_epoch: int,
             teacher: Teacher | None = None, spec: ModelSpec | None = None) -> Job:
    """What training ``model`` (on ``device``) with ``cfg`` needs: loss, optimizer, LR schedule, AMP scaler, EMA."""
    optimizer = build_optimizer(model, cfg)
    return Job(cfg, spec or get_spec(cfg.model), model, model, build_loss(cfg.loss), optimizer,
               build_scheduler(optimizer, cfg, steps_per_epoch),
               torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"), device, info,
               teacher, weight_average(model, cfg.ema))


def train_step(job: Job, images: torch.Tensor, masks: torch.Tensor) -> float:
    """One optimisation step (AMP on CUDA); returns the loss."""
    images, masks = random_crop(images, masks, job.cfg.patch_size)
    images, masks = class_mix(images, masks, job.cfg.class_mix)
    images = images.to(job.device, non_blocking=True)
    masks = masks.to(job.device, non_blocking=True)
    if job.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(job.device, job.cfg.amp):
        logits, aux = forward_logits(job.net, job.spec, images, train=True, normalised=job.normalised)
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
    start_epoch(loader, job.cfg.seed, epoch, job.info.rank)
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


def _start_model(cfg: TrainConfig, device: torch.device, resume: bool,
                 teacher_dir: str | Path | None) -> tuple[nn.Module, Teacher | None, str | None]:
    """The model on ``device`` (from ``init_from`` or the teacher's encoder unless resuming), the teacher, and
    what the weights started from."""
    model = create_model(cfg.model, **cfg.model_kwargs)
    init_used = init_weights(model, cfg.init_from, cfg.model) if cfg.init_from and not resume else None
    teacher = load_teacher(teacher_dir, device) if teacher_dir else None
    if cfg.init_from_teacher and not resume:
        init_used = copy_teacher_weights(model, teacher, teacher_dir)
    model.to(device)
    if cfg.channels_last:
        to_channels_last(model)
    return model, teacher, init_used


def _run_epochs(job: Job, loaders: tuple[DataLoader, DataLoader], state: LoopState, out_dir: Path,
                extra: dict[str, Any], on_epoch_end: EpochHook | None) -> bool:
    """The remaining epochs, until ``train.patience`` stops them; returns whether it did before the last."""
    bar = tqdm(total=job.cfg.epochs, initial=state.epoch, desc=f"train {job.cfg.model}", unit="epoch",
               disable=not job.info.is_main)
    for epoch in range(state.epoch, job.cfg.epochs):
        row = run_epoch(job, loaders, epoch, state, out_dir, extra)
        bar.update(1)
        bar.set_postfix(loss=row["train_loss"], val_mIoU=row["val_mIoU"], best=round(state.best_miou, 4))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
        if job.cfg.patience and state.bad_epochs >= job.cfg.patience:
            log.info("early stop: no better val mIoU for %d epochs", state.bad_epochs)
            bar.close()
            return epoch + 1 < job.cfg.epochs
    bar.close()
    return False


def fit(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, out_dir: str | Path, resume: bool = False,
        teacher_dir: str | Path | None = None, extra: dict[str, Any] | None = None,
        on_epoch_end: EpochHook | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The training loop; returns the model as after the last epoch run and the summary.

    ``extra`` goes into model.json and train_summary.json (data hash, GSD, ...); ``on_epoch_end(epoch,
    row)`` is called after each epoch's checkpoint is written.
    """
    out_dir, extra = Path(out_dir), dict(extra or {})
    device = train_device(cfg.device)
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = ddp.init_distributed(device.type)
    set_determinism(cfg.deterministic)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed)
    if len(val_ds) == 0:
        raise AerialsegError("the validation split is empty", fix="check split.fractions and the tiles")
    model, teacher, init_used = _start_model(cfg, device, resume, teacher_dir)
    workers = cfg.workers(device.type, info.world_size)
    loaders = (make_train_loader(train_ds, cfg.batch_size, cfg.seed, cfg.sampling, workers, info.rank, info.world_size,
                                 pin_memory=device.type == "cuda"),
               make_eval_loader(val_ds, cfg.batch_size, info.rank, info.world_size))
    job = make_job(cfg, model, device, info, len(loaders[0]), teacher)
    state = restore(out_dir / CHECKPOINT, job) if resume else LoopState(init_from=init_used)
    extra["init_from"] = state.init_from
    if info.distributed:
        job.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    stopped_early = _run_epochs(job, loaders, state, out_dir, extra, on_epoch_end)
    summary = _summary(job, state, (len(train_ds), len(val_ds)), extra, stopped_early)
    if info.is_main:
        write_json(out_dir / "train_summary.json", summary)
    ddp.barrier()
    if joined_here:
        ddp.cleanup()
    return model, summary


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
