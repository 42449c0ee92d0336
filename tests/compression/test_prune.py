"""Taylor filter pruning: importance, real channel removal, safe save/load, retraining."""

import json
from dataclasses import asdict

import pytest
import torch
import torch_pruning as tp
from torch import nn

from aerialseg.core.classes import IGNORE
from aerialseg.compression.prune import (
    PruneConfig,
    TaylorFilterImportance,
    apply_pruning_plan,
    channel_counts,
    check_prunable,
    fine_tune,
    load_model_dir,
    load_pruned_model,
    make_criterion,
    mean_loss,
    prune_and_retrain,
    prune_model,
    save_pruned_model,
    taylor_filter_scores,
)
from aerialseg.core.errors import AerialsegError
from aerialseg.stages.prune import run as prune_run
from aerialseg.models import count_parameters, create_model, get_spec, save_model

SIZE = 64


def synthetic_batches(n: int = 3, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable toy batches: the class of a pixel is the brightest of 5 smooth colour channels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coarse = torch.rand(batch, 5, SIZE // 8, SIZE // 8, generator=gen)
        field = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        masks = field.argmax(1)
        images = torch.stack([field[:, 0] - field[:, 1], field[:, 2] - field[:, 3], field[:, 4] - 0.5], 1) * 3
        masks[:, :4, :4] = IGNORE  # some ignore pixels, as real patches have
        out.append((images, masks))
    return out


def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return create_model("deeplabv3plus_resnet18", classes=5).eval()


def quick_config(**overrides) -> PruneConfig:
    base = dict(iterations=1, ratio_per_iteration=0.25, score_batches=2, round_to=None, retrain_epochs=0,
                example_size=SIZE)
    return PruneConfig(**{**base, **overrides})


def test_zero_filter_has_zero_importance():
    model = deeplab()
    conv = model.encoder.layer1[0].conv1  # its filters feed only bn1 -> conv2: a group of its own
    with torch.no_grad():
        conv.weight[3].zero_()
    scores = taylor_filter_scores(model, synthetic_batches(2), max_batches=2)
    assert scores[conv][3] == 0.0
    assert (scores[conv][torch.arange(64) != 3] > 0).all()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, SIZE, SIZE))
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(64)))
    importance = TaylorFilterImportance(scores)(group)
    assert importance.shape == (64,) and importance[3] == 0.0 and importance.argmin() == 3


def test_one_round_removes_ratio_of_channels_keeps_output_shape():
    model = deeplab()
    before_params = count_parameters(model)
    before = channel_counts(model)
    x = synthetic_batches(1)[0][0]
    model, plan = prune_model(model, synthetic_batches(2), quick_config())
    after = channel_counts(model)
    for name in ("encoder.layer1.0.conv1", "encoder.layer3.1.conv1", "decoder.block2.0.1"):
        assert after[name] == pytest.approx(before[name] * 0.75, abs=1), name
    assert after["segmentation_head.0"] == 5  # the classes stay
    assert model(x).shape == (2, 5, SIZE, SIZE)
    assert count_parameters(model) < 0.7 * before_params
    assert plan["history"] and json.loads(json.dumps(plan)) == plan  # plan is plain JSON


def test_iterations_compound_and_round_to():
    model = deeplab()
    _, _ = prune_model(model, synthetic_batches(2), quick_config(iterations=2, ratio_per_iteration=0.2, round_to=8))
    counts = channel_counts(model)
    assert counts["encoder.layer1.0.conv1"] == 40  # 64 * 0.8^2 = 41 -> multiple of 8
    assert counts["encoder.layer4.0.conv1"] % 8 == 0


def test_save_load_identical_outputs(tmp_path):
    model = deeplab()
    model, plan = prune_model(model, synthetic_batches(2), quick_config())
    save_pruned_model(model, tmp_path / "pruned", "deeplabv3plus_resnet18", plan)
    meta = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert meta["pruning"]["format"].startswith("torch-pruning-history")
    loaded, _ = load_pruned_model(tmp_path / "pruned")
    again, _ = load_model_dir(tmp_path / "pruned")
    from aerialseg.models import load_model  # what evaluate, bundle and infer-scene use

    generic, _ = load_model(tmp_path / "pruned")
    x = synthetic_batches(1, seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
        assert torch.equal(model(x), again(x))
        assert torch.equal(model(x), generic(x))
    assert count_parameters(loaded) == count_parameters(model)


def test_plan_for_another_model_is_a_clear_error():
    model = deeplab()
    _, plan = prune_model(model, synthetic_batches(2), quick_config())
    other = create_model("pspnet_resnet18", classes=5)
    with pytest.raises(AerialsegError, match="plan does not fit"):
        apply_pruning_plan(other, plan)


def test_pspnet_prune_and_retrain_lowers_loss():
    torch.manual_seed(0)
    model = create_model("pspnet_resnet18", classes=5)
    batches = synthetic_batches(3)
    config = quick_config(iterations=2, ratio_per_iteration=0.2, score_batches=3, retrain_epochs=4, retrain_lr=0.01,
                          retrain_optimizer="sgd")
    result = prune_and_retrain(model, batches, config, name="pspnet_resnet18")
    report = result.report
    assert report["params_after"] < report["params_before"]
    assert report["retrain_epoch_losses"][-1] < report["retrain_epoch_losses"][0]
    assert report["loss_after_retrain"] < report["loss_after_pruning"]
    assert result.model(batches[0][0]).shape == (2, 5, SIZE, SIZE)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.02), ("adamw", 1e-3)])
def test_fine_tune_lowers_loss_of_pruned_deeplab(optimizer, lr):
    model = deeplab()
    batches = synthetic_batches(3)
    prune_model(model, batches, quick_config())
    before = mean_loss(model, batches)
    losses = fine_tune(model, batches, 3, get_spec("deeplabv3plus_resnet18"), lr=lr, optimizer=optimizer)
    assert losses[-1] < losses[0]
    assert mean_loss(model, batches) < before


def test_aux_outputs_enter_the_criterion():
    logits = torch.zeros(1, 5, 8, 8, requires_grad=True)
    aux = torch.zeros(1, 5, 4, 4, requires_grad=True)
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    plain = make_criterion()((logits, [aux]), masks)
    weighted = make_criterion(aux_weight=0.5)((logits, [aux]), masks)
    assert weighted.item() == pytest.approx(1.5 * plain.item())


def test_transformers_are_refused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    with pytest.raises(AerialsegError, match="CNNs only"):
        check_prunable(Attn(), "toy")
    with pytest.raises(AerialsegError, match="CNNs only"):
        check_prunable(nn.Conv2d(3, 3, 1), "segformer_b0")


def test_dynamic_convolution_weights_are_refused():
    class DynamicConv(nn.Module):  # kernels held as a bare parameter, mixed per input (DAS-Net style)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 8, 3, 3, 3))

        def forward(self, x):
            return nn.functional.conv2d(x, self.weight.mean(0), padding=1)

    with pytest.raises(AerialsegError, match="outside standard layers"):
        check_prunable(nn.Sequential(DynamicConv(), nn.Conv2d(8, 5, 1)), "toy")
    check_prunable(deeplab(), "deeplabv3plus_resnet18")  # a plain CNN passes


@pytest.mark.parametrize("bad", [{"ratio_per_iteration": 1.0}, {"iterations": 0}, {"scope": "layer"}])
def test_bad_config_is_rejected(bad):
    with pytest.raises(AerialsegError, match="prune"):
        PruneConfig.from_params(bad)


def test_all_ignore_batches_cannot_score():
    images, masks = synthetic_batches(1)[0]
    with pytest.raises(AerialsegError, match="no training batch"):
        taylor_filter_scores(deeplab(), [(images, torch.full_like(masks, IGNORE))], max_batches=1)


def test_code_defaults_equal_params_yaml(repo_root):
    import yaml

    shipped = yaml.safe_load((repo_root / "params.yaml").read_text())["prune"]
    defaults = asdict(PruneConfig())
    assert {k: defaults[k] for k in shipped} == shipped


def test_prune_run_writes_model_dir(tmp_path):
    base = tmp_path / "base"
    save_model(deeplab(), base, "deeplabv3plus_resnet18")
    params = {"prune": {"enabled": True, "model_dir": str(base), "out": str(tmp_path / "pruned"), "iterations": 1,
                        "ratio_per_iteration": 0.3, "score_batches": 2, "retrain_epochs": 1, "example_size": SIZE}}
    report = prune_run(params, batches=synthetic_batches(2))
    assert report["params_after"] < report["params_before"]
    saved = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert saved["model"] == "deeplabv3plus_resnet18" and saved["channels"]
    model, meta = load_model_dir(tmp_path / "pruned")
    assert meta["source_model_dir"] == str(base) and count_parameters(model) == report["params_after"]


def test_prune_run_without_model_is_a_user_error(tmp_path):
    with pytest.raises(AerialsegError, match="trained model not found"):
        prune_run({"prune": {"enabled": True, "model_dir": str(tmp_path / "none")}})


def test_disabled_prune_stage_writes_only_its_marker(tmp_path):
    out = tmp_path / "pruned"
    record = prune_run({"prune": {"enabled": False, "model_dir": str(tmp_path / "none"), "out": str(out)}})
    assert record["enabled"] is False and "prune.enabled" in record["reason"]
    assert json.loads((out / "prune.json").read_text()) == record
    assert sorted(p.name for p in out.iterdir()) == ["prune.json"]
    with pytest.raises(AerialsegError, match="unknown prune key"):
        prune_run({"prune": {"enable": True}})
