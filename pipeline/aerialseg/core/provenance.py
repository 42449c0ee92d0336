"""Which code made an output: the git commit of the checkout (torch-free)."""

import subprocess
from pathlib import Path


def git_provenance(cwd: Path = Path(".")) -> str:
    """'made at commit abc1234' (+ ', code with uncommitted changes') of the checkout, or '' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=cwd, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pipeline",
                                "params.yaml", "dvc.yaml"], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if commit.returncode != 0:
        return ""
    return f"made at commit {commit.stdout.strip()}" + (", code with uncommitted changes" if dirty.stdout.strip() else "")
