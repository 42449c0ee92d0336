"""report stage (`aerialseg report`, params ``report``): reports/report.md + figures, stamped with the commit."""

from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.paths import distil_out_dir, train_out_dir
from aerialseg.core.provenance import git_provenance
from aerialseg.reporting.report import ReportInputs, write_report


def pipeline_histories(params: dict[str, Any]) -> list[str]:
    """history.csv of the runs the report stage depends on: the train and distil outputs."""
    return [str(run / "history.csv") for run in (train_out_dir(params), distil_out_dir(params))]


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
        compare=Path(cfg.get("compare", "reports/seeds/compare.json")),
        compression=Path(cfg.get("compression", "reports/compression.md")),
        loso=Path(cfg.get("loso", "reports/loso/loso.md")),
        history=cfg.get("history") or pipeline_histories(params), max_runs=int(cfg.get("max_runs", 8)),
        max_samples=int(cfg.get("max_samples", 6)), provenance=git_provenance())


def run(params: dict[str, Any]) -> Path:
    """Write the report; returns its path."""
    return write_report(inputs(params))
