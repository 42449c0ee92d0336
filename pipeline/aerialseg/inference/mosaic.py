"""The survey as one product: a VRT mosaic of the scene maps, one GeoPackage of their polygons, summed areas.

The VRT is written as XML (no gdalbuildvrt needed): every map is a ComplexSource placed by its geotransform
on one north-up grid, with the class colour table and nodata 255; sources are named relative to the VRT,
so the folder can be moved or shared. One VRT holds maps of one CRS and pixel size: a survey of several
(UTM zones, Web Mercator tiles beside lon/lat scenes) gets one survey_<CRS>.vrt per CRS, and its GeoPackage
one layer per CRS; maps of plain images (no CRS) stay out of both. GDAL reads the maps' own overviews through the
VRT's virtual overviews (OverviewList) when zoomed out (QGIS opens it as one layer).
"""

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import rasterio

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_text

AREA_KEYS = ("pixels", "m2", "ha")


def _grid(maps: list[Path]) -> tuple[Any, float, float, list[tuple[Path, Any, int, int]]]:
    """(crs, xres, yres, [(path, transform, width, height)]); refuses mixed CRSs, pixel sizes or rotations."""
    items, crs, res = [], None, None
    for path in maps:
        with rasterio.open(path) as ds:
            t = ds.transform
            if t.b or t.d or t.e >= 0:
                raise AerialsegError("map is not on a north-up grid; a VRT cannot place it", path,
                                     "map a north-up scene (gdalwarp it first)")
            if crs is None:
                crs, res, first = ds.crs, (t.a, -t.e), path
            elif ds.crs != crs:
                raise AerialsegError(f"maps in different CRSs ({crs} in {first.name}, {ds.crs} here): one "
                                     "mosaic needs one CRS", path, "map the scenes of each CRS into their own --out")
            elif not (math.isclose(t.a, res[0], rel_tol=1e-9) and math.isclose(-t.e, res[1], rel_tol=1e-9)):
                raise AerialsegError(f"pixel size {t.a:g} x {-t.e:g} differs from {first.name}'s "
                                     f"{res[0]:g} x {res[1]:g}: one mosaic needs one pixel size", path,
                                     "resample the scenes to one GSD, or map them into separate --out folders")
            items.append((path, t, ds.width, ds.height))
    if crs is None:
        raise AerialsegError("no scene maps to mosaic", fix="map at least one scene")
    return crs, res[0], res[1], items


def _num(value: float) -> str:
    """Pixel offsets: integers when the grids align (the usual case), else exact decimals."""
    return str(round(value)) if abs(value - round(value)) < 1e-6 else repr(value)


def _source_name(path: Path, vrt_dir: Path) -> tuple[str, int]:
    """(name, relativeToVRT): relative when the map lies under the VRT's folder, else absolute."""
    path, vrt_dir = path.resolve(), vrt_dir.resolve()
    return (str(path.relative_to(vrt_dir)), 1) if path.is_relative_to(vrt_dir) else (str(path), 0)


def vrt_xml(maps: list[Path], vrt_dir: Path) -> str:
    """The VRT text of all maps on one grid (the union of their extents)."""
    from aerialseg.core.classes import colormap

    crs, xres, yres, items = _grid(maps)
    left = min(t.c for _, t, _, _ in items)
    top = max(t.f for _, t, _, _ in items)
    right = max(t.c + w * xres for _, t, w, _ in items)
    bottom = min(t.f - h * yres for _, t, _, h in items)
    width, height = round((right - left) / xres), round((top - bottom) / yres)
    colours = colormap()
    entries = "".join(f'<Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3] if len(c) > 3 else 255}"/>'
                      for c in (colours.get(i, (0, 0, 0, 0)) for i in range(256)))
    sources = []
    for path, t, w, h in items:
        name, relative = _source_name(Path(path), vrt_dir)
        sources.append(
            f'    <ComplexSource>\n      <SourceFilename relativeToVRT="{relative}">{escape(name)}</SourceFilename>\n'
            f'      <SourceBand>1</SourceBand>\n      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>\n'
            f'      <DstRect xOff="{_num((t.c - left) / xres)}" yOff="{_num((top - t.f) / yres)}" '
            f'xSize="{w}" ySize="{h}"/>\n      <NODATA>255</NODATA>\n    </ComplexSource>\n')
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
            f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt()) if crs else ""}</SRS>\n'
            f'  <GeoTransform>{left!r}, {xres!r}, 0.0, {top!r}, 0.0, {-yres!r}</GeoTransform>\n'
            f'  <VRTRasterBand dataType="Byte" band="1">\n    <NoDataValue>255</NoDataValue>\n'
            f'    <Description>landcover class</Description>\n    <ColorInterp>Palette</ColorInterp>\n'
            f'    <ColorTable>{entries}</ColorTable>\n{"".join(sources)}  </VRTRasterBand>\n{_overviews(width, height)}'
            '</VRTDataset>\n')


def _overviews(width: int, height: int, smallest: int = 512) -> str:
    """Virtual overviews (factors 2, 4, ... until the longest side fits ``smallest``), read from the maps' own
    mode-resampled COG overviews: QGIS zoomed out over a large survey reads little."""
    factors, f = [], 2
    while max(width, height) / (f // 2) > smallest:
        factors.append(f)
        f *= 2
    return f'  <OverviewList resampling="mode">{" ".join(map(str, factors))}</OverviewList>\n' if factors else ""


def write_vrt(maps: list[Path], dest: Path) -> Path:
    """survey.vrt over all maps, written atomically."""
    return write_text(dest, vrt_xml(maps, dest.parent))


def _tag(crs: Any) -> str:
    """A file-name-safe name of a CRS (EPSG_32639, or a short hash of its WKT)."""
    import hashlib

    epsg = crs.to_epsg() if crs else None
    return f"EPSG_{epsg}" if epsg else "crs_" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:8]


def grid_groups(maps: Iterable[Path]) -> dict[str, list[Path]]:
    """Georeferenced maps grouped by CRS and pixel size (one mosaic each); pixel-grid maps left out."""
    groups: dict[tuple[str, float, float], list[Path]] = {}
    for path in maps:
        with rasterio.open(path) as ds:
            if not ds.crs:
                logging.getLogger(__name__).info("%s: not georeferenced, left out of the mosaic", path.name)
                continue
            groups.setdefault((_tag(ds.crs), round(ds.transform.a, 9), round(-ds.transform.e, 9)), []).append(path)
    crs_count = {}
    for tag, *_ in groups:
        crs_count[tag] = crs_count.get(tag, 0) + 1
    return {(tag if crs_count[tag] == 1 else f"{tag}_{xres:g}m"): paths for (tag, xres, _), paths in groups.items()}


def write_mosaics(maps: list[Path], out: Path) -> list[Path]:
    """survey.vrt over all maps of one CRS and pixel size; a survey of several CRSs (UTM zones, Web Mercator
    and lon/lat scenes) gets survey_<CRS>.vrt per CRS instead, each opening as one layer in QGIS."""
    groups = grid_groups(maps)
    if not groups:
        raise AerialsegError("no georeferenced scene maps to mosaic", out, "map GeoTIFF scenes for a mosaic")
    if len(groups) == 1:
        return [write_vrt(next(iter(groups.values())), out / "survey.vrt")]
    return [write_vrt(paths, out / f"survey_{tag}.vrt") for tag, paths in sorted(groups.items())]


def merge_vectors(gpkgs: Iterable[tuple[str, Path]], dest: Path) -> int:
    """All scenes' polygons in one GeoPackage (+ a ``scene`` column), one scene in memory at a time: layer
    ``landcover``, or ``landcover_<CRS>`` per CRS when the scenes have several; returns the polygon count.
    Polygons of pixel-grid maps (no CRS) are left out."""
    import numpy as np
    from pyogrio.raw import read, write

    from pyogrio import read_info

    count, layers = 0, {}
    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # no "Created N records" per scene
    gpkgs = list(gpkgs)
    crss = list(dict.fromkeys(c for c in (read_info(path)["crs"] for _, path in gpkgs) if c))  # headers only
    with atomic_path(dest) as tmp:
        tmp.unlink()
        for sid, path in gpkgs:
            meta, _, geometry, columns = read(path)
            if not meta["crs"]:
                continue
            layer = "landcover" if len(crss) == 1 else f"landcover_{_tag(rasterio.crs.CRS.from_user_input(meta['crs']))}"
            layers[layer] = meta["crs"]
            if len(geometry) == 0:
                continue
            names = [*meta["fields"], "scene"]
            values = [*columns, np.full(len(geometry), sid, dtype=object)]
            write(tmp, geometry, values, names, layer=layer, driver="GPKG", geometry_type="Polygon",
                  crs=meta["crs"], append=tmp.exists() and layer in _layers(tmp))
            count += len(geometry)
        for layer, crs in ({"landcover": None} if not layers else layers).items():
            if not tmp.exists() or layer not in _layers(tmp):
                write(tmp, np.array([], dtype=object), [np.array([], dtype=np.int32)], ["class_id"], layer=layer,
                      driver="GPKG", geometry_type="Polygon", crs=crs, append=tmp.exists())
    return count


def _layers(path: Path) -> set[str]:
    from pyogrio import list_layers

    return {str(name) for name, _ in list_layers(path)}


def sum_areas(per_scene: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-class pixels / m2 / ha summed over the scenes (units: m2 only when every scene has them)."""
    total: dict[str, dict[str, float]] = {}
    for areas in per_scene.values():
        for name, entry in (areas.get("classes") or {}).items():
            into = total.setdefault(name, {})
            for key in AREA_KEYS:
                if key in entry:
                    into[key] = into.get(key, 0) + entry[key]
    metric = bool(per_scene) and all(a.get("units") == "m2" for a in per_scene.values())
    valid = sum(e.get("pixels", 0) for e in total.values())
    result: dict[str, Any] = {"units": "m2" if metric else "pixels", "scenes": len(per_scene), "classes": {}}
    for name, entry in total.items():
        entry["share"] = entry.get("pixels", 0) / valid if valid else 0.0
        result["classes"][name] = entry if metric else {k: v for k, v in entry.items() if k not in ("m2", "ha")}
    if metric:
        result["total_m2"] = sum(e.get("m2", 0.0) for e in total.values())
        result["total_ha"] = result["total_m2"] / 10_000.0
    return result


def write_products(out: Path, outputs: dict[str, dict[str, Path]], with_mosaic: bool = True) -> dict[str, Any]:
    """survey.vrt, survey_polygons.gpkg (scenes mapped with --vectors), survey_areas.json from the done scenes'
    outputs ({role: {scene id: path}}); a product that cannot be made is listed under ``errors``."""
    import json

    from aerialseg.core.fileio import write_json

    def areas() -> Path:
        per_scene = {sid: json.loads(p.read_text(encoding="utf-8")) for sid, p in outputs["areas"].items()}
        return write_json(out / "survey_areas.json", {"survey": sum_areas(per_scene), "scenes": per_scene})

    def vectors() -> Path:
        merge_vectors(outputs["vectors"].items(), out / "survey_polygons.gpkg")
        return out / "survey_polygons.gpkg"

    steps = {"mosaic": lambda: ", ".join(map(str, write_mosaics(list(outputs["map"].values()), out))),
             "vectors": vectors, "areas": areas}
    written: dict[str, Any] = {"errors": []}
    for role, step in steps.items():
        if (role == "mosaic" and not (with_mosaic and outputs["map"])) or (role == "vectors" and not outputs[role]):
            continue
        try:
            written[role] = str(step())
        except AerialsegError as exc:
            written["errors"].append(str(exc))
    return written
