"""Multi-seed statistics: mean ± std per model over seeds, and paired tests between models.

The practice follows the DAS-Net README (several seeds per model, a paired test, an effect size):
- per model and metric: n, mean, sample std (ddof = 1), standard error, 95 % t-interval, min, max;
- between two models, on the seeds both have (pairs are matched by seed; unmatched seeds are dropped
  with a warning): paired t-test (``scipy.stats.ttest_rel``), Wilcoxon signed-rank (``scipy.stats.
  wilcoxon``) only when n >= 6 (at n = 5 its smallest possible two-sided p is 0.0625), Cohen's
  d_z = mean(Δ) / sd(Δ) (paired effect size) and Cohen's d = (mean_a - mean_b) / sqrt((s_a² + s_b²) / 2);
  Holm-adjusted p over all comparisons of the same metric.
- identical results on every seed: p = 1 (nothing to test); a constant non-zero difference has zero
  variance, so t and p are undefined (null, with a note).

A run directory holds ``metrics.json`` (``aerialseg.evaluation.metrics.summarize`` keys) and tells its model and
seed through ``run.json`` (written by ``run_seeds``), ``train_summary.json``, ``model.json`` or a
``seed<N>`` directory name.
"""

import itertools
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps
from tqdm import tqdm

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("mIoU", "pixel_accuracy", "mF1", "bf1")
WILCOXON_MIN_N = 6
FLOAT_NOISE = 1e-12  # metrics are rounded to 1e-6: smaller differences are float noise
IDENTITY_FILES = ("run.json", "train_summary.json", "model.json")
Runner = Callable[[list[str]], "subprocess.CompletedProcess[Any]"]


@dataclass(frozen=True)
class Run:
    """One evaluated run: where it is, which model and seed, and its metrics."""

    path: Path
    model: str
    seed: int
    metrics: dict[str, Any]


# --- reading runs --------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with one-line errors for missing or broken files."""
    if not path.is_file():
        raise AerialsegError("file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AerialsegError(f"not valid JSON ({exc})", path, "re-run the stage that writes it") from None
    if not isinstance(data, dict):
        raise AerialsegError("expected a JSON object", path)
    return data


def find_metrics(run_dir: Path) -> Path:
    """The run's metrics.json: the directory's own, else the shallowest one at most two levels down."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name == "metrics.json":
        return run_dir
    if not run_dir.is_dir():
        raise AerialsegError("run directory not found", run_dir, "pass directories of evaluated runs")
    if (run_dir / "metrics.json").is_file():
        return run_dir / "metrics.json"
    found = sorted(list(run_dir.glob("*/metrics.json")) or list(run_dir.glob("*/*/metrics.json")))
    if not found:
        raise AerialsegError("no metrics.json in the run directory", run_dir,
                             f"run `aerialseg evaluate --model {run_dir} --split test --out {run_dir}`")
    if len(found) > 1:
        raise AerialsegError(f"{len(found)} metrics.json files below the run directory", run_dir,
                             "pass the directory that holds the one to use")
    return found[0]


def _lookup(record: dict[str, Any], key: str) -> Any:
    """``key`` at the top level of record, else in its "train", "args" or "extra" mapping."""
    for scope in (record, record.get("train"), record.get("args"), record.get("extra")):
        if isinstance(scope, dict) and scope.get(key) is not None:
            return scope[key]
    return None


def _identity_records(run_dir: Path, metrics_path: Path, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    folders = [run_dir] if metrics_path.parent == run_dir else [run_dir, metrics_path.parent]
    records = [read_json(folder / name) for folder in folders for name in IDENTITY_FILES
               if (folder / name).is_file()]
    return records + [metrics]


def _seed_of(records: list[dict[str, Any]], run_dir: Path) -> int:
    for record in records:
        seed = _lookup(record, "seed")
        if seed is not None:
            try:
                return int(seed)
            except (TypeError, ValueError):
                raise AerialsegError(f"seed {seed!r} is not an integer", run_dir) from None
    match = re.search(r"seed[_-]?(\d+)", str(run_dir.resolve()), flags=re.IGNORECASE)
    if match:
        return int(match.group(1))
    raise AerialsegError("cannot tell the run's seed", run_dir,
                         "write it as \"seed\" in train_summary.json or name the directory seed<N>")


def _model_of(records: list[dict[str, Any]], run_dir: Path) -> str:
    for record in records:
        label = record.get("label") or record.get("model_name")
        model = record.get("model")
        name = record.get("name")
        for candidate in (label, model if isinstance(model, str) else None, name):
            if isinstance(candidate, str) and candidate and "/" not in candidate:
                return candidate
    raise AerialsegError("cannot tell the run's model", run_dir,
                         "the run needs a model.json (from `aerialseg train`) or a run.json with \"model\"")


def load_run(run_dir: str | Path) -> Run:
    """Read one evaluated run: metrics.json plus the model name and seed.

    ``LABEL=DIR`` names the group explicitly (e.g. a distilled student vs the same model trained alone).
    """
    label, _, path = str(run_dir).rpartition("=")
    if label and not Path(run_dir).exists():
        run = load_run(path)
        return Run(path=run.path, model=label, seed=run.seed, metrics=run.metrics)
    run_dir = Path(run_dir)
    metrics_path = find_metrics(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    metrics = read_json(metrics_path)
    if "mIoU" not in metrics:
        raise AerialsegError("no mIoU in metrics.json", metrics_path, "write it with `aerialseg evaluate`")
    records = _identity_records(run_dir, metrics_path, metrics)
    return Run(path=run_dir, model=_model_of(records, run_dir), seed=_seed_of(records, run_dir), metrics=metrics)


def group_runs(runs: Sequence[Run]) -> dict[str, dict[int, Run]]:
    """Runs by model, then by seed; the same (model, seed) twice is an error."""
    groups: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_seed = groups.setdefault(run.model, {})
        if run.seed in by_seed:
            raise AerialsegError(f"model '{run.model}' has two runs with seed {run.seed} "
                                 f"({by_seed[run.seed].path} and {run.path})", run.path, "pass each run once")
        by_seed[run.seed] = run
    return groups


def metric_value(metrics: dict[str, Any], key: str) -> float | None:
    """A metric by name; dotted names reach into per-class maps (``iou.road``)."""
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --- statistics ----------------------------------------------------------------------------------

def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1), sem, 95 % t-interval half-width, min, max (None where undefined)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "sem": None, "ci95": None, "min": None, "max": None}
    std = float(x.std(ddof=1)) if n > 1 else None
    sem = std / math.sqrt(n) if std is not None else None
    ci95 = float(sps.t.ppf(0.975, n - 1)) * sem if sem is not None else None
    return {"n": n, "mean": float(x.mean()), "std": std, "sem": sem, "ci95": ci95,
            "min": float(x.min()), "max": float(x.max())}


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Compare per-seed values of model a and model b on their common seeds (a - b)."""
    common = sorted(set(a) & set(b))
    notes = []
    unmatched = sorted(set(a) ^ set(b))
    if unmatched:
        notes.append(f"seeds {unmatched} are not in both models and were left out")
    xa = np.array([a[s] for s in common], dtype=np.float64)
    xb = np.array([b[s] for s in common], dtype=np.float64)
    diff = xa - xb
    n = len(common)
    result: dict[str, Any] = {
        "seeds": common, "n": n,
        "mean_a": float(xa.mean()) if n else None, "mean_b": float(xb.mean()) if n else None,
        "mean_diff": float(diff.mean()) if n else None,
        "sd_diff": float(diff.std(ddof=1)) if n > 1 else None,
        "t": None, "df": n - 1 if n > 1 else None, "p_ttest": None,
        "wilcoxon_stat": None, "p_wilcoxon": None, "cohen_dz": None, "cohen_d": None, "notes": notes,
    }
    if n < 2:
        notes.append("need at least 2 common seeds for a paired test")
        return result
    if np.all(np.abs(diff) <= FLOAT_NOISE):
        notes.append("identical on every common seed: no difference to test (p = 1)")
        result.update(t=0.0, p_ttest=1.0, cohen_dz=0.0, cohen_d=0.0)
        if n >= WILCOXON_MIN_N:
            result["p_wilcoxon"] = 1.0
        return result
    if result["sd_diff"] <= FLOAT_NOISE:
        notes.append("the difference is the same on every seed (zero variance): t and p are undefined")
    else:
        test = sps.ttest_rel(xa, xb)
        result.update(t=_finite(test.statistic), p_ttest=_finite(test.pvalue),
                      cohen_dz=result["mean_diff"] / result["sd_diff"])
    pooled = math.sqrt((xa.var(ddof=1) + xb.var(ddof=1)) / 2)
    result["cohen_d"] = result["mean_diff"] / pooled if pooled > 0 else None
    if n >= WILCOXON_MIN_N:
        wil = sps.wilcoxon(xa, xb)
        result.update(wilcoxon_stat=_finite(wil.statistic), p_wilcoxon=_finite(wil.pvalue))
    else:
        notes.append(f"Wilcoxon signed-rank not run (n = {n} < {WILCOXON_MIN_N})")
    return result


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None and does not count)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _per_seed(by_seed: dict[int, Run], metric: str) -> dict[int, float]:
    values = {seed: metric_value(run.metrics, metric) for seed, run in by_seed.items()}
    return {seed: v for seed, v in values.items() if v is not None}


def _pairs(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    if baseline is None:
        return list(itertools.combinations(models, 2))
    if baseline not in models:
        raise AerialsegError(f"baseline model '{baseline}' has no runs", fix=f"use one of: {', '.join(models)}")
    return [(m, baseline) for m in models if m != baseline]


def compare_runs(runs: Sequence[Run], metrics: Sequence[str] = DEFAULT_METRICS, primary: str = "mIoU",
                 baseline: str | None = None) -> dict[str, Any]:
    """Per-model statistics over seeds and paired tests between models (JSON-able)."""
    if not runs:
        raise AerialsegError("no runs to compare", fix="pass directories of evaluated runs")
    groups = group_runs(runs)
    metrics = list(dict.fromkeys([primary, *metrics]))
    used = [m for m in metrics if any(metric_value(r.metrics, m) is not None for r in runs)]
    if primary not in used:
        raise AerialsegError(f"no run has the metric '{primary}'", runs[0].path, "choose another --metric")
    warnings: list[str] = []
    models = sorted(groups)
    summary = {}
    for model in models:
        by_seed = groups[model]
        per_seed = {m: _per_seed(by_seed, m) for m in used}
        summary[model] = {"n": len(by_seed), "seeds": sorted(by_seed),
                          "runs": {str(s): str(r.path) for s, r in sorted(by_seed.items())},
                          "per_seed": {m: {str(s): v for s, v in sorted(vals.items())} for m, vals in per_seed.items()},
                          **{m: describe(list(vals.values())) for m, vals in per_seed.items()}}
        classes = by_seed[min(by_seed)].metrics.get("iou") or {}
        summary[model]["iou"] = {c: describe(list(_per_seed(by_seed, f"iou.{c}").values())) for c in classes}
    comparisons = []
    for metric in used:
        tests = []
        for a, b in _pairs(models, baseline):
            test = {"a": a, "b": b, "metric": metric,
                    **paired_test(_per_seed(groups[a], metric), _per_seed(groups[b], metric))}
            warnings += [f"{a} vs {b} ({metric}): {note}" for note in test["notes"] if "left out" in note]
            tests.append(test)
        for test, adjusted in zip(tests, holm([t["p_ttest"] for t in tests])):
            test["p_ttest_holm"] = adjusted
        comparisons += tests
    prints = {r.metrics.get("data_fingerprint") for r in runs}
    if len(prints) > 1:
        warnings.append("the runs were scored on different data (data_fingerprint differs): no data fingerprint")
    for message in dict.fromkeys(warnings):
        log.warning("warning: %s", message)
    return {"primary": primary, "metrics": used, "baseline": baseline, "models": summary,
            "data_fingerprint": prints.pop() if len(prints) == 1 else None,
            "comparisons": comparisons, "warnings": list(dict.fromkeys(warnings)),
            "method": __doc__.split("\n\n")[1].strip()}


# --- outputs -------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def markdown_table(result: dict[str, Any]) -> str:
    """Per-model mean ± std table and the paired-test table, as Markdown."""
    metrics = result["metrics"]
    lines = ["| model | seeds | " + " | ".join(f"{m} (mean ± std)" for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for model, row in result["models"].items():
        cells = [f"{_fmt(row[m]['mean'])} ± {_fmt(row[m]['std'])}" if row[m]["n"] else "–" for m in metrics]
        lines.append(f"| {model} | {', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    if result["comparisons"]:  # one model: nothing to compare
        lines += ["", "| a vs b | metric | n | mean Δ (a − b) | t | p (paired t) | p (Holm) | p (Wilcoxon) | d_z | d |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in result["comparisons"]:
        lines.append(f"| {t['a']} vs {t['b']} | {t['metric']} | {t['n']} | {_fmt(t['mean_diff'])} | "
                     f"{_fmt(t['t'], 3)} | {_fmt_p(t['p_ttest'])} | {_fmt_p(t['p_ttest_holm'])} | "
                     f"{_fmt_p(t['p_wilcoxon'])} | {_fmt(t['cohen_dz'], 2)} | {_fmt(t['cohen_d'], 2)} |")
    notes = [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_comparison(result: dict[str, Any], dest: Path) -> Path:
    """Per-model primary metric: mean with ±1 std error bars and every seed as a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["primary"]
    models = list(result["models"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(models) + 2), 4))
    rng = np.random.default_rng(0)
    for i, model in enumerate(models):
        row = result["models"][model]
        seeds = row["per_seed"][metric]
        xs = i + rng.uniform(-0.12, 0.12, size=len(seeds))
        ax.scatter(xs, list(seeds.values()), s=22, color="tab:gray", zorder=3,
                   label="one seed" if i == 0 else None)
        for x, (seed, y) in zip(xs, seeds.items()):
            ax.annotate(seed, (x, y), textcoords="offset points", xytext=(4, 2), fontsize=7, color="dimgray")
        stat = row[metric]
        if stat["n"]:
            ax.errorbar(i + 0.3, stat["mean"], yerr=stat["std"] or 0, fmt="o", color="tab:blue", capsize=5,
                        zorder=4, label="mean ± 1 std" if i == 0 else None)
    ax.set_xticks(range(len(models)), models, rotation=20 if len(models) > 3 else 0)
    ax.set_xlim(-0.6, len(models) - 0.2)
    ax.set_xlabel("model")
    ax.set_ylabel(f"{metric} (evaluated split)")
    ax.set_title(f"{metric} over seeds (n per model: {', '.join(str(result['models'][m]['n']) for m in models)})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return dest


def write_comparison(result: dict[str, Any], out: str | Path) -> Path:
    """compare.json, compare.md and compare.png side by side."""
    out = Path(out)
    write_json(out, result)
    write_text(out.with_suffix(".md"), f"# Multi-seed comparison ({result['primary']})\n\n" + markdown_table(result)
               + "\n![per-seed results](" + out.with_suffix(".png").name + ")\n\n" + result["method"] + "\n")
    plot_comparison(result, out.with_suffix(".png"))
    return out


# --- running seeds -------------------------------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aerialseg.cli", *args]


def _run_checked(runner: Runner, command: list[str], run_dir: Path, what: str) -> None:
    done = runner(command)
    if done.returncode != 0:
        raise AerialsegError(f"{what} failed with exit code {done.returncode}", run_dir,
                             f"see its output above; re-run: {' '.join(command[3:])}")


def _is_done(run_dir: Path, record: dict[str, Any]) -> bool:
    try:
        find_metrics(run_dir)
        return read_json(run_dir / "run.json") == record
    except AerialsegError:
        return False


def run_seeds(models: Sequence[str], seeds: Sequence[int], runs_dir: str | Path, epochs: int | None = None,
              split: str = "test", params_path: str | Path = "params.yaml", runner: Runner | None = None) -> list[Path]:
    """Train and evaluate every (model, seed) through the CLI with ``--params params_path``; returns the run
    directories ``runs_dir/<model>/seed<N>`` (``epochs`` None = the params file's train.epochs).

    A run whose metrics.json and run.json (same model, seed, epochs, split) exist is skipped, so an
    interrupted sweep resumes. ``runner`` runs one command (default: ``subprocess.run``).
    """
    runs_dir = Path(runs_dir)
    runner = runner or (lambda cmd: subprocess.run(cmd, check=False))
    if not models or not seeds:
        raise AerialsegError("no models or no seeds to run", params_path, "set stats.models and stats.seeds")
    run_dirs = []
    for model, seed in tqdm(list(itertools.product(models, seeds)), desc="seeds", unit="run"):
        run_dir = runs_dir / model / f"seed{seed}"
        record = {"model": model, "seed": int(seed), "epochs": epochs, "split": split}
        run_dirs.append(run_dir)
        if _is_done(run_dir, record):
            log.info("%s seed %s: already evaluated, skipped", model, seed)
            continue
        train = _cli("train", "--model", model, "--seed", str(seed), "--out", str(run_dir),
                     "--params", str(params_path), *(["--epochs", str(epochs)] if epochs is not None else []))
        _run_checked(runner, train, run_dir, f"training {model} seed {seed}")
        evaluate = _cli("evaluate", "--model", str(run_dir), "--split", split, "--out", str(run_dir),
                        "--params", str(params_path))
        _run_checked(runner, evaluate, run_dir, f"evaluating {model} seed {seed}")
        write_json(run_dir / "run.json", record)
    return run_dirs
