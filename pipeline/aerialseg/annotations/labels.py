"""masks stage (label-to-mask): AnyLabeling / X-AnyLabeling / labelme JSON -> 5-class masks.

Conventions (also in the README):
- Label coordinates are pixel coordinates of the image: pixel (col, row) covers [col, col+1) x [row, row+1).
  Shapes are rasterised with ``rasterio.features.rasterize`` under an identity transform. Pixel-centre rule
  (``masks.all_touched: false``, the default): a pixel takes a shape's class when its centre
  (col + 0.5, row + 0.5) lies inside the shape. ``all_touched: true``: every pixel the shape touches.
- Unlabelled pixels are background (0). Shapes paint in file order, later over earlier (how labellers cut
  holes); ``masks.priority`` (class names, later wins) overrides file order, file order breaking ties.
- Area shapes: polygon, rectangle (2 corners or 4 points), circle (centre + rim point), rotation,
  quadrilateral, oriented_rectangle, labelme ``mask`` (bbox corners + base64 PNG of the bbox-sized mask).
  line / linestrip are buffered to ``masks.line_width_px`` (round caps and joins). point / points / cuboid
  cover no area: skipped and counted. A JSON without shape_type (legacy labelme) means polygon.
- Self-intersecting polygons are repaired with shapely ``make_valid`` and counted (never dropped silently).
  Vertices outside the image are clipped to it; a shape wholly outside is skipped with a warning.
- Bad shapes: NaN/inf or absurdly large coordinates (|v| > 1e7 px), missing/empty ``points``, a wrong number
  of points for rectangle/circle/mask, or an unknown shape_type are errors naming the file and the shape
  index. Degenerate but well-formed shapes (a polygon with < 3 distinct vertices or zero area, a zero-size
  rectangle or circle, a zero-length line) cover no pixel: they are skipped with a warning and counted.
- The image: ``imageData`` (decoded with OpenCV) when present, otherwise ``imagePath`` resolved relative to
  the JSON, then by file name next to the JSON or in the images folder, then ``<json stem>.<image suffix>``.
  A real scene file found by ``imagePath`` is preferred for georeferencing (and must match imageData's
  size). An image known only from imageData is extracted unchanged to ``<out>/<stem>.scene.<ext>``.
- Output: a georeferenced scene gives ``<out>/<json stem>.tif`` on the scene's grid (CRS, transform, class
  colour table, nodata 255); anything else (incl. a TIFF without georeferencing, with a warning) gives a
  plain 8-bit PNG of class ids ``<out>/<json stem>.png``. Nodata/alpha areas of the scene are 255 in both.
  ``<out>/index.json`` lists every scene for the tiles stage. All-or-nothing: on an error no mask is left.
"""

import base64
import binascii
import glob
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.windows import Window
from shapely.geometry import LineString, Point, Polygon, box
from shapely.geometry.base import BaseGeometry
from tqdm import tqdm

from aerialseg.core.classes import CLASS_NAMES, IGNORE, colormap
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.core.config import section
from aerialseg.geo.raster import is_georeferenced, mask_profile, open_raster, valid_mask, write_class_geotiff

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".gtif", ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jp2")
AREA_TYPES = {"polygon", "rectangle", "circle", "rotation", "quadrilateral", "oriented_rectangle", "mask"}
LINE_TYPES = {"line", "linestrip"}
SKIPPED_TYPES = {"point", "points", "cuboid"}
MAX_COORD = 1e7  # |coordinate| above this is a corrupt file, not a vertex slightly outside the image
CIRCLE_TOLERANCE_PX = 0.25  # max gap between a circle and its polygon approximation
CLASS_IDS: dict[str, int] = {**{name: i for i, name in enumerate(CLASS_NAMES)}, "ignore": IGNORE}
PARAMS_FIX = "add it to classes.labels in params.yaml (e.g. `car: ignore`)"


# --- options -------------------------------------------------------------------------------------

def normalize_label(label: Any) -> str:
    """Label text as matched against the table: trimmed, lower-case."""
    return str(label).strip().lower()


def class_id(name: Any, where: str) -> int:
    """Class name (background|road|water|tree|building|ignore) or id -> id."""
    key = normalize_label(name)
    if key in CLASS_IDS:
        return CLASS_IDS[key]
    if key.isdigit() and int(key) in CLASS_IDS.values():
        return int(key)
    raise AerialsegError(f"{where}: unknown class '{name}'", "params.yaml",
                         f"use one of {', '.join(CLASS_IDS)}")


@dataclass(frozen=True)
class LabelTable:
    """Label text (normalised) -> class id."""

    mapping: dict[str, int]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "LabelTable":
        raw = section(params, "classes").get("labels") or {}
        if not isinstance(raw, dict):
            raise AerialsegError("classes.labels must be a mapping label -> class", "params.yaml")
        return cls({normalize_label(k): class_id(v, f"classes.labels.{k}") for k, v in raw.items()})

    def lookup(self, label: Any) -> int | None:
        return self.mapping.get(normalize_label(label))


@dataclass(frozen=True)
class MaskOptions:
    """How shapes become pixels (params.yaml `masks`)."""

    line_width_px: float = 5.0
    priority: tuple[int, ...] = ()  # class ids, later in the tuple wins
    all_touched: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MaskOptions":
        cfg = section(params, "masks")
        width = cfg.get("line_width_px", 5)
        if not isinstance(width, int | float) or isinstance(width, bool) or not 0 < width < 1000:
            raise AerialsegError(f"masks.line_width_px must be a positive number, got {width!r}", "params.yaml")
        priority = tuple(class_id(n, "masks.priority") for n in (cfg.get("priority") or []))
        return cls(float(width), priority, bool(cfg.get("all_touched", False)))

    def rank(self, cls_id: int) -> int:
        """Painting rank of a class: listed classes by position, unlisted ones first (-1)."""
        return self.priority.index(cls_id) if cls_id in self.priority else -1


# --- reading label files -------------------------------------------------------------------------

def find_label_files(sources: Iterable[str | Path]) -> list[Path]:
    """JSON files from files, folders (every *.json inside, not recursive) and glob patterns."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if _looks_like_labels(p))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(source)):
            found = sorted(Path(p) for p in glob.glob(str(source)) if Path(p).is_file())
        else:
            raise AerialsegError("labels not found", path, "pass a JSON file, a folder of them, or a glob")
        if not found:
            raise AerialsegError("no AnyLabeling/labelme JSON files here", path,
                                 "point data.labels (or LABELS) at the folder holding the label JSON files")
        files.extend(p for p in found if p not in files)
    return files


def _looks_like_labels(path: Path) -> bool:
    """In a folder, skip (with a warning) JSON that parses but is clearly no label file (e.g. a colour map)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return True  # load_label_json reports it
    if b'"shapes"' in raw:
        return True
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # malformed: let load_label_json name the problem
    log.warning("%s: no 'shapes' list, not a label file; skipped", path)
    return False


def load_label_json(path: Path) -> dict[str, Any]:
    """Parse one label file; malformed or truncated JSON becomes one clear error."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise AerialsegError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
                             "the file is truncated or corrupt", path,
                             "re-save it from AnyLabeling or restore it from a backup") from None
    except UnicodeDecodeError:
        raise AerialsegError("not UTF-8 text", path, "re-save it from AnyLabeling") from None
    except OSError as exc:
        raise AerialsegError(f"cannot read ({exc.strerror})", path, "check the file permissions") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise AerialsegError("not an AnyLabeling/labelme label file (no 'shapes' list)", path,
                             "pass the JSON files AnyLabeling saved next to the images")
    for i, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict) or "label" not in shape:
            raise AerialsegError(f"shape {i} has no 'label'", path, f"fix or delete shape {i} in AnyLabeling")
    return doc


def unknown_labels(doc: dict[str, Any], table: LabelTable) -> Counter[str]:
    """Labels of a file that the table does not map, with their counts."""
    return Counter(str(s["label"]).strip() for s in doc["shapes"] if table.lookup(s["label"]) is None)


def unknown_labels_error(unknown: dict[Path, Counter[str]]) -> AerialsegError:
    """One error listing every unknown label of every file."""
    parts = [f"{p}: " + ", ".join(f"'{lbl}' ({n}x)" for lbl, n in c.most_common()) for p, c in unknown.items()]
    where = next(iter(unknown)) if len(unknown) == 1 else f"{len(unknown)} files"
    return AerialsegError(f"unknown label(s) — {'; '.join(parts)}", where,
                          "map each one to a class (or to ignore) under classes.labels in params.yaml")


# --- shapes -> geometries ------------------------------------------------------------------------

@dataclass
class ShapeStats:
    """What happened to the shapes of one file (reported in the index and the log)."""

    by_type: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # point / points / cuboid
    degenerate: int = 0
    repaired: int = 0
    clipped: int = 0
    outside: int = 0

    def as_dict(self) -> dict[str, int]:
        extra = {"total": sum(self.by_type.values()), "skipped_no_area": self.skipped,
                 "degenerate": self.degenerate, "repaired": self.repaired, "clipped": self.clipped,
                 "outside": self.outside}
        return {**dict(sorted(self.by_type.items())), **extra}


def _points(shape: dict[str, Any], path: Path, index: int) -> np.ndarray:
    """(N, 2) float array of a shape's vertices; rejects missing, malformed, NaN/inf or huge values."""
    raw = shape.get("points")
    if not isinstance(raw, list) or not raw:
        raise AerialsegError(f"shape {index} ('{shape['label']}') has no points", path,
                             f"delete shape {index} in AnyLabeling or redraw it")
    try:
        pts = np.asarray([p[:2] for p in raw], dtype=np.float64)
    except (TypeError, ValueError, IndexError):
        raise AerialsegError(f"shape {index} ('{shape['label']}'): points must be [x, y] number pairs", path,
                             f"redraw shape {index} in AnyLabeling") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise AerialsegError(f"shape {index} ('{shape['label']}'): points must be [x, y] number pairs", path,
                             f"redraw shape {index} in AnyLabeling")
    if not np.isfinite(pts).all():
        raise AerialsegError(f"shape {index} ('{shape['label']}') has NaN or infinite coordinates", path,
                             f"delete or redraw shape {index} in AnyLabeling")
    if np.abs(pts).max() > MAX_COORD:
        raise AerialsegError(f"shape {index} ('{shape['label']}') has absurdly large coordinates "
                             f"(|v| up to {np.abs(pts).max():.3g} px)", path,
                             f"delete or redraw shape {index} in AnyLabeling")
    return pts


def _need(n: int, allowed: tuple[int, ...], kind: str, path: Path, index: int) -> None:
    if n not in allowed:
        raise AerialsegError(f"shape {index} is a {kind} with {n} points, expected "
                             f"{' or '.join(map(str, allowed))}", path, f"redraw shape {index} in AnyLabeling")


def _circle(pts: np.ndarray) -> BaseGeometry:
    (cx, cy), (px, py) = pts
    radius = math.hypot(px - cx, py - cy)
    if radius == 0:
        return Polygon()
    step = math.acos(max(-1.0, 1 - CIRCLE_TOLERANCE_PX / radius))  # angle per segment for the tolerance
    quad_segs = int(min(256, max(8, math.ceil(math.pi / 2 / step))))
    return Point(cx, cy).buffer(radius, quad_segs=quad_segs)


def _mask_shape(shape: dict[str, Any], pts: np.ndarray, path: Path, index: int) -> BaseGeometry:
    """labelme `mask`: a binary PNG whose pixel (0, 0) is image pixel (int(x1), int(y1))."""
    try:
        data = np.frombuffer(base64.b64decode(shape.get("mask") or "", validate=False), np.uint8)
        mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    except (binascii.Error, ValueError):
        mask = None
    if mask is None:
        raise AerialsegError(f"shape {index} is a mask shape without a readable base64 PNG 'mask'", path,
                             f"redraw shape {index} in labelme")
    x1, y1 = np.floor(pts.min(axis=0)).astype(int)
    binary = (mask > 0).astype(np.uint8)
    parts = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(
        binary, mask=binary > 0, transform=Affine.translation(float(x1), float(y1))) if v == 1]
    return shapely.union_all(parts) if parts else Polygon()


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the area-covering parts of a geometry (make_valid can return lines and points too)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else Polygon()


def shape_geometry(shape: dict[str, Any], path: Path, index: int, line_width_px: float,
                   stats: ShapeStats) -> BaseGeometry | None:
    """A shape in pixel coordinates as a (Multi)Polygon, or None when it covers no area."""
    kind = str(shape.get("shape_type") or "polygon").lower().replace("line_strip", "linestrip")
    stats.by_type[kind] += 1
    if kind in SKIPPED_TYPES:
        stats.skipped += 1
        return None
    if kind not in AREA_TYPES | LINE_TYPES:
        raise AerialsegError(f"shape {index} has unsupported shape_type '{kind}'", path,
                             f"convert shape {index} to a polygon in AnyLabeling")
    pts = _points(shape, path, index)
    if kind == "rectangle":
        _need(len(pts), (2, 4), kind, path, index)
        geom = box(*pts.min(axis=0), *pts.max(axis=0)) if len(pts) == 2 else Polygon(pts)
    elif kind == "circle":
        _need(len(pts), (2,), kind, path, index)
        geom = _circle(pts)
    elif kind == "mask":
        _need(len(pts), (2,), kind, path, index)
        geom = _mask_shape(shape, pts, path, index)
    elif kind in LINE_TYPES:
        line = LineString(pts) if len(pts) >= 2 else LineString()
        geom = line.buffer(line_width_px / 2, quad_segs=4) if line.length > 0 else Polygon()
    else:
        geom = Polygon(pts) if len(pts) >= 3 else Polygon()
    if not geom.is_empty and not geom.is_valid:  # self-intersecting (or degenerate: then empty below)
        geom = _polygonal(shapely.make_valid(geom))
        stats.repaired += int(geom.area > 0)
    if geom.is_empty or geom.area == 0:
        stats.degenerate += 1
        log.warning("%s: shape %d ('%s', %s) covers no area; skipped", path, index, shape["label"], kind)
        return None
    return geom


def clip_to_image(geom: BaseGeometry, width: int, height: int, stats: ShapeStats) -> BaseGeometry | None:
    """Clip a geometry to the image rectangle; None when nothing is left."""
    minx, miny, maxx, maxy = geom.bounds
    if minx >= 0 and miny >= 0 and maxx <= width and maxy <= height:
        return geom
    stats.clipped += 1
    clipped = _polygonal(geom.intersection(box(0, 0, width, height)))
    if clipped.is_empty or clipped.area == 0:
        stats.outside += 1
        return None
    return clipped


@dataclass
class LabelledShape:
    """One area-covering shape ready to burn."""

    order: int
    class_id: int
    geometry: BaseGeometry


def parse_shapes(doc: dict[str, Any], path: Path, table: LabelTable, width: int, height: int,
                 options: MaskOptions) -> tuple[list[LabelledShape], ShapeStats]:
    """Every area shape of a label file as a clipped pixel-space geometry with its class."""
    stats = ShapeStats()
    shapes = []
    for i, raw in enumerate(doc["shapes"]):
        cls_id = table.lookup(raw["label"])
        if cls_id is None:
            raise AerialsegError(f"shape {i} has unknown label '{raw['label']}'", path, PARAMS_FIX)
        geom = shape_geometry(raw, path, i, options.line_width_px, stats)
        if geom is not None:
            geom = clip_to_image(geom, width, height, stats)
        if geom is not None:
            shapes.append(LabelledShape(i, cls_id, geom))
    return shapes, stats


def rasterize_shapes(shapes: Sequence[LabelledShape], width: int, height: int,
                     options: MaskOptions) -> np.ndarray:
    """Burn shapes into a (H, W) uint8 mask (fill 0 = background) in painting order, one GDAL call."""
    ordered = sorted(shapes, key=lambda s: (options.rank(s.class_id), s.order))
    if not ordered:
        return np.zeros((height, width), np.uint8)
    return rasterio.features.rasterize(
        [(s.geometry, s.class_id) for s in ordered], out_shape=(height, width), fill=0,
        transform=Affine.identity(), all_touched=options.all_touched, dtype="uint8")


# --- the image behind a label file ---------------------------------------------------------------

@dataclass
class Scene:
    """The image a label file belongs to: size, where its pixels are, how to georeference the mask."""

    width: int
    height: int
    path: Path | None = None  # a real image file (None: only imageData)
    embedded: bytes | None = None  # raw imageData bytes, kept only when there is no file
    embedded_valid: np.ndarray | None = None  # alpha > 0 of an embedded RGBA image
    profile: dict[str, Any] | None = None  # GeoTIFF mask profile when the file is georeferenced
    needs_valid_mask: bool = False  # the file has nodata or alpha

    @property
    def georeferenced(self) -> bool:
        return self.profile is not None


def _decode_image_data(doc: dict[str, Any], path: Path) -> tuple[bytes, np.ndarray] | None:
    data = doc.get("imageData")
    if not data:
        return None
    try:
        raw = base64.b64decode(data, validate=False)
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    except (binascii.Error, ValueError, TypeError, cv2.error):
        image = None
    if image is None:
        raise AerialsegError("imageData is not a readable base64 PNG/JPEG/WEBP image", path,
                             "re-save the JSON from AnyLabeling (or remove imageData and set imagePath)")
    return raw, image


def _candidates(doc: dict[str, Any], path: Path, images_dir: Path | None) -> list[Path]:
    raw = str(doc.get("imagePath") or "").replace("\\", "/")
    folders = [path.parent] + ([images_dir] if images_dir else [])
    found: list[Path] = []
    if raw:
        found.append(Path(raw) if Path(raw).is_absolute() else path.parent / raw)
        found += [folder / Path(raw).name for folder in folders]
    found += [folder / f"{path.stem}{sfx}" for folder in folders for sfx in IMAGE_SUFFIXES]
    return found


def find_image(doc: dict[str, Any], path: Path, images_dir: Path | None) -> Path | None:
    """First existing image file the label file points at (None when none is found)."""
    for cand in _candidates(doc, path, images_dir):
        if cand.suffix.lower() in IMAGE_SUFFIXES and cand.is_file():
            return cand
    return None


def _check_size(doc: dict[str, Any], path: Path, width: int, height: int, what: str) -> None:
    w, h = doc.get("imageWidth"), doc.get("imageHeight")
    if w is None and h is None:
        return
    if (w, h) != (width, height):
        raise AerialsegError(f"imageWidth x imageHeight in the JSON is {w}x{h} but {what} is {width}x{height}",
                             path, "the labels were drawn on another image: fix imagePath or re-label")


def resolve_scene(doc: dict[str, Any], path: Path, images_dir: Path | None) -> Scene:
    """Find and size the image of a label file; see the module docstring for the lookup order."""
    embedded = _decode_image_data(doc, path)
    image_file = find_image(doc, path, images_dir)
    if embedded is None and image_file is None:
        looked = f"{path.parent}" + (f" and {images_dir}" if images_dir else "")
        raise AerialsegError(f"image not found (imagePath '{doc.get('imagePath')}', looked in {looked}) "
                             "and no imageData", path,
                             "put the image next to the JSON, fix imagePath, or pass --images DIR (data.images)")
    scene = Scene(0, 0)
    if embedded is not None:
        raw, image = embedded
        scene.height, scene.width = image.shape[:2]
        _check_size(doc, path, scene.width, scene.height, "the embedded imageData")
        if image.ndim == 3 and image.shape[2] == 4 and (image[..., 3] == 0).any():
            scene.embedded_valid = image[..., 3] > 0
        if image_file is None:
            scene.embedded = raw
    if image_file is not None:
        with open_raster(image_file) as ds:
            if embedded is not None and (ds.width, ds.height) != (scene.width, scene.height):
                raise AerialsegError(f"embedded imageData is {scene.width}x{scene.height} but the image file "
                                     f"{image_file} is {ds.width}x{ds.height}", path,
                                     "re-save the JSON without imageData, or point imagePath at the right image")
            _check_size(doc, path, ds.width, ds.height, f"the image {image_file}")
            scene.width, scene.height, scene.path = ds.width, ds.height, image_file
            scene.needs_valid_mask = not all(MaskFlags.all_valid in f for f in ds.mask_flag_enums)
            if is_georeferenced(ds):
                scene.profile = mask_profile(ds)
    return scene


def apply_valid_mask(mask: np.ndarray, scene: Scene, rows_per_read: int = 1024) -> None:
    """Set nodata/alpha pixels of the scene to ignore, reading the scene's mask strip by strip."""
    if scene.embedded_valid is not None:
        mask[~scene.embedded_valid] = IGNORE
    if scene.path is None or not scene.needs_valid_mask:
        return
    with open_raster(scene.path) as ds:
        block_h = ds.block_shapes[0][0] if ds.block_shapes else 1
        step = max(block_h, rows_per_read // block_h * block_h)
        for row in range(0, ds.height, step):
            win = Window(0, row, ds.width, min(step, ds.height - row))
            try:
                valid = valid_mask(ds, win)
            except RasterioError as exc:
                raise AerialsegError(f"cannot read pixel data ({str(exc).splitlines()[0][:100]})", scene.path,
                                     "re-export the scene; the file is corrupt or truncated") from None
            mask[row:row + win.height][~valid] = IGNORE


# --- one file, many files ------------------------------------------------------------------------

def _display(path: Path) -> str:
    """A path relative to the working directory when under it (a portable index), else absolute."""
    full, cwd = path.resolve(), Path.cwd().resolve()
    return full.relative_to(cwd).as_posix() if full.is_relative_to(cwd) else str(full)


def _image_suffix(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return ".png"
    if raw.startswith(b"\xff\xd8"):
        return ".jpg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return ".webp"
    if raw[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".bmp" if raw.startswith(b"BM") else ".png"


def mask_path_for(label_file: Path, out_dir: Path, scene: Scene) -> Path:
    return out_dir / f"{label_file.stem}{'.tif' if scene.georeferenced else '.png'}"


def write_mask(dest: Path, mask: np.ndarray, scene: Scene) -> None:
    """GeoTIFF on the scene grid when georeferenced, else an 8-bit PNG of class ids (atomic)."""
    if scene.profile is not None:
        write_class_geotiff(dest, mask, scene.profile, colormap())
        return
    with atomic_path(dest) as tmp:
        if not cv2.imwrite(str(tmp), mask):
            raise AerialsegError("cannot write the mask PNG", dest, "check free disk space and permissions")


def convert_file(label_file: Path, scene: Scene, out_dir: Path, table: LabelTable,
                 options: MaskOptions, written: list[Path]) -> dict[str, Any]:
    """Rasterise one label file; return its index entry (paths written are appended to `written`)."""
    doc = load_label_json(label_file)
    shapes, stats = parse_shapes(doc, label_file, table, scene.width, scene.height, options)
    mask = rasterize_shapes(shapes, scene.width, scene.height, options)
    apply_valid_mask(mask, scene)
    dest = mask_path_for(label_file, out_dir, scene)
    if scene.path is None:
        scene_path = out_dir / f"{label_file.stem}.scene{_image_suffix(scene.embedded or b'')}"
        with atomic_path(scene_path) as tmp:
            tmp.write_bytes(scene.embedded or b"")
        written.append(scene_path)
    else:
        scene_path = scene.path
        if scene.profile is None and scene.path.suffix.lower() in (".tif", ".tiff", ".gtif"):
            log.warning("%s: scene is not georeferenced; mask written as PNG", scene.path)
    write_mask(dest, mask, scene)
    written.append(dest)
    _log_stats(label_file, stats)
    counts = np.bincount(mask.ravel(), minlength=256)
    class_pixels = {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)} | {"ignore": int(counts[IGNORE])}
    return {"scene": _display(scene_path), "mask": _display(dest), "labels": _display(label_file),
            "georeferenced": scene.georeferenced, "width": scene.width, "height": scene.height,
            "shape_counts": stats.as_dict(), "class_pixels": class_pixels}


def _log_stats(path: Path, stats: ShapeStats) -> None:
    if stats.skipped:
        log.info("%s: skipped %d point/points/cuboid shape(s) (no area)", path, stats.skipped)
    if stats.repaired:
        log.warning("%s: repaired %d self-intersecting shape(s) with make_valid", path, stats.repaired)
    if stats.outside:
        log.warning("%s: %d shape(s) lie wholly outside the image; skipped", path, stats.outside)


def labels_to_masks(sources: Iterable[str | Path], out_dir: str | Path, table: LabelTable,
                    options: MaskOptions = MaskOptions(), images_dir: str | Path | None = None) -> list[Path]:
    """Convert every label file to a mask in out_dir and write out_dir/index.json; return the mask paths.

    Everything is checked (JSON, labels, images, sizes, geometry) before the first file is written,
    and a failure later removes what this run wrote.
    """
    out_dir = Path(out_dir)
    images_dir = Path(images_dir) if images_dir else None
    files = find_label_files(sources)
    scenes, unknown = [], {}
    for label_file in files:
        doc = load_label_json(label_file)
        if missing := unknown_labels(doc, table):
            unknown[label_file] = missing
            continue
        scene = resolve_scene(doc, label_file, images_dir)
        parse_shapes(doc, label_file, table, scene.width, scene.height, options)  # validate only
        scenes.append(scene)
    if unknown:
        raise unknown_labels_error(unknown)
    _check_unique_outputs(files, scenes, out_dir)
    written: list[Path] = []
    try:
        entries = [convert_file(f, s, out_dir, table, options, written)
                   for f, s in tqdm(list(zip(files, scenes)), desc="label-to-mask", unit="file", disable=None)]
        write_json(out_dir / "index.json", entries)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    n_shapes = sum(e["shape_counts"]["total"] for e in entries)
    log.info("label-to-mask: %d file(s), %d shape(s) -> %s", len(files), n_shapes, out_dir)
    return [Path(e["mask"]) for e in entries]


def _check_unique_outputs(files: Sequence[Path], scenes: Sequence[Scene], out_dir: Path) -> None:
    seen: dict[Path, Path] = {}
    for label_file, scene in zip(files, scenes):
        dest = mask_path_for(label_file, out_dir, scene).with_suffix("")
        if dest in seen:
            raise AerialsegError(f"same file name as {seen[dest]}: both would write {dest}.*", label_file,
                                 "give the label files unique names (masks are named after them)")
        seen[dest] = label_file


def masks_stage(params: dict[str, Any], labels: Sequence[str | Path] | None = None,
                out: str | Path | None = None, images: str | Path | None = None) -> list[Path]:
    """DVC stage `masks`: params data.labels -> masks.out (+ index.json); arguments override params."""
    data = section(params, "data")
    configured = data.get("labels") or "data/labels"
    sources = list(labels) if labels else (configured if isinstance(configured, list) else [configured])
    out_dir = out or section(params, "masks").get("out", "data/masks")
    return labels_to_masks(sources, out_dir, LabelTable.from_params(params), MaskOptions.from_params(params),
                           images or data.get("images"))
