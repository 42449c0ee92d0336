"""infer-scene: a trained model over a whole orthophoto of any size -> a map that opens in QGIS as it is.

The scene is read one band of tile rows at a time (``aerialseg.inference.stitch.blend_scene``): overlapping tiles,
blended with weights that sum to one at every pixel, so there are no seams and no dropped edges.
Finished rows go straight to a tiled GeoTIFF temp file (whole block rows at a time); at the end that
file becomes a Cloud-Optimized GeoTIFF (deflate, mode overviews, colour table, nodata 255) on the
scene's grid, renamed into place only when everything succeeded.

Memory does not depend on the scene's height or area, only on its width W, the tile size T, the
number of classes K, the input bands B and the batch N (bytes):

    peak ~= model + activations(N x T x T) + 4*N*T*T*(B + 2K)         (one batch in and out)
            + 4*K*T*W                                                 (float32 band accumulator)
            + B*T*W (+ B*T*W when resampling)                         (the band's pixels)
            + 2*(512 + T)*W                                           (class/confidence row buffers)
            + GDAL block cache (capped: infer.gdal_cache_mb, 128 MB)

e.g. K=5, B=3, T=512, N=8, W=8192: accumulator 84 MB, pixels 13 MB, buffers 17 MB. With ``--resample``
the same holds on the model's grid (W scaled by scene GSD / model GSD).

Refused before any tile is computed: an output that is the scene or a bundle file (also through links or
letter case), a label file that exists (``--format anylabeling`` without ``--overwrite``), a scene without
georeferencing (unless ``--allow-ungeoreferenced``; a plain JPEG/PNG photo is mapped on its pixel grid with one
warning) and a scene that is nodata everywhere. Temp files and the
work folder are named for the run (``aerialseg.core.safety``), so the next run removes those of a killed one;
a .zip bundle is extracted into such a run folder of the system temp dir.
"""

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.inference.bundle import Bundle, open_bundle
from aerialseg.core.classes import IGNORE, colormap
from aerialseg.core.config import typed_section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path
from aerialseg.core.limits import MAX_GRID_MEGAPIXELS, check_grid
from aerialseg.core.safety import backup_path, temp_dir, tempfiles_in
from aerialseg.core.timing import rate_text
from aerialseg.geo.raster import RowWriter, is_georeferenced, open_raster, temp_profile
from aerialseg.geo.scene import SceneReader, scene_gsd_m
from aerialseg.geo.style import qml_document, write_preview
from aerialseg.inference.map_owner import stamp
from aerialseg.inference.predictor import BACKENDS, Predictor
from aerialseg.inference.scene_checks import check_outputs, check_scene, output_paths  # noqa: F401 (API)
from aerialseg.geo.windows import window_starts
from aerialseg.inference.stitch import ReadRows, blend_scene

log = logging.getLogger(__name__)

FORMATS = ("geotiff", "anylabeling")
EMIT_ROWS = 128  # rows classified at a time (bounds argmax temporaries)


@dataclass
class InferOptions:
    """Every knob of infer-scene (params.yaml section ``infer``; CLI flags override)."""

    overlap: int | None = None  # px; None = the bundle's
    margin_px: int | None = None  # px of each inner overlap a tile does not vote on; None = overlap // 4
    batch: int = 8
    tta: bool = False
    backend: str = "torch"
    device: str = "auto"  # auto | cpu | cuda
    confidence: bool = False
    vectors: bool = False
    areas: bool = False
    preview: bool = True
    format: str = "geotiff"
    resample: bool = True
    gsd_tolerance: float = 1.5
    max_grid_megapixels: float = MAX_GRID_MEGAPIXELS  # cap on the grid read at the training GSD (core.limits)
    min_area_px: float = 16.0
    simplify_px: float = 0.0
    vector_skip: list[str] = field(default_factory=lambda: ["background"])
    vector_block: int = 2048
    cog_blocksize: int = 512
    gdal_cache_mb: int = 128  # GDAL block cache cap (its default, 5 % of RAM, would grow with the scene)
    out_dir: str = "outputs/infer"
    progress: bool = True
    allow_ungeoreferenced: bool = False  # map a scene without CRS / geotransform (pixel grid only)
    overwrite: bool = False  # anylabeling: replace an existing label file (a .bak copy is kept)
    labelled_only: bool = True  # never predict classes the bundle records as without training data

    @classmethod
    def from_params(cls, section: dict[str, Any], **overrides: Any) -> "InferOptions":
        """Options from the params section 'infer'; overrides that are not None win; unknown keys are errors."""
        return typed_section(cls, "infer", section, **overrides)

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise AerialsegError(f"unknown backend '{self.backend}'", fix=f"use one of: {', '.join(BACKENDS)}")
        if self.format not in FORMATS:
            raise AerialsegError(f"unknown format '{self.format}'", fix=f"use one of: {', '.join(FORMATS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise AerialsegError(f"unknown device '{self.device}'", fix="use auto, cpu or cuda")
        if self.batch < 1:
            raise AerialsegError(f"batch must be >= 1, got {self.batch}", fix="pass --batch 1 or more")
        if not self.max_grid_megapixels > 0:
            raise AerialsegError(f"infer.max_grid_megapixels must be > 0, got {self.max_grid_megapixels}",
                                 "params.yaml", f"set it to e.g. {MAX_GRID_MEGAPIXELS:g}")


@dataclass
class InferResult:
    """What infer-scene wrote and how long it took."""

    outputs: dict[str, str]
    width: int
    height: int
    tiles: int
    seconds: float
    mpx_per_s: float
    scale: float
    backend: str
    device: str

    def summary(self) -> str:
        return (f"infer-scene: {self.width}x{self.height} px, {self.tiles} tiles, {self.seconds:.1f} s, "
                f"{rate_text(self.mpx_per_s)} ({self.backend}/{self.device}) -> {self.outputs.get('map')}")


# --- the scene -------------------------------------------------------------------------------

def resample_scale(ds: rasterio.DatasetReader, bundle: Bundle, options: InferOptions, path: Path) -> float:
    """Model-grid pixels per scene pixel: 1, or scene GSD / bundle GSD when far apart and resampling is on."""
    gsd, trained = scene_gsd_m(ds), bundle.gsd_m
    if gsd is None or not trained:
        if trained and is_georeferenced(ds):  # no georeference: check_scene said so once
            log.warning("%s: pixel size unknown (no usable georeference): running at native resolution", path)
        return 1.0
    factor = gsd / trained
    if max(factor, 1.0 / factor) <= options.gsd_tolerance:
        return 1.0
    if not options.resample:
        log.warning("%s: pixel size %.3g m is %.2fx the training GSD %.3g m; predictions may suffer "
                    "(--resample reads windows at the training GSD)", path, gsd, factor, trained)
        return 1.0
    log.warning("%s: pixel size %.3g m is %.2fx the training GSD %.3g m: reading windows at %.3g m, "
                "writing on the scene's grid", path, gsd, factor, trained, trained)
    return factor


@dataclass
class Grid:
    """The model's grid over the scene: ``scale`` model pixels per scene pixel (1 = the scene's grid)."""

    height: int
    width: int
    scale: float = 1.0

    @property
    def model_height(self) -> int:
        return max(1, int(self.height * self.scale)) if self.scale != 1.0 else self.height

    @property
    def model_width(self) -> int:
        return max(1, int(self.width * self.scale)) if self.scale != 1.0 else self.width

    def model_index(self, n: int, model_n: int) -> np.ndarray:
        """Model-grid index of each scene pixel centre along one axis (nearest)."""
        return np.minimum(((np.arange(n) + 0.5) * self.scale).astype(np.int64), model_n - 1)


def make_reader(reader: SceneReader, grid: Grid) -> ReadRows:
    """read_rows(row, rows) on the model grid: windowed reads, resampled when the grid's scale is not 1."""
    width = reader.width
    if grid.scale == 1.0:
        return lambda row, rows: reader.read(Window(0, row, width, rows))
    method = Resampling.average if grid.scale < 1.0 else Resampling.bilinear

    def read_rows(row: int, rows: int) -> np.ndarray:
        top = row / grid.scale
        height = min(rows / grid.scale, reader.height - top)
        return reader.read(Window(0, top, width, height), (rows, grid.model_width), method)

    return read_rows


def emit_rows(band: np.ndarray, band_top: int, row_index: np.ndarray | None, col_index: np.ndarray | None,
              confidence: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Finished model-grid rows (K, d, w) -> (scene row, classes uint8, confidence uint8 or None) chunks.

    ``row_index``/``col_index`` map scene pixels to model-grid pixels (None: the same grid).
    """
    if row_index is None:
        first, last = band_top, band_top + band.shape[1]
    else:
        first = int(np.searchsorted(row_index, band_top, side="left"))
        last = int(np.searchsorted(row_index, band_top + band.shape[1], side="left"))
    for start in range(first, last, EMIT_ROWS):
        stop = min(start + EMIT_ROWS, last)
        if row_index is None:
            probs = band[:, start - band_top:stop - band_top]
        else:
            probs = band[:, row_index[start:stop] - band_top][:, :, col_index]
        classes = probs.argmax(axis=0).astype(np.uint8)
        conf = np.clip(probs.max(axis=0) * 255.0 + 0.5, 0, 255).astype(np.uint8) if confidence else None
        yield start, classes, conf


def class_writers(stack: ExitStack, ds: rasterio.DatasetReader, class_path: Path, confidence_path: Path | None,
                  blocksize: int, rows: tuple[int, int] | None = None) -> list[RowWriter]:
    """Row writers of the class (+ confidence) stripe GeoTIFFs on the scene's grid (``rows``: a band of it)."""
    profiles = [temp_profile(ds, IGNORE, blocksize), temp_profile(ds, 0, blocksize)]
    if rows is not None:
        window = Window(0, rows[0], ds.width, rows[1] - rows[0])
        profiles = [{**p, "height": window.height, "transform": ds.window_transform(window)} for p in profiles]
    cls_dst = stack.enter_context(rasterio.open(class_path, "w", **profiles[0]))
    cls_dst.write_colormap(1, colormap())  # before any pixel: TIFF tags are fixed once data is written
    cls_dst.set_band_description(1, "landcover class")
    writers = [RowWriter(cls_dst, blocksize)]
    if confidence_path is not None:
        writers.append(RowWriter(stack.enter_context(rasterio.open(confidence_path, "w", **profiles[1])), blocksize))
    return writers


def predict_scene(reader: SceneReader, predict: Callable[[np.ndarray], np.ndarray],
                  classes: int, tile: int, overlap: int, margin: int, batch: int, grid: Grid, class_path: Path,
                  confidence_path: Path | None = None, blocksize: int = 512, progress: bool = True,
                  rows: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Blend tiles over the scene into a class GeoTIFF (+ confidence); returns (pixel counts per value, tiles).

    ``rows=(y0, y1)``: only those scene rows (a survey block), with the whole scene's tiles and sums."""
    ds = reader.ds
    mh, mw = grid.model_height, grid.model_width
    row_index = None if grid.scale == 1.0 else grid.model_index(ds.height, mh)
    col_index = None if grid.scale == 1.0 else grid.model_index(ds.width, mw)
    y0, y1 = rows or (0, ds.height)
    model_rows = (y0, y1) if row_index is None else (int(row_index[y0]), int(row_index[y1 - 1]) + 1)
    n_tiles = len(window_starts(mh, tile, overlap)) * len(window_starts(mw, tile, overlap))
    counts, done = np.zeros(256, dtype=np.int64), [0]
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        writers = class_writers(stack, ds, class_path, confidence_path, blocksize, rows)
        bar = stack.enter_context(tqdm(total=n_tiles, unit="tile", desc="infer", disable=None if progress else True,
                                       dynamic_ncols=True))

        def on_tiles(n: int) -> None:
            done[0] += n
            bar.update(n)

        for top, band in blend_scene(make_reader(reader, grid), mh, mw, predict, classes, tile, overlap,
                                     margin, batch, on_tiles, model_rows):
            for row, cls, conf in emit_rows(band, top, row_index, col_index, confidence_path is not None):
                if row < y0 or row + cls.shape[0] > y1:  # a block on a resampled grid: its own rows only
                    a, b = max(row, y0) - row, min(row + cls.shape[0], y1) - row
                    row, cls, conf = row + a, cls[a:b], None if conf is None else conf[a:b]
                    if not cls.shape[0]:
                        continue
                invalid = ~reader.valid(Window(0, row, ds.width, cls.shape[0]))
                cls[invalid] = IGNORE
                counts += np.bincount(cls.ravel(), minlength=256)
                writers[0].write(cls)
                if conf is not None:
                    conf[invalid] = 0
                    writers[1].write(conf)
        for writer in writers:
            writer.close()
    return counts, done[0]


# --- outputs ---------------------------------------------------------------------------------

@contextmanager
def open_model(model: Path) -> Iterator[Bundle]:
    """open_bundle, with whatever it extracts from a .zip kept in a run-named temp folder (no copies pile up)."""
    with ExitStack() as stack:
        if model.is_file():
            folder = stack.enter_context(temp_dir(Path(tempfile.gettempdir()), "bundle"))
            with tempfiles_in(folder):
                bundle = stack.enter_context(open_bundle(model))
        else:
            bundle = stack.enter_context(open_bundle(model))
        yield bundle


def _keep_backup(path: Path) -> None:
    if path.is_file():
        kept = backup_path(path)
        shutil.copy2(path, kept)
        log.info("%s: previous label file kept as %s", path, kept.name)


def write_cog(src: Path, dest: Path, resampling: str, blocksize: int) -> None:
    """Convert a tiled GeoTIFF into a Cloud-Optimized GeoTIFF with overviews (GDAL COG driver)."""
    from rasterio.shutil import copy as rio_copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rio_copy(src, dest, driver="COG", compress="deflate", blocksize=blocksize,
                 overview_resampling=resampling, bigtiff="if_safer")


def write_anylabeling(src: Path, dest: Path, scene: Path, options: InferOptions) -> int:
    """The prediction as AnyLabeling JSON polygons (annotators correct it); returns the shape count.

    The same polygons and file as `aerialseg mask-to-label` (docs/labels.md): vertices on pixel centres, so the
    tools paint the mask back; one shape per line; imagePath relative to dest's folder (dest may be a temp
    file beside the final one).
    """
    from aerialseg.annotations.anylabeling import dumps_label_json
    from aerialseg.annotations.polygonize import label_document

    with rasterio.open(src) as ds:
        mask = ds.read(1)
    doc = label_document(mask, scene, dest, options.simplify_px, options.min_area_px)
    dest.write_text(dumps_label_json(doc), encoding="utf-8")
    return len(doc["shapes"])


def _finish_outputs(ds: rasterio.DatasetReader, scene: Path, work: Path, tmp: dict[str, Path],
                    counts: np.ndarray, options: InferOptions, class_names: tuple[str, ...]) -> None:
    """Turn the stripe temp files into the requested outputs (all still at their temp paths)."""
    from aerialseg.geo.areas import scene_areas
    from aerialseg.geo.vectorize import vectorize_raster

    classes_tif = work / "classes.tif"
    if options.format == "geotiff":
        stamp(classes_tif, scene)  # which scene the map is of (map_owner: same-name scenes never share a map)
        write_cog(classes_tif, tmp["map"], "mode", options.cog_blocksize)
    else:
        write_anylabeling(classes_tif, tmp["map"], scene, options)
    if "confidence" in tmp:
        write_cog(work / "confidence.tif", tmp["confidence"], "average", options.cog_blocksize)
    if "vectors" in tmp:
        skip = [class_names.index(n) for n in options.vector_skip if n in class_names]
        vectorize_raster(classes_tif, tmp["vectors"], options.vector_block, skip + [IGNORE],
                         options.min_area_px, options.simplify_px, class_names)
    if "areas" in tmp:
        areas = scene_areas(classes_tif, counts, class_names)
        areas["scene"] = str(scene)
        tmp["areas"].write_text(json.dumps(areas, indent=2) + "\n", encoding="utf-8")
    if "style" in tmp:
        tmp["style"].write_text(qml_document(class_names), encoding="utf-8")
    if "preview" in tmp:
        write_preview(tmp["map"] if options.format == "geotiff" else classes_tif, tmp["preview"], class_names)


def infer_scene(scene: str | Path, model: str | Path, out: str | Path | None = None,
                options: InferOptions | None = None) -> InferResult:
    """Run a model bundle over a whole scene and write the map (+ optional side outputs) atomically."""
    options = options or InferOptions()
    options.check()
    scene, out, model = Path(scene), (Path(out) if out is not None else None), Path(model)
    start = time.perf_counter()
    from aerialseg.models.runtime import resolve_device  # here: the models package loads smp and timm

    with open_model(model) as bundle:
        device = resolve_device(options.device)
        predict = Predictor.from_bundle(bundle, options.backend, device, options.tta, options.labelled_only)
        mapped = map_with(scene, model, bundle, predict, out, options, options.progress)
    seconds = time.perf_counter() - start
    width, height = mapped["width"], mapped["height"]
    result = InferResult({k: str(v) for k, v in mapped["outputs"].items()}, width, height, mapped["tiles"], seconds,
                         width * height / 1e6 / max(seconds, 1e-9), mapped["scale"], options.backend, device.type)
    log.debug(result.summary())  # the CLI prints it
    return result


@dataclass
class SceneSetup:
    """A scene opened and checked for mapping (``open_scene``): its reader, outputs, tiling and model grid."""

    ds: rasterio.DatasetReader
    reader: SceneReader
    paths: dict[str, Path]
    overlap: int
    margin: int
    grid: Grid
    class_names: tuple[str, ...]


@contextmanager
def open_scene(scene: Path, model: Path, bundle: Any, out: Path | None, options: InferOptions) -> Iterator[SceneSetup]:
    """infer-scene's checks (outputs, scene, overlap, grid cap) with the scene open (infer-scene, survey blocks)."""
    with rasterio.Env(GDAL_CACHEMAX=int(options.gdal_cache_mb)), open_raster(scene) as ds:
        paths = output_paths(scene, out, options)
        check_outputs(paths, scene, model)
        reader = SceneReader(ds, scene, bundle.band_policy)
        check_scene(reader, scene, options)
        overlap = bundle.overlap if options.overlap is None else int(options.overlap)
        if not 0 <= overlap < bundle.tile_size:
            source = (model, "rebuild the bundle (aerialseg bundle) with a tile size > 0 and a smaller overlap") \
                if options.overlap is None else (None, "pass a smaller --overlap")
            raise AerialsegError(f"overlap {overlap} px must be >= 0 and below the tile size {bundle.tile_size}",
                                 *source)
        margin = overlap // 4 if options.margin_px is None else int(options.margin_px)
        grid = Grid(ds.height, ds.width, resample_scale(ds, bundle, options, scene))
        check_grid(ds.width, ds.height, grid.scale, options.max_grid_megapixels * 1e6, scene,
                   "infer.max_grid_megapixels (or pass --no-resample)")
        class_names = tuple(c["name"] for c in bundle.manifest["classes"])
        yield SceneSetup(ds, reader, paths, overlap, margin, grid, class_names)


def write_outputs(job: SceneSetup, scene: Path, options: InferOptions,
                  fill: Callable[[Path], tuple[np.ndarray, int]]) -> dict[str, Any]:
    """``fill(work)`` writes work/classes.tif (+ confidence.tif) and returns (counts, tiles); every output is made
    from them at a temp path and renamed into place; returns {outputs, width, height, tiles, scale}."""
    main = job.paths["map"]
    if options.format == "anylabeling" and options.overwrite:
        _keep_backup(main)
    with ExitStack() as stack:
        work = stack.enter_context(temp_dir(main.parent, "infer-work"))
        # the map's temp file is entered last, so an error (e.g. a full disk) is reported for the map
        tmp = {role: stack.enter_context(atomic_path(path)) for role, path in reversed(job.paths.items())}
        counts, n_tiles = fill(work)
        _finish_outputs(job.ds, scene, work, tmp, counts, options, job.class_names)
    return {"outputs": job.paths, "width": job.ds.width, "height": job.ds.height, "tiles": n_tiles,
            "scale": job.grid.scale}


def map_with(scene: Path, model: Path, bundle: Any, predict: Any, out: Path | None, options: InferOptions,
             progress: bool) -> dict[str, Any]:
    """infer-scene's checks, stitching and outputs for one scene with a loaded model (infer-scene, infer-survey);
    returns {outputs, width, height, tiles, scale}."""
    with open_scene(scene, model, bundle, out, options) as job:
        return write_outputs(job, scene, options, lambda work: predict_scene(
            job.reader, predict, bundle.num_classes, bundle.tile_size, job.overlap, job.margin, options.batch,
            job.grid, work / "classes.tif", work / "confidence.tif" if options.confidence else None,
            options.cog_blocksize, progress))
