"""augment: pipeline from params, seeding, mask safety, and the offline augmented shards."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytest
import yaml

from aerialseg.data.augment import build_transform, seed_transform
from aerialseg.stages.augment import run as augment_stage
from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.stages.split import run as split_stage
from aerialseg.stages.tiles import run as tiles_stage
from helpers.dubai import dubai_pairs, dubai_scene, stage_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
DIHEDRAL = {f"rot{k}{'_flip' if flip else ''}": (lambda a, k=k, flip=flip: np.rot90(np.fliplr(a) if flip else a, k))
            for k in range(4) for flip in (False, True)}


def real_patch(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rgb, mask = dubai_scene("tile_2")
    return rgb[300:300 + size, 400:400 + size].copy(), mask[300:300 + size, 400:400 + size].copy()


def repo_augment() -> dict[str, Any]:
    return yaml.safe_load(REPO_PARAMS.read_text())["augment"]


# --- the pipeline ---------------------------------------------------------------------------------

def test_build_transform_from_repo_params() -> None:
    transform = build_transform(repo_augment())
    assert isinstance(transform, A.Compose)
    assert [type(t).__name__ for t in transform.transforms] == [s["name"] for s in repo_augment()["pipeline"]]


def test_same_seed_same_augmentation_other_seed_differs() -> None:
    image, mask = real_patch()
    runs = []
    for seed in (1, 1, 2):
        transform = build_transform(repo_augment(), seed=seed)
        runs.append([transform(image=image, mask=mask) for _ in range(12)])
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
               for a, b in zip(runs[0], runs[1]))
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(runs[0], runs[2]))


def test_steps_draw_independently() -> None:
    """albumentations 2.0.8 seeds every step alike; ours share one stream, so all 8 flips/rotations occur."""
    image, mask = real_patch(64)
    pipeline = {"pipeline": [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
                             {"name": "RandomRotate90", "p": 0.5}]}
    outcomes: Counter[str] = Counter()
    transform = build_transform(pipeline)
    for seed in range(160):
        transform.set_random_seed(seed)  # what a trainer calls: must not correlate the steps
        out = transform(image=image, mask=mask)
        names = [n for n, op in DIHEDRAL.items() if np.array_equal(op(mask), out["mask"])]
        assert names and np.array_equal(DIHEDRAL[names[0]](image), out["image"])  # image and mask move together
        outcomes[names[0]] += 1
    assert len(outcomes) == 8 and min(outcomes.values()) >= 5


def test_geometric_transforms_keep_the_mask_value_set() -> None:
    image, mask = real_patch()
    pipeline = {"seed": 3, "pipeline": [
        {"name": "Affine", "p": 1.0, "rotate": [-40, 40], "scale": [0.7, 1.3]},
        {"name": "GridDistortion", "p": 1.0},
        {"name": "RandomResizedCrop", "p": 1.0, "size": [256, 256], "scale": [0.3, 1.0]},
        {"name": "OneOf", "p": 1.0, "transforms": [{"name": "Rotate", "p": 1.0, "limit": [30, 60]},
                                                   {"name": "ElasticTransform", "p": 1.0}]},
    ]}
    transform = build_transform(pipeline)
    allowed = set(np.unique(mask).tolist()) | {IGNORE}
    saw_border = False
    for _ in range(8):
        out = transform(image=image, mask=mask)
        values = set(np.unique(out["mask"]).tolist())
        assert values <= allowed and out["mask"].dtype == np.uint8 and out["mask"].shape == mask.shape
        saw_border |= bool((out["mask"] == IGNORE).any())
    assert saw_border  # rotated-in border pixels are ignore, not background


def test_pipeline_errors_name_the_problem() -> None:
    with pytest.raises(AerialsegError, match="unknown transform 'HorizontalFlipp'"):
        build_transform({"pipeline": [{"name": "HorizontalFlipp", "p": 0.5}]})
    with pytest.raises(AerialsegError, match="unknown transform '__class__'"):
        build_transform({"pipeline": [{"name": "__class__"}]})
    with pytest.raises(AerialsegError, match="RandomBrightnessContrast has no argument.*brightness"):
        build_transform({"pipeline": [{"name": "RandomBrightnessContrast", "brightness": 0.2}]})
    with pytest.raises(AerialsegError, match="RandomBrightnessContrast: .*brightness_limit"):
        build_transform({"pipeline": [{"name": "RandomBrightnessContrast", "brightness_limit": "much"}]})
    with pytest.raises(AerialsegError, match="needs a 'name'"):
        build_transform({"pipeline": [{"p": 0.5}]})


def test_seed_transform_reproduces_a_plain_compose() -> None:
    image, mask = real_patch(64)
    transform = A.Compose([A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)])
    first = [seed_transform(transform, 9)(image=image, mask=mask)["image"]]
    first += [transform(image=image, mask=mask)["image"] for _ in range(5)]
    again = [seed_transform(transform, 9)(image=image, mask=mask)["image"]]
    again += [transform(image=image, mask=mask)["image"] for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(first[0], other) for other in first[1:])


# --- the stage ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiles + split of two real Dubai scenes (tile_2 at 256 px patches; 4 blocks)."""
    root = tmp_path_factory.mktemp("augment_real")
    dubai_pairs(root, ("tile_2",))
    params = stage_params(root, tiles={"size": 128, "overlap": 0}, split={"block_px": 512})
    tiles_stage(params)
    split_stage(params)
    return root


def test_augment_stage_writes_deterministic_shards(split_root: Path) -> None:
    params = stage_params(split_root, tiles={"size": 128, "overlap": 0}, split={"block_px": 512},
                          augment={"copies": 2, "shard_size": 100})
    index_path = augment_stage(params)
    index = json.loads(index_path.read_text())
    train = json.loads((split_root / "split" / "split.json").read_text())["splits"]["train"]
    assert index["total"] == 2 * len(train) and index["copies"] == 2
    assert all(s["count"] <= 100 for s in index["shards"]) and len(index["shards"]) >= 2
    assert sorted(src for s in index["shards"] for src in s["sources"]) == sorted(train * 2)
    first = {}
    for shard in index["shards"]:
        with np.load(split_root / "augmented" / shard["file"]) as data:
            images, masks, ids = data["images"], data["masks"], data["ids"]
            assert images.dtype == np.uint8 and images.shape == (shard["count"], 128, 128, 3)
            assert masks.dtype == np.uint8 and masks.shape == (shard["count"], 128, 128)
            assert ids.tolist() == shard["ids"]
            assert set(np.unique(masks).tolist()) <= {0, 1, 2, 3, 4, IGNORE}
            first[shard["file"]] = (images.copy(), masks.copy())
    assert (split_root / "augmented" / "preview.png").read_bytes().startswith(b"\x89PNG")
    augment_stage(params)  # again: identical arrays
    for name, (images, masks) in first.items():
        with np.load(split_root / "augmented" / name) as data:
            assert np.array_equal(data["images"], images) and np.array_equal(data["masks"], masks)


def test_augment_stage_removes_stale_shards_and_rejects_resizing(split_root: Path) -> None:
    out = split_root / "augmented_b"
    base = stage_params(split_root, tiles={"size": 128, "overlap": 0}, split={"block_px": 512})
    stale = out / "old-000.npz"
    out.mkdir(exist_ok=True)
    stale.write_bytes(b"x")
    augment_stage({**base, "augment": {**base["augment"], "out": str(out), "copies": 1}})
    assert not stale.exists()
    resize = {**base["augment"], "out": str(out), "pipeline": [{"name": "Resize", "height": 64, "width": 64}]}
    with pytest.raises(AerialsegError, match=r"turns a \(128, 128\) patch into \(64, 64\)"):
        augment_stage({**base, "augment": resize})
    assert not (out / "index.json").exists()  # a failed run leaves no index that could be stale
    zero = augment_stage({**base, "augment": {**base["augment"], "out": str(out), "copies": 0}})
    assert json.loads(zero.read_text())["total"] == 0 and not list(out.glob("*.npz"))
