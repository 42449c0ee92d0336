"""augment stage: the albumentations pipeline from params.yaml, and offline augmented train copies.

``build_transform(params['augment'])`` turns ``augment.pipeline`` (a list of ``{name, p, **kwargs}``;
``OneOf``/``SomeOf``/``Sequential`` take a nested ``transforms`` list) into a seeded ``A.Compose``. Masks
always use nearest-neighbour interpolation, and geometric transforms that create new border pixels fill
the mask with ignore (255) unless the pipeline says otherwise.

``aerialseg.stages.augment`` writes ``augment.copies`` augmented copies of every train patch to per-scene ``.npz``
shards (``images`` N x H x W x 3 uint8, ``masks`` N x H x W uint8, ``ids``) in ``data/augmented/`` with an
``index.json``. Copy k of patch p is seeded by (seed, p, k) alone, so the output is deterministic and
does not depend on patch order.
"""

import hashlib
import inspect
import logging
import random
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np

from aerialseg.core.classes import IGNORE, colorize
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path
from aerialseg.core.config import DEFAULT_PARAMS

log = logging.getLogger(__name__)

CONTAINERS = {"OneOf", "SomeOf", "Sequential"}
INDEX_NAME = "index.json"


def _transform_class(name: Any) -> type:
    """The albumentations transform class called `name`, or an error naming it."""
    cls = getattr(A, str(name), None) if isinstance(name, str) and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        raise AerialsegError(f"augment.pipeline: unknown transform '{name}'", DEFAULT_PARAMS,
                             "use an albumentations 2.0.8 transform name, e.g. HorizontalFlip")
    return cls


def _check_kwargs(cls: type, kwargs: dict[str, Any]) -> None:
    """Unknown keyword arguments are an error (albumentations would only warn)."""
    accepted = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise AerialsegError(f"augment.pipeline: {cls.__name__} has no argument(s) {', '.join(unknown)}",
                             DEFAULT_PARAMS, f"see the albumentations docs of {cls.__name__}")


def build_step(spec: Any) -> A.BasicTransform | A.BaseCompose:
    """One pipeline entry {name, p, **kwargs} -> an albumentations transform."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise AerialsegError(f"augment.pipeline: entry {spec!r} needs a 'name'", DEFAULT_PARAMS,
                             "write entries as {name: HorizontalFlip, p: 0.5}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    cls = _transform_class(spec["name"])
    if spec["name"] in CONTAINERS:
        kwargs["transforms"] = [build_step(s) for s in kwargs.get("transforms", [])]
    _check_kwargs(cls, kwargs)
    if "fill_mask" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("fill_mask", IGNORE)  # new border pixels are ignore, never a class
    for key, value in kwargs.items():  # YAML gives lists; albumentations wants tuples for ranges
        if isinstance(value, list) and key != "transforms":
            kwargs[key] = tuple(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        first = str(exc).replace("\n", " ")[:200]
        raise AerialsegError(f"augment.pipeline: {spec['name']}: {first}", DEFAULT_PARAMS,
                             f"fix the arguments of {spec['name']}") from None


def build_transform(params_augment: dict[str, Any], seed: int | None = None) -> A.Compose:
    """params.yaml `augment` -> a seeded A.Compose (masks: nearest-neighbour, borders filled with 255).

    ``seed`` overrides ``augment.seed``.
    """
    pipeline = params_augment.get("pipeline") or []
    if not isinstance(pipeline, list):
        raise AerialsegError("augment.pipeline must be a list of {name, p, ...}", DEFAULT_PARAMS)
    steps = [build_step(spec) for spec in pipeline]
    seed = int(params_augment.get("seed", 42)) if seed is None else seed
    return SeededCompose(steps, seed=seed, mask_interpolation=cv2.INTER_NEAREST)


def seed_transform(transform: Any, seed: int | None) -> Any:
    """Seed an albumentations transform with ONE random stream shared by all its steps.

    albumentations 2.0.8's ``Compose(seed=s)`` / ``set_random_seed(s)`` give every step its own generator
    seeded with the same s, so steps with equal p fire together (HorizontalFlip, VerticalFlip and
    RandomRotate90 at p=0.5 either all apply or none do). One shared stream keeps them independent.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


class SeededCompose(A.Compose):
    """``A.Compose`` whose ``seed=`` / ``set_random_seed`` seed one stream shared by every step."""

    def set_random_seed(self, seed: int | None) -> None:
        self.seed = seed
        seed_transform(self, seed)


def item_seed(seed: int, patch_id: str, copy: int) -> int:
    """The seed of augmented copy `copy` of one patch."""
    digest = hashlib.sha256(f"{seed}:{patch_id}:{copy}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def augment_patch(transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int,
                  patch_id: str, copy: int) -> tuple[np.ndarray, np.ndarray]:
    """One deterministic augmented copy; it must keep the patch size and dtype."""
    seed_transform(transform, item_seed(seed, patch_id, copy))
    out = transform(image=image, mask=mask)
    new_image, new_mask = np.asarray(out["image"]), np.asarray(out["mask"])
    if new_image.shape != image.shape or new_mask.shape != mask.shape:
        raise AerialsegError(f"augment.pipeline turns a {image.shape[:2]} patch into {new_image.shape[:2]}",
                             DEFAULT_PARAMS, "keep the patch size (crops/resizes need size = tiles.size)")
    return new_image.astype(np.uint8, copy=False), new_mask.astype(np.uint8, copy=False)


def write_shard(dest: Path, images: list[np.ndarray], masks: list[np.ndarray], ids: list[str]) -> Path:
    """An uncompressed .npz (so readers can memory-map it) written atomically."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=np.stack(images), masks=np.stack(masks), ids=np.array(ids))
    return dest


class ShardWriter:
    """Collects augmented patches (in scene order) into shard-NNN.npz files of ``size`` patches each, so
    many small scenes (one patch each) share one shard; each record names the scenes it holds."""

    def __init__(self, out_dir: Path, size: int):
        self.out_dir, self.size = out_dir, size
        self.items: dict[str, list[Any]] = {"images": [], "masks": [], "ids": [], "sources": [], "scenes": []}
        self.shards: list[dict[str, Any]] = []

    def add(self, scene: str, image: np.ndarray, mask: np.ndarray, item_id: str, source: str) -> None:
        if len(self.items["ids"]) >= self.size:
            self.flush()
        for key, value in zip(self.items, (image, mask, item_id, source, scene)):
            self.items[key].append(value)

    def flush(self) -> None:
        if not self.items["ids"]:
            return
        name = f"shard-{len(self.shards):03d}.npz"
        write_shard(self.out_dir / name, self.items["images"], self.items["masks"], self.items["ids"])
        self.shards.append({"file": name, "scenes": sorted(set(self.items["scenes"])),
                            "count": len(self.items["ids"]), "ids": list(self.items["ids"]),
                            "sources": list(self.items["sources"])})
        for values in self.items.values():
            values.clear()

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; delete .npz files of earlier runs; return the shard records."""
        self.flush()
        written = {s["file"] for s in self.shards}
        for stale in self.out_dir.glob("*.npz"):
            if stale.name not in written:
                stale.unlink()
        return self.shards


def preview(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Rows of [image | mask | augmented image | augmented mask]."""
    rows = []
    for image, mask, aug_image, aug_mask in pairs:
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.hstack([image, gap, colorize(mask), gap, aug_image, gap, colorize(aug_mask)]))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.vstack(rows[:-1])
