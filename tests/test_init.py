"""`aerialseg init`: a survey project of its own, with the repository's pipeline and the user's paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.core.yamledit import set_keys
from aerialseg.stages.init import PACKAGE_ROOT, TEMPLATES, render_dvc_yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from foreign_survey import make_survey  # noqa: E402


@pytest.mark.parametrize("name", ["dvc.yaml", "params.yaml", "profiles/ci.yaml", "profiles/gpu.yaml"])
def test_the_template_is_the_repositorys_own_pipeline(name):
    assert (TEMPLATES / name).read_bytes() == (REPO / name).read_bytes(), "run python tools/sync_templates.py"


def test_rendered_code_deps_are_the_installed_package_files():
    rendered = yaml.safe_load(render_dvc_yaml((TEMPLATES / "dvc.yaml").read_text(), PACKAGE_ROOT))
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
    values = json.dumps(params)
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
