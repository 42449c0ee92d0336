"""Training loop, losses, schedules, checkpoints and resume, on real Dubai aerial patches (CPU)."""

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.training.losses import build_loss, cross_entropy, dice_loss, focal_loss
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.models import create_model, get_spec, load_model, load_state
from aerialseg.stages import train as train_stage
from aerialseg.stages.train import apply_overrides, train_config
from aerialseg.data.datasets import ArrayPatchDataset
from aerialseg.data.loaders import BalancedSampler, rare_class_weights
from aerialseg.training.batch import class_mix, forward_logits, to_channels_last
from aerialseg.training.checkpoint import CHECKPOINT, load_checkpoint
from aerialseg.training.config import TrainConfig
from aerialseg.training.optim import LRFactor, build_optimizer, build_scheduler
from aerialseg.training.weights import init_weights
from helpers.patches import FAST, small_datasets

def tiny_params(**train) -> dict:
    return {"model": {"name": FAST}, "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5,
                                               **train}}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(model_dir / CHECKPOINT)["model"]


def interrupt_after_first_epoch(epoch: int, row: dict) -> None:
    """An on_epoch_end hook that stops a run as Ctrl-C would, after epoch 1's checkpoint is written."""
    if epoch == 1:
        raise KeyboardInterrupt


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- losses ------------------------------------------------------------------------------------

def test_cross_entropy_ignores_ignore_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8))
    target[:, :4] = IGNORE
    changed = logits.detach().clone()
    changed[:, :, :4] += 10 * torch.randn_like(changed[:, :, :4])  # only ignored pixels change
    assert torch.allclose(cross_entropy(logits, target), cross_entropy(changed, target))
    all_ignored = torch.full_like(target, IGNORE)
    loss = cross_entropy(logits, all_ignored)
    loss.backward()  # still differentiable, and zero
    assert float(loss) == 0.0


def test_class_weights_focal_and_dice():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 16, 16)
    target = torch.randint(0, 5, (1, 16, 16))
    plain = build_loss({"name": "ce"})(logits, target)
    weighted = build_loss({"name": "ce", "class_weights": [0.1, 1, 1, 1, 5]})(logits, target)
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), plain, atol=1e-6)  # gamma 0 = CE
    assert focal_loss(logits, target, gamma=2.0) < plain
    perfect = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float() * 50
    assert float(dice_loss(perfect, target)) < 1e-3
    assert float(dice_loss(-perfect, target)) > 0.9
    combo = build_loss({"name": "ce+dice", "dice_weight": 0.5})(logits, target)
    assert torch.allclose(combo, plain + 0.5 * dice_loss(logits, target))
    with pytest.raises(AerialsegError, match="class_weights"):
        build_loss({"class_weights": [1, 2]})
    with pytest.raises(AerialsegError, match="unknown loss"):
        build_loss({"name": "lovasz-hinge"})


def test_lovasz_loss_orders_predictions_and_ignores_ignore_pixels():
    torch.manual_seed(2)
    target = torch.randint(0, 5, (2, 12, 12))
    target[:, :3] = IGNORE
    perfect = torch.nn.functional.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 20
    noisy = perfect + 15 * torch.randn_like(perfect)
    lovasz = build_loss({"name": "lovasz"})
    assert float(lovasz(perfect, target)) < 1e-3 < float(lovasz(noisy, target)) < float(lovasz(-perfect, target))
    changed = noisy.clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 50  # only ignored pixels change
    assert torch.allclose(lovasz(noisy, target), lovasz(changed, target))
    combo = build_loss({"name": "ce+lovasz", "dice_weight": 0.5})(noisy, target)
    assert torch.allclose(combo, cross_entropy(noisy, target) + 0.5 * lovasz(noisy, target))
    logits = noisy.clone().requires_grad_(True)
    loss = lovasz(logits, torch.full_like(target, IGNORE))
    loss.backward()  # every pixel ignored: zero, still differentiable
    assert float(loss) == 0.0


def test_lr_schedules():
    poly = LRFactor("poly", total_steps=100, warmup_steps=10, power=1.0, min_ratio=0.0)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0)
    assert poly(10) == pytest.approx(1.0) and poly(55) == pytest.approx(0.5) and poly(100) == 0.0
    cosine = LRFactor("cosine", total_steps=100, warmup_steps=0, power=0.9, min_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    assert LRFactor("constant", 10, 0, 0.9, 0.0)(7) == 1.0


def test_encoder_lr_scale_puts_the_encoder_in_a_slower_group():
    model = create_model(FAST)
    cfg = train_config(tiny_params(encoder_lr_scale=0.1, warmup_epochs=0))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    encoder, rest = optimizer.param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(encoder["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert encoder["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    optimizer.step()
    scheduler.step()  # the schedule scales both groups alike
    assert encoder["lr"] / rest["lr"] == pytest.approx(0.1)
    assert len(build_optimizer(model, train_config(tiny_params())).param_groups) == 1  # 1.0: one group
    with pytest.raises(AerialsegError, match="encoder_lr_scale"):
        train_config(tiny_params(encoder_lr_scale=0))
    with pytest.raises(AerialsegError, match="has none"):
        build_optimizer(torch.nn.Conv2d(3, 5, 1), cfg)


def test_resume_with_another_encoder_lr_scale_is_a_clear_error(tmp_path):
    datasets = small_datasets()
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(tiny_params(), out_dir=tmp_path, datasets=datasets, on_epoch_end=interrupt_after_first_epoch)
    with pytest.raises(AerialsegError, match="encoder_lr_scale"):
        train_stage.run(tiny_params(encoder_lr_scale=0.5), out_dir=tmp_path, resume=True, datasets=datasets)


def test_resume_of_a_checkpoint_older_than_a_setting_reports_no_change(tmp_path, caplog):
    datasets = small_datasets()
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(tiny_params(), out_dir=tmp_path, datasets=datasets, on_epoch_end=interrupt_after_first_epoch)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    del ckpt["config"]["encoder_lr_scale"]  # as written before the setting existed
    torch.save(ckpt, tmp_path / CHECKPOINT)
    train_stage.run(tiny_params(), out_dir=tmp_path, resume=True, datasets=datasets)
    assert "changed settings" not in caplog.text
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(tiny_params(), out_dir=tmp_path / "b", datasets=datasets, on_epoch_end=interrupt_after_first_epoch)
    train_stage.run(tiny_params(lr=2e-3), out_dir=tmp_path / "b", resume=True, datasets=datasets)
    assert "changed settings ['lr']" in caplog.text


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(AerialsegError, match="unknown train key"):
        train_config({"train": {"epocs": 3}})
    with pytest.raises(AerialsegError, match="optimizer"):
        train_config({"train": {"optimizer": "lamb"}})
    params = apply_overrides({"model": {"name": "unet_efficientnet_lite0", "kwargs": {"pretrained_encoder": True}}},
                             model=FAST, seed=7, epochs=3)
    assert params["model"] == {"name": FAST, "kwargs": {}} and params["train"] == {"seed": 7, "epochs": 3}
    with pytest.raises(AerialsegError, match="unknown model"):
        apply_overrides({}, model="resnet9000")


def test_distillation_temperature_schedule():
    constant = train_config({"train": {"epochs": 5}, "distil": {"temperature": 3.0, "final_temperature": None}})
    assert [constant.temperature_at(e) for e in range(5)] == [3.0] * 5
    annealed = train_config({"train": {"epochs": 5}, "distil": {"temperature": 4.0,
                                                                           "final_temperature": 1.0}})
    assert [annealed.temperature_at(e) for e in range(5)] == [4.0, 3.25, 2.5, 1.75, 1.0]
    assert annealed.temperature_at(9) == 1.0
    with pytest.raises(AerialsegError, match="final_temperature"):
        train_config({"distil": {"final_temperature": 0}})


def test_code_defaults_equal_params_yaml():
    """A key missing from a params file must behave as the shipped params.yaml says."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["train"]
    defaults = TrainConfig()
    for key in ("threads", "num_workers", "channels_last", "batch_size", "optimizer", "lr", "amp", "epochs",
                "patch_size"):
        assert getattr(defaults, key) == shipped[key], key
    distil = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["distil"]
    for key in ("alpha", "temperature", "final_temperature"):
        assert getattr(defaults, key) == distil[key], key


# --- the loop ----------------------------------------------------------------------------------

def test_training_writes_outputs_and_learns(tmp_path):
    train_ds, val_ds = small_datasets()
    summary = train_stage.run(tiny_params(epochs=3), out_dir=tmp_path, datasets=(train_ds, val_ds))
    assert summary["epochs_run"] == 3 and summary["model"] == FAST and summary["seed"] == 42
    for name in ("model.safetensors", "model.json", "history.csv", "curves.png", "train_summary.json", CHECKPOINT):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_mIoU", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]  # it learns something on real pixels
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["epoch"] == summary["best_epoch"]
    assert meta["metrics"]["val_mIoU"] == pytest.approx(summary["best_val_mIoU"])
    assert {"training_data_sha256", "gsd_m", "seed", "train"} <= set(meta)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model, _ = load_model(tmp_path)  # the best epoch's weights rebuild from safetensors + model.json
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_channels_last_trains_to_the_same_result(tmp_path):
    datasets = small_datasets()
    plain = train_stage.run(tiny_params(channels_last=False), out_dir=tmp_path / "a", datasets=datasets)
    nhwc = train_stage.run(tiny_params(channels_last=True), out_dir=tmp_path / "b", datasets=datasets)
    assert nhwc["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-3)
    assert json.loads((tmp_path / "b" / "model.json").read_text())["train"]["channels_last"] is True
    model, _ = load_model(tmp_path / "b")  # saved NHWC weights load into a plain model
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_channels_last_leaves_higher_rank_weights_alone():
    model = to_channels_last(create_model("thin_dyunet").train())  # DAS-Net family: rank-5 dynamic kernels
    ranks = {p.dim() for p in model.parameters()}
    assert 5 in ranks and 4 in ranks
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    x = torch.rand(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.mean().backward()
    assert out.shape == (2, 5, 128, 128)


def test_two_runs_give_identical_weights(tmp_path):
    datasets = small_datasets(augment=True)
    train_stage.run(tiny_params(), out_dir=tmp_path / "a", datasets=datasets)
    train_stage.run(tiny_params(), out_dir=tmp_path / "b", datasets=datasets)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    train_stage.run(tiny_params(seed=5), out_dir=tmp_path / "c", datasets=datasets)
    assert not torch.equal(weights(tmp_path / "a")["encoder.conv1.weight"],
                           weights(tmp_path / "c")["encoder.conv1.weight"])


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    datasets = small_datasets(augment=True)
    params = tiny_params(epochs=3, schedule="cosine")
    full = train_stage.run(params, out_dir=tmp_path / "full", datasets=datasets)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(params, out_dir=tmp_path / "cut", datasets=datasets, on_epoch_end=interrupt_after_first_epoch)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["loop"]["epoch"] == 1
    resumed = train_stage.run(params, out_dir=tmp_path / "cut", resume=True, datasets=datasets)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert resumed["best_val_mIoU"] == full["best_val_mIoU"] and resumed["epochs_run"] == 3
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((tmp_path / "full" / "history.csv").open())]
    again = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((tmp_path / "cut" / "history.csv").open())]
    assert strip == again


def ema_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The moving-average model's tensors in a run's checkpoint, named as in the model."""
    ema = load_checkpoint(model_dir / CHECKPOINT)["ema"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def val_miou(model: torch.nn.Module, dataset: ArrayPatchDataset) -> float:
    """mIoU of ``model`` on every item of ``dataset``, as the training loop validates."""
    matrix = ConfusionMatrix(5, IGNORE)
    with torch.no_grad():
        for image, mask in dataset:
            logits, _ = forward_logits(model.eval(), get_spec(FAST), torch.from_numpy(image).permute(2, 0, 1)[None])
            matrix.update(logits.argmax(1), torch.from_numpy(mask)[None].long())
    return matrix.summary()["mIoU"]


def test_ema_weights_are_validated_saved_and_resumed(tmp_path):
    datasets = small_datasets(augment=True)
    params = tiny_params(epochs=3, ema=0.9)
    full = train_stage.run(params, out_dir=tmp_path / "full", datasets=datasets)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(params, out_dir=tmp_path / "cut", datasets=datasets, on_epoch_end=interrupt_after_first_epoch)
    train_stage.run(params, out_dir=tmp_path / "cut", resume=True, datasets=datasets)
    average, raw = ema_weights(tmp_path / "full"), weights(tmp_path / "full")
    assert average.keys() == raw.keys()
    assert any(not torch.equal(average[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert_same_weights(average, ema_weights(tmp_path / "cut"))  # the average is checkpointed and restored
    assert full["best_epoch"] == 3  # so model.safetensors holds the last epoch's average
    model, meta = load_model(tmp_path / "full")
    assert meta["train"]["ema"] == 0.9
    saved = model.state_dict()
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert meta["metrics"]["val_mIoU"] == pytest.approx(val_miou(model, datasets[1]), abs=1e-6)  # the average's
    with pytest.raises(AerialsegError, match="train.ema"):
        train_config(tiny_params(ema=1.0))


def test_balanced_sampling_draws_rare_class_patches_more_often(tmp_path):
    counts = np.array([[100, 0, 0, 0, 0]] * 8 + [[50, 0, 0, 0, 50], [0, 0, 0, 0, 0]])  # building is rare
    weights = rare_class_weights(counts)
    assert weights[8] > 2 * weights[0] and weights[9] == 1.0  # nothing labelled: the neutral weight
    sampler = BalancedSampler(weights, seed=3)
    draws = list(sampler)
    sampler.set_epoch(1)
    assert len(draws) == len(counts) and list(BalancedSampler(weights, 3, rank=0, world_size=1)) == draws
    assert list(sampler) != draws
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    tally = np.bincount(drawn, minlength=10)
    assert tally[8] > 2 * tally[:8].mean()
    datasets = small_datasets()
    assert datasets[0].item_class_counts().shape == (len(datasets[0]), 6)
    summary = train_stage.run(tiny_params(sampling="balanced"), out_dir=tmp_path, datasets=datasets)
    assert summary["epochs_run"] == 2 and json.loads((tmp_path / "model.json").read_text())["train"]["sampling"] == "balanced"
    with pytest.raises(AerialsegError, match="train.sampling"):
        train_config(tiny_params(sampling="rare"))
    with pytest.raises(AerialsegError, match="per-patch class counts"):  # e.g. OpenEarthMap's random crops
        train_stage.run(tiny_params(sampling="balanced"), out_dir=tmp_path / "x",
                        datasets=(torch.utils.data.TensorDataset(torch.zeros(4)), datasets[1]))


def test_class_mix_pastes_half_the_classes_of_a_partner_with_their_labels():
    """Each patch takes the pixels and labels of half (rounded up) of another patch's classes, from the batch as it
    came in (never from an already mixed patch); ignore is never pasted; p = 0 changes nothing."""
    torch.manual_seed(0)
    images = torch.arange(1, 5, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    masks = torch.full((4, 8, 8), IGNORE, dtype=torch.int64)
    masks[0, :4], masks[1, :, :4], masks[2, 4:], masks[3, :, 4:] = 1, 3, 4, 2
    masks[:, 0, 0] = 0  # every patch also holds one background pixel
    mixed_images, mixed_masks = class_mix(images, masks, 1.0)
    assert torch.equal(class_mix(images, masks, 0.0)[1], masks)
    for target in range(4):
        changed = mixed_masks[target] != masks[target]
        sources = {int(v) for v in mixed_images[target, 0][changed].unique()} - {target + 1}
        assert len(sources) <= 1, "pixels of one partner only"
        if sources:
            source = sources.pop() - 1
            assert source != target
            assert torch.equal(mixed_masks[target][changed], masks[source][changed])
            assert IGNORE not in mixed_masks[target][changed].tolist()
        pasted = mixed_images[target, 0] != target + 1
        assert bool((mixed_masks[target][pasted] != IGNORE).all())
    assert bool((mixed_images != images).any()), "p = 1 mixes"
    with pytest.raises(AerialsegError, match="class_mix"):
        TrainConfig(class_mix=1.5).check()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(AerialsegError, match="no checkpoint"):
        train_stage.run(tiny_params(), out_dir=tmp_path, resume=True, datasets=small_datasets())


def test_early_stopping_keeps_best_epoch(tmp_path, monkeypatch):
    """Scripted validation mIoU 0.2, 0.6, 0.4, 0.3, ...: patience 2 stops after epoch 4, best = epoch 2."""
    import aerialseg.training.loop as train_module

    scripted = iter([0.2, 0.6, 0.4, 0.3, 0.9, 0.9])

    class Scripted(ConfusionMatrix):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def summary(self, class_names=()):
            return {"mIoU": self.value}

    def fake_validate(job, loader):
        value = next(scripted)
        return 1.0 - value, Scripted(value)

    monkeypatch.setattr(train_module, "validate", fake_validate)
    summary = train_stage.run(tiny_params(epochs=6, patience=2), out_dir=tmp_path, datasets=small_datasets())
    assert summary["epochs_run"] == 4 and summary["early_stopped"] is True
    assert summary["best_epoch"] == 2 and summary["best_val_mIoU"] == 0.6
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 2


# --- weights: init_from, unsafe files ----------------------------------------------------------

def test_init_from_loads_matching_model_and_skips_others(tmp_path, caplog):
    train_stage.run(tiny_params(epochs=1), out_dir=tmp_path / "pre", datasets=small_datasets())
    saved, _ = load_model(tmp_path / "pre")
    model = create_model(FAST)
    assert init_weights(model, tmp_path / "pre", FAST) == str(tmp_path / "pre")
    assert_same_weights(model.state_dict(), saved.state_dict())
    other = create_model("segformer_b0")
    assert init_weights(other, tmp_path / "pre", "segformer_b0") is None
    assert "not used" in caplog.text
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "pretrain.json").write_text('{"enabled": false}')
    assert init_weights(model, tmp_path / "off", FAST) is None
    with pytest.raises(AerialsegError, match="init_from not found"):
        init_weights(model, tmp_path / "nowhere", FAST)


class _Payload:
    """Unpickling this runs a shell command: what a malicious 'model file' does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    torch_evil = tmp_path / "evil_torch.pt"
    torch.save({"state_dict": _Payload(marker)}, torch_evil)
    for path in (evil, torch_evil):
        with pytest.raises(AerialsegError, match="refusing|safely"):
            load_checkpoint(path)
        with pytest.raises(AerialsegError, match="safely"):
            load_state(create_model(FAST), path)
    assert not marker.exists()
    torch.load(torch_evil, weights_only=False)  # proves the payload is live: unsafe loading runs it
    assert marker.exists()
