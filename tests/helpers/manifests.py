"""A constructed tiles manifest (a window grid with made-up class counts), shared by the split and labelled tests."""

from typing import Any

import numpy as np


def grid_manifest(scenes: dict[str, tuple[int, int]], size: int, stride: int) -> dict[str, Any]:
    """A constructed manifest: every window of a size/stride grid, with made-up class counts."""
    rng = np.random.default_rng(3)
    patches = []
    for name, (height, width) in scenes.items():
        for row in range(0, height - size + 1, stride):
            for col in range(0, width - size + 1, stride):
                counts = [int(c) for c in rng.multinomial(size * size, [0.5, 0.1, 0.1, 0.15, 0.1, 0.05])]
                patches.append({"id": f"{name}_r{row}_c{col}", "scene": f"{name}.tif", "mask": f"{name}_m.tif",
                                "scene_name": name, "row": row, "col": col, "height": size, "width": size,
                                "counts": counts, "empty": False})
    return {"patches": patches, "scenes": [{"scene_name": n, "height": h, "width": w}
                                           for n, (h, w) in scenes.items()]}
