"""evaluate scores the deliverable: infer-scene's stitched scene maps on the split's area."""

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.evaluation.evaluate import HEADLINE, area_mask, evaluate_scenes, sample_patches, score_map
from aerialseg.evaluation.metrics import BoundaryF1, ConfusionMatrix
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.stages import evaluate as evaluate_stage
from helpers.sample_stages import run_sample_data_stages, sample_data_params


def _write(path, array, count=1):
    profile = dict(driver="GTiff", width=array.shape[-1], height=array.shape[-2], count=count, dtype="uint8",
                   crs="EPSG:32640", transform=from_origin(500_000, 2_780_000, 0.5, 0.5))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array if count > 1 else array[None])
    return path


def test_area_mask_is_the_union_of_windows():
    rects = np.array([[0, 0, 4, 4], [2, 3, 4, 4], [9, 9, 4, 4]])
    area = area_mask(rects, 1, 6, 8)
    expected = np.zeros((12, 8), bool)
    for r, c, h, w in rects:
        expected[r:r + h, c:c + w] = True
    assert np.array_equal(area, expected[1:7])


def test_score_map_equals_direct_scores_for_any_block_size(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, (70, 50)).astype(np.uint8)
    truth[rng.random(truth.shape) < 0.05] = IGNORE
    truth = np.repeat(np.repeat(truth[::5, ::5], 5, 0), 5, 1)[:70, :50]  # regions with boundaries
    pred = truth.copy()
    pred[rng.random(pred.shape) < 0.1] = 2
    pred[truth == IGNORE] = 0
    pred[60:, :10] = IGNORE  # the map's nodata (scene nodata): never counted
    mask, pmap = _write(tmp_path / "mask.tif", truth), _write(tmp_path / "map.tif", pred)
    rects = np.array([[0, 0, 40, 30], [30, 20, 40, 30]])
    area = area_mask(rects, 0, 70, 50)
    direct_truth = np.where(area & (pred != IGNORE), truth, IGNORE).astype(np.uint8)
    matrix, bf1 = ConfusionMatrix(), BoundaryF1()
    matrix.update(pred, direct_truth)
    bf1.update(pred, direct_truth)
    for block_rows in (7, 16, 1024):
        scores = score_map(pmap, mask, rects, block_rows=block_rows)
        assert np.array_equal(scores.matrix.matrix, matrix.matrix)
        assert np.array_equal(scores.bf1.counts, bf1.counts)


def test_sample_patches_are_evenly_spaced():
    patches = [{"id": i} for i in range(100)]
    assert [p["id"] for p in sample_patches(patches, 5)] == [0, 25, 50, 74, 99]
    assert sample_patches([], 3) == [] and len(sample_patches(patches[:2], 8)) == 2


def test_no_patches_is_a_user_error(tmp_path):
    with pytest.raises(AerialsegError, match="no patches"):
        evaluate_scenes(tmp_path / "m", [], "test", InferOptions())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two sample scenes through label-to-mask, tiles, split and one short training run."""
    from aerialseg.stages import train as train_stage

    root = tmp_path_factory.mktemp("sample")
    params = run_sample_data_stages(sample_data_params(root))
    params["model"] = {"name": "pspnet_resnet18"}
    params["train"] = {**params["train"], "epochs": 1, "batch_size": 8, "device": "cpu", "init_from": None}
    params["augment"] = {**params["augment"], "copies": 0}
    params["evaluate"] = {**params["evaluate"], "model": str(root / "run"), "out": str(root / "reports"),
                          "device": "cpu", "samples": 4, "split": "test"}
    params["infer"] = {**params["infer"], "batch": 4, "progress": False}
    train_stage.run(params, out_dir=root / "run")
    return root, params


def test_evaluate_equals_the_map_infer_scene_writes(trained, tmp_path):
    root, params = trained
    record = evaluate_stage.run(params)
    patches = json.loads((root / "tiles" / "manifest.json").read_text())["patches"]
    test_ids = set(json.loads((root / "split" / "split.json").read_text())["splits"]["test"])
    test = [p for p in patches if p["id"] in test_ids]
    options = evaluate_stage.inference_options(params)
    for name, scene_record in record["per_scene"].items():
        group = [p for p in test if p["scene_name"] == name]
        infer_scene(group[0]["scene"], root / "run", tmp_path / f"{name}.tif", options)
        rects = np.array([[p["row"], p["col"], p["height"], p["width"]] for p in group])
        summary = score_map(tmp_path / f"{name}.tif", group[0]["mask"], rects).summary()
        assert abs(summary["mIoU"] - scene_record["mIoU"]) <= 1e-6
        assert summary["pixels"] == scene_record["pixels"]
    # every labelled pixel of the test windows counts once
    labelled = 0
    for name in {p["scene_name"] for p in test}:
        group = [p for p in test if p["scene_name"] == name]
        with rasterio.open(group[0]["mask"]) as ds:
            mask = ds.read(1)
        covered = area_mask(np.array([[p["row"], p["col"], p["height"], p["width"]] for p in group]),
                            0, *mask.shape)
        labelled += int((covered & (mask != IGNORE)).sum())
    assert record["pixels"] == labelled
    reports = root / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {*HEADLINE, "iou", "not_labelled", "mIoU_all_classes", "data_fingerprint"}
    assert metrics["mIoU"] == record["mIoU"]
    assert json.loads((reports / "evaluation.json").read_text())["per_scene"] == record["per_scene"]
    with np.load(reports / "samples.npz") as samples:
        assert samples["images"].shape[1:] == (128, 128, 3) and samples["pred"].shape == samples["truth"].shape
        assert len(samples["ids"]) == 4
