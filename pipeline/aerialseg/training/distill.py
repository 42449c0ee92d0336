"""Offline knowledge distillation from a frozen teacher into a light student (the distil stage's library).

The student trains with the one loop (``aerialseg.training.loop``) on
``loss = task loss + alpha * T^2 * KL(teacher_T || student_T)`` per pixel (softmax at temperature T,
pixels labelled ignore left out of the KL; ``aerialseg.training.losses.distillation_kl``); with
``distil.final_temperature`` T moves linearly from ``distil.temperature`` in the first epoch to it in the last
(soft targets early, sharp ones late). The thesis distils
UPerNet-ConvNeXt-Tiny into SegFormer-B0 and PSPNet-R18 (``distil.teacher``, ``distil.student``).
``distil.train`` overrides keys of the ``train`` section for the student run (``aerialseg.stages.distil``
builds the student's TrainConfig). After training, ``distil.json`` in the output dir records the teacher,
alpha, T and the student's pixel agreement with the teacher on the val split.
"""

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
from aerialseg.training.batch import forward_logits
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import train_device, train_model

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


def check_teacher(teacher_dir: str | Path) -> Path:
    """The teacher model dir; one without model.json is a user error."""
    teacher = Path(teacher_dir)
    if not (teacher / "model.json").is_file():
        raise AerialsegError("teacher model dir has no model.json", teacher,
                             "train the teacher first (aerialseg train --model upernet_convnext_tiny --out ...) "
                             "and set distil.teacher")
    return teacher


def distil(student: TrainConfig, teacher_dir: str | Path, datasets: tuple[Dataset, Dataset], out_dir: str | Path,
           resume: bool = False, gsd_m: float | None = None, device: str = "auto",
           identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``student`` with the frozen teacher's soft targets; returns the training summary + agreement.

    ``device`` is where the student/teacher agreement on the val dataset is measured (``auto``: CUDA if any);
    ``identity`` (training data hash and files) goes into model.json as for ``train``.
    """
    teacher, out_dir = check_teacher(teacher_dir), Path(out_dir)
    summary = train_model(student, datasets, out_dir, resume=resume, teacher_dir=teacher, gsd_m=gsd_m,
                          identity=identity)
    if not ddp.env_info().is_main:
        return summary
    agree = agreement(out_dir, teacher, datasets[1], device=str(train_device(device)))
    record = {"teacher": summary["teacher"], "teacher_dir": str(teacher), "student": summary["model"],
              "alpha": student.alpha, "temperature": student.temperature,
              "final_temperature": student.final_temperature, "val_agreement_with_teacher": round(agree, 6),
              "best_val_mIoU": summary["best_val_mIoU"]}
    write_json(out_dir / "distil.json", record)
    log.info("student %s agrees with the teacher on %.1f %% of val pixels", summary["model"], 100 * agree)
    return {**summary, **record}
