"""quantize.keep_fp32: the first and/or last convolution stay fp32 in the int8 model; other settings refused."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aerialseg.compression.quantize import QuantizeConfig, TileCalibrationReader, fp32_nodes, quantize_static_int8
from aerialseg.core.errors import AerialsegError
from aerialseg.models import get_spec


def _three_convs(path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 5, 1)).eval()
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=18, dynamo=False)
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def _float_weight_convs(path):
    """Conv nodes whose weight is a plain float initializer (not the output of a DequantizeLinear)."""
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in inits]


def test_fp32_nodes_names_the_first_and_last_convolution(tmp_path):
    convs = _three_convs(tmp_path / "m.onnx")
    assert fp32_nodes(tmp_path / "m.onnx", []) == []
    assert fp32_nodes(tmp_path / "m.onnx", ["first_conv"]) == [convs[0]]
    assert fp32_nodes(tmp_path / "m.onnx", ["first_conv", "last_conv"]) == sorted([convs[0], convs[-1]])


@pytest.mark.parametrize("keep", [[], ["first_conv", "last_conv"]])
def test_the_kept_convolutions_are_the_only_fp32_ones(tmp_path, keep):
    convs = _three_convs(tmp_path / "m.onnx")
    tiles = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    reader = TileCalibrationReader(tiles, get_spec("unet_efficientnet_lite0"), 32)
    config = QuantizeConfig(keep_fp32=keep, preprocess=False)
    quantize_static_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", reader, config)
    expected = {convs[0], convs[-1]} if keep else set()
    assert set(_float_weight_convs(tmp_path / "q.onnx")) == expected


def test_an_unknown_keep_fp32_entry_is_a_one_line_error():
    with pytest.raises(AerialsegError, match="quantize.keep_fp32 names head"):
        QuantizeConfig.from_params({"keep_fp32": ["head"]})
