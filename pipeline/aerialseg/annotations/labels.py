"""masks stage (label-to-mask): AnyLabeling / X-AnyLabeling / labelme JSON -> 5-class masks.

- Reading: ``aerialseg.annotations.anylabeling`` (label files, shapes, the image behind each file).
- Painting: ``aerialseg.annotations.rasterize`` — by default the annotation tools' own rule (vertices on pixel
  centres, boundary pixels painted, exactly as labelme's shape_to_mask); ``masks.vertex_convention: corner``
  is the GIS rule. docs/labels.md shows both.
- Unlabelled pixels are background (0); nodata/alpha areas of the scene are ignore (255).
- Output: a georeferenced scene gives ``<out>/<json stem>.tif`` on the scene's grid (CRS, transform, class
  colour table, nodata 255); anything else (incl. a TIFF without georeferencing, with a warning) gives a
  plain 8-bit PNG of class ids ``<out>/<json stem>.png``. An image known only from imageData is extracted
  unchanged to ``<out>/<stem>.scene.<ext>``. ``<out>/index.json`` lists every scene for the tiles stage.
- All-or-nothing: every file is read, checked and parsed once before the first mask is written; on an error
  no mask is left. Warnings (self-intersecting polygons, shapes outside the image) are printed once per file.
"""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.annotations.anylabeling import (LabelTable, Scene, Shape, ShapeStats, find_label_files, load_label_json,
                                               parse_shapes, resolve_scene, unknown_labels, unknown_labels_error)
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes, self_intersecting, unpainted_shapes
from aerialseg.core.classes import CLASS_NAMES, IGNORE, colormap
from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.geo.raster import open_raster, valid_mask, write_class_geotiff

log = logging.getLogger(__name__)
LISTED = 10  # shape indices named in a warning


@dataclass
class LabelFile:
    """One label file, read and checked: its image and its shapes."""

    path: Path
    scene: Scene
    shapes: list[Shape]
    stats: ShapeStats


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


# --- writing -------------------------------------------------------------------------------------

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


def _warn(path: Path, what: str, indices: Sequence[int]) -> None:
    listed = ", ".join(map(str, indices[:LISTED])) + (", ..." if len(indices) > LISTED else "")
    log.warning("%s: %d %s (shape %s)", path, len(indices), what, listed)


def _report(item: LabelFile, options: MaskOptions) -> None:
    """Fill the file's warning lists and print each warning once."""
    stats, scene = item.stats, item.scene
    stats.self_intersecting = self_intersecting(item.shapes)
    stats.unpainted = unpainted_shapes(item.shapes, scene.width, scene.height, options)
    if stats.self_intersecting:
        rule = "even-odd rule, as the tools show them" if options.vertex_convention == "center" else "make_valid"
        _warn(item.path, f"self-intersecting polygon(s) painted with the {rule}; check them in AnyLabeling",
              stats.self_intersecting)
    if stats.unpainted:
        _warn(item.path, "shape(s) paint nothing (wholly outside the image, or a circle of radius 0)",
              stats.unpainted)
    if stats.skipped:
        log.info("%s: skipped %d cuboid shape(s) (no footprint)", item.path, stats.skipped)


def convert_file(item: LabelFile, out_dir: Path, options: MaskOptions, written: list[Path]) -> dict[str, Any]:
    """Rasterise one checked label file; return its index entry (paths written are appended to `written`)."""
    scene = item.scene
    _report(item, options)
    mask = rasterize_shapes(item.shapes, scene.width, scene.height, options)
    apply_valid_mask(mask, scene)
    dest = mask_path_for(item.path, out_dir, scene)
    if scene.path is None:
        scene_path = out_dir / f"{item.path.stem}.scene{_image_suffix(scene.embedded or b'')}"
        with atomic_path(scene_path) as tmp:
            tmp.write_bytes(scene.embedded or b"")
        written.append(scene_path)
    else:
        scene_path = scene.path
        if scene.profile is None and scene.path.suffix.lower() in (".tif", ".tiff", ".gtif"):
            log.warning("%s: scene is not georeferenced; mask written as PNG", scene.path)
    write_mask(dest, mask, scene)
    written.append(dest)
    counts = np.bincount(mask.ravel(), minlength=256)
    class_pixels = {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)} | {"ignore": int(counts[IGNORE])}
    return {"scene": _display(scene_path), "mask": _display(dest), "labels": _display(item.path),
            "georeferenced": scene.georeferenced, "width": scene.width, "height": scene.height,
            "vertex_convention": options.vertex_convention, "shape_counts": item.stats.as_dict(),
            "class_pixels": class_pixels}


def read_label_files(files: Sequence[Path], table: LabelTable, images_dir: Path | None) -> list[LabelFile]:
    """Read and check every file; unknown labels of all files are reported together in one error."""
    items, unknown = [], {}
    for path in files:
        doc = load_label_json(path)
        if missing := unknown_labels(doc, table):
            unknown[path] = missing
            continue
        shapes, stats = parse_shapes(doc, path, table)
        items.append(LabelFile(path, resolve_scene(doc, path, images_dir), shapes, stats))
    if unknown:
        raise unknown_labels_error(unknown)
    return items


def labels_to_masks(sources: Iterable[str | Path], out_dir: str | Path, table: LabelTable,
                    options: MaskOptions = MaskOptions(), images_dir: str | Path | None = None) -> list[Path]:
    """Convert every label file to a mask in out_dir and write out_dir/index.json; return the mask paths.

    Everything is checked (JSON, labels, images, sizes, shapes) before the first file is written,
    and a failure later removes what this run wrote.
    """
    out_dir = Path(out_dir)
    items = read_label_files(find_label_files(sources), table, Path(images_dir) if images_dir else None)
    _check_unique_outputs(items, out_dir)
    written: list[Path] = []
    try:
        entries = [convert_file(item, out_dir, options, written)
                   for item in tqdm(items, desc="label-to-mask", unit="file", disable=None)]
        write_json(out_dir / "index.json", entries)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    n_shapes = sum(e["shape_counts"]["total"] for e in entries)
    log.info("label-to-mask: %d file(s), %d shape(s) -> %s", len(items), n_shapes, out_dir)
    return [Path(e["mask"]) for e in entries]


def _check_unique_outputs(items: Sequence[LabelFile], out_dir: Path) -> None:
    seen: dict[Path, Path] = {}
    for item in items:
        dest = mask_path_for(item.path, out_dir, item.scene).with_suffix("")
        if dest in seen:
            raise AerialsegError(f"same file name as {seen[dest]}: both would write {dest}.*", item.path,
                                 "give the label files unique names (masks are named after them)")
        seen[dest] = item.path


def masks_stage(params: dict[str, Any], labels: Sequence[str | Path] | None = None,
                out: str | Path | None = None, images: str | Path | None = None) -> list[Path]:
    """DVC stage `masks`: params data.labels -> masks.out (+ index.json); arguments override params."""
    data = section(params, "data")
    configured = data.get("labels") or "data/labels"
    sources = list(labels) if labels else (configured if isinstance(configured, list) else [configured])
    out_dir = out or section(params, "masks").get("out", "data/masks")
    return labels_to_masks(sources, out_dir, LabelTable.from_params(params), MaskOptions.from_params(params),
                           images or data.get("images"))
