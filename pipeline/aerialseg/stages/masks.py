"""masks stage (`aerialseg label-to-mask`, params ``masks``, ``data``, ``classes``): label JSON -> class masks.

Reads ``data.labels`` (files, folders or globs) and ``data.images``, maps label text with ``classes.labels``
and paints with the ``masks`` knobs; writes ``masks.out`` (masks + index.json) through
``annotations.labels.labels_to_masks``.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerialseg.annotations.anylabeling import MAX_IMAGE_PIXELS, MAX_SCENE_PIXELS, LabelTable, class_id
from aerialseg.annotations.labels import labels_to_masks
from aerialseg.annotations.rasterize import CONVENTIONS, MaskOptions
from aerialseg.core.config import DEFAULT_PARAMS, section
from aerialseg.core.errors import AerialsegError


def label_table(params: dict[str, Any]) -> LabelTable:
    """params.yaml ``classes.labels``: label text -> class."""
    raw = section(params, "classes").get("labels") or {}
    if not isinstance(raw, dict):
        raise AerialsegError("classes.labels must be a mapping label -> class", DEFAULT_PARAMS)
    return LabelTable.from_mapping(raw)


def mask_options(params: dict[str, Any]) -> MaskOptions:
    """Read and check params.yaml ``masks``: how shapes become pixels."""
    cfg = section(params, "masks")
    convention = str(cfg.get("vertex_convention", "center")).lower()
    if convention not in CONVENTIONS:
        raise AerialsegError(f"masks.vertex_convention must be center or corner, got {convention!r}",
                             DEFAULT_PARAMS, "center: the annotation tools' rule; corner: the GIS rule")
    all_touched = bool(cfg.get("all_touched", False))
    if all_touched and convention == "center":
        raise AerialsegError("masks.all_touched applies to vertex_convention: corner only", DEFAULT_PARAMS,
                             "set all_touched: false, or vertex_convention: corner")
    priority = tuple(class_id(n, "masks.priority") for n in (cfg.get("priority") or []))
    return MaskOptions(_whole_px(cfg, "line_width_px", 5, 1), _whole_px(cfg, "point_radius_px", 5, 1), priority,
                       convention, all_touched)


def _whole_px(cfg: dict[str, Any], key: str, default: int, low: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or not low <= value < 1000:
        raise AerialsegError(f"masks.{key} must be a whole number of pixels from {low} to 999, got {value!r}",
                             DEFAULT_PARAMS, f"set masks.{key} to e.g. {default}")
    return int(value)


def _max_pixels(value: Any, key: str = "max_image_pixels") -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
        raise AerialsegError(f"masks.{key} must be a positive number, got {value!r}", DEFAULT_PARAMS,
                             f"set it to e.g. {MAX_IMAGE_PIXELS if key == 'max_image_pixels' else 4000}")
    return int(value)


def run(params: dict[str, Any], labels: Sequence[str | Path] | None = None, out: str | Path | None = None,
        images: str | Path | None = None, allow_ungeoreferenced: bool | None = None,
        overwrite: bool = False) -> list[Path]:
    """params data.labels -> masks.out (+ index.json); arguments that are given override params."""
    data, cfg = section(params, "data"), section(params, "masks")
    configured = data.get("labels") or "data/labels"
    sources = list(labels) if labels else (configured if isinstance(configured, list) else [configured])
    out_dir = out or cfg.get("out", "data/masks")
    allow = bool(cfg.get("allow_ungeoreferenced", False)) if allow_ungeoreferenced is None else allow_ungeoreferenced
    return labels_to_masks(sources, out_dir, label_table(params), mask_options(params),
                           images or data.get("images"), allow, overwrite,
                           _max_pixels(cfg.get("max_image_pixels", MAX_IMAGE_PIXELS)),
                           _max_pixels(cfg.get("max_scene_megapixels", MAX_SCENE_PIXELS // 10**6),
                                       "max_scene_megapixels") * 1e6)
