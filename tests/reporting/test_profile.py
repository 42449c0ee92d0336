"""Model table: used-parameter counting, FLOPs convention, latency timing, ONNX Runtime, CLI."""

import json

import numpy as np
import onnx
import pytest
import segmentation_models_pytorch as smp
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.core.errors import AerialsegError
from aerialseg.models import list_models, register_model, save_model
from aerialseg.reporting.profile import (
    count_flops,
    count_trained_parameters,
    count_used_parameters,
    example_input,
    markdown_table,
    onnx_latency,
    profile_model,
    read_model_table,
    time_calls,
)
from aerialseg.stages.profile import run as profile_stage

TINY = "_test_profile_tiny"


class TinyNet(nn.Module):
    """conv 3->8 (3x3), conv 8->classes (1x1), an aux head used only in training, a never-used Linear,
    and optionally a frozen body run under no_grad (like a frozen ViT encoder)."""

    def __init__(self, classes: int = 5, in_channels: int = 3, frozen_body: bool = False):
        super().__init__()
        self.body = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, classes, 1, bias=False)
        self.aux = nn.Conv2d(8, classes, 1, bias=False)
        self.unused = nn.Linear(100, 100)
        self.frozen_body = frozen_body
        if frozen_body:
            self.body.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_body):
            features = torch.relu(self.norm(self.body(x)))
        logits = self.head(features)
        return (logits, [self.aux(features)]) if self.training else logits


if TINY not in list_models():
    register_model(TINY, tile_size=32, pad_multiple=8, family="test")(TinyNet)

BODY, NORM, HEAD = 3 * 8 * 9, 2 * 8, 8 * 5


def test_used_and_trained_parameters_of_a_tiny_net():
    model = TinyNet()
    sample = example_input(16)
    assert count_used_parameters(model, sample) == BODY + NORM + HEAD  # eval: no aux, never the Linear
    assert count_trained_parameters(model, sample) == BODY + NORM + 2 * HEAD  # train: aux head too
    assert model.training and model.norm.num_batches_tracked.item() == 0  # mode and statistics restored
    assert all(p.grad is None for p in model.parameters())


def test_frozen_body_is_used_but_not_trained():
    model = TinyNet(frozen_body=True).eval()
    sample = example_input(16)
    assert count_used_parameters(model, sample) == BODY + NORM + HEAD
    assert count_trained_parameters(model, sample) == 2 * HEAD
    assert not model.body.weight.requires_grad and not model.training


def test_pspnet_keeps_unused_encoder_stages():
    model = smp.PSPNet("resnet18", encoder_weights=None, classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    used = count_used_parameters(model, example_input(64))
    assert 11.3e6 < total < 11.4e6  # smp 0.6.0 PSPNet-r18 (environment.md: 11.35 M)
    assert 0.8e6 < used < 0.9e6  # encoder_depth 3 leaves layer3/layer4 unused (~0.85 M used)
    assert count_trained_parameters(model, example_input(64)) == used
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flops_are_twice_the_macs_of_convolutions():
    tile = 16
    flops = count_flops(TinyNet(), example_input(tile))
    macs = tile * tile * (BODY + HEAD)  # BatchNorm and ReLU are not counted
    assert flops == 2 * macs


def test_time_calls_reports_median():
    calls = []
    timing = time_calls(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and timing["runs"] == 5 and timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    with pytest.raises(AerialsegError):
        time_calls(lambda: None, runs=0)


def test_one_timer_times_after_warmup_and_takes_the_median(monkeypatch):
    """core.timing (used by quantize's and profile's latencies): warm-up calls untimed, median of the rest."""
    from aerialseg.core import timing

    clock, durations = [0.0], iter([5.0, 5.0, 0.001, 0.004, 0.002, 0.003])  # seconds; two warm-up calls first
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call() -> None:
        clock[0] += next(durations)

    assert timing.call_times_ms(call, runs=4, warmup=2) == pytest.approx([1.0, 4.0, 2.0, 3.0])
    clock[0], durations = 0.0, iter([0.001, 0.004, 0.002])
    assert timing.median_ms(call, runs=3, warmup=0) == pytest.approx(2.0)


def tiny_onnx(path, in_channels: int = 3, classes: int = 5):
    weight = np.random.default_rng(0).standard_normal((classes, in_channels, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", in_channels, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes, "h", "w"])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_onnx_latency(tmp_path):
    timing = onnx_latency(tiny_onnx(tmp_path / "tiny.onnx"), tile=24, threads=1, runs=3, warmup=1)
    assert timing["input_shape"] == [1, 3, 24, 24] and timing["threads"] == 1 and timing["median_ms"] > 0
    with pytest.raises(AerialsegError, match="not found"):
        onnx_latency(tmp_path / "missing.onnx", tile=24)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(AerialsegError, match="cannot load"):
        onnx_latency(tmp_path / "bad.onnx", tile=24)


def test_profile_registered_name_and_model_dir(tmp_path):
    row = profile_model(TINY, tile=20, threads=1, runs=3, warmup=1, onnx=tiny_onnx(tmp_path / "t.onnx"))
    assert row["tile"] == 24  # rounded up to the model's pad multiple (8)
    assert row["params_used_M"] < row["params_trained_M"] < row["params_total_M"]
    assert row["gmacs"] == pytest.approx(row["gflops"] / 2, abs=1e-4)
    assert row["cpu"]["threads"] == 1 and row["onnx"]["input_shape"] == [1, 3, 24, 24]
    model_dir = save_model(TinyNet(), tmp_path / "run", TINY)
    from_dir = profile_model(str(model_dir), tile=16, threads=1, runs=2, warmup=0)
    assert from_dir["model"] == TINY and from_dir["source"] == str(model_dir)
    assert "| _test_profile_tiny |" in markdown_table([row, from_dir], {str(model_dir): "0.5000"})
    with pytest.raises(AerialsegError, match="unknown model"):
        profile_model("no_such_model_xyz", tile=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AerialsegError, match="no model.json"):
        profile_model(str(tmp_path / "empty"), tile=16)


def test_profile_stage_and_cli(tmp_path, repo_root):
    params = {"report": {"profile": {"models": [TINY], "tile": 16, "threads": 1, "runs": 2, "warmup": 0,
                                     "out": str(tmp_path / "models.json")}}}
    out = profile_stage(params)
    rows = read_model_table(out)
    assert [r["model"] for r in rows] == [TINY] and "FlopCounterMode" in json.loads(out.read_text())["conventions"]
    assert "GFLOPs" in out.with_suffix(".md").read_text()
    with pytest.raises(AerialsegError, match="no models"):
        profile_stage({})
    cli_out = tmp_path / "cli.json"
    result = CliRunner().invoke(app, ["profile-models", "--model", TINY, "--tile", "16", "--threads", "1",
                                      "--runs", "2", "--out", str(cli_out), "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert read_model_table(cli_out)[0]["tile"] == 16
    bad = CliRunner().invoke(app, ["profile-models", "--model", TINY, "--onnx", "nofile", "--params",
                                   str(repo_root / "params.yaml")])
    assert isinstance(bad.exception, AerialsegError)
