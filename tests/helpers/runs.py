"""Evaluated run directories with plausible confusion matrices, shared by the stats and report tests."""

from pathlib import Path

import numpy as np

from aerialseg.core.fileio import write_json
from aerialseg.evaluation.metrics import summarize


def make_matrix(quality: float, seed: int) -> np.ndarray:
    """A plausible 5-class confusion matrix: diagonal share ``quality``, the rest spread at random."""
    rng = np.random.default_rng(seed)
    support = rng.integers(20_000, 200_000, size=5)
    matrix = np.zeros((5, 5), np.int64)
    for c, n in enumerate(support):
        wrong = rng.dirichlet(np.ones(4)) * n * (1 - quality)
        matrix[c, [k for k in range(5) if k != c]] = wrong.astype(np.int64)
        matrix[c, c] = n - matrix[c].sum()
    return matrix


def make_run(root: Path, model: str, seed: int, quality: float, how: str = "summary") -> Path:
    """An evaluated run directory; ``how`` picks where the model name and seed are written."""
    run = root / model / f"seed{seed}" if how == "dirname" else root / f"{model}-{seed}"
    write_json(run / "metrics.json", summarize(make_matrix(quality, seed * 101 + len(model))))
    if how == "summary":
        write_json(run / "model.json", {"name": model, "classes": 5, "in_channels": 3, "kwargs": {}})
        write_json(run / "train_summary.json", {"model": model, "seed": seed, "epochs": 3,
                                                "params": {"tiles": {"seed": 42}}})
    elif how == "run.json":
        write_json(run / "run.json", {"model": model, "seed": seed})
    elif how == "dirname":
        write_json(run / "model.json", {"name": model, "classes": 5, "in_channels": 3, "kwargs": {}})
    return run
