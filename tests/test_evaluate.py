"""Evaluation: each split pixel counted once, per-scene matrices, stable JSON keys; the real data path."""

import json

import cv2
import numpy as np
import pytest
import rasterio
import torch

from aerialseg.data.augment import augment_stage
from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.evaluation.evaluate import Ownership, evaluate_run, sample_indices
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.models import create_model, get_spec, load_model, save_model
from aerialseg.data.split import split_stage
from aerialseg.data.tiling import tiles_stage
from aerialseg.training.train import ArrayPatchDataset, forward_logits, patch_datasets, train_run
from test_tiling import dubai_scene, stage_params, write_index, write_pair
from test_train import small_datasets

METRIC_KEYS = {"mIoU", "pixel_accuracy", "mF1", "mPrecision", "mRecall", "fwIoU", "iou", "f1", "precision", "recall",
               "support_px", "pixels", "bf1", "bf1_per_class", "bf1_tolerance_px", "split", "model", "model_dir",
               "seed", "patches", "per_scene"}



def patch(scene, row, col, size=4):
    return {"scene_name": scene, "row": row, "col": col, "height": size, "width": size, "id": f"{scene}_{row}_{col}"}


def test_ownership_counts_every_covered_pixel_once():
    patches = [patch("a", r, c) for r in (0, 3, 6) for c in (0, 2, 5)] + [patch("a", 1, 1), patch("b", 0, 0)]
    owner = Ownership(patches)
    coverage = {"a": np.zeros((10, 10), int), "b": np.zeros((10, 10), int)}
    union = {"a": np.zeros((10, 10), bool), "b": np.zeros((10, 10), bool)}
    for i, p in enumerate(patches):
        owned = owner.mask(i)
        owned = np.ones((4, 4), bool) if owned is None else owned
        coverage[p["scene_name"]][p["row"]:p["row"] + 4, p["col"]:p["col"] + 4] += owned
        union[p["scene_name"]][p["row"]:p["row"] + 4, p["col"]:p["col"] + 4] = True
    for scene in coverage:
        assert np.array_equal(coverage[scene], union[scene].astype(int))
    assert owner.mask(len(patches) - 1) is None  # scene b's patch overlaps nothing of scene a
    # two side-by-side windows overlapping by 2 px split the overlap in the middle
    pair = Ownership([patch("s", 0, 0), patch("s", 0, 2)])
    assert pair.mask(0)[0].tolist() == [True, True, True, False]
    assert pair.mask(1)[0].tolist() == [False, True, True, True]


def test_sample_indices():
    assert sample_indices(100, 5) == {0, 25, 50, 74, 99}
    assert sample_indices(3, 8) == {0, 1, 2} and sample_indices(0, 4) == set()


def test_metrics_match_a_direct_confusion_matrix(tmp_path):
    torch.manual_seed(0)
    model = create_model("pspnet_resnet18")
    save_model(model, tmp_path / "m", "pspnet_resnet18", extra={"seed": 11})
    _, val = small_datasets()
    metrics = evaluate_run({"evaluate": {"samples": 3, "device": "cpu"}}, tmp_path / "m", "val", tmp_path / "r", val)
    loaded, _ = load_model(tmp_path / "m")
    expected = ConfusionMatrix()
    with torch.no_grad():
        for image, mask in val:
            logits, _ = forward_logits(loaded, get_spec("pspnet_resnet18"), torch.from_numpy(image).permute(2, 0, 1)[None])
            expected.update(logits.argmax(1)[0], mask)
    assert METRIC_KEYS <= set(metrics) and metrics["seed"] == 11 and metrics["split"] == "val"
    assert metrics["mIoU"] == expected.summary()["mIoU"] and metrics["pixels"] == int(expected.matrix.sum())
    written = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics)) and "confusion_matrix" not in written
    confusion = json.loads((tmp_path / "r" / "confusion.json").read_text())
    assert confusion["classes"] == list(CLASS_NAMES) and confusion["matrix"] == expected.matrix.tolist()
    assert confusion["per_scene"] == {"all": expected.matrix.tolist()}
    with np.load(tmp_path / "r" / "samples.npz") as samples:
        assert samples["images"].shape == (3, 64, 64, 3) and samples["images"].dtype == np.uint8
        assert samples["truth"].shape == samples["pred"].shape == (3, 64, 64)
        assert set(np.unique(samples["pred"])) <= set(range(5)) and len(samples["ids"]) == 3
    with pytest.raises(AerialsegError, match="no patches"):
        evaluate_run({}, tmp_path / "m", "val", tmp_path / "r", ArrayPatchDataset([]))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Real tiles/split/augment stage outputs of two downscaled Dubai scenes (64 px patches)."""
    root = tmp_path_factory.mktemp("pipeline")
    entries = []
    for i, tile in enumerate(("tile_2", "tile_3")):
        rgb, mask = dubai_scene(tile)
        small = cv2.resize(rgb, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(mask, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST)
        entries.append(write_pair(root / "masks", tile, small, labels))
    write_index(root / "masks", entries)
    params = stage_params(root, tiles={"size": 64, "overlap": 16}, split={"block_px": 128})
    tiles_stage(params)
    split_stage(params)
    augment_stage(params)
    return root, params


def test_train_and_evaluate_on_the_real_data_path(data_root, tmp_path):
    root, data_params = data_root
    params = {**data_params, "data": {"gsd_m": 2.0}, "model": {"name": "pspnet_resnet18"},
              "train": {"epochs": 1, "batch_size": 8}, "evaluate": {"device": "cpu", "samples": 4}}
    (train, val), identity = patch_datasets(params)
    assert len(train) == 2 * len(train.patches) and len(val) > 0  # offline copies follow the originals
    summary = train_run(params, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["training_data_sha256"] == identity["training_data_sha256"] and meta["gsd_m"] == 2.0
    assert summary["train_patches"] == len(train)
    metrics = evaluate_run(params, tmp_path / "run", "test", tmp_path / "reports")
    test_patches = json.loads((root / "split" / "split.json").read_text())["splits"]["test"]
    manifest = {p["id"]: p for p in json.loads((root / "tiles" / "manifest.json").read_text())["patches"]}
    labelled = 0  # labelled pixels in the union of the test windows, scene by scene
    for entry in json.loads((root / "masks" / "index.json").read_text()):
        with rasterio.open(entry["mask"]) as ds:
            mask = ds.read(1)
        covered = np.zeros(mask.shape, bool)
        for pid in test_patches:
            p = manifest[pid]
            if p["mask"] == entry["mask"]:
                covered[p["row"]:p["row"] + p["height"], p["col"]:p["col"] + p["width"]] = True
        labelled += int((covered & (mask != IGNORE)).sum())
    assert metrics["pixels"] == labelled  # overlapping test windows count their shared pixels once
    assert set(metrics["per_scene"]) <= {"tile_2", "tile_3"}
    assert sum(s["pixels"] for s in metrics["per_scene"].values()) == labelled
    assert (tmp_path / "reports" / "samples.npz").is_file()
