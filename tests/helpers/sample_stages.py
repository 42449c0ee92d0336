"""Helpers shared by test modules: the embedded sample run through the real data stages."""

import shutil
from pathlib import Path
from typing import Any

from aerialseg.core.config import load_params

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"


def sample_data_params(root: Path, scenes: tuple[str, ...] = ("dubai_tile2", "dubai_tile3"), tile: int = 128,
                       overlap: int = 32, block_px: int = 256) -> dict[str, Any]:
    """The repository's params with the data stages pointed at ``root`` and a subset of the sample scenes."""
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for name in scenes:
        shutil.copy(SAMPLE / "labels" / f"{name}.json", labels / f"{name}.json")
    params = load_params(REPO / "params.yaml")
    params["data"] = {**params["data"], "labels": str(labels), "images": str(SAMPLE / "scenes")}
    params["masks"] = {**params["masks"], "out": str(root / "masks")}
    params["tiles"] = {**params["tiles"], "out": str(root / "tiles"), "size": tile, "overlap": overlap}
    params["split"] = {**params["split"], "out": str(root / "split"), "block_px": block_px}
    params["augment"] = {**params["augment"], "out": str(root / "augmented")}
    return params


def run_sample_data_stages(params: dict[str, Any]) -> dict[str, Any]:
    """label-to-mask, tiles and split on the sample subset (no torch needed)."""
    from aerialseg.stages.masks import run as masks_stage
    from aerialseg.stages.split import run as split_stage
    from aerialseg.stages.tiles import run as tiles_stage

    masks_stage(params)
    tiles_stage(params)
    split_stage(params)
    return params
