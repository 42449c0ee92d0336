"""Hostile inputs and survey-sized volumes for the CLI commands (issue 27): safety checks that stay linear,
caps on every size a file can blow up to, manifests checked before use, outputs that never collide.

Grows with each defect found: one test per defect, each one line of error naming the file and the fix, and
no input or earlier output lost. Tiny toy model (tests/helpers/safety.py), small generated files.
"""

import os
import pathlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from aerialseg.annotations import labels as labels_module
from aerialseg.annotations.anylabeling import LabelTable
from aerialseg.core import safety
from aerialseg.core.errors import AerialsegError
from aerialseg.core.limits import MAX_ZIP_MEMBERS, TooLarge, check_grid
from helpers.safety import (assert_one_line_error, make_bundle, run_cli, snapshot, temp_leftovers, write_labels,
                            write_scene)

TABLE = LabelTable.from_mapping({"road": "road", "building": "building"})
TRUST = "AERIALSEG_TRUST_UNVERIFIED"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("hostile_bundle"))


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    """No test inherits --trust-unverified from another (the CLI sets it in the environment)."""
    monkeypatch.setenv(TRUST, "0")


def coarse_scene(path: Path, pixel_m: float = 1000.0) -> Path:
    """A 128x96 scene with ``pixel_m`` m pixels: at the bundle's 0.5 m GSD its grid is astronomically large."""
    return write_scene(path, georef=False, crs="EPSG:32640", transform=from_origin(300000, 2800000, pixel_m, pixel_m))


def survey(root: Path, count: int, side: int = 8) -> Path:
    """``count`` label files, each with its own tiny PNG scene, in root/labels."""
    import cv2

    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    for i in range(count):
        cv2.imwrite(str(root / "images" / f"s{i}.png"), np.full((side, side, 3), 90, np.uint8))
        write_labels(root / "labels" / f"s{i}.json", f"../images/s{i}.png", width=side, height=side)
    return root / "labels"


# --- 1. linear safety checks ---------------------------------------------------------------------------

def test_refuse_inputs_resolves_each_folder_once(tmp_path, monkeypatch):
    """Was: every output compared with every input through Path.resolve (n x m realpath calls)."""
    n = 300
    (tmp_path / "in").mkdir()
    inputs = [tmp_path / "in" / f"{i}.json" for i in range(n)]
    for path in inputs:
        path.write_text("{}")
    outputs = [tmp_path / "out" / f"{i}.tif" for i in range(n)]
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    safety.refuse_inputs(outputs, inputs, "fix")
    assert len(calls) <= 4, len(calls)  # one per folder, not per pair
    os.link(inputs[7], tmp_path / "in" / "hard.tif")
    (tmp_path / "in" / "link.tif").symlink_to(inputs[9])
    for clash in (inputs[3], tmp_path / "in" / "hard.tif", tmp_path / "in" / "link.tif",
                  tmp_path / "out" / ".." / "in" / "5.json"):
        with pytest.raises(AerialsegError, match="destroy the input"):
            safety.refuse_inputs([*outputs, clash], inputs, "fix")


def test_label_to_mask_does_not_list_its_folders_per_file(tmp_path, monkeypatch):
    """Was: each atomic write listed the whole staging folder twice (stale sweep + sidecar glob): quadratic."""
    labels = survey(tmp_path, 150)
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda *a: listings.append(a) or real_scandir(*a))
    real_iterdir = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: listings.append(self) or real_iterdir(self))
    written = labels_module.labels_to_masks([labels], tmp_path / "masks", TABLE, allow_ungeoreferenced=True)
    assert len(written) == 150 and len(list((tmp_path / "masks").glob("*.png"))) == 150
    assert len(listings) < 20, len(listings)  # a few folder listings per run, not several per file


def test_label_to_mask_into_the_labels_folder_is_refused(tmp_path, capsys):
    """Masks named like each label file beside it would be taken by AnyLabeling for the JSON's image."""
    labels = survey(tmp_path, 3)
    before = snapshot(tmp_path)
    code, err = run_cli(["label-to-mask", labels, "--out", labels, "--allow-ungeoreferenced"], capsys)
    assert_one_line_error(code, err, str(labels), "holds the label files", "outside the labels folder")
    code, err = run_cli(["label-to-mask", labels / "s0.json", "--out", labels / ".", "--allow-ungeoreferenced"],
                        capsys)
    assert_one_line_error(code, err, "holds the label files")
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)
    code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "masks", "--allow-ungeoreferenced"], capsys)
    assert code == 0, err


# --- 2. size caps ---------------------------------------------------------------------------------------

def test_check_grid_is_the_one_cap():
    check_grid(128, 96, 2.0, 1e6, "a.tif", "infer.max_grid_megapixels")
    with pytest.raises(TooLarge, match=r"a\.tif: .*256,000x192,000 px.* — fix: raise infer\.max_grid_megapixels"):
        check_grid(128, 96, 2000.0, 4e9, "a.tif", "infer.max_grid_megapixels")


def test_infer_scene_refuses_a_grid_blown_up_by_resampling(bundle, tmp_path, capsys):
    """Was: a scene with 1000 m pixels read at the 0.5 m training GSD: a 256,000 x 192,000 grid, memory to OOM."""
    scene = coarse_scene(tmp_path / "coarse.tif")
    before = snapshot(tmp_path)
    code, err = run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "coarse.tif", "training GSD", "infer.max_grid_megapixels")
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)


def test_infer_survey_applies_the_same_grid_cap(bundle, tmp_path):
    """infer-survey's task maps through infer-scene's own body (it used a copy without the cap): the coarse
    scene fails with the cap's one-line error, the good one is mapped. Run in-process (the toy model is
    registered only here), as a Dask worker runs it."""
    from aerialseg.inference.scene import InferOptions
    from aerialseg.inference.survey import scene_task

    good, coarse = write_scene(tmp_path / "good.tif"), coarse_scene(tmp_path / "coarse.tif")
    options = InferOptions(areas=True, progress=False)
    failed = scene_task(str(coarse), "coarse", str(tmp_path), str(bundle), options, "test-model")
    assert failed["state"] == "failed" and "infer.max_grid_megapixels" in failed["error"], failed
    assert "coarse.tif" in failed["error"] and not list(tmp_path.glob("coarse_landcover*"))
    done = scene_task(str(good), "good", str(tmp_path), str(bundle), options, "test-model")
    assert done["state"] == "done" and (tmp_path / "good_landcover.tif").is_file(), done


def test_rank_scenes_refuses_a_grid_blown_up_by_resampling(bundle, tmp_path, capsys):
    good, coarse = write_scene(tmp_path / "good.tif"), coarse_scene(tmp_path / "coarse.tif")
    code, err = run_cli(["rank-scenes", good, coarse, "--model", bundle, "--out", tmp_path / "rank"], capsys)
    assert_one_line_error(code, err, "coarse.tif", "rank.max_grid_megapixels")
    assert not (tmp_path / "rank").exists()


def _zip_bundle(bundle: Path, dest: Path, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle.iterdir()):
            if path.is_file() and path.name not in skip:
                zf.write(path, arcname=path.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def test_zip_bundle_members_are_capped_before_extraction(bundle, tmp_path, capsys, monkeypatch):
    """Was: extracted without a limit (a 39 MB zip holding 1 GiB filled the temp disk; no path in the error)."""
    scene = write_scene(tmp_path / "a.tif")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    bomb = _zip_bundle(bundle, tmp_path / "bomb.zip", {"model.onnx": bytes(8 << 20)})  # 8 MiB of zeros, ~8 KB
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setenv("AERIALSEG_MAX_BUNDLE_MB", "4")
    code, err = run_cli(["infer-scene", scene, "--model", bomb, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "bomb.zip", "uncompressed size", "AERIALSEG_MAX_BUNDLE_MB")
    assert not any((tmp_path / "tmp").iterdir()) and not (tmp_path / "map.tif").exists()
    many = _zip_bundle(bundle, tmp_path / "many.zip", {f"junk/{i}.txt": b"" for i in range(MAX_ZIP_MEMBERS)})
    code, err = run_cli(["infer-scene", scene, "--model", many, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "many.zip", "members")
    monkeypatch.delenv("AERIALSEG_MAX_BUNDLE_MB")
    code, err = run_cli(["infer-scene", scene, "--model", _zip_bundle(bundle, tmp_path / "ok.zip"), "--out",
                         tmp_path / "map.tif"], capsys)
    assert code == 0, err


# --- 4. manifests checked before use; unverified bundles ------------------------------------------------

@pytest.mark.parametrize("content", ["[]", "[1, 2]", '"text"', "3", "null"])
def test_bundle_json_that_is_not_a_mapping_is_one_line(bundle, tmp_path, capsys, content):
    """Was: a JSON list gave AttributeError in the file check, before the schema check."""
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (copy / "bundle.json").write_text(content)
    code, err = run_cli(["infer-scene", write_scene(tmp_path / "a.tif"), "--model", copy, "--out",
                         tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "bundle.json", "must be a mapping")
    (copy / "bundle.json").unlink()
    (copy / "model.json").write_text(content)  # a plain model folder's record, the same rule
    code, err = run_cli(["infer-scene", tmp_path / "a.tif", "--model", copy, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "model.json", "mapping")


def test_bundle_without_bundle_json_needs_trust(bundle, tmp_path, capsys, caplog):
    """Was: deleting bundle.json let tampered weights run silently."""
    scene = write_scene(tmp_path / "a.tif")
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (copy / "bundle.json").unlink()
    (copy / "model.onnx").write_bytes(b"not what the bundle shipped")
    code, err = run_cli(["infer-scene", scene, "--model", copy, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, str(copy), "no bundle.json", "--trust-unverified")
    archive = _zip_bundle(bundle, tmp_path / "nomanifest.zip", skip=("bundle.json",))
    code, err = run_cli(["infer-scene", scene, "--model", archive, "--out", tmp_path / "map.tif"], capsys)
    assert_one_line_error(code, err, "nomanifest.zip", "no bundle.json", "--trust-unverified")
    assert not (tmp_path / "map.tif").exists()
    code, err = run_cli(["--trust-unverified", "infer-scene", scene, "--model", archive, "--out",
                         tmp_path / "map.tif"], capsys)
    assert code == 0, err
    assert (tmp_path / "map.tif").is_file()
    os.environ[TRUST] = "0"
    (copy / "model.onnx").unlink()  # a plain trained-model folder: runs, and says it is unverified
    with caplog.at_level("WARNING"):
        code, err = run_cli(["infer-scene", scene, "--model", copy, "--out", tmp_path / "map2.tif"], capsys)
    assert code == 0, err
    assert "plain trained-model folder" in caplog.text + err


# --- 5. outputs named so that two inputs never map to one output -----------------------------------------

def _rank_options(out: Path, **kw):
    from aerialseg.inference.ranking import RankOptions

    return RankOptions(**{"out": str(out), "window": 32, "top_k": 100, "crops": True, "progress": False,
                          "device": "cpu", "min_area_px": 0, **kw})


def test_rank_scenes_keeps_scenes_of_one_name_apart(bundle, tmp_path):
    """Was: a/odm_orthophoto.tif and b/odm_orthophoto.tif wrote crops under one name (pixels of one, JSON of the
    other); also across runs into one folder."""
    from aerialseg.inference.ranking import rank_scenes

    first = write_scene(tmp_path / "a" / "odm_orthophoto.tif", height=64, width=64, seed=1)
    second = write_scene(tmp_path / "b" / "odm_orthophoto.tif", height=64, width=64, seed=2)
    out = tmp_path / "rank"
    result = rank_scenes([first, second], bundle, _rank_options(out))
    assert len(result.ranked) == 8
    crops = {w.files["crop"] for w in result.ranked}
    assert len(crops) == 8 and len(list((out / "crops").glob("*.tif"))) == 8
    for window in result.ranked:
        with rasterio.open(window.files["crop"]) as crop, rasterio.open(window.scene) as src:
            win = Window(window.col, window.row, window.width, window.height)
            assert (crop.read() == src.read(window=win)).all()
    rank_scenes([second], bundle, _rank_options(out))  # a later run into the same folder: no crop replaced
    assert len(list((out / "crops").glob("*.tif"))) == 8
    import csv

    rows = list(csv.DictReader(open(out / "rank.csv")))
    for row in rows:  # paths relative to the output folder, resolvable from it
        for key in ("scene", "crop", "label"):
            assert not Path(row[key]).is_absolute() and (out / row[key]).is_file(), row[key]
    assert {(out / r["scene"]).resolve() for r in rows} == {second.resolve()}


def test_rank_scenes_refuses_a_file_out_before_the_scan(bundle, tmp_path, monkeypatch):
    from aerialseg.inference import ranking

    monkeypatch.setattr(ranking, "scan_scene", lambda *a, **k: pytest.fail("scanned before checking --out"))
    (tmp_path / "out.txt").write_text("mine")
    with pytest.raises(AerialsegError, match="out.txt: exists and is not a folder"):
        ranking.rank_scenes([write_scene(tmp_path / "a.tif")], bundle, _rank_options(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "mine"


def test_rank_scenes_failing_half_way_leaves_no_crops(bundle, tmp_path, monkeypatch):
    from aerialseg.inference import ranking

    real, calls = ranking.write_crop, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(ranking, "write_crop", failing)
    out = tmp_path / "rank"
    with pytest.raises((OSError, AerialsegError)):
        ranking.rank_scenes([write_scene(tmp_path / "a.tif", height=64, width=64)], bundle, _rank_options(out))
    assert len(calls) == 3
    assert not (out / "crops").exists() or not any((out / "crops").iterdir())
    assert not temp_leftovers(tmp_path)


def test_infer_scene_never_replaces_the_map_of_a_same_named_scene(bundle, tmp_path, capsys):
    """Every WebODM orthophoto is odm_orthophoto.tif: the default <out_dir>/<stem>_landcover.tif of the second
    scene was the first scene's map, replaced silently."""
    first = write_scene(tmp_path / "a" / "odm_orthophoto.tif", seed=1)
    second = write_scene(tmp_path / "b" / "odm_orthophoto.tif", seed=2)
    out = tmp_path / "maps"
    out.mkdir()
    code, err = run_cli(["infer-scene", first, "--model", bundle, "--out", out], capsys)
    assert code == 0, err
    before = snapshot(out)
    code, err = run_cli(["infer-scene", second, "--model", bundle, "--out", out], capsys)
    assert_one_line_error(code, err, "odm_orthophoto_landcover.tif", "another scene", "--out")
    assert snapshot(out) == before and not temp_leftovers(tmp_path)
    code, err = run_cli(["infer-scene", first, "--model", bundle, "--out", out], capsys)
    assert code == 0, err  # the same scene updates its own map
    code, err = run_cli(["infer-scene", second, "--model", bundle, "--out", out / "b_landcover.tif"], capsys)
    assert code == 0, err


def test_label_to_mask_refuses_a_scene_whose_mask_would_blow_up(tmp_path, capsys):
    """A 9-byte-per-side PNG header can claim 100,000 x 100,000 px: its mask (10 GB) is refused from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    side = 100_000
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "huge.png").write_bytes(png)
    write_labels(tmp_path / "labels" / "huge.json", "../images/huge.png", width=side, height=side)
    code, err = run_cli(["label-to-mask", tmp_path / "labels", "--out", tmp_path / "masks",
                         "--allow-ungeoreferenced"], capsys)
    assert_one_line_error(code, err, "huge.png", "100000x100000", "masks.max_scene_megapixels")
    assert not (tmp_path / "masks").exists() and not temp_leftovers(tmp_path)
