"""Shapes -> class mask, painted the way the annotation tools paint them (docs/labels.md has pictures).

``masks.vertex_convention: center`` (default), the annotation tools' rule: a vertex (x, y) is the centre of
pixel (int(x), int(y)), and a shape paints every pixel its filled outline covers. Shapes are drawn with
Pillow's ImageDraw, exactly as labelme's ``shape_to_mask`` draws them: polygons (also rotation, quadrilateral,
oriented_rectangle and 4-point rectangles) with ``polygon`` (vertices truncated to integers, boundary pixels
included, even-odd rule for self-intersections), 2-point rectangles with ``rectangle``, circles (centre + rim
point) and points (radius ``masks.point_radius_px``) with ``ellipse``, lines and linestrips with ``line`` of
width ``masks.line_width_px``. For polygons whose vertices sit on pixel centres (what X-AnyLabeling and
``aerialseg mask-to-label`` write) this is also exactly X-AnyLabeling's mask export (``int()`` + cv2.fillPoly).
Thin shapes paint their pixels: a 1-px-wide polygon its line, a zero-size rectangle or a 1-point polygon
its pixel (a circle of radius 0 paints nothing, as in labelme; it is reported).

``masks.vertex_convention: corner``, the GIS rule of earlier aerialseg versions: pixel (col, row) covers
[col, col+1) x [row, row+1) and takes a shape's class when its centre (col + 0.5, row + 0.5) lies inside the
shape (``masks.all_touched: true``: every pixel the shape touches), rasterised with rasterio; self-intersecting
polygons go through shapely ``make_valid`` first.

Both: shapes paint in file order, later over earlier (how labellers cut holes); ``masks.priority`` (class
names, later wins) overrides file order, file order breaking ties. Unlabelled pixels are background (0).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from PIL import Image, ImageDraw
from shapely.geometry import LineString, MultiPoint, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from aerialseg.annotations.anylabeling import LINE_TYPES, POINT_TYPES, POLYGON_TYPES, Shape

CONVENTIONS = ("center", "corner")
CIRCLE_TOLERANCE_PX = 0.25  # corner rule: max gap between a circle and its polygon


@dataclass(frozen=True)
class MaskOptions:
    """How shapes become pixels (params.yaml `masks`)."""

    line_width_px: int = 5
    point_radius_px: int = 5
    priority: tuple[int, ...] = ()  # class ids, later in the tuple wins
    vertex_convention: str = "center"
    all_touched: bool = False  # corner convention only

    def rank(self, cls_id: int) -> int:
        """Painting rank of a class: listed classes by position, unlisted ones first (-1)."""
        return self.priority.index(cls_id) if cls_id in self.priority else -1


def painting_order(shapes: Sequence[Shape], options: MaskOptions) -> list[Shape]:
    """Shapes in the order they are painted (later over earlier)."""
    return sorted(shapes, key=lambda s: (options.rank(s.class_id), s.index))


def rasterize_shapes(shapes: Sequence[Shape], width: int, height: int,
                     options: MaskOptions = MaskOptions()) -> np.ndarray:
    """Paint shapes into a (H, W) uint8 class mask (fill 0 = background)."""
    ordered = painting_order(shapes, options)
    if options.vertex_convention == "corner":
        return _rasterize_corner(ordered, width, height, options)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for shape in ordered:
        _draw(draw, image, shape, options)
    return np.array(image)


# --- the annotation tools' rule (pixel centres) --------------------------------------------------

def _draw(draw: ImageDraw.ImageDraw, image: Image.Image, shape: Shape, options: MaskOptions) -> None:
    """Draw one shape with the Pillow call labelme's shape_to_mask makes for its type."""
    pts, ink, kind = shape.points, shape.class_id, shape.kind
    if kind in POLYGON_TYPES or (kind == "rectangle" and len(pts) == 4):
        draw.polygon(_flat(pts if len(pts) > 1 else np.repeat(pts, 2, axis=0)), fill=ink)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = pts
        draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=ink)
    elif kind == "circle":
        (cx, cy), (px, py) = pts
        radius = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)  # as labelme computes it
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=ink)
    elif kind in LINE_TYPES:
        draw.line(_flat(pts if len(pts) > 1 else np.repeat(pts, 2, axis=0)), fill=ink, width=options.line_width_px)
    elif kind in POINT_TYPES:
        r = options.point_radius_px
        for x, y in pts:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    elif kind == "mask" and shape.bitmap is not None:
        x, y = (int(v) for v in pts[0])  # labelme: points.astype(int), the mask's top-left pixel
        h, w = shape.bitmap.shape
        image.paste(ink, (x, y, x + w, y + h), Image.fromarray(shape.bitmap.astype(np.uint8) * 255))


def _flat(pts: np.ndarray) -> list[float]:
    return pts.ravel().tolist()


def shape_bounds(shape: Shape, options: MaskOptions) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the pixels a shape can paint, in pixel-centre coordinates."""
    pts = shape.points
    if shape.kind == "circle":
        (cx, cy), (px, py) = pts
        r = math.hypot(cx - px, cy - py)
        return cx - r, cy - r, cx + r, cy + r
    pad = {**dict.fromkeys(LINE_TYPES, options.line_width_px / 2 + 1),
           **dict.fromkeys(POINT_TYPES, options.point_radius_px)}.get(shape.kind, 0.0)
    (x0, y0), (x1, y1) = pts.min(axis=0) - pad, pts.max(axis=0) + pad
    if shape.kind == "mask" and shape.bitmap is not None:
        x1, y1 = int(pts[0, 0]) + shape.bitmap.shape[1] - 1, int(pts[0, 1]) + shape.bitmap.shape[0] - 1
    return x0, y0, x1, y1


def unpainted_shapes(shapes: Sequence[Shape], width: int, height: int, options: MaskOptions) -> list[int]:
    """Indices of shapes that paint nothing: wholly outside the image, or (tools' rule) a circle whose box
    truncates to a single point (Pillow, hence labelme, draws nothing for it)."""
    low = 0.0 if options.vertex_convention == "corner" else -1.0  # int() truncates (-1, 0) to column 0
    unpainted = []
    for shape in shapes:
        x0, y0, x1, y1 = shape_bounds(shape, options)
        dot = shape.kind == "circle" and int(x0) == int(x1) and int(y0) == int(y1)
        if x1 <= low or y1 <= low or x0 >= width or y0 >= height or (dot and options.vertex_convention == "center"):
            unpainted.append(shape.index)
    return unpainted


def self_intersecting(shapes: Sequence[Shape]) -> list[int]:
    """Indices of polygons whose outline crosses itself (touching or doubling back is not crossing).

    Such polygons are painted with the even-odd rule, as the tools paint (and display) them.
    """
    rings = [s for s in shapes if (s.kind in POLYGON_TYPES or s.kind == "rectangle") and len(s.points) >= 4]
    if not rings:
        return []
    counts = np.array([len(s.points) + 1 for s in rings])
    coords = np.concatenate([np.r_[s.points, s.points[:1]] for s in rings])
    polys = shapely.polygons(shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), counts)))
    reasons = shapely.is_valid_reason(polys).astype(str)
    suspects = [rings[i] for i in np.flatnonzero(np.char.startswith(reasons, "Self-intersection"))]
    return [s.index for s in suspects if _crosses_itself(s.points)]


def _crosses_itself(points: np.ndarray) -> bool:
    """Whether two edges of a closed ring cross at a point inside both (GEOS `crosses`)."""
    segments = shapely.linestrings(np.stack([points, np.roll(points, -1, axis=0)], axis=1))
    pairs = shapely.STRtree(segments).query(segments, predicate="crosses")
    return pairs.shape[1] > 0


# --- the GIS rule (pixel corners) ----------------------------------------------------------------

def _rasterize_corner(ordered: Sequence[Shape], width: int, height: int, options: MaskOptions) -> np.ndarray:
    burns = []
    for shape in ordered:
        geom = _clip(corner_geometry(shape, options), width, height)
        if not geom.is_empty and geom.area > 0:
            burns.append((geom, shape.class_id))
    if not burns:
        return np.zeros((height, width), np.uint8)
    return rasterio.features.rasterize(burns, out_shape=(height, width), fill=0, transform=Affine.identity(),
                                       all_touched=options.all_touched, dtype="uint8")


def corner_geometry(shape: Shape, options: MaskOptions) -> BaseGeometry:
    """A shape as a (Multi)Polygon in pixel-corner coordinates (empty when it covers no area)."""
    pts, kind = shape.points, shape.kind
    if kind == "rectangle" and len(pts) == 2:
        geom: BaseGeometry = box(*pts.min(axis=0), *pts.max(axis=0))
    elif kind == "circle":
        geom = _circle(pts)
    elif kind in LINE_TYPES:
        line = LineString(pts) if len(pts) >= 2 else LineString()
        geom = line.buffer(options.line_width_px / 2, quad_segs=4) if line.length > 0 else Polygon()
    elif kind in POINT_TYPES:
        geom = MultiPoint(pts).buffer(options.point_radius_px) if options.point_radius_px else Polygon()
    elif kind == "mask" and shape.bitmap is not None:
        geom = _bitmap_geometry(shape)
    else:
        geom = Polygon(pts) if len(pts) >= 3 else Polygon()
    if not geom.is_empty and not geom.is_valid:
        geom = _polygonal(shapely.make_valid(geom))
    return geom


def _circle(pts: np.ndarray) -> BaseGeometry:
    (cx, cy), (px, py) = pts
    radius = math.hypot(px - cx, py - cy)
    if radius == 0:
        return Polygon()
    step = math.acos(max(-1.0, 1 - CIRCLE_TOLERANCE_PX / radius))  # angle per segment for the tolerance
    quad_segs = int(min(256, max(8, math.ceil(math.pi / 2 / step))))
    return Point(cx, cy).buffer(radius, quad_segs=quad_segs)


def _bitmap_geometry(shape: Shape) -> BaseGeometry:
    """labelme `mask`: pixel (0, 0) of the bitmap is image pixel (int(x1), int(y1))."""
    assert shape.bitmap is not None
    binary = shape.bitmap.astype(np.uint8)
    x1, y1 = (float(int(v)) for v in shape.points[0])
    parts = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(
        binary, mask=binary > 0, transform=Affine.translation(x1, y1)) if v == 1]
    return shapely.union_all(parts) if parts else Polygon()


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the area-covering parts of a geometry (make_valid can return lines and points too)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else Polygon()


def _clip(geom: BaseGeometry, width: int, height: int) -> BaseGeometry:
    minx, miny, maxx, maxy = geom.bounds if not geom.is_empty else (0, 0, 0, 0)
    if minx >= 0 and miny >= 0 and maxx <= width and maxy <= height:
        return geom
    return _polygonal(geom.intersection(box(0, 0, width, height)))
