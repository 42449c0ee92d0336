"""The report stage: reports/report.md with PNG figures from the evaluation, training and comparison outputs.

Required: the evaluation.json of ``aerialseg evaluate``; its ``data_fingerprint`` is this run's data. Optional,
each shown only when made from that data (else its section says "not run for this data"; the sections'
Markdown and the check are in ``aerialseg.reporting.sections``): confusion.json, models/<run>/history.csv
(with the run's model.json), reports/samples.npz, data/split/class_shares.json, reports/models.json
(``aerialseg profile-models``), reports/seeds/compare.json (``aerialseg run-seeds``) and the compression
table (its .json beside the .md).
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

from aerialseg.reporting import profile as profile_module  # noqa: E402
from aerialseg.reporting import sections  # noqa: E402
from aerialseg.reporting.sections import count, data_check  # noqa: E402
from aerialseg.evaluation import stats as stats_module  # noqa: E402
from aerialseg.core.classes import CLASS_NAMES, COLORS, IGNORE, IGNORE_COLOR, colorize  # noqa: E402
from aerialseg.core.errors import AerialsegError  # noqa: E402
from aerialseg.core.fileio import atomic_path, write_text  # noqa: E402

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
    left_out = metrics.get("not_labelled") or []
    for bar, name, value in zip(bars, names, iou):
        label = "not labelled" if name in left_out else "absent" if value is None else f"{value:.3f}"
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
                   label=f"mIoU = {metrics['mIoU']:.3f}" + (" (labelled classes)" if left_out else ""))
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
            ax.text(j, i, f"{100 * share[i, j]:.1f}%\n{count(matrix[i, j])}", ha="center", va="center",
                    fontsize=8, color=color)
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), [f"{n}\n({count(r)} px)" for n, r in zip(names, rows[:, 0])])
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



# --- the stage -----------------------------------------------------------------------------------

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
    loso: Path = Path("reports/loso/loso.md")  # `aerialseg loso`: accuracy on a new area
    history: Any = "models/*/history.csv"  # glob or list of globs
    max_runs: int = 8
    max_samples: int = 6
    provenance: str = ""  # e.g. which commit made the inputs


class _Figures:
    """The report's PNGs: each one drawn is linked relative to the report; the others are removed as stale."""

    def __init__(self, inp: ReportInputs):
        self.inp, self.links = inp, {}

    def add(self, name: str, plot: Any, *args: Any) -> None:
        plot(*args, self.inp.figures / name)
        self.links[name] = Path(os.path.relpath(self.inp.figures / name, self.inp.out.parent)).as_posix()

    def remove_stale(self) -> None:
        for name in FIGURES:
            if name not in self.links:
                (self.inp.figures / name).unlink(missing_ok=True)


def _checked_json(path: Path, reference: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON, None) when it was made from the ``reference`` data, else (None, why not)."""
    record = _optional_json(path)
    why = data_check(record, reference, path)
    return (record if why is None else None), why


def _confusion(metrics: dict[str, Any], path: Path, reference: str | None) -> tuple[np.ndarray | None, str | None]:
    """The confusion matrix of metrics.json, else of confusion.json when made from this data; why not."""
    if metrics.get("confusion_matrix") is not None:
        return load_confusion(metrics, None), None
    record, why = _checked_json(path, reference)
    return (load_confusion(metrics, path) if record is not None else None), why


def _samples(path: Path, limit: int, reference: str | None) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """samples.npz when the evaluate run that wrote it scored this data (its ``data_fingerprint``); why not."""
    record = None
    if path.is_file():
        with np.load(path) as data:
            record = {"data_fingerprint": str(data["data_fingerprint"]) if "data_fingerprint" in data else None}
    why = data_check(record, reference, path)
    return (load_samples(path, limit) if why is None else None), why


def _histories(inp: ReportInputs, reference: str | None) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """History of each run whose model.json was trained on this data, and the names of the runs left out."""
    kept, other = {}, []
    for path in _history_paths(inp.history)[: inp.max_runs]:
        record = _optional_json(path.parent / "model.json") or {}
        if reference is not None and record.get("training_data_sha256") == reference:
            kept[_run_name(path)] = load_history(path)
        else:
            other.append(_run_name(path))
    return kept, other


def write_report(inp: ReportInputs) -> Path:
    """Write the report markdown and its figures, every figure from this run's data; returns the report's path."""
    metrics = load_metrics(inp.metrics)
    ref = metrics.get("data_fingerprint")
    figures = _Figures(inp)
    figures.add("per_class_iou.png", plot_per_class, metrics)
    matrix, matrix_why = _confusion(metrics, inp.confusion, ref)
    if matrix is not None:
        figures.add("confusion.png", plot_confusion, matrix)
    shares_record, shares_why = _checked_json(inp.class_shares, ref)
    shares = load_class_shares(inp.class_shares) if shares_record is not None else None
    if shares:
        figures.add("class_shares.png", plot_class_shares, shares)
    histories, other_runs = _histories(inp, ref)
    if histories:
        figures.add("training_curves.png", plot_history, histories)
    samples, samples_why = _samples(inp.samples, inp.max_samples, ref)
    if samples is not None and len(samples["image"]):
        figures.add("samples.png", plot_samples, samples)
    compare, compare_why = _checked_json(inp.compare, ref)
    if compare is not None:
        figures.add("seeds.png", lambda c, dest: stats_module.plot_comparison(c, dest), compare)
    rows = profile_module.read_model_table(inp.models) if inp.models.is_file() else None
    figures.remove_stale()
    links = figures.links
    parts = [
        "# aerialseg report", _intro(inp, ref),
        sections.metrics_section(metrics, links["per_class_iou.png"]),
        sections.confusion_section(matrix, links.get("confusion.png"), matrix_why),
        sections.shares_section(shares, links.get("class_shares.png"), shares_why,
                                (shares_record or {}).get("not_labelled") or ()),
        sections.history_section(histories, links.get("training_curves.png"), inp.history, other_runs),
        sections.samples_section(samples, links.get("samples.png"), inp.samples, samples_why),
        sections.models_section(rows, sections.miou_lookup(metrics, compare, rows or []), inp.models),
        sections.compare_section(compare, links.get("seeds.png"), inp.compare, compare_why),
        sections.loso_section(inp.loso, ref),
        sections.compression_section(inp.compression, ref),
        sections.definitions(metrics, compare),
    ]
    return write_text(inp.out, "\n\n".join(parts) + "\n")


def _intro(inp: ReportInputs, reference: str | None) -> str:
    data = (f"data fingerprint `{reference[:12]}` (tiles manifest + split.json)" if reference
            else "no data fingerprint (evaluation.json predates fingerprints: re-run `aerialseg evaluate`)")
    return (f"Metrics from `{inp.metrics}`{f' ({inp.provenance})' if inp.provenance else ''}; this run's data: "
            f"{data}. Every figure comes from this run's outputs on this data; a section whose input is missing "
            "or was made from other data says \"not run for this data\".")


def _run_name(history: Path) -> str:
    """A run's name: its directory relative to models/ when below it, else the directory name."""
    parts = history.parent.parts
    return "/".join(parts[parts.index("models") + 1:]) if "models" in parts[:-1] else history.parent.name
