"""Multi-seed runs (`aerialseg run-seeds`, `aerialseg compare`; params ``stats``); not a DVC stage.

run-seeds trains and evaluates each (model, seed) through the CLI into ``stats.runs_dir/<model>/seed<N>``,
then compares them; compare writes mean ± std per model and paired tests (aerialseg.evaluation.stats) to
``stats.out`` (.json, .md and .png).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.provenance import git_provenance
from aerialseg.evaluation import stats


def compare(params: dict[str, Any], run_dirs: Sequence[str | Path], out: str | Path | None = None,
            primary: str | None = None, baseline: str | None = None) -> Path:
    """`aerialseg compare`: load runs, compute statistics, write JSON + Markdown + PNG."""
    cfg = section(params, "stats")
    runs = [stats.load_run(d) for d in run_dirs]
    result = stats.compare_runs(runs, metrics=cfg.get("metrics", stats.DEFAULT_METRICS),
                                primary=primary or cfg.get("primary", "mIoU"), baseline=baseline or cfg.get("baseline"))
    return stats.write_comparison({**result, "made": git_provenance()}, out or cfg.get("out", "reports/seeds/compare.json"))


def run_seeds(params: dict[str, Any], models: Sequence[str], seeds: Sequence[int], epochs: int | None = None,
              runs_dir: str | Path | None = None, params_path: str | Path = "params.yaml",
              runner: stats.Runner | None = None) -> list[Path]:
    """Train and evaluate every (model, seed) through the CLI (``stats`` params for what is not given)."""
    cfg = section(params, "stats")
    return stats.run_seeds(models, seeds, runs_dir or cfg.get("runs_dir", "models/seeds"),
                           epochs if epochs is not None else cfg.get("epochs"), str(cfg.get("split", "test")),
                           params_path, runner)


def run(params: dict[str, Any], models: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
        epochs: int | None = None, runs_dir: str | Path | None = None, out: str | Path | None = None,
        params_path: str | Path = "params.yaml") -> tuple[list[Path], Path]:
    """`aerialseg run-seeds`: every (model, seed) of ``stats.models`` x ``stats.seeds`` (or the given ones)
    trained and evaluated, then compared; returns the run directories and the comparison JSON."""
    cfg = section(params, "stats")
    run_dirs = run_seeds(params, models or cfg.get("models") or [], seeds or cfg.get("seeds") or [], epochs,
                         runs_dir, params_path)
    return run_dirs, compare(params, run_dirs, out=out)
