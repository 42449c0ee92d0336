"""Objects of a class raster: 8-connected components per class, filtered by size and aspect ratio.

The post-processing of LW-IRSTNet (Kou et al. 2023, section III-C), usable on any model's output:
eight-neighbourhood clustering gives, per object, its class, pixel area (and ground m² in any CRS: pixels x a
pixel's ground area at its centroid, geo.areas), centroid and bounding box (pixel and map coordinates) and
aspect ratio; eq. (4) then keeps objects whose size and aspect ratio lie in the given ranges.

Full scenes are read in bands of rows (rasterio windows). Each band is labelled with
``cv2.connectedComponentsWithStats(connectivity=8)``; components of one class that touch across a band
border (the last row of a band against the first row of the next, 8-neighbourhood, so diagonal contacts
count) are merged with union-find, and their statistics are accumulated per merged object (areas
summed, bounding boxes combined, centroids area-weighted). The result equals labelling the whole image
at once, with memory bounded by one band.

Definitions: area_px = pixel count; centroid = mean pixel centre; bbox = pixel rows/columns spanned;
aspect_ratio = long side / short side of the bbox in ground units (pixels when not georeferenced), so
it is >= 1 and independent of orientation. Filters keep ``min <= value <= max`` (``None`` = open).
Outputs (atomic): ``<stem>.objects.geojson`` (centroid points with ``bbox``; raster CRS, or pixel
coordinates when not georeferenced), ``<stem>.objects.csv``, ``<stem>.objects.json`` (summary), a
preview PNG, and optionally a cleaned class raster with removed objects set to background (eq. 4).
"""

import csv
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.core.classes import CLASS_NAMES, colorize
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.geo.areas import area_method, point_pixel_areas
from aerialseg.geo.raster import is_georeferenced, open_raster, pixel_area_m2

log = logging.getLogger(__name__)

FIELDS = ("class_id", "area_px", "centroid_col", "centroid_row", "col_min", "row_min", "col_max", "row_max")
AREA_UNITS = ("px", "m2")


@dataclass(frozen=True)
class ObjectFilter:
    """Eq. (4) of LW-IRSTNet: keep objects whose area and aspect ratio lie in [min, max] (None = open)."""

    min_area: float | None = None
    max_area: float | None = None
    min_aspect: float | None = None
    max_aspect: float | None = None
    area_unit: str = "px"  # px | m2 (m2: ground m², needs a CRS)

    def keep(self, area: np.ndarray, aspect: np.ndarray) -> np.ndarray:
        """Boolean mask of the objects that pass."""
        ok = np.ones(len(area), dtype=bool)
        for values, low, high in ((area, self.min_area, self.max_area), (aspect, self.min_aspect, self.max_aspect)):
            if low is not None:
                ok &= values >= low
            if high is not None:
                ok &= values <= high
        return ok


# --- connected components -------------------------------------------------------------------------


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 8-connected labels (0 = none) and per-label stats/centroids without the background row."""
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8,
                                                                   ltype=cv2.CV_32S)
    return labels, stats[1:], centroids[1:]


def _stats_table(class_id: int, stats: np.ndarray, centroids: np.ndarray, row0: int = 0) -> dict[str, np.ndarray]:
    """cv2 stats of one class in one band -> columns in whole-image pixel coordinates."""
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP] + row0
    return {
        "class_id": np.full(len(stats), class_id, dtype=np.int64),
        "area_px": stats[:, cv2.CC_STAT_AREA].astype(np.int64),
        "centroid_col": centroids[:, 0].astype(np.float64),
        "centroid_row": centroids[:, 1] + row0,
        "col_min": left.astype(np.int64),
        "row_min": top.astype(np.int64),
        "col_max": (left + stats[:, cv2.CC_STAT_WIDTH] - 1).astype(np.int64),
        "row_max": (top + stats[:, cv2.CC_STAT_HEIGHT] - 1).astype(np.int64),
    }


def _concat(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not tables:
        return {k: np.zeros(0, dtype=np.float64 if k.startswith("centroid") else np.int64) for k in FIELDS}
    return {k: np.concatenate([t[k] for t in tables]) for k in FIELDS}


def object_order(table: dict[str, np.ndarray]) -> np.ndarray:
    """Indices putting objects in a stable order: class, then top row, left column, area, centroid."""
    return np.lexsort((table["centroid_col"], table["centroid_row"], table["area_px"], table["col_min"],
                       table["row_min"], table["class_id"]))


def sort_objects(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The table in ``object_order``."""
    order = object_order(table)
    return {k: v[order] for k, v in table.items()}


class UnionFind:
    """Disjoint sets over integer ids, grown on demand; path halving + union by smaller root."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, n: int) -> np.ndarray:
        """Root of each id 0..n-1 (ids never united are their own root)."""
        out = np.arange(n, dtype=np.int64)
        for x in list(self.parent):
            out[x] = self.find(x)
        return out


def border_pairs(upper_row: np.ndarray, lower_row: np.ndarray) -> np.ndarray:
    """(M, 2) unique id pairs 8-adjacent across a row border; -1 marks pixels of no component."""
    pairs = []
    for a, b in ((upper_row, lower_row), (upper_row[:-1], lower_row[1:]), (upper_row[1:], lower_row[:-1])):
        hit = (a >= 0) & (b >= 0)
        pairs.append(np.stack([a[hit], b[hit]], axis=1))
    merged = np.concatenate(pairs)
    return np.unique(merged, axis=0) if len(merged) else merged.reshape(0, 2)


def _bands(height: int, band_rows: int) -> Iterator[tuple[int, int]]:
    for row0 in range(0, height, band_rows):
        yield row0, min(row0 + band_rows, height)


@dataclass
class BandLabels:
    """Global component ids of one band and class: ``offset + label - 1``."""

    row0: int
    class_id: int
    offset: int


def scan_objects(ds: rasterio.DatasetReader, class_ids: Iterable[int], band_rows: int = 1024,
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, list[BandLabels]]:
    """Label a class raster band by band and merge components across band borders.

    Returns the merged objects (sorted), the object index of every band component (global id ->
    row of the table) and the band/class id offsets (to relabel the same bands again).
    """
    class_ids = list(class_ids)
    tables: list[dict[str, np.ndarray]] = []
    bands: list[BandLabels] = []
    last_rows: dict[int, np.ndarray] = {}
    sets = UnionFind()
    offset = 0
    n_bands = -(-ds.height // band_rows)
    for row0, row1 in tqdm(_bands(ds.height, band_rows), total=n_bands, desc="objects", unit="band", leave=False):
        data = ds.read(1, window=Window(0, row0, ds.width, row1 - row0))
        for c in class_ids:
            labels, stats, centroids = _components(data == c)
            bands.append(BandLabels(row0, c, offset))
            tables.append(_stats_table(c, stats, centroids, row0))
            first, last = (np.where(row > 0, row.astype(np.int64) + offset - 1, -1)
                           for row in (labels[0], labels[-1]))
            if c in last_rows:
                for a, b in border_pairs(last_rows[c], first).tolist():
                    sets.union(a, b)
            last_rows[c] = last
            offset += len(stats)
    table = _concat(tables)
    roots = sets.roots(offset)
    merged, members = merge_components(table, roots)
    order = object_order(merged)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return {k: v[order] for k, v in merged.items()}, rank[members], bands


def merge_components(table: dict[str, np.ndarray], roots: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Accumulate component stats per root: summed areas, combined bboxes, area-weighted centroids."""
    unique_roots, members = np.unique(roots, return_inverse=True)
    n = len(unique_roots)
    area = np.bincount(members, weights=table["area_px"], minlength=n)
    merged = {
        "class_id": table["class_id"][unique_roots] if n else table["class_id"],
        "area_px": area.astype(np.int64),
        "centroid_col": np.bincount(members, table["centroid_col"] * table["area_px"], n) / np.maximum(area, 1),
        "centroid_row": np.bincount(members, table["centroid_row"] * table["area_px"], n) / np.maximum(area, 1),
    }
    for key, reduce, start in (("col_min", np.minimum, np.iinfo(np.int64).max), ("row_min", np.minimum,
                               np.iinfo(np.int64).max), ("col_max", np.maximum, -1), ("row_max", np.maximum, -1)):
        values = np.full(n, start, dtype=np.int64)
        reduce.at(values, members, table[key])
        merged[key] = values
    return merged, members


# --- measurements, filters, outputs -----------------------------------------------------------------


def _pixel_sizes(transform: Affine) -> tuple[float, float]:
    """Ground size of one pixel along columns and rows (map units)."""
    return float(np.hypot(transform.a, transform.d)), float(np.hypot(transform.b, transform.e))


def measure(table: dict[str, np.ndarray], transform: Affine | None, pixel_area: Any) -> dict[str, np.ndarray]:
    """Add sizes, aspect ratio, m² area and map coordinates of centroids and bboxes."""
    out = dict(table)
    out["width_px"] = table["col_max"] - table["col_min"] + 1
    out["height_px"] = table["row_max"] - table["row_min"] + 1
    sx, sy = _pixel_sizes(transform) if transform is not None else (1.0, 1.0)
    width, height = out["width_px"] * sx, out["height_px"] * sy
    out["aspect_ratio"] = np.maximum(width, height) / np.maximum(np.minimum(width, height), 1e-12)
    out["area_m2"] = table["area_px"] * pixel_area if pixel_area is not None else np.full(len(width), np.nan)
    t = transform if transform is not None else Affine.identity()
    out["centroid_x"], out["centroid_y"] = t @ (table["centroid_col"] + 0.5, table["centroid_row"] + 0.5)
    cols = (table["col_min"].astype(np.float64), table["col_max"] + 1.0)  # outer pixel edges
    rows = (table["row_min"].astype(np.float64), table["row_max"] + 1.0)
    edge = [t @ (c, r) for c in cols for r in rows]
    xs, ys = np.stack([e[0] for e in edge]), np.stack([e[1] for e in edge])
    out["bbox_xmin"], out["bbox_xmax"] = xs.min(0), xs.max(0)
    out["bbox_ymin"], out["bbox_ymax"] = ys.min(0), ys.max(0)
    return out


def resolve_classes(spec: Iterable[int | str] | str | None) -> list[int]:
    """Class ids from ids or names ("road", "4", 4); a comma-separated string works too; None = 1..4."""
    if spec is None:
        return list(range(1, len(CLASS_NAMES)))
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    ids = []
    for item in items:
        text = str(item).strip().lower()
        if text.isdigit() and 0 <= int(text) <= 255:
            ids.append(int(text))
        elif text in CLASS_NAMES:
            ids.append(CLASS_NAMES.index(text))
        else:
            raise AerialsegError(f"unknown class '{item}'", fix=f"use ids 0-255 or names: {', '.join(CLASS_NAMES)}")
    return sorted(set(ids))


def class_name(class_id: int) -> str:
    return CLASS_NAMES[class_id] if class_id < len(CLASS_NAMES) else f"class_{class_id}"


def _fmt(value: float, digits: int) -> float | None:
    return None if np.isnan(value) else round(float(value), digits)


def object_records(objects: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One JSON-able row per object (ids start at 1)."""
    rows = []
    for i in range(len(objects["class_id"])):
        c = int(objects["class_id"][i])
        rows.append({
            "id": i + 1, "class_id": c, "class_name": class_name(c),
            "area_px": int(objects["area_px"][i]), "area_m2": _fmt(objects["area_m2"][i], 4),
            "centroid_col": _fmt(objects["centroid_col"][i], 3), "centroid_row": _fmt(objects["centroid_row"][i], 3),
            "centroid_x": _fmt(objects["centroid_x"][i], 3), "centroid_y": _fmt(objects["centroid_y"][i], 3),
            "col_min": int(objects["col_min"][i]), "row_min": int(objects["row_min"][i]),
            "col_max": int(objects["col_max"][i]), "row_max": int(objects["row_max"][i]),
            "bbox_xmin": _fmt(objects["bbox_xmin"][i], 3), "bbox_ymin": _fmt(objects["bbox_ymin"][i], 3),
            "bbox_xmax": _fmt(objects["bbox_xmax"][i], 3), "bbox_ymax": _fmt(objects["bbox_ymax"][i], 3),
            "width_px": int(objects["width_px"][i]), "height_px": int(objects["height_px"][i]),
            "aspect_ratio": _fmt(objects["aspect_ratio"][i], 4),
        })
    return rows


def write_csv(dest: str | Path, records: list[dict[str, Any]]) -> Path:
    """Objects as CSV (one row each; empty cells for unknown m² values)."""
    with atomic_path(dest) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            fields = list(records[0]) if records else ["id", "class_id", "class_name", "area_px"]
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
    return Path(dest)


def write_geojson(dest: str | Path, records: list[dict[str, Any]], crs: Any | None) -> Path:
    """Centroid points with their bbox; coordinates in the raster CRS (a ``crs`` member names it)."""
    features = [{
        "type": "Feature", "id": r["id"],
        "bbox": [r["bbox_xmin"], r["bbox_ymin"], r["bbox_xmax"], r["bbox_ymax"]],
        "geometry": {"type": "Point", "coordinates": [r["centroid_x"], r["centroid_y"]]},
        "properties": r,
    } for r in records]
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        epsg = crs.to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
        collection["crs"] = {"type": "name", "properties": {"name": name}}
    else:
        collection["coordinate_space"] = "pixel (x = column, y = row; origin at the top-left corner)"
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(collection) + "\n", encoding="utf-8")
    return Path(dest)


def write_preview(dest: str | Path, ds: rasterio.DatasetReader, objects: dict[str, np.ndarray], keep: np.ndarray,
                  max_side: int = 1024, max_boxes: int = 5000) -> Path:
    """Decimated colour map of the class raster with kept objects' boxes (white) and removed ones (black)."""
    scale = min(1.0, max_side / max(ds.width, ds.height))
    shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
    small = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    image = np.ascontiguousarray(colorize(small.astype(np.uint8))[:, :, ::-1])  # BGR for OpenCV
    sy, sx = shape[0] / ds.height, shape[1] / ds.width
    order = np.lexsort((objects["area_px"], keep))[::-1][:max_boxes][::-1]  # kept and large ones first
    for i in order:  # removed drawn first, kept on top
        top_left = (int(objects["col_min"][i] * sx), int(objects["row_min"][i] * sy))
        bottom_right = (int((objects["col_max"][i] + 1) * sx), int((objects["row_max"][i] + 1) * sy))
        cv2.rectangle(image, top_left, bottom_right, (255, 255, 255) if keep[i] else (0, 0, 0), 1)
    with atomic_path(dest) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise AerialsegError("cannot write the preview PNG", dest)
    return Path(dest)


def write_clean_raster(dest: str | Path, ds: rasterio.DatasetReader, bands: list[BandLabels], band_rows: int,
                       object_of: np.ndarray, keep: np.ndarray, fill: int = 0) -> Path:
    """The class raster with the pixels of removed objects set to ``fill`` (background), band by band."""
    profile = {**ds.profile, "driver": "GTiff"}
    try:
        cmap = ds.colormap(1)
    except ValueError:
        cmap = None
    by_band: dict[int, list[BandLabels]] = {}
    for band in bands:
        by_band.setdefault(band.row0, []).append(band)
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a plain (e.g. PNG) source stays plain
        with rasterio.open(tmp, "w", **profile) as out:
            for row0, row1 in tqdm(_bands(ds.height, band_rows), total=len(by_band), desc="clean", unit="band",
                                   leave=False):
                window = Window(0, row0, ds.width, row1 - row0)
                data = ds.read(1, window=window)
                for band in by_band.get(row0, []):
                    labels = _components(data == band.class_id)[0]
                    hit = labels > 0
                    removed = np.zeros_like(hit)
                    removed[hit] = ~keep[object_of[labels[hit].astype(np.int64) + band.offset - 1]]
                    data[removed] = fill
                out.write(data, 1, window=window)
            if cmap:
                out.write_colormap(1, cmap)
    return Path(dest)


def _check_raster(ds: rasterio.DatasetReader, path: Path) -> None:
    if ds.count != 1:
        raise AerialsegError(f"not a class raster ({ds.count} bands)", path,
                             "give a single-band class raster, e.g. from `aerialseg infer-scene`")
    if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
        raise AerialsegError(f"not a class raster (band 1 is {ds.dtypes[0]})", path,
                             "give a single-band integer class raster, e.g. from `aerialseg infer-scene`")


def _summary(objects: dict[str, np.ndarray], keep: np.ndarray, class_ids: list[int]) -> dict[str, Any]:
    per_class = {}
    for c in class_ids:
        sel = objects["class_id"] == c
        kept = sel & keep
        area_m2 = objects["area_m2"][kept]
        per_class[class_name(c)] = {
            "class_id": c, "objects": int(sel.sum()), "kept": int(kept.sum()),
            "kept_area_px": int(objects["area_px"][kept].sum()),
            "kept_area_m2": None if np.isnan(area_m2).any() else round(float(area_m2.sum()), 3),
        }
    return per_class


def postprocess(class_raster: str | Path, out_dir: str | Path, classes: Iterable[int | str] | str | None = None,
                object_filter: ObjectFilter = ObjectFilter(), band_rows: int = 1024, clean: bool = False,
                preview: bool = True) -> dict[str, Any]:
    """Count and measure the objects of a class raster, filter them, write GeoJSON/CSV/JSON (+PNG, +raster).

    Returns the summary written to ``<out_dir>/<stem>.objects.json``.
    """
    path, out_dir = Path(class_raster), Path(out_dir)
    if band_rows < 1:
        raise AerialsegError("band_rows must be >= 1", fix="use e.g. 1024")
    if object_filter.area_unit not in AREA_UNITS:
        raise AerialsegError(f"unknown area unit '{object_filter.area_unit}'", fix="use px or m2")
    class_ids = resolve_classes(classes)
    with open_raster(path) as ds:
        _check_raster(ds, path)
        if ds.nodata is not None and int(ds.nodata) in class_ids:
            raise AerialsegError(f"class id {int(ds.nodata)} is the raster's nodata value", path,
                                 "leave it out of --classes")
        georef = is_georeferenced(ds)
        pixel_area = pixel_area_m2(ds)
        if object_filter.area_unit == "m2" and pixel_area is None:
            raise AerialsegError("area in m2 needs a georeferenced raster (a CRS and a geotransform)", path,
                                 "use area_unit: px, or georeference the raster")
        objects, object_of, bands = scan_objects(ds, class_ids, band_rows)
        local = pixel_area and point_pixel_areas(ds.crs, ds.transform, objects["centroid_col"], objects["centroid_row"])
        objects = measure(objects, ds.transform if georef else None, local)  # ground m² where each object lies
        area = objects["area_m2"] if object_filter.area_unit == "m2" else objects["area_px"].astype(np.float64)
        keep = object_filter.keep(area, objects["aspect_ratio"])
        kept = {k: v[keep] for k, v in objects.items()}
        records = object_records(kept)
        stem = path.stem
        files = {"geojson": out_dir / f"{stem}.objects.geojson", "csv": out_dir / f"{stem}.objects.csv"}
        write_geojson(files["geojson"], records, ds.crs if georef else None)
        write_csv(files["csv"], records)
        if preview:
            files["preview"] = write_preview(out_dir / f"{stem}.objects.png", ds, objects, keep)
        if clean:
            files["clean_raster"] = write_clean_raster(out_dir / f"{stem}.clean.tif", ds, bands, band_rows,
                                                       object_of, keep)
        summary = {
            "raster": str(path), "width": ds.width, "height": ds.height, "georeferenced": georef,
            "crs": ds.crs.to_string() if georef else None, "pixel_area_m2": pixel_area,
            "area_method": area_method(ds.crs, ds.transform, ds.width, ds.height) if pixel_area else "pixel counts",
            "connectivity": 8, "band_rows": band_rows, "filter": asdict(object_filter),
            "objects": int(len(keep)), "kept": int(keep.sum()), "removed": int((~keep).sum()),
            "classes": _summary(objects, keep, class_ids),
            "files": {k: str(v) for k, v in files.items()},
        }
    write_json(out_dir / f"{stem}.objects.json", summary)
    log.info("%s: %d objects, %d kept after filtering", path.name, summary["objects"], summary["kept"])
    return summary
