"""Segmentation metrics from one confusion matrix accumulated over a whole split or scene.

Definitions (stated in the report as well):
- the confusion matrix counts pixels whose label is not ``ignore`` (255); rows = truth, cols = prediction;
- IoU_c = TP_c / (TP_c + FP_c + FN_c); precision_c = TP_c / (TP_c + FP_c); recall_c = TP_c / (TP_c + FN_c);
  F1_c = Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c);
- macro mIoU / mF1 = mean over classes *present* (TP + FP + FN > 0); a class absent from both truth and
  prediction is reported as null and left out of the mean;
- pixel accuracy = trace / total (micro); frequency-weighted IoU as a secondary number.
"""

from typing import Any

import numpy as np
import torch

from aerialseg.classes import CLASS_NAMES, IGNORE


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix; rows = truth, columns = prediction."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), ignore_index: int = IGNORE):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add a batch of class predictions and labels (any matching shapes)."""
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().cpu().numpy()
        if isinstance(target, torch.Tensor):
            target = target.detach().cpu().numpy()
        pred = pred.reshape(-1).astype(np.int64)
        target = target.reshape(-1).astype(np.int64)
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        k = self.num_classes
        self.matrix += np.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add another matrix (e.g. from another process or scene)."""
        self.matrix += other.matrix

    def summary(self, class_names: tuple[str, ...] = CLASS_NAMES) -> dict[str, Any]:
        """All metrics as a JSON-able dict."""
        return summarize(self.matrix, class_names)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def summarize(matrix: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES) -> dict[str, Any]:
    """Per-class IoU, precision, recall, F1 and their macro means; pixel accuracy; fwIoU."""
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    fp = m.sum(0) - tp
    fn = m.sum(1) - tp
    iou = _ratio(tp, tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    total = m.sum()
    support = m.sum(1)
    names = list(class_names[: len(tp)])

    def per_class(values: np.ndarray) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(names, values)}

    def mean(values: np.ndarray) -> float | None:
        return None if np.all(np.isnan(values)) else round(float(np.nanmean(values)), 6)

    fw = float(np.nansum(support / total * np.nan_to_num(iou))) if total else None
    return {
        "mIoU": mean(iou),
        "pixel_accuracy": round(float(tp.sum() / total), 6) if total else None,
        "mF1": mean(f1),
        "mPrecision": mean(precision),
        "mRecall": mean(recall),
        "fwIoU": None if fw is None else round(fw, 6),
        "iou": per_class(iou),
        "f1": per_class(f1),
        "precision": per_class(precision),
        "recall": per_class(recall),
        "support_px": {n: int(s) for n, s in zip(names, support)},
        "pixels": int(total),
        "confusion_matrix": matrix.astype(int).tolist(),
    }
