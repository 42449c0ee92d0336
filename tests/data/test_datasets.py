"""PatchDataset / collate_patches / the seeded loaders: real windows, nodata -> 255, augmented copies, seeding."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from aerialseg.data.augment import build_transform
from aerialseg.stages.augment import run as augment_stage
from aerialseg.core.classes import IGNORE
from aerialseg.data.datasets import PatchDataset, collate_patches, npz_member
from aerialseg.data.loaders import make_eval_loader, make_train_loader, start_epoch
from aerialseg.core.errors import AerialsegError
from aerialseg.stages.split import run as split_stage
from aerialseg.data.tiling import load_manifest
from aerialseg.stages.tiles import run as tiles_stage
from conftest import shared_path
from helpers.dubai import dubai_pairs, dubai_scene, stage_params, write_index

TILES = {"size": 128, "overlap": 32}
SPLIT = {"block_px": 512}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiles + split + augment of the real reassembled Dubai tile_2 scene (128 px patches)."""
    root = tmp_path_factory.mktemp("data_real")
    dubai_pairs(root, ("tile_2",))
    params = stage_params(root, tiles=TILES, split=SPLIT)
    tiles_stage(params)
    split_stage(params)
    augment_stage(params)
    return root


def dataset(root: Path, split: str, **kwargs) -> PatchDataset:
    return PatchDataset(root / "tiles" / "manifest.json", root / "split" / "split.json", split, **kwargs)


def test_items_are_the_scene_windows(root: Path) -> None:
    rgb, mask = dubai_scene("tile_2")
    for split in ("train", "val", "test"):
        ds = dataset(root, split)
        assert len(ds) == len(json.loads((root / "split" / "split.json").read_text())["splits"][split]) > 0
        for index in (0, len(ds) // 2, -1):
            image, labels = ds[index]
            p = ds.patches[index]
            assert image.dtype == np.uint8 and image.shape == (128, 128, 3) and image.flags.c_contiguous
            assert labels.dtype == np.uint8 and labels.shape == (128, 128)
            assert np.array_equal(image, rgb[p["row"]:p["row"] + 128, p["col"]:p["col"] + 128])
            assert np.array_equal(labels, mask[p["row"]:p["row"] + 128, p["col"]:p["col"] + 128])
    counts = dataset(root, "train").class_pixel_counts()
    assert counts.shape == (6,) and counts.sum() == len(dataset(root, "train").patches) * 128 * 128


def test_augmented_copies_follow_train_only(root: Path) -> None:
    plain = dataset(root, "train")
    augmented = dataset(root, "train", augmented_dir=root / "augmented")
    assert len(augmented) == 2 * len(plain)
    assert augmented.ids[: len(plain)] == plain.ids
    assert augmented.ids[len(plain)] .endswith("_aug0")
    image, labels = augmented[len(plain)]
    assert image.shape == (128, 128, 3) and labels.shape == (128, 128) and image.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    source = plain.ids.index(augmented.ids[len(plain)].removesuffix("_aug0"))
    assert np.array_equal(np.sort(labels.ravel()), np.sort(plain[source][1].ravel()))  # flips/rotations only
    assert len(dataset(root, "val", augmented_dir=root / "augmented")) == len(dataset(root, "val"))
    counts = augmented.item_class_counts()  # per item, what balanced sampling weighs
    assert counts.shape == (len(augmented), 6) and (counts.sum(axis=1) == 128 * 128).all()
    assert np.array_equal(counts[: len(plain)].sum(axis=0), plain.class_pixel_counts())
    assert np.array_equal(counts[len(plain)], counts[source])  # a flipped copy holds its source's pixels


def test_npz_member_memory_maps_the_shards(root: Path) -> None:
    index = json.loads((root / "augmented" / "index.json").read_text())
    path = root / "augmented" / index["shards"][0]["file"]
    images = npz_member(path, "images")
    assert isinstance(images, np.memmap)
    with np.load(path) as data:
        assert np.array_equal(images, data["images"]) and np.array_equal(npz_member(path, "masks"), data["masks"])


def test_stale_augmented_index_is_rejected(root: Path, tmp_path: Path) -> None:
    index = json.loads((root / "augmented" / "index.json").read_text())
    index["shards"][0]["sources"][0] = "tile_9_r0_c0"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(AerialsegError, match=r"index\.json: augmented copy of tile_9_r0_c0.*rerun aerialseg augment"):
        dataset(root, "train", augmented_dir=tmp_path)
    with pytest.raises(AerialsegError, match=r"augmented index not found"):
        dataset(root, "train", augmented_dir=tmp_path / "nothing")


def test_collate_shapes_and_dtypes(root: Path) -> None:
    ds = dataset(root, "train")
    images, masks = collate_patches([ds[0], ds[1], ds[2]])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 128, 128)
    assert masks.dtype == torch.int64 and masks.shape == (3, 128, 128)
    assert torch.equal(images[1], torch.from_numpy(ds[1][0]).permute(2, 0, 1))


def test_loader_is_seeded_per_epoch(root: Path) -> None:
    def epochs(seed: int, n: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        ds = dataset(root, "train", transform=build_transform({"pipeline": [
            {"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomRotate90", "p": 0.5},
            {"name": "RandomBrightnessContrast", "p": 0.5}]}, seed=0))
        loader = make_train_loader(ds, batch_size=4, seed=seed)
        runs = []
        for epoch in range(n):
            start_epoch(loader, seed, epoch)
            runs.append([batch for _, batch in zip(range(3), loader)])
        return runs

    first, again, other = epochs(1), epochs(1), epochs(2)
    for epoch_a, epoch_b in zip(first, again):
        for (ia, ma), (ib, mb) in zip(epoch_a, epoch_b):
            assert torch.equal(ia, ib) and torch.equal(ma, mb)
    assert not torch.equal(first[0][0][0], first[1][0][0])  # a new epoch: new order and augmentation
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first[0], other[0]))
    images, masks = first[0][0]
    assert images.shape == (4, 3, 128, 128) and images.dtype == torch.uint8 and masks.dtype == torch.int64


def test_loader_with_workers_opens_rasters_per_worker(root: Path) -> None:
    ds = dataset(root, "val", transform=build_transform({"pipeline": [{"name": "HorizontalFlip", "p": 0.5}]}))
    ds[0]  # handles opened in the parent must not be used by the forked workers
    runs = []
    for _ in range(2):
        loader = make_train_loader(ds, batch_size=2, seed=3, workers=2)
        start_epoch(loader, 3, 0)
        runs.append([batch for batch in loader])
    order = list(loader.sampler)  # this epoch's shuffled order
    assert sum(len(b[0]) for b in runs[0]) == len(ds) // 2 * 2  # the last short batch is dropped
    for (ia, ma), (ib, mb) in zip(*runs):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    images, _ = next(iter(make_eval_loader(dataset(root, "val"), batch_size=len(ds))))
    flipped = torch.cat([b[0] for b in runs[0]])
    assert all(torch.equal(flipped[i], images[order[i]]) or torch.equal(flipped[i], images[order[i]].flip(-1))
               for i in range(len(flipped)))


def test_dataset_pickles_without_handles(root: Path) -> None:
    ds = dataset(root, "test")
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._rasters == {} and all(np.array_equal(a, b) for a, b in zip(clone[0], first))
    ds.close()


def test_nodata_collar_becomes_ignore_on_real_orthophoto(tmp_path: Path) -> None:
    """The real WebODM RGBA orthophoto: wherever alpha is 0 the mask reads 255, whatever the mask file says."""
    ortho = shared_path("geotiff-samples", "webodm", "orthophoto.tif")
    with rasterio.open(ortho) as ds:
        alpha, profile = ds.read(4), ds.profile
    mask_path = tmp_path / "masks" / "ortho_mask.tif"
    mask_path.parent.mkdir(parents=True)
    with rasterio.open(mask_path, "w", **{**profile, "count": 1, "nodata": None}) as out:
        out.write(np.full(alpha.shape, 2, np.uint8), 1)
    write_index(tmp_path / "masks", [{"scene": str(ortho), "mask": str(mask_path)}])
    params = stage_params(tmp_path, tiles={"size": 96, "overlap": 0}, split={"block_px": 96, "candidates": 3})
    tiles_stage(params)
    split_stage(params)
    seen_collar = False
    for split in ("train", "val", "test"):
        ds = PatchDataset(tmp_path / "tiles" / "manifest.json", tmp_path / "split" / "split.json", split)
        for i, p in enumerate(ds.patches):
            image, labels = ds[i]
            window = alpha[p["row"]:p["row"] + 96, p["col"]:p["col"] + 96]
            assert np.array_equal(labels == IGNORE, window == 0)
            assert (labels[window > 0] == 2).all()
            seen_collar |= bool((window == 0).any())
    assert seen_collar


def test_bad_dataset_inputs(root: Path, tmp_path: Path) -> None:
    with pytest.raises(AerialsegError, match=r"split\.json: no split 'holdout'"):
        dataset(root, "holdout")
    split = json.loads((root / "split" / "split.json").read_text())
    split["splits"]["val"].append("tile_2_r99999_c0")
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(AerialsegError, match=r"names patch tile_2_r99999_c0 that the manifest lacks"):
        PatchDataset(root / "tiles" / "manifest.json", tmp_path / "split.json", "val")
    with pytest.raises(AerialsegError, match=r"nothing\.json: tile manifest not found"):
        PatchDataset(tmp_path / "nothing.json", root / "split" / "split.json", "val")
    manifest = load_manifest(root / "tiles" / "manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # same content, other bytes
    with pytest.raises(AerialsegError, match=r"split\.json: split was made from another tile manifest"):
        PatchDataset(tmp_path / "manifest.json", root / "split" / "split.json", "val")
    gone = dict(manifest, patches=[dict(p, scene=str(tmp_path / "moved.tif")) for p in manifest["patches"]])
    (tmp_path / "manifest.json").write_text(json.dumps(gone))
    split.pop("manifest_sha256")
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(AerialsegError, match=r"moved\.tif: file not found"):
        PatchDataset(tmp_path / "manifest.json", tmp_path / "split.json", "test")[0]
