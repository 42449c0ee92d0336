"""infer-scene's refusals before any tile is computed: which files a run writes, outputs that are inputs or
another scene's map, scenes without georeferencing or without one valid pixel. ``options``: an InferOptions
(``aerialseg.inference.scene``, which imports this module)."""

import logging
from pathlib import Path
from typing import Any

from rasterio.windows import Window

from aerialseg.core.errors import AerialsegError
from aerialseg.core.safety import refuse_inputs
from aerialseg.geo.raster import is_georeferenced
from aerialseg.geo.scene import SceneReader
from aerialseg.inference.map_owner import check_owner

log = logging.getLogger("aerialseg.inference.scene")  # the messages are infer-scene's

PLAIN_IMAGES = ("JPEG", "PNG")  # GDAL drivers of plain photos: mapped on their pixel grid without --allow-...


def output_paths(scene: Path, out: Path | None, options: Any) -> dict[str, Path]:
    """Every file this run will write, keyed by role (map, style, confidence, vectors, areas, preview)."""
    if out is not None and out.is_dir():
        out = out / (f"{scene.stem}.json" if options.format == "anylabeling" else f"{scene.stem}_landcover.tif")
    if options.format == "anylabeling":
        main = out or scene.with_suffix(".json")
        if main.is_file() and not options.overwrite:
            raise AerialsegError("a label file already exists here; it may hold hand-drawn labels", main,
                                 "pass --out to write the prediction elsewhere, or --overwrite to replace it "
                                 "(a .bak copy is kept)")
    else:
        main = out or Path(options.out_dir) / f"{scene.stem}_landcover.tif"
    stem = main.with_suffix("")
    paths = {"map": main}
    if options.format == "geotiff":  # QGIS loads <map>.qml beside <map>.tif: class names and colours
        paths["style"] = main.with_suffix(".qml")
    if options.confidence:
        paths["confidence"] = Path(f"{stem}_confidence.tif")
    if options.vectors:
        paths["vectors"] = Path(f"{stem}_polygons.gpkg")
    if options.areas:
        paths["areas"] = Path(f"{stem}_areas.json")
    if options.preview:  # AnyLabeling JSON sits among the images: its preview goes to out_dir, not beside it
        preview_dir = Path(options.out_dir) if options.format == "anylabeling" else stem.parent
        paths["preview"] = preview_dir / f"{stem.name}_preview.png"
    return paths


def check_outputs(paths: dict[str, Path], scene: Path, model: Path) -> None:
    """No output may be the scene or a file of the model bundle (also through links or letter case)."""
    model_files = [p for p in model.iterdir() if p.is_file()] if model.is_dir() else [model]
    refuse_inputs(paths.values(), [scene, *model_files], "pass another --out (the map must not replace an input)")
    check_owner(paths["map"], scene)  # a map of another scene with the same file name is not replaced
    seen: dict[Path, str] = {}
    for role, path in paths.items():
        if path.absolute() in seen:
            raise AerialsegError(f"the {role} and the {seen[path.absolute()]} would be the same file", path,
                                 "pass another --out")
        seen[path.absolute()] = role


def check_scene(reader: SceneReader, path: Path, options: Any, rows: int = 1024) -> None:
    """Refuse a scene without georeferencing (unless allowed or a plain JPEG/PNG: one warning) and one that is
    nodata everywhere."""
    ds = reader.ds
    if not is_georeferenced(ds) and not options.allow_ungeoreferenced and ds.driver in PLAIN_IMAGES:
        log.warning("%s: plain %s image without georeference: the map is on its pixel grid, areas are pixel "
                    "counts", path, ds.driver)
    elif not is_georeferenced(ds) and not options.allow_ungeoreferenced:
        raise AerialsegError("scene is not georeferenced (no CRS or geotransform): the map could not be placed "
                             "on the ground", path, "georeference it (e.g. gdal_edit.py -a_srs/-a_ullr), or pass "
                             "--allow-ungeoreferenced for a map on the pixel grid")
    for row in range(0, ds.height, rows):
        if reader.valid(Window(0, row, ds.width, min(rows, ds.height - row))).any():
            return
    raise AerialsegError("scene holds no valid pixel (nodata, alpha = 0 or NaN everywhere)", path,
                         "check the scene's nodata value (gdalinfo) or pass the right file")
