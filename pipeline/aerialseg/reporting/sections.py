"""The report's sections: Markdown of each part of reports/report.md, and the check that its input was made
from this run's data.

Every JSON the report reads carries the ``data_fingerprint`` of the tiles/split outputs it was made from (the
value model.json records as ``training_data_sha256``); the run's own is evaluation.json's. A section whose
input is missing, carries no fingerprint or another one says "not run for this data" and shows no figure of it.
The model table's architecture figures (parameters, FLOPs, latency) do not depend on the data; its mIoU
column only takes figures made from this data.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.core.errors import AerialsegError
from aerialseg.evaluation import metrics as metrics_module
from aerialseg.evaluation import stats as stats_module
from aerialseg.reporting import profile as profile_module

NOT_RUN = "_not run for this data_"


def data_check(record: dict[str, Any] | None, reference: str | None, path: Path | str) -> str | None:
    """None when ``record`` (a report input read from ``path``) was made from the ``reference`` data, else why
    not, as the sentence a section shows instead of its figures."""
    if record is None:
        return f"`{path}` not found"
    made = record.get("data_fingerprint")
    if reference is None:
        return (f"this run's evaluation carries no data fingerprint, so `{path}` cannot be matched to its data "
                "(re-run `aerialseg evaluate`)")
    if not made:
        return f"`{path}` carries no data fingerprint (made by an older aerialseg or from other data)"
    if made != reference:
        return f"`{path}` was made from other data (data fingerprint {made[:12]}, this run's {reference[:12]})"
    return None


def fmt(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def count(n: float) -> str:
    """Compact pixel count: 950, 12.3k, 4.56M, 1.2G."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "---|" * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + align]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --- sections ------------------------------------------------------------------------------------

def metrics_section(metrics: dict[str, Any], figure: str) -> str:
    bf1 = metrics.get("bf1")
    tolerance = metrics.get("bf1_tolerance_px")
    summary = [("mIoU (macro)", fmt(metrics.get("mIoU"))),
               ("pixel accuracy (micro)", fmt(metrics.get("pixel_accuracy"))),
               ("mF1 (macro Dice)", fmt(metrics.get("mF1"))), ("mPrecision", fmt(metrics.get("mPrecision"))),
               ("mRecall", fmt(metrics.get("mRecall"))), ("fwIoU", fmt(metrics.get("fwIoU"))),
               (f"boundary F1 (tolerance {tolerance} px)" if tolerance is not None else "boundary F1",
                fmt(bf1) if bf1 is not None else "not computed"),
               ("labelled pixels", f"{metrics.get('pixels', 0):,}")]
    names = list(metrics["iou"])
    left_out = list(metrics.get("not_labelled") or [])
    per_class = [(n, "not labelled" if n in left_out else fmt(metrics["iou"].get(n)), fmt((metrics.get("f1") or {}).get(n)),
                  fmt((metrics.get("precision") or {}).get(n)), fmt((metrics.get("recall") or {}).get(n)),
                  fmt((metrics.get("bf1_per_class") or {}).get(n)),
                  f"{(metrics.get('support_px') or {}).get(n, 0):,}") for n in names]
    where = ", ".join(f"{k}: `{metrics[k]}`" for k in ("model", "model_dir", "split", "seed", "patches")
                      if metrics.get(k) is not None)
    return "\n\n".join([
        "## Evaluation metrics" + (f"\n\n{where}" if where else ""), *not_labelled_note(metrics),
        table(("metric", "value"), summary, "---|---:|"),
        table(("class", "IoU", "F1", "precision", "recall", "boundary F1", "support (px)"), per_class,
               "---|---:|---:|---:|---:|---:|---:|"),
        f"![per-class IoU]({figure})", *per_scene(metrics)])


def not_labelled_note(metrics: dict[str, Any]) -> list[str]:
    """The sentence naming the classes the survey does not label (left out of the macro means)."""
    left_out = metrics.get("not_labelled")
    if not left_out:
        return []
    them = "it" if len(left_out) == 1 else "them"
    every = metrics.get("mIoU_all_classes")
    versus = (f"over every class present in truth or map, mIoU would be {fmt(every)}" if every != metrics.get("mIoU")
              else f"the map never predicts {them} (infer.labelled_only), so counting {them} would not lower it")
    return [f"**Not labelled: {', '.join(left_out)}** — no labelled pixels in the training data, so the model "
            f"cannot learn {them}: left out of mIoU and the other macro means ({versus})."]


def per_scene(metrics: dict[str, Any]) -> list[str]:
    """The per-scene table when evaluate wrote one ({scene: {mIoU, pixel_accuracy, mF1, bf1, pixels}})."""
    scenes = metrics.get("per_scene")
    if not isinstance(scenes, dict) or not scenes:
        return []
    rows = [(scene, fmt(m.get("mIoU")), fmt(m.get("pixel_accuracy")), fmt(m.get("mF1")), fmt(m.get("bf1")),
             f"{m.get('pixels', 0):,}") for scene, m in scenes.items() if isinstance(m, dict)]
    return ["### Per scene", table(("scene", "mIoU", "pixel accuracy", "mF1", "boundary F1", "pixels"), rows,
                                    "---|---:|---:|---:|---:|---:|")]


def confusion_section(matrix: np.ndarray | None, figure: str | None, why: str | None = None) -> str:
    if matrix is None or figure is None:
        return f"## Confusion matrix\n\n{NOT_RUN}: {why or 'no confusion matrix in metrics.json or confusion.json'}."
    return ("## Confusion matrix\n\nRows are the true class, columns the prediction; each row is normalised "
            f"to 100 % of that class's labelled pixels, with the pixel count below.\n\n![confusion matrix]({figure})")


def shares_section(shares: dict[str, dict[str, float]] | None, figure: str | None, why: str | None,
                   not_labelled: Sequence[str] = ()) -> str:
    if shares is None or figure is None:
        return f"## Class shares per split\n\n{NOT_RUN}: {why or 'no class shares'}; written by the split stage."
    classes = list(dict.fromkeys(c for s in shares.values() for c in s))
    rows = [(split, *(f"{100 * shares[split].get(c, 0):.1f} %" for c in classes)) for split in shares]
    note = [f"Not labelled (no pixel in the train split): {', '.join(not_labelled)}."] if not_labelled else []
    return "\n\n".join(["## Class shares per split", *note, table(("split", *classes), rows,
                        "---|" + "---:|" * len(classes)), f"![class shares]({figure})"])


def history_section(histories: dict[str, dict[str, np.ndarray]], figure: str | None, pattern: Any,
                    other_data: Sequence[str] = ()) -> str:
    """Curves of the runs trained on this data; ``other_data``: runs left out (model.json of other data)."""
    left = (f" Left out, trained on other data (model.json `training_data_sha256`): {', '.join(other_data)}."
            if other_data else "")
    if not histories or figure is None:
        return f"## Training curves\n\n{NOT_RUN}: no history.csv of a run trained on this data matches `{pattern}`.{left}"
    rows = []
    for run, h in histories.items():
        miou = h.get("val_mIoU")
        best = int(np.nanargmax(miou)) if miou is not None and np.isfinite(miou).any() else None
        seconds = h.get("seconds")
        rows.append((run, int(np.nanmax(h["epoch"])) if np.isfinite(h["epoch"]).any() else "–",
                     fmt(miou[best]) if best is not None else "–",
                     int(h["epoch"][best]) if best is not None else "–",
                     fmt(h["train_loss"][-1]) if "train_loss" in h else "–",
                     f"{np.nansum(seconds) / 60:.1f}" if seconds is not None else "–"))
    return "\n\n".join(["## Training curves", table(
        ("run", "epochs", "best val mIoU", "at epoch", "last train loss", "minutes"), rows,
        "---|---:|---:|---:|---:|---:|"), *([left.strip()] if left else []), f"![training curves]({figure})"])


def samples_section(samples: dict[str, np.ndarray] | None, figure: str | None, path: Path, why: str | None) -> str:
    if samples is None or figure is None:
        return f"## Sample predictions\n\n{NOT_RUN}: {why or f'`{path}` holds no samples'}; written by the evaluate stage."
    return (f"## Sample predictions\n\n{len(samples['image'])} samples from `{path}`: image, truth and prediction "
            f"in class colours over the image, and the wrong pixels.\n\n![samples]({figure})")


def miou_lookup(metrics: dict[str, Any], compare: dict[str, Any] | None,
                rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Formatted mIoU per model source or name: the run's own metrics, the seed mean (``compare``: None unless
    made from this data), or metrics.json; a row's own metrics only when made from this run's data."""
    found: dict[str, str] = {}
    for key in ("model", "model_dir"):
        if isinstance(metrics.get(key), str) and metrics.get("mIoU") is not None:
            found[metrics[key]] = fmt(metrics["mIoU"])
    for model, row in ((compare or {}).get("models") or {}).items():
        stat = row.get((compare or {}).get("primary", "mIoU")) or {}
        if stat.get("n"):
            found[model] = f"{fmt(stat['mean'])} ± {fmt(stat['std'])} (n={stat['n']})"
    for row in rows:
        try:
            own = stats_module.read_json(stats_module.find_metrics(Path(row["source"])))
        except AerialsegError:
            continue
        if own.get("mIoU") is not None and data_check(own, metrics.get("data_fingerprint"), "") is None:
            found[row["source"]] = fmt(own["mIoU"])
    return found


def models_section(rows: list[dict[str, Any]] | None, miou: dict[str, str], path: Path) -> str:
    if not rows:
        return (f"## Model table\n\n{NOT_RUN}: `{path}` not found (run `aerialseg profile-models`).")
    return ("## Model table\n\nParameters, FLOPs and latency do not depend on the data; the mIoU column shows only "
            "figures made from this run's data.\n\n" + profile_module.markdown_table(rows, miou).rstrip())


def compare_section(compare: dict[str, Any] | None, figure: str | None, path: Path, why: str | None) -> str:
    if compare is None or figure is None:
        return f"## Multi-seed comparison\n\n{NOT_RUN}: {why or f'`{path}` not found'}; run `aerialseg run-seeds`."
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


def definitions(metrics: dict[str, Any], compare: dict[str, Any] | None) -> str:
    tolerance = metrics.get("bf1_tolerance_px")
    bf1_line = (f"Boundary F1 here used a tolerance of {tolerance} px." if tolerance is not None
                else "Boundary F1 was not computed by the evaluate stage.")
    parts = ["## Metric definitions", "### Segmentation metrics",
             _bullets((metrics_module.__doc__ or "").split("\n\n", 1)[-1]), bf1_line,
             "### Model table", _bullets((profile_module.__doc__ or "").split("\n\n", 1)[-1])]
    if compare is not None:
        parts += ["### Multi-seed statistics", _bullets(str(compare.get("method", "")))]
    return "\n\n".join(parts)


def embedded_section(title: str, path: Path, reference: str | None, command: str) -> str:
    """A table some command wrote as markdown, embedded as it is (its own title dropped) when the JSON beside it
    was made from the ``reference`` data; else why not and the command that makes it."""
    record = stats_module.read_json(path.with_suffix(".json")) if path.with_suffix(".json").is_file() else None
    why = data_check(record, reference, path.with_suffix(".json")) if path.is_file() else f"`{path}` not found"
    if why:
        return f"## {title}\n\n{NOT_RUN}: {why}; run `{command}`."
    body = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("# ")]
    return f"## {title}\n\n" + "\n".join(body).strip()


def compression_section(path: Path, reference: str | None) -> str:
    """The pruning x int8 table of `aerialseg compression-table` (compression.json carries the fingerprint)."""
    return embedded_section("Compression (pruning x int8)", path, reference, "aerialseg compression-table")


def loso_section(path: Path, reference: str | None) -> str:
    """Leave-one-scene-out accuracy (`aerialseg loso`): each labelled scene mapped whole by a model trained on
    the others, the report's measure of accuracy on a new area."""
    return embedded_section("Accuracy on a new area (leave-one-scene-out)", path, reference, "aerialseg loso")

