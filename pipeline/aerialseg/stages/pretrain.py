"""pretrain stage (`aerialseg pretrain`; params ``pretrain``, the run's knobs from ``model`` + ``train`` +
``pretrain.train``, on-the-fly augmentation from ``augment``).

Pretrains on the OpenEarthMap copy ``pretrain.root`` (aerialseg.training.pretrain) into ``pretrain.out``,
or, when ``pretrain.enabled`` says not to, writes only ``pretrain.json`` saying so.
"""

from pathlib import Path
from typing import Any

from aerialseg.core.config import check_keys, section
from aerialseg.training.pretrain_switch import pretrain_enabled, write_disabled

PRETRAIN_KEYS = ("enabled", "root", "out", "patch_size", "resample_factor", "crops_per_image", "classes", "val_fraction",
                 "train")


def run(params: dict[str, Any], out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Pretrain ``model.name`` on OpenEarthMap (``pretrain`` params; ``pretrain.train`` overrides ``train``).

    Writes a model dir (as ``train``) plus ``pretrain.json``; with ``pretrain.enabled: false`` only
    ``pretrain.json`` ({"enabled": false}). Returns the pretrain.json record.
    """
    cfg = section(params, "pretrain")
    check_keys("pretrain", cfg, PRETRAIN_KEYS)
    out_dir = Path(out_dir or cfg.get("out", "models/pretrained"))
    enabled, reason = pretrain_enabled(cfg.get("enabled", False), cfg.get("root"))
    if not enabled:
        return write_disabled(out_dir, reason)  # before any torch import: a disabled stage takes no time
    from aerialseg.data.augment import build_transform
    from aerialseg.training.pretrain import pretrain, pretrain_datasets
    from aerialseg.training.config import TrainConfig

    train_ds, val_ds = pretrain_datasets(cfg.get("root"), float(cfg.get("val_fraction", 0.1)),
                                         int(cfg.get("patch_size", 256)), float(cfg.get("resample_factor", 1.0)),
                                         int(cfg.get("crops_per_image", 8)), cfg.get("classes") or None)
    train_ds.transform = build_transform(section(params, "augment"))
    train = {**section(params, "train"), "init_from": None, **dict(cfg.get("train") or {})}
    config = TrainConfig.from_sections(section(params, "model"), train, section(params, "distil"))
    return pretrain(config, (train_ds, val_ds), out_dir, cfg["root"], resume)


def message(record: dict[str, Any]) -> str:
    """The command's one line about a pretraining run (or why it did not run)."""
    if record["enabled"]:
        return (f"pretrained {record['model']} on {record['train_images']} OpenEarthMap images: "
                f"best val mIoU {record['best_val_mIoU']:.4f}")
    return f"pretraining disabled (pretrain.enabled: false): {record['reason']}"
