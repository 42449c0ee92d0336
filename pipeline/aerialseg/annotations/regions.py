"""Class map -> one polygon per connected region for the annotation tools: THE mask-to-polygon converter.

mask-to-label, infer-scene ``--format anylabeling``, rank-scenes' pre-labels and serve all use it:
- Regions are the 4-connected pixels of one value (OpenCV connected components), traced as exact pixel-edge
  polygons with their holes (``rasterio.features.shapes`` over the region ids: one polygon per region).
- Specks: with ``merge_specks`` (default) regions under ``min_area_px`` take the class of the nearest larger
  region, so they neither come back as shapes nor leave gaps; whatever is still under ``min_area_px``
  is not returned.
- Simplification: Douglas-Peucker (shapely, topology kept) of the tool-coordinate polygon (so kept vertices
  stay on boundary pixels) with tolerance ``simplify_px``, or ``epsilon_factor`` x its outline length
  (X-AnyLabeling's rule) capped at 1 px: on a real canopy tile 1 px keeps ~40 % of the vertices and moves
  ~2 % of the labelled pixels (tests/test_regions.py). Without simplification, vertices the painting does
  not need (inner corners of 1-px steps, points on a straight line) are dropped when the result still
  paints exactly.
- Tool coordinates: the tools paint a polygon through int(x), int(y) of its vertices, boundary pixels
  included (annotations/rasterize.py). The pixel-edge polygon shrunk by 0.4 px (mitre joins) and moved by
  -0.3 px has its vertices at col + 0.1 or + 0.3, row + 0.1 or + 0.3 of the region's boundary pixels: it
  truncates (and rounds) to the outline through their centres, so it paints exactly the region and its
  holes, yet always has >= 4 distinct vertices and a non-zero area (a 1-pixel region is a 0.2 px square).
- Holes are opened by a 0.02 px slit up the hole's first column to the outline (or to a hole above it):
  one simply-connected polygon that paints exactly its region, in any painting order (X-AnyLabeling may
  reorder shapes) and with no shapes for background.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from PIL import Image, ImageDraw
from rasterio.features import shapes as pixel_polygons
from scipy import ndimage
from shapely.affinity import translate
from shapely.geometry import LineString, Polygon, box, shape

from aerialseg.core.classes import IGNORE

SHRINK_PX = 0.4  # pixel-edge polygon -> 0.2 px band around the pixel centres ...
SHIFT_PX = -0.3  # ... moved to [col + 0.1, col + 0.3]: int() and round() both give col
SLIT_PX = 0.01  # half-width of the slit that opens a hole
MAX_EPSILON_PX = 1.0  # epsilon_factor x outline length is capped: a long outline must not move by pixels
DECIMALS = 3


@dataclass(frozen=True)
class Regions:
    """The connected regions of a class map (after speck merging)."""

    mask: np.ndarray  # (H, W) uint8 class map the regions partition
    labels: np.ndarray  # (H, W) int32 region id per pixel, 1..n
    values: np.ndarray  # (n + 1,) class of each region id (index 0 unused)
    pixels: np.ndarray  # (n + 1,) pixel count of each region id


def merge_specks(mask: np.ndarray, min_area_px: float, fixed: Iterable[int] = (IGNORE,)) -> np.ndarray:
    """Regions under ``min_area_px`` (4-connected) take the value of the nearest pixel of a larger region;
    values in ``fixed`` (ignore) are never changed."""
    if min_area_px <= 1:
        return mask
    fixed = set(fixed)
    small = np.zeros(mask.shape, bool)
    for value in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        if value in fixed:
            continue
        _, labels, stats, _ = cv2.connectedComponentsWithStats((mask == value).view(np.uint8), connectivity=4,
                                                               ltype=cv2.CV_32S)
        tiny = stats[:, cv2.CC_STAT_AREA] < min_area_px
        tiny[0] = False
        if tiny.any():
            small |= tiny[labels]
    if not small.any() or small.all():
        return mask
    rows, cols = ndimage.distance_transform_edt(small, return_distances=False, return_indices=True)
    return mask[rows, cols]


def find_regions(mask: np.ndarray, min_area_px: float = 0.0, merge: bool = True) -> Regions:
    """Every 4-connected region of a uint8 class map, after merging specks under ``min_area_px`` (``merge``)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if merge:
        mask = merge_specks(mask, min_area_px)
    labels = np.zeros(mask.shape, np.int32)
    values, pixels = [0], [0]
    for value in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        n, own, stats, _ = cv2.connectedComponentsWithStats((mask == value).view(np.uint8), connectivity=4,
                                                            ltype=cv2.CV_32S)
        inside = own > 0
        labels[inside] = own[inside] + (len(values) - 1)
        values += [int(value)] * (n - 1)
        pixels += stats[1:, cv2.CC_STAT_AREA].tolist()
    return Regions(mask, labels, np.asarray(values, np.int32), np.asarray(pixels, np.int64))


def polygons(regions: Regions, ids: Iterable[int], simplify_px: float = 0.0, epsilon_factor: float = 0.0,
             progress: Callable[[int], None] | None = None) -> dict[int, list[list[list[float]]]]:
    """Tool-coordinate polygons (open rings of [x, y]) of the regions ``ids``: one per region (see the module
    docstring); ``simplify_px`` (or else ``epsilon_factor`` x outline length) simplifies them.
    ``progress(n)`` is called every 256 regions (deadline checks)."""
    wanted = np.zeros(len(regions.values), bool)
    wanted[np.asarray(list(ids), np.int64)] = True
    wanted[0] = False
    if not wanted.any():
        return {}
    found: dict[int, list[list[list[float]]]] = {}
    for geom, rid in pixel_polygons(regions.labels, mask=wanted[regions.labels], connectivity=4):
        if progress is not None and len(found) % 256 == 0:
            progress(len(found))
        exact = shape(geom)
        tolerance = simplify_px or min(epsilon_factor * exact.exterior.length, MAX_EPSILON_PX)
        tools = tool_polygons(exact, tolerance)
        if tolerance <= 0 and len(tools) == 1:
            tools = [_fewer_vertices(tools[0], _own(regions, int(rid), exact))]
        found[int(rid)] = [_points(p) for p in tools]
    return found


def _own(regions: Regions, rid: int, pixel_polygon: Polygon) -> tuple[np.ndarray, int, int]:
    """The region's pixels in its bounding box, with the box's column and row."""
    x0, y0, x1, y1 = (int(v) for v in pixel_polygon.bounds)
    return regions.labels[y0:y1, x0:x1] == rid, x0, y0


def _fewer_vertices(tool: Polygon, own: tuple[np.ndarray, int, int]) -> Polygon:
    """Drop vertices the painting does not need (it sees only int() of each vertex): the inner corner of a
    one-pixel step (a diagonal edge paints the same) and vertices on a straight line between their neighbours.
    Kept only when the result is a valid polygon that still paints exactly the region's pixels."""
    points = np.asarray(tool.exterior.coords)[:-1]
    cells = np.floor(points + 1e-9).astype(np.int64)
    clockwise = not tool.exterior.is_ccw
    keep = _reduce(cells, clockwise)
    if keep.all() or keep.sum() < 3:
        return tool
    reduced = Polygon(points[keep])
    mask, x0, y0 = own
    if not reduced.is_valid or reduced.area <= 0 or not np.array_equal(_paint(points[keep], x0, y0, mask.shape), mask):
        return tool
    return reduced


def _reduce(cells: np.ndarray, clockwise: bool) -> np.ndarray:
    """Which vertices to keep: inner step corners go first, then vertices between collinear neighbours."""
    n = len(cells)
    keep = np.ones(n, bool)
    sign = -1 if clockwise else 1
    i = 0
    while i < n:
        a, b, c = cells[i - 1], cells[i], cells[(i + 1) % n]
        turn = (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])
        if np.abs(c - a).tolist() == [1, 1] and turn * sign < 0 and keep[i - 1] and keep[(i + 1) % n]:
            keep[i] = False
            i += 1
        i += 1
    order = list(np.flatnonzero(keep))
    changed = True
    while changed and len(order) > 4:
        changed = False
        out: list[int] = []
        for k, idx in enumerate(order):
            a, b, c = cells[out[-1] if out else order[-1]], cells[idx], cells[order[(k + 1) % len(order)]]
            cross = (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])
            between = (b != a).any() and (b != c).any() and np.dot(b - a, c - b) > 0
            if cross == 0 and between:
                changed = True
                continue
            out.append(idx)
        order = out
    keep[:] = False
    keep[order] = True
    return keep


def _paint(points: np.ndarray, x0: int, y0: int, shape: tuple[int, int]) -> np.ndarray:
    """The pixels a polygon paints (the tools' rule: vertices truncated, boundary included) in a box."""
    image = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(image).polygon((points - (x0, y0)).ravel().tolist(), fill=1)
    return np.array(image, bool)


def tool_polygons(pixel_polygon: Polygon, tolerance: float = 0.0) -> list[Polygon]:
    """A region's pixel-edge polygon -> hole-free tool-coordinate polygon(s): one, unless a slit would split it.
    ``tolerance`` > 0: Douglas-Peucker in tool coordinates, so kept vertices still sit on boundary pixels."""
    tool = _shrunk(pixel_polygon)
    if tool is None:  # cannot happen for a 4-connected region; keep every part rather than fail
        parts = shapely.get_parts(translate(pixel_polygon.buffer(-SHRINK_PX, join_style="mitre"), SHIFT_PX, SHIFT_PX))
        return [Polygon(p.exterior) for p in parts if p.area > 0]
    if tolerance > 0:
        simple = tool.simplify(tolerance, preserve_topology=True)
        tool = simple if simple.geom_type == "Polygon" and simple.area > 0 else tool
    opened = _open_holes(tool)
    return [Polygon(p.exterior) for p in shapely.get_parts(opened) if p.geom_type == "Polygon" and p.area > 0]


def _shrunk(pixel_polygon: Polygon) -> Polygon | None:
    """The polygon in tool coordinates (None when shrinking splits it)."""
    tool = translate(pixel_polygon.buffer(-SHRINK_PX, join_style="mitre"), SHIFT_PX, SHIFT_PX)
    return tool if tool.geom_type == "Polygon" and not tool.is_empty else None


def _open_holes(tool: Polygon) -> Polygon:
    """Cut a slit from the top of each hole straight up to the first edge it meets (outline or another hole,
    which is higher and opened in turn): the holes join the outside, the polygon stays in one piece."""
    if not tool.interiors:
        return tool
    top = tool.bounds[1] - 1.0
    slits = []
    for ring in tool.interiors:
        xy = np.asarray(ring.coords)
        y0 = xy[:, 1].min()
        x0 = xy[np.isclose(xy[:, 1], y0, atol=1e-6), 0].min()
        for x in (np.floor(x0 + 0.7 + 1e-6) + 0.2, x0):  # the hole's first pixel column, else its top vertex
            slit = _slit(tool, x, y0, top)
            if slit is not None:
                slits.append(slit)
                break
    return tool.difference(shapely.union_all(slits)) if slits else tool


def _slit(tool: Polygon, x: float, y0: float, top: float) -> Polygon | None:
    """A thin box from a hole's top edge at y0 up through the polygon to the next edge at column x (None if
    the column does not leave the hole through the polygon right there)."""
    run = tool.intersection(LineString([(x, y0 + 0.05), (x, top)]))
    above = [p.bounds for p in shapely.get_parts(run) if p.length > 0 and abs(p.bounds[3] - y0) < 0.02]
    return box(x - SLIT_PX, above[0][1] - 0.05, x + SLIT_PX, y0 + 0.05) if above else None


def _points(tool: Polygon) -> list[list[float]]:
    return np.round(np.asarray(tool.exterior.coords)[:-1], DECIMALS).tolist()
