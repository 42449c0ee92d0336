"""rank-scenes: uncertainty ranking of windows; a model ranks windows it never saw above the ones it was
trained on; deterministic; CSV / GeoPackage / crops with pre-labels that label-to-mask reads."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from aerialseg.annotations.anylabeling import load_label_json, parse_shapes, resolve_scene
from aerialseg.annotations.labels import labels_to_masks
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes
from aerialseg.core.config import load_params
from aerialseg.core.errors import AerialsegError
from aerialseg.stages.bundle import build_bundle
from aerialseg.stages.masks import label_table
from aerialseg.inference.ranking import (RankOptions, SceneWindows, class_weights, pixel_uncertainty, rank_scenes,
                                         rank_windows)
from aerialseg.models import create_model, get_spec, save_model

from conftest import REPO

SAMPLE = REPO / "data" / "sample"
SIDE = 64  # px of each seen / unseen crop
WINDOW = 32


def sample_mask(n: int) -> np.ndarray:
    """Class mask of sample scene n from its AnyLabeling labels (label-to-mask's own code)."""
    path = SAMPLE / "labels" / f"dubai_tile{n}.json"
    doc = load_label_json(path)
    scene = resolve_scene(doc, path, None)
    table = label_table(load_params(REPO / "params.yaml"))
    shapes, _ = parse_shapes(doc, path, table)
    return rasterize_shapes(shapes, scene.width, scene.height)


def write_crop(src: rasterio.DatasetReader, window: Window, dest: Path) -> Path:
    profile = {"driver": "GTiff", "width": window.width, "height": window.height, "count": 3, "dtype": "uint8",
               "crs": src.crs, "transform": src.window_transform(window), "photometric": "RGB"}
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(src.read(window=window))
    return dest


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """LW-IRSTNet trained (150 full-batch steps, seeded) on one 64 px crop of each of the 6 sample scenes;
    the 'unseen' scenes are other 64 px crops of the same 6 scenes. Returns (bundle, seen, unseen)."""
    root = tmp_path_factory.mktemp("rank")
    seen, unseen, images, labels = [], [], [], []
    for n in range(1, 7):
        mask = sample_mask(n)
        with rasterio.open(SAMPLE / "scenes" / f"dubai_tile{n}.tif") as ds:
            trained = Window(ds.width // 4, ds.height // 4, SIDE, SIDE)
            other = Window(ds.width // 2 + ds.width // 8, ds.height // 2 + ds.height // 8, SIDE, SIDE)
            seen.append(write_crop(ds, trained, root / f"seen_{n}.tif"))
            unseen.append(write_crop(ds, other, root / f"unseen_{n}.tif"))
            images.append(ds.read(window=trained))
        labels.append(mask[trained.row_off:trained.row_off + SIDE, trained.col_off:trained.col_off + SIDE])
    spec = get_spec("lwirstnet")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(images)).float() / 255 - mean) / std
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    torch.manual_seed(0)
    model = create_model("lwirstnet")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3  # it did learn its six crops
    save_model(model.eval(), root / "trained", "lwirstnet", extra={"gsd_m": 0.5})
    return build_bundle(root / "trained", root / "bundle", tile_size=128, overlap=16, onnx=False), seen, unseen


def options(out: Path, **kw) -> RankOptions:
    return RankOptions(**{"out": str(out), "window": WINDOW, "top_k": 1000, "crops": False, "progress": False,
                          "device": "cpu", **kw})


def test_unseen_windows_rank_higher_than_trained_ones(memorised, tmp_path):
    bundle, seen, unseen = memorised
    result = rank_scenes(seen + unseen, bundle, options(tmp_path))
    ranked = result.ranked
    assert len(ranked) == 12 * (SIDE // WINDOW) ** 2  # every window of every crop
    position = {"seen": [], "unseen": []}
    score = {"seen": [], "unseen": []}
    for i, window in enumerate(ranked):
        kind = "seen" if window.scene in seen else "unseen"
        position[kind].append(i)
        score[kind].append(window.score)
    assert np.mean(score["unseen"]) > np.mean(score["seen"])
    assert np.mean(position["unseen"]) < np.mean(position["seen"])  # higher up the list
    assert [w.score for w in ranked] == sorted((w.score for w in ranked), reverse=True)


def test_ranking_is_deterministic_and_writes_csv_gpkg_crops(memorised, tmp_path):
    bundle, seen, unseen = memorised
    scenes = [unseen[3], seen[3], unseen[1]]
    first = rank_scenes(scenes, bundle, options(tmp_path / "a", top_k=5, crops=True, min_area_px=0))
    second = rank_scenes(scenes, bundle, options(tmp_path / "b", top_k=5, crops=True, min_area_px=0))
    key = [(w.scene, w.row, w.col, w.score) for w in first.ranked]
    assert key == [(w.scene, w.row, w.col, w.score) for w in second.ranked] and len(key) == 5
    rows = list(csv.DictReader(open(first.outputs["csv"])))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["score"]) for r in rows] == pytest.approx([w.score for w in first.ranked], abs=1e-6)
    strip = ("crop", "label")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in csv.DictReader(open(second.outputs["csv"]))]

    from pyogrio import read_info
    from pyogrio.raw import read

    info = read_info(first.outputs["gpkg"], layer="windows")
    assert info["features"] == 5 and "32640" in info["crs"]
    _, _, geometry, fields = read(first.outputs["gpkg"], layer="windows")
    names = list(info["fields"])
    assert list(fields[names.index("rank")]) == [1, 2, 3, 4, 5]

    top = first.ranked[0]
    crop, label = Path(top.files["crop"]), Path(top.files["label"])
    assert re.fullmatch(rf"{top.scene.stem}_[0-9a-f]{{8}}_r{top.row}_c{top.col}\.tif", crop.name)
    assert label.suffix == ".json"
    with rasterio.open(crop) as ds, rasterio.open(top.scene) as src:
        assert (ds.width, ds.height) == (WINDOW, WINDOW) and ds.crs == src.crs
        assert ds.transform == src.window_transform(Window(top.col, top.row, WINDOW, WINDOW))
        assert (ds.read() == src.read(window=Window(top.col, top.row, WINDOW, WINDOW))).all()
    doc = json.loads(label.read_text())
    assert doc["imagePath"] == crop.name and (doc["imageWidth"], doc["imageHeight"]) == (WINDOW, WINDOW)
    params = load_params(REPO / "params.yaml")
    [mask] = labels_to_masks([label], tmp_path / "masks", label_table(params), MaskOptions())
    with rasterio.open(mask) as ds:
        assert ds.crs == rasterio.open(crop).crs and ds.read(1).shape == (WINDOW, WINDOW)

    label.write_text(json.dumps({**doc, "flags": {"reviewed": True}}))  # an annotator's work
    rank_scenes(scenes, bundle, options(tmp_path / "a", top_k=5, crops=True))
    assert json.loads(label.read_text())["flags"] == {"reviewed": True}  # never overwritten


def test_uncertainty_and_rarity_weights():
    assert RankOptions.from_params(load_params(REPO / "params.yaml")["rank"]) == RankOptions()  # one default
    k = 5
    uniform = np.full((k, 2, 2), 1 / k)
    certain = np.zeros((k, 2, 2))
    certain[3] = 1
    entropy, margin, classes = pixel_uncertainty(uniform)
    assert entropy == pytest.approx(np.ones((2, 2))) and margin == pytest.approx(np.ones((2, 2)))
    entropy, margin, classes = pixel_uncertainty(certain)
    assert entropy == pytest.approx(np.zeros((2, 2)), abs=1e-9) and (classes == 3).all()
    # two windows, the same entropy; one on a common class, one on a rare class
    count = np.zeros((1, 2, k), np.int64)
    count[0, 0, 0], count[0, 1, 4] = 100, 100
    other = np.zeros((1, 1, k), np.int64)
    other[0, 0, 0] = 10_000  # the rest of the survey is class 0
    entropy_sum = count * 0.5
    scene = SceneWindows(Path("a.tif"), [0], [0, 10], 10, 10, 1.0, entropy_sum.astype(float), count, np.zeros((1, 2)))
    filler = SceneWindows(Path("b.tif"), [0], [0], 100, 100, 1.0, np.zeros((1, 1, k)), other, np.zeros((1, 1)))
    weights = class_weights([scene, filler], 0.5)
    assert weights[4] > weights[0]
    ranked = rank_windows([scene, filler], weights, RankOptions(window=10, min_valid=0.5))
    assert (ranked[0].col, ranked[0].dominant_class) == (10, 4)  # the rare class's window first
    flat = rank_windows([scene, filler], class_weights([scene, filler], 0.0), RankOptions(window=10))
    assert flat[0].score == pytest.approx(flat[1].score)  # rarity_power 0: plain mean entropy


def test_bad_input_is_one_line_exit_2(memorised, tmp_path):
    bundle, seen, _ = memorised
    with pytest.raises(AerialsegError, match="twice"):
        rank_scenes([seen[0], seen[0]], bundle, options(tmp_path))
    with pytest.raises(AerialsegError, match="top_k"):
        rank_scenes([seen[0]], bundle, options(tmp_path, top_k=0))
    empty = tmp_path / "nodata.tif"
    with rasterio.open(empty, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", nodata=0) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(AerialsegError, match="no window"):
        rank_scenes([empty], bundle, options(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()
    first = rank_scenes([seen[0]], bundle, options(tmp_path / "again", top_k=1, crops=True)).ranked[0]
    crop = Path(first.files["crop"])  # ranking a crop of an earlier run together with its scene, same --out
    with pytest.raises(AerialsegError, match="destroy the input"):
        rank_scenes([seen[0], crop], bundle, options(tmp_path / "again", crops=True))
    two_band = tmp_path / "two_band.tif"
    with rasterio.open(two_band, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint8") as dst:
        dst.write(np.ones((2, 64, 64), np.uint8))
    run = subprocess.run([sys.executable, "-m", "aerialseg.cli", "rank-scenes", str(seen[0]), str(two_band), "--model",
                          str(bundle), "--out", str(tmp_path / "out"), "--params", str(REPO / "params.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().startswith("error: ") and "two_band.tif" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_rank_scenes(memorised, tmp_path):
    bundle, seen, unseen = memorised
    run = subprocess.run([sys.executable, "-m", "aerialseg.cli", "rank-scenes", str(seen[0]), str(unseen[0]),
                          "--model", str(bundle), "--out", str(tmp_path / "out"), "--top-k", "3", "--window", "32",
                          "--device", "cpu", "--params", str(REPO / "params.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "rank-scenes: 8 window(s)" in run.stdout
    assert len(list(csv.DictReader(open(tmp_path / "out" / "rank.csv")))) == 3
    assert len(list((tmp_path / "out" / "crops").glob("*.json"))) == 3
