"""mask-to-label (`aerialseg mask-to-label`, params ``masks``): class masks -> AnyLabeling JSON (no DVC stage).

Defaults for ``--simplify`` and ``--min-area`` come from ``masks.simplify_px`` and ``masks.min_area_px``;
the polygons are traced by ``annotations.polygonize.masks_to_labels``.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerialseg.annotations.polygonize import masks_to_labels
from aerialseg.core.config import section


def run(params: dict[str, Any], masks: Sequence[str | Path], out_dir: str | Path | None = None,
        image: str | Path | None = None, simplify_px: float | None = None, min_area_px: float | None = None,
        overwrite: bool = False, backup: bool = True) -> list[Path]:
    """Every mask -> AnyLabeling JSON; simplify/min-area that are None take the params value."""
    cfg = section(params, "masks")
    simplify = float(cfg.get("simplify_px", 0.0) if simplify_px is None else simplify_px)
    min_area = float(cfg.get("min_area_px", 0.0) if min_area_px is None else min_area_px)
    return masks_to_labels(masks, out_dir, image, simplify, min_area, overwrite, backup)
