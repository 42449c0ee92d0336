"""Runs INSIDE the reference-tools venv (see reference_tools.py): the tools' own mask code on label files.

labelme's ``shapes_to_label`` / ``shape_to_mask`` and X-AnyLabeling's ``LabelConverter.custom_to_mask`` are
imported from the installed packages without their GUI dependencies: their package ``__init__`` files (which
import Qt, onnxruntime, ...) are bypassed, and the few modules their converter modules import for other
features are replaced by empty stand-ins. The functions themselves run unchanged.

stdin: a JSON list of jobs {"tool": "labelme"|"xanylabeling"|"labelme-timing", "json": path,
"classes": {label: value}, "out": .npy path}; stdout: a JSON list of results (timings for labelme-timing).
"""

import base64
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import PIL.Image


def _bare_package(name: str) -> None:
    """Register package `name` with its real folder but without running its __init__."""
    top, *rest = name.split(".")
    root = Path(importlib.util.find_spec(top).submodule_search_locations[0]) if top not in sys.modules \
        else Path(sys.modules[top].__path__[0])
    module = types.ModuleType(name)
    module.__path__ = [str(root.joinpath(*rest))]
    sys.modules[name] = module


def _stand_in(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def labelme_functions():
    _bare_package("labelme")
    _bare_package("labelme.utils")
    _stand_in("labelme._label_file", ShapeDict=dict)  # a TypedDict used only in annotations
    from labelme.utils.shape import shape_to_mask, shapes_to_label
    return shape_to_mask, shapes_to_label


def xanylabeling_converter():
    for name in ("anylabeling", "anylabeling.views", "anylabeling.views.labeling", "anylabeling.views.labeling.utils"):
        _bare_package(name)
    _stand_in("anylabeling.app_info", __version__="reference")
    _stand_in("anylabeling.views.labeling.logger", logger=None)
    _stand_in("anylabeling.views.labeling.schema", create_xlabel_template=None)
    _stand_in("anylabeling.views.labeling.utils.shape", rectangle_from_diagonal=None)
    _stand_in("anylabeling.views.labeling.utils.general", is_possible_rectangle=None)
    for name in ("jsonlines", "json_repair", "yaml"):  # used by other converters only
        _stand_in(name)
    from anylabeling.views.labeling.label_converter import LabelConverter
    return LabelConverter


def labelme_mask(doc: dict, classes: dict[str, int]) -> np.ndarray:
    """labelme's shapes_to_label (what labelme2voc paints) over the shapes whose label is in `classes`."""
    _, shapes_to_label = labelme_functions()
    shapes = []
    for shape in doc["shapes"]:
        if shape["label"] not in classes:
            continue
        shape = dict(shape)
        if shape.get("shape_type") == "mask":  # labelme's LabelFile decodes the PNG to a bool array on load
            shape["mask"] = np.array(PIL.Image.open(io.BytesIO(base64.b64decode(shape["mask"])))).astype(bool)
        shapes.append(shape)
    cls, _ = shapes_to_label((doc["imageHeight"], doc["imageWidth"]), shapes, classes)
    return cls.astype(np.uint8)


def xanylabeling_mask(path: str, classes: dict[str, int]) -> np.ndarray:
    """X-AnyLabeling's grayscale mask export (polygons only, as the tool exports)."""
    converter = xanylabeling_converter()()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mask.png"
        converter.custom_to_mask(path, str(out), {"type": "grayscale", "colors": classes})
        return np.array(PIL.Image.open(out))


def labelme_timing(doc: dict, line_width: int, full_image_shapes: int) -> dict[str, float]:
    """Seconds for labelme's shape_to_mask over every shape, each on its own bounding box (the fastest way to
    call it), and per shape on the full image (how shapes_to_label calls it) over the first few shapes."""
    shape_to_mask, _ = labelme_functions()
    height, width = doc["imageHeight"], doc["imageWidth"]
    cls = np.zeros((height, width), np.uint8)
    start = time.perf_counter()
    for i, shape in enumerate(doc["shapes"]):
        pts = np.asarray(shape["points"], float)
        kind = shape.get("shape_type")
        if kind == "circle":
            (cx, cy), (px, py) = pts
            r = math.hypot(cx - px, cy - py)
            low, high = np.array([cx - r, cy - r]), np.array([cx + r, cy + r])
        else:
            low, high = pts.min(axis=0) - line_width, pts.max(axis=0) + line_width
        x0, y0 = np.floor(np.maximum(low, 0)).astype(int)
        x1, y1 = np.minimum(np.ceil(high).astype(int) + 1, [width, height])
        if x1 > x0 and y1 > y0:
            box = shape_to_mask((y1 - y0, x1 - x0), (pts - [x0, y0]).tolist(), kind, line_width=line_width)
            cls[y0:y1, x0:x1][box] = 1 + i % 4
    cropped = time.perf_counter() - start
    start = time.perf_counter()
    for shape in doc["shapes"][:full_image_shapes]:
        cls[shape_to_mask((height, width), shape["points"], shape.get("shape_type"), line_width=line_width)] = 1
    per_shape = (time.perf_counter() - start) / max(1, min(full_image_shapes, len(doc["shapes"])))
    return {"cropped_s": cropped, "full_image_per_shape_s": per_shape}


def main() -> None:
    results = []
    for job in json.load(sys.stdin):
        doc = json.loads(Path(job["json"]).read_text(encoding="utf-8"))
        if job["tool"] == "labelme-timing":
            results.append(labelme_timing(doc, job.get("line_width", 10), job.get("full_image_shapes", 20)))
            continue
        if job["tool"] == "labelme":
            np.save(job["out"], labelme_mask(doc, job["classes"]))
        elif job["tool"] == "xanylabeling":
            np.save(job["out"], xanylabeling_mask(job["json"], job["classes"]))
        else:
            raise SystemExit(f"unknown tool {job['tool']!r}")
        results.append({"mask": job["out"]})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
