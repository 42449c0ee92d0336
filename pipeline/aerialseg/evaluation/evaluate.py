"""evaluate: metrics of the map users get — infer-scene's stitched whole-scene prediction — on a split.

For every scene that holds patches of the split, the model maps the whole scene through
``aerialseg.inference.scene.infer_scene`` (the same reader, Predictor, stitcher and options as
`aerialseg infer-scene`, either backend); the map is then scored against the class mask on the
split's area (the union of its patch windows; nodata and ignore pixels excluded). Each labelled pixel
of the split counts once. The scores therefore equal those of the map infer-scene writes for the same
scene, model and options.

Outputs (``out_dir``, default ``reports/``):
- ``metrics.json``: the headline figures only (mIoU, pixel accuracy, mF1, BF1, per-class IoU), for
  ``dvc metrics``; macro means are over the classes the survey labels (``aerialseg.data.labelled``): the
  others get null per-class figures and are named under ``not_labelled`` (``mIoU_all_classes`` keeps the
  mean over every class);
- ``evaluation.json``: everything (``aerialseg.evaluation.metrics.summarize`` keys, BF1 details, per
  scene scores, model, split, options);
- ``confusion.json``: rows = truth, columns = prediction, overall and per scene;
- ``samples.npz``: image, truth and prediction crops of evenly spaced split patches (report overlays).

Each output carries the ``data_fingerprint`` of the tiles/split outputs scored (as model.json's
``training_data_sha256``): the report shows only figures made from its run's data.
"""

import logging
import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from aerialseg.core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.core.safety import temp_dir
from aerialseg.evaluation.metrics import DEFAULT_BF1_TOLERANCE_PX, BoundaryF1, ConfusionMatrix
from aerialseg.geo.raster import open_raster
from aerialseg.geo.scene import SceneReader
from aerialseg.inference.scene import InferOptions, infer_scene

log = logging.getLogger(__name__)

HEADLINE = ("mIoU", "pixel_accuracy", "mF1", "bf1")
HEADLINE_EXTRAS = ("mIoU_all_classes", "not_labelled", "data_fingerprint")
SCENE_KEYS = ("mIoU", "pixel_accuracy", "mF1", "iou", "pixels")
MACRO_MEANS = {"mIoU": "iou", "mF1": "f1", "mPrecision": "precision", "mRecall": "recall", "bf1": "bf1_per_class"}
BLOCK_ROWS = 1024


@dataclass
class SceneScores:
    """Confusion matrix and boundary F1 of one scene (or of the whole split, merged)."""

    tolerance_px: float
    matrix: ConfusionMatrix = field(default_factory=lambda: ConfusionMatrix(NUM_CLASSES, IGNORE))
    bf1: BoundaryF1 | None = None

    def __post_init__(self) -> None:
        self.bf1 = self.bf1 or BoundaryF1(NUM_CLASSES, self.tolerance_px, IGNORE)

    def merge(self, other: "SceneScores") -> None:
        self.matrix.merge(other.matrix)
        self.bf1.merge(other.bf1)

    def summary(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.matrix.summary().items() if k != "confusion_matrix"},
                **self.bf1.summary()}


def area_mask(rects: np.ndarray, top: int, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) of rows top.. covered by any (row, col, h, w) rectangle."""
    area = np.zeros((height, width), dtype=bool)
    for r, c, h, w in rects:
        r0, r1 = max(r, top) - top, min(r + h, top + height) - top
        if r1 > r0:
            area[r0:r1, max(c, 0):min(c + w, width)] = True
    return area


def score_map(map_path: Path, mask_path: Path, rects: np.ndarray,
              tolerance_px: float = DEFAULT_BF1_TOLERANCE_PX, block_rows: int = BLOCK_ROWS) -> SceneScores:
    """Scores of a class map against a mask inside the rectangles, read in row blocks (bounded memory).

    Map pixels of 255 (infer-scene's nodata: where the scene is nodata, alpha-transparent or NaN, as its
    SceneReader says) do not count, so the scene itself is not read again. Boundary F1 reads a halo of
    rows around each block so that block borders change nothing.
    """
    scores = SceneScores(tolerance_px)
    halo = int(math.ceil(tolerance_px)) + 2
    with open_raster(map_path) as pred_ds, open_raster(mask_path) as mask_ds:
        if (pred_ds.width, pred_ds.height) != (mask_ds.width, mask_ds.height):
            raise AerialsegError(f"map is {pred_ds.width}x{pred_ds.height}, the mask {mask_ds.width}x"
                                 f"{mask_ds.height}", map_path, "score a map of the mask's scene")
        width, height = mask_ds.width, mask_ds.height
        for top in range(0, height, block_rows):
            lo, hi = max(0, top - halo), min(height, top + block_rows + halo)
            window = Window(0, lo, width, hi - lo)
            truth, pred = mask_ds.read(1, window=window), pred_ds.read(1, window=window)
            truth[(pred == IGNORE) | ~area_mask(rects, lo, hi - lo, width)] = IGNORE
            core = np.zeros(truth.shape, dtype=bool)
            core[top - lo:min(top + block_rows, height) - lo] = True
            scores.matrix.update(pred[core], truth[core])
            scores.bf1.update(pred, truth, counted=core)
    return scores


def sample_patches(patches: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` evenly spaced patches of the split (all when there are fewer)."""
    if not patches or count <= 0:
        return []
    picks = sorted({int(i) for i in np.linspace(0, len(patches) - 1, min(count, len(patches))).round()})
    return [patches[i] for i in picks]


def crop_samples(map_path: Path, patches: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Image, truth and predicted crops of the patches (one scene)."""
    out: dict[str, list[Any]] = {"images": [], "truth": [], "pred": [], "ids": [], "scenes": []}
    if not patches:
        return out
    first = patches[0]
    with open_raster(map_path) as pred_ds, open_raster(first["mask"]) as mask_ds, \
            open_raster(first["scene"]) as scene_ds:
        reader = SceneReader(scene_ds, first["scene"])
        for p in patches:
            window = Window(p["col"], p["row"], p["width"], p["height"])
            truth = mask_ds.read(1, window=window)
            truth[~reader.valid(window)] = IGNORE
            values = (reader.read_hwc(window), truth, pred_ds.read(1, window=window), p["id"], p["scene_name"])
            for key, value in zip(out, values):
                out[key].append(value)
    return out


@dataclass
class EvaluationResult:
    """What evaluate measured: split totals, per-scene scores, samples."""

    split: str
    overall: SceneScores
    scenes: dict[str, SceneScores]
    samples: dict[str, list[Any]]
    patches: int


def evaluate_scenes(model: Path, patches: list[dict[str, Any]], split: str, options: InferOptions,
                    tolerance_px: float = DEFAULT_BF1_TOLERANCE_PX, samples: int = 8) -> EvaluationResult:
    """Map every scene holding split patches with infer-scene and score the maps on the split's area."""
    if not patches:
        raise AerialsegError(f"split '{split}' has no patches", fix="check split.fractions, or evaluate another split")
    by_scene: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in patches:
        by_scene[p["scene_name"]].append(p)
    keep = {p["id"] for p in sample_patches(patches, samples)}
    overall, per_scene = SceneScores(tolerance_px), {}
    kept: dict[str, list[Any]] = defaultdict(list)
    options = replace(options, format="geotiff", confidence=False, vectors=False, areas=False, preview=False,
                      allow_ungeoreferenced=True)  # scored on the pixel grid: a map need not be placed
    with temp_dir(tempfile.gettempdir(), "evaluate") as work:
        for name in sorted(by_scene):
            group = by_scene[name]
            map_path = Path(work) / f"{name}_landcover.tif"
            infer_scene(group[0]["scene"], model, map_path, options)
            rects = np.array([[p["row"], p["col"], p["height"], p["width"]] for p in group], dtype=np.int64)
            per_scene[name] = score_map(map_path, Path(group[0]["mask"]), rects, tolerance_px)
            overall.merge(per_scene[name])
            for key, values in crop_samples(map_path, [p for p in group if p["id"] in keep]).items():
                kept[key].extend(values)
            log.info("evaluate %s: mIoU %s", name, per_scene[name].matrix.summary()["mIoU"])
    return EvaluationResult(split, overall, per_scene, dict(kept), len(patches))


def restrict_to_labelled(summary: dict[str, Any], labelled: Sequence[str] | None) -> dict[str, Any]:
    """Scores over the labelled classes (None: all): the other classes' per-class figures become null and
    the macro means (mIoU, mF1, mPrecision, mRecall, BF1) leave them out; the mean over every class stays
    as ``mIoU_all_classes`` and the classes left out are listed under ``not_labelled``."""
    left_out = [name for name in summary.get("iou") or {} if labelled is not None and name not in labelled]
    out = {**summary, "mIoU_all_classes": summary.get("mIoU"), "not_labelled": left_out}
    for mean_key, per_key in MACRO_MEANS.items():
        values = summary.get(per_key)
        if not left_out or not isinstance(values, dict):
            continue
        out[per_key] = {name: None if name in left_out else v for name, v in values.items()}
        kept = [v for v in out[per_key].values() if v is not None]
        out[mean_key] = round(float(np.mean(kept)), 6) if kept else None
    return out


def evaluation_record(result: EvaluationResult, model: Path, options: InferOptions,
                      labelled: Sequence[str] | None = None, data_fingerprint: str | None = None) -> dict[str, Any]:
    """evaluation.json: every figure (means over the ``labelled`` classes), per scene, and what produced it."""
    per_scene = {}
    for name, scores in sorted(result.scenes.items()):
        summary = restrict_to_labelled(scores.summary(), labelled)
        per_scene[name] = {**{k: summary[k] for k in SCENE_KEYS}, "bf1": summary["bf1"]}
    return {"split": result.split, "model_dir": str(model), "patches": result.patches,
            "data_fingerprint": data_fingerprint, "labelled_classes": list(labelled) if labelled else None,
            **restrict_to_labelled(result.overall.summary(), labelled), "per_scene": per_scene,
            "inference": {"backend": options.backend, "tta": options.tta, "overlap": options.overlap,
                          "margin_px": options.margin_px, "resample": options.resample},
            "counting": "the stitched scene map (infer-scene) on the union of the split's patch windows"}


def headline(record: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the headline figures only (over the labelled classes), the classes left out and the
    data fingerprint."""
    return {**{k: record.get(k) for k in HEADLINE}, "iou": record.get("iou"),
            **{k: record.get(k) for k in HEADLINE_EXTRAS}}


def write_samples(dest: Path, samples: dict[str, list[Any]]) -> Path:
    """samples.npz (uncompressed) with images, truth, pred, ids, scenes and the data fingerprint."""
    arrays = {k: np.stack(v) if k in ("images", "truth", "pred") and v else np.asarray(v) for k, v in samples.items()}
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return dest


def write_evaluation(out_dir: Path, result: EvaluationResult, model: Path, options: InferOptions,
                     labelled: Sequence[str] | None = None, data_fingerprint: str | None = None) -> dict[str, Any]:
    """metrics.json, evaluation.json, confusion.json and samples.npz, each stamped with ``data_fingerprint``;
    means over the ``labelled`` classes (None: all). Returns the evaluation record."""
    record = evaluation_record(result, model, options, labelled, data_fingerprint)
    write_json(out_dir / "evaluation.json", record)
    write_json(out_dir / "confusion.json", {
        "classes": list(CLASS_NAMES), "rows": "truth", "columns": "prediction", "split": result.split,
        "data_fingerprint": data_fingerprint, "matrix": result.overall.matrix.matrix.tolist(),
        "per_scene": {s: m.matrix.matrix.tolist() for s, m in sorted(result.scenes.items())}})
    write_samples(out_dir / "samples.npz", {**result.samples, "data_fingerprint": data_fingerprint or ""})
    write_json(out_dir / "metrics.json", headline(record))
    return record

