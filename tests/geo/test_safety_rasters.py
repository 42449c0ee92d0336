"""Rasters the model cannot read correctly are refused with one line; messages say the truth."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from helpers.safety import (PARAMS, REPO, assert_one_line_error, make_bundle, run_cli, script_env, snapshot,
                            temp_leftovers, write_labels, write_scene)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("safety_bundle"))


def _cut(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _tiled_scene(path: Path) -> Path:
    return write_scene(path, 300, 300, tiled=True, blockxsize=128, blockysize=128, compress="deflate")


# --- 3. refused, not mapped ------------------------------------------------------------------------------

def test_truncated_geotiff_is_refused_by_label_to_mask_and_infer(bundle, tmp_path, capsys):
    scene = _cut(_tiled_scene(tmp_path / "t.tif"))
    labels = write_labels(tmp_path / "t.json", "t.tif", 300, 300)
    before = snapshot(tmp_path)
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "masks"], capsys)
    assert_one_line_error(code, err, "t.tif", "truncated", "re-export")
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "t.tif", "truncated")
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)


def test_truncated_png_and_jpeg(tmp_path, capsys):
    """A cut PNG mask was once reported as 'mask holds values [5..14]'; a cut JPEG scene read as grey."""
    scene = write_scene(tmp_path / "s.tif", 60, 80)
    mask = np.random.default_rng(0).integers(0, 5, (60, 80)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "s_mask.png"), mask)
    _cut(tmp_path / "s_mask.png", 0.5)
    code, err = run_cli(["mask-to-label", tmp_path / "s_mask.png", "--image", scene, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "s_mask.png", "PNG is truncated")
    rgb = np.random.default_rng(1).integers(0, 255, (60, 80, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "photo.jpg"), rgb)
    _cut(tmp_path / "photo.jpg", 0.7)
    labels = write_labels(tmp_path / "photo.json", "photo.jpg", 80, 60)
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, "photo.jpg", "JPEG is truncated")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m" / "index.json").exists()


def test_corrupt_rasters_print_only_the_error_line(tmp_path):
    """No GDAL/OpenCV warning lines before the error (a fresh process, as users run it)."""
    scene = _cut(_tiled_scene(tmp_path / "t.tif"))
    garbage = tmp_path / "g.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    for image in (scene, garbage):
        labels = write_labels(tmp_path / f"{image.stem}.json", image.name, 300, 300)
        done = subprocess.run([sys.executable, "-m", "aerialseg.cli", "label-to-mask", str(labels), "--out",
                               str(tmp_path / "m"), "--params", str(PARAMS)], cwd=REPO, env=script_env(),
                              capture_output=True, text=True, timeout=120)
        assert_one_line_error(done.returncode, done.stderr, image.name)


def test_ungeoreferenced_scene_needs_the_allow_flag(bundle, tmp_path, capsys):
    scene = write_scene(tmp_path / "plain.tif", georef=False)
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "m.tif"], capsys)
    assert_one_line_error(code, err, "plain.tif", "not georeferenced", "--allow-ungeoreferenced")
    assert not (tmp_path / "m.tif").exists()
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "m.tif",
                         "--allow-ungeoreferenced"], capsys)
    assert code == 0 and (tmp_path / "m.tif").is_file()
    labels = write_labels(tmp_path / "plain.json", "plain.tif")
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "masks"], capsys)
    assert_one_line_error(code, err, "plain.tif", "not georeferenced", "--allow-ungeoreferenced")
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "masks", "--allow-ungeoreferenced"], capsys)
    assert code == 0 and (tmp_path / "masks" / "plain.png").is_file()


@pytest.mark.parametrize("case", ["nodata", "nan", "uint16", "float32"])
def test_unmappable_scenes_are_refused(bundle, tmp_path, capsys, case):
    """All-nodata, NaN-only, uint16 and float32 scenes once mapped as 100 % one class with exit 0."""
    scene = {
        "nodata": lambda p: write_scene(p, nodata=0, fill=0),
        "nan": lambda p: write_scene(p, dtype="float32", fill=np.nan),
        "uint16": lambda p: write_scene(p, dtype="uint16"),
        "float32": lambda p: write_scene(p, dtype="float32"),
    }[case](tmp_path / "scene.tif")
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "map.tif"], capsys)
    expected = {"nodata": "no valid pixel", "nan": "float32", "uint16": "uint16", "float32": "float32"}[case]
    assert_one_line_error(code, err, "scene.tif", expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_label_to_mask_refuses_a_scene_that_is_nodata_everywhere(tmp_path, capsys):
    write_scene(tmp_path / "good.tif")
    write_labels(tmp_path / "labels" / "good.json", "../good.tif")
    assert run_cli(["label-to-mask", tmp_path / "labels", "--out", tmp_path / "masks"], capsys)[0] == 0
    before = snapshot(tmp_path / "masks")
    write_scene(tmp_path / "empty.tif", nodata=0, fill=0)
    write_labels(tmp_path / "labels" / "empty.json", "../empty.tif")
    code, err = run_cli(["label-to-mask", tmp_path / "labels", "--out", tmp_path / "masks"], capsys)
    assert_one_line_error(code, err, "empty.tif", "no valid pixel")
    assert snapshot(tmp_path / "masks") == before and not temp_leftovers(tmp_path)


# --- 7. messages that say the truth -------------------------------------------------------------------

def test_image_width_as_text_is_named_as_such(tmp_path, capsys):
    write_scene(tmp_path / "s.tif")
    labels = write_labels(tmp_path / "s.json", "s.tif", width="128")
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "m"], capsys)
    line = assert_one_line_error(code, err, "s.json", 'imageWidth is "128" (text)')
    assert "128x96 but" not in line


def test_bad_tile_size_names_the_bundle_not_overlap(bundle, tmp_path, capsys):
    broken = tmp_path / "bundle"
    broken.mkdir()
    for f in bundle.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((broken / "bundle.json").read_text())
    (broken / "bundle.json").write_text(json.dumps({**manifest, "tile_size": 0}))
    scene = write_scene(tmp_path / "s.tif")
    code, err = run_cli(["infer-scene", scene, "--model", broken, "--out", tmp_path / "m.tif"], capsys)
    line = assert_one_line_error(code, err, "tile_size must be a whole number", "rebuild the bundle")  # verify_bundle
    assert str(broken) in line and "--overlap" not in line


def test_errors_name_the_params_file_given(tmp_path, capsys):
    params = yaml.safe_load(PARAMS.read_text())
    params["masks"]["vertex_convention"] = "sideways"
    custom = tmp_path / "survey-params.yaml"
    custom.write_text(yaml.safe_dump(params))
    write_scene(tmp_path / "s.tif")
    labels = write_labels(tmp_path / "s.json", "s.tif")
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "m", "--params", custom], capsys)
    line = assert_one_line_error(code, err, "survey-params.yaml", "vertex_convention")
    assert not line.startswith("error: params.yaml")


# --- the README's promise, word for word ---------------------------------------------------------------

README_BAD_INPUT = (
    "Bad input (malformed JSON, unknown labels, missing image, size mismatch, corrupt or non-georeferenced\n"
    "TIFF, a scene smaller than a patch, nodata everywhere) prints one line — `error: <file>: <what> — fix: <how>` —\n"
    "exits with code 2 and leaves no half-written output (every file is written to a temp file and renamed).")


def _case(tmp_path: Path, kind: str) -> tuple[list, str]:
    """(CLI arguments, a word the error line names) for one kind of bad input the README lists."""
    labels = tmp_path / "labels"
    write_scene(tmp_path / "s.tif")
    if kind == "malformed JSON":
        path = write_labels(labels / "s.json", "../s.tif")
        path.write_text(path.read_text()[:-20])
        return ["label-to-mask", path], "not valid JSON"
    if kind == "unknown labels":
        path = write_labels(labels / "s.json", "../s.tif")
        path.write_text(path.read_text().replace('"road"', '"carpark"'))
        return ["label-to-mask", path], "carpark"
    if kind == "missing image":
        return ["label-to-mask", write_labels(labels / "s.json", "../nowhere.tif")], "image not found"
    if kind == "size mismatch":
        return ["label-to-mask", write_labels(labels / "s.json", "../s.tif", width=64)], "64x96"
    if kind == "corrupt TIFF":
        _cut(_tiled_scene(tmp_path / "c.tif"))
        return ["label-to-mask", write_labels(labels / "c.json", "../c.tif", 300, 300)], "truncated"
    if kind == "non-georeferenced TIFF":
        write_scene(tmp_path / "p.tif", georef=False)
        return ["label-to-mask", write_labels(labels / "p.json", "../p.tif")], "not georeferenced"
    if kind == "nodata everywhere":
        write_scene(tmp_path / "n.tif", nodata=0, fill=0)
        return ["label-to-mask", write_labels(labels / "n.json", "../n.tif")], "no valid pixel"
    assert kind == "a scene smaller than a patch"
    from aerialseg.core.config import load_params
    from aerialseg.stages.masks import run as masks_stage

    write_labels(labels / "s.json", "../s.tif")  # a good 128x96 mask; tiles.size is 256
    masks_stage(load_params(PARAMS), labels=[labels], out=tmp_path / "out" / "masks")
    params = yaml.safe_load(PARAMS.read_text())
    params["masks"]["out"] = str(tmp_path / "out" / "masks")
    params["tiles"]["out"] = str(tmp_path / "out" / "tiles")
    custom = tmp_path / "params.yaml"
    custom.write_text(yaml.safe_dump(params))
    return ["tiles", "--params", custom], "smaller than one"


@pytest.mark.parametrize("kind", ["malformed JSON", "unknown labels", "missing image", "size mismatch",
                                  "corrupt TIFF", "non-georeferenced TIFF", "a scene smaller than a patch",
                                  "nodata everywhere"])
def test_readme_bad_input_paragraph_holds(tmp_path, capsys, kind):
    assert README_BAD_INPUT in (REPO / "README.md").read_text(encoding="utf-8")
    argv, named = _case(tmp_path, kind)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, err = run_cli([*argv, *(["--out", out / "masks"] if argv[0] == "label-to-mask" else [])], capsys)
    assert_one_line_error(code, err, named)
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)
