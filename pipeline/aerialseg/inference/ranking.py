"""rank-scenes: which windows of unlabelled scenes are worth labelling next (uncertainty sampling).

Every scene is mapped with infer-scene's machinery (the bundle's model, the seam-free band stitcher,
windowed reads at the training GSD), one band of tile rows at a time, so memory does not grow with the
scene. Each scene is cut into a grid of ``window`` px windows (the last row/column shifted back to end
on the scene's edge). Per pixel the blended class probabilities give:
- entropy ``H = -sum p log p / log K`` (0 = certain, 1 = uniform),
- margin ``1 - (p1 - p2)`` (1 = the two best classes tie).
A window's score is its (optionally rarity-weighted) mean entropy over valid (not nodata) pixels:

    score = sum_c w_c * (sum of H over the window's pixels predicted c) / valid pixels,
    w_c = share_c ** -rarity_power, scaled so that sum_c share_c * w_c = 1,

where ``share_c`` is class c's share of all predicted pixels over every scene ranked: uncertain pixels
of rare classes count more. The default rarity_power 0 is the plain mean entropy: in the simulated labelling
loop (bench/bench_labelling_loop.py, docs/serve.md) it beat rarity weighting (0.5) and random windows. Windows with less than ``min_valid``
valid pixels are skipped. Ties are broken by scene order, then row, then column: the ranking is
deterministic.

Outputs (``out``): ``rank.csv`` and ``rank.gpkg`` (the top-K window polygons with their scores, in the
first georeferenced scene's CRS; paths in the CSV relative to ``out``) and, per window,
``crops/<scene>_<hash>_r<row>_c<col>.tif`` (the window's pixels, georeferenced; ``hash``: 8 hex digits of the
scene's resolved path, so two scenes named alike never share a crop) with an AnyLabeling pre-label ``.json``
beside it (an existing JSON is never overwritten: it may hold an annotator's work). The crops are staged and
moved in when all are written. Crops, not whole
scenes: the point is to label those windows; a crop opens at once in X-AnyLabeling (whole orthophotos
often exceed its image size limit); its JSON holds pre-labels only for the window (a whole-scene file
would hold unreviewed polygons everywhere else); and label-to-mask turns the labelled crop into a
georeferenced mask that enters the pipeline as a scene of its own.
"""

import csv
import hashlib
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.core.classes import IGNORE
from aerialseg.core.config import typed_section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_text
from aerialseg.core.limits import MAX_GRID_MEGAPIXELS, check_grid
from aerialseg.core.safety import refuse_inputs, temp_dir
from aerialseg.geo.raster import is_georeferenced, open_raster
from aerialseg.geo.scene import SceneReader
from aerialseg.geo.windows import window_starts
from aerialseg.inference.bundle import Bundle, open_bundle
from aerialseg.inference.predictor import Predictor
from aerialseg.inference.scene import Grid, InferOptions, make_reader, resample_scale
from aerialseg.inference.stitch import Predict, blend_scene

log = logging.getLogger(__name__)

CSV_FIELDS = ("rank", "scene", "row", "col", "width", "height", "score", "mean_entropy", "mean_margin",
              "valid_fraction", "dominant_class", "x_min", "y_min", "x_max", "y_max", "crop", "label")


def tile_predictor(bundle: Bundle, device: str = "auto") -> Predict:
    """The bundle's model as uint8 tiles (N, B, T, T) -> probabilities (N, K, T, T) (infer-scene's predictor).

    The one place rank-scenes and serve build a predictor.
    """
    return Predictor.from_bundle(bundle, "torch", device)


@dataclass
class RankOptions:
    """Every knob of rank-scenes (params.yaml section ``rank``; CLI flags override)."""

    out: str = "outputs/rank"
    window: int = 512  # window side, scene px
    top_k: int = 20
    rarity_power: float = 0.0  # class weight = share ** -power (0 = plain mean entropy: docs/serve.md)
    min_valid: float = 0.5  # skip windows with a smaller valid (not nodata) fraction
    crops: bool = True  # write each top window's pixels + AnyLabeling pre-label JSON
    min_area_px: float = 16.0  # pre-label polygons smaller than this are dropped
    device: str = "auto"
    batch: int = 8
    progress: bool = True
    max_grid_megapixels: float = MAX_GRID_MEGAPIXELS  # cap on a scene's grid at the training GSD (core.limits)

    @classmethod
    def from_params(cls, section: dict[str, Any], **overrides: Any) -> "RankOptions":
        """Options from the params section 'rank'; overrides that are not None win; unknown keys are errors."""
        return typed_section(cls, "rank", section, **overrides)

    def check(self) -> None:
        if self.window < 16:
            raise AerialsegError(f"window must be >= 16 px, got {self.window}", fix="pass --window 256 or more")
        if self.top_k < 1:
            raise AerialsegError(f"top_k must be >= 1, got {self.top_k}", fix="pass --top-k 1 or more")
        if not 0 <= self.min_valid <= 1 or self.rarity_power < 0:
            raise AerialsegError("rank.min_valid must be in [0, 1] and rank.rarity_power >= 0", "params.yaml")
        if self.batch < 1:
            raise AerialsegError(f"batch must be >= 1, got {self.batch}", fix="pass --batch 1 or more")


@dataclass
class SceneWindows:
    """Per-window sums of one scene (windows on the model grid; ``scale`` model px per scene px)."""

    path: Path
    rows: list[int]
    cols: list[int]
    side_rows: int
    side_cols: int
    scale: float
    entropy: np.ndarray  # (n_rows, n_cols, K) sum of entropy by predicted class
    count: np.ndarray  # (n_rows, n_cols, K) valid pixels by predicted class
    margin: np.ndarray  # (n_rows, n_cols) sum of 1 - (p1 - p2)

    @property
    def valid(self) -> np.ndarray:
        return self.count.sum(axis=2)


@dataclass
class RankedWindow:
    """One window of the ranking, in scene pixels."""

    scene: Path
    row: int
    col: int
    height: int
    width: int
    score: float
    mean_entropy: float
    mean_margin: float
    valid_fraction: float
    dominant_class: int
    files: dict[str, str] = field(default_factory=dict)


def pixel_uncertainty(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, h, w) probabilities -> (entropy in [0, 1], 1 - margin, argmax class) per pixel."""
    k = probs.shape[0]
    entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=0) / math.log(k)
    top2 = np.partition(probs, k - 2, axis=0)[k - 2:]
    return entropy, 1.0 - (top2[1] - top2[0]), probs.argmax(axis=0)


def accumulate(stats: SceneWindows, top: int, entropy: np.ndarray, margin: np.ndarray, classes: np.ndarray,
               valid: np.ndarray) -> None:
    """Add one band of rows (model grid, first row ``top``) to every window it overlaps."""
    k = stats.entropy.shape[2]
    bottom = top + entropy.shape[0]
    for i, r0 in enumerate(stats.rows):
        lo, hi = max(r0, top), min(r0 + stats.side_rows, bottom)
        if lo >= hi:
            continue
        for j, c0 in enumerate(stats.cols):
            sl = (slice(lo - top, hi - top), slice(c0, c0 + stats.side_cols))
            ok = valid[sl]
            cls = classes[sl][ok]
            stats.entropy[i, j] += np.bincount(cls, weights=entropy[sl][ok], minlength=k)[:k]
            stats.count[i, j] += np.bincount(cls, minlength=k)[:k]
            stats.margin[i, j] += float(margin[sl][ok].sum())


def scan_scene(path: Path, bundle: Bundle, predict: Predict, options: RankOptions, scale: float = 1.0,
               on_tiles: Callable[[int], None] | None = None) -> SceneWindows:
    """Stream one scene through the model (read at ``scale``, see plan_scene) and sum uncertainty per window."""
    with open_raster(path) as ds:
        reader = SceneReader(ds, path, bundle.band_policy)
        grid = Grid(ds.height, ds.width, scale)
        mh, mw = grid.model_height, grid.model_width
        side = max(1, round(options.window * grid.scale))
        rows, cols = window_starts(mh, min(side, mh), 0), window_starts(mw, min(side, mw), 0)
        k = bundle.num_classes
        stats = SceneWindows(path, rows, cols, min(side, mh), min(side, mw), grid.scale,
                             np.zeros((len(rows), len(cols), k)), np.zeros((len(rows), len(cols), k), np.int64),
                             np.zeros((len(rows), len(cols))))
        for top, probs in blend_scene(make_reader(reader, grid), mh, mw, predict, k, bundle.tile_size,
                                      bundle.overlap, bundle.overlap // 4, options.batch, on_tiles):
            entropy, margin, classes = pixel_uncertainty(probs)
            accumulate(stats, top, entropy, margin, classes, valid_rows(reader, grid, top, probs.shape[1]))
    return stats


def plan_scene(path: Path, bundle: Bundle, max_grid_megapixels: float = MAX_GRID_MEGAPIXELS) -> tuple[float, int]:
    """(model px per scene px, tiles) of a scene, after checking it opens, has the model's bands and its grid at
    the training GSD is within the cap."""
    with open_raster(path) as ds:
        SceneReader(ds, path, bundle.band_policy)  # bands and bit depth the model can read
        grid = Grid(ds.height, ds.width, resample_scale(ds, bundle, InferOptions(), path))
        check_grid(ds.width, ds.height, grid.scale, max_grid_megapixels * 1e6, path, "rank.max_grid_megapixels")
        return grid.scale, len(window_starts(grid.model_height, bundle.tile_size, bundle.overlap)) * \
            len(window_starts(grid.model_width, bundle.tile_size, bundle.overlap))


def valid_rows(reader: SceneReader, grid: Grid, top: int, rows: int) -> np.ndarray:
    """Valid-data mask (not nodata / alpha / NaN) of model-grid rows [top, top + rows)."""
    if grid.scale == 1.0:
        return reader.valid(Window(0, top, reader.width, rows))
    window = Window(0, top / grid.scale, reader.width, min(rows / grid.scale, reader.height - top / grid.scale))
    with np.errstate(all="ignore"):
        return reader.ds.dataset_mask(window=window, out_shape=(rows, grid.model_width)) > 0


def class_weights(scenes: list[SceneWindows], power: float) -> np.ndarray:
    """w_c = share_c ** -power over every scene's predicted pixels, scaled so sum share * w = 1."""
    counts = sum(s.count.sum(axis=(0, 1)) for s in scenes).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    weights = np.where(share > 0, np.maximum(share, 1e-6) ** -power, 0.0)
    return weights / max(float((share * weights).sum()), 1e-12)


def rank_windows(scenes: list[SceneWindows], weights: np.ndarray, options: RankOptions) -> list[RankedWindow]:
    """Every window with enough valid pixels, best first (ties: scene order, row, col)."""
    found = []
    for order, s in enumerate(scenes):
        area = s.side_rows * s.side_cols
        valid = s.valid
        score = (s.entropy * weights).sum(axis=2) / np.maximum(valid, 1)
        for i, r0 in enumerate(s.rows):
            for j, c0 in enumerate(s.cols):
                if valid[i, j] == 0 or valid[i, j] < options.min_valid * area:
                    continue
                window = RankedWindow(
                    s.path, int(r0 / s.scale), int(c0 / s.scale), int(round(s.side_rows / s.scale)),
                    int(round(s.side_cols / s.scale)), float(score[i, j]),
                    float(s.entropy[i, j].sum() / valid[i, j]), float(s.margin[i, j] / valid[i, j]),
                    float(valid[i, j] / area), int(s.count[i, j].argmax()))
                found.append((-round(window.score, 9), order, r0, c0, window))
    found.sort(key=lambda item: item[:4])
    return [item[-1] for item in found]


# --- outputs ---------------------------------------------------------------------------------

def crop_name(window: RankedWindow) -> str:
    """A window's file name: the same window keeps its name from run to run, and two scenes never share one
    (a short hash of the scene's resolved path: every WebODM orthophoto is ``odm_orthophoto.tif``)."""
    tag = hashlib.sha1(os.fsencode(window.scene.resolve())).hexdigest()[:8]
    return f"{window.scene.stem}_{tag}_r{window.row}_c{window.col}"


def write_crop(window: RankedWindow, bundle: Bundle, predict: Predict, dest_dir: Path, name: str,
               options: RankOptions, stage: Path | None = None) -> dict[str, str]:
    """The window's pixels as a georeferenced GeoTIFF + an AnyLabeling pre-label JSON beside it, written into
    ``stage`` (default dest_dir; see ``write_crops``); returns their paths in dest_dir."""
    stage = stage or dest_dir
    from aerialseg.annotations.anylabeling import anylabeling_document, dumps_label_json
    from aerialseg.annotations.polygonize import mask_to_shapes

    with open_raster(window.scene) as ds:
        win = Window(window.col, window.row, window.width, window.height)
        pixels = ds.read(window=win)
        profile = {"driver": "GTiff", "width": window.width, "height": window.height, "count": ds.count,
                   "dtype": ds.dtypes[0], "crs": ds.crs, "transform": ds.window_transform(win),
                   "nodata": ds.nodata, "photometric": "RGB" if ds.count in (3, 4) else None}
        profile = {k: v for k, v in profile.items() if v is not None}
        reader = SceneReader(ds, window.scene, bundle.band_policy)
        channels, valid = reader.read(win), reader.valid(win)
        colorinterp = ds.colorinterp
    classes = predict_classes(channels, bundle, predict, options.batch)
    classes[~valid] = IGNORE
    image = dest_dir / f"{name}.tif"
    with atomic_path(stage / image.name) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # a scene without georeference
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pixels)
            dst.colorinterp = colorinterp
    label = dest_dir / f"{name}.json"
    if label.exists():  # it may hold an annotator's work: never overwrite it
        log.warning("%s exists: kept as it is (delete it to get a fresh pre-label)", label)
    else:
        shapes = mask_to_shapes(classes, min_area_px=options.min_area_px)
        write_text(stage / label.name,
                   dumps_label_json(anylabeling_document(shapes, image.name, window.width, window.height)))
    return {"crop": str(image), "label": str(label)}


def write_crops(ranked: list[RankedWindow], bundle: Bundle, predict: Predict, dest_dir: Path,
                options: RankOptions) -> None:
    """Every window's crop + pre-label, staged in a run-named folder and moved into dest_dir only when all are
    written: a failure half-way leaves dest_dir as it was."""
    with temp_dir(dest_dir.parent, dest_dir.name) as stage:
        for window in ranked:
            window.files = write_crop(window, bundle, predict, dest_dir, crop_name(window), options, stage)
        dest_dir.mkdir(exist_ok=True)
        for staged in sorted(stage.iterdir()):
            os.replace(staged, dest_dir / staged.name)



def predict_classes(pixels: np.ndarray, bundle: Bundle, predict: Predict, batch: int) -> np.ndarray:
    """uint8 (B, H, W) -> uint8 classes (H, W) with the seam-free stitcher."""
    _, height, width = pixels.shape
    classes = np.empty((height, width), np.uint8)
    for top, probs in blend_scene(lambda row, rows: pixels[:, row:row + rows], height, width, predict,
                                  bundle.num_classes, bundle.tile_size, bundle.overlap, bundle.overlap // 4, batch):
        classes[top:top + probs.shape[1]] = probs.argmax(axis=0)
    return classes


def window_bounds(window: RankedWindow) -> tuple[Any, tuple[float, float, float, float] | None]:
    """(CRS, (x_min, y_min, x_max, y_max) in it) of a window; (None, None) without a georeference."""
    with open_raster(window.scene) as ds:
        if not is_georeferenced(ds):
            return None, None
        bounds = rasterio.windows.bounds(Window(window.col, window.row, window.width, window.height), ds.transform)
        return ds.crs, bounds


def write_csv(dest: Path, ranked: list[RankedWindow], bounds: list[tuple[float, ...] | None],
              class_names: tuple[str, ...]) -> Path:
    """rank.csv; scene, crop and label paths relative to its folder (the folder can move, scenes with it)."""
    base = dest.parent.resolve()

    def rel(path: str | Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), base)).as_posix() if path else ""

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for rank, (w, b) in enumerate(zip(ranked, bounds), start=1):
        world = [f"{v:.3f}" for v in b] if b else ["", "", "", ""]
        writer.writerow([rank, rel(w.scene), w.row, w.col, w.width, w.height, f"{w.score:.6f}",
                         f"{w.mean_entropy:.6f}", f"{w.mean_margin:.6f}", f"{w.valid_fraction:.4f}",
                         class_names[w.dominant_class], *world, rel(w.files.get("crop", "")),
                         rel(w.files.get("label", ""))])
    return write_text(dest, buffer.getvalue())


def write_gpkg(dest: Path, ranked: list[RankedWindow], georef: list[tuple[Any, Any]],
               class_names: tuple[str, ...]) -> Path:
    """Window polygons with their scores, one layer ``windows``, in the first georeferenced scene's CRS."""
    import shapely
    from pyogrio.raw import write
    from rasterio.warp import transform_geom

    crs = next((c for c, _ in georef if c is not None), None)
    keep, geoms = [], []
    for rank, (w, (wcrs, b)) in enumerate(zip(ranked, georef), start=1):
        if crs is not None and wcrs is None:
            log.warning("%s: not georeferenced: its window is left out of %s", w.scene, dest.name)
            continue
        poly = shapely.box(*b) if b else shapely.box(w.col, -(w.row + w.height), w.col + w.width, -w.row)
        if crs is not None and wcrs != crs:
            poly = shapely.geometry.shape(transform_geom(wcrs, crs, shapely.geometry.mapping(poly)))
        keep.append((rank, w))
        geoms.append(poly)
    columns = {
        "rank": np.array([r for r, _ in keep], np.int32),
        "scene": np.array([w.scene.name for _, w in keep], dtype=object),
        "score": np.array([w.score for _, w in keep], np.float64),
        "mean_entropy": np.array([w.mean_entropy for _, w in keep], np.float64),
        "mean_margin": np.array([w.mean_margin for _, w in keep], np.float64),
        "valid_fraction": np.array([w.valid_fraction for _, w in keep], np.float64),
        "dominant_class": np.array([class_names[w.dominant_class] for _, w in keep], dtype=object),
        "row": np.array([w.row for _, w in keep], np.int32),
        "col": np.array([w.col for _, w in keep], np.int32),
        "label": np.array([w.files.get("label", "") for _, w in keep], dtype=object),
    }
    pyogrio_log = logging.getLogger("pyogrio")
    level = pyogrio_log.level
    pyogrio_log.setLevel(logging.WARNING)
    try:
        with atomic_path(dest) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*crs.*not provided")  # scenes without georeference
            tmp.unlink()  # GPKG: a fresh file, not an empty one GDAL would try to open
            write(tmp, shapely.to_wkb(np.array(geoms, dtype=object)) if geoms else np.array([], dtype=object),
                  list(columns.values()), list(columns), layer="windows", driver="GPKG", geometry_type="Polygon",
                  crs=crs.to_wkt() if crs else None)
    finally:
        pyogrio_log.setLevel(level)
    return dest


@dataclass
class RankResult:
    ranked: list[RankedWindow]
    windows: int
    seconds: float
    outputs: dict[str, str]
    weights: dict[str, float]

    def summary(self) -> str:
        best = f", best {self.ranked[0].scene.name} r{self.ranked[0].row} c{self.ranked[0].col} " \
               f"score {self.ranked[0].score:.3f}" if self.ranked else ""
        return (f"rank-scenes: {self.windows} window(s) scored in {self.seconds:.1f} s, top {len(self.ranked)} "
                f"written{best} -> {self.outputs.get('csv')}")


def rank_scenes(scenes: list[Path], model: Path, options: RankOptions | None = None) -> RankResult:
    """Score every window of the scenes, write the top-K (CSV, GeoPackage, crops + pre-labels)."""
    options = options or RankOptions()
    options.check()
    if not scenes:
        raise AerialsegError("no scenes given", fix="pass one or more orthophotos (GeoTIFF)")
    if len({Path(s).resolve() for s in scenes}) != len(scenes):
        raise AerialsegError("a scene is given twice", fix="pass each scene once")
    start = time.perf_counter()
    out = Path(options.out)
    for folder in (out, out / "crops"):  # before the scan, not after it
        if folder.exists() and not folder.is_dir():
            raise AerialsegError("exists and is not a folder", folder, "pass another --out (a folder)")
    with ExitStack() as stack:
        bundle = stack.enter_context(open_bundle(model))
        # every scene checked first (bands, grid size)
        plans = [plan_scene(Path(scene), bundle, options.max_grid_megapixels) for scene in scenes]
        predict = tile_predictor(bundle, options.device)
        class_names = tuple(c["name"] for c in bundle.manifest["classes"])
        bar = stack.enter_context(tqdm(total=sum(n for _, n in plans), unit="tile", desc="rank-scenes",
                                       disable=not options.progress, dynamic_ncols=True))
        scanned = [scan_scene(Path(scene), bundle, predict, options, scale, bar.update)
                   for scene, (scale, _) in zip(scenes, plans)]
        weights = class_weights(scanned, options.rarity_power)
        ranked_all = rank_windows(scanned, weights, options)
        if not ranked_all:
            raise AerialsegError(f"no window has {options.min_valid:.0%} valid (not nodata) pixels", scenes[0],
                                 "pass scenes with image data, or lower rank.min_valid / --window")
        ranked = ranked_all[:options.top_k]
        outputs = [out / "rank.csv", out / "rank.gpkg"]
        if options.crops:
            outputs += [out / "crops" / f"{crop_name(w)}{suffix}" for w in ranked for suffix in (".tif", ".json")]
        refuse_inputs(outputs, [*map(Path, scenes), Path(model)], "pass another --out")
        if options.crops:
            write_crops(ranked, bundle, predict, out / "crops", options)
        georef = [window_bounds(w) for w in ranked]
        outputs = {"csv": str(write_csv(out / "rank.csv", ranked, [b for _, b in georef], class_names)),
                   "gpkg": str(write_gpkg(out / "rank.gpkg", ranked, georef, class_names))}
    seconds = time.perf_counter() - start
    return RankResult(ranked, len(ranked_all), seconds, outputs,
                      {n: round(float(w), 4) for n, w in zip(class_names, weights)})
