"""The datasets training uses: patches read on the fly from the scene rasters, plus augmented copies.

``PatchDataset(manifest, split_file, split)`` yields ``(image uint8 (H, W, 3), mask uint8 (H, W))``; the
rasters are opened lazily once per process (so DataLoader workers never share a GDAL handle), and
nodata/alpha pixels of the scene are ignore (255) in the mask. ``collate_patches`` stacks a batch into
``(uint8 (N, 3, H, W), int64 (N, H, W))`` tensors; ``make_loader`` builds a seeded DataLoader whose
on-the-fly augmentation is reseeded every epoch and in every worker.
"""

import json
import os
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from aerialseg.data.augment import seed_transform
from aerialseg.core.errors import AerialsegError
from aerialseg.geo.raster import open_raster
from aerialseg.data.split import split_patches
from aerialseg.data.tiling import COUNT_KEYS, class_counts, read_labels, read_rgb

Item = tuple[np.ndarray, np.ndarray]


def npz_member(path: Path, name: str) -> np.ndarray:
    """One array of an .npz, memory-mapped when stored uncompressed (as augment writes it)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:
        with np.load(path) as data:
            return data[name]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # ZIP local file header; name and extra field lengths at bytes 26..29
        f.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little")
               + int.from_bytes(header[28:30], "little"))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class PatchDataset(Dataset):
    """Patches of one split, read window by window from the scene and mask rasters.

    With ``augmented_dir`` and ``split == "train"`` the offline augmented copies follow the originals.
    ``transform`` (an albumentations Compose) is applied to every item as ``transform(image=, mask=)``.
    """

    def __init__(self, manifest: Path, split_file: Path, split: str, transform: Any = None,
                 augmented_dir: Path | None = None):
        self.manifest_path, self.split_path = Path(manifest), Path(split_file)
        patches = split_patches(manifest, split_file, split)
        ids = [p["id"] for p in patches]
        self.split = split
        self.patches: list[dict[str, Any]] = patches
        self.transform = transform
        self.augmented: list[tuple[Path, int, str]] = []  # (shard file, row in shard, id)
        if augmented_dir is not None and split == "train":
            self.augmented = augmented_items(Path(augmented_dir), set(ids))
        self._pid: int | None = None
        self._stack = ExitStack()
        self._rasters: dict[str, rasterio.DatasetReader] = {}
        self._shards: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.patches) + len(self.augmented)

    @property
    def ids(self) -> list[str]:
        return [p["id"] for p in self.patches] + [item[2] for item in self.augmented]

    def class_pixel_counts(self) -> np.ndarray:
        """Pixel counts [background, road, water, tree, building, ignore] of the original patches."""
        counts = np.array([p["counts"] for p in self.patches], dtype=np.int64)
        return counts.reshape(-1, len(COUNT_KEYS)).sum(axis=0)

    def item_class_counts(self) -> np.ndarray:
        """(items, 6) pixel counts per item: the manifest's for patches, counted in the shard for augmented copies."""
        counts = [p["counts"] for p in self.patches]
        counts += [class_counts(self._shard(path)[1][row], path) for path, row, _ in self.augmented]
        return np.array(counts, dtype=np.int64).reshape(len(self), len(COUNT_KEYS))

    def _fresh_process(self) -> None:
        """Forget handles inherited from another process (after a DataLoader fork)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stack = ExitStack()  # inherited handles are left alone, never closed from a child
            self._rasters, self._shards = {}, {}

    def _raster(self, path: str) -> rasterio.DatasetReader:
        self._fresh_process()
        if path not in self._rasters:
            self._rasters[path] = self._stack.enter_context(open_raster(path))
        return self._rasters[path]

    def _shard(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        self._fresh_process()
        if path not in self._shards:
            self._shards[path] = (npz_member(path, "images"), npz_member(path, "masks"))
        return self._shards[path]

    def read(self, index: int) -> Item:
        """Item `index` without the transform."""
        if index < 0:
            index += len(self)
        if index < len(self.patches):
            p = self.patches[index]
            window = Window(p["col"], p["row"], p["width"], p["height"])
            scene = self._raster(p["scene"])
            return read_rgb(scene, window, p["scene"]), read_labels(self._raster(p["mask"]), scene, window, p["mask"])
        path, row, _ = self.augmented[index - len(self.patches)]
        images, masks = self._shard(path)
        return np.array(images[row]), np.array(masks[row])

    def __getitem__(self, index: int) -> Item:
        image, mask = self.read(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask

    def close(self) -> None:
        """Close the rasters this process opened."""
        if self._pid == os.getpid():
            self._stack.close()
        self._rasters, self._shards, self._pid = {}, {}, None

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned workers: no handles travel
        state = self.__dict__.copy()
        state.update(_pid=None, _stack=None, _rasters={}, _shards={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stack = ExitStack()


def augmented_items(directory: Path, train_ids: set[str]) -> list[tuple[Path, int, str]]:
    """(shard, row, id) of every augmented copy listed in directory/index.json (made from this split)."""
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise AerialsegError("augmented index not found", index_path, "run aerialseg augment first")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = index["shards"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise AerialsegError(f"not an augmented index ({exc})", index_path, "rerun aerialseg augment") from None
    items = []
    for shard in shards:
        stale = [s for s in shard["sources"] if s not in train_ids]
        if stale:
            raise AerialsegError(f"augmented copy of {stale[0]}, which is not a train patch of this split",
                                 index_path, "rerun aerialseg augment after aerialseg split")
        path = directory / shard["file"]
        if not path.is_file():
            raise AerialsegError("augmented shard missing", path, "rerun aerialseg augment")
        items.extend((path, row, item_id) for row, item_id in enumerate(shard["ids"]))
    return items


def collate_patches(batch: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image HxWx3 uint8, mask HxW)] -> (uint8 (N, 3, H, W), int64 (N, H, W))."""
    images = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image, _ in batch]))
    masks = torch.from_numpy(np.stack([np.asarray(mask) for _, mask in batch]).astype(np.int64))
    return images.permute(0, 3, 1, 2).contiguous(), masks


def _reseed_transform(dataset: Any, seed: int) -> None:
    """Reseed the albumentations Compose of a dataset (or of the dataset it wraps), if it has one."""
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            seed_transform(transform, seed)
            return
        dataset = getattr(dataset, "dataset", None)  # torch Subset


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and the augmentation from the worker's torch seed."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32  # base seed drawn from the loader's generator each epoch + worker id
    np.random.seed(seed)
    _reseed_transform(info.dataset, seed)


class EpochSeededSampler(Sampler[int]):
    """Wraps a sampler; at the start of every epoch reseeds the dataset's augmentation from `generator`.

    That makes the augmentation of epoch e a function of (seed, e) even with num_workers=0.
    """

    def __init__(self, base: Sampler[int], dataset: Any, generator: torch.Generator):
        self.base, self.dataset, self.generator = base, dataset, generator

    def __iter__(self):
        epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())
        _reseed_transform(self.dataset, epoch_seed)
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A seeded DataLoader of (images uint8 N,3,H,W ; masks int64 N,H,W) batches.

    Same dataset + seed -> the same batches and the same augmentation, epoch by epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSeededSampler(base, dataset, generator),
                      num_workers=num_workers, collate_fn=collate_patches, worker_init_fn=seed_worker,
                      generator=generator, drop_last=drop_last, persistent_workers=False)


def spread_indices(count: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over range(count) (all when limit is None or large)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def split_arrays(manifest: Path, split_file: Path, split: str, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``limit`` (image uint8 HxWx3, mask uint8 HxW) patches of a split, spread evenly over it."""
    dataset = PatchDataset(manifest, split_file, split)
    if len(dataset) == 0:
        raise AerialsegError(f"the '{split}' split has no patches", split_file, "check split.fractions")
    try:
        items = [dataset[i] for i in spread_indices(len(dataset), limit)]
    finally:
        dataset.close()
    return [img for img, _ in items], [mask for _, mask in items]
