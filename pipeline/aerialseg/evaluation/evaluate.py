"""evaluate stage: metrics of a trained model on one split, from confusion matrices over whole scenes.

Every labelled pixel of the split counts once: where patches of the split overlap (tiles overlap by
``tiles.overlap`` px), a pixel is scored from the patch whose centre is nearest (ties: the earlier
patch), so the matrix equals the one of a full-scene map restricted to the split's area (up to the
context each patch sees). One confusion matrix covers the whole split, one each scene; metric
definitions are in ``aerialseg.evaluation.metrics``.

Writes into ``out_dir`` (default ``reports/``):
- ``metrics.json``: ``aerialseg.evaluation.metrics.summarize`` keys (mIoU, pixel_accuracy, mF1, mPrecision,
  mRecall, fwIoU, iou, f1, precision, recall, support_px, pixels) + boundary F1 (bf1, bf1_per_class,
  bf1_precision, bf1_recall, bf1_counts, bf1_tolerance_px) + split, model, model_dir, seed, patches,
  per_scene {scene: {mIoU, pixel_accuracy, mF1, bf1, iou, pixels}};
- ``confusion.json``: classes, rows = truth, columns = prediction, matrix, per_scene matrices;
- ``samples.npz``: images (N,H,W,3) uint8, truth (N,H,W) uint8, pred (N,H,W) uint8, ids, scenes for
  N evenly spaced patches (``evaluate.samples``), for the report's overlays.
"""

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from aerialseg.core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from aerialseg.data.datasets import collate_patches
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.evaluation.metrics import DEFAULT_BF1_TOLERANCE_PX, BoundaryF1, ConfusionMatrix
from aerialseg.models import get_spec, load_model
from aerialseg.core.config import section
from aerialseg.training.train import autocast, forward_logits, resolve_device

log = logging.getLogger(__name__)

SCENE_KEYS = ("mIoU", "pixel_accuracy", "mF1", "iou", "pixels")


class Ownership:
    """Which pixels of each patch it scores: those nearer its centre than any overlapping patch's."""

    def __init__(self, patches: list[dict[str, Any]]):
        self.patches = patches
        rects = np.array([[p["row"], p["col"], p["height"], p["width"]] for p in patches], dtype=np.float64)
        scenes = np.array([p.get("scene_name", p.get("scene", "")) for p in patches])
        self.rects, self.scenes = rects, scenes

    def neighbours(self, i: int) -> np.ndarray:
        r, c, h, w = self.rects[i]
        others = self.rects
        hit = ((others[:, 0] < r + h) & (others[:, 0] + others[:, 2] > r) & (others[:, 1] < c + w)
               & (others[:, 1] + others[:, 3] > c) & (self.scenes == self.scenes[i]))
        hit[i] = False
        return np.flatnonzero(hit)

    def mask(self, i: int) -> np.ndarray | None:
        """Boolean (H, W) of the pixels patch ``i`` scores; None when it overlaps no other patch."""
        near = self.neighbours(i)
        if near.size == 0:
            return None
        r, c, h, w = self.rects[i]
        ys = (r + 0.5 + np.arange(int(h)))[:, None]
        xs = (c + 0.5 + np.arange(int(w)))[None, :]
        own_dist = (ys - (r + h / 2)) ** 2 + (xs - (c + w / 2)) ** 2
        owned = np.ones((int(h), int(w)), dtype=bool)
        for j in near:
            rj, cj, hj, wj = self.rects[j]
            inside = (ys >= rj) & (ys < rj + hj) & (xs >= cj) & (xs < cj + wj)
            dist = (ys - (rj + hj / 2)) ** 2 + (xs - (cj + wj / 2)) ** 2
            owned &= ~(inside & ((dist < own_dist) | ((dist == own_dist) & (j < i))))
        return owned


def sample_indices(count: int, samples: int) -> set[int]:
    """``samples`` evenly spaced patch indices (all when there are fewer)."""
    if count == 0 or samples <= 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(samples, count)).round()}


def split_dataset(params: dict[str, Any], split: str) -> Dataset:
    """The patches of one split (no augmentation) from the tiles and split stage outputs."""
    from aerialseg.data.datasets import PatchDataset, stage_outputs

    manifest, split_file, _ = stage_outputs(params)
    return PatchDataset(manifest, split_file, split)


class Scores:
    """Confusion matrices (split and per scene), boundary F1 and the kept sample patches."""

    def __init__(self, tolerance_px: float, keep: set[int]):
        self.tolerance_px = tolerance_px
        self.matrix = ConfusionMatrix(NUM_CLASSES, IGNORE)
        self.bf1 = BoundaryF1(NUM_CLASSES, tolerance_px, IGNORE)
        self.scenes: dict[str, ConfusionMatrix] = defaultdict(lambda: ConfusionMatrix(NUM_CLASSES, IGNORE))
        self.scene_bf1: dict[str, BoundaryF1] = defaultdict(lambda: BoundaryF1(NUM_CLASSES, tolerance_px, IGNORE))
        self.keep = keep
        self.samples: dict[str, list[Any]] = {"images": [], "truth": [], "pred": [], "ids": [], "scenes": []}

    def add(self, index: int, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, scene: str, pid: str) -> None:
        boundary = BoundaryF1(NUM_CLASSES, self.tolerance_px, IGNORE)
        boundary.update(pred, truth)
        for matrix, bf1 in ((self.matrix, self.bf1), (self.scenes[scene], self.scene_bf1[scene])):
            matrix.update(pred, truth)
            bf1.merge(boundary)
        if index in self.keep:
            for key, value in zip(self.samples, (image, truth, pred, pid, scene)):
                self.samples[key].append(value)


def score_split(model: torch.nn.Module, name: str, dataset: Dataset, device: torch.device, batch_size: int,
                tolerance_px: float, samples: int, workers: int = 0) -> Scores:
    """Predict every patch and accumulate the scores (pixels outside a patch's ownership are ignored)."""
    spec = get_spec(name)
    patches = getattr(dataset, "patches", None)
    owner = Ownership(patches) if patches else None
    scores = Scores(tolerance_px, sample_indices(len(dataset), samples))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_patches,
                        num_workers=workers)
    index = 0
    with torch.inference_mode():
        for images, masks in tqdm(loader, desc="evaluate", unit="batch", leave=False):
            with autocast(device, True):
                logits, _ = forward_logits(model, spec, images.to(device))
            preds = logits.argmax(1).to(torch.uint8).cpu().numpy()
            for image, truth, pred in zip(images.permute(0, 2, 3, 1).numpy(), masks.numpy(), preds):
                truth = truth.astype(np.uint8)
                owned = owner.mask(index) if owner else None
                if owned is not None:
                    truth = np.where(owned, truth, IGNORE).astype(np.uint8)
                patch = patches[index] if patches else {}
                scores.add(index, image, truth, pred, str(patch.get("scene_name", "all")),
                           str(patch.get("id", index)))
                index += 1
    return scores


def metrics_record(scores: Scores, meta: dict[str, Any], model_dir: Path, split: str, count: int) -> dict[str, Any]:
    """The metrics.json content (keys listed in the module docstring)."""
    overall = {k: v for k, v in scores.matrix.summary().items() if k != "confusion_matrix"}
    per_scene = {}
    for scene in sorted(scores.scenes):
        summary = scores.scenes[scene].summary()
        per_scene[scene] = {**{k: summary[k] for k in SCENE_KEYS}, "bf1": scores.scene_bf1[scene].summary()["bf1"]}
    return {"split": split, "model": meta["name"], "model_dir": str(model_dir), "seed": meta.get("seed"),
            "patches": count, **overall, **scores.bf1.summary(), "per_scene": per_scene,
            "counting": "each labelled pixel of the split once (overlaps: nearest patch centre)"}


def write_samples(dest: Path, samples: dict[str, list[Any]]) -> Path:
    """samples.npz (uncompressed) with images, truth, pred, ids, scenes."""
    arrays = {k: np.stack(v) if k in ("images", "truth", "pred") and v else np.asarray(v) for k, v in samples.items()}
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return dest


def evaluate_run(params: dict[str, Any], model_dir: str | Path | None = None, split: str | None = None,
                 out_dir: str | Path | None = None, dataset: Dataset | None = None) -> dict[str, Any]:
    """Evaluate a model dir on a split; writes metrics.json, confusion.json, samples.npz; returns the metrics.

    ``dataset`` replaces the split's patches (any dataset of (image, mask); a ``patches`` attribute with
    scene_name/row/col/height/width enables per-scene scores and overlap handling).
    """
    cfg = section(params, "evaluate")
    model_dir = Path(model_dir or cfg.get("model", "models/default"))
    split = split or str(cfg.get("split", "test"))
    out_dir = Path(out_dir or cfg.get("out", "reports"))
    dataset = dataset if dataset is not None else split_dataset(params, split)
    if len(dataset) == 0:
        raise AerialsegError(f"split '{split}' has no patches", fix="check split.fractions, or evaluate another split")
    device = resolve_device(str(cfg.get("device", "auto")))
    model, meta = load_model(model_dir)
    scores = score_split(model.to(device), meta["name"], dataset, device, int(cfg.get("batch_size", 8)),
                         float(cfg.get("bf1_tolerance_px", DEFAULT_BF1_TOLERANCE_PX)), int(cfg.get("samples", 8)))
    metrics = metrics_record(scores, meta, model_dir, split, len(dataset))
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "confusion.json", {
        "classes": list(CLASS_NAMES), "rows": "truth", "columns": "prediction", "split": split,
        "matrix": scores.matrix.matrix.tolist(),
        "per_scene": {s: m.matrix.tolist() for s, m in sorted(scores.scenes.items())}})
    write_samples(out_dir / "samples.npz", scores.samples)
    log.debug("%s on %s: mIoU %s, pixel accuracy %s, BF1 %s", meta["name"], split, metrics["mIoU"],
             metrics["pixel_accuracy"], metrics["bf1"])
    return metrics
