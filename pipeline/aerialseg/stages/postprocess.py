"""postprocess (`aerialseg postprocess`, params ``postprocess``): objects of a class raster (no DVC stage).

Reads the ``postprocess`` section (flags that are given win) and calls ``inference.postprocess.postprocess``,
which writes ``postprocess.out``/<stem>.objects.{geojson,csv,json} (+ preview PNG, + cleaned raster).
"""

from pathlib import Path
from typing import Any

from aerialseg.core.config import DEFAULT_PARAMS, check_keys, section
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.postprocess import ObjectFilter, postprocess

KEYS = {"out", "classes", "min_area", "max_area", "min_aspect", "max_aspect", "area_unit", "band_rows", "clean",
        "preview"}


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AerialsegError(f"postprocess.{key} must be a number or null, not {value!r}", DEFAULT_PARAMS) from None


def run(params: dict[str, Any], class_raster: str | Path, **overrides: Any) -> dict[str, Any]:
    """Objects of ``class_raster`` with the ``postprocess`` knobs; ``overrides`` (keys of the section) that
    are not None win. Returns the summary written to ``<out>/<stem>.objects.json``."""
    cfg = {**section(params, "postprocess"), **{k: v for k, v in overrides.items() if v is not None}}
    check_keys("postprocess", cfg, sorted(KEYS))
    object_filter = ObjectFilter(**{k: _number(cfg.get(k), k) for k in ("min_area", "max_area", "min_aspect",
                                                                      "max_aspect")},
                                 area_unit=cfg.get("area_unit") or "px")
    for low, high in (("min_area", "max_area"), ("min_aspect", "max_aspect")):
        if cfg.get(low) is not None and cfg.get(high) is not None and float(cfg[low]) > float(cfg[high]):
            raise AerialsegError(f"{low} {cfg[low]} is above {high} {cfg[high]}", DEFAULT_PARAMS, "swap them")
    return postprocess(class_raster, cfg.get("out") or "reports/objects", classes=cfg.get("classes"),
                       object_filter=object_filter, band_rows=int(cfg.get("band_rows") or 1024),
                       clean=bool(cfg.get("clean", False)), preview=bool(cfg.get("preview", True)))
