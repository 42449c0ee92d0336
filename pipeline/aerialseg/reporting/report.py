"""The report stage: reports/report.md with PNG figures from the evaluation, training and comparison outputs.

Required: the evaluation.json of ``aerialseg evaluate``. Optional (a section says "not run" without them):
confusion.json, models/<run>/history.csv, reports/samples.npz, data/split/class_shares.json,
reports/models.json (``aerialseg profile-models``) and reports/seeds/compare.json (``aerialseg run-seeds``).
"""

import csv
import glob
import json
import math
import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from aerialseg.evaluation import metrics as metrics_module  # noqa: E402
from aerialseg.reporting import profile as profile_module  # noqa: E402
from aerialseg.evaluation import stats as stats_module  # noqa: E402
from aerialseg.core.classes import CLASS_NAMES, COLORS, IGNORE, IGNORE_COLOR, colorize  # noqa: E402
from aerialseg.core.errors import AerialsegError  # noqa: E402
from aerialseg.core.fileio import atomic_path, write_text  # noqa: E402

NOT_RUN = "_not run_"
FIGURES = ("per_class_iou.png", "confusion.png", "class_shares.png", "training_curves.png", "samples.png",
           "seeds.png")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_mIoU", "lr", "seconds")
ERROR_COLOR = (255, 0, 255)


def _rgb(color: Sequence[int]) -> tuple[float, ...]:
    return tuple(c / 255 for c in color)


def save_figure(fig: Figure, dest: Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return dest


def _fmt(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _count(n: float) -> str:
    """Compact pixel count: 950, 12.3k, 4.56M, 1.2G."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "---|" * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + align]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --- inputs --------------------------------------------------------------------------------------

def load_metrics(path: Path) -> dict[str, Any]:
    """The evaluate stage's metrics.json (required)."""
    if not path.is_file():
        raise AerialsegError("metrics not found", path, "run the evaluate stage first (`aerialseg evaluate` "
                             "or `dvc repro evaluate`) or set report.metrics")
    data = stats_module.read_json(path)
    if "mIoU" not in data or "iou" not in data:
        raise AerialsegError("not a metrics file (no mIoU / iou keys)", path, "re-run `aerialseg evaluate`")
    return data


def load_confusion(metrics: dict[str, Any], path: Path | None) -> np.ndarray | None:
    """The confusion matrix from metrics.json, else from confusion.json ({"matrix"|"confusion_matrix"} or a list)."""
    raw: Any = metrics.get("confusion_matrix")
    if raw is None and path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        raw = data.get("confusion_matrix", data.get("matrix")) if isinstance(data, dict) else data
    if raw is None:
        return None
    matrix = np.asarray(raw, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise AerialsegError(f"confusion matrix must be square, got shape {matrix.shape}", path)
    return matrix


def _class_name(key: str) -> str:
    return CLASS_NAMES[int(key)] if key.isdigit() and int(key) < len(CLASS_NAMES) else key


def load_class_shares(path: Path) -> dict[str, dict[str, float]] | None:
    """{split: {class: share}} from class_shares.json, normalised to 1.

    Accepts {split: {class: value}}, {"splits"|"shares": {split: ...}} and per split {"shares": {...}};
    values may be shares, percentages or pixel counts; class ids ("0".."4") become names.
    """
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data = data.get("splits", data.get("shares", data)) if isinstance(data, dict) else {}
    shares = {}
    for split, values in data.items():
        if isinstance(values, dict):
            values = values.get("shares", values.get("class_shares", values))
        if not isinstance(values, dict):
            continue
        numbers = {_class_name(str(k)): float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        total = sum(numbers.values())
        if total > 0:
            shares[str(split)] = {k: v / total for k, v in numbers.items()}
    return shares or None


def _history_paths(pattern: str | Sequence[str]) -> list[Path]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return sorted({Path(p) for pat in patterns for p in glob.glob(str(pat)) if Path(p).is_file()})


def load_history(path: Path) -> dict[str, np.ndarray]:
    """Columns of a history.csv as float arrays (empty cells -> NaN; unknown columns kept)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "epoch" not in rows[0]:
        raise AerialsegError("history has no rows or no 'epoch' column", path,
                             f"expected columns {', '.join(HISTORY_COLUMNS)}")

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {col: np.array([number(r.get(col)) for r in rows]) for col in rows[0]}


def load_samples(path: Path, limit: int) -> dict[str, np.ndarray] | None:
    """image (N,H,W,3) uint8, truth and pred (N,H,W) uint8 from samples.npz (``images`` also read as
    ``image``), at most ``limit`` of them."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        names = {"image": "images" if "images" in data else "image", "truth": "truth", "pred": "pred"}
        missing = [k for k, name in names.items() if name not in data]
        if missing:
            raise AerialsegError(f"samples file lacks array(s) {', '.join(missing)}", path,
                                 "re-run `aerialseg evaluate`")
        samples = {k: data[name][:limit] for k, name in names.items()}
    image, truth, pred = samples["image"], samples["truth"], samples["pred"]
    if image.ndim != 4 or image.shape[-1] != 3 or truth.shape != image.shape[:3] or pred.shape != truth.shape:
        raise AerialsegError(f"sample shapes do not fit: image {image.shape}, truth {truth.shape}, "
                             f"pred {pred.shape}", path, "expected image N,H,W,3 and truth/pred N,H,W")
    return samples


# --- figures -------------------------------------------------------------------------------------

def plot_per_class(metrics: dict[str, Any], dest: Path) -> Path:
    """Per-class IoU bars in class colours (F1 and BF1 as markers when present), mIoU as a line."""
    names = list(metrics["iou"])
    iou = [metrics["iou"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(names))
    colors = [_rgb(COLORS[i % len(COLORS)]) for i in range(len(names))]
    bars = ax.bar(xs, [v or 0 for v in iou], width=0.6, color=colors, edgecolor="black", linewidth=0.8, label="IoU")
    for bar, value in zip(bars, iou):
        label = "absent" if value is None else f"{value:.3f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    for key, marker, label in (("f1", "D", "F1"), ("bf1_per_class", "^", "boundary F1")):
        values = metrics.get(key) or {}
        ys = [values.get(n) for n in names]
        if any(y is not None for y in ys):
            ax.scatter(xs + 0.38, [np.nan if y is None else y for y in ys], marker=marker, color="black", zorder=3,
                       s=28, label=label)
    if metrics.get("mIoU") is not None:
        ax.axhline(metrics["mIoU"], color="tab:blue", linestyle="--", linewidth=1,
                   label=f"mIoU = {metrics['mIoU']:.3f}")
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_title("Per-class IoU on the evaluated split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return save_figure(fig, dest)


def plot_confusion(matrix: np.ndarray, dest: Path, names: Sequence[str] = CLASS_NAMES) -> Path:
    """Row-normalised confusion matrix (share of each true class), every cell with its share and count."""
    k = matrix.shape[0]
    names = list(names[:k]) + [str(i) for i in range(len(names), k)]
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.3 * k + 2, 1.1 * k + 1.5))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            color = "white" if share[i, j] > 0.55 else "black"
            ax.text(j, i, f"{100 * share[i, j]:.1f}%\n{_count(matrix[i, j])}", ha="center", va="center",
                    fontsize=8, color=color)
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), [f"{n}\n({_count(r)} px)" for n, r in zip(names, rows[:, 0])])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (pixels)")
    ax.set_title("Confusion matrix (rows sum to 100 %; counts in pixels)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return save_figure(fig, dest)


def plot_class_shares(shares: dict[str, dict[str, float]], dest: Path) -> Path:
    """Stacked horizontal bars: class shares of each split."""
    splits = list(shares)
    classes = list(dict.fromkeys(c for s in splits for c in shares[s]))
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(splits) + 1.6))
    left = np.zeros(len(splits))
    for c in classes:
        values = np.array([shares[s].get(c, 0.0) for s in splits])
        idx = CLASS_NAMES.index(c) if c in CLASS_NAMES else None
        color = _rgb(COLORS[idx]) if idx is not None else "white"
        ax.barh(splits, values, left=left, color=color, edgecolor="black", linewidth=0.5, label=c)
        for y, (x0, v) in enumerate(zip(left, values)):
            if v >= 0.06:
                ax.text(x0 + v / 2, y, f"{100 * v:.0f}%", ha="center", va="center", fontsize=8)
        left += values
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of labelled pixels")
    ax.set_ylabel("split")
    ax.invert_yaxis()
    ax.set_title("Class shares per split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(classes), fontsize=8, frameon=False)
    return save_figure(fig, dest)


def plot_history(histories: dict[str, dict[str, np.ndarray]], dest: Path) -> Path:
    """Loss (train solid, val dashed), validation mIoU and learning rate against epoch, one colour per run."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, h) in enumerate(histories.items()):
        color, epoch = colors[i % len(colors)], h["epoch"]
        if "train_loss" in h:
            axes[0].plot(epoch, h["train_loss"], color=color, label=f"{run} train")
        if "val_loss" in h:
            axes[0].plot(epoch, h["val_loss"], color=color, linestyle="--", label=f"{run} val")
        if "val_mIoU" in h and np.isfinite(h["val_mIoU"]).any():
            best = int(np.nanargmax(h["val_mIoU"]))
            axes[1].plot(epoch, h["val_mIoU"], color=color, marker="o", markersize=3,
                         label=f"{run} (best {h['val_mIoU'][best]:.3f} @ {epoch[best]:g})")
            axes[1].plot(epoch[best], h["val_mIoU"][best], marker="*", markersize=11, color=color)
        if "lr" in h and (h["lr"] > 0).any():
            axes[2].plot(epoch, h["lr"], color=color, label=run)
    titles = ("Loss", "Validation mIoU", "Learning rate")
    ylabels = ("loss", "mIoU", "learning rate")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if axes[2].lines:
        axes[2].set_yscale("log")
    fig.tight_layout()
    return save_figure(fig, dest)


def _overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
    blended[mask == IGNORE] = IGNORE_COLOR
    return blended.astype(np.uint8)


def _errors(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    grey = image.mean(-1, keepdims=True).repeat(3, -1) * 0.6
    grey[(pred != truth) & (truth != IGNORE)] = ERROR_COLOR
    grey[truth == IGNORE] = IGNORE_COLOR
    return grey.astype(np.uint8)


def plot_samples(samples: dict[str, np.ndarray], dest: Path) -> Path:
    """Rows of image | truth | prediction (class colours over the image) | errors, with a legend."""
    n = len(samples["image"])
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n + 0.8), squeeze=False)
    titles = ("image", "truth", "prediction", "errors (magenta)")
    for i in range(n):
        image, truth, pred = samples["image"][i], samples["truth"][i], samples["pred"][i]
        valid = truth != IGNORE
        accuracy = float((pred[valid] == truth[valid]).mean()) if valid.any() else math.nan
        panels = (image, _overlay(image, truth), _overlay(image, pred), _errors(image, truth, pred))
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(titles[j])
        axes[i, 0].set_ylabel(f"sample {i}\npixel acc {accuracy:.2f}" if not math.isnan(accuracy) else f"sample {i}")
    handles = [Patch(facecolor=_rgb(c), edgecolor="black", label=name) for name, c in zip(CLASS_NAMES, COLORS)]
    handles += [Patch(facecolor=_rgb(IGNORE_COLOR), label="ignore"),
                Patch(facecolor=_rgb(ERROR_COLOR), label="wrong pixel")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle("Sample predictions (class colours blended over the image)")
    fig.tight_layout(rect=(0, 0.7 / (3 * n + 0.8), 1, 0.97), h_pad=0.6)
    return save_figure(fig, dest)


# --- sections ------------------------------------------------------------------------------------

def _metrics_section(metrics: dict[str, Any], figure: str) -> str:
    bf1 = metrics.get("bf1")
    tolerance = metrics.get("bf1_tolerance_px")
    summary = [("mIoU (macro)", _fmt(metrics.get("mIoU"))),
               ("pixel accuracy (micro)", _fmt(metrics.get("pixel_accuracy"))),
               ("mF1 (macro Dice)", _fmt(metrics.get("mF1"))), ("mPrecision", _fmt(metrics.get("mPrecision"))),
               ("mRecall", _fmt(metrics.get("mRecall"))), ("fwIoU", _fmt(metrics.get("fwIoU"))),
               (f"boundary F1 (tolerance {tolerance} px)" if tolerance is not None else "boundary F1",
                _fmt(bf1) if bf1 is not None else "not computed"),
               ("labelled pixels", f"{metrics.get('pixels', 0):,}")]
    names = list(metrics["iou"])
    per_class = [(n, _fmt(metrics["iou"].get(n)), _fmt((metrics.get("f1") or {}).get(n)),
                  _fmt((metrics.get("precision") or {}).get(n)), _fmt((metrics.get("recall") or {}).get(n)),
                  _fmt((metrics.get("bf1_per_class") or {}).get(n)),
                  f"{(metrics.get('support_px') or {}).get(n, 0):,}") for n in names]
    where = ", ".join(f"{k}: `{metrics[k]}`" for k in ("model", "model_dir", "split", "seed", "patches")
                      if metrics.get(k) is not None)
    return "\n\n".join([
        "## Evaluation metrics" + (f"\n\n{where}" if where else ""),
        _table(("metric", "value"), summary, "---|---:|"),
        _table(("class", "IoU", "F1", "precision", "recall", "boundary F1", "support (px)"), per_class,
               "---|---:|---:|---:|---:|---:|---:|"),
        f"![per-class IoU]({figure})", *_per_scene(metrics)])


def _per_scene(metrics: dict[str, Any]) -> list[str]:
    """The per-scene table when evaluate wrote one ({scene: {mIoU, pixel_accuracy, mF1, bf1, pixels}})."""
    scenes = metrics.get("per_scene")
    if not isinstance(scenes, dict) or not scenes:
        return []
    rows = [(scene, _fmt(m.get("mIoU")), _fmt(m.get("pixel_accuracy")), _fmt(m.get("mF1")), _fmt(m.get("bf1")),
             f"{m.get('pixels', 0):,}") for scene, m in scenes.items() if isinstance(m, dict)]
    return ["### Per scene", _table(("scene", "mIoU", "pixel accuracy", "mF1", "boundary F1", "pixels"), rows,
                                    "---|---:|---:|---:|---:|---:|")]


def _confusion_section(matrix: np.ndarray | None, figure: str | None) -> str:
    if matrix is None or figure is None:
        return f"## Confusion matrix\n\n{NOT_RUN}: no confusion matrix in metrics.json or confusion.json."
    return ("## Confusion matrix\n\nRows are the true class, columns the prediction; each row is normalised "
            f"to 100 % of that class's labelled pixels, with the pixel count below.\n\n![confusion matrix]({figure})")


def _shares_section(shares: dict[str, dict[str, float]] | None, figure: str | None, path: Path) -> str:
    if shares is None or figure is None:
        return f"## Class shares per split\n\n{NOT_RUN}: `{path}` not found (written by the split stage)."
    classes = list(dict.fromkeys(c for s in shares.values() for c in s))
    rows = [(split, *(f"{100 * shares[split].get(c, 0):.1f} %" for c in classes)) for split in shares]
    return "\n\n".join(["## Class shares per split", _table(("split", *classes), rows,
                        "---|" + "---:|" * len(classes)), f"![class shares]({figure})"])


def _history_section(histories: dict[str, dict[str, np.ndarray]], figure: str | None, pattern: Any) -> str:
    if not histories or figure is None:
        return f"## Training curves\n\n{NOT_RUN}: no history.csv matches `{pattern}`."
    rows = []
    for run, h in histories.items():
        miou = h.get("val_mIoU")
        best = int(np.nanargmax(miou)) if miou is not None and np.isfinite(miou).any() else None
        seconds = h.get("seconds")
        rows.append((run, int(np.nanmax(h["epoch"])) if np.isfinite(h["epoch"]).any() else "–",
                     _fmt(miou[best]) if best is not None else "–",
                     int(h["epoch"][best]) if best is not None else "–",
                     _fmt(h["train_loss"][-1]) if "train_loss" in h else "–",
                     f"{np.nansum(seconds) / 60:.1f}" if seconds is not None else "–"))
    return "\n\n".join(["## Training curves", _table(
        ("run", "epochs", "best val mIoU", "at epoch", "last train loss", "minutes"), rows,
        "---|---:|---:|---:|---:|---:|"), f"![training curves]({figure})"])


def _samples_section(samples: dict[str, np.ndarray] | None, figure: str | None, path: Path) -> str:
    if samples is None or figure is None:
        return f"## Sample predictions\n\n{NOT_RUN}: `{path}` not found (written by the evaluate stage)."
    return (f"## Sample predictions\n\n{len(samples['image'])} samples from `{path}`: image, truth and prediction "
            f"in class colours over the image, and the wrong pixels.\n\n![samples]({figure})")


def _miou_lookup(metrics: dict[str, Any], compare: dict[str, Any] | None,
                 rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Formatted mIoU per model source or name: the run's own metrics, the seed mean, or metrics.json."""
    found: dict[str, str] = {}
    for key in ("model", "model_dir"):
        if isinstance(metrics.get(key), str) and metrics.get("mIoU") is not None:
            found[metrics[key]] = _fmt(metrics["mIoU"])
    for model, row in ((compare or {}).get("models") or {}).items():
        stat = row.get((compare or {}).get("primary", "mIoU")) or {}
        if stat.get("n"):
            found[model] = f"{_fmt(stat['mean'])} ± {_fmt(stat['std'])} (n={stat['n']})"
    for row in rows:
        try:
            own = stats_module.read_json(stats_module.find_metrics(Path(row["source"])))
        except AerialsegError:
            continue
        if own.get("mIoU") is not None:
            found[row["source"]] = _fmt(own["mIoU"])
    return found


def _models_section(rows: list[dict[str, Any]] | None, miou: dict[str, str], path: Path) -> str:
    if not rows:
        return (f"## Model table\n\n{NOT_RUN}: `{path}` not found (run `aerialseg profile-models`).")
    return "## Model table\n\n" + profile_module.markdown_table(rows, miou).rstrip()


def _compare_section(compare: dict[str, Any] | None, figure: str | None, path: Path) -> str:
    if compare is None or figure is None:
        return f"## Multi-seed comparison\n\n{NOT_RUN}: `{path}` not found (run `aerialseg run-seeds`)."
    made = f", {compare['made']}" if compare.get("made") else ""
    source = (f"From `{path}` (`aerialseg run-seeds`{made}): every seed trained and scored as the pipeline's "
              "default; `dvc repro` reads this file but does not re-run it (one full training per seed).")
    return "\n\n".join(["## Multi-seed comparison", source, stats_module.markdown_table(compare).rstrip(),
                        f"![per-seed results]({figure})"])


def _bullets(text: str) -> str:
    """The bullet list of a docstring paragraph (from its first line starting with "- ")."""
    lines = text.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("- ")), 0)
    return "\n".join(lines[start:])


def _definitions(metrics: dict[str, Any], compare: dict[str, Any] | None) -> str:
    tolerance = metrics.get("bf1_tolerance_px")
    bf1_line = (f"Boundary F1 here used a tolerance of {tolerance} px." if tolerance is not None
                else "Boundary F1 was not computed by the evaluate stage.")
    parts = ["## Metric definitions", "### Segmentation metrics",
             _bullets((metrics_module.__doc__ or "").split("\n\n", 1)[-1]), bf1_line,
             "### Model table", _bullets((profile_module.__doc__ or "").split("\n\n", 1)[-1])]
    if compare is not None:
        parts += ["### Multi-seed statistics", _bullets(str(compare.get("method", "")))]
    return "\n\n".join(parts)


# --- the stage -----------------------------------------------------------------------------------

def _compression_section(path: Path) -> str:
    """The pruning x int8 table written by `aerialseg compression-table`, embedded as it is."""
    if not path.is_file():
        return f"## Compression (pruning x int8)\n\n{NOT_RUN}: `{path}` not found (run `aerialseg compression-table`)."
    body = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("# ")]
    return "## Compression (pruning x int8)\n\n" + "\n".join(body).strip()


def _optional_json(path: Path) -> dict[str, Any] | None:
    return stats_module.read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class ReportInputs:
    """Where the report reads from and writes to (the report stage fills it from params ``report``)."""

    out: Path
    figures: Path
    metrics: Path
    confusion: Path
    class_shares: Path
    samples: Path
    models: Path
    compare: Path
    compression: Path
    history: Any = "models/*/history.csv"  # glob or list of globs
    max_runs: int = 8
    max_samples: int = 6
    provenance: str = ""  # e.g. which commit made the inputs


def write_report(inp: ReportInputs) -> Path:
    """Write the report markdown and its figures; returns the report's path."""
    out, figures = inp.out, inp.figures
    metrics = load_metrics(inp.metrics)
    made: dict[str, str] = {}

    def figure(name: str, plot: Any, *args: Any) -> str:
        plot(*args, figures / name)
        made[name] = Path(os.path.relpath(figures / name, out.parent)).as_posix()
        return made[name]

    figure("per_class_iou.png", plot_per_class, metrics)
    matrix = load_confusion(metrics, inp.confusion)
    if matrix is not None:
        figure("confusion.png", plot_confusion, matrix)
    shares = load_class_shares(inp.class_shares)
    if shares:
        figure("class_shares.png", plot_class_shares, shares)
    histories = {_run_name(p): load_history(p) for p in _history_paths(inp.history)[: inp.max_runs]}
    if histories:
        figure("training_curves.png", plot_history, histories)
    samples = load_samples(inp.samples, inp.max_samples)
    if samples is not None and len(samples["image"]):
        figure("samples.png", plot_samples, samples)
    compare = _optional_json(inp.compare)
    if compare is not None:
        figure("seeds.png", lambda c, dest: stats_module.plot_comparison(c, dest), compare)
    rows = profile_module.read_model_table(inp.models) if inp.models.is_file() else None
    for name in FIGURES:  # figures of sections that did not run this time would be stale
        if name not in made:
            (figures / name).unlink(missing_ok=True)

    sections = [
        "# aerialseg report",
        f"Metrics from `{inp.metrics}`{f' ({inp.provenance})' if inp.provenance else ''}. "
        "Sections whose input is missing say \"not run\".",
        _metrics_section(metrics, made["per_class_iou.png"]),
        _confusion_section(matrix, made.get("confusion.png")),
        _shares_section(shares, made.get("class_shares.png"), inp.class_shares),
        _history_section(histories, made.get("training_curves.png"), inp.history),
        _samples_section(samples, made.get("samples.png"), inp.samples),
        _models_section(rows, _miou_lookup(metrics, compare, rows or []), inp.models),
        _compare_section(compare, made.get("seeds.png"), inp.compare),
        _compression_section(inp.compression),
        _definitions(metrics, compare),
    ]
    return write_text(out, "\n\n".join(sections) + "\n")


def _run_name(history: Path) -> str:
    """A run's name: its directory relative to models/ when below it, else the directory name."""
    parts = history.parent.parts
    return "/".join(parts[parts.index("models") + 1:]) if "models" in parts[:-1] else history.parent.name
