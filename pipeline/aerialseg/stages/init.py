"""`aerialseg init DIR --labels ... --images ...`: a git + DVC project of its own for a user's survey.

The project gets the pipeline the tool's repository runs on its sample (the same dvc.yaml and params.yaml,
shipped in ``aerialseg/templates`` and kept identical to the repository's by a test), with the user's paths
written into params.yaml (every comment kept), the package's code files as each stage's code deps, the
profiles, and .gitignore/.dvcignore. Scenes inside the project are tracked by DVC (``dvc add``), not git.
"""

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_text
from aerialseg.core.yamledit import set_keys

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the aerialseg package
SCENE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
GITIGNORE = """.venv/
__pycache__/
*.tmp
.aerialseg-tmp-*
*.bak
ci-artifacts/
reports/**/samples.npz
"""
SEEDS_README = """# Multi-seed comparison of this survey's models

`aerialseg run-seeds` (then `aerialseg compare`) writes compare.json, compare.md and compare.png here: the
model trained with several seeds, mean ± std and paired tests. The report shows them once they were made from
this survey's data (their data_fingerprint); until then its section says "not run for this data".
"""
LOSO_README = """# Accuracy on a new area: leave-one-scene-out

`aerialseg loso` writes loso.json and loso.md here: each labelled scene mapped whole by a model trained on the
other scenes (one training per scene). The report shows the table once it was made from this survey's data
(its data_fingerprint); until then its section says "not run for this data".
"""
DVCIGNORE = """__pycache__
reports/loso/folds/
*.pyc
*.aux.xml
*.bak
"""


@dataclass
class InitPlan:
    """What `aerialseg init` writes, resolved from the command line."""

    project: Path
    labels: Path
    images: Path
    scenes: list[str] = field(default_factory=list)
    copy: bool = False
    gsd_m: float | None = None


def render_dvc_yaml(template: str, package_root: Path) -> str:
    """The template dvc.yaml with its code deps (`- pipeline/...`) pointing at the installed package."""
    return template.replace("      - pipeline/aerialseg", f"      - {package_root.as_posix()}/aerialseg")


def _posix(path: Path, project: Path) -> str:
    """``path`` relative to the project when inside it, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(project.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def survey_gsd_m(images: Path) -> float | None:
    """Median ground pixel size of the georeferenced scenes in ``images`` (None when there are none)."""
    import statistics

    import rasterio

    from aerialseg.geo.scene import scene_gsd_m

    sizes = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in (".tif", ".tiff"))[:50]:
        try:
            with rasterio.open(path) as ds:
                gsd = scene_gsd_m(ds)
        except rasterio.errors.RasterioError:
            continue
        if gsd:
            sizes.append(gsd)
    return round(statistics.median(sizes), 4) if sizes else None


def _moved(path: Path, old_root: Path, new_root: Path) -> Path:
    """``path`` after the folder ``old_root`` was renamed to ``new_root``."""
    return new_root / path.relative_to(old_root) if path.is_relative_to(old_root) else path


def check_plan(plan: InitPlan) -> None:
    """Refuse what would overwrite a project, or paths that do not exist, before writing anything."""
    if not plan.labels.exists():
        raise AerialsegError("labels not found", plan.labels, "pass the folder of AnyLabeling/labelme JSON files")
    if not plan.images.is_dir():
        raise AerialsegError("images folder not found", plan.images, "pass the folder that holds the scenes")
    for name in ("dvc.yaml", "params.yaml", ".dvc"):
        if (plan.project / name).exists():
            raise AerialsegError(f"already a project ({name} exists)", plan.project / name,
                                 "run `dvc repro` there, or init into a new folder")
    tool_repo = PACKAGE_ROOT.parent
    if (tool_repo / ".git").exists() and plan.project.resolve().is_relative_to(tool_repo):
        raise AerialsegError("inside the aerialseg repository", plan.project,
                             "init the survey project outside the tool's checkout")


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AerialsegError(f"`{' '.join(cmd[:4])}` failed: {(result.stderr or result.stdout).strip()[-200:]}",
                             cwd, "check git and dvc are installed (tools/install.sh)")


def copy_inputs(plan: InitPlan) -> None:
    """``--copy``: the labels and scenes into the project (labels for git, scenes for DVC)."""
    labels_dest, images_dest = plan.project / "data" / "labels", plan.project / "data" / "scenes"
    if plan.labels.is_dir():  # the JSON only: labelme keeps the images beside it
        shutil.copytree(plan.labels, labels_dest, ignore=lambda folder, names: [
            n for n in names if not n.lower().endswith(".json") and not (Path(folder) / n).is_dir()])
    else:
        labels_dest.mkdir(parents=True)
        shutil.copy2(plan.labels, labels_dest / plan.labels.name)
    shutil.copytree(plan.images, images_dest, ignore=shutil.ignore_patterns("*.json"))
    plan.labels, plan.images = labels_dest, images_dest


def params_values(plan: InitPlan) -> dict[str, dict[str, object]]:
    """The params.yaml keys init sets for this survey."""
    images = _posix(plan.images, plan.project)
    scenes = plan.scenes or [f"*{s}" for s in SCENE_SUFFIXES]
    return {"data": {"labels": _posix(plan.labels, plan.project), "images": images, "gsd_m": plan.gsd_m},
            "survey": {"scenes_dir": images, "scenes": scenes}}


def write_project(plan: InitPlan) -> None:
    """Templates, params with the survey's paths, ignore files; then git init, dvc init, dvc add."""
    project = plan.project
    write_text(project / "dvc.yaml", render_dvc_yaml((TEMPLATES / "dvc.template.yaml").read_text(encoding="utf-8"),
                                                     PACKAGE_ROOT))
    params = set_keys((TEMPLATES / "params.yaml").read_text(encoding="utf-8"), params_values(plan))
    write_text(project / "params.yaml", params)
    shutil.copytree(TEMPLATES / "profiles", project / "profiles")
    write_text(project / ".gitignore", GITIGNORE)
    write_text(project / "reports" / "seeds" / "README.md", SEEDS_README)  # the report stage's dependencies
    write_text(project / "reports" / "loso" / "README.md", LOSO_README)
    write_text(project / ".dvcignore", DVCIGNORE)
    if not (project / ".git").exists():
        _run(["git", "init", "-q"], project)
    _run([sys.executable, "-m", "dvc", "init", "-q"], project)
    _run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], project)
    images, labels = plan.images.resolve(), plan.labels.resolve()
    if images.is_relative_to(project.resolve()) and not labels.is_relative_to(images):  # labels stay in git
        _run([sys.executable, "-m", "dvc", "add", "-q", _posix(images, project)], project)


def run(project: Path, labels: Path, images: Path, scenes: list[str] | None = None, copy: bool = False) -> InitPlan:
    """Create the survey project at ``project``; returns what was written."""
    plan = InitPlan(project=project, labels=labels, images=images, scenes=list(scenes or []), copy=copy)
    check_plan(plan)
    fresh = not project.exists()  # a new folder is built beside it and renamed into place: all or nothing
    plan.project = project.with_name(f".{project.name}.aerialseg-init-{os.getpid()}") if fresh else project
    try:
        plan.project.mkdir(parents=True, exist_ok=not fresh)
        if copy:
            copy_inputs(plan)
        plan.gsd_m = survey_gsd_m(plan.images)
        write_project(plan)
    except BaseException:
        if fresh:
            shutil.rmtree(plan.project, ignore_errors=True)
        raise
    if fresh:
        plan.project.rename(project)
        plan.labels, plan.images = (_moved(p, plan.project, project) for p in (plan.labels, plan.images))
        plan.project = project
    log.info("survey project %s: labels %s, images %s, GSD %s m", project, plan.labels, plan.images, plan.gsd_m)
    return plan
