"""prune stage (`aerialseg prune`, params ``prune``): Taylor filter pruning + fine-tune of the trained model.

Writes ``prune.out``: model.safetensors + model.json (with the replayable pruning plan) and prune.json.
With ``prune.enabled: false`` only prune.json ``{"enabled": false, "reason": ...}`` is written, so the DVC
stage can be switched off without editing dvc.yaml (drop ``pruned_dir`` from quantize.table.entries too).
"""

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aerialseg.compression.prune import (Batch, PatchBatches, PruneConfig, load_model_dir, make_criterion,
                                         prune_and_retrain, save_pruned_model)
from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.core.paths import augmented_dir, data_stage_outputs, train_out_dir
from aerialseg.data.datasets import PatchDataset
from aerialseg.models import ModelSpec, get_spec
from aerialseg.training.losses import build_loss

log = logging.getLogger(__name__)

DISABLED_REASON = ("prune.enabled is false (the default; docs/training.md section 2 says why): no pruned model; "
                   "set prune.enabled: true to prune")


def train_batches(params: dict[str, Any], spec: ModelSpec, config: PruneConfig) -> PatchBatches:
    """Shuffled batches of the train split (with the augmented copies when the augment stage wrote them)."""
    manifest, split_file = data_stage_outputs(params)
    augmented = augmented_dir(params)
    dataset = PatchDataset(manifest, split_file, "train", None, augmented if augmented.is_dir() else None)
    if len(dataset) == 0:
        raise AerialsegError("the 'train' split has no patches", split_file, "check split.fractions")
    return PatchBatches(dataset, spec, config.batch_size, config.max_patches, shuffle=True, seed=config.seed)


def run(params: dict[str, Any], model_dir: str | Path | None = None, out_dir: str | Path | None = None,
        batches: Iterable[Batch] | None = None) -> dict[str, Any]:
    """Load the trained model (``prune.model_dir`` or train.out), prune, fine-tune, save, write prune.json."""
    config = PruneConfig.from_params(section(params, "prune"))
    out_dir = Path(out_dir or config.out)
    if not config.enabled:
        record = {"enabled": False, "reason": DISABLED_REASON}
        write_json(out_dir / "prune.json", record)
        log.info("pruning disabled: wrote %s", out_dir / "prune.json")
        return record
    model_dir = Path(model_dir or config.model_dir or train_out_dir(params))
    if not (model_dir / "model.json").is_file():
        raise AerialsegError("trained model not found", model_dir / "model.json",
                             "run `aerialseg train` first or set prune.model_dir")
    model, meta = load_model_dir(model_dir)
    spec = get_spec(meta["name"])
    if batches is None:
        batches = train_batches(params, spec, config)
    loss = section(params, "train").get("loss")
    criterion = make_criterion(build_loss(loss), spec.aux_weight)
    result = prune_and_retrain(model, batches, config, name=meta["name"], classes=meta["classes"],
                               in_channels=meta["in_channels"], criterion=criterion, loss=loss)
    save_pruned_model(result.model, out_dir, meta["name"], result.plan, classes=meta["classes"],
                      in_channels=meta["in_channels"], kwargs=meta.get("kwargs"),
                      extra={"source_model_dir": str(model_dir)})
    report = {"enabled": True, "model": meta["name"], "source": str(model_dir), "out": str(out_dir), **result.report}
    write_json(out_dir / "prune.json", report)
    return report
