"""`aerialseg loso` (params ``loso``; the recipe from ``model``, ``train``, ``augment``, ``split``, ``bundle``; the
mapping options as the evaluate stage's, from ``infer`` + ``evaluate``): leave-one-scene-out folds.

Not a DVC stage (k trainings): run it by hand; ``loso.profile`` (or ``--profile``) merges a profile over params
first, e.g. ``quick`` for a reduced recipe. Each fold's work (fold data, model, bundles, fold.json) stays in
``<loso.out>/folds/<k>-<scene>``; a fold whose fold.json was made with the same recipe is not run again.
The folds, scoring and tables are aerialseg.evaluation.loso; training goes through aerialseg.training.loop's
entry points and adaptation through aerialseg.training.adapt.
"""

import logging
import shutil
from pathlib import Path
from typing import Any

from aerialseg.core.config import load_profile, merge_profile, section
from aerialseg.core.fileio import fingerprint, write_json
from aerialseg.core.paths import data_stage_outputs
from aerialseg.data.augment import build_transform
from aerialseg.data.labelled import survey_classes
from aerialseg.data.split import SplitParams
from aerialseg.evaluation.loso import (BASE, AdaptFn, Fold, TrainFn, cached_fold, labelled_scenes, pick_folds,
                                       run_fold, write_fold_data, write_loso)
from aerialseg.data.tiling import load_manifest
from aerialseg.inference.bundle import assemble_bundle
from aerialseg.inference.scene import InferOptions
from aerialseg.training.adapt import AdaptOptions, adapt_bundle
from aerialseg.data.datasets import patch_datasets
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import train_model

log = logging.getLogger(__name__)


def recipe_params(params: dict[str, Any], profile: str | None, epochs: int | None) -> dict[str, Any]:
    """params with the profile merged over them and the epochs override applied."""
    if profile:
        params = merge_profile(params, load_profile(profile)[1])
    if epochs is not None:
        params = {**params, "train": {**section(params, "train"), "epochs": int(epochs)}}
    return params


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The train stage's recipe; a start point (train.init_from) that does not exist is dropped with a note."""
    train = dict(section(params, "train"))
    if train.get("init_from") and not Path(train["init_from"]).exists():
        log.info("loso: train.init_from %s not found: folds start from the model's default init", train["init_from"])
        train["init_from"] = None
    return TrainConfig.from_sections(section(params, "model"), train, section(params, "distil"))


def fold_trainer(params: dict[str, Any]) -> TrainFn:
    """Train a fold's model on its data and bundle it (no ONNX: the folds map with the torch backend)."""
    cfg, bundle, gsd = train_config(params), section(params, "bundle"), section(params, "data").get("gsd_m")
    online = bool(section(params, "train").get("online_augment", True))

    def train(fold: Fold) -> tuple[Path, dict[str, Any]]:
        transform = build_transform(section(params, "augment")) if online else None
        datasets, identity = patch_datasets(fold.manifest, fold.split, None, transform)
        labelled = survey_classes(fold.manifest, fold.split, section(params, "classes").get("labelled"))
        summary = train_model(cfg, datasets, fold.work / "model", identity={**identity, "labelled_classes": labelled},
                              gsd_m=gsd)
        out = assemble_bundle(fold.work / "model", fold.work / BASE, bundle.get("tile_size"),
                              bundle.get("overlap"), bundle.get("gsd_m") or gsd)
        return out, summary

    return train


def fold_adapter(params: dict[str, Any]) -> AdaptFn:
    """Adapt a fold's model to its held-out scene (the scene's pixels only, never its labels)."""
    values = {k: v for k, v in section(params, "adapt").items() if k != "onnx"}

    def adapt(base: Path, fold: Fold, method: str) -> Path:
        out = fold.work / f"adapted-{method}"
        shutil.rmtree(out, ignore_errors=True)
        adapt_bundle(base, [fold.scene], out, AdaptOptions(**{**values, "method": method}))
        return out

    return adapt


def drop_models(work: Path) -> None:
    """Remove a scored fold's model, checkpoints and bundles (loso.keep_models false); its data and fold.json stay."""
    for path in work.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def parse_folds(folds: str | list[int] | None) -> list[int] | None:
    """``0,2`` / [0, 2] / None (all)."""
    if folds is None or isinstance(folds, list):
        return folds
    return [int(k) for k in str(folds).replace(" ", "").split(",") if k]


def parse_methods(adapt: list[str] | str | None) -> list[str]:
    """Adaptations to score beside the base model; ``all`` is the combination (itself a variant)."""
    names = [adapt] if isinstance(adapt, str) else list(adapt or [])
    methods = [m for item in names for m in str(item).split(",") if m]
    for m in methods:
        AdaptOptions(method=m).methods()  # an unknown name is one line
    return list(dict.fromkeys(methods))


def infer_options(params: dict[str, Any]) -> InferOptions:
    """The evaluate stage's mapping options (``infer`` + evaluate's device/tta), torch backend, no progress bar."""
    evaluate = section(params, "evaluate")
    return InferOptions.from_params({k: v for k, v in section(params, "infer").items() if k != "model"},
                                    device=evaluate.get("device"), backend="torch", tta=evaluate.get("tta"),
                                    progress=False)


def fold_split(params: dict[str, Any]) -> SplitParams:
    """The split stage's block rule (block_px, seed, candidates) for the folds' train/val split."""
    split = section(params, "split")
    return SplitParams(block_px=int(split.get("block_px", 384)), seed=int(split.get("seed", 42)),
                       candidates=int(split.get("candidates", 100)))


def recipe_of(params: dict[str, Any], cfg: dict[str, Any], profile: str | None, data: list[Path]) -> dict[str, Any]:
    """What a fold's result depends on (a fold.json with another recipe is run again)."""
    train = train_config(params)
    return {"model": train.model, "epochs": train.epochs, "patch_size": train.patch_size, "seed": train.seed,
            "profile": profile, "val_fraction": float(cfg.get("val_fraction", 0.1)),
            "adapt": section(params, "adapt"), "data_fingerprint": fingerprint(data)}


def run(params: dict[str, Any], folds: str | list[int] | None = None, epochs: int | None = None,
        adapt: list[str] | None = None, out: str | Path | None = None, profile: str | None = None) -> dict[str, Any]:
    """Run the folds; writes loso.json + loso.md in ``out`` (loso.out) and returns the record."""
    cfg = section(params, "loso")
    profile = profile or cfg.get("profile")
    params = recipe_params(params, profile, epochs if epochs is not None else cfg.get("epochs"))
    out_dir = Path(out or cfg.get("out", "reports/loso"))
    methods = parse_methods(adapt if adapt is not None else cfg.get("adapt"))
    manifest, split_file = data_stage_outputs(params)
    names = labelled_scenes(load_manifest(manifest))
    chosen = pick_folds(names, parse_folds(folds if folds is not None else cfg.get("folds")))
    recipe = recipe_of(params, cfg, profile, [manifest, split_file])
    labelled = survey_classes(manifest, split_file, section(params, "classes").get("labelled"))
    train, adapter, records = fold_trainer(params), fold_adapter(params), []
    for index in chosen:
        work = out_dir / "folds" / f"{index}-{names[index]}"
        record = cached_fold(work / "fold.json", recipe, methods)
        if record is None:
            fold = write_fold_data(manifest, index, fold_split(params), recipe["val_fraction"], work)
            record = run_fold(fold, train, adapter, methods, infer_options(params), labelled)
            write_json(work / "fold.json", {"recipe": recipe, "record": record})
            if not cfg.get("keep_models", False):
                drop_models(work)
        record["variants"] = {k: v for k, v in record["variants"].items() if k in (BASE, *methods)}
        records.append(record)
    return write_loso(out_dir, records, recipe, labelled, recipe["data_fingerprint"])
