"""label-to-mask: AnyLabeling / X-AnyLabeling / labelme JSON -> 5-class masks (stage wiring: stages/masks.py).

- Reading: ``aerialseg.annotations.anylabeling`` (label files, shapes, the image behind each file).
- Painting: ``aerialseg.annotations.rasterize`` — by default the annotation tools' own rule (vertices on pixel
  centres, boundary pixels painted, exactly as labelme's shape_to_mask); ``masks.vertex_convention: corner``
  is the GIS rule. docs/labels.md shows both.
- Unlabelled pixels are background (0); nodata/alpha areas of the scene are ignore (255).
- Output: a georeferenced scene gives ``<out>/<json stem>.tif`` on the scene's grid (CRS, transform, class
  colour table, nodata 255); anything else (incl. a TIFF without georeferencing, with a warning) gives a
  plain 8-bit PNG of class ids ``<out>/<json stem>.png``. An image known only from imageData is extracted
  unchanged to ``<out>/<stem>.scene.<ext>``. ``<out>/index.json`` lists every scene for the tiles stage.
- A TIFF scene without georeferencing is refused unless ``--allow-ungeoreferenced``
  (``masks.allow_ungeoreferenced``); then its mask is a PNG, with a warning.
- All-or-nothing: every file is read, checked and parsed once before the first mask is written. The run is
  written into a staging folder beside the output folder and swapped in only at the end (masks first, index.json
  last), so a failed or killed run leaves the previous masks and their index.json as they were; the masks of a
  previous run that this run no longer writes are removed. An output that is an input (a scene or label file,
  also through a symlink, hard link or letter case) is refused, and so is replacing a file the previous run
  did not write unless ``--overwrite``. Warnings (self-intersecting polygons, shapes outside the image) are
  printed once per file.
"""

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm import tqdm

from aerialseg.annotations.anylabeling import (MAX_IMAGE_PIXELS, MAX_SCENE_PIXELS, LabelTable, Scene, Shape,
                                               ShapeStats, find_label_files, load_label_json, parse_shapes,
                                               resolve_scene, unknown_labels, unknown_labels_error)
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes, self_intersecting, unpainted_shapes
from aerialseg.core.classes import CLASS_NAMES, IGNORE, colormap
from aerialseg.core.errors import AerialsegError, InputError
from aerialseg.core.fileio import atomic_path, write_json
from aerialseg.core.safety import environment_error, file_identity, refuse_inputs, temp_dir
from aerialseg.geo.raster import open_raster, valid_mask, write_class_geotiff

log = logging.getLogger(__name__)
LISTED = 10  # shape indices named in a warning
INDEX = "index.json"
TIFF_SUFFIXES = (".tif", ".tiff", ".gtif")


@dataclass
class LabelFile:
    """One label file, read and checked: its image and its shapes."""

    path: Path
    scene: Scene
    shapes: list[Shape]
    stats: ShapeStats


def apply_valid_mask(mask: np.ndarray, scene: Scene, rows_per_read: int = 1024,
                     label_path: Path | None = None) -> None:
    """Set nodata/alpha pixels of the scene to ignore, reading the scene's mask strip by strip.

    A scene without a single valid pixel (nodata or alpha = 0 everywhere) is an error: its mask would teach
    nothing and is most likely the wrong file or nodata value.
    """
    valid_pixels = mask.size
    if scene.embedded_valid is not None:
        mask[~scene.embedded_valid] = IGNORE
        valid_pixels = int(scene.embedded_valid.sum())
    if scene.path is not None and scene.needs_valid_mask:
        valid_pixels = 0
        with open_raster(scene.path, check_complete=False) as ds:  # checked when the label file was read
            block_h = ds.block_shapes[0][0] if ds.block_shapes else 1
            step = max(block_h, rows_per_read // block_h * block_h)
            for row in range(0, ds.height, step):
                win = Window(0, row, ds.width, min(step, ds.height - row))
                try:
                    valid = valid_mask(ds, win)
                except RasterioError as exc:
                    raise InputError(f"cannot read pixel data ({str(exc).splitlines()[0][:100]})", scene.path,
                                     "re-export the scene; the file is corrupt or truncated") from None
                mask[row:row + win.height][~valid] = IGNORE
                valid_pixels += int(valid.sum())
    if valid_pixels == 0:
        raise InputError("scene holds no valid pixel (nodata or alpha = 0 everywhere)", scene.path or label_path,
                         "check the scene's nodata value (gdalinfo) or point imagePath at the right image")


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


def scene_copy_path(item: LabelFile, out_dir: Path) -> Path | None:
    """Where an image known only from imageData is extracted (None when the scene is a file)."""
    if item.scene.path is not None:
        return None
    return out_dir / f"{item.path.stem}.scene{_image_suffix(item.scene.embedded or b'')}"


def convert_file(item: LabelFile, out_dir: Path, options: MaskOptions, stage: Path | None = None) -> dict[str, Any]:
    """Rasterise one checked label file into ``stage`` (default: out_dir); return its index entry (final paths)."""
    scene, stage = item.scene, stage or out_dir
    _report(item, options)
    mask = rasterize_shapes(item.shapes, scene.width, scene.height, options)
    apply_valid_mask(mask, scene, label_path=item.path)
    dest = mask_path_for(item.path, out_dir, scene)
    scene_path = scene_copy_path(item, out_dir)
    if scene_path is not None:
        with atomic_path(stage / scene_path.name) as tmp:
            tmp.write_bytes(scene.embedded or b"")
    else:
        scene_path = scene.path
        if scene.profile is None and scene.path.suffix.lower() in TIFF_SUFFIXES:
            log.warning("%s: scene is not georeferenced; mask written as PNG", scene.path)
    write_mask(stage / dest.name, mask, scene)
    counts = np.bincount(mask.ravel(), minlength=256)
    class_pixels = {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)} | {"ignore": int(counts[IGNORE])}
    return {"scene": _display(scene_path), "mask": _display(dest), "labels": _display(item.path),
            "georeferenced": scene.georeferenced, "width": scene.width, "height": scene.height,
            "vertex_convention": options.vertex_convention, "shape_counts": item.stats.as_dict(),
            "class_pixels": class_pixels}


def read_label_files(files: Sequence[Path], table: LabelTable, images_dir: Path | None,
                     max_pixels: int = MAX_IMAGE_PIXELS, max_scene_pixels: float = MAX_SCENE_PIXELS
                     ) -> list[LabelFile]:
    """Read and check every file; unknown labels of all files are reported together in one error."""
    items, unknown = [], {}
    for path in files:
        doc = load_label_json(path)
        if missing := unknown_labels(doc, table):
            unknown[path] = missing
            continue
        shapes, stats = parse_shapes(doc, path, table)
        items.append(LabelFile(path, resolve_scene(doc, path, images_dir, max_pixels, max_scene_pixels), shapes, stats))
    if unknown:
        raise unknown_labels_error(unknown)
    return items


def labels_to_masks(sources: Iterable[str | Path], out_dir: str | Path, table: LabelTable,
                    options: MaskOptions = MaskOptions(), images_dir: str | Path | None = None,
                    allow_ungeoreferenced: bool = False, overwrite: bool = False,
                    max_pixels: int = MAX_IMAGE_PIXELS, max_scene_pixels: float = MAX_SCENE_PIXELS) -> list[Path]:
    """Convert every label file to a mask in out_dir and write out_dir/index.json; return the mask paths.

    Everything is checked (JSON, labels, images, sizes, shapes, outputs) before the first file is written;
    the run is staged beside out_dir and swapped in at the end (see the module docstring).
    """
    out_dir = Path(out_dir)
    items = read_label_files(find_label_files(sources), table, Path(images_dir) if images_dir else None, max_pixels,
                             max_scene_pixels)
    _check_unique_outputs(items, out_dir)
    if not allow_ungeoreferenced:
        _check_georeferenced(items)
    names = _output_names(items, out_dir)
    previous = _previous_outputs(out_dir)
    _check_outputs(items, out_dir, names, previous, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (environment_error(exc, out_dir) or exc) from None
    with temp_dir(out_dir.parent, out_dir.name) as stage:
        entries = [convert_file(item, out_dir, options, stage)
                   for item in tqdm(items, desc="label-to-mask", unit="file", disable=None)]
        write_json(stage / INDEX, entries)
        _swap_in(stage, out_dir, names, previous - set(names))
    n_shapes = sum(e["shape_counts"]["total"] for e in entries)
    log.info("label-to-mask: %d file(s), %d shape(s) -> %s", len(items), n_shapes, out_dir)
    return [out_dir / Path(e["mask"]).name for e in entries]


def _output_names(items: Sequence[LabelFile], out_dir: Path) -> list[str]:
    """File names this run writes into out_dir (masks, extracted scenes), index.json last."""
    names = []
    for item in items:
        names.append(mask_path_for(item.path, out_dir, item.scene).name)
        if (copy := scene_copy_path(item, out_dir)) is not None:
            names.append(copy.name)
    return names + [INDEX]


def _previous_outputs(out_dir: Path) -> set[str]:
    """Names of the files the previous run listed in out_dir/index.json (masks and extracted scenes)."""
    try:
        entries = read_json_list(out_dir / INDEX)
    except (OSError, ValueError, RecursionError):
        return set()
    found = {INDEX}
    for entry in entries:
        if isinstance(entry, dict):
            found.update(Path(str(entry[k])).name for k in ("mask", "scene")
                         if entry.get(k) and (k == "mask" or ".scene." in Path(str(entry[k])).name))
    return found


def read_json_list(path: Path) -> list[Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError("not a list")
    return data


def _check_georeferenced(items: Sequence[LabelFile]) -> None:
    for item in items:
        scene = item.scene
        if scene.path is not None and scene.profile is None and scene.path.suffix.lower() in TIFF_SUFFIXES:
            raise InputError("TIFF scene is not georeferenced (no CRS or geotransform)", scene.path,
                             "georeference it (e.g. gdal_edit.py -a_srs/-a_ullr), or pass "
                             "--allow-ungeoreferenced (masks.allow_ungeoreferenced) for a plain PNG mask")


def _check_outputs(items: Sequence[LabelFile], out_dir: Path, names: Sequence[str], previous: set[str],
                   overwrite: bool) -> None:
    """No output may be an input; an existing file the previous run did not write needs --overwrite."""
    inputs = [p for item in items for p in (item.path, item.scene.path) if p is not None]
    outputs = [out_dir / name for name in names]
    refuse_inputs(outputs, inputs, "write the masks to another folder (--out / masks.out)")
    _check_out_dir(items, out_dir)
    if overwrite:
        return
    for path in outputs:
        if (path.exists() or path.is_symlink()) and path.name not in previous:
            raise AerialsegError("exists and was not written by label-to-mask (not in the folder's index.json)",
                                 path, "pass --overwrite to replace it, or write the masks to another folder (--out)")


def _swap_in(stage: Path, out_dir: Path, names: Sequence[str], obsolete: set[str]) -> None:
    """Move the staged files into out_dir (index.json last), then drop the previous run's leftovers."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            _move(stage / name, out_dir / name)
        for name in sorted(obsolete):
            old = out_dir / name
            if old.is_file() and not old.is_symlink():
                old.unlink()
    except OSError as exc:
        raise (environment_error(exc, out_dir / INDEX) or exc) from None


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # EXDEV: out_dir is another file system (a mount point): copy there
            raise
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def _check_unique_outputs(items: Sequence[LabelFile], out_dir: Path) -> None:
    seen: dict[Path, Path] = {}
    for item in items:
        dest = mask_path_for(item.path, out_dir, item.scene).with_suffix("")
        if dest in seen:
            raise AerialsegError(f"same file name as {seen[dest]}: both would write {dest}.*", item.path,
                                 "give the label files unique names (masks are named after them)")
        seen[dest] = item.path


def _check_out_dir(items: Sequence[LabelFile], out_dir: Path) -> None:
    """The output folder may not hold label files of this run: AnyLabeling / labelme would pair each mask
    (named like the label file) with the JSON as its image."""
    _, target = file_identity(out_dir)
    if target is None:
        return  # a new folder holds no label file
    folders: dict[Path, tuple[int, int] | None] = {}
    for item in items:
        parent = item.path.parent
        if parent not in folders:
            folders[parent] = file_identity(parent)[1]
        if folders[parent] == target:
            raise AerialsegError(f"output folder holds the label files (e.g. {item.path.name}); the annotation tools "
                                 "would take each mask for the image of the JSON beside it", out_dir,
                                 "write the masks to a folder outside the labels folder (--out / masks.out)")
