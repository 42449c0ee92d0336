"""The one mask -> polygon converter (annotations/regions.py): one polygon per region, holes opened rather than
cut, never degenerate, specks merged, exact paint-back (label-to-mask's rule, labelme, X-AnyLabeling)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio

from helpers import reference_tools
from aerialseg.annotations.anylabeling import Shape, anylabeling_document
from aerialseg.annotations.polygonize import mask_to_shapes
from aerialseg.annotations.rasterize import rasterize_shapes
from aerialseg.annotations.regions import find_regions, merge_specks, polygons
from aerialseg.core.classes import CLASS_NAMES, IGNORE
from aerialseg.inference.prelabel import scored_shapes
from conftest import shared_path

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

NAMES = {name: i for i, name in enumerate(CLASS_NAMES)} | {"__ignore__": IGNORE}
OEM_TO_CLASSES = np.zeros(256, np.uint8)
OEM_TO_CLASSES[[4, 5, 6, 8]] = [1, 3, 2, 4]  # OpenEarthMap road, tree, water, building -> aerialseg ids


def paint(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """Shapes painted with label-to-mask's rasterisation (the tools' rule)."""
    parsed = [Shape(i, s["label"], NAMES[s["label"]], "polygon", np.asarray(s["points"], np.float64))
              for i, s in enumerate(shapes)]
    return rasterize_shapes(parsed, width, height)


def area(points: list[list[float]]) -> float:
    x, y = np.asarray(points, float).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def assert_usable(shapes: list[dict]) -> None:
    """What the tools need: >= 3 distinct vertices (no repeat of the first, which X-AnyLabeling drops), an area."""
    for shape in shapes:
        points = [tuple(p) for p in shape["points"]]
        assert len(set(points)) == len(points) >= 3 and area(shape["points"]) > 0, shape


def regions_at_least(mask: np.ndarray, min_area_px: float, skip: tuple[int, ...] = (0,)) -> np.ndarray:
    """Mask of the pixels in 4-connected regions of at least ``min_area_px`` (values in ``skip`` excluded)."""
    keep = np.zeros(mask.shape, bool)
    for value in set(np.unique(mask).tolist()) - set(skip):
        _, labels, stats, _ = cv2.connectedComponentsWithStats((mask == value).view(np.uint8), connectivity=4)
        big = stats[:, cv2.CC_STAT_AREA] >= min_area_px
        big[0] = False
        keep |= big[labels]
    return keep


def count_regions(mask: np.ndarray, min_area_px: float = 1, skip: tuple[int, ...] = (0,)) -> int:
    total = 0
    for value in set(np.unique(mask).tolist()) - set(skip):
        _, _, stats, _ = cv2.connectedComponentsWithStats((mask == value).view(np.uint8), connectivity=4)
        total += int((stats[1:, cv2.CC_STAT_AREA] >= min_area_px).sum())
    return total


def edge_cases() -> np.ndarray:
    """Thin, tiny, nested and touching regions: what makes naive polygons degenerate."""
    mask = np.zeros((40, 60), np.uint8)
    mask[2, 2] = 4  # one pixel
    mask[5, 2:4] = 1  # two pixels
    mask[8, 2:30] = 1  # a 1-px line
    mask[10:25, 5] = 2  # a 1-px column...
    mask[24, 5:20] = 2  # ... turning into an L
    mask[12:22, 30:50] = 3  # a canopy ...
    mask[14:16, 33:35] = 0  # ... with holes: background
    mask[18, 40] = 0  # a 1-px hole
    mask[15:20, 44:48] = 4  # a building in the canopy
    mask[16:18, 45:47] = 1  # a road in the building
    mask[13, 38:48] = 2  # a 1-px water line in the canopy, joining nothing
    checker = np.indices((6, 6)).sum(axis=0) % 2 == 0
    mask[30:36, 2:8][checker] = 3  # diagonal contacts only: 18 one-pixel regions
    mask[34:40, 54:60] = IGNORE  # touching the image corner
    mask[0, 59] = 2  # a pixel in the corner
    return mask


def test_edge_cases_paint_back_exactly_in_any_order_one_shape_per_region():
    mask = edge_cases()
    shapes = mask_to_shapes(mask)
    assert_usable(shapes)
    assert len(shapes) == count_regions(mask)  # one per region: holes opened, not cut; no background shapes
    assert "background" not in {s["label"] for s in shapes}
    assert np.array_equal(paint(shapes, *mask.shape), mask)
    assert np.array_equal(paint(shapes[::-1], *mask.shape), mask)
    rng = np.random.default_rng(0)
    assert np.array_equal(paint([shapes[i] for i in rng.permutation(len(shapes))], *mask.shape), mask)


def test_random_noise_every_pinch_and_hole_paints_back_exactly():
    rng = np.random.default_rng(5)
    for share in (0.3, 0.5, 0.7):
        mask = (rng.random((50, 70)) < share).astype(np.uint8) * 3
        mask[rng.random(mask.shape) < 0.1] = 4
        shapes = mask_to_shapes(mask)
        assert_usable(shapes)
        assert len(shapes) == count_regions(mask)
        assert np.array_equal(paint(shapes[::-1], *mask.shape), mask)


def test_merge_specks_gives_them_to_their_surroundings():
    mask = np.full((30, 30), 3, np.uint8)
    mask[5, 5] = 0  # a background speck in canopy
    mask[10:12, 10:12] = 4  # a 4-px building speck
    mask[20:30, 0:10] = 1  # a road block (100 px)
    mask[25, 5] = 2  # a water speck in the road
    mask[0:3, 27:30] = IGNORE  # ignore is never merged, however small
    merged = merge_specks(mask, 16)
    expected = mask.copy()
    expected[5, 5] = 3
    expected[10:12, 10:12] = 3
    expected[25, 5] = 1
    assert np.array_equal(merged, expected)
    assert merge_specks(mask, 0) is mask and merge_specks(mask, 1) is mask
    found = find_regions(mask, 16)
    assert sorted(found.pixels[1:].tolist()) == [9, 100, 791]


@pytest.fixture(scope="module")
def canopy() -> np.ndarray:
    """A real 256x256 OpenEarthMap tile (Houston, 0.5 m) with tree canopy whose gaps are real: tree pixels
    with the lowest 15 % excess green (2G - R - B) of the image are opened as background holes."""
    image = shared_path("openearthmap-samples", "images", "houston_16.tif")
    window = ((768, 1024), (256, 512))
    with rasterio.open(image) as ds:
        r, g, b = ds.read(window=window).astype(np.float32)
    with rasterio.open(image.parents[1] / "labels" / "houston_16.tif") as ds:
        mask = OEM_TO_CLASSES[ds.read(1, window=window)]
    tree = mask == 3
    exg = 2 * g - r - b
    mask[tree & (exg < np.percentile(exg[tree], 15))] = 0
    return mask


def canopy_holes(mask: np.ndarray) -> int:
    from rasterio.features import shapes as pixel_polygons

    tree = (mask == 3).view(np.uint8)
    return sum(len(geom["coordinates"]) - 1 for geom, _ in pixel_polygons(tree, mask=tree > 0, connectivity=4))


def test_real_canopy_tile_gives_few_clean_shapes_that_paint_back(canopy):
    assert canopy_holes(canopy) > 100  # the comb case: a canopy full of gaps
    confidence = np.full(canopy.shape, 0.9, np.float32)
    names = ("background", *CLASS_NAMES[1:])
    for min_area in (0, 16, 64):
        shapes = scored_shapes(canopy, confidence, names, min_area_px=min_area)
        assert_usable(shapes)
        cleaned = merge_specks(canopy, min_area)
        regions = count_regions(cleaned, max(min_area, 1))
        assert len(shapes) <= 1.2 * regions, (min_area, len(shapes), regions)
        assert len(shapes) == regions  # exactly one shape per region
        painted = paint(shapes, *canopy.shape)
        on_regions = regions_at_least(cleaned, max(min_area, 1))
        assert np.array_equal(painted[on_regions], cleaned[on_regions])
        assert np.array_equal(painted, np.where(on_regions, cleaned, 0))  # nothing painted elsewhere
        if min_area:
            assert (painted != canopy).mean() < 0.02  # merged specks change few pixels
    print(f"canopy tile: {canopy_holes(canopy)} holes in the tree class; "
          f"{len(scored_shapes(canopy, confidence, names, min_area_px=16))} shapes with min_area_px 16")


def test_simplification_cuts_vertices_but_moves_few_pixels(canopy):
    exact = mask_to_shapes(canopy, min_area_px=16)
    reference = paint(exact, *canopy.shape)
    labelled = (reference != 0).sum()
    for epsilon in (0.002, 0.005, 0.01):
        found = find_regions(canopy, 16)
        ids = [i for i in range(1, len(found.values)) if found.values[i] != 0 and found.pixels[i] >= 16]
        coarse = [{"label": CLASS_NAMES[found.values[i]], "points": p}
                  for i, rings in polygons(found, ids, epsilon_factor=epsilon).items() for p in rings]
        assert_usable(coarse)
        assert len(coarse) == len(exact)
        moved = (paint(coarse, *canopy.shape) != reference).sum() / labelled
        vertices = sum(len(s["points"]) for s in coarse) / sum(len(s["points"]) for s in exact)
        print(f"epsilon_factor {epsilon}: {vertices:.0%} of the vertices, {moved:.2%} of the labelled pixels moved")
        assert vertices < 0.6 and moved < 0.03


def test_labelme_and_xanylabeling_load_and_paint_the_shapes(canopy, tmp_path):
    """The tools' own mask code (labelme's shapes_to_label asserts > 2 points; X-AnyLabeling's export)."""
    try:
        python = reference_tools.reference_venv()
    except reference_tools.ReferenceUnavailable as exc:
        pytest.skip(str(exc))
    files = []
    for name, mask, min_area in (("canopy", canopy, 16), ("edges", edge_cases(), 0)):
        shapes = mask_to_shapes(mask, min_area_px=min_area)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(anylabeling_document(shapes, f"{name}.png", mask.shape[1], mask.shape[0])))
        files.append((path, np.where(regions_at_least(merge_specks(mask, min_area), max(min_area, 1), ()),
                                     merge_specks(mask, min_area), 0)))
    for tool in ("labelme", "xanylabeling"):
        masks = reference_tools.reference_masks(tool, [p for p, _ in files], NAMES, tmp_path, python)
        for (path, expected), got in zip(files, masks):
            assert np.array_equal(got, expected), (tool, path.name, int((got != expected).sum()))
