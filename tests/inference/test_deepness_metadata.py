"""The Deepness model's metadata, read with Deepness 0.6.5's own rules (tests/helpers/deepness_rules.py).

What a survey team sees after loading ``model.deepness.onnx`` and clicking "Load default parameters":
every setting must reproduce aerialseg's map (resolution, overlap, no threshold, no median filter).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from helpers import deepness_rules as rules
from aerialseg.stages.bundle import build_bundle
from aerialseg.models import list_models, register_model, save_model

TOY = "toy_fcn_deepness"
CLASSES = ["background", "road", "water", "tree", "building"]


def _toy(classes: int = 5, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 1))


if TOY not in list_models():
    register_model(TOY, tile_size=96, pad_multiple=1, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))(_toy)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("meta")
    trained = save_model(_toy(), root / "trained", TOY, extra={"gsd_m": 0.075})
    return build_bundle(trained, root / "bundle", overlap=20)


def deepness_view(path: Path) -> tuple[rules.Settings, rules.Settings, dict[str, str], ort.InferenceSession]:
    """(state after loading the file, state after "Load default parameters", raw metadata, session)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    loaded = rules.load_model(meta, session.get_inputs()[0].shape)
    return loaded, rules.load_default_parameters(loaded, meta), meta, session


def test_loading_the_model(bundle):
    loaded, _, meta, session = deepness_view(bundle / "model.deepness.onnx")
    assert loaded.model_type == "Segmentor" and loaded.model_type in rules.MODEL_TYPES
    assert loaded.class_names == [CLASSES]
    assert [rules.output_channels(o.shape) for o in session.get_outputs()] == [len(CLASSES)]
    np.testing.assert_array_equal(loaded.mean, np.float32([0.4, 0.5, 0.6]))
    np.testing.assert_array_equal(loaded.std, np.float32([0.2, 0.25, 0.3]))
    assert loaded.tile_size == 96 and loaded.batch_size is None, "fixed tile, batch left to the user"
    assert json.loads(meta["tiles_size"]) == 96, "the key Deepness's docs name is there too"


def test_load_default_parameters_reproduce_aerialseg(bundle):
    _, ready, _, _ = deepness_view(bundle / "model.deepness.onnx")
    assert ready.resolution_cm == pytest.approx(7.5)
    assert ready.tile_size == 96
    percent = ready.overlap_percent
    assert rules.overlap_px(96, percent) >= 20 > rules.overlap_px(96, percent - 1), "the smallest percent covering 20 px"
    assert not ready.threshold_enabled and not ready.small_segment_enabled
    assert rules.median_kernel(ready) == 1, "median filter of size 1: no pixel changes"
    probs = np.array([[0.19, 0.21, 0.2, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1, 0.2]], np.float32).reshape(2, 5, 1, 1)
    assert rules.class_map(probs, ready).ravel().tolist() == [1, 0], "plain argmax, even for a hesitant pixel"


def test_deepness_defaults_without_the_metadata_would_change_the_map(bundle):
    """What the user gets before clicking the button (or with the old logits export): background forced."""
    loaded, _, _, _ = deepness_view(bundle / "model.deepness.onnx")
    assert loaded.threshold_enabled and loaded.threshold == 0.5 and rules.median_kernel(loaded) == 9
    assert loaded.resolution_cm == 3.0 and loaded.overlap_percent == 15
    probs = np.array([0.1, 0.45, 0.15, 0.2, 0.1], np.float32).reshape(1, 5, 1, 1)
    assert rules.class_map(probs, loaded).item() == 0, "road at 0.45 becomes background under Deepness's 0.5"


def test_logits_file_does_not_pass_for_a_deepness_model(bundle):
    loaded, ready, meta, _ = deepness_view(bundle / "model.onnx")
    assert loaded.model_type is None and loaded.class_names is None and "seg_thresh" not in meta
    assert ready.threshold_enabled, "Deepness would threshold the logits: this file is for infer-scene only"


def test_parser_follows_deepness_on_edge_cases():
    meta = {"class_names": "{0: 'a', 1: 'b'}", "model_type": '"segmentor"'}  # Python literal, lower case
    loaded = rules.load_model(meta, ["batch", 3, 32, 32])
    assert loaded.class_names == [["a", "b"]] and loaded.model_type == "Segmentor"
    assert rules.parse_class_names({"names": json.dumps([{"1": "x", "0": "y"}, {"0": "z"}])}) == [["y", "x"], ["z"]]
    with pytest.raises(ValueError, match="consecutive"):
        rules.parse_class_names({"class_names": json.dumps({"0": "a", "2": "c"})})
    with pytest.raises(json.JSONDecodeError):
        rules.load_default_parameters(loaded, {"seg_thresh": "zero"})
    only_documented = rules.load_default_parameters(loaded, {"tiles_size": "64"})
    assert only_documented.tile_size == 32, "Deepness ignores tiles_size: tile_size is the key it reads"
    assert rules.load_model({}, [4, 3, 32, 32]).batch_size == 4
    assert [rules.overlap_px(512, p) for p in (12, 13, 15)] == [61, 66, 76]
    assert rules.output_channels(["batch", 1, 8, 8]) == 2 and rules.output_channels(["batch", 8, 8]) == 2
