"""report stage (`aerialseg report`, params ``report``): reports/report.md + figures, stamped with the commit."""

import subprocess
from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.reporting.report import ReportInputs, write_report


def git_provenance(cwd: Path = Path(".")) -> str:
    """'commit abc1234' (+ ', uncommitted changes') of the checkout, or '' outside git."""
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


def inputs(params: dict[str, Any]) -> ReportInputs:
    """The report's inputs and outputs from params ``report``."""
    cfg = section(params, "report")
    out = Path(cfg.get("out", "reports/report.md"))
    return ReportInputs(
        out=out, figures=Path(cfg.get("figures", out.parent / "figures")),
        metrics=Path(cfg.get("metrics", "reports/evaluation.json")),
        confusion=Path(cfg.get("confusion", "reports/confusion.json")),
        class_shares=Path(cfg.get("class_shares", "data/split/class_shares.json")),
        samples=Path(cfg.get("samples", "reports/samples.npz")),
        models=Path(cfg.get("models", "reports/models.json")),
        compare=Path(cfg.get("compare", "reports/compare.json")),
        compression=Path(cfg.get("compression", "reports/compression.md")),
        history=cfg.get("history", "models/*/history.csv"), max_runs=int(cfg.get("max_runs", 8)),
        max_samples=int(cfg.get("max_samples", 6)), provenance=git_provenance())


def run(params: dict[str, Any]) -> Path:
    """Write the report; returns its path."""
    return write_report(inputs(params))
