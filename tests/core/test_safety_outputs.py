"""Outputs never replace inputs or hand labels; a failed label-to-mask leaves the previous masks as they were."""

import json
import os
from pathlib import Path

import pytest

from aerialseg.core.safety import same_file
from helpers.safety import (PARAMS, assert_one_line_error, make_bundle, run_cli, snapshot, temp_leftovers,
                            write_labels, write_scene)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("safety_bundle"))


@pytest.fixture
def survey(tmp_path: Path) -> Path:
    """labels/x.json + scenes/x.tif (and y), masks of a first good run in masks/."""
    for name, seed in (("x", 0), ("y", 1)):
        write_scene(tmp_path / "scenes" / f"{name}.tif", seed=seed)
        write_labels(tmp_path / "labels" / f"{name}.json", f"../scenes/{name}.tif")
    return tmp_path


# --- 1. outputs that are inputs ------------------------------------------------------------------------

def test_same_file_sees_symlinks_hard_links_and_case(tmp_path):
    src = tmp_path / "scene.tif"
    src.write_bytes(b"x")
    (tmp_path / "link.tif").symlink_to(src)
    os.link(src, tmp_path / "hard.tif")
    assert same_file(tmp_path / "link.tif", src) and same_file(tmp_path / "hard.tif", src)
    assert same_file(tmp_path / "sub" / ".." / "scene.tif", src)
    assert not same_file(tmp_path / "other.tif", src)
    upper = tmp_path / "SCENE.TIF"
    if upper.exists():  # a case-insensitive file system: one file
        assert same_file(upper, src)


def test_label_to_mask_into_the_scene_folder_is_refused(survey, capsys):
    """`label-to-mask x.json --out DIR` where DIR holds x.tif would replace the orthophoto with the mask."""
    write_labels(survey / "scenes" / "x.json", "x.tif")
    before = snapshot(survey)
    code, err = run_cli(["label-to-mask", survey / "scenes" / "x.json", "--out", survey / "scenes"], capsys)
    assert_one_line_error(code, err, "x.tif", "would destroy the input", "another folder")
    assert snapshot(survey) == before and not temp_leftovers(survey)


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_label_to_mask_onto_a_linked_scene_is_refused(survey, capsys, how):
    out = survey / "out"
    out.mkdir()
    link = out / "x.tif"
    link.symlink_to(survey / "scenes" / "x.tif") if how == "symlink" else os.link(survey / "scenes" / "x.tif", link)
    before = snapshot(survey)
    code, err = run_cli(["label-to-mask", survey / "labels" / "x.json", "--out", out], capsys)
    assert_one_line_error(code, err, "x.tif", "input")
    assert snapshot(survey) == before and not temp_leftovers(survey)


def test_label_to_mask_does_not_replace_foreign_files_without_overwrite(survey, capsys):
    out = survey / "masks"
    out.mkdir()
    (out / "x.tif").write_bytes(b"somebody's file")
    code, err = run_cli(["label-to-mask", survey / "labels", "--out", out], capsys)
    assert_one_line_error(code, err, "x.tif", "--overwrite")
    assert (out / "x.tif").read_bytes() == b"somebody's file" and sorted(os.listdir(out)) == ["x.tif"]
    code, err = run_cli(["label-to-mask", survey / "labels", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["index.json", "x.tif", "y.tif"]


def test_infer_scene_onto_its_scene_is_refused(bundle, tmp_path, capsys):
    scene = write_scene(tmp_path / "a.tif")
    (tmp_path / "A_link.tif").symlink_to(scene)
    before = snapshot(tmp_path)
    for out in (scene, tmp_path / "A_link.tif", tmp_path / "." / "a.tif"):
        code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", out], capsys)
        assert_one_line_error(code, err, "a.tif", "would destroy the input", "--out")
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", bundle / "model.safetensors"], capsys)
    assert_one_line_error(code, err, "model.safetensors", "input")
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)


def test_mask_to_label_keeps_hand_labels_unless_overwrite(survey, capsys):
    """The default --out is the image's folder, where the annotators' x.json may sit."""
    scenes, masks = survey / "scenes", survey / "masks"
    assert run_cli(["label-to-mask", survey / "labels", "--out", masks], capsys)[0] == 0
    hand = write_labels(scenes / "x.json", "x.tif")
    before = snapshot(survey)
    code, err = run_cli(["mask-to-label", masks / "x.tif", "--image", scenes / "x.tif"], capsys)
    assert_one_line_error(code, err, "x.json", "already exists", "--overwrite")
    assert snapshot(survey) == before
    code, err = run_cli(["mask-to-label", masks / "x.tif", "--image", scenes / "x.tif", "--overwrite"], capsys)
    assert code == 0, err
    backups = sorted(scenes.glob("x.json.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == before[str(hand)]
    assert json.loads(hand.read_text())["imagePath"] == "x.tif" and hand.read_bytes() != before[str(hand)]
    code, err = run_cli(["mask-to-label", masks / "x.tif", "--image", scenes / "x.tif", "--out", masks], capsys)
    assert code == 0 and (masks / "x.json").is_file()  # beside the mask: no conflict
    code, err = run_cli(["mask-to-label", masks / "x.tif", "--image", masks / "x.tif", "--out", masks], capsys)
    assert_one_line_error(code, err)  # the mask as its own image


def test_infer_anylabeling_does_not_replace_labels_without_overwrite(bundle, tmp_path, capsys):
    params = tmp_path / "params.yaml"  # its infer.out_dir (where the preview goes) is relative to it
    params.write_text(PARAMS.read_text())
    scene = write_scene(tmp_path / "s.tif")
    hand = write_labels(tmp_path / "hand" / "s.json", "../s.tif")
    before = hand.read_bytes()
    argv = ["infer-scene", scene, "--model", bundle, "--format", "anylabeling", "--out", hand, "--params", params]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "s.json", "--overwrite")
    assert hand.read_bytes() == before
    code, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert [p.read_bytes() for p in (tmp_path / "hand").glob("s.json.*.bak")] == [before]


# --- 2. a failed run leaves the previous good outputs ----------------------------------------------------

def test_failed_label_to_mask_keeps_the_previous_masks_and_index(survey, capsys):
    """The second file of the rerun is corrupt: the first run's masks and index.json stay byte-identical."""
    masks = survey / "masks"
    assert run_cli(["label-to-mask", survey / "labels", "--out", masks], capsys)[0] == 0
    good = snapshot(masks)
    assert sorted(Path(p).name for p in good) == ["index.json", "x.tif", "y.tif"]
    write_scene(survey / "scenes" / "x.tif", seed=5)  # x changes (its mask would change)
    scene_y = survey / "scenes" / "y.tif"
    data = scene_y.read_bytes()
    scene_y.write_bytes(data[: len(data) * 2 // 3])  # y is cut short
    code, err = run_cli(["label-to-mask", survey / "labels", "--out", masks], capsys)
    assert_one_line_error(code, err, "y.tif", "truncated")
    assert snapshot(masks) == good and not temp_leftovers(survey)


def test_rerun_swaps_in_whole_and_drops_masks_no_longer_made(survey, capsys):
    masks = survey / "masks"
    assert run_cli(["label-to-mask", survey / "labels", "--out", masks], capsys)[0] == 0
    (survey / "labels" / "y.json").unlink()
    assert run_cli(["label-to-mask", survey / "labels", "--out", masks], capsys)[0] == 0
    index = json.loads((masks / "index.json").read_text())
    assert sorted(os.listdir(masks)) == ["index.json", "x.tif"]
    assert [Path(e["mask"]).name for e in index] == ["x.tif"]
    assert all((masks / Path(e["mask"]).name).is_file() for e in index)
    assert not temp_leftovers(survey)
