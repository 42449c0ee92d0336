"""Draws docs/labels_conventions.png: the same label shapes painted with both vertex conventions.

    .venv/bin/python docs/labels_figure.py
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Polygon as PolygonPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pipeline"))

from aerialseg.annotations.anylabeling import Shape  # noqa: E402
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes  # noqa: E402

WIDTH, HEIGHT = 14, 9
SHAPES = [Shape(0, "building", 4, "polygon", np.array([[2, 2], [6, 2], [6, 6], [2, 6]], float)),
          Shape(1, "tree", 3, "polygon", np.array([[8.3, 1.2], [12.6, 5.4], [8.8, 7.6]], float)),
          Shape(2, "road", 1, "polygon", np.array([[1, 8], [12, 8], [12, 8]], float))]  # a 1-px-thin polygon
COLOURS = {0: "#ffffff", 1: "#9e9e9e", 3: "#7cc47c", 4: "#f2b84b"}


def panel(ax: plt.Axes, convention: str, title: str) -> None:
    mask = rasterize_shapes(SHAPES, WIDTH, HEIGHT, MaskOptions(vertex_convention=convention))
    shift = 0.0 if convention == "center" else 0.5  # where pixel (c, r) sits in label coordinates: centre
    for (row, col), value in np.ndenumerate(mask):
        ax.add_patch(plt.Rectangle((col - 0.5 + shift, row - 0.5 + shift), 1, 1, facecolor=COLOURS[int(value)],
                                   edgecolor="#d0d0d0", linewidth=0.6))
    for shape in SHAPES:
        ax.add_patch(PolygonPatch(shape.points, closed=True, fill=False, edgecolor="black", linewidth=1.4))
        ax.plot(*shape.points.T, "o", color="black", markersize=3)
    counts = {name: int((mask == v).sum()) for name, v in (("building", 4), ("tree", 3), ("road", 1))}
    ax.set_title(f"{title}\n" + ", ".join(f"{k} {n} px" for k, n in counts.items()), fontsize=9)
    ax.set_xlim(-0.5 + shift, WIDTH - 0.5 + shift)
    ax.set_ylim(HEIGHT - 0.5 + shift, -0.5 + shift)
    ax.set_aspect("equal")
    ax.set_xticks(range(0, WIDTH + 1, 2))
    ax.set_yticks(range(0, HEIGHT + 1, 2))
    ax.tick_params(labelsize=7)


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panel(axes[0], "center", "vertex_convention: center (default)\nvertex (x, y) = centre of pixel (x, y)")
    panel(axes[1], "corner", "vertex_convention: corner (GIS)\npixel (c, r) = square [c, c+1) x [r, r+1)")
    fig.tight_layout()
    fig.savefig(HERE / "labels_conventions.png", dpi=110)
    print(f"wrote {HERE / 'labels_conventions.png'}")


if __name__ == "__main__":
    main()
