"""label-to-mask's time on many small label files, and the share spent in its output safety checks.

    .venv/bin/python bench/bench_label_to_mask.py [--counts 100 1000 4000] [--side 16]

For each count N it writes N AnyLabeling JSON files, each with one small PNG image (``--side`` px) and two
shapes, runs ``labels_to_masks`` over the folder into a fresh output folder, and prints the total time, the
time spent in the safety checks (outputs that are inputs, clashing output names, files not written by an
earlier run, an output folder among the labels) and their share. Both should grow linearly with N, and the
share stay under 5 % at 4,000 files.
"""

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from aerialseg.annotations import labels
from aerialseg.annotations.anylabeling import LabelTable

CHECKS = ("_check_unique_outputs", "_check_outputs")  # _check_outputs also runs _check_out_dir
TABLE = {"building": "building", "road": "road", "water": "water", "tree": "tree", "background": "background"}


def make_survey(folder: Path, count: int, side: int) -> None:
    """``count`` label files with their PNG images under folder/labels and folder/images."""
    (folder / "labels").mkdir(parents=True)
    (folder / "images").mkdir()
    image = np.full((side, side, 3), 120, np.uint8)
    for i in range(count):
        cv2.imwrite(str(folder / "images" / f"img_{i:05d}.png"), image)
        triangle = [[1, 1], [side - 2, 1], [side // 2, side - 2]]
        shapes = [{"label": "building", "shape_type": "polygon", "points": triangle},
                  {"label": "road", "shape_type": "rectangle", "points": [[0, 0], [side // 3, side // 3]]}]
        doc = {"version": "2.4.0", "flags": {}, "shapes": shapes, "imagePath": f"../images/img_{i:05d}.png",
               "imageData": None, "imageHeight": side, "imageWidth": side}
        (folder / "labels" / f"img_{i:05d}.json").write_text(json.dumps(doc), encoding="utf-8")


def timed(spent: list[float], func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)
    return wrapper


def run(count: int, side: int) -> tuple[float, float]:
    """(total s, safety-check s) of one label-to-mask run over ``count`` files."""
    with tempfile.TemporaryDirectory(prefix="bench-l2m-") as tmp:
        folder = Path(tmp)
        make_survey(folder, count, side)
        spent: list[float] = []
        originals = {name: getattr(labels, name) for name in CHECKS if hasattr(labels, name)}
        for name, func in originals.items():
            setattr(labels, name, timed(spent, func))
        try:
            start = time.perf_counter()
            written = labels.labels_to_masks([folder / "labels"], folder / "masks", LabelTable.from_mapping(TABLE),
                                             allow_ungeoreferenced=True)
            total = time.perf_counter() - start
        finally:
            for name, func in originals.items():
                setattr(labels, name, func)
        assert len(written) == count
    return total, sum(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--side", type=int, default=16)
    args = parser.parse_args()
    print(f"{'files':>6} {'total s':>9} {'ms/file':>8} {'safety s':>9} {'safety %':>9}")
    for count in args.counts:
        total, safety = run(count, args.side)
        print(f"{count:>6} {total:>9.2f} {total / count * 1e3:>8.2f} {safety:>9.3f} {safety / total * 100:>8.2f}%")


if __name__ == "__main__":
    main()
