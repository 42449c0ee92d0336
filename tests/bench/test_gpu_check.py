"""The GPU recipe: profiles/gpu.yaml fits the code, and bench/gpu_check.sh runs end to end (tiny, on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aerialseg.stages.distil import student_config
from aerialseg.stages.train import train_config
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_short_and_tiny_settings_leave_the_profile_files_alone():
    before = (REPO / "profiles/gpu.yaml").read_text()
    params = gpu_check.build_params([REPO / "profiles/gpu.yaml"], tiny=True, oem=None)
    assert params["train"]["loss"] == yaml.safe_load((REPO / "params.yaml").read_text())["train"]["loss"]
    assert params["train"]["epochs"] == 1 and params["distil"]["student"] == "segformer_b0"
    assert (REPO / "profiles/gpu.yaml").read_text() == before


def test_gpu_profile_is_the_thesis_recipe_and_every_key_is_known(tmp_path):
    params = gpu_check.build_params([REPO / "profiles/gpu.yaml"], tiny=False, oem=None)
    cfg = train_config(params)  # unknown train / distil keys would raise here
    assert cfg.model == "upernet_convnext_tiny" and cfg.amp and cfg.batch_size == 16
    assert params["tiles"]["size"] == 512 and params["pretrain"]["enabled"] == "auto"
    assert cfg.epochs == gpu_check.SHORT["train"]["epochs"]  # the short run's override
    student = student_config(params)
    assert student.model == "segformer_b0" and student.temperature_at(0) == 4.0
    assert student.temperature_at(student.epochs - 1) == 1.0
    full = yaml.safe_load((REPO / "profiles/gpu.yaml").read_text())
    assert full["train"]["epochs"] > cfg.epochs  # the profile itself keeps the full budget
    oem = gpu_check.build_params([REPO / "profiles/gpu.yaml"], tiny=True, oem=str(tmp_path))
    assert oem["pretrain"]["enabled"] is True and oem["pretrain"]["root"] == str(tmp_path.resolve())
    assert oem["tiles"]["size"] == 64 and oem["model"]["name"] == "upernet_convnext_tiny"


def test_ci_profile_still_applies():
    params = gpu_check.build_params([REPO / "profiles/ci.yaml"], tiny=False, oem=None)
    assert train_config(params).model == "unet_efficientnet_lite0"


def test_unknown_option_is_a_one_line_error():
    result = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --fast: unknown option — fix:")


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    """One tiny run; with the OpenEarthMap samples beside the repo it pretrains on them first."""
    work = tmp_path / "work"
    oem = SHARED_DATA / "openearthmap-samples"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "AERIALSEG_OEM_ROOT": ""}
    cmd = ["bash", str(REPO / "bench/gpu_check.sh"), "--tiny", "--keep", str(work)]
    result = subprocess.run(cmd + (["--oem", str(oem)] if oem.is_dir() else []), capture_output=True, text=True,
                            env=env, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "images/s" in out and "gpu_check: done" in out
    for name in gpu_check.FPS_MODELS:
        assert f"| {name} |" in out
    speed = json.loads((work / "speed.json").read_text())
    assert speed["train"]["images_per_s"] > 0 and all(isinstance(v["fp32"], float) and v["fp32"] > 0
                                                       for v in speed["fps"].values())
    rows = json.loads((work / "gpu_check.json").read_text())
    pretrain = json.loads((work / "models/pretrained/pretrain.json").read_text())
    teacher_summary = json.loads((work / "models/default/train_summary.json").read_text())
    if oem.is_dir():  # pretrained on OpenEarthMap, and the teacher started from it
        assert pretrain["enabled"] and rows["pretrain (OpenEarthMap)"]["model"] == "upernet_convnext_tiny"
        assert teacher_summary["init_from"] == "models/pretrained"
    else:  # no OpenEarthMap given: the stage only wrote its marker
        assert pretrain["enabled"] is False and rows["pretrain (OpenEarthMap)"] is None
        assert teacher_summary["init_from"] is None
    teacher, student = rows["teacher"], rows["student (distilled)"]
    assert teacher["model"] == "upernet_convnext_tiny" and student["model"] == "segformer_b0"
    assert 0.0 < teacher["val_mIoU"] <= 1.0 and 0.0 < student["val_mIoU"] <= 1.0
    assert json.loads((work / "models/student/distil.json").read_text())["teacher"] == "upernet_convnext_tiny"
    adapted = rows["adapted (adapt --method all)"]
    assert adapted["method"] == "all" and adapted["windows"] >= 1 and set(adapted["steps"]) == {"adabn", "tent", "self"}
