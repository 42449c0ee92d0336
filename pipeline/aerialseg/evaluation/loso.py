"""Leave-one-scene-out (`aerialseg loso`): accuracy on a new area, the user's question.

Fold k holds out the k-th labelled scene (names sorted): a model is trained on the other scenes' patches —
validated on spatial blocks of those scenes, drawn by the split stage's rule (``data.split.make_split``, block
grouping, the overlap guard) with no test share — then the held-out scene is mapped whole by infer-scene's code
path (``inference.scene.infer_scene``, the evaluate stage's options) and scored whole: every labelled pixel of
its mask (nodata and ignore excluded), macro mIoU over the classes the survey labels and per-class IoU. The
offline augmented copies are not used (augment made them from the block split, held-out scene included);
online augmentation is. Adapted variants of each fold's model (``--adapt``) are mapped and scored the same way.

This module plans the folds (data), scores a mapped scene and aggregates: training and adaptation come in as
callables from the stage (``aerialseg.stages.loso``), so this layer needs no training code.

Outputs: ``loso.json`` (per fold and variant: mIoU, per-class IoU, pixel accuracy, minutes; per variant: mean
± sample std over folds, per-class means, and the gate for making an adaptation a default step: a gain of at
least ``GATE_GAIN`` on the fold mean with no fold losing more than ``GATE_LOSS``) and ``loso.md`` (tables).
"""

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file, write_json, write_text
from aerialseg.core.safety import temp_dir
from aerialseg.data.split import SplitParams, make_split
from aerialseg.data.tiling import load_manifest
from aerialseg.evaluation.evaluate import restrict_to_labelled, score_map
from aerialseg.geo.raster import open_raster
from aerialseg.inference.scene import InferOptions, infer_scene

log = logging.getLogger(__name__)

GATE_GAIN, GATE_LOSS = 0.02, 0.01  # mIoU: +2 points on the fold mean, no fold more than 1 point worse
BASE = "base"


@dataclass
class Fold:
    """One fold: the held-out scene and the training data of the others (written by ``write_fold_data``)."""

    index: int
    scene_name: str
    scene: Path
    mask: Path
    work: Path
    manifest: Path
    split: Path


def labelled_scenes(manifest: dict[str, Any]) -> list[str]:
    """Names (sorted) of the scenes that hold patches: the folds."""
    return sorted({p["scene_name"] for p in manifest["patches"]})


def pick_folds(names: Sequence[str], folds: Sequence[int] | None) -> list[int]:
    """The fold indices to run (None: all), checked against the number of scenes."""
    if len(names) < 2:
        raise AerialsegError(f"leave-one-scene-out needs 2 or more labelled scenes, the manifest has {len(names)}",
                             fix="label more scenes (data.labels)")
    chosen = list(range(len(names))) if folds is None else sorted(set(int(k) for k in folds))
    bad = [k for k in chosen if not 0 <= k < len(names)]
    if bad:
        raise AerialsegError(f"fold {bad[0]} does not exist: folds are 0..{len(names) - 1} "
                             f"({', '.join(names)})", fix="pass --folds with indices in that range")
    return chosen


def write_fold_data(manifest_path: Path, index: int, split: SplitParams, val_fraction: float, work: Path) -> Fold:
    """Fold ``index``'s manifest (the other scenes) and split (train/val by blocks, no test) under ``work``."""
    manifest = load_manifest(manifest_path)
    names = labelled_scenes(manifest)
    held = names[index]
    first = next(p for p in manifest["patches"] if p["scene_name"] == held)
    kept = {**manifest, "scenes": [s for s in manifest["scenes"] if s["scene_name"] != held],
            "patches": [p for p in manifest["patches"] if p["scene_name"] != held]}
    work.mkdir(parents=True, exist_ok=True)
    fold_manifest = write_json(work / "manifest.json", kept)
    params = replace(split, fractions=(1.0 - val_fraction, val_fraction, 0.0), group="block")
    made = make_split(kept, params)
    write_json(work / "split.json", {**made, "manifest_sha256": sha256_file(fold_manifest), "held_out": held})
    return Fold(index, held, Path(first["scene"]), Path(first["mask"]), work, fold_manifest, work / "split.json")


def score_scene(model: Path, fold: Fold, options: InferOptions, labelled: Sequence[str] | None) -> dict[str, Any]:
    """Map the held-out scene with infer-scene and score every labelled pixel of its mask."""
    options = replace(options, format="geotiff", confidence=False, vectors=False, areas=False, preview=False,
                      allow_ungeoreferenced=True, progress=False)
    with open_raster(fold.mask) as ds:
        rects = np.array([[0, 0, ds.height, ds.width]], dtype=np.int64)
    with temp_dir(tempfile.gettempdir(), "loso") as work:
        map_path = work / f"{fold.scene_name}_landcover.tif"
        infer_scene(fold.scene, model, map_path, options)
        summary = restrict_to_labelled(score_map(map_path, fold.mask, rects).matrix.summary(), labelled)
    return {k: summary.get(k) for k in ("mIoU", "iou", "pixel_accuracy", "mF1")}


TrainFn = Callable[[Fold], tuple[Path, dict[str, Any]]]  # fold -> (model or bundle dir, train summary)
AdaptFn = Callable[[Path, Fold, str], Path]  # (base model, fold, method) -> adapted bundle


def minutes(start: float) -> float:
    return round((time.perf_counter() - start) / 60.0, 3)


def run_fold(fold: Fold, train: TrainFn, adapt: AdaptFn | None, methods: Sequence[str], options: InferOptions,
             labelled: Sequence[str] | None) -> dict[str, Any]:
    """Train, adapt and score one fold; returns its record (minutes of each step)."""
    start = time.perf_counter()
    base, summary = train(fold)
    record: dict[str, Any] = {"fold": fold.index, "scene": fold.scene_name, "train_minutes": minutes(start),
                              "train_patches": summary.get("train_patches"), "val_patches": summary.get("val_patches"),
                              "best_val_mIoU": summary.get("best_val_mIoU"), "variants": {}}
    for name in [BASE, *methods]:
        step = time.perf_counter()
        model = base if name == BASE else adapt(base, fold, name)
        adapt_minutes = minutes(step)
        step = time.perf_counter()
        scores = score_scene(model, fold, options, labelled)
        record["variants"][name] = {**scores, "adapt_minutes": adapt_minutes, "map_minutes": minutes(step)}
        log.info("loso fold %d (%s) %s: mIoU %s", fold.index, fold.scene_name, name, scores["mIoU"])
    record["minutes"] = minutes(start)
    return record


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return round(float(np.mean(values)), 6), round(std, 6)


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: mIoU mean ± std over folds, per-class IoU means, minutes, and (adaptations) the gate."""
    names = list(dict.fromkeys(n for f in folds for n in f["variants"]))
    out: dict[str, Any] = {}
    for name in names:
        rows = [f["variants"][name] for f in folds if name in f["variants"]]
        mean, std = _mean_std([r["mIoU"] for r in rows if r["mIoU"] is not None])
        classes = list(dict.fromkeys(c for r in rows for c in (r["iou"] or {})))
        iou = {c: _mean_std([r["iou"][c] for r in rows if (r["iou"] or {}).get(c) is not None])[0] for c in classes}
        out[name] = {"folds": len(rows), "mIoU_mean": mean, "mIoU_std": std, "iou_mean": iou,
                     "adapt_minutes_mean": _mean_std([r["adapt_minutes"] for r in rows])[0]}
        if name != BASE:
            out[name]["gate"] = gate(folds, name)
    return out


def gate(folds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Whether an adaptation may become a default step: +GATE_GAIN on the fold mean, no fold below -GATE_LOSS."""
    deltas = [f["variants"][name]["mIoU"] - f["variants"][BASE]["mIoU"] for f in folds
              if name in f["variants"] and f["variants"][name]["mIoU"] is not None
              and f["variants"][BASE]["mIoU"] is not None]
    if not deltas:
        return {"mean_gain": None, "worst_fold": None, "passes": False}
    mean_gain, worst = float(np.mean(deltas)), float(min(deltas))
    return {"mean_gain": round(mean_gain, 6), "worst_fold": round(worst, 6),
            "passes": bool(mean_gain >= GATE_GAIN and worst >= -GATE_LOSS)}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(record: dict[str, Any]) -> str:
    """loso.md: mIoU per fold and variant, mean ± std, per-class means, minutes, the gate."""
    folds, summary = record["folds"], record["summary"]
    names = list(summary)
    lines = [f"# Leave-one-scene-out ({record['recipe']['model']}, {record['recipe']['epochs']} epochs)", "",
             "mIoU (%) of each held-out scene mapped whole; mean ± sample std over folds.", "",
             "| fold | scene | " + " | ".join(names) + " | minutes |", "|---|---|" + "---:|" * (len(names) + 1)]
    for f in folds:
        cells = [_pct(f["variants"].get(n, {}).get("mIoU")) for n in names]
        lines.append(f"| {f['fold']} | {f['scene']} | " + " | ".join(cells) + f" | {f['minutes']:.1f} |")
    means = [f"**{_pct(summary[n]['mIoU_mean'])} ± {_pct(summary[n]['mIoU_std'])}**" for n in names]
    lines.append("| mean | | " + " | ".join(means) + f" | {record['minutes_per_fold']:.1f} |")
    classes = list(dict.fromkeys(c for n in names for c in summary[n]["iou_mean"]))
    lines += ["", "Per-class IoU (%), mean over folds:", "", "| variant | " + " | ".join(classes) + " |",
              "|---|" + "---:|" * len(classes)]
    lines += [f"| {n} | " + " | ".join(_pct(summary[n]["iou_mean"].get(c)) for c in classes) + " |" for n in names]
    gated = [n for n in names if "gate" in summary[n]]
    if gated:
        lines += ["", f"Default-step rule: mean gain >= {100 * GATE_GAIN:.0f} points, no fold losing more than "
                  f"{100 * GATE_LOSS:.0f}.", "", "| adaptation | mean gain | worst fold | passes | minutes (mean) |",
                  "|---|---:|---:|---|---:|"]
        for n in gated:
            g = summary[n]["gate"]
            lines.append(f"| {n} | {_pct(g['mean_gain'])} | {_pct(g['worst_fold'])} | {'yes' if g['passes'] else 'no'} "
                         f"| {summary[n]['adapt_minutes_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def write_loso(out_dir: Path, folds: list[dict[str, Any]], recipe: dict[str, Any],
               labelled: Sequence[str] | None, data_fingerprint: str | None) -> dict[str, Any]:
    """loso.json + loso.md in ``out_dir``; returns the record."""
    record = {"recipe": recipe, "labelled_classes": list(labelled) if labelled else None,
              "data_fingerprint": data_fingerprint, "folds": folds, "summary": summarise(folds),
              "minutes_per_fold": round(float(np.mean([f["minutes"] for f in folds])), 3) if folds else 0.0,
              "counting": "each held-out scene mapped whole by infer-scene, every labelled pixel of its mask"}
    write_json(out_dir / "loso.json", record)
    write_text(out_dir / "loso.md", markdown(record))
    return record


def cached_fold(path: Path, recipe: dict[str, Any], methods: Sequence[str]) -> dict[str, Any] | None:
    """A fold's earlier record when it was made with the same recipe and holds every variant asked for."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if saved.get("recipe") != recipe or not set([BASE, *methods]) <= set(saved["record"]["variants"]):
        return None
    return saved["record"]
