"""Copy the repository's pipeline (dvc.yaml as dvc.template.yaml, params.yaml, profiles/*.yaml) into the package's
templates, which
`aerialseg init` gives every survey project; tests/stages/test_init.py fails while they differ.

Usage: python tools/sync_templates.py   (tools/code_deps.py --write runs it too)
"""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "pipeline" / "aerialseg" / "templates"
# repository file -> template file (the pipeline is not named dvc.yaml there, or DVC would run it as a second one)
FILES = {"dvc.yaml": "dvc.template.yaml", "params.yaml": "params.yaml",
         **{p.relative_to(REPO).as_posix(): p.relative_to(REPO).as_posix() for p in (REPO / "profiles").glob("*.yaml")}}


def sync() -> list[str]:
    """Copy each file; returns the ones that changed."""
    changed = []
    for name, template in sorted(FILES.items()):
        source, dest = REPO / name, TEMPLATES / template
        if not dest.is_file() or dest.read_bytes() != source.read_bytes():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            changed.append(name)
    return changed


if __name__ == "__main__":
    print("\n".join(f"templates/{name} updated" for name in sync()) or "templates up to date")
