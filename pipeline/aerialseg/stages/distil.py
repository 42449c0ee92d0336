"""distil stage (`aerialseg distil`; params ``distil``, the student's knobs from ``train`` + ``distil.train``).

Distils the frozen teacher ``distil.teacher`` into ``distil.student`` on the tiles/split/augment outputs
(aerialseg.training.distill) and writes the student run dir ``distil.out`` with ``distil.json``.
"""

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from aerialseg.core.config import check_keys, section
from aerialseg.core.paths import augmented_dir, data_stage_outputs, distil_out_dir, train_out_dir
from aerialseg.data.augment import build_transform
from aerialseg.data.labelled import survey_classes
from aerialseg.models import get_spec
from aerialseg.data.datasets import patch_datasets
from aerialseg.training.config import TrainConfig
from aerialseg.training.distill import check_teacher, distil

DISTIL_KEYS = ("teacher", "student", "student_kwargs", "alpha", "temperature", "final_temperature", "init_from",
               "init_from_teacher", "out", "train")


def distil_section(params: dict[str, Any]) -> dict[str, Any]:
    """The ``distil`` params section; an unknown key is an error (a misspelt knob must not pass silently)."""
    cfg = section(params, "distil")
    check_keys("distil", cfg, DISTIL_KEYS)
    return cfg


def student_sections(params: dict[str, Any], student: str | None = None,
                     seed: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student run's ``model`` section (``distil.student``; its kwargs only for the configured student) and
    ``train`` section (``train``, ``seed`` overriding train.seed, then ``distil.init_from``,
    ``distil.init_from_teacher`` and ``distil.train``)."""
    cfg = distil_section(params)
    name = student or str(cfg.get("student", "segformer_b0"))
    get_spec(name)
    kwargs = dict(cfg.get("student_kwargs") or {}) if name == cfg.get("student") else {}
    train = {**section(params, "train"), **({"seed": int(seed)} if seed is not None else {})}
    start = {"init_from": cfg.get("init_from"), "init_from_teacher": bool(cfg.get("init_from_teacher", False))}
    train = {**train, **start, **dict(cfg.get("train") or {})}
    return {"name": name, "kwargs": kwargs}, train


def student_config(params: dict[str, Any], student: str | None = None, seed: int | None = None) -> TrainConfig:
    """The student's TrainConfig (unknown train / distil.train keys are an error)."""
    model, train = student_sections(params, student, seed)
    return TrainConfig.from_sections(model, train, distil_section(params))


def run(params: dict[str, Any], out_dir: str | Path | None = None, resume: bool = False,
        teacher_dir: str | Path | None = None, student: str | None = None, seed: int | None = None,
        datasets: tuple[Dataset, Dataset] | None = None) -> dict[str, Any]:
    """Distil ``distil.teacher`` into ``distil.student``; returns the training summary + agreement.

    ``datasets`` (train, val) replaces the tiles/split/augment outputs (in-memory data in tests).
    """
    cfg = distil_section(params)
    teacher = check_teacher(teacher_dir or cfg.get("teacher") or train_out_dir(params))
    out_dir = Path(out_dir or distil_out_dir(params))
    model, train = student_sections(params, student, seed)
    identity = None
    if datasets is None:
        manifest, split_file = data_stage_outputs(params)
        transform = build_transform(section(params, "augment")) if bool(train.get("online_augment", True)) else None
        datasets, identity = patch_datasets(manifest, split_file, augmented_dir(params), transform)
        identity["labelled_classes"] = survey_classes(manifest, split_file,
                                                      section(params, "classes").get("labelled"), "distil")
    config = TrainConfig.from_sections(model, train, cfg)
    return distil(config, teacher, datasets, out_dir, resume, gsd_m=section(params, "data").get("gsd_m"),
                  device=str(section(params, "train").get("device", "auto")), identity=identity)
