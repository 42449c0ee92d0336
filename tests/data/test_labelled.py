"""Classes a survey labels (issue 22): a survey labelling only tree and building (plus the background between
them) is warned about at split and train, scored over its labelled classes, and its bundle predicts only them."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from aerialseg.core.classes import CLASS_NAMES
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import fingerprint, write_json
from aerialseg.data.labelled import labelled_classes, survey_classes
from aerialseg.evaluation.evaluate import EvaluationResult, SceneScores, write_evaluation
from aerialseg.inference.bundle import Bundle, make_manifest
from aerialseg.inference.bundle_check import validate_manifest
from aerialseg.inference.predictor import only_classes
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.stages.split import run as split_stage
from helpers.manifests import grid_manifest

LABELLED = ["background", "tree", "building"]
NOT_LABELLED = ["road", "water"]


def two_class_survey(root: Path) -> dict:
    """A tiles manifest whose patches hold background, tree and building only; returns stage params."""
    manifest = grid_manifest({"a": (768, 768), "b": (768, 768)}, 256, 192)
    for patch in manifest["patches"]:
        counts = patch["counts"]
        patch["counts"] = [counts[0], 0, 0, counts[3], counts[4], counts[5]]
    write_json(root / "tiles/manifest.json", manifest)
    return {"tiles": {"out": str(root / "tiles")}, "split": {"out": str(root / "split"), "candidates": 4}}


def test_split_warns_and_records_the_labelled_classes(tmp_path, caplog):
    params = two_class_survey(tmp_path)
    with caplog.at_level(logging.WARNING):
        dest = split_stage(params)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "split: no labelled pixels of road, water in the training data" in warnings[0]
    shares = json.loads((dest.parent / "class_shares.json").read_text())
    assert shares["labelled_classes"] == LABELLED and shares["not_labelled"] == NOT_LABELLED
    assert shares["data_fingerprint"] == fingerprint([tmp_path / "tiles/manifest.json", dest])


def test_train_stage_warns_and_records_them_in_model_json(tmp_path, caplog, monkeypatch):
    from aerialseg.stages import train as train_stage

    params = two_class_survey(tmp_path)
    split_stage(params)
    monkeypatch.setattr(train_stage, "patch_datasets", lambda *a: ((None, None), {"training_data_sha256": "x"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, identity = train_stage.data(params)
    assert identity == {"training_data_sha256": "x", "labelled_classes": LABELLED}  # model.json extras
    assert any("train: no labelled pixels of road, water" in r.getMessage() for r in caplog.records)


def test_declared_classes_win_and_are_checked(tmp_path):
    pixels = {"background": 5, "road": 0, "water": 0, "tree": 3, "building": 0}
    assert labelled_classes(pixels) == ["background", "tree"]
    assert labelled_classes(pixels, ["Building", "tree", "background"]) == LABELLED
    with pytest.raises(AerialsegError, match="classes.labelled: roads"):
        labelled_classes(pixels, ["roads"])
    params = two_class_survey(tmp_path)
    dest = split_stage({**params, "classes": {"labelled": ["tree", "building"]}})
    assert survey_classes(tmp_path / "tiles/manifest.json", dest, ["tree", "building"]) == ["tree", "building"]


def test_headline_miou_is_over_the_labelled_classes(tmp_path):
    """Road and water are never labelled, the model predicts a few pixels of them: IoU 0 would halve the mean."""
    truth = np.zeros((64, 64), np.uint8)
    truth[:, 20:40], truth[:, 40:] = 3, 4
    pred = truth.copy()
    pred[:4, :8], pred[4:8, :8], pred[:, 38:42] = 1, 2, 3  # road and water pixels, a tree/building border error
    overall = SceneScores(2.0)
    overall.matrix.update(pred, truth)
    overall.bf1.update(pred, truth)
    scene = SceneScores(2.0)
    scene.merge(overall)
    result = EvaluationResult("test", overall, {"a": scene}, {"images": [], "truth": [], "pred": []}, 1)
    record = write_evaluation(tmp_path, result, Path("m"), InferOptions(), LABELLED, "f" * 64)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["not_labelled"] == NOT_LABELLED and metrics["data_fingerprint"] == "f" * 64
    assert metrics["iou"]["road"] is None and metrics["iou"]["water"] is None
    kept = [metrics["iou"][n] for n in LABELLED]
    assert metrics["mIoU"] == pytest.approx(np.mean(kept), abs=1e-6)
    assert metrics["mIoU_all_classes"] == pytest.approx(np.mean(kept + [0.0, 0.0]), abs=1e-6)
    assert metrics["mIoU"] > metrics["mIoU_all_classes"] + 0.3
    assert record["per_scene"]["a"]["mIoU"] == metrics["mIoU"] and record["bf1_per_class"]["road"] is None
    for name in ("evaluation.json", "confusion.json"):
        assert json.loads((tmp_path / name).read_text())["data_fingerprint"] == "f" * 64
    with np.load(tmp_path / "samples.npz") as samples:
        assert str(samples["data_fingerprint"]) == "f" * 64
    two = write_evaluation(tmp_path / "two", result, Path("m"), InferOptions(), ["tree", "building"], "f" * 64)
    assert two["not_labelled"] == ["background", "road", "water"]  # classes.labelled: [tree, building]
    assert two["mIoU"] == pytest.approx(np.mean([two["iou"]["tree"], two["iou"]["building"]]), abs=1e-6)


def test_bundle_records_and_predicts_only_the_labelled_classes(tmp_path):
    record = {"name": "unet_efficientnet_lite0", "classes": 5, "in_channels": 3, "kwargs": {},
              "training_data_sha256": "f" * 64, "labelled_classes": LABELLED}
    manifest = make_manifest(record, tile_size=64)
    assert manifest["labelled_classes"] == LABELLED and manifest["data_hash"] == "f" * 64
    assert Bundle(tmp_path, manifest).labelled_ids == [0, 3, 4]
    assert Bundle(tmp_path, make_manifest({**record, "labelled_classes": None})).labelled_ids is None
    logits = torch.zeros(1, 5, 2, 2)
    logits[:, 1] = 9.0  # road is the model's favourite, tree the best labelled class
    logits[:, 3] = 2.0
    kept = only_classes(lambda x: x, [0, 3, 4])(logits)
    assert kept.argmax(1).unique().tolist() == [3] and torch.softmax(kept, 1)[:, [1, 2]].max() == 0
    assert only_classes(lambda x: x, None)(logits).argmax(1).unique().tolist() == [1]
    assert CLASS_NAMES[1] == "road"
    validate_manifest(manifest, tmp_path / "bundle.json")
    with pytest.raises(AerialsegError, match="labelled_classes must list class names"):
        validate_manifest({**manifest, "labelled_classes": ["roads"]}, tmp_path / "bundle.json")


def test_infer_scene_maps_only_the_labelled_classes_unless_asked(tmp_path):
    """A model whose favourite class is road, trained on a survey without roads: its map holds no road."""
    import rasterio

    from aerialseg.models import save_model
    from aerialseg.stages.bundle import build_bundle
    from helpers.toy_bundle import TOY, _build_toy

    torch.manual_seed(0)
    model = _build_toy()
    with torch.no_grad():
        model[-1].bias[1] = 20.0
    save_model(model, tmp_path / "trained", TOY, extra={"labelled_classes": LABELLED})
    bundle = build_bundle(tmp_path / "trained", tmp_path / "bundle", overlap=32, onnx=False)
    assert json.loads((bundle / "bundle.json").read_text())["labelled_classes"] == LABELLED
    scene = tmp_path / "plain.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8") as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 200, 300), dtype=np.uint8))
    maps = {}
    for only in (True, False):
        options = InferOptions(progress=False, preview=False, allow_ungeoreferenced=True, labelled_only=only)
        with rasterio.open(infer_scene(scene, bundle, tmp_path / f"{only}.tif", options).outputs["map"]) as out:
            maps[only] = np.unique(out.read(1)).tolist()
    assert set(maps[True]) <= {0, 3, 4} and maps[False] == [1]
