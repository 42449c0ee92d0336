"""train stage (`aerialseg train`; params ``model`` + ``train``, distillation knobs from ``distil``).

Trains ``model.name`` on the train split of the tiles/split outputs (plus augment's offline copies in
``augment.out`` and, with ``train.online_augment``, the ``augment`` pipeline on the fly), validates on the
val split every epoch and writes the run dir ``train.out`` (aerialseg.training.loop); ``data.gsd_m`` goes
into model.json.
"""

import copy
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from aerialseg.core.config import section
from aerialseg.core.paths import augmented_dir, data_stage_outputs, train_out_dir
from aerialseg.data.augment import build_transform
from aerialseg.data.labelled import survey_classes
from aerialseg.models import get_spec
from aerialseg.data.datasets import patch_datasets
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import EpochHook, train_model


def apply_overrides(params: dict[str, Any], model: str | None = None, seed: int | None = None,
                    epochs: int | None = None) -> dict[str, Any]:
    """A copy of params with CLI flags applied (a different model drops the configured model kwargs)."""
    params = copy.deepcopy(params)
    params.setdefault("model", {})
    params.setdefault("train", {})
    if model is not None and model != params["model"].get("name"):
        get_spec(model)
        params["model"] = {"name": model, "kwargs": {}}
    if seed is not None:
        params["train"]["seed"] = int(seed)
    if epochs is not None:
        params["train"]["epochs"] = int(epochs)
    return params


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The run's knobs from the ``model``, ``train`` and ``distil`` sections (unknown train keys are an error)."""
    return TrainConfig.from_sections(section(params, "model"), section(params, "train"), section(params, "distil"))


def data(params: dict[str, Any]) -> tuple[tuple[Dataset, Dataset], dict[str, Any]]:
    """Train (augmented) and val datasets from the tiles/split/augment stage outputs, and their identity (data
    hash, labelled classes: a warning names the classes without training pixels)."""
    manifest, split_file = data_stage_outputs(params)
    online = bool(section(params, "train").get("online_augment", True))
    transform = build_transform(section(params, "augment")) if online else None
    datasets, identity = patch_datasets(manifest, split_file, augmented_dir(params), transform)
    labelled = survey_classes(manifest, split_file, section(params, "classes").get("labelled"), "train")
    return datasets, {**identity, "labelled_classes": labelled}


def run(params: dict[str, Any], model: str | None = None, seed: int | None = None, epochs: int | None = None,
        out_dir: str | Path | None = None, resume: bool = False, datasets: tuple[Dataset, Dataset] | None = None,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train ``model.name`` (or ``model``) with the ``train`` params; returns the summary (also train_summary.json).

    ``datasets`` (train, val) replaces the tiles/split/augment outputs (in-memory data in tests).
    """
    params = apply_overrides(params, model, seed, epochs)
    cfg = train_config(params)
    out_dir = Path(out_dir or train_out_dir(params))
    identity = None
    if datasets is None:
        datasets, identity = data(params)
    return train_model(cfg, datasets, out_dir, resume, identity=identity,
                       gsd_m=section(params, "data").get("gsd_m"), on_epoch_end=on_epoch_end)
