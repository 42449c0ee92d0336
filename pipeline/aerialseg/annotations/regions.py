"""Class map -> one polygon per connected region for the annotation tools: THE mask-to-polygon converter.

mask-to-label, infer-scene ``--format anylabeling``, rank-scenes' pre-labels and serve all use it:
- Regions are the 4-connected pixels of one value (OpenCV connected components), traced as exact pixel-edge
  polygons with their holes (``rasterio.features.shapes`` over the region ids: one polygon per region).
- Specks: with ``merge_specks`` (default) regions under ``min_area_px`` take the class of the nearest larger
  region (OpenCV's 5x5 Euclidean distance transform: nearest up to ties and ~2 % distance error), so they
  neither come back as shapes nor leave gaps; whatever is still under ``min_area_px`` is not returned.
- Simplification: Douglas-Peucker (shapely, topology kept) of the tool-coordinate polygon (so kept vertices
  stay on boundary pixels) with tolerance ``simplify_px``, or ``epsilon_factor`` x its outline length
  (X-AnyLabeling's rule) capped at 1 px: on a real canopy tile 1 px keeps ~40 % of the vertices and moves
  ~2 % of the labelled pixels (tests/annotations/test_regions.py). Without simplification, vertices the painting does
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
from shapely.affinity import translate
from shapely.geometry import LineString, Polygon, box

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
    _, nearest = cv2.distanceTransformWithLabels(small.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)  # each kept pixel: its own label
    value_of = np.zeros(int(nearest.max()) + 1, np.uint8)
    value_of[nearest[~small]] = mask[~small]
    return value_of[nearest]


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
    traced = list(pixel_polygons(regions.labels, mask=wanted[regions.labels], connectivity=4))
    exact = np.array([_polygon(geom) for geom, _ in traced], dtype=object)
    shrunk = shapely.transform(shapely.buffer(exact, -SHRINK_PX, join_style="mitre"), lambda xy: xy + SHIFT_PX)
    small = ((shapely.get_type_id(shrunk) == 3) & (shapely.get_num_interior_rings(shrunk) == 0)
             & (shapely.get_num_coordinates(shrunk) <= 9))  # hole-free, <= 8 vertices: nothing to open or drop
    found: dict[int, list[list[list[float]]]] = {}
    for k, (_, rid) in enumerate(traced):
        if progress is not None and k % 256 == 0:
            progress(k)
        tolerance = simplify_px or min(epsilon_factor * exact[k].exterior.length, MAX_EPSILON_PX)
        if small[k]:
            found[int(rid)] = [_points(_simplified(shrunk[k], tolerance) if tolerance > 0 else shrunk[k])]
            continue
        own = _own(regions, int(rid), exact[k])
        tools = tool_polygons(exact[k], tolerance, own, shrunk[k])
        if tolerance <= 0 and len(tools) == 1:
            tools = [_fewer_vertices(tools[0], own)]
        found[int(rid)] = [_points(p) for p in tools]
    return found


def _polygon(geom: dict) -> Polygon:
    """A GeoJSON polygon of rasterio's tracing as shapely (from arrays: faster than ``shapely.geometry.shape``)."""
    rings = [shapely.linearrings(np.asarray(ring, np.float64)) for ring in geom["coordinates"]]
    return shapely.polygons(rings[0], holes=rings[1:] or None)


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
    index = np.arange(n)
    prev, nxt = cells[index - 1], cells[(index + 1) % n]
    step = (np.abs(nxt - prev) == 1).all(axis=1) & (_turn(prev, cells, nxt) * (-1 if clockwise else 1) < 0)
    last_kept = np.maximum.accumulate(np.where(step, -1, index))
    drop = step & ((index - last_kept) % 2 == 1)  # never two neighbours: every other one of a run
    if n > 1 and drop[0] and drop[-1]:
        drop[-1] = False
    order = np.flatnonzero(~drop)
    for _ in range(3):
        if len(order) <= 4:
            break
        at = np.arange(len(order))
        a, b, c = cells[order[at - 1]], cells[order], cells[order[(at + 1) % len(order)]]
        between = (_turn(a, b, c) == 0) & ((b - a) * (c - b)).sum(axis=1).__gt__(0) \
            & (b != a).any(axis=1) & (b != c).any(axis=1)
        if not between.any():
            break
        order = order[~between]
    keep = np.zeros(n, bool)
    keep[order] = True
    return keep


def _turn(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """z of (b - a) x (c - b) per row."""
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - b[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - b[:, 0])


def _paint(points: np.ndarray, x0: int, y0: int, shape: tuple[int, int]) -> np.ndarray:
    """The pixels a polygon paints (the tools' rule: vertices truncated, boundary included) in a box."""
    image = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(image).polygon((points - (x0, y0)).ravel().tolist(), fill=1)
    return np.array(image, bool)


def tool_polygons(pixel_polygon: Polygon, tolerance: float = 0.0, own: tuple[np.ndarray, int, int] | None = None,
                  shrunk: Polygon | None = None) -> list[Polygon]:
    """A region's pixel-edge polygon -> hole-free tool-coordinate polygon(s): one, unless a slit would split it.
    ``own``: the region's pixels in its box (finds each slit's run of pixels without a geometry query).
    ``tolerance`` > 0: Douglas-Peucker in tool coordinates, so kept vertices still sit on boundary pixels.
    ``shrunk``: the polygon already in tool coordinates (computed for many regions at once)."""
    tool = shrunk if shrunk is not None and shrunk.geom_type == "Polygon" else _shrunk(pixel_polygon)
    if tool is None:  # cannot happen for a 4-connected region; keep every part rather than fail
        parts = shapely.get_parts(translate(pixel_polygon.buffer(-SHRINK_PX, join_style="mitre"), SHIFT_PX, SHIFT_PX))
        return [Polygon(p.exterior) for p in parts if p.area > 0]
    opened = _open_holes(tool, own)
    parts = [Polygon(p.exterior) for p in shapely.get_parts(opened) if p.geom_type == "Polygon" and p.area > 0]
    return [_simplified(p, tolerance) for p in parts] if tolerance > 0 else parts


def _simplified(tool: Polygon, tolerance: float) -> Polygon:
    simple = tool.simplify(tolerance, preserve_topology=True)
    return simple if simple.geom_type == "Polygon" and simple.area > 0 and not simple.interiors else tool


def _shrunk(pixel_polygon: Polygon) -> Polygon | None:
    """The polygon in tool coordinates (None when shrinking splits it)."""
    tool = translate(pixel_polygon.buffer(-SHRINK_PX, join_style="mitre"), SHIFT_PX, SHIFT_PX)
    return tool if tool.geom_type == "Polygon" and not tool.is_empty else None


def _open_holes(tool: Polygon, own: tuple[np.ndarray, int, int] | None = None) -> Polygon:
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
        col, row = int(np.floor(x0 + 0.7 + 1e-6)), int(round(y0 + 0.7))  # the hole's top-left pixel
        slit = _pixel_slit(own, col, row) if own is not None else None
        for x in (col + 0.2, x0) if slit is None else ():  # geometry: its first column, else its top vertex
            slit = _slit(tool, x, y0, top)
            if slit is not None:
                break
        if slit is not None:
            slits.append(slit)
    return tool.difference(shapely.union_all(slits)) if slits else tool


def _pixel_slit(own: tuple[np.ndarray, int, int], col: int, row: int) -> Polygon | None:
    """The slit up column ``col`` from the hole pixel at ``row`` through the run of region pixels above it."""
    mask, x0, y0 = own
    c, r = col - x0, row - y0
    if not (0 <= c < mask.shape[1] and 1 <= r < mask.shape[0]) or mask[r, c] or not mask[r - 1, c]:
        return None
    above = mask[:r, c][::-1]
    run = int(np.argmin(above)) if not above.all() else len(above)  # region pixels straight above the hole
    first = row - run  # top pixel row of the run
    return box(col + 0.2 - SLIT_PX, first + 0.1 - 0.05, col + 0.2 + SLIT_PX, row - 0.7 + 0.05)


def _slit(tool: Polygon, x: float, y0: float, top: float) -> Polygon | None:
    """A thin box from a hole's top edge at y0 up through the polygon to the next edge at column x (None if
    the column does not leave the hole through the polygon right there)."""
    run = tool.intersection(LineString([(x, y0 + 0.05), (x, top)]))
    above = [p.bounds for p in shapely.get_parts(run) if p.length > 0 and abs(p.bounds[3] - y0) < 0.02]
    return box(x - SLIT_PX, above[0][1] - 0.05, x + SLIT_PX, y0 + 0.05) if above else None


def _points(tool: Polygon) -> list[list[float]]:
    return np.round(np.asarray(tool.exterior.coords)[:-1], DECIMALS).tolist()
