"""`aerialseg init`: a survey project of its own, with the repository's pipeline and the user's paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.core.yamledit import set_keys
from aerialseg.stages.init import PACKAGE_ROOT, TEMPLATES, render_dvc_yaml

REPO = Path(__file__).resolve().parents[2]
from helpers.foreign_survey import make_survey


@pytest.mark.parametrize("name", ["dvc.yaml", "params.yaml", *(f"profiles/{p.name}" for p in (REPO / "profiles").glob("*.yaml"))])
def test_the_template_is_the_repositorys_own_pipeline(name):
    template = TEMPLATES / ("dvc.template.yaml" if name == "dvc.yaml" else name)
    assert template.read_bytes() == (REPO / name).read_bytes(), "run python tools/sync_templates.py"


def test_rendered_code_deps_are_the_installed_package_files():
    rendered = yaml.safe_load(render_dvc_yaml((TEMPLATES / "dvc.template.yaml").read_text(), PACKAGE_ROOT))
    deps = [d for stage in rendered["stages"].values() for d in stage.get("deps", []) if "aerialseg" in d]
    assert deps and all(Path(d).is_absolute() and Path(d).exists() for d in deps)


def test_set_keys_changes_only_the_keys_and_keeps_every_comment():
    template = (TEMPLATES / "params.yaml").read_text()
    text = set_keys(template, {"data": {"labels": "/x/labels", "gsd_m": None}})
    changed = [(a, b) for a, b in zip(template.splitlines(), text.splitlines()) if a != b]
    assert len(template.splitlines()) == len(text.splitlines()) and len(changed) == 2, changed
    assert yaml.safe_load(text)["data"] == {**yaml.safe_load(template)["data"], "labels": "/x/labels", "gsd_m": None}
    assert all("#" in b for a, b in changed if "#" in a)  # the line's comment stays


@pytest.fixture()
def survey(tmp_path: Path) -> tuple[Path, Path]:
    return make_survey(tmp_path / "src", jpegs=3, geotiffs=1)


def _aerialseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "aerialseg"), *args], capture_output=True, text=True)


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


def test_init_makes_a_git_dvc_project_with_the_users_paths(tmp_path, survey):
    labels, images = survey
    before = _git_status()
    result = CliRunner().invoke(app, ["init", str(tmp_path / "proj"), "--labels", str(labels), "--images",
                                      str(images)])
    assert result.exit_code == 0, result.output
    proj = tmp_path / "proj"
    assert (proj / ".git").is_dir() and (proj / ".dvc").is_dir() and (proj / "profiles/ci.yaml").is_file()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert params["data"]["labels"] == labels.as_posix() and params["survey"]["scenes_dir"] == images.as_posix()
    assert 0.9 < params["data"]["gsd_m"] < 1.3  # from the GeoTIFFs, not the sample's 0.5
    assert "# AnyLabeling / labelme JSON files" in (proj / "params.yaml").read_text()
    values = json.dumps([params, yaml.safe_load((proj / "dvc.yaml").read_text())])
    assert "data/sample" not in values and "dubai" not in values  # no stage or key names a sample file
    assert _git_status() == before  # the tool's checkout is untouched

    again = _aerialseg("init", str(proj), "--labels", str(labels), "--images", str(images))
    assert again.returncode == 2 and "already a project" in again.stderr


def test_init_copy_tracks_scenes_with_dvc_and_labels_with_git(tmp_path, survey):
    labels, images = survey
    result = CliRunner().invoke(app, ["init", str(tmp_path / "proj"), "--labels", str(labels), "--images",
                                      str(images), "--copy"])
    assert result.exit_code == 0, result.output
    proj = tmp_path / "proj"
    assert (proj / "data/scenes.dvc").is_file() and sorted(p.name for p in (proj / "data/labels").iterdir()) == \
        sorted(p.name for p in labels.iterdir())
    assert "/scenes" in (proj / "data/.gitignore").read_text()
    assert yaml.safe_load((proj / "params.yaml").read_text())["data"]["images"] == "data/scenes"


@pytest.mark.parametrize("missing", ["labels", "images"])
def test_missing_inputs_are_one_line_errors_and_nothing_is_written(tmp_path, survey, missing):
    labels, images = survey
    args = {"labels": labels, "images": images, missing: tmp_path / "nowhere"}
    result = _aerialseg("init", str(tmp_path / "proj"), "--labels", str(args["labels"]), "--images",
                        str(args["images"]))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "nowhere" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _in(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(list(cmd), cwd=project, env=env, capture_output=True, text=True)


def _footprint_m2(scene: Path) -> float:
    """pyproj's geodesic area (WGS 84) of a scene's footprint, its edges densified in the scene's CRS."""
    import numpy as np
    import rasterio
    from pyproj import Geod, Transformer

    with rasterio.open(scene) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    t = np.linspace(0, 1, 65)
    xs = np.concatenate([left + (right - left) * t, np.full(65, right), right - (right - left) * t, np.full(65, left)])
    ys = np.concatenate([np.full(65, top), top - (top - bottom) * t, np.full(65, bottom), bottom + (top - bottom) * t])
    lons, lats = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return abs(Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)[0])


@pytest.mark.slow
def test_a_foreign_survey_runs_every_stage_in_a_project_of_its_own(tmp_path):
    """20 labelme JPEGs and GeoTIFFs in EPSG:3857 and EPSG:4326 labelling only tree and building: init, the
    tiny profile, dvc repro; the report is about this survey only and areas are true ground m²."""
    labels, images = make_survey(tmp_path / "src")
    before = _git_status()
    proj = tmp_path / "proj"
    made = _aerialseg("init", str(proj), "--labels", str(labels), "--images", str(images), "--scenes", "*.tif")
    assert made.returncode == 0, made.stderr
    for cmd in (["aerialseg", "apply-profile", "ci"], ["git", "add", "-A"],
                ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.org", "commit", "-qm", "survey"]):
        assert _in(proj, *cmd).returncode == 0, cmd

    result = _in(proj, "dvc", "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _git_status() == before  # the tool's checkout is untouched

    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert sorted(metrics["not_labelled"]) == ["road", "water"]
    present = [v for k, v in metrics["iou"].items() if k not in ("road", "water")]
    assert metrics["mIoU"] == pytest.approx(sum(present) / len(present), abs=1e-5)
    report = (proj / "reports/report.md").read_text()
    assert "dubai" not in report.lower() and "0.5702" not in report and "not labelled" in report
    assert "int8 gate failed" in report  # the ci profile forces it; the run still ended with the report

    areas = json.loads(next((proj / "outputs").rglob("survey_areas.json")).read_text())["scenes"]
    checked = 0
    for entry in areas.values():
        scene = Path(entry["scene"])
        assert entry["area_method"].startswith("geodesic"), entry["area_method"]
        assert entry["total_m2"] == pytest.approx(_footprint_m2(scene), rel=1e-3), scene.name
        checked += 1
    assert checked == 4  # two EPSG:3857 and two EPSG:4326 scenes
