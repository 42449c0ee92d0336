"""The five aerialseg classes, their colours, and remap tables for other datasets."""

import numpy as np

IGNORE = 255
CLASS_NAMES: tuple[str, ...] = ("background", "road", "water", "tree", "building")
NUM_CLASSES = len(CLASS_NAMES)
# RGB display colours, index = class id.
COLORS: tuple[tuple[int, int, int], ...] = (
    (200, 200, 200),  # background: light grey
    (230, 25, 75),  # road: red
    (0, 130, 200),  # water: blue
    (60, 180, 75),  # tree: green
    (255, 200, 0),  # building: amber
)
IGNORE_COLOR = (0, 0, 0)

# OpenEarthMap (bao18/open_earth_map numbering) -> aerialseg.
OEM_TO_AERIALSEG: dict[int, int] = {
    0: IGNORE, 1: 0, 2: 0, 3: 0, 4: 1, 5: 3, 6: 2, 7: 0, 8: 4,
}


def lut(mapping: dict[int, int], default: int = IGNORE) -> np.ndarray:
    """A 256-entry uint8 lookup table from a value mapping; unmapped values -> default."""
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class mask (H, W) -> RGB image (H, W, 3); ignore shows as black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:] = IGNORE_COLOR
    palette[: len(COLORS)] = COLORS
    return palette[mask]


def colormap() -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table (class id -> RGBA) for single-band class rasters."""
    table = {i: (*c, 255) for i, c in enumerate(COLORS)}
    table[IGNORE] = (*IGNORE_COLOR, 0)
    return table
