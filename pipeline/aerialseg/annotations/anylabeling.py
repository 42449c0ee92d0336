"""AnyLabeling / X-AnyLabeling / labelme JSON: reading label files into shapes, finding their image, writing them.

- Label text is matched trimmed and case-insensitively against ``classes.labels`` (params.yaml).
- Shape types: polygon, rectangle (2 corners or X-AnyLabeling's 4 points), circle (centre + rim point),
  rotation / quadrilateral / oriented_rectangle (4-point polygons), line, linestrip, point, points, labelme
  ``mask`` (bbox corners + base64 PNG of the bbox-sized mask). cuboid has no footprint: skipped and counted.
  A shape without shape_type (legacy labelme) is a polygon.
- Bad shapes (no points, NaN/inf, |v| > 1e7 px, wrong point count for rectangle/circle/mask, unknown
  shape_type) are errors naming the file and the shape index.
  Thin and degenerate shapes are kept: they paint what the tools paint (a line, a pixel).
- ``imageData`` (and labelme ``mask`` bitmaps) above ``masks.max_image_pixels`` (150 Mpx) are refused from the
  image header, before decoding: a small JSON cannot make the process allocate gigabytes.
- The image: ``imageData`` when present, otherwise ``imagePath`` relative to the JSON, then the file name
  beside the JSON or in the images folder, then ``<json stem>.<image suffix>``. A real scene file is preferred
  for georeferencing (and must match imageData's size).
"""

import base64
import binascii
import glob
import json
import logging
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rasterio.enums import MaskFlags

from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.errors import ConfigError, InputError
from aerialseg.core.limits import check_pixels
from aerialseg.geo.raster import is_georeferenced, mask_profile, open_raster

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".gtif", ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jp2")
POLYGON_TYPES = {"polygon", "rotation", "quadrilateral", "oriented_rectangle"}
LINE_TYPES = {"line", "linestrip"}
POINT_TYPES = {"point", "points"}
SKIPPED_TYPES = {"cuboid"}
PAINTED_TYPES = POLYGON_TYPES | LINE_TYPES | POINT_TYPES | {"rectangle", "circle", "mask"}
POINT_COUNTS = {"rectangle": (2, 4), "circle": (2,), "mask": (2,)}
MAX_COORD = 1e7  # |coordinate| above this is a corrupt file, not a vertex slightly outside the image
MAX_CIRCLE_RADIUS_PX = 20_000  # Pillow's ellipse arithmetic overflows beyond ~27,000 px
CLASS_IDS: dict[str, int] = {**{name: i for i, name in enumerate(CLASS_NAMES)}, "ignore": IGNORE}
PARAMS_FIX = "add it to classes.labels in params.yaml (e.g. `car: ignore`)"
MAX_IMAGE_PIXELS = 150_000_000  # imageData / mask bitmaps above this are refused before decoding
MAX_SCENE_PIXELS = 4_000_000_000  # an image file's mask (1 byte a pixel) above this is refused (header)
ANYLABELING_FORMAT_VERSION = "2.4.0"  # the X-AnyLabeling file format written (labelme reads it too)


# --- label text -> class -------------------------------------------------------------------------

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
    raise ConfigError(f"{where}: unknown class '{name}'", "params.yaml",
                      f"use one of {', '.join(CLASS_IDS)}")


@dataclass(frozen=True)
class LabelTable:
    """Label text (normalised) -> class id."""

    mapping: dict[str, int]

    @classmethod
    def from_mapping(cls, labels: dict[Any, Any]) -> "LabelTable":
        """From ``classes.labels``: label text -> class name or id (checked)."""
        return cls({normalize_label(k): class_id(v, f"classes.labels.{k}") for k, v in labels.items()})

    def lookup(self, label: Any) -> int | None:
        return self.mapping.get(normalize_label(label))


# --- reading label files -------------------------------------------------------------------------

def find_label_files(sources: Iterable[str | Path]) -> list[Path]:
    """JSON files from files, folders (every *.json inside, not recursive) and glob patterns."""
    files: list[Path] = []
    seen: set[Path] = set()  # a set: a list lookup per file would be quadratic on thousands of files
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if _looks_like_labels(p))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(source)):
            found = sorted(Path(p) for p in glob.glob(str(source)) if Path(p).is_file())
        else:
            raise InputError("labels not found", path, "pass a JSON file, a folder of them, or a glob")
        if not found:
            raise InputError("no AnyLabeling/labelme JSON files here", path,
                             "point data.labels (or LABELS) at the folder holding the label JSON files")
        files.extend(p for p in found if not (p in seen or seen.add(p)))
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return True  # malformed: let load_label_json name the problem
    log.warning("%s: no 'shapes' list, not a label file; skipped", path)
    return False


def load_label_json(path: Path) -> dict[str, Any]:
    """Parse one label file; malformed or truncated JSON becomes one clear error."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
                         "the file is truncated or corrupt", path,
                         "re-save it from AnyLabeling or restore it from a backup") from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", path, "re-save it from AnyLabeling") from None
    except RecursionError:
        raise InputError("JSON nested too deeply to be a label file", path,
                         "re-save it from AnyLabeling or restore it from a backup") from None
    except IsADirectoryError:
        raise InputError("is a folder, a label file was expected", path, "pass the JSON files") from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", path, "check the file permissions") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise InputError("not an AnyLabeling/labelme label file (no 'shapes' list)", path,
                         "pass the JSON files AnyLabeling saved next to the images")
    for i, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict) or "label" not in shape:
            raise InputError(f"shape {i} has no 'label'", path, f"fix or delete shape {i} in AnyLabeling")
    return doc


def unknown_labels(doc: dict[str, Any], table: LabelTable) -> Counter[str]:
    """Labels of a file that the table does not map, with their counts."""
    return Counter(str(s["label"]).strip() for s in doc["shapes"] if table.lookup(s["label"]) is None)


def unknown_labels_error(unknown: dict[Path, Counter[str]]) -> InputError:
    """One error listing every unknown label of every file (a single file is named once, as the error's file)."""
    def counts(c: Counter[str]) -> str:
        return ", ".join(f"'{lbl}' ({n}x)" for lbl, n in c.most_common())

    if len(unknown) == 1:
        (path, found), = unknown.items()
        return InputError(f"unknown label(s) {counts(found)}", path,
                          "map each one to a class (or to ignore) under classes.labels in params.yaml")
    parts = "; ".join(f"{p}: {counts(c)}" for p, c in unknown.items())
    return InputError(f"unknown label(s) — {parts}", f"{len(unknown)} files",
                      "map each one to a class (or to ignore) under classes.labels in params.yaml")


# --- shapes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One shape of a label file, checked but not yet rasterised."""

    index: int  # position in the file (painting order)
    label: str
    class_id: int
    kind: str  # normalised shape_type
    points: np.ndarray  # (N, 2) float64 pixel coordinates as written
    bitmap: np.ndarray | None = None  # labelme `mask` shapes: (h, w) bool, pixel (0, 0) at int(points[0])


@dataclass
class ShapeStats:
    """What happened to the shapes of one file (reported in the index and the log)."""

    by_type: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # cuboid: no footprint
    self_intersecting: list[int] = field(default_factory=list)  # shape indices; painted with the tools' rule
    unpainted: list[int] = field(default_factory=list)  # shape indices that paint no pixel of the image

    def as_dict(self) -> dict[str, int]:
        extra = {"total": sum(self.by_type.values()), "skipped_no_area": self.skipped,
                 "self_intersecting": len(self.self_intersecting), "unpainted": len(self.unpainted)}
        return {**dict(sorted(self.by_type.items())), **extra}


def shape_kind(shape: dict[str, Any]) -> str:
    """shape_type normalised (legacy files without one hold polygons)."""
    return str(shape.get("shape_type") or "polygon").lower().replace("line_strip", "linestrip")


def _points(shape: dict[str, Any], path: Path, index: int) -> np.ndarray:
    """(N, 2) float array of a shape's vertices; rejects missing, malformed, NaN/inf or huge values."""
    raw = shape.get("points")
    name = f"shape {index} ('{shape['label']}')"
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{name} has no points", path, f"delete shape {index} in AnyLabeling or redraw it")
    try:
        pts = np.asarray([p[:2] for p in raw], dtype=np.float64)
    except (TypeError, ValueError, IndexError):
        pts = np.zeros((0, 0))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError(f"{name}: points must be [x, y] number pairs", path,
                         f"redraw shape {index} in AnyLabeling")
    if not np.isfinite(pts).all():
        raise InputError(f"{name} has NaN or infinite coordinates", path,
                         f"delete or redraw shape {index} in AnyLabeling")
    if np.abs(pts).max() > MAX_COORD:
        raise InputError(f"{name} has absurdly large coordinates (|v| up to {np.abs(pts).max():.3g} px)", path,
                         f"delete or redraw shape {index} in AnyLabeling")
    return pts


def _bitmap(shape: dict[str, Any], path: Path, index: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The binary PNG of a labelme `mask` shape."""
    try:
        raw = base64.b64decode(shape.get("mask") or "", validate=False)
        _check_pixels(raw, path, f"shape {index}'s mask", max_pixels)
        data = np.frombuffer(raw, np.uint8)
        bitmap = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    except (binascii.Error, ValueError, TypeError, cv2.error):
        bitmap = None
    if bitmap is None:
        raise InputError(f"shape {index} is a mask shape without a readable base64 PNG 'mask'", path,
                         f"redraw shape {index} in labelme")
    return bitmap > 0


def parse_shape(raw: dict[str, Any], index: int, cls_id: int, path: Path, stats: ShapeStats) -> Shape | None:
    """One checked shape, or None for a shape type without a footprint (counted)."""
    kind = shape_kind(raw)
    stats.by_type[kind] += 1
    if kind in SKIPPED_TYPES:
        stats.skipped += 1
        return None
    if kind not in PAINTED_TYPES:
        raise InputError(f"shape {index} has unsupported shape_type '{kind}'", path,
                         f"convert shape {index} to a polygon in AnyLabeling")
    pts = _points(raw, path, index)
    allowed = POINT_COUNTS.get(kind)
    if allowed and len(pts) not in allowed:
        raise InputError(f"shape {index} is a {kind} with {len(pts)} points, expected "
                         f"{' or '.join(map(str, allowed))}", path, f"redraw shape {index} in AnyLabeling")
    if kind == "circle" and np.hypot(*(pts[1] - pts[0])) > MAX_CIRCLE_RADIUS_PX:
        raise InputError(f"shape {index} is a circle of radius {np.hypot(*(pts[1] - pts[0])):.0f} px, more than "
                         f"{MAX_CIRCLE_RADIUS_PX}", path, f"redraw shape {index} as a polygon")
    bitmap = _bitmap(raw, path, index) if kind == "mask" else None
    return Shape(index, str(raw["label"]), cls_id, kind, pts, bitmap)


def parse_shapes(doc: dict[str, Any], path: Path, table: LabelTable) -> tuple[list[Shape], ShapeStats]:
    """Every shape of a label file with its class, in file order; bad shapes raise InputError."""
    stats = ShapeStats()
    shapes = []
    for i, raw in enumerate(doc["shapes"]):
        cls_id = table.lookup(raw["label"])
        if cls_id is None:
            raise InputError(f"shape {i} has unknown label '{raw['label']}'", path, PARAMS_FIX)
        shape = parse_shape(raw, i, cls_id, path, stats)
        if shape is not None:
            shapes.append(shape)
    return shapes, stats


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


def image_header_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, WEBP, BMP, GIF or TIFF, without decoding; None if unknown."""
    try:
        if raw.startswith(b"\x89PNG\r\n\x1a\n") and raw[12:16] == b"IHDR":
            return struct.unpack(">II", raw[16:24])
        if raw.startswith(b"\xff\xd8"):
            return _jpeg_size(raw)
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            return _webp_size(raw)
        if raw.startswith(b"BM"):
            w, h = struct.unpack("<ii", raw[18:26])
            return abs(w), abs(h)
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", raw[6:10])
        if raw[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(raw)
    except struct.error:
        return None
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 9 < len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack(">H", raw[pos + 2:pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", raw[pos + 5:pos + 9])
            return w, h
        pos += 2 + length
    return None


def _webp_size(raw: bytes) -> tuple[int, int] | None:
    chunk = raw[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(raw[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", raw[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_size(raw: bytes) -> tuple[int, int] | None:
    end = "<" if raw[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", raw[4:8])
    (count,) = struct.unpack(end + "H", raw[ifd:ifd + 2])
    size = {}
    for i in range(count):
        tag, kind, _, value = struct.unpack(end + "HHI4s", raw[ifd + 2 + 12 * i: ifd + 14 + 12 * i])
        if tag in (256, 257):
            size[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _check_pixels(raw: bytes, path: Path, what: str, max_pixels: int) -> None:
    """Refuse an embedded image whose header is unreadable or whose pixel count exceeds the cap, before decoding."""
    size = image_header_size(raw)
    if size is None:
        raise ValueError("unknown image header")
    check_pixels(size[0], size[1], max_pixels, path, f"{what} decoded", "masks.max_image_pixels",
                 "remove imageData and set imagePath to the image file, or raise masks.max_image_pixels")


def _decode_image_data(doc: dict[str, Any], path: Path, max_pixels: int = MAX_IMAGE_PIXELS
                       ) -> tuple[bytes, np.ndarray] | None:
    data = doc.get("imageData")
    if not data:
        return None
    try:
        raw = base64.b64decode(data, validate=False)
        _check_pixels(raw, path, "imageData", max_pixels)
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    except (binascii.Error, ValueError, TypeError, cv2.error):
        image = None
    if image is None:
        raise InputError("imageData is not a readable base64 PNG/JPEG/WEBP image", path,
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
    for key, value in (("imageWidth", w), ("imageHeight", h)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            shown = f'"{value}" (text)' if isinstance(value, str) else repr(value)
            raise InputError(f"{key} is {shown}, expected a whole number of pixels", path,
                             "re-save it from AnyLabeling (or fix the number by hand)")
    if (int(w), int(h)) != (width, height):
        raise InputError(f"imageWidth x imageHeight in the JSON is {w}x{h} but {what} is {width}x{height}",
                         path, "the labels were drawn on another image: fix imagePath or re-label")


def resolve_scene(doc: dict[str, Any], path: Path, images_dir: Path | None,
                  max_pixels: int = MAX_IMAGE_PIXELS, max_scene_pixels: float = MAX_SCENE_PIXELS) -> Scene:
    """Find and size the image of a label file; see the module docstring for the lookup order."""
    embedded = _decode_image_data(doc, path, max_pixels)
    image_file = find_image(doc, path, images_dir)
    if embedded is None and image_file is None:
        looked = f"{path.parent}" + (f" and {images_dir}" if images_dir else "")
        raise InputError(f"image not found (imagePath '{doc.get('imagePath')}', looked in {looked}) "
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
                raise InputError(f"embedded imageData is {scene.width}x{scene.height} but the image file "
                                 f"{image_file} is {ds.width}x{ds.height}", path,
                                 "re-save the JSON without imageData, or point imagePath at the right image")
            _check_size(doc, path, ds.width, ds.height, f"the image {image_file}")
            check_pixels(ds.width, ds.height, max_scene_pixels, image_file, "the scene's mask",
                         "masks.max_scene_megapixels")
            scene.width, scene.height, scene.path = ds.width, ds.height, image_file
            scene.needs_valid_mask = not all(MaskFlags.all_valid in f for f in ds.mask_flag_enums)
            if is_georeferenced(ds):
                scene.profile = mask_profile(ds)
    return scene


# --- writing label files -------------------------------------------------------------------------

def anylabeling_document(shapes: list[dict[str, Any]], image_path: str, width: int, height: int) -> dict[str, Any]:
    """A complete AnyLabeling label file (imageData null, imagePath relative to the JSON)."""
    return {"version": ANYLABELING_FORMAT_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": None, "imageHeight": int(height), "imageWidth": int(width)}


def dumps_label_json(doc: dict[str, Any]) -> str:
    """JSON text with one shape per line: readable, diff-friendly and a fraction of indent=2's size."""
    head = {k: v for k, v in doc.items() if k != "shapes"}
    shapes = ",\n".join("    " + json.dumps(s, ensure_ascii=False, separators=(",", ":")) for s in doc["shapes"])
    body = json.dumps(head, indent=2, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    return f'{body},\n  "shapes": [\n{shapes}\n  ]\n}}\n' if shapes else f'{body},\n  "shapes": []\n}}\n'
