"""mask-to-label: polygons that label-to-mask paints back to the same mask (holes, nesting, real masks)."""

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio

from aerialseg import cli
from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.annotations.anylabeling import ANYLABELING_FORMAT_VERSION, LabelTable
from aerialseg.annotations.labels import labels_to_masks
from aerialseg.annotations.polygonize import mask_file_to_label, mask_to_shapes, masks_to_labels
from aerialseg.annotations.rasterize import MaskOptions
from aerialseg.stages import mask_to_label
from conftest import REPO, shared_path
from helpers.masks import nested_mask

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

TABLE = LabelTable({"background": 0, "road": 1, "water": 2, "tree": 3, "building": 4, "__ignore__": IGNORE})


def make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "sample" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dubai_part(tile: int, part: int) -> tuple[Path, np.ndarray]:
    """A real Dubai part: its image path and its mask as aerialseg classes (SOURCE.md colours)."""
    png = shared_path("dubai-aerial-cc0", f"tile_{tile}", "masks", f"image_part_{part:03d}.png")
    module = make_sample_module()
    return png.parents[1] / "images" / f"image_part_{part:03d}.jpg", module.colours_to_classes(
        module.read_rgb(png), png)



def round_trip(mask: np.ndarray, tmp_path: Path, simplify_px: float = 0.0, min_area_px: float = 0.0) -> np.ndarray:
    """mask -> PNG -> mask-to-label JSON -> label-to-mask -> mask, through the real file functions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(tmp_path / "scene.png"), np.zeros((*mask.shape, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "scene_mask.png"), mask)
    label_file = mask_file_to_label(tmp_path / "scene_mask.png", tmp_path / "labels", tmp_path / "scene.png",
                                    simplify_px, min_area_px)
    out = labels_to_masks([label_file], tmp_path / "back", TABLE, MaskOptions())[0]
    return cv2.imread(str(out), cv2.IMREAD_UNCHANGED)


def test_nested_regions_and_holes_round_trip_exactly(tmp_path):
    mask = nested_mask()
    assert np.array_equal(round_trip(mask, tmp_path), mask)


def test_random_blobs_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(7)
    noise = cv2.GaussianBlur(rng.normal(size=(160, 200)).astype(np.float32), (0, 0), 3)
    mask = np.digitize(noise, np.quantile(noise, [0.2, 0.4, 0.6, 0.8, 0.95])).astype(np.uint8)
    mask[mask == 5] = IGNORE
    mask[rng.random(mask.shape) < 0.01] = 4  # salt: single pixels everywhere
    assert np.array_equal(round_trip(mask, tmp_path), mask)


def test_document_fields_order_and_labels(tmp_path):
    mask = nested_mask()
    cv2.imwrite(str(tmp_path / "scene.png"), np.zeros((*mask.shape, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    doc = json.loads(mask_file_to_label(tmp_path / "m.png", tmp_path / "json", tmp_path / "scene.png").read_text())
    assert doc["version"] == ANYLABELING_FORMAT_VERSION and doc["flags"] == {} and doc["imageData"] is None
    assert doc["imagePath"] == "../scene.png" and (doc["imageWidth"], doc["imageHeight"]) == (120, 90)
    shape = doc["shapes"][0]
    assert set(shape) == {"label", "points", "group_id", "description", "shape_type", "flags"}
    assert shape["shape_type"] == "polygon" and shape["group_id"] is None and shape["description"] == ""
    labels = [s["label"] for s in doc["shapes"]]
    assert "__ignore__" in labels and "background" not in labels  # background is what no shape paints
    regions = sum(cv2.connectedComponents((mask == v).view(np.uint8), connectivity=4)[0] - 1
                  for v in np.unique(mask) if v != 0)
    assert len(labels) == regions  # one shape per region: holes are opened, never cut into pieces
    sizes = [area(s["points"]) for s in doc["shapes"]]
    assert labels[0] == "building" and sizes[0] == max(sizes)  # largest region first


def area(points: list[list[float]]) -> float:
    x, y = np.asarray(points, float).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_polygons_hug_pixel_centres_and_are_never_degenerate():
    staircase = np.tril(np.ones((40, 40), np.uint8))
    (stairs,) = mask_to_shapes(staircase)
    assert len(stairs["points"]) <= 6  # the steps paint as one diagonal edge (int() of each vertex)
    block = np.zeros((20, 30), np.uint8)
    block[5:9, 10:25] = 4
    block[15, 3] = 2
    block[17, 7:9] = 1
    shapes = {s["label"]: np.asarray(s["points"]) for s in mask_to_shapes(block)}
    # every vertex truncates (and rounds) to a boundary pixel centre: the outline through those centres
    assert sorted(map(tuple, np.unique(shapes["building"].astype(int), axis=0))) == [
        (10, 5), (10, 8), (24, 5), (24, 8)]
    assert {tuple(p) for p in shapes["water"].astype(int)} == {(3, 15)}  # one pixel: a 0.2 px square
    assert {tuple(p) for p in np.round(shapes["road"]).astype(int)} == {(7, 17), (8, 17)}
    for points in shapes.values():
        assert len({tuple(p) for p in points}) >= 3 and area(points.tolist()) > 0
        assert ((points - np.floor(points)) < 0.5).all()  # int() and round() agree


def test_min_area_and_simplify(tmp_path):
    mask = nested_mask()
    assert "road" not in {s["label"] for s in mask_to_shapes(mask, min_area_px=50)[:3]}
    def has_pixel(shapes: list[dict]) -> bool:  # the single building pixel at (90, 20)
        return any(s["label"] == "building" and np.array_equal(np.unique(np.asarray(s["points"], int), axis=0),
                                                               [[90, 20]]) for s in shapes)
    assert has_pixel(mask_to_shapes(mask)) and not has_pixel(mask_to_shapes(mask, min_area_px=2))
    part = dubai_part(2, 5)[1]
    exact, coarse = mask_to_shapes(part), mask_to_shapes(part, simplify_px=1.0)
    assert sum(map(len, (s["points"] for s in coarse))) < 0.5 * sum(map(len, (s["points"] for s in exact)))
    agreement = float((round_trip(part, tmp_path, simplify_px=1.0) == part).mean())
    print(f"Dubai tile_2 part 5, --simplify 1.0: {agreement:.4%} pixel agreement")
    assert 0.97 < agreement < 1.0


@pytest.mark.parametrize("tile,part", [(1, 5), (2, 1), (4, 9), (6, 3)])
def test_dubai_round_trip(tile, part, tmp_path):
    image, mask = dubai_part(tile, part)
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    label_file = masks_to_labels([tmp_path / "mask.png"], tmp_path / "labels", image)[0]
    assert json.loads(label_file.read_text())["imagePath"].endswith(f"images/image_part_{part:03d}.jpg")
    back = cv2.imread(str(labels_to_masks([label_file], tmp_path / "back", TABLE)[0]), cv2.IMREAD_UNCHANGED)
    agreement = float((back == mask).mean())
    print(f"Dubai tile_{tile} part {part:03d}: round-trip pixel agreement {agreement:.4%}")
    assert np.array_equal(back, mask)


def test_geotiff_mask_round_trip_keeps_nodata_as_ignore(tmp_path):
    scene = shared_path("geotiff-samples", "webodm", "orthophoto.tif")
    label = {"label": "tree", "points": [[30.0, 30.0], [180.0, 40.0], [120.0, 190.0]], "shape_type": "polygon"}
    (tmp_path / "ortho.json").write_text(json.dumps({"shapes": [label], "imagePath": str(scene),
                                                     "imageHeight": 212, "imageWidth": 212}))
    first = labels_to_masks([tmp_path / "ortho.json"], tmp_path / "m1", TABLE)[0]
    label_file = masks_to_labels([first], tmp_path / "labels", scene)[0]
    second = labels_to_masks([label_file], tmp_path / "m2", TABLE)[0]
    with rasterio.open(first) as a, rasterio.open(second) as b:
        assert a.crs == b.crs and a.transform == b.transform
        assert np.array_equal(a.read(1), b.read(1)) and (a.read(1) == IGNORE).sum() > 1000


def test_palette_png_class_mask_is_read_as_indices(tmp_path):
    mask = nested_mask()
    with rasterio.open(tmp_path / "pal.png", "w", driver="PNG", width=120, height=90, count=1,
                       dtype="uint8") as ds:
        ds.write(mask, 1)
        ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 0, 255, 255),
                              3: (0, 255, 0, 255), 4: (255, 255, 0, 255), 255: (9, 9, 9, 255)})
    assert cv2.imread(str(tmp_path / "pal.png"), cv2.IMREAD_UNCHANGED).ndim == 3  # OpenCV would expand it
    cv2.imwrite(str(tmp_path / "pal.jpg"), np.zeros((90, 120, 3), np.uint8))
    label_file = masks_to_labels([tmp_path / "pal.png"])[0]  # image found by stem beside the mask
    assert label_file == tmp_path / "pal.json"
    back = cv2.imread(str(labels_to_masks([label_file], tmp_path / "back", TABLE)[0]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back, mask)


def _run(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["aerialseg", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_writes_json(tmp_path, monkeypatch, capsys):
    cv2.imwrite(str(tmp_path / "m.png"), nested_mask())
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((90, 120, 3), np.uint8))
    code, err = _run(["mask-to-label", tmp_path / "m.png", "--image", tmp_path / "img.png", "--out",
                      tmp_path / "o", "--min-area", "2", "--params", REPO / "params.yaml"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "img.json").read_text())["imagePath"] == "../img.png"


def test_stage_takes_min_area_from_params_unless_given(tmp_path):
    cv2.imwrite(str(tmp_path / "m.png"), nested_mask())
    cv2.imwrite(str(tmp_path / "m.jpg"), np.zeros((90, 120, 3), np.uint8))
    pixel = {"label": "building", "pixels": [[90, 20]]}  # the single building pixel

    def labels(params: dict, **flags) -> list[dict]:
        [path] = mask_to_label.run(params, [tmp_path / "m.png"], tmp_path / "o", overwrite=True, backup=False,
                                   **flags)
        return [{"label": s["label"], "pixels": np.unique(np.asarray(s["points"], int), axis=0).tolist()}
                for s in json.loads(path.read_text())["shapes"]]

    assert pixel in labels({})
    assert pixel not in labels({"masks": {"min_area_px": 2}})
    assert pixel in labels({"masks": {"min_area_px": 2}}, min_area_px=0)
    with pytest.raises(AerialsegError, match="must be >= 0"):
        labels({"masks": {"simplify_px": -1}})


@pytest.mark.parametrize("case", ["rgb mask", "stray values", "no image", "size mismatch"])
def test_cli_bad_masks(case, tmp_path, monkeypatch, capsys):
    mask = nested_mask()
    image = tmp_path / "m.jpg"
    cv2.imwrite(str(image), np.zeros((90, 120, 3), np.uint8))
    if case == "rgb mask":
        mask = cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR)
    elif case == "stray values":
        mask[0, 0] = 7
    elif case == "no image":
        image.unlink()
    else:
        cv2.imwrite(str(image), np.zeros((91, 120, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    code, err = _run(["mask-to-label", tmp_path / "m.png", "--out", tmp_path / "o"], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "m.png" in lines[0] and "fix:" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_mask_to_shapes_accepts_int_arrays_and_rejects_stray_values():
    mask = nested_mask().astype(np.int64)  # e.g. an argmax output
    assert mask_to_shapes(mask) == mask_to_shapes(mask.astype(np.uint8))
    mask[3, 3] = 9
    with pytest.raises(AerialsegError, match=r"value\(s\) \[9\]"):
        mask_to_shapes(mask)


def test_infer_scene_anylabeling_puts_no_image_beside_the_scenes(tmp_path):
    """infer-scene --format anylabeling: the JSON beside the scene, its preview PNG in infer.out_dir."""
    from aerialseg.inference.scene import InferOptions, output_paths, write_anylabeling

    scene = tmp_path / "scenes" / "x.png"
    scene.parent.mkdir()
    mask = nested_mask()
    cv2.imwrite(str(scene), np.zeros((*mask.shape, 3), np.uint8))
    with rasterio.open(tmp_path / "classes.tif", "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0],
                       count=1, dtype="uint8") as ds:
        ds.write(mask, 1)
    options = InferOptions(format="anylabeling", out_dir=str(tmp_path / "maps"), min_area_px=0)
    paths = output_paths(scene, None, options)
    assert paths["map"] == scene.with_suffix(".json") and paths["preview"].parent == tmp_path / "maps"
    assert write_anylabeling(tmp_path / "classes.tif", paths["map"], scene, options) > 0
    doc = json.loads(paths["map"].read_text())
    assert doc["imagePath"] == "x.png" and doc["shapes"] == mask_to_shapes(mask)
    assert len(paths["map"].read_text().splitlines()) == len(doc["shapes"]) + 10  # one shape per line
    back = labels_to_masks([paths["map"]], tmp_path / "back", TABLE)[0]
    assert np.array_equal(cv2.imread(str(back), cv2.IMREAD_UNCHANGED), mask)
