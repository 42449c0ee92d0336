"""Where the stages write: the one place that turns params sections into stage output paths."""

from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.errors import MissingStageOutput
from aerialseg.core.fileio import fingerprint

MANIFEST_NAME = "manifest.json"
SPLIT_NAME = "split.json"


def tiles_manifest(params: dict[str, Any]) -> Path:
    return Path(section(params, "tiles").get("out", "data/tiles")) / MANIFEST_NAME


def split_file(params: dict[str, Any]) -> Path:
    return Path(section(params, "split").get("out", "data/split")) / SPLIT_NAME


def augmented_dir(params: dict[str, Any]) -> Path:
    return Path(section(params, "augment").get("out", "data/augmented"))


def train_out_dir(params: dict[str, Any]) -> Path:
    """The train stage's run dir (the default teacher, the model bundled, pruned and quantized)."""
    return Path(section(params, "train").get("out", "models/default"))


def distil_out_dir(params: dict[str, Any]) -> Path:
    """The distil stage's run dir."""
    return Path(section(params, "distil").get("out", "models/student"))


def data_stage_outputs(params: dict[str, Any]) -> tuple[Path, Path]:
    """(tiles manifest, split file); a missing one is a user error naming the stage to run."""
    manifest, split = tiles_manifest(params), split_file(params)
    for path, stage in ((manifest, "tiles"), (split, "split")):
        if not path.is_file():
            raise MissingStageOutput(f"{stage} output missing", path, f"run `aerialseg {stage}` (or dvc repro) first")
    return manifest, split


def data_fingerprint(params: dict[str, Any]) -> str:
    """The fingerprint of the data the stages work on (tiles manifest + split.json, as model.json's
    ``training_data_sha256``): stamped into every JSON the report reads."""
    return fingerprint(data_stage_outputs(params))
