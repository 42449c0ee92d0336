"""Distillation: the KL term, its T^2 scaling and ignore masking, and a short run on real patches."""

import json

import pytest
import torch
import torch.nn.functional as F

from aerialseg.core.classes import IGNORE
from aerialseg.stages import distil as distil_stage
from aerialseg.stages import train as train_stage
from aerialseg.stages.distil import student_config, student_sections
from aerialseg.training.distill import agreement
from aerialseg.core.errors import AerialsegError
from aerialseg.training.losses import distillation_kl
from aerialseg.models import create_model, load_model, save_model
from aerialseg.training.config import TrainConfig
from aerialseg.training.weights import copy_teacher_weights, load_teacher
from helpers.patches import small_datasets



def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(2, 5, 8, 8)
    for temperature in (1.0, 2.0, 4.0):
        assert float(distillation_kl(logits, logits.clone(), None, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_kl_temperature_scaling_and_ignore():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    for t in (1.0, 3.0):
        expected = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="none").sum(1).mean() * t * t
        assert torch.allclose(distillation_kl(student, teacher, None, t), expected, atol=1e-6)
    # the gradient w.r.t. student logits is T * (p_s - p_t) / n: T^2 keeps it from vanishing as T grows
    s = student.clone().requires_grad_(True)
    distillation_kl(s, teacher, None, 4.0).backward()
    manual = 4.0 * (torch.softmax(student / 4, 1) - torch.softmax(teacher / 4, 1)) / (2 * 8 * 8)
    assert torch.allclose(s.grad, manual, atol=1e-6)
    target = torch.randint(0, 5, (2, 8, 8))
    target[:, :3] = IGNORE
    changed = student.clone()
    changed[:, :, :3] = 100 * torch.randn_like(changed[:, :, :3])
    assert torch.allclose(distillation_kl(student, teacher, target, 2.0), distillation_kl(changed, teacher, target, 2.0))
    assert float(distillation_kl(student, teacher, torch.full_like(target, IGNORE), 2.0)) == 0.0


def test_student_sections_take_distil_overrides():
    params = {"model": {"name": "unet_efficientnet_lite0"}, "train": {"epochs": 50, "lr": 0.01, "init_from": "x"},
              "distil": {"student": "segformer_b0", "student_kwargs": {"decoder_segmentation_channels": 64},
                         "train": {"epochs": 3}}}
    model, train = student_sections(params)
    assert model == {"name": "segformer_b0", "kwargs": {"decoder_segmentation_channels": 64}}
    assert train == {"epochs": 3, "lr": 0.01, "init_from": None, "init_from_teacher": False}
    assert student_sections(params, "pspnet_resnet18")[0] == {"name": "pspnet_resnet18", "kwargs": {}}
    assert student_sections(params, seed=7)[1]["seed"] == 7  # --seed, unless distil.train sets one
    assert student_sections({**params, "distil": {"train": {"seed": 1}}}, seed=7)[1]["seed"] == 1
    cfg = student_config(params)
    assert cfg.model == "segformer_b0" and cfg.epochs == 3 and cfg.lr == 0.01 and cfg.init_from is None
    with pytest.raises(AerialsegError, match="unknown train key"):
        student_config({**params, "distil": {"train": {"epocs": 3}}})
    with pytest.raises(AerialsegError, match="unknown model"):
        student_sections(params, "resnet9000")
    with pytest.raises(AerialsegError, match="unknown distil key.*temprature"):
        student_config({**params, "distil": {"temprature": 2.0}})


def test_short_distillation_raises_agreement_with_teacher(tmp_path):
    datasets = small_datasets()
    teacher_params = {"model": {"name": "pspnet_resnet18"}, "train": {"epochs": 3, "batch_size": 4, "lr": 3e-3}}
    train_stage.run(teacher_params, out_dir=tmp_path / "teacher", datasets=datasets)
    torch.manual_seed(42)  # the student's initial weights, as the run will build them
    before = agreement(create_model("segformer_b0"), tmp_path / "teacher", datasets[1], "segformer_b0")
    params = {"train": {"epochs": 3, "batch_size": 4, "lr": 3e-3},
              "distil": {"student": "segformer_b0", "alpha": 2.0, "temperature": 2.0}}
    with pytest.raises(AerialsegError, match="teacher"):
        distil_stage.run(params, tmp_path / "student", teacher_dir=tmp_path / "nowhere", datasets=datasets)
    summary = distil_stage.run(params, tmp_path / "student", teacher_dir=tmp_path / "teacher", datasets=datasets)
    record = json.loads((tmp_path / "student" / "distil.json").read_text())
    assert summary["teacher"] == record["teacher"] == "pspnet_resnet18" and record["student"] == "segformer_b0"
    assert json.loads((tmp_path / "student" / "model.json").read_text())["teacher"] == "pspnet_resnet18"
    assert record["val_agreement_with_teacher"] > before + 0.1, (before, record)


def test_student_starts_from_the_teachers_shared_encoder(tmp_path):
    """distil.init_from_teacher: the slim student's encoder stages (its first 198 tensors, named and shaped as the
    teacher's) start as the trained teacher's; its own decoder keeps its init; the run records where it started."""
    torch.manual_seed(0)
    teacher = create_model("unet_efficientnet_lite0", pretrained_encoder=False)
    with torch.no_grad():
        for tensor in teacher.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))  # a "trained" teacher: no tensor equals any init
    save_model(teacher, tmp_path / "teacher", "unet_efficientnet_lite0", kwargs={"pretrained_encoder": False})
    student = create_model("unet_efficientnet_lite0_slim", pretrained_encoder=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loaded = copy_teacher_weights(student, load_teacher(tmp_path / "teacher", torch.device("cpu")), tmp_path / "teacher")
    after, source = student.state_dict(), teacher.state_dict()
    encoder = [k for k in after if k.startswith("encoder.")]
    assert len(encoder) == 198 and all(torch.equal(after[k], source[k]) for k in encoder)
    assert all(not torch.equal(after[k], before[k]) for k in encoder if after[k].is_floating_point())
    assert f"198 of {len(after)} tensors" in loaded
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("encoder."))  # head: same shape

    params = {"train": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
              "distil": {"student": "unet_efficientnet_lite0_slim", "student_kwargs": {"pretrained_encoder": False},
                         "init_from_teacher": True}}
    distil_stage.run(params, tmp_path / "student", teacher_dir=tmp_path / "teacher", datasets=small_datasets())
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    assert str(tmp_path / "teacher") in meta["init_from"] and "tensors" in meta["init_from"]
    assert load_model(tmp_path / "student")[1]["name"] == "unet_efficientnet_lite0_slim"


def test_init_from_teacher_refuses_what_it_cannot_do(tmp_path):
    teacher = create_model("pspnet_resnet18")
    save_model(teacher, tmp_path / "teacher", "pspnet_resnet18")
    frozen = load_teacher(tmp_path / "teacher", torch.device("cpu"))
    with pytest.raises(AerialsegError, match="shares no encoder tensor.*init_from_teacher: false"):
        copy_teacher_weights(create_model("segformer_b0"), frozen, tmp_path / "teacher")
    with pytest.raises(AerialsegError, match="no teacher"):
        copy_teacher_weights(create_model("segformer_b0"), None, None)
    with pytest.raises(AerialsegError, match="keep one"):
        TrainConfig(init_from="models/pretrained", init_from_teacher=True).check()
