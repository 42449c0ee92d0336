"""tiles stage: window coverage, empty-patch dropping, nodata, bad inputs; real reassembled Dubai scenes
(tests/helpers/dubai.py)."""

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.data.tiling import COUNT_KEYS, TileParams, load_manifest, patch_fate
from aerialseg.geo.windows import fresh_spans, grid_windows, window_starts
from aerialseg.stages.tiles import run as tiles_stage
from conftest import shared_path
from helpers.dubai import dubai_pairs, dubai_scene, stage_params, synthetic_pair, write_index, write_pair

# --- window geometry ------------------------------------------------------------------------------

@pytest.mark.parametrize("length,size,stride", [(1000, 256, 192), (960, 256, 192), (256, 256, 192),
                                                (257, 256, 256), (1527, 256, 192), (300, 100, 100)])
def test_windows_cover_every_pixel_and_end_flush(length: int, size: int, stride: int) -> None:
    offsets = window_starts(length, size, size - stride)
    assert offsets[0] == 0 and offsets[-1] == length - size
    assert all(0 < b - a <= stride for a, b in zip(offsets, offsets[1:]))
    covered = np.zeros(length, int)
    for o in offsets:
        covered[o:o + size] += 1
    assert covered.min() >= 1
    fresh = np.zeros(length, int)
    for start, stop in fresh_spans(offsets, size):
        fresh[start:stop] += 1
    assert (fresh == 1).all()  # the fresh spans partition the axis


def test_grid_windows_fresh_parts_count_each_pixel_once() -> None:
    height, width, size, stride = 700, 530, 256, 192
    covered, fresh_count = np.zeros((height, width), int), np.zeros((height, width), int)
    for window, fresh in grid_windows(height, width, size, size - stride):
        assert (window.height, window.width) == (size, size)
        covered[window.toslices()] += 1
        fresh_count[fresh.toslices()] += 1
        assert window.row_off <= fresh.row_off and window.col_off <= fresh.col_off
    assert covered.min() >= 1 and (fresh_count == 1).all()


def test_short_axis_gets_one_window_and_bad_overlap_is_refused() -> None:
    assert window_starts(200, 256, 64) == [0]  # the stitcher pads it; tiling skips such scenes
    with pytest.raises(ValueError):
        window_starts(1000, 256, 256)


# --- the stage on real scenes ---------------------------------------------------------------------

def test_tiles_stage_on_real_dubai_scene(tmp_path: Path) -> None:
    entries = dubai_pairs(tmp_path, ("tile_2",))
    rgb, mask = dubai_scene("tile_2")
    manifest = load_manifest(tiles_stage(stage_params(tmp_path)))
    scene = manifest["scenes"][0]
    height, width = mask.shape
    rows, cols = window_starts(height, 256, 64), window_starts(width, 256, 64)
    assert (scene["height"], scene["width"]) == (height, width)
    assert scene["windows"] == len(rows) * len(cols)
    assert scene["kept"] + scene["kept_empty"] + scene["dropped_empty"] + scene["dropped_no_label"] == scene["windows"]
    # scene counts come from the windows' fresh parts: every pixel exactly once, equal to the whole mask
    hist = np.bincount(mask.ravel(), minlength=256)
    assert scene["counts"] == [int(c) for c in hist[:5]] + [int(hist[IGNORE])]
    assert manifest["count_keys"] == list(COUNT_KEYS)
    for patch in manifest["patches"]:
        window = mask[patch["row"]:patch["row"] + 256, patch["col"]:patch["col"] + 256]
        hist = np.bincount(window.ravel(), minlength=256)
        assert patch["counts"] == [int(c) for c in hist[:5]] + [int(hist[IGNORE])]
        assert sum(patch["counts"][1:5]) > 0 and not patch["empty"]
        assert patch["scene"] == entries[0]["scene"] and patch["mask"] == entries[0]["mask"]
    assert len({p["id"] for p in manifest["patches"]}) == len(manifest["patches"])
    preview = cv2.imread(scene["preview"])
    assert preview is not None and max(preview.shape[:2]) <= 1024


def test_real_scene_patches_cover_the_labelled_content(tmp_path: Path) -> None:
    """Every pixel of class 1..4 lies in some kept patch (only empty patches are dropped)."""
    dubai_pairs(tmp_path, ("tile_2",))
    _, mask = dubai_scene("tile_2")
    manifest = load_manifest(tiles_stage(stage_params(tmp_path, tiles={"size": 384, "overlap": 0})))
    covered = np.zeros(mask.shape, bool)
    for p in manifest["patches"]:
        covered[p["row"]:p["row"] + p["height"], p["col"]:p["col"] + p["width"]] = True
    assert not ((mask >= 1) & (mask <= 4) & ~covered).any()


# --- empty patches --------------------------------------------------------------------------------

def test_empty_patches_dropped_and_keep_fraction(tmp_path: Path) -> None:
    synthetic_pair(tmp_path)
    write_index(tmp_path / "masks", [synthetic_pair(tmp_path)])
    runs = {}
    for fraction in (0.0, 0.5, 1.0):
        params = stage_params(tmp_path, tiles={"size": 64, "overlap": 0, "keep_empty_fraction": fraction})
        runs[fraction] = load_manifest(tiles_stage(params))
    scene = runs[0.0]["scenes"][0]
    assert scene["windows"] == 8 * 16 and scene["kept"] == 64 and scene["dropped_empty"] == 64
    assert all(p["col"] < 512 and not p["empty"] for p in runs[0.0]["patches"])
    assert runs[1.0]["scenes"][0]["kept_empty"] == 64 and len(runs[1.0]["patches"]) == 128
    half = runs[0.5]["scenes"][0]
    assert 10 < half["kept_empty"] < 54 and half["kept_empty"] + half["dropped_empty"] == 64
    assert all(p["empty"] == (p["col"] >= 512) for p in runs[0.5]["patches"])
    again = load_manifest(tiles_stage(stage_params(tmp_path, tiles={"size": 64, "overlap": 0,
                                                                    "keep_empty_fraction": 0.5})))
    assert [p["id"] for p in again["patches"]] == [p["id"] for p in runs[0.5]["patches"]]  # seeded
    other_seed = load_manifest(tiles_stage(stage_params(tmp_path, tiles={
        "size": 64, "overlap": 0, "keep_empty_fraction": 0.5, "seed": 7})))
    assert [p["id"] for p in other_seed["patches"]] != [p["id"] for p in runs[0.5]["patches"]]


def test_patch_fate_rules() -> None:
    tp = TileParams(keep_empty_fraction=1.0)
    assert patch_fate([10, 1, 0, 0, 0, 5], tp, "a") == "kept"
    assert patch_fate([10, 0, 0, 0, 0, 5], tp, "a") == "kept_empty"
    assert patch_fate([0, 0, 0, 0, 0, 5], tp, "a") == "dropped_no_label"  # only ignore: always dropped
    assert patch_fate([10, 0, 0, 0, 0, 0], TileParams(keep_empty_fraction=0.0), "a") == "dropped_empty"


def test_nodata_collar_becomes_ignore_and_all_nodata_patches_drop(tmp_path: Path) -> None:
    """An alpha collar (as ODM writes it): masked pixels count as ignore; fully transparent patches drop."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)
    alpha = np.full((256, 384), 255, np.uint8)
    alpha[:, 256:] = 0  # right third transparent
    alpha[:40, :] = 0
    mask = np.full((256, 384), 1, np.uint8)  # the mask says road everywhere, even under the collar
    write_index(tmp_path / "masks", [write_pair(tmp_path / "masks", "ortho", rgb, mask, alpha=alpha)])
    manifest = load_manifest(tiles_stage(stage_params(tmp_path, tiles={"size": 128, "overlap": 0,
                                                                       "keep_empty_fraction": 1.0})))
    scene = manifest["scenes"][0]
    assert scene["dropped_no_label"] == 2 and scene["kept"] == 4
    assert scene["valid_fraction"] == pytest.approx((alpha > 0).mean())
    for p in manifest["patches"]:
        window = alpha[p["row"]:p["row"] + 128, p["col"]:p["col"] + 128]
        assert p["counts"][5] == int((window == 0).sum()) and p["counts"][1] == int((window > 0).sum())


def test_real_rgba_orthophoto_alpha_counts(tmp_path: Path) -> None:
    """The real WebODM orthophoto (RGBA, alpha = valid data): ignore counts follow its alpha band."""
    ortho = shared_path("geotiff-samples", "webodm", "orthophoto.tif")
    with rasterio.open(ortho) as ds:
        alpha = ds.read(4)
        profile = ds.profile
    mask = np.full(alpha.shape, 3, np.uint8)
    mask_path = tmp_path / "masks" / "ortho_mask.tif"
    mask_path.parent.mkdir(parents=True)
    with rasterio.open(mask_path, "w", **{**profile, "count": 1, "nodata": 255}) as ds:
        ds.write(mask, 1)
    write_index(tmp_path / "masks", [{"scene": str(ortho), "mask": str(mask_path)}])
    manifest = load_manifest(tiles_stage(stage_params(tmp_path, tiles={"size": 64, "overlap": 16})))
    scene = manifest["scenes"][0]
    assert scene["counts"][5] == int((alpha == 0).sum()) and scene["counts"][3] == int((alpha > 0).sum())
    for p in manifest["patches"]:
        window = alpha[p["row"]:p["row"] + 64, p["col"]:p["col"] + 64]
        assert p["counts"][5] == int((window == 0).sum())


# --- bad input ------------------------------------------------------------------------------------

def test_scene_smaller_than_patch_is_one_clear_error(tmp_path: Path) -> None:
    ortho = shared_path("geotiff-samples", "webodm", "orthophoto.tif")  # 212 x 212
    write_index(tmp_path / "masks", [{"scene": str(ortho), "mask": str(ortho)}])
    with pytest.raises(AerialsegError, match=r"orthophoto\.tif.*smaller than one 256x256 patch.*tiles\.size"):
        tiles_stage(stage_params(tmp_path))


def test_mask_size_mismatch(tmp_path: Path) -> None:
    entry = synthetic_pair(tmp_path)
    small = synthetic_pair(tmp_path, "small", height=300, width=400)
    write_index(tmp_path / "masks", [{**entry, "mask": small["mask"]}])
    with pytest.raises(AerialsegError, match=r"small_mask\.tif: mask is 400x300 px but its scene"):
        tiles_stage(stage_params(tmp_path))


def test_mask_on_another_grid(tmp_path: Path) -> None:
    entry = synthetic_pair(tmp_path)
    shifted = synthetic_pair(tmp_path, "shifted", transform=from_origin(600_000, 2_780_000, 0.5, 0.5))
    write_index(tmp_path / "masks", [{**entry, "mask": shifted["mask"]}])
    with pytest.raises(AerialsegError, match=r"shifted_mask\.tif: mask is not on the grid"):
        tiles_stage(stage_params(tmp_path))


def test_nodata_everywhere_names_the_scene(tmp_path: Path) -> None:
    rgb = np.zeros((300, 300, 3), np.uint8)
    entry = write_pair(tmp_path / "masks", "black", rgb, np.ones((300, 300), np.uint8), nodata=0)
    write_index(tmp_path / "masks", [entry])
    with pytest.raises(AerialsegError, match=r"black\.tif: scene holds no valid pixel"):
        tiles_stage(stage_params(tmp_path))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    entry = synthetic_pair(tmp_path)
    write_index(tmp_path / "masks", [{**entry, "scene": str(tmp_path / "gone.tif")}])
    with pytest.raises(AerialsegError, match=r"gone\.tif: file not found"):
        tiles_stage(stage_params(tmp_path))
    corrupt = tmp_path / "masks" / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00garbage" * 50)
    write_index(tmp_path / "masks", [{**entry, "scene": str(corrupt)}])
    with pytest.raises(AerialsegError, match=r"corrupt\.tif: cannot read raster"):
        tiles_stage(stage_params(tmp_path))
    with pytest.raises(AerialsegError, match=r"index\.json: mask index not found"):
        tiles_stage(stage_params(tmp_path / "elsewhere"))


def test_truncated_tiff_fails_with_the_file_name(tmp_path: Path) -> None:
    entry = synthetic_pair(tmp_path)
    data = Path(entry["scene"]).read_bytes()
    truncated = tmp_path / "masks" / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off
    write_index(tmp_path / "masks", [{**entry, "scene": str(truncated)}])
    with pytest.raises(AerialsegError, match=r"truncated\.tif"):
        tiles_stage(stage_params(tmp_path))


def test_stray_mask_value_and_wrong_dtype(tmp_path: Path) -> None:
    rgb = np.full((256, 256, 3), 100, np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[5, 5] = 7
    write_index(tmp_path / "masks", [write_pair(tmp_path / "masks", "stray", rgb, mask)])
    with pytest.raises(AerialsegError, match=r"stray_mask\.tif: mask holds value 7"):
        tiles_stage(stage_params(tmp_path))
    scene16 = tmp_path / "masks" / "deep.tif"
    with rasterio.open(scene16, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint16") as ds:
        ds.write(np.zeros((3, 256, 256), np.uint16))
    write_index(tmp_path / "masks", [{"scene": str(scene16), "mask": str(tmp_path / "masks" / "stray_mask.tif")}])
    with pytest.raises(AerialsegError, match=r"deep\.tif: scene is uint16"):
        tiles_stage(stage_params(tmp_path))


def test_bad_tile_params(tmp_path: Path) -> None:
    write_index(tmp_path / "masks", [synthetic_pair(tmp_path)])
    for bad in ({"overlap": 256}, {"keep_empty_fraction": 1.5}, {"size": "big"}):
        with pytest.raises(AerialsegError, match="tiles"):
            tiles_stage(stage_params(tmp_path, tiles=bad))


def test_non_geo_png_scene_and_mask(tmp_path: Path) -> None:
    """Non-georeferenced scenes (JPEG/PNG + PNG mask) tile the same way."""
    rgb, mask = dubai_scene("tile_2")
    folder = tmp_path / "masks"
    folder.mkdir()
    cv2.imwrite(str(folder / "scene.jpg"), cv2.cvtColor(rgb[:600, :700], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "scene.png"), mask[:600, :700])
    write_index(folder, [{"scene": str(folder / "scene.jpg"), "mask": str(folder / "scene.png"),
                          "georeferenced": False}])
    manifest = load_manifest(tiles_stage(stage_params(tmp_path)))
    scene = manifest["scenes"][0]
    assert not scene["georeferenced"] and scene["windows"] == 3 * 4
    hist = np.bincount(mask[:600, :700].ravel(), minlength=256)
    assert scene["counts"][:5] == [int(c) for c in hist[:5]]


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from aerialseg import cli

    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(stage_params(tmp_path)), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["aerialseg", "tiles", "--params", str(params_file)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "index.json" in err[0] and "fix:" in err[0]
