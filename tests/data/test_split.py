"""split stage: deterministic, no pixel shared across splits, fractions and class shares, bad input."""

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aerialseg.core.errors import AerialsegError
from aerialseg.data.split import (SPLITS, SplitParams, class_shares, find_leaks, make_split, overlapping_pairs,
                                  share_table)
from aerialseg.stages.split import run as split_stage
from aerialseg.stages.split import split_params
from aerialseg.data.tiling import load_manifest
from aerialseg.stages.tiles import run as tiles_stage
from helpers.dubai import dubai_pairs, stage_params
from helpers.manifests import grid_manifest

REAL_TILES = ("tile_1", "tile_2", "tile_3")


@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiles of three real reassembled Dubai scenes (about 2400x1900, 1500x1600, 2000x2000 px)."""
    root = tmp_path_factory.mktemp("split_real")
    dubai_pairs(root, REAL_TILES)
    return load_manifest(tiles_stage(stage_params(root)))


def coverage_leaks(manifest: dict[str, Any], split: dict[str, Any]) -> int:
    """Independent pixel check: paint each split's patches; count pixels painted by two splits."""
    by_id = {p["id"]: p for p in manifest["patches"]}
    leaks = 0
    for scene in manifest["scenes"]:
        cover = {name: np.zeros((scene["height"], scene["width"]), bool) for name in SPLITS}
        for name in SPLITS:
            for pid in split["splits"][name]:
                p = by_id[pid]
                if p["scene_name"] == scene["scene_name"]:
                    cover[name][p["row"]:p["row"] + p["height"], p["col"]:p["col"] + p["width"]] = True
        leaks += int((cover["train"] & (cover["val"] | cover["test"])).sum() + (cover["val"] & cover["test"]).sum())
    return leaks


# --- real scenes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group,block_px", [("block", 1024), ("block", 768), ("scene", 1024)])
def test_real_split_has_no_leakage_and_sensible_fractions(real_manifest: dict[str, Any], group: str,
                                                          block_px: int) -> None:
    split = make_split(real_manifest, SplitParams(group=group, block_px=block_px))
    assert all(split["splits"][name] for name in SPLITS)
    assert find_leaks(real_manifest["patches"], split["splits"]) == []
    assert coverage_leaks(real_manifest, split) == 0
    ids = [i for name in SPLITS for i in split["splits"][name]]
    dropped = {d["id"] for d in split["guard_dropped"]}
    assert len(ids) == len(set(ids)) and not set(ids) & dropped
    assert set(ids) | dropped == {p["id"] for p in real_manifest["patches"]}
    if group == "block":
        total = len(ids)
        assert abs(len(split["splits"]["train"]) / total - 0.8) < 0.06
        assert len(dropped) < 0.25 * len(real_manifest["patches"])
    else:  # whole scenes: nothing to guard, each scene in one split
        assert not dropped
        for scene in REAL_TILES:
            owners = {name for name in SPLITS for i in split["splits"][name] if i.startswith(scene + "_")}
            assert len(owners) == 1


def test_real_split_is_deterministic_and_order_independent(real_manifest: dict[str, Any]) -> None:
    sp = SplitParams()
    first = make_split(real_manifest, sp)
    shuffled = dict(real_manifest, patches=random.Random(0).sample(real_manifest["patches"],
                                                                 len(real_manifest["patches"])))
    assert make_split(shuffled, sp) == first
    assert make_split(real_manifest, SplitParams(seed=7))["splits"] != first["splits"]


def test_class_shares_sum_to_one(real_manifest: dict[str, Any]) -> None:
    split = make_split(real_manifest, SplitParams())
    shares = class_shares(real_manifest, split)
    for name in SPLITS:
        entry = shares["splits"][name]
        assert sum(entry["shares"].values()) == pytest.approx(1.0, abs=1e-5)
        assert entry["patches"] == len(split["splits"][name])
        assert sum(entry["pixels"].values()) == entry["patches"] * 256 * 256
        assert 0 <= entry["ignore_fraction"] < 0.1
    table = share_table(shares).splitlines()
    assert table[0].split()[:3] == ["split", "patches", "background"] and len(table) == 4


def test_split_stage_writes_json_and_png(tmp_path: Path) -> None:
    dubai_pairs(tmp_path, ("tile_2", "tile_3"))
    params = stage_params(tmp_path)
    tiles_stage(params)
    dest = split_stage(params)
    split = json.loads(dest.read_text())
    shares = json.loads((dest.parent / "class_shares.json").read_text())
    assert split["seed"] == 42 and split["group"] == "block" and split["leaks"] == 0
    assert {u["split"] for u in split["units"]} == set(SPLITS)
    assert set(shares["splits"]) == set(SPLITS)
    png = (dest.parent / "split.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert json.loads(split_stage(params).read_text()) == split  # rerun: same bytes of content


# --- constructed cases ----------------------------------------------------------------------------

def test_overlapping_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(5)
    patches = [{"id": str(i), "scene_name": f"s{rng.integers(2)}", "row": int(rng.integers(0, 900)),
                "col": int(rng.integers(0, 900)), "height": int(rng.integers(20, 200)),
                "width": int(rng.integers(20, 200))} for i in range(300)]
    brute = {(i, j) for i in range(len(patches)) for j in range(i + 1, len(patches))
             if patches[i]["scene_name"] == patches[j]["scene_name"]
             and patches[i]["row"] < patches[j]["row"] + patches[j]["height"]
             and patches[j]["row"] < patches[i]["row"] + patches[i]["height"]
             and patches[i]["col"] < patches[j]["col"] + patches[j]["width"]
             and patches[j]["col"] < patches[i]["col"] + patches[i]["width"]}
    assert {tuple(p) for p in overlapping_pairs(patches).tolist()} == brute
    assert brute  # the case is not trivial


def test_touching_patches_do_not_leak() -> None:
    a = {"id": "a", "scene_name": "s", "row": 0, "col": 0, "height": 10, "width": 10}
    b = {"id": "b", "scene_name": "s", "row": 0, "col": 10, "height": 10, "width": 10}
    c = {"id": "c", "scene_name": "s", "row": 9, "col": 9, "height": 10, "width": 10}
    assert find_leaks([a, b], {"train": ["a"], "val": ["b"]}) == []
    assert find_leaks([a, c], {"train": ["a"], "test": ["c"]}) == [("a", "c")]


@pytest.mark.parametrize("size,stride,block_px", [(256, 128, 512), (256, 64, 700), (128, 96, 300)])
def test_heavily_overlapping_windows_never_leak(size: int, stride: int, block_px: int) -> None:
    manifest = grid_manifest({"a": (2048, 1536), "b": (1024, 1024)}, size, stride)
    split = make_split(manifest, SplitParams(block_px=block_px, candidates=20))
    assert find_leaks(manifest["patches"], split["splits"]) == []
    assert coverage_leaks(manifest, split) == 0
    assert all(split["splits"][name] for name in SPLITS)
    assert split["guard_dropped"]  # overlapping windows across block borders had to go


def test_three_blocks_give_three_non_empty_splits() -> None:
    manifest = grid_manifest({"a": (512, 1536)}, 256, 256)  # 3 blocks of 512 px, 2x2 patches each
    split = make_split(manifest, SplitParams(block_px=512, candidates=5))
    assert sorted(len(split["splits"][n]) for n in SPLITS) == [4, 4, 4]
    with pytest.raises(AerialsegError, match=r"would be empty: only 2 block"):
        make_split(grid_manifest({"a": (512, 1024)}, 256, 256), SplitParams(block_px=512))


def test_scene_group_with_two_scenes_is_an_error() -> None:
    manifest = grid_manifest({"a": (512, 512), "b": (512, 512)}, 256, 256)
    with pytest.raises(AerialsegError, match="scene"):
        make_split(manifest, SplitParams(group="scene"))


def test_zero_fraction_split_may_be_empty() -> None:
    manifest = grid_manifest({"a": (1024, 1024)}, 256, 256)
    split = make_split(manifest, SplitParams(fractions=(0.9, 0.0, 0.1), block_px=256, candidates=5))
    assert split["splits"]["val"] == [] and split["splits"]["test"]


def test_bad_split_params_and_missing_manifest(tmp_path: Path) -> None:
    for bad in ({"fractions": [0.8, 0.1]}, {"fractions": [0.8, 0.3, 0.1]}, {"fractions": [0, 0.5, 0.5]},
                {"group": "tile"}, {"block_px": 0}, {"fractions": "most"}):
        with pytest.raises(AerialsegError, match="split"):
            split_params({"split": bad})
    with pytest.raises(AerialsegError, match=r"manifest\.json: tile manifest not found"):
        split_stage(stage_params(tmp_path))
