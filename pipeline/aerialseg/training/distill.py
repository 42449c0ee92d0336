"""distil stage: offline knowledge distillation from a frozen teacher into a light student.

The student trains with the ordinary loop (``aerialseg.training.train``) on
``loss = task loss + alpha * T^2 * KL(teacher_T || student_T)`` per pixel (softmax at temperature T,
pixels labelled ignore left out of the KL; ``aerialseg.training.losses.distillation_kl``); with
``distil.final_temperature`` T moves linearly from ``distil.temperature`` in the first epoch to it in the last
(soft targets early, sharp ones late). The thesis distils
UPerNet-ConvNeXt-Tiny into SegFormer-B0 and PSPNet-R18 (``distil.teacher``, ``distil.student``).
``distil.train`` overrides keys of the ``train`` section for the student run.
After training, ``distil.json`` in the output dir records the teacher, alpha, T and the student's
pixel agreement with the teacher on the val split.
"""

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from aerialseg.training import ddp
from aerialseg.data.datasets import collate_patches
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.models import get_spec, load_model
from aerialseg.core.config import section
from aerialseg.training.train import TrainConfig, forward_logits, patch_datasets, resolve_device, train_run

log = logging.getLogger(__name__)


@torch.no_grad()
def agreement(student_dir: str | Path | torch.nn.Module, teacher_dir: str | Path, dataset: Dataset,
              student_name: str | None = None, batch_size: int = 8, device: str = "cpu") -> float:
    """Fraction of pixels where the student's and the teacher's arg-max classes agree."""
    dev = torch.device(device)
    if isinstance(student_dir, torch.nn.Module):
        student, name = student_dir.eval(), student_name
    else:
        student, meta = load_model(student_dir)
        name = meta["name"]
    teacher, teacher_meta = load_model(teacher_dir)
    student, teacher = student.to(dev), teacher.to(dev)
    same = total = 0
    for images, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_patches):
        images = images.to(dev)
        s_pred = forward_logits(student, get_spec(name), images)[0].argmax(1)
        t_pred = forward_logits(teacher, get_spec(teacher_meta["name"]), images)[0].argmax(1)
        same += int((s_pred == t_pred).sum())
        total += s_pred.numel()
    return same / max(total, 1)


def student_params(params: dict[str, Any], student: str | None = None) -> dict[str, Any]:
    """params for the student run: model = distil.student, train = train + distil.train overrides."""
    cfg = section(params, "distil")
    name = student or str(cfg.get("student", "segformer_b0"))
    get_spec(name)
    kwargs = dict(cfg.get("student_kwargs") or {}) if name == cfg.get("student") else {}
    train = {**section(params, "train"), "init_from": cfg.get("init_from"), **dict(cfg.get("train") or {})}
    return {**json.loads(json.dumps(params)), "model": {"name": name, "kwargs": kwargs}, "train": train}


def distil_run(params: dict[str, Any], out_dir: str | Path | None = None, resume: bool = False,
               teacher_dir: str | Path | None = None, student: str | None = None,
               datasets: tuple[Dataset, Dataset] | None = None) -> dict[str, Any]:
    """Distil ``distil.teacher`` into ``distil.student``; returns the training summary + agreement."""
    cfg = section(params, "distil")
    teacher = Path(teacher_dir or cfg.get("teacher", "models/default"))
    if not (teacher / "model.json").is_file():
        raise AerialsegError("teacher model dir has no model.json", teacher,
                             "train the teacher first (aerialseg train --model upernet_convnext_tiny --out ...) "
                             "and set distil.teacher")
    out_dir = Path(out_dir or cfg.get("out", "models/student"))
    run_params = student_params(params, student)
    if datasets is None:
        datasets, _ = patch_datasets(run_params)
    summary = train_run(run_params, out_dir, resume=resume, teacher_dir=teacher, datasets=datasets)
    if not ddp.env_info().is_main:
        return summary
    device = str(resolve_device(str(section(params, "train").get("device", "auto"))))
    agree = agreement(out_dir, teacher, datasets[1], device=device)
    run = TrainConfig.from_params(run_params)
    record = {"teacher": summary["teacher"], "teacher_dir": str(teacher), "student": summary["model"], "alpha": run.alpha,
              "temperature": run.temperature, "final_temperature": run.final_temperature,
              "val_agreement_with_teacher": round(agree, 6),
              "best_val_mIoU": summary["best_val_mIoU"]}
    write_json(out_dir / "distil.json", record)
    log.info("student %s agrees with the teacher on %.1f %% of val pixels", summary["model"], 100 * agree)
    return {**summary, **record}
