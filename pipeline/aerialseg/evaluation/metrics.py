"""Segmentation metrics from one confusion matrix accumulated over a whole split or scene.

Definitions (stated in the report as well):
- the confusion matrix counts pixels whose label is not ``ignore`` (255); rows = truth, cols = prediction;
- IoU_c = TP_c / (TP_c + FP_c + FN_c); precision_c = TP_c / (TP_c + FP_c); recall_c = TP_c / (TP_c + FN_c);
  F1_c = Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c);
- macro mIoU / mF1 = mean over classes *present* (TP + FP + FN > 0); a class absent from both truth and
  prediction is reported as null and left out of the mean;
- pixel accuracy = trace / total (micro); frequency-weighted IoU as a secondary number;
- boundary F1 (BF1, Csurka et al. 2013): per class, the boundary of a region is its inner edge (pixels of
  the class with a 3x3 neighbour outside it; the inner half of OpenCV's morphological gradient); the
  image border and the border of ignore areas are not boundaries. A predicted boundary pixel is matched
  when a true boundary pixel of the same class lies within ``tolerance_px`` (Euclidean, default 2 px),
  and vice versa. The four counts (matched predicted, predicted, matched true, true boundary pixels)
  are summed over the whole split; BF1_c = 2 P R / (P + R) with P = matched predicted / predicted and
  R = matched true / true; a class with no boundary in truth nor prediction is null and left out of
  the mean bf1 (macro).
"""

from typing import Any

import cv2
import numpy as np
import torch

from aerialseg.core.classes import CLASS_NAMES, IGNORE


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


DEFAULT_BF1_TOLERANCE_PX = 2.0


def class_boundary(mask: np.ndarray, dont_care: np.ndarray | None = None) -> np.ndarray:
    """Inner boundary of a binary mask (H, W): pixels of the mask with a 3x3 neighbour outside it.

    Pixels in ``dont_care`` count as inside while eroding, so the edge of an ignore area is not a
    boundary; the image border is not one either (OpenCV erodes with an infinite border value).
    """
    inside = mask.astype(np.uint8)
    grown = inside | dont_care.astype(np.uint8) if dont_care is not None else inside
    eroded = cv2.erode(grown, np.ones((3, 3), np.uint8))
    boundary = (inside == 1) & (eroded == 0)
    if dont_care is not None:
        boundary &= ~dont_care
    return boundary


def _distance_to(boundary: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``boundary`` (inf when none)."""
    if not boundary.any():
        return np.full(boundary.shape, np.inf, dtype=np.float32)
    return cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


class BoundaryF1:
    """Boundary F1 per class (BF score), accumulated as pixel counts over patches or scenes.

    ``counts`` is (K, 4) int64: matched predicted, predicted, matched true, true boundary pixels.
    """

    COLUMNS = ("matched_pred", "pred", "matched_true", "true")

    def __init__(self, num_classes: int = len(CLASS_NAMES), tolerance_px: float = DEFAULT_BF1_TOLERANCE_PX,
                 ignore_index: int = IGNORE):
        if tolerance_px < 0:
            raise ValueError("tolerance_px must be >= 0")
        self.num_classes = num_classes
        self.tolerance_px = float(tolerance_px)
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, 4), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
               counted: np.ndarray | None = None) -> None:
        """Add one mask (H, W) or a batch (N, H, W) of class predictions and labels.

        ``counted`` (H, W, one mask only) restricts the counted pixels, e.g. to the core rows of a block
        read with a halo, while boundaries and distances still see the whole block.
        """
        pred, target = _as_numpy(pred), _as_numpy(target)
        if pred.shape != target.shape or pred.ndim not in (2, 3):
            raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (H, W) or (N, H, W)")
        if counted is not None and counted.shape != pred.shape:
            raise ValueError(f"counted {counted.shape} must match pred {pred.shape}")
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
            counted = None if counted is None else counted[None]
        for i, (one_pred, one_target) in enumerate(zip(pred, target)):
            self._update_one(one_pred, one_target, None if counted is None else counted[i])

    def _update_one(self, pred: np.ndarray, target: np.ndarray, counted: np.ndarray | None = None) -> None:
        ignore = (target == self.ignore_index) | (target < 0) | (target >= self.num_classes)
        for c in range(self.num_classes):
            true_edge = class_boundary(target == c, ignore)
            pred_edge = class_boundary(pred == c, ignore)
            if not (true_edge.any() or pred_edge.any()):
                continue
            matched_pred = pred_edge & (_distance_to(true_edge) <= self.tolerance_px)
            matched_true = true_edge & (_distance_to(pred_edge) <= self.tolerance_px)
            if counted is not None:
                matched_pred, pred_edge = matched_pred & counted, pred_edge & counted
                matched_true, true_edge = matched_true & counted, true_edge & counted
            self.counts[c] += (matched_pred.sum(), pred_edge.sum(), matched_true.sum(), true_edge.sum())

    def merge(self, other: "BoundaryF1") -> None:
        """Add the counts of another accumulator with the same tolerance."""
        if other.tolerance_px != self.tolerance_px:
            raise ValueError("cannot merge BoundaryF1 accumulators with different tolerances")
        self.counts += other.counts

    def summary(self, class_names: tuple[str, ...] = CLASS_NAMES) -> dict[str, Any]:
        """{"bf1": macro mean, "bf1_per_class": {...}, precision/recall per class, counts, tolerance}."""
        matched_pred, pred, matched_true, true = (self.counts[:, i].astype(np.float64) for i in range(4))
        precision = _ratio(matched_pred, pred)
        recall = _ratio(matched_true, true)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = (pred + true) > 0
        f1 = np.where(present, np.nan_to_num(f1), np.nan)
        names = list(class_names[: self.num_classes])

        def per_class(values: np.ndarray) -> dict[str, float | None]:
            return {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(names, values)}

        return {
            "bf1": None if not present.any() else round(float(np.nanmean(f1)), 6),
            "bf1_per_class": per_class(f1),
            "bf1_precision": per_class(np.where(present, np.nan_to_num(precision), np.nan)),
            "bf1_recall": per_class(np.where(present, np.nan_to_num(recall), np.nan)),
            "bf1_counts": {n: dict(zip(self.COLUMNS, map(int, row))) for n, row in zip(names, self.counts)},
            "bf1_tolerance_px": self.tolerance_px,
        }
