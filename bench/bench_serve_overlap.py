"""What serve's tile placement costs in accuracy: serve.overlap 0 (only the tiles an image needs) vs the bundle's.

    .venv/bin/python bench/bench_serve_overlap.py --model BUNDLE

Four 1024² crops (top-left and bottom-right) of the sample's validation and test scenes (5, 6), with their
true masks from label-to-mask's own code, go through serve's mapping (``inference.serve_map.predict_array``,
the model serve would run: int8 when the bundle carries a usable one) at overlap 0 and at the bundle's
overlap. Prints the tiles each needs, the pixel agreement of the two maps per crop, and mIoU / pixel accuracy
of each against the true masks (one JSON object).
"""

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

import aerialseg  # noqa: F401
import aerialseg.inference.server as server
from aerialseg.evaluation.metrics import ConfusionMatrix
from aerialseg.inference.serve_map import predict_array
from bench_serve_latency import labelled_scene



def crops(size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (3, size, size), true mask) at two corners of scenes 5 and 6."""
    out = []
    for n in (5, 6):
        rgb, mask = labelled_scene(n)
        for y, x in ((0, 0), (rgb.shape[1] - size, rgb.shape[2] - size)):
            out.append((rgb[:, y:y + size, x:x + size], mask[y:y + size, x:x + size]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    options = server.ServeOptions(device="cpu")
    with ExitStack() as stack:
        model = next(iter(server.load_models([args.model], options, stack).values()))
        result = {"model": str(args.model), "precision": model.runtime["precision"], "size": args.size,
                  "bundle_overlap_px": model.bundle.overlap, "agreement": []}
        matrices, tiles = {0: ConfusionMatrix(), None: ConfusionMatrix()}, {0: 0, None: 0}
        for image, mask in crops(args.size):
            maps = {}
            for overlap in matrices:
                model.overlap = overlap
                maps[overlap] = predict_array(model, image, on_tiles=lambda n, o=overlap: tiles.__setitem__(
                    o, tiles[o] + n))[0]
                matrices[overlap].update(maps[overlap], mask)
            result["agreement"].append(round(float((maps[0] == maps[None]).mean()), 4))
        for overlap, name in ((0, "overlap_0"), (None, "bundle_overlap")):
            summary = matrices[overlap].summary()
            result[name] = {"tiles": tiles[overlap], "mIoU": round(summary["mIoU"], 4),
                            "pixel_accuracy": round(summary["pixel_accuracy"], 4)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
