"""The one seeded loader: training batches (uniform or rare-class sampling, sharded per rank) and eval batches.

Repeatability: ``start_epoch`` reseeds everything from ``(seed, epoch, rank)`` (``epoch_seed``) before each
epoch: the sampler (``set_epoch``), the loader's generator (the DataLoader workers' seeds; each worker then
reseeds its albumentations pipeline) and Python, NumPy, torch and the dataset's augmentation in this process.
Same dataset + seed -> the same batches and the same augmentation, epoch by epoch, with or without workers.
"""

import math
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from aerialseg.core.classes import NUM_CLASSES
from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.data.augment import seed_transform
from aerialseg.data.datasets import collate_patches


def _find_transform(dataset: Any) -> Any:
    """The albumentations pipeline of a dataset (looking through Subset wrappers), if any."""
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if transform is not None:
            return transform
        dataset = getattr(dataset, "dataset", None)
    return None


def seed_everything(seed: int, dataset: Any = None) -> None:
    """Seed Python, NumPy, torch and the dataset's albumentations pipeline."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transform = _find_transform(dataset)
    if transform is not None and hasattr(transform, "set_random_state"):
        seed_transform(transform, seed)


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: ``seed_everything`` from the worker's torch seed."""
    info = torch.utils.data.get_worker_info()
    seed_everything(torch.initial_seed(), info.dataset if info else None)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed every RNG is reset to at the start of an epoch."""
    return (int(seed) * 1_000_003 + epoch * 1009 + rank) % (2**31)


def start_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed a ``make_train_loader`` loader for ``epoch``: its sampler, its generator (the workers' seeds)
    and Python, NumPy, torch and the dataset's augmentation (``seed_everything``) from ``epoch_seed``."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
    seed_everything(epoch_seed(seed, epoch, rank), loader.dataset)


def rare_class_weights(counts: np.ndarray) -> np.ndarray:
    """Per-item draw weights: the mean over an item's labelled pixels of (class share in the split)^-1/2,
    so a patch of a rare class is drawn more often than one of background (1 where nothing is labelled)."""
    shares = counts.sum(axis=0) / max(counts.sum(), 1)
    class_weight = np.zeros(len(shares))
    class_weight[shares > 0] = shares[shares > 0] ** -0.5
    labelled = counts.sum(axis=1)
    return np.where(labelled > 0, counts @ class_weight / np.maximum(labelled, 1), 1.0)


class BalancedSampler(Sampler[int]):
    """``len(dataset)`` draws per epoch with replacement, weighted by ``rare_class_weights``; each rank
    takes its share of one seeded draw (reseeded per epoch with ``set_epoch``)."""

    def __init__(self, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.num_samples = math.ceil(len(weights) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.world_size, True, generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, sampling: str = "uniform", workers: int = 0,
                      rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Shuffled (or drawn by rare-class content, ``sampling="balanced"``), sharded per rank, last short batch
    dropped; ``start_epoch`` reseeds it before every epoch."""
    if len(dataset) < 2:
        raise AerialsegError(f"only {len(dataset)} training patch(es)", fix="label more area or lower tiles.size")
    if sampling == "balanced":
        if not hasattr(dataset, "item_class_counts"):
            raise AerialsegError(f"train.sampling: balanced needs per-patch class counts, which {type(dataset).__name__} "
                                 "lacks", DEFAULT_PARAMS, "set train.sampling: uniform (e.g. for pretraining)")
        counts = dataset.item_class_counts()[:, :NUM_CLASSES]
        sampler: Sampler[int] = BalancedSampler(rare_class_weights(counts), seed, rank, world_size)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    drop_last = len(sampler) > batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_patches,
                      num_workers=workers, worker_init_fn=worker_init if workers else None, drop_last=drop_last,
                      pin_memory=pin_memory, generator=torch.Generator())


def make_eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                     workers: int = 0) -> DataLoader:
    """In order; rank r takes items r, r + world, ... (no padding, so nothing is counted twice)."""
    shard = Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_patches, num_workers=workers)
