"""augment stage (`aerialseg augment`, params ``augment``): offline augmented copies of the train split."""

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aerialseg.core.config import DEFAULT_PARAMS, section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.core.paths import split_file as split_file_path
from aerialseg.core.paths import tiles_manifest
from aerialseg.data.augment import INDEX_NAME, ShardWriter, augment_patch, build_transform, preview
from aerialseg.data.datasets import PatchDataset
from aerialseg.data.tiling import write_png

log = logging.getLogger(__name__)


def run(params: dict[str, Any]) -> Path:
    """Write augment.copies augmented copies of each train patch as .npz shards of augment.shard_size + index.json."""
    aug = section(params, "augment")
    copies, seed = int(aug.get("copies", 1)), int(aug.get("seed", 42))
    shard_size = int(aug.get("shard_size", 512))
    if copies < 0 or shard_size < 1:
        raise AerialsegError("augment.copies must be >= 0 and augment.shard_size >= 1", DEFAULT_PARAMS)
    transform = build_transform(aug, seed)
    out_dir = Path(aug.get("out", "data/augmented"))
    manifest, split_file = tiles_manifest(params), split_file_path(params)
    train = PatchDataset(manifest, split_file, "train")
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # a run that fails leaves no index, never a stale one
    order = sorted(range(len(train)), key=lambda i: (train.patches[i]["scene_name"], train.patches[i]["id"]))
    writer, samples = ShardWriter(out_dir, shard_size), []
    for i in tqdm(order if copies else [], desc="augment", unit="patch", leave=False, disable=None):
        patch = train.patches[i]
        image, mask = train.read(i)
        for k in range(copies):
            new_image, new_mask = augment_patch(transform, image, mask, seed, patch["id"], k)
            writer.add(patch["scene_name"], new_image, new_mask, f"{patch['id']}_aug{k}", patch["id"])
            if len(samples) < 4 and k == 0:
                samples.append((image, mask, new_image, new_mask))
    shards = writer.close()
    if samples:
        write_png(out_dir / "preview.png", preview(samples))
    else:
        (out_dir / "preview.png").unlink(missing_ok=True)
    index = {"version": 1, "seed": seed, "copies": copies, "pipeline": aug.get("pipeline") or [],
             "manifest": str(manifest), "split": str(split_file), "train_patches": len(train),
             "total": sum(s["count"] for s in shards), "shards": shards}
    log.info("%d augmented copies of %d train patches in %d shard(s) under %s",
             index["total"], len(train), len(shards), out_dir)
    return write_json(out_dir / INDEX_NAME, index)
