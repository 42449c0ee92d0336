"""mask-to-label: a class mask (GeoTIFF or PNG of class ids) -> AnyLabeling JSON that paints back to it.

The polygons come from the one converter, ``annotations.regions`` (also used by infer-scene ``--format
anylabeling`` and serve): one polygon per 4-connected region, holes opened by a hair-thin slit, vertices
0.1-0.3 px from the boundary pixels' centres. Each shape paints exactly its region through label-to-mask,
labelme and X-AnyLabeling (docs/labels.md), in any order:
- background (0) is not written (unlabelled pixels are background); ignore (255) regions are written as
  label ``__ignore__`` so they stay ignore;
- ``min_area_px`` merges regions smaller than that many pixels into the nearest larger region (they take its
  class) and ``simplify_px`` > 0 simplifies each polygon (Douglas-Peucker): both trade exactness for smaller
  files. Shapes are written largest region first.
- The label file never replaces an input (the mask, the image) and never an existing label file (hand labels
  beside the image) unless ``--overwrite``; the replaced file is then kept as ``<name>.<UTC time>.bak``.
"""

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aerialseg.annotations.anylabeling import IMAGE_SUFFIXES, anylabeling_document, dumps_label_json
from aerialseg.annotations.regions import find_regions, polygons
from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_text
from aerialseg.core.safety import backup_path, refuse_inputs
from aerialseg.geo.raster import open_raster

log = logging.getLogger(__name__)

IGNORE_LABEL = "__ignore__"
VALID_VALUES = (*range(len(CLASS_NAMES)), IGNORE)
BACKGROUND = 0


def label_name(value: int) -> str:
    return IGNORE_LABEL if value == IGNORE else CLASS_NAMES[value]


def mask_to_shapes(mask: np.ndarray, simplify_px: float = 0.0, min_area_px: float = 0.0) -> list[dict[str, Any]]:
    """AnyLabeling polygon shapes, largest region first, that paint back to `mask` (after merging regions under
    ``min_area_px``; see the module docstring). mask: (H, W) classes 0..4 and 255 (ignore)."""
    check_class_values(mask)
    found = find_regions(mask, min_area_px)
    ids = [i for i in np.argsort(-found.pixels, kind="stable")
           if i and found.values[i] != BACKGROUND and found.pixels[i] >= min_area_px]
    outlines = polygons(found, ids, simplify_px)
    return [{"label": label_name(int(found.values[i])), "points": points, "group_id": None, "description": "",
             "shape_type": "polygon", "flags": {}} for i in ids for points in outlines.get(i, [])]


def check_class_values(mask: np.ndarray, path: str | Path | None = None) -> None:
    """Fail unless every value is a class id 0..4 or 255 (ignore)."""
    if mask.ndim != 2:
        raise AerialsegError(f"mask must be 2-D (H, W), got shape {mask.shape}", path)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise AerialsegError(f"mask values span {mask.min()}..{mask.max()}, expected class ids", path)
    counts = np.bincount(mask.astype(np.uint8, copy=False).ravel(), minlength=256)
    stray = [int(v) for v in np.flatnonzero(counts) if v not in VALID_VALUES]
    if stray:
        raise AerialsegError(f"mask holds value(s) {stray[:10]} outside the classes {VALID_VALUES}", path,
                             "map the values to class ids 0-4 (255 = ignore) first")


def read_class_mask(path: str | Path) -> np.ndarray:
    """Band 1 of a single-band class raster (GeoTIFF, palette or grey PNG), checked for valid class values."""
    with open_raster(path) as ds:
        if ds.count != 1 or ds.dtypes[0] != "uint8":
            raise AerialsegError(f"mask has {ds.count} band(s) of {ds.dtypes[0]}; expected one uint8 band of "
                                 f"class ids {VALID_VALUES}", path,
                                 "pass a class mask (e.g. from label-to-mask), not a colour rendering")
        mask = ds.read(1)
    check_class_values(mask, path)
    return mask


def find_image_for(mask_path: Path, image: Path | None) -> Path:
    """The image a mask belongs to: IMAGE itself, <stem>.* inside folder IMAGE, or <stem>.* beside the mask."""
    if image is not None and image.is_file():
        return image
    folder = image if image is not None else mask_path.parent
    if image is not None and not image.is_dir():
        raise AerialsegError("image not found", image, "pass the image file (or a folder of images) via --image")
    for sfx in IMAGE_SUFFIXES:
        for cand in (folder / f"{mask_path.stem}{sfx}", folder / f"{mask_path.stem}{sfx.upper()}"):
            if cand.is_file() and cand.resolve() != mask_path.resolve():
                return cand
    raise AerialsegError(f"no image named {mask_path.stem}.* in {folder} for this mask", mask_path,
                         "pass --image IMAGE (the image file, or a folder holding it)")


def label_document(mask: np.ndarray, image_path: Path, dest: Path, simplify_px: float = 0.0,
                   min_area_px: float = 0.0) -> dict[str, Any]:
    """The AnyLabeling document for `mask`, to be saved as `dest` (imagePath relative to dest's folder)."""
    rel = Path(os.path.relpath(image_path.resolve(), dest.resolve().parent)).as_posix()
    shapes = mask_to_shapes(mask, simplify_px, min_area_px)
    return anylabeling_document(shapes, rel, mask.shape[1], mask.shape[0])


def label_path_for(mask_path: Path, out_dir: str | Path | None, image: str | Path | None) -> tuple[Path, Path]:
    """(the mask's image, the label file to write): <out_dir or the image's folder>/<image stem>.json."""
    image_path = find_image_for(mask_path, Path(image) if image else None)
    return image_path, (Path(out_dir) if out_dir else image_path.parent) / f"{image_path.stem}.json"


def check_label_dest(dest: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """A label file never replaces an input, nor an existing label file unless ``overwrite``."""
    refuse_inputs([dest], inputs, "write the label file elsewhere (--out FOLDER)")
    if (dest.exists() or dest.is_symlink()) and not overwrite and not dest.is_dir():
        raise AerialsegError("a label file already exists here; it may hold hand-drawn labels", dest,
                             "pass --out FOLDER to write elsewhere, or --overwrite to replace it (a .bak copy is kept)")


def mask_file_to_label(mask_path: str | Path, out_dir: str | Path | None = None, image: str | Path | None = None,
                       simplify_px: float = 0.0, min_area_px: float = 0.0, overwrite: bool = False,
                       backup: bool = True) -> Path:
    """Write <out_dir>/<image stem>.json for one mask; out_dir defaults to the image's folder.

    An existing label file is replaced only with ``overwrite``; ``backup`` then keeps it as
    ``<name>.<UTC time>.bak`` beside it.
    """
    mask_path = Path(mask_path)
    image_path, dest = label_path_for(mask_path, out_dir, image)
    check_label_dest(dest, [mask_path, image_path], overwrite)
    mask = read_class_mask(mask_path)
    with open_raster(image_path) as ds:
        if (ds.height, ds.width) != mask.shape:
            raise AerialsegError(f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                                 f"{ds.width}x{ds.height}", mask_path, "pass the image this mask was made from")
    doc = label_document(mask, image_path, dest, simplify_px, min_area_px)
    if backup and dest.is_file():
        kept = backup_path(dest)
        shutil.copy2(dest, kept)
        log.info("%s: previous label file kept as %s", dest, kept.name)
    write_text(dest, dumps_label_json(doc))
    log.info("%s: %d polygon(s) -> %s", mask_path, len(doc["shapes"]), dest)
    return dest


def masks_to_labels(masks: Sequence[str | Path], out_dir: str | Path | None = None, image: str | Path | None = None,
                    simplify_px: float = 0.0, min_area_px: float = 0.0, overwrite: bool = False,
                    backup: bool = True) -> list[Path]:
    """Every mask -> AnyLabeling JSON (see ``mask_file_to_label``).

    Every destination is checked (not an input, no existing label file unless ``overwrite``) before the
    first file is written.
    """
    if simplify_px < 0 or min_area_px < 0:
        raise AerialsegError("--simplify and --min-area must be >= 0", None, "pass 0 or a positive number")
    if image and Path(image).is_file() and len(masks) > 1:
        raise AerialsegError("one --image file for several masks", image, "pass a folder of images via --image")
    plans = [(Path(m), *label_path_for(Path(m), out_dir, image)) for m in masks]
    every_input = [p for mask, img, _ in plans for p in (mask, img)]
    seen: dict[Path, Path] = {}
    for mask, _, dest in plans:
        check_label_dest(dest, every_input, overwrite)
        if dest.absolute() in seen:
            raise AerialsegError(f"same label file as for {seen[dest.absolute()]}: {dest}", mask,
                                 "give each mask its own image (or --out folder)")
        seen[dest.absolute()] = mask
    return [mask_file_to_label(m, out_dir, image, simplify_px, min_area_px, overwrite, backup) for m in masks]
