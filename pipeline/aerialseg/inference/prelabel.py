"""serve's pre-labels: a class map + confidence -> scored X-AnyLabeling polygons (annotations.regions).

One polygon per 4-connected region that paints exactly its pixels in any order (holes opened, never cut
into strips; see ``aerialseg.annotations.regions``); regions under ``min_area_px`` are merged into their
surroundings first, so specks neither come back nor leave gaps. ``score`` is the region's mean confidence
(max probability). Background, ignore, regions under ``conf_threshold`` and classes not in ``keep`` are
left out; largest regions first.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from aerialseg.annotations.regions import find_regions, polygons
from aerialseg.core.classes import IGNORE

BACKGROUND = 0


def scored_shapes(classes: np.ndarray, confidence: np.ndarray, class_names: tuple[str, ...],
                  conf_threshold: float = 0.0, epsilon_factor: float = 0.0, min_area_px: float = 0.0,
                  keep: set[int] | None = None, on_region: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """X-AnyLabeling shapes of a class map (see the module docstring); ``keep`` None = every class;
    ``on_region(n)`` is called as regions are done (deadline checks)."""
    found = find_regions(classes, min_area_px)
    score = np.bincount(found.labels.ravel(), weights=confidence.ravel(),
                        minlength=len(found.values)) / np.maximum(found.pixels, 1)
    wanted = (found.pixels >= max(min_area_px, 1)) & (score >= conf_threshold)
    wanted &= ~np.isin(found.values, [BACKGROUND, IGNORE])
    if keep is not None:
        wanted &= np.isin(found.values, list(keep))
    wanted[0] = False
    ids = [int(i) for i in np.flatnonzero(wanted)]
    ids.sort(key=lambda i: (-int(found.pixels[i]), int(found.values[i]), i))
    outlines = polygons(found, ids, epsilon_factor=epsilon_factor, progress=on_region)
    return [{"label": class_names[found.values[i]], "shape_type": "polygon", "points": points,
             "score": round(float(score[i]), 4), "group_id": None, "description": "", "difficult": False,
             "flags": {}, "attributes": {}} for i in ids for points in outlines.get(i, [])]
