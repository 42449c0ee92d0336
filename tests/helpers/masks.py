"""A constructed class mask with every topology a polygon converter meets."""

import numpy as np

from aerialseg.core.classes import IGNORE


def nested_mask() -> np.ndarray:
    """Rings in rings, islands in holes, diagonal-only contacts, 1-px lines, ignore inside a region."""
    mask = np.zeros((90, 120), np.uint8)
    mask[5:85, 5:70] = 4  # building
    mask[15:75, 15:60] = 2  # water hole in the building
    mask[25:65, 25:50] = 3  # tree island in the water
    mask[35:55, 32:43] = 0  # background hole in the island
    mask[40:50, 36:39] = 1  # road inside that hole
    mask[44, 20:58] = 1  # a 1-px road crossing water, island and hole
    mask[10:14, 75:79] = IGNORE  # ignore block outside, touching nothing
    mask[60:70, 80:90] = IGNORE
    mask[63:66, 83:86] = 3  # tree inside ignore
    checker = np.indices((8, 8)).sum(axis=0) % 2 == 0
    mask[0:8, 100:108][checker] = 3  # diagonal-only contacts (4-connectivity)
    mask[80:90, 110:120] = 2  # touching the image border
    mask[20, 90] = 4  # single pixel
    return mask
