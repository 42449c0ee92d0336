"""Confusion-matrix metrics and boundary F1 on constructed masks and real Dubai labels."""

import cv2
import numpy as np
import pytest
import torch

from aerialseg.core.classes import IGNORE
from aerialseg.evaluation.metrics import BoundaryF1, ConfusionMatrix, class_boundary, summarize
from conftest import shared_path
from helpers.dubai import DUBAI_COLORS



def dubai_mask(tile: str = "tile_2", part: str = "001") -> np.ndarray:
    """A real Dubai mask as aerialseg classes (unknown colours -> ignore)."""
    path = shared_path("dubai-aerial-cc0", tile, "masks", f"image_part_{part}.png")
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = np.full(rgb.shape[:2], IGNORE, np.uint8)
    for color, cls in DUBAI_COLORS.items():
        mask[np.all(rgb == color, axis=-1)] = cls
    return mask


def square(shift: tuple[int, int] = (0, 0), size: int = 64, cls: int = 4) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[16 + shift[0]:40 + shift[0], 16 + shift[1]:40 + shift[1]] = cls
    return mask


def bf1(pred: np.ndarray, target: np.ndarray, tolerance: float = 2.0) -> dict:
    metric = BoundaryF1(tolerance_px=tolerance)
    metric.update(pred, target)
    return metric.summary()


# --- confusion matrix ----------------------------------------------------------------------------

def test_confusion_matrix_known_values():
    target = np.array([0, 0, 1, 1, 2, IGNORE])
    pred = np.array([0, 1, 1, 1, 0, 3])
    cm = ConfusionMatrix(num_classes=5)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert cm.matrix.sum() == 5  # the ignore pixel is not counted
    s = cm.summary()
    assert s["iou"]["background"] == pytest.approx(1 / 3)  # tp 1, fp 1 (water), fn 1 (->road)
    assert s["iou"]["road"] == pytest.approx(2 / 3)
    assert s["iou"]["water"] == 0.0 and s["iou"]["tree"] is None and s["iou"]["building"] is None
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3, abs=1e-6)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_summarize_empty_matrix_is_null():
    s = summarize(np.zeros((5, 5), np.int64))
    assert s["mIoU"] is None and s["pixel_accuracy"] is None and s["pixels"] == 0


# --- boundaries ----------------------------------------------------------------------------------

def test_class_boundary_is_inner_edge_not_image_border():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    edge = class_boundary(mask)
    assert edge.sum() == 6 * 4 - 4 and not edge[3:7, 3:7].any()
    assert not class_boundary(np.ones((10, 10), bool)).any()  # the image border is no boundary


def test_class_boundary_skips_ignore_edges():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    dont_care = np.zeros((10, 10), bool)
    dont_care[:, 5:] = True  # the class meets only an ignore area
    assert not class_boundary(mask, dont_care).any()


def test_identical_masks_score_one():
    s = bf1(square(), square())
    assert s["bf1"] == 1.0
    assert s["bf1_per_class"]["building"] == 1.0 and s["bf1_per_class"]["background"] == 1.0
    assert s["bf1_per_class"]["road"] is None  # no boundary in truth nor prediction


@pytest.mark.parametrize("shift", [(1, 0), (0, -1), (1, 1)])
def test_shift_within_tolerance_scores_one(shift):
    assert bf1(square(shift), square(), tolerance=2)["bf1"] == 1.0


def test_shift_beyond_tolerance_scores_low():
    far = bf1(square((5, 5)), square(), tolerance=2)
    assert far["bf1"] < 0.2
    # a tolerance of 0 px only accepts exact boundaries: a 1-px shift loses most of them
    assert bf1(square((1, 1)), square(), tolerance=0)["bf1"] < 0.2
    # larger tolerance accepts the 5-px shift again (5 * sqrt(2) = 7.07 px)
    assert bf1(square((5, 5)), square(), tolerance=7.1)["bf1"] == 1.0


def test_missing_or_extra_class_scores_zero():
    truth = square(cls=4)
    pred = square(cls=1)  # same region, wrong class
    s = bf1(pred, truth)
    assert s["bf1_per_class"]["building"] == 0.0 and s["bf1_per_class"]["road"] == 0.0
    assert s["bf1_per_class"]["background"] == 1.0


def test_ignore_pixels_are_excluded():
    truth = square()
    truth[:, 48:] = IGNORE
    pred = square()
    pred[:, 48:] = np.random.default_rng(0).integers(0, 5, size=(64, 16))  # noise inside ignore
    assert bf1(pred, truth)["bf1"] == 1.0


def test_counts_accumulate_over_patches_and_batches():
    one = BoundaryF1()
    one.update(square((1, 0)), square())
    one.update(square((5, 5)), square())
    batched = BoundaryF1()
    batched.update(np.stack([square((1, 0)), square((5, 5))]), torch.from_numpy(np.stack([square(), square()])))
    np.testing.assert_array_equal(one.counts, batched.counts)
    merged = BoundaryF1()
    merged.merge(one)
    assert merged.summary() == one.summary()
    counts = one.summary()["bf1_counts"]["building"]
    p, r = counts["matched_pred"] / counts["pred"], counts["matched_true"] / counts["true"]
    assert one.summary()["bf1_per_class"]["building"] == pytest.approx(2 * p * r / (p + r), abs=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        BoundaryF1().update(np.zeros((4, 4)), np.zeros((5, 5)))
    with pytest.raises(ValueError):
        BoundaryF1(tolerance_px=-1)
    with pytest.raises(ValueError):
        BoundaryF1(tolerance_px=1).merge(BoundaryF1(tolerance_px=2))


def test_real_dubai_mask_boundary_f1():
    truth = dubai_mask()
    assert bf1(truth, truth)["bf1"] == 1.0
    shifted = np.full_like(truth, IGNORE)
    shifted[1:, 1:] = truth[:-1, :-1]  # a 1-px diagonal misregistration
    near = bf1(shifted, truth)["bf1"]
    dilated = cv2.dilate((truth == 4).astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
    fat_buildings = np.where(dilated & (truth != IGNORE), 4, truth).astype(np.uint8)
    fat = bf1(fat_buildings, truth)
    assert near > 0.98
    assert fat["bf1_per_class"]["building"] < 0.7 < near
    # the region metric hardly notices what the boundary metric does
    cm = ConfusionMatrix()
    cm.update(fat_buildings, truth)
    assert cm.summary()["pixel_accuracy"] > fat["bf1_per_class"]["building"]
