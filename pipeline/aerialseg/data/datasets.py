"""The datasets training uses: patches read on the fly from the scene rasters, plus augmented copies.

``PatchDataset(manifest, split_file, split)`` yields ``(image uint8 (H, W, 3), mask uint8 (H, W))``; the
rasters are opened lazily once per process (so DataLoader workers never share a GDAL handle), and
nodata/alpha pixels of the scene are ignore (255) in the mask. ``collate_patches`` stacks a batch into
``(uint8 (N, 3, H, W), int64 (N, H, W))`` tensors; ``patch_datasets`` gives the train (with the augmented copies)
and val datasets of the tiles/split outputs; ``ArrayPatchDataset`` holds patches in memory. The seeded loaders
are in ``aerialseg.data.loaders``.
"""

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import fingerprint
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


class ArrayPatchDataset(Dataset):
    """In-memory patches: a list of (image uint8 HxWx3, mask uint8 HxW); optional albumentations transform."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], transform: Callable[..., Any] | None = None):
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def item_class_counts(self) -> np.ndarray:
        """(items, 6) pixel counts [background, road, water, tree, building, ignore] of each mask."""
        return np.array([class_counts(mask) for _, mask in self.pairs], dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.pairs[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask


def patch_datasets(manifest: Path, split_file: Path, augmented_dir: Path | None,
                   transform: Callable[..., Any] | None) -> tuple[tuple[Dataset, Dataset], dict[str, Any]]:
    """Train and val datasets of the tiles/split outputs, and their identity; the train one gets the
    offline augmented copies in ``augmented_dir`` (when it exists) and the on-the-fly ``transform``."""
    augmented = augmented_dir if augmented_dir is not None and augmented_dir.is_dir() else None
    train = PatchDataset(manifest, split_file, "train", transform, augmented)
    val = PatchDataset(manifest, split_file, "val", None, None)
    identity = {"training_data_sha256": fingerprint([manifest, split_file]),
                "data": {"manifest": str(manifest), "split": str(split_file)}}
    return (train, val), identity


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
