"""A scene split into blocks (survey.block_rows): bands of rows mapped as tasks of their own and stitched back give
infer-scene's map byte for byte (in-process, on a resampled grid, and on a 2-worker local Dask cluster)."""

import json
from pathlib import Path

import pytest
import rasterio
from affine import Affine

from aerialseg.inference.blocks import assemble, cut_rows, map_block, plan_blocks
from aerialseg.inference.scene import infer_scene, open_model
from aerialseg.inference.survey import run_survey, scene_id
from aerialseg.inference.predictor import Predictor
from helpers.survey_cluster import _maps, _opts, _survey, bundle, cluster, scenes  # noqa: F401  (fixtures)

ROLES = (("map", "_landcover.tif"), ("confidence", "_landcover_confidence.tif"), ("areas", "_landcover_areas.json"),
         ("vectors", "_landcover_polygons.gpkg"))


def _same(role: str, ours: Path, ref: Path) -> bool:
    """Byte for byte; a GeoPackage by its features (its header holds the time it was written)."""
    if role != "vectors":
        return ours.read_bytes() == ref.read_bytes()
    from pyogrio.raw import read

    a, b = read(ours), read(ref)
    return a[0]["fields"].tolist() == b[0]["fields"].tolist() and list(a[2]) == list(b[2]) and \
        all(x.tolist() == y.tolist() for x, y in zip(a[3], b[3]))


def test_cuts_fall_on_tile_rows_and_cover_the_scene():
    # tile 128, overlap 16: tile rows start every 112 px; a 300-row scene's tile rows start at 0, 112, 172
    assert cut_rows(300, 400, 1.0, 128, 16, 120) == [(0, 112), (112, 172), (172, 300)]
    assert cut_rows(300, 400, 1.0, 128, 16, 230) == [(0, 172), (172, 300)]
    assert cut_rows(300, 400, 1.0, 128, 16, 300) == [(0, 300)] == cut_rows(300, 400, 1.0, 128, 16, 0)
    assert cut_rows(300, 400, 1.0, 128, 16, 10) == [(0, 112), (112, 172), (172, 300)]  # at most one per tile row
    # a grid at half the scene's resolution: cuts on model rows 0, 112 -> scene rows 0, 224
    # a grid at half the scene's resolution: the cut on model row 172 is scene row 344
    assert cut_rows(600, 400, 0.5, 128, 16, 400) == [(0, 344), (344, 600)]
    big = cut_rows(50_000, 50_000, 1.0, 512, 64, 16384)  # stride 448: 4 bands of about 12 500 rows
    assert [a for a, _ in big] == [0, 28 * 448, 56 * 448, 84 * 448] and big[-1][1] == 50_000


def _in_process(scene: Path, bundle: Path, out: Path, block_rows: int, options) -> tuple[int, dict[str, Path]]:
    """Map a scene block by block and assemble it, in this process (what the survey's tasks do)."""
    folder = out / "blocks"
    folder.mkdir(parents=True)
    with open_model(bundle) as loaded:
        predict = Predictor.from_bundle(loaded, options.backend, options.device, options.tta, options.labelled_only)
        rows = plan_blocks(scene, loaded, options, block_rows)
        parts = [map_block(scene, bundle, loaded, predict, out / "map.tif", r, folder, options) for r in rows]
        done = assemble(scene, bundle, loaded, out / "map.tif", parts[::-1], folder, options)  # any order
    return len(rows), done["outputs"]


@pytest.mark.parametrize("pixel_m,blocks", [(0.5, 3), (0.3, 2)])  # 0.5: the bundle's GSD; 0.3: resampled grid
def test_blocks_stitch_into_infer_scenes_outputs_byte_for_byte(bundle, scenes, tmp_path, pixel_m, blocks):
    scene = tmp_path / "scene.tif"
    with rasterio.open(scenes[0]) as src:
        t = src.transform
        profile = {**src.profile, "transform": Affine(pixel_m, 0, t.c, 0, -pixel_m, t.f)}
        with rasterio.open(scene, "w", **profile) as dst:
            dst.write(src.read())
    options = _opts(confidence=True, vectors=True, areas=True, batch=3)
    ref = infer_scene(scene, bundle, tmp_path / "ref" / "map.tif", options)
    count, ours = _in_process(scene, bundle, tmp_path / "blocks", 100, options)
    assert count == blocks, "300 rows in bands of about 100 rows, cut on tile rows (0.3 m: 180 model rows)"
    for role, _ in ROLES:
        assert _same(role, Path(ours[role]), Path(ref.outputs[role])), role


def test_survey_maps_a_blocked_scene_as_infer_scene_does(bundle, cluster, scenes, tmp_path):
    """2-worker local cluster: one scene in 3 blocks, one whole; maps equal infer-scene's byte for byte, the
    manifest records the blocks, their folder is gone."""
    options = _opts(confidence=True, vectors=True, batch=3)
    summary = run_survey(scenes[:2], bundle, options, _survey(cluster, tmp_path / "s", block_rows=100))
    assert (summary["mapped"], summary["failed"]) == (2, 0), summary["errors"]
    records = json.loads((tmp_path / "s" / "survey.json").read_text())["scenes"]
    for scene in scenes[:2]:
        rec = records[scene_id(scene)]
        assert [b["rows"] for b in rec["blocks"]] == [[0, 112], [112, 172], [172, 300]]
        ref = infer_scene(scene, bundle, tmp_path / "ref" / f"{scene.stem}.tif", _opts(confidence=True, vectors=True,
                                                                                      areas=True, batch=3))
        for role, suffix in ROLES:
            ours = tmp_path / "s" / f"{scene_id(scene)}{suffix}"
            assert _same(role, ours, Path(ref.outputs[role])), (scene.name, role)
        assert rec["tiles"] == ref.tiles + 2 * 4, "one tile row (4 tiles) computed twice per cut"
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".aerialseg-tmp-")]
    again = run_survey(scenes[:2], bundle, options, _survey(cluster, tmp_path / "s", block_rows=100))
    assert (again["mapped"], again["skipped"]) == (0, 2), "a blocked scene verifies like any other"
    whole = run_survey(scenes[:1], bundle, options, _survey(cluster, tmp_path / "whole", block_rows=0))
    assert whole["mapped"] == 1 and _maps(tmp_path / "whole") == {k: v for k, v in _maps(tmp_path / "s").items()
                                                                  if k.startswith(scenes[0].stem)}


def test_a_band_that_fails_fails_its_scene_alone(bundle, cluster, scenes, tmp_path):
    """A scene that is nodata everywhere, split into bands: each band refuses it; the scene fails with the one-line
    error, the good scene is mapped, no band folder or temp file is left."""
    empty = tmp_path / "empty.tif"
    with rasterio.open(scenes[0]) as src:
        with rasterio.open(empty, "w", **{**src.profile, "nodata": 0}) as dst:
            dst.write(src.read() * 0)
    out = tmp_path / "s"
    summary = run_survey([empty, scenes[1]], bundle, _opts(), _survey(cluster, out, block_rows=100))
    assert (summary["mapped"], summary["failed"]) == (1, 1)
    (error,) = summary["errors"].values()
    assert "empty.tif" in error and "no valid pixel" in error and "fix:" in error and "\n" not in error
    assert not list(out.glob("empty-*")) and not [p for p in out.iterdir() if p.name.startswith(".aerialseg-tmp-")]


def test_a_killed_workers_band_is_rerun_and_the_map_is_the_same(bundle, cluster, tmp_path):
    """SIGKILL the worker while it maps a band: Dask reruns that band elsewhere; the map equals infer-scene's."""
    import os
    import signal
    import threading
    import time

    from distributed import Client

    from helpers.survey_cluster import SAMPLE

    scene = SAMPLE / "dubai_tile1.tif"
    options, out, result = _opts(), tmp_path / "killed", {}
    runner = threading.Thread(target=lambda: result.update(run_survey([scene], bundle, options,
                                                                      _survey(cluster, out, block_rows=200))))
    killed = None
    with Client(cluster.scheduler_address) as client:
        runner.start()
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            busy = client.run(lambda dask_worker: [str(ts.key) for ts in dask_worker.state.executing])
            addr = next((a for a, keys in busy.items() if any(k.startswith("block-") for k in keys)), None)
            if addr:
                os.kill(client.run(os.getpid, workers=[addr])[addr], signal.SIGKILL)
                killed = addr
            time.sleep(0.05)
        runner.join(180)
    assert killed, "no band task was seen running"
    assert (result["mapped"], result["failed"]) == (1, 0)
    rec = json.loads((out / "survey.json").read_text())["scenes"][scene_id(scene)]
    assert len(rec["blocks"]) > 1 and killed not in {b["worker"] for b in rec["blocks"]}
    ref = infer_scene(scene, bundle, tmp_path / "ref.tif", options)
    assert (out / f"{scene_id(scene)}_landcover.tif").read_bytes() == Path(ref.outputs["map"]).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".aerialseg-tmp-")]
