"""label-to-mask and mask-to-label against the annotation tools' own mask code, on real label files.

labelme 6.3.1 (``shapes_to_label``, what labelme2voc paints) and X-AnyLabeling 4.2.1 (``custom_to_mask``, its
mask export, polygons only) run in a venv of their own (tests/helpers/reference_tools.py); the tests skip when it
cannot be built. The committed reference images (labelme's 2011_000003 VOC PNG, X-AnyLabeling's cat_dog mask
export) need no venv.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import reference_tools
from aerialseg.annotations.anylabeling import LabelTable, load_label_json, parse_shapes
from aerialseg.annotations.polygonize import mask_file_to_label
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes
from aerialseg.core.classes import IGNORE
from conftest import REPO, shared_path
from helpers.masks import nested_mask

FORMATS = "anylabeling-format-examples"
SAMPLE_CLASSES = {"background": 0, "road": 1, "water": 2, "tree": 3, "building": 4, "__ignore__": IGNORE}
LABELME = MaskOptions(line_width_px=10)  # labelme's shapes_to_label draws lines 10 px wide


@pytest.fixture(scope="session")
def tools_python() -> Path:
    try:
        return reference_tools.reference_venv()
    except reference_tools.ReferenceUnavailable as exc:
        pytest.skip(str(exc))


def classes_of(path: Path) -> dict[str, int]:
    """A class value per label of a file (1, 2, ... in sorted order)."""
    labels = sorted({s["label"] for s in json.loads(path.read_text(encoding="utf-8"))["shapes"]})
    return {label: 1 + i for i, label in enumerate(labels)}


def aerialseg_mask(path: Path, classes: dict[str, int], options: MaskOptions = MaskOptions(),
                   kinds: set[str] | None = None) -> np.ndarray:
    doc = load_label_json(path)
    if kinds is not None:
        doc["shapes"] = [s for s in doc["shapes"] if (s.get("shape_type") or "polygon") in kinds]
    shapes, _ = parse_shapes(doc, path, LabelTable(classes))
    return rasterize_shapes(shapes, doc["imageWidth"], doc["imageHeight"], options)


def polygons_only(path: Path, work: Path) -> Path:
    """A copy of a label file with its polygons only (X-AnyLabeling's mask export skips other shapes)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["shapes"] = [s for s in doc["shapes"] if (s.get("shape_type") or "polygon") == "polygon"]
    dest = work / f"{len(list(work.glob('*.json')))}-{path.name}"
    dest.write_text(json.dumps(doc), encoding="utf-8")
    return dest


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    same = sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True))
    return same / sum(a.size for a in ours)


def labelme_examples() -> list[Path]:
    root = shared_path(FORMATS, "labelme", "examples")
    return [root / "semantic_segmentation" / "data_annotated" / "2011_000003.json",
            root / "instance_segmentation" / "data_annotated" / "2011_000006.json",
            root / "primitives" / "primitives.json", root / "tutorial" / "apc2016_obj3.json"]


# --- no venv needed: the tools' committed outputs ------------------------------------------------

def test_labelme_voc_png_is_reproduced_exactly():
    root = shared_path(FORMATS, "labelme", "examples", "semantic_segmentation")
    with open(root / "data_dataset_voc" / "SegmentationClass" / "2011_000003.png", "rb") as f:
        from PIL import Image
        ref = np.array(Image.open(f))  # VOC palette indices, 255 = __ignore__
    names = [n.strip() for n in (root / "labels.txt").read_text().splitlines() if n.strip()]
    classes = {n: names.index(n) - 1 for n in ("person", "bottle")} | {"__ignore__": IGNORE}
    assert np.array_equal(aerialseg_mask(root / "data_annotated" / "2011_000003.json", classes), ref)


def test_xanylabeling_exported_mask_of_cat_dog():
    root = shared_path(FORMATS, "x-anylabeling", "examples", "segmentation", "multiclass_semantic_segmentation")
    colours = json.loads((root / "mask_color_map.json").read_text())["colors"]
    rgb = cv2.imread(str(root / "masks" / "cat_dog.png"))[:, :, ::-1]
    ref = np.zeros(rgb.shape[:2], np.uint8)
    for value, colour in enumerate(colours.values(), start=1):
        ref[(rgb == colour).all(axis=-1)] = value
    ours = aerialseg_mask(root / "sources" / "cat_dog.json", {name: i for i, name in enumerate(colours, start=1)})
    print(f"cat_dog vs X-AnyLabeling's own export: {agreement([ours], [ref]):.4%}")
    assert agreement([ours], [ref]) >= 0.999


# --- the tools run on the same files -------------------------------------------------------------

def test_labelme_examples_every_shape_type_match_labelme(tools_python, tmp_path):
    files = labelme_examples()
    for path in files:
        classes = classes_of(path)
        ref, = reference_tools.reference_masks("labelme", [path], classes, tmp_path, tools_python)
        assert np.array_equal(aerialseg_mask(path, classes, LABELME), ref), path.name


def test_labelme_examples_polygons_match_xanylabeling(tools_python, tmp_path):
    files = labelme_examples() + [shared_path(FORMATS, "x-anylabeling", "examples", "segmentation",
                                              "multiclass_semantic_segmentation", "sources", "cat_dog.json")]
    ours, theirs = [], []
    for path in files:
        classes = classes_of(path)
        theirs += reference_tools.reference_masks("xanylabeling", [polygons_only(path, tmp_path)], classes, tmp_path,
                                                  tools_python)
        ours.append(aerialseg_mask(path, classes, kinds={"polygon"}))
    print(f"labelme examples + cat_dog, polygons, vs X-AnyLabeling: {agreement(ours, theirs):.4%}")
    assert agreement(ours, theirs) >= 0.999


def test_arctic_lakes_match_labelme_and_xanylabeling(tools_python, tmp_path):
    files = sorted(shared_path("arctic-lakes-labelme", "json").glob("*.json"))
    files = [p for p in files if json.loads(p.read_text())["shapes"]]
    classes = {"1": 2}
    ours = [aerialseg_mask(p, classes) for p in files]
    labelme = reference_tools.reference_masks("labelme", files, classes, tmp_path, tools_python)
    xany = reference_tools.reference_masks("xanylabeling", files, classes, tmp_path, tools_python)
    print(f"arctic lakes ({len(files)} files): labelme {agreement(ours, labelme):.4%}, "
          f"X-AnyLabeling {agreement(ours, xany):.4%}")
    assert all(np.array_equal(a, b) for a, b in zip(ours, labelme))
    assert agreement(ours, xany) >= 0.999


def test_sample_labels_match_both_tools(tools_python, tmp_path):
    files = sorted((REPO / "data" / "sample" / "labels").glob("*.json"))
    ours = {p: aerialseg_mask(p, SAMPLE_CLASSES) for p in files}
    xany = reference_tools.reference_masks("xanylabeling", files, SAMPLE_CLASSES, tmp_path, tools_python)
    assert all(np.array_equal(ours[p], ref) for p, ref in zip(files, xany))
    few = [p for p in files if p.stem in ("dubai_tile2", "dubai_tile6")]  # labelme paints a full image per shape
    labelme = reference_tools.reference_masks("labelme", few, SAMPLE_CLASSES, tmp_path, tools_python)
    assert all(np.array_equal(ours[p], ref) for p, ref in zip(few, labelme))


def test_mask_to_label_round_trip_through_the_tools(tools_python, tmp_path):
    """mask -> mask-to-label JSON -> each tool's own mask export -> the same mask."""
    rng = np.random.default_rng(3)
    noise = cv2.GaussianBlur(rng.normal(size=(150, 210)).astype(np.float32), (0, 0), 2.5)
    blobs = np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.7, 0.85, 0.97])).astype(np.uint8)
    blobs[blobs == 5] = IGNORE
    blobs[rng.random(blobs.shape) < 0.005] = 4  # single pixels
    for name, mask in (("nested", nested_mask()), ("blobs", blobs)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.zeros((*mask.shape, 3), np.uint8))
        cv2.imwrite(str(tmp_path / f"{name}_mask.png"), mask)
        label_file = mask_file_to_label(tmp_path / f"{name}_mask.png", tmp_path / "labels", tmp_path / f"{name}.png")
        for tool in ("labelme", "xanylabeling"):
            back, = reference_tools.reference_masks(tool, [label_file], SAMPLE_CLASSES, tmp_path, tools_python)
            assert np.array_equal(back, mask), (name, tool)
