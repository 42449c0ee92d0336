"""label-to-mask on real AnyLabeling / labelme files, real GeoTIFFs, constructed edge cases and bad input.

Pixel-for-pixel agreement with labelme's and X-AnyLabeling's own mask code: test_annotations_reference.py.
"""

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from affine import Affine

from aerialseg import cli
from aerialseg.annotations.anylabeling import LabelTable, load_label_json, normalize_label, parse_shapes
from aerialseg.annotations.labels import labels_to_masks
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes
from aerialseg.core.classes import IGNORE
from aerialseg.core.config import load_params
from aerialseg.core.errors import AerialsegError
from aerialseg.stages.masks import label_table, mask_options
from aerialseg.stages.masks import run as masks_stage
from conftest import REPO, SHARED_DATA, shared_path

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

CLASSES = {"background": 0, "road": 1, "water": 2, "tree": 3, "building": 4, "__ignore__": IGNORE}
TABLE = LabelTable(CLASSES)
FORMATS = "anylabeling-format-examples"
CORNER = MaskOptions(vertex_convention="corner")


def read_mask(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def label_doc(shapes: list[dict], width: int = 100, height: int = 80, image_path: str = "scene.png",
              **extra) -> dict:
    return {"version": "2.4.0", "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": height, "imageWidth": width, **extra}


def poly(label: str, points, kind: str = "polygon", **extra) -> dict:
    return {"label": label, "points": [list(map(float, p)) for p in points], "group_id": None,
            "description": "", "shape_type": kind, "flags": {}, **extra}


def write_case(folder: Path, shapes: list[dict], width: int = 100, height: int = 80, name: str = "scene",
               **extra) -> Path:
    """A label file plus a blank PNG image of the stated size next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{name}.png"), np.full((height, width, 3), 90, np.uint8))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(label_doc(shapes, width, height, f"{name}.png", **extra)), encoding="utf-8")
    return path


def rasterize(shapes: list[dict], width: int = 100, height: int = 80, options: MaskOptions = MaskOptions(),
              table: LabelTable = TABLE) -> np.ndarray:
    parsed, _ = parse_shapes(label_doc(shapes, width, height), Path("case.json"), table)
    return rasterize_shapes(parsed, width, height, options)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the real console entry point in-process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["aerialseg", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the pixel rule and shape semantics ----------------------------------------------------------

def test_tools_rule_paints_the_outline_pixels_and_corner_rule_the_centres_inside():
    square = [poly("building", [(10, 10), (20, 10), (20, 20), (10, 20)])]
    tools = rasterize(square)
    assert (tools == 4).sum() == 11 * 11 and (tools[10:21, 10:21] == 4).all()  # vertices are pixel centres
    gis = rasterize(square, options=CORNER)
    assert (gis == 4).sum() == 10 * 10 and (gis[10:20, 10:20] == 4).all()  # vertices are pixel corners
    loose = [poly("building", [(10.6, 10.6), (19.4, 10.6), (19.4, 19.4), (10.6, 19.4)])]
    assert (rasterize(loose) == 4).sum() == 10 * 10  # int() of every vertex, as labelme and X-AnyLabeling
    assert (rasterize(loose, options=CORNER) == 4).sum() == 8 * 8  # centres 11.5 .. 18.5 inside
    touched = MaskOptions(vertex_convention="corner", all_touched=True)
    assert (rasterize(loose, options=touched) == 4).sum() == 10 * 10


def test_file_order_makes_holes_and_priority_overrides():
    outer = poly("building", [(10, 10), (60, 10), (60, 60), (10, 60)])
    hole = poly("background", [(20, 20), (30, 20), (30, 30), (20, 30)])
    road = poly("road", [(0, 40), (99, 40), (99, 45), (0, 45)])
    mask = rasterize([outer, hole, road])
    assert (mask[20:31, 20:31] == 0).all() and (mask[40:46] == 1).all() and mask[35, 35] == 4
    assert mask[19, 25] == 4 and mask[31, 25] == 4 and mask[46, 25] == 4
    by_priority = rasterize([road, outer, hole], options=MaskOptions(priority=(1, 4)))  # building wins
    assert (by_priority[40:46, 10:61] == 4).all() and (by_priority[40:46, 61:] == 1).all()
    assert (by_priority[20:31, 20:31] == 4).all()  # background is unlisted: painted first, then covered
    assert (rasterize([road, outer, hole], options=MaskOptions(priority=(4, 0)))[20:31, 20:31] == 0).all()


def test_every_area_shape_type():
    shapes = [
        poly("building", [(60, 25), (10, 5)], "rectangle"),  # corners in any order
        poly("water", [(70, 5), (90, 5), (90, 25), (70, 25)], "rectangle"),  # X-AnyLabeling 4-point form
        poly("tree", [(30, 50), (30, 60)], "circle"),  # centre, rim point: r = 10
        poly("road", [(70, 40), (90, 40), (90, 50), (70, 50)], "rotation", direction=0.0),
        poly("road", [(5, 70), (15, 65), (20, 75), (5, 78)], "quadrilateral"),
        poly("road", [(50, 70), (60, 70), (60, 78), (50, 78)], "oriented_rectangle"),
    ]
    mask = rasterize(shapes)
    assert (mask[5:26, 10:61] == 4).all() and (mask == 4).sum() == 51 * 21
    assert (mask[5:26, 70:91] == 2).all() and (mask == 2).sum() == 21 * 21
    tree = mask == 3
    rows, cols = np.nonzero(tree)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 60, 20, 40)  # the disc spans 2r + 1 px
    assert tree[50, 20:41].all() and tree[40:61, 30].all() and not tree[40, 20] and not tree[60, 40]
    assert abs(tree.sum() - np.pi * 10.5 ** 2) < 12
    assert (mask[40:51, 70:91] == 1).all() and (mask[70:79, 50:61] == 1).all() and mask[72, 10] == 1


def test_lines_have_the_line_width():
    line = poly("road", [(10, 40), (90, 40)], "line")
    mask = rasterize([line], options=MaskOptions(line_width_px=6))
    assert (mask == 1).sum() == 6 * 81 and (mask[38:44, 10:91] == 1).all()  # Pillow's wide line, 6 rows
    strip = poly("road", [(10, 10), (50, 10), (50, 70)], "linestrip")
    mask = rasterize([strip], options=MaskOptions(line_width_px=4))
    assert mask[10, 30] == 1 and mask[40, 50] == 1 and mask[40, 30] == 0 and mask[14, 30] == 0
    thin = rasterize([line], options=MaskOptions(line_width_px=1))
    assert (thin == 1).sum() == 81 and (thin[40, 10:91] == 1).all()


def test_labelme_mask_shape_paints_its_bitmap():
    bitmap = np.zeros((12, 20), np.uint8)
    bitmap[2:10, 3:17] = 1
    bitmap[5:7, 8:12] = 0
    ok, png = cv2.imencode(".png", bitmap * 255)
    shape = poly("building", [(30, 40), (49, 51)], "mask", mask=base64.b64encode(png.tobytes()).decode())
    for options in (MaskOptions(), CORNER):
        mask = rasterize([shape], options=options)
        assert np.array_equal(mask[40:52, 30:50] == 4, bitmap.astype(bool)) and (mask == 4).sum() == bitmap.sum()
    edge = poly("building", [(90, 75), (109, 86)], "mask", mask=shape["mask"])  # partly outside: clipped
    assert np.array_equal(rasterize([edge])[75:, 90:] == 4, bitmap[:5, :10].astype(bool))


def test_thin_and_degenerate_shapes_paint_their_pixels():
    assert np.array_equal(np.argwhere(rasterize([poly("road", [(10, 10), (30, 10)])]) == 1)[:, 1], np.arange(10, 31))
    diagonal = rasterize([poly("road", [(10, 10), (20, 20), (30, 30)])])  # collinear: zero area
    assert (diagonal == 1).sum() == 21 and all(diagonal[i, i] == 1 for i in range(10, 31))
    assert (rasterize([poly("road", [(40, 40), (40, 40)], "rectangle")]) == 1).sum() == 1
    assert not rasterize([poly("road", [(40, 40), (40, 40)], "circle")]).any()  # as in labelme: reported
    assert (rasterize([poly("road", [(40, 40), (40.5, 40.5)], "circle")]) == 1).sum() == 4
    assert (rasterize([poly("road", [(7.9, 3.2)])]) == 1).sum() == 1 and rasterize([poly("road", [(7.9, 3.2)])])[3, 7]
    one_px_wide = rasterize([poly("road", [(5, 5), (50, 5), (50, 5), (5, 5)])])
    assert (one_px_wide == 1).sum() == 46  # the old pixel-corner rule painted nothing here
    assert not rasterize([poly("road", [(5, 5), (50, 5), (50, 5), (5, 5)])], options=CORNER).any()


def test_points_paint_discs_and_cuboids_are_skipped():
    shapes = [poly("water", [(20, 20)], "point"), poly("tree", [(60, 40), (80, 40)], "points"),
              poly("road", [(5, 5), (6, 6), (7, 7), (8, 8)], "cuboid")]
    parsed, stats = parse_shapes(label_doc(shapes), Path("c.json"), TABLE)
    assert stats.skipped == 1 and [s.index for s in parsed] == [0, 1]
    mask = rasterize_shapes(parsed, 100, 80, MaskOptions(point_radius_px=3))
    rows, cols = np.nonzero(mask == 2)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (17, 23, 17, 23) and 25 < len(rows) < 49
    assert mask[40, 60] == 3 and mask[40, 80] == 3 and mask[40, 70] == 0 and not (mask == 1).any()
    assert (rasterize_shapes(parsed, 100, 80, MaskOptions(point_radius_px=1)) == 2).sum() == 5


def test_self_intersections_and_outside_shapes_are_reported_once(tmp_path, caplog):
    bowtie = poly("tree", [(0, 0), (20, 20), (20, 0), (0, 20)])
    spur = poly("water", [(40, 40), (60, 40), (60, 50), (70, 50), (60, 50), (60, 60), (40, 60)])  # not crossing
    shapes = [bowtie, spur, poly("road", [(-50, -50), (50, -50), (50, 3), (-50, 3)]),
              poly("road", [(200, 200), (300, 200), (300, 300)])]
    path = write_case(tmp_path / "in", shapes)
    with caplog.at_level(logging.WARNING):
        labels_to_masks([path], tmp_path / "out", TABLE)
    entry = json.loads((tmp_path / "out" / "index.json").read_text())[0]
    assert entry["shape_counts"]["self_intersecting"] == 1 and entry["shape_counts"]["unpainted"] == 1
    assert caplog.text.count("self-intersecting") == 1 and caplog.text.count("paint nothing") == 1
    assert "(shape 0)" in caplog.text and "(shape 3)" in caplog.text
    mask = read_mask(tmp_path / "out" / "scene.png")
    assert mask[10, 3] == 3 and mask[10, 17] == 3 and mask[3, 10] == 1 and mask[5, 10] == 0  # even-odd lobes
    assert mask[16, 10] == 0 and mask[10, 10] == 3  # between the lobes, and the crossing point
    assert (mask[:4, :51] == 1).all() and (mask[50, 60:71] == 2).all()  # clipped at the border; the spur


def test_label_matching_is_case_and_space_insensitive_and_legacy_means_polygon():
    legacy = {"label": "  Building ", "points": [[10, 10], [20, 10], [20, 20], [10, 20]], "line_color": None}
    assert (rasterize([legacy]) == 4).sum() == 121
    assert normalize_label(" WATER\t") == "water"


def test_params_table_and_options(tmp_path):
    params = load_params(REPO / "params.yaml")
    table = label_table(params)
    assert table.lookup("Vegetation") == 3 and table.lookup("__ignore__") == IGNORE
    assert mask_options(params) == MaskOptions()
    bad = {"classes": {"labels": {"car": "vehicle"}}}
    with pytest.raises(AerialsegError, match="unknown class 'vehicle'"):
        label_table(bad)
    assert mask_options({"masks": {"priority": ["building", "road"]}}).priority == (4, 1)
    assert mask_options({"masks": {"vertex_convention": "Corner", "all_touched": True}}).all_touched
    for masks, message in [({"vertex_convention": "edge"}, "center or corner"),
                           ({"all_touched": True}, "corner only"), ({"line_width_px": 2.5}, "whole number"),
                           ({"line_width_px": 0}, "from 1 to 999"), ({"point_radius_px": 0}, "from 1 to 999")]:
        with pytest.raises(AerialsegError, match=message):
            mask_options({"masks": masks})


def test_label_to_mask_imports_no_torch(tmp_path):
    path = write_case(tmp_path / "in", [poly("road", [(0, 0), (5, 0), (5, 5)])])
    code = ("import sys; from aerialseg import cli; sys.argv = ['aerialseg', 'label-to-mask', sys.argv[1], "
            "'--out', sys.argv[2]]\ntry:\n    cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'segmentation_models_pytorch') "
            "if m in sys.modules)\nassert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "scene.png").is_file()


# --- images, sizes, outputs ----------------------------------------------------------------------

def test_image_lookup_embedded_alpha_and_index(tmp_path):
    rgba = np.full((40, 60, 4), 200, np.uint8)
    rgba[:, :10, 3] = 0  # transparent strip -> ignore
    ok, png = cv2.imencode(".png", rgba)
    doc = label_doc([poly("water", [(0, 0), (60, 0), (60, 20), (0, 20)])], 60, 40, "nowhere/missing.png",
                    imageData=base64.b64encode(png.tobytes()).decode())
    (tmp_path / "emb.json").write_text(json.dumps(doc))
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "pic.jpg"), np.zeros((30, 50, 3), np.uint8))
    (tmp_path / "win.json").write_text(json.dumps(label_doc([], 50, 30, "C:\\survey\\pic.jpg")))
    out = tmp_path / "masks"
    labels_to_masks([tmp_path / "emb.json", tmp_path / "win.json"], out, TABLE, images_dir=tmp_path / "imgs")
    mask = read_mask(out / "emb.png")
    assert (mask[:, :10] == IGNORE).all() and (mask[:21, 10:] == 2).all() and (mask[21:, 10:] == 0).all()
    index = json.loads((out / "index.json").read_text())
    assert [Path(e["mask"]).name for e in index] == ["emb.png", "win.png"]
    assert Path(index[0]["scene"]).name == "emb.scene.png" and (out / "emb.scene.png").is_file()
    assert Path(index[1]["scene"]) == (tmp_path / "imgs" / "pic.jpg").resolve()
    assert index[0]["class_pixels"] == {"background": 19 * 50, "road": 0, "water": 21 * 50, "tree": 0,
                                        "building": 0, "ignore": 40 * 10}
    assert index[0]["shape_counts"]["polygon"] == 1 and index[0]["georeferenced"] is False


def test_masks_stage_uses_params_sections(tmp_path):
    write_case(tmp_path / "labels", [poly("Lake", [(0, 0), (10, 0), (10, 10), (0, 10)])])
    params = load_params(REPO / "params.yaml") | {"data": {"labels": str(tmp_path / "labels")},
                                                  "masks": {"out": str(tmp_path / "out")}}
    written = masks_stage(params)
    assert written == [tmp_path / "out" / "scene.png"] and (read_mask(written[0]) == 2).sum() == 121
    corner = params | {"masks": {"out": str(tmp_path / "gis"), "vertex_convention": "corner"}}
    assert (read_mask(masks_stage(corner)[0]) == 2).sum() == 100
    assert json.loads((tmp_path / "gis" / "index.json").read_text())[0]["vertex_convention"] == "corner"


# --- real label files ----------------------------------------------------------------------------

def format_examples() -> list[Path]:
    root = SHARED_DATA / FORMATS
    found = sorted(p for p in root.rglob("*.json") if '"shapes"' in p.read_text(encoding="utf-8"))
    return found or [root / "missing.json"]


@pytest.mark.parametrize("path", format_examples(), ids=lambda p: p.name)
def test_every_format_example_converts(path, tmp_path):
    path = shared_path(FORMATS, str(path.relative_to(SHARED_DATA / FORMATS)))
    doc = load_label_json(path)
    labels = sorted({normalize_label(s["label"]) for s in doc["shapes"]})
    table = LabelTable({lbl: (IGNORE if lbl == "__ignore__" else 1 + i % 4) for i, lbl in enumerate(labels)})
    images = tmp_path / "images"  # images the X-AnyLabeling examples do not ship: blank stand-ins of the size
    images.mkdir()
    if doc.get("imageWidth") and not doc.get("imageData"):
        stand_in = images / Path(str(doc["imagePath"])).name
        cv2.imwrite(str(stand_in), np.zeros((doc["imageHeight"], doc["imageWidth"], 3), np.uint8))
    out = tmp_path / "out"
    mask_path = labels_to_masks([path], out, table, MaskOptions(), images)[0]
    entry = json.loads((out / "index.json").read_text())[0]
    mask = read_mask(mask_path)
    height, width = mask.shape
    assert (entry["width"], entry["height"]) == (width, height)
    if doc.get("imageWidth"):
        assert (width, height) == (doc["imageWidth"], doc["imageHeight"])
    kinds = [str(s.get("shape_type") or "polygon").replace("line_strip", "linestrip") for s in doc["shapes"]]
    assert entry["shape_counts"]["total"] == len(doc["shapes"])
    assert entry["shape_counts"]["skipped_no_area"] == kinds.count("cuboid")
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, IGNORE}
    if any(k != "cuboid" for k in kinds):
        assert sum(v for k, v in entry["class_pixels"].items() if k != "background") > 0


def test_primitives_every_labelme_shape_type(tmp_path):
    path = shared_path(FORMATS, "labelme", "examples", "primitives", "primitives.json")
    table = LabelTable({"rectangle": 4, "circle": 3, "polygon": 2, "line": 1, "point": 1, "line_strip": 1,
                        "octagon": 2})
    doc = load_label_json(path)
    shapes, stats = parse_shapes(doc, path, table)
    assert stats.skipped == 0 and [s.index for s in shapes] == list(range(8)) and stats.by_type["point"] == 1
    mask = read_mask(labels_to_masks([path], tmp_path, table)[0])
    assert (mask[35:136, 32:133] == 4).all()  # rectangle (32,35)-(132,135): 101 x 101 px, edges included
    assert abs((mask == 3).sum() - np.pi * 50.8 ** 2) < 80  # circle (195, 84) r = 50.8 (exact: reference test)
    octagon = doc["shapes"][7]
    bitmap = cv2.imdecode(np.frombuffer(base64.b64decode(octagon["mask"]), np.uint8), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(mask[305:305 + bitmap.shape[0], 417:417 + bitmap.shape[1]] == 2, bitmap)


def test_embedded_image_with_bogus_image_path(tmp_path):
    path = shared_path(FORMATS, "labelme", "examples", "tutorial", "apc2016_obj3.json")
    doc = load_label_json(path)
    table = LabelTable({normalize_label(s["label"]): 4 for s in doc["shapes"]})
    mask = labels_to_masks([path], tmp_path, table)[0]
    entry = json.loads((tmp_path / "index.json").read_text())[0]
    assert read_mask(mask).shape == (907, 1210) and entry["scene"].endswith("apc2016_obj3.scene.jpg")
    assert cv2.imread(entry["scene"]).shape == (907, 1210, 3)


def test_legacy_labelme_without_version_or_shape_type(tmp_path):
    path = shared_path(FORMATS, "labelme-legacy", "apc2016_obj3.2018-04-07_no-version.json")
    doc = load_label_json(path)
    assert "imageHeight" not in doc and "shape_type" not in doc["shapes"][0]
    table = LabelTable({normalize_label(s["label"]): 3 for s in doc["shapes"]})
    mask = read_mask(labels_to_masks([path], tmp_path, table)[0])
    assert mask.shape == (907, 1210) and (mask == 3).sum() > 10_000


def test_matches_labelmes_own_semantic_segmentation_png(tmp_path):
    root = shared_path(FORMATS, "labelme", "examples", "semantic_segmentation")
    names = [n.strip() for n in (root / "labels.txt").read_text().splitlines() if n.strip()]
    voc = {names.index(n) - 1: c for n, c in [("_background_", 0), ("person", 1), ("bottle", 2)]}
    with rasterio.open(root / "data_dataset_voc" / "SegmentationClass" / "2011_000003.png") as ds:
        ref = ds.read(1)  # VOC palette indices; 255 = __ignore__
    expected = np.full(ref.shape, IGNORE, np.uint8)
    for idx, cls in voc.items():
        expected[ref == idx] = cls
    mask = labels_to_masks([root / "data_annotated" / "2011_000003.json"], tmp_path,
                           LabelTable({"person": 1, "bottle": 2, "__ignore__": IGNORE}))[0]
    assert np.array_equal(read_mask(mask), expected)  # pixel for pixel: labelme draws with the same Pillow calls


def test_arctic_lakes_relative_paths_outside_vertices_and_overlaps(tmp_path):
    folder = shared_path("arctic-lakes-labelme", "json")
    files = sorted(folder.glob("*.json"))
    outside, no_data, overlap = [], [], []
    for path in files:
        doc = json.loads(path.read_text())
        if not doc["shapes"]:
            continue
        pts = np.concatenate([np.asarray(s["points"], float) for s in doc["shapes"]])
        if (pts < 0).any() or (pts > 128).any():
            outside.append(path)
        if not doc.get("imageData"):
            no_data.append(path)
        if len(doc["shapes"]) > 3:
            overlap.append(path)
    chosen = sorted(set(outside[:4] + no_data[:4] + overlap[:4] + files[:8]))
    out = tmp_path / "masks"
    masks = labels_to_masks(chosen, out, LabelTable({"1": 2}))
    index = {Path(e["labels"]).name: e for e in json.loads((out / "index.json").read_text())}
    assert len(masks) == len(chosen)
    for path, mask_path in zip(chosen, masks):
        mask = read_mask(mask_path)
        entry = index[path.name]
        assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 2}
        assert Path(entry["scene"]).resolve() == (folder.parent / "images" / f"{path.stem}.jpg").resolve()
        border = np.r_[mask[0], mask[-1], mask[:, 0], mask[:, -1]]
        if path in outside:
            assert (border == 2).any()  # painted up to the image edge, not dropped
        # union semantics: every pixel whose centre lies inside a polygon (int() vertices) is water
        doc = json.loads(path.read_text())
        cols, rows = np.meshgrid(np.arange(128), np.arange(128))
        centres = np.c_[cols.ravel(), rows.ravel()]
        from matplotlib.path import Path as MplPath
        inside = np.zeros(128 * 128, bool)
        for shape in doc["shapes"]:
            inside |= MplPath(np.trunc(np.asarray(shape["points"], float))).contains_points(centres)
        assert (mask.ravel()[inside] == 2).all() and (mask == 2).sum() >= inside.sum()


# --- GeoTIFF scenes ------------------------------------------------------------------------------

def geotiff_case(scene: Path, folder: Path, width: int, height: int) -> Path:
    """A label file beside a copy-free reference to the scene: a building polygon and a road rectangle."""
    shapes = [poly("building", [(width * 0.2, height * 0.2), (width * 0.6, height * 0.25),
                                (width * 0.5, height * 0.7), (width * 0.15, height * 0.6)]),
              poly("road", [(0, height * 0.8), (width, height * 0.85)], "rectangle")]
    path = folder / f"{scene.stem}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(label_doc(shapes, width, height, str(scene))))
    return path


@pytest.mark.parametrize("name", ["deepforest/OSBS_029.tif", "deepforest/australia.tif",
                                  "deepforest/test_tiled.tif", "deepforest/5dded5bc0140b80006d2e565_23.tif",
                                  "webodm/orthophoto.tif"])
def test_geotiff_scene_gives_mask_on_the_same_grid(name, tmp_path):
    scene = shared_path("geotiff-samples", *name.split("/"))
    with rasterio.open(scene) as ds:
        width, height, crs, transform = ds.width, ds.height, ds.crs, ds.transform
        invalid = ds.dataset_mask() == 0
    label_file = geotiff_case(scene, tmp_path / "labels", width, height)
    mask_path = labels_to_masks([label_file], tmp_path / "masks", TABLE)[0]
    assert mask_path.suffix == ".tif"
    with rasterio.open(mask_path) as ds:
        assert (ds.crs, ds.transform, ds.nodata, ds.count, ds.dtypes[0]) == (crs, transform, 255, 1, "uint8")
        assert ds.colormap(1)[4][:3] == (255, 200, 0)
        mask = ds.read(1)
    assert (mask[invalid] == IGNORE).all() and (mask[~invalid] != IGNORE).all()
    row, col = int(height * 0.4), int(width * 0.35)
    assert mask[row, col] in (4, IGNORE) and (mask[int(height * 0.82)] != 0).all()
    if name.startswith("webodm"):
        assert invalid.sum() > 1000  # the RGBA orthophoto's transparent collar became ignore
    assert json.loads((tmp_path / "masks" / "index.json").read_text())[0]["georeferenced"] is True


def non_georeferenced_tiff(tmp_path: Path) -> Path:
    """A plain TIFF (no CRS, no geotransform) cut from a real orthophoto, with an alpha band."""
    with rasterio.open(shared_path("geotiff-samples", "deepforest", "test_tiled.tif")) as ds:
        rgb = ds.read(window=((0, 300), (0, 400)))
    alpha = np.full((1, 300, 400), 255, np.uint8)
    alpha[:, :, :50] = 0
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=400, height=300, count=4, dtype="uint8",
                       photometric="RGB", alpha="YES") as ds:
        ds.write(np.concatenate([rgb, alpha]))
    return path


def test_non_georeferenced_tiff_gives_png_with_warning(tmp_path, caplog):
    scene = non_georeferenced_tiff(tmp_path)
    label_file = geotiff_case(scene, tmp_path / "labels", 400, 300)
    with pytest.raises(AerialsegError, match="not georeferenced.*--allow-ungeoreferenced"):
        labels_to_masks([label_file], tmp_path / "masks", TABLE)
    with caplog.at_level(logging.WARNING):
        mask_path = labels_to_masks([label_file], tmp_path / "masks", TABLE, allow_ungeoreferenced=True)[0]
    assert mask_path.suffix == ".png" and "scene is not georeferenced; mask written as PNG" in caplog.text
    mask = read_mask(mask_path)
    assert mask.shape == (300, 400) and (mask[:, :50] == IGNORE).all() and (mask[:, 50:] != IGNORE).all()
    assert json.loads((tmp_path / "masks" / "index.json").read_text())[0]["georeferenced"] is False


def test_shared_non_georeferenced_tiff(tmp_path):
    scene = shared_path("geotiff-samples", "deepforest", "2019_YELL_2_541000_4977000_image_crop.tiff")
    with rasterio.open(scene) as ds:
        width, height = ds.width, ds.height
    mask_path = labels_to_masks([geotiff_case(scene, tmp_path / "l", width, height)], tmp_path / "m", TABLE,
                                allow_ungeoreferenced=True)[0]
    assert mask_path.suffix == ".png" and read_mask(mask_path).shape == (height, width)


# --- bad input: one line, exit code 2, nothing written -------------------------------------------

def _truncated_json(folder: Path) -> Path:
    path = write_case(folder, [poly("road", [(0, 0), (5, 0), (5, 5)])])
    path.write_text(path.read_text()[:-30])
    return path


def _nan(folder: Path) -> Path:
    path = write_case(folder, [poly("road", [(0, 0), (5, 0), (5, 5)])])
    path.write_text(path.read_text().replace("5.0, 5.0", "NaN, 5.0"))
    return path


def _missing_image(folder: Path) -> Path:
    path = write_case(folder, [])
    (folder / "scene.png").unlink()
    return path


def _embedded_differs_from_file(folder: Path) -> Path:
    ok, png = cv2.imencode(".png", np.zeros((40, 50, 3), np.uint8))
    return write_case(folder, [], imageData=base64.b64encode(png.tobytes()).decode(), imageHeight=40,
                      imageWidth=50)  # scene.png beside it is 100x80


def _corrupt_tiff(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "scene.tif").write_bytes(b"II*\x00" + b"\x17" * 500)
    path = folder / "scene.json"
    path.write_text(json.dumps(label_doc([], 100, 80, "scene.tif")))
    return path


def _truncated_tiff(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 255, (3, 600, 600), dtype=np.uint8)
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", width=600, height=600, count=3,
                       dtype="uint8", nodata=0, crs="EPSG:32640", transform=Affine(1, 0, 3e5, 0, -1, 2.79e6),
                       tiled=True, blockxsize=256, blockysize=256) as ds:
        ds.write(data)
    raw = (folder / "scene.tif").read_bytes()
    (folder / "scene.tif").write_bytes(raw[: len(raw) // 3])
    path = folder / "scene.json"
    path.write_text(json.dumps(label_doc([poly("road", [(0, 0), (5, 0), (5, 5)])], 600, 600, "scene.tif")))
    return path


BAD_CASES = {
    "truncated json": (_truncated_json, "not valid JSON"),
    "not a label file": (lambda f: (f.mkdir(parents=True), (f / "x.json").write_text("[1, 2]"), f / "x.json")[-1],
                         "no 'shapes' list"),
    "missing image": (_missing_image, "image not found"),
    "size mismatch": (lambda f: write_case(f, [], width=100, height=80, imageHeight=81), "is 100x81 but"),
    "imageData vs file": (_embedded_differs_from_file, "embedded imageData is 50x40 but the image file"),
    "nan coordinate": (_nan, "shape 0 ('road') has NaN or infinite coordinates"),
    "huge coordinate": (lambda f: write_case(f, [poly("road", [(0, 0), (1e12, 0), (5, 5)])]), "absurdly large"),
    "empty points": (lambda f: write_case(f, [poly("road", [])]), "shape 0 ('road') has no points"),
    "bad shape type": (lambda f: write_case(f, [poly("road", [(0, 0), (1, 1)], "spline")]),
                       "unsupported shape_type 'spline'"),
    "bad rectangle": (lambda f: write_case(f, [poly("road", [(0, 0), (1, 1), (2, 2)], "rectangle")]),
                      "rectangle with 3 points"),
    "huge circle": (lambda f: write_case(f, [poly("tree", [(0, 0), (1e6, 0)], "circle")]), "circle of radius"),
    "corrupt tiff": (_corrupt_tiff, "cannot read raster"),
    "truncated tiff": (_truncated_tiff, "scene.tif"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    make, expected = BAD_CASES[case]
    label_file = make(tmp_path / "in")
    out = tmp_path / "out"
    code, _, err = run_cli(["label-to-mask", label_file, "--out", out, "--params", REPO / "params.yaml"],
                           monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert expected in lines[0] and str(label_file.parent) in lines[0] and "fix:" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_unknown_labels_of_every_file_are_listed_at_once(tmp_path, monkeypatch, capsys):
    write_case(tmp_path / "in", [poly("car", [(0, 0), (5, 0), (5, 5)]), poly("road", [(0, 0), (5, 0), (5, 5)])],
               name="a")
    write_case(tmp_path / "in", [poly("Person", [(0, 0), (5, 0), (5, 5)]), poly("car", [(1, 1), (4, 1), (4, 4)])],
               name="b")
    code, _, err = run_cli(["label-to-mask", tmp_path / "in", "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a.json: 'car' (1x)" in err and "b.json: 'Person' (1x), 'car' (1x)" in err and "classes.labels" in err
    assert not (tmp_path / "out").exists()


def test_unknown_label_of_one_file_names_the_file_once(tmp_path, monkeypatch, capsys):
    path = write_case(tmp_path / "in", [poly("car", [(0, 0), (5, 0), (5, 5)])])
    code, _, err = run_cli(["label-to-mask", path, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and err.count(str(path)) == 1 and "unknown label(s) 'car' (1x)" in err


def test_cli_entry_point_end_to_end(tmp_path):
    """The installed console script: success writes masks; a bad file exits 2 with one stderr line."""
    good = write_case(tmp_path / "in", [poly("house", [(10, 10), (40, 10), (40, 40)])])
    exe = Path(sys.executable).with_name("aerialseg")
    done = subprocess.run([exe, "label-to-mask", good, "--out", tmp_path / "out"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (read_mask(tmp_path / "out" / "scene.png") == 4).sum() > 400
    bad = tmp_path / "bad.json"
    bad.write_text('{"shapes": [')
    failed = subprocess.run([exe, "label-to-mask", bad, "--out", tmp_path / "out2"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and str(bad) in failed.stderr
    assert not (tmp_path / "out2").exists()
