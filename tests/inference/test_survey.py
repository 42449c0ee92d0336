"""infer-survey on a 2-worker local Dask cluster (loopback): same maps as infer-scene, resume, corrupt maps and
scenes, a killed worker, the VRT mosaic, the merged polygons and areas."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from aerialseg.core.errors import AerialsegError
from aerialseg.inference.scene import infer_scene
from aerialseg.inference.survey import SurveyOptions, collect_scenes, run_survey, scene_id
from helpers.survey_cluster import SAMPLE, _maps, _opts, _survey, bundle, cluster, scenes  # noqa: F401  (fixtures)

def test_survey_maps_equal_infer_scene_byte_for_byte(bundle, cluster, scenes, tmp_path):
    summary = run_survey(scenes, bundle, _opts(vectors=True), _survey(cluster, tmp_path / "survey"))
    assert (summary["mapped"], summary["skipped"], summary["failed"]) == (3, 0, 0)
    manifest = json.loads((tmp_path / "survey" / "survey.json").read_text())["scenes"]
    assert all(rec["model_loads"] == 1 for rec in manifest.values()), "model loaded once per worker"
    for scene in scenes:
        ref = infer_scene(scene, bundle, tmp_path / "ref" / f"{scene.stem}.tif",
                          _opts(vectors=True, areas=True))
        sid = scene_id(scene)
        for role, suffix in (("map", "_landcover.tif"), ("areas", "_landcover_areas.json")):
            ours = tmp_path / "survey" / f"{sid}{suffix}"
            assert ours.read_bytes() == Path(ref.outputs[role]).read_bytes(), (scene.name, role)
    # the product: VRT with the CRS and every scene's pixels, merged polygons, summed areas
    with rasterio.open(tmp_path / "survey" / "survey.vrt") as vrt:
        assert vrt.colormap(1)[1][:3] == (230, 25, 75) and vrt.nodata == 255
        assert vrt.overviews(1)[0] == 2 and max(vrt.shape) / vrt.overviews(1)[-1] <= 512  # QGIS zoomed out
        for scene in scenes:
            with rasterio.open(tmp_path / "survey" / f"{scene_id(scene)}_landcover.tif") as m:
                assert vrt.crs == m.crs and vrt.res == m.res
                win = vrt.window(*m.bounds)
                assert np.array_equal(vrt.read(1, window=win), m.read(1))
    from pyogrio import read_info

    info = read_info(tmp_path / "survey" / "survey_polygons.gpkg")
    assert info["features"] > 0 and "scene" in list(info["fields"])
    areas = json.loads((tmp_path / "survey" / "survey_areas.json").read_text())
    per_scene = [a["classes"]["road"]["pixels"] for a in areas["scenes"].values()]
    assert areas["survey"]["classes"]["road"]["pixels"] == sum(per_scene)
    assert areas["survey"]["total_m2"] == pytest.approx(3 * 400 * 300 * 0.25, rel=1e-3)  # geodesic m², UTM
    with rasterio.open(tmp_path / "survey" / "survey.vrt") as vrt:
        mosaic = vrt.read(1)
    shutil.move(tmp_path / "survey", tmp_path / "moved")  # the VRT names its sources relative to itself
    with rasterio.open(tmp_path / "moved" / "survey.vrt") as vrt:
        assert np.array_equal(vrt.read(1), mosaic)


def test_rerun_maps_only_what_is_missing_or_corrupt(bundle, cluster, scenes, tmp_path):
    out = tmp_path / "survey"
    first = run_survey(scenes[:1], bundle, _opts(), _survey(cluster, out))  # "interrupted after one scene"
    assert first["mapped"] == 1
    before = _maps(out)
    again = run_survey(scenes, bundle, _opts(), _survey(cluster, out))
    assert (again["mapped"], again["skipped"]) == (2, 1)
    assert _maps(out)[next(iter(before))] == next(iter(before.values()))
    good = _maps(out)
    victim = out / f"{scene_id(scenes[1])}_landcover.tif"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    third = run_survey(scenes, bundle, _opts(), _survey(cluster, out))
    assert (third["mapped"], third["skipped"]) == (1, 2)
    record = json.loads((out / "survey.json").read_text())["scenes"][scene_id(scenes[1])]
    assert record["mapped_because"] == "map changed or corrupt"
    assert _maps(out) == good, "the corrupt map was redone, identical"
    st = scenes[0].stat()
    os.utime(scenes[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: re-hashed, skipped
    touched = run_survey(scenes, bundle, _opts(), _survey(cluster, out))
    assert (touched["mapped"], touched["skipped"]) == (0, 3) and touched["mpx_per_s"] is None
    fourth = run_survey(scenes, bundle, _opts(tta=True), _survey(cluster, out))
    assert fourth["mapped"] == 3, "other options: every map is redone"


def test_corrupt_scene_fails_alone(bundle, cluster, scenes, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(scenes[0].read_bytes()[:5000])  # truncated GeoTIFF
    summary = run_survey([*scenes[:2], bad], bundle, _opts(), _survey(cluster, tmp_path / "survey"))
    assert (summary["mapped"], summary["failed"]) == (2, 1)
    error = summary["errors"][scene_id(bad)]
    assert "broken.tif" in error and "fix:" in error and "\n" not in error
    assert len(_maps(tmp_path / "survey")) == 2


def test_same_names_in_two_folders_do_not_collide(tmp_path, scenes):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        shutil.copy(scenes[0], tmp_path / d / "x.tif")
    (tmp_path / "list.txt").write_text("# scenes\na/x.tif\nb/x.tif\n")
    found = collect_scenes([tmp_path / "list.txt", str(tmp_path / "a" / "*.tif"), tmp_path / "b"])
    assert len(found) == 2 and scene_id(found[0]) != scene_id(found[1])
    with pytest.raises(AerialsegError, match="no scenes found"):
        collect_scenes([tmp_path / "none" / "*.tif"])


def test_mixed_crs_mosaic_is_refused(tmp_path, scenes):
    from aerialseg.inference.mosaic import write_vrt

    other = tmp_path / "other.tif"
    with rasterio.open(scenes[0]) as src:
        profile = {**src.profile, "crs": "EPSG:32639"}
        with rasterio.open(other, "w", **profile) as dst:
            dst.write(src.read())
    with pytest.raises(AerialsegError, match="different CRSs.*fix:"):
        write_vrt([scenes[0], other], tmp_path / "m.vrt")


def test_a_survey_of_several_crss_gets_one_mosaic_per_crs(tmp_path, scenes):
    from aerialseg.inference.mosaic import write_mosaics

    other = tmp_path / "other.tif"
    with rasterio.open(scenes[0]) as src:
        with rasterio.open(other, "w", **{**src.profile, "crs": "EPSG:32639"}) as dst:
            dst.write(src.read())
    plain = tmp_path / "plain.tif"  # a map of a JPEG scene: no CRS, no place in a mosaic
    with rasterio.open(scenes[1]) as src:
        with rasterio.open(plain, "w", **{**src.profile, "crs": None}) as dst:
            dst.write(src.read())
    with rasterio.open(scenes[0]) as src:
        tag = f"EPSG_{src.crs.to_epsg()}"
    vrts = write_mosaics([scenes[0], scenes[1], other, plain], tmp_path)
    assert sorted(p.name for p in vrts) == sorted([f"survey_{tag}.vrt", "survey_EPSG_32639.vrt"])
    with rasterio.open(tmp_path / "survey_EPSG_32639.vrt") as vrt:
        assert vrt.crs.to_epsg() == 32639


def test_cli_exit_code_and_one_line_errors(bundle, cluster, scenes, tmp_path):
    from typer.testing import CliRunner

    from aerialseg import cli

    bad = tmp_path / "not_a_scene.tif"
    bad.write_text("not a GeoTIFF")
    (tmp_path / "scenes.txt").write_text(f"{scenes[0]}\n{bad}\n")
    args = ["infer-survey", str(tmp_path / "scenes.txt"), "--model", str(bundle), "--out", str(tmp_path / "s"),
            "--scheduler", cluster.scheduler_address, "--backend", "onnx", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1, result.output
    assert "1 mapped, 0 skipped, 1 failed" in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "not_a_scene.tif" in errors[0] and "fix:" in errors[0]
    summary = json.loads((tmp_path / "s" / "survey_summary.json").read_text())
    assert summary["failed"] == 1 and summary["mpx_per_s"] > 0 and summary["products"]["mosaic"]


def test_killed_worker_mid_scene_still_completes(bundle, cluster, tmp_path):
    """SIGKILL the worker process while it maps a scene: the scheduler reruns the task on another worker and
    the maps equal those of an undisturbed run; no temp file of the killed process is left behind."""
    from distributed import Client

    scenes = [SAMPLE / "dubai_tile1.tif", SAMPLE / "dubai_tile2.tif"]
    reference = run_survey(scenes, bundle, _opts(), _survey(cluster, tmp_path / "ref"))
    assert reference["mapped"] == 2
    out, result = tmp_path / "killed", {}
    runner = threading.Thread(target=lambda: result.update(run_survey(scenes, bundle, _opts(),
                                                                      _survey(cluster, out))))
    killed = None
    with Client(cluster.scheduler_address) as client:
        runner.start()
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            busy = client.run(lambda dask_worker: [str(k) for k in dask_worker.state.executing_count and
                                                   [ts.key for ts in dask_worker.state.executing] or []])
            addr = next((a for a, keys in busy.items() if any(k.startswith("map-") for k in keys)), None)
            if addr:
                time.sleep(0.1)
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)
                killed = addr
            time.sleep(0.05)
        runner.join(120)
    assert killed, "no scene task was seen running"
    assert (result["mapped"], result["failed"]) == (2, 0)
    assert _maps(out) == _maps(tmp_path / "ref")
    records = json.loads((out / "survey.json").read_text())["scenes"].values()
    assert killed not in {rec["worker"] for rec in records}, "the killed worker's scene was mapped elsewhere"
    assert not [p for p in out.iterdir() if p.name.startswith(".aerialseg-tmp-")]


def test_survey_defaults_equal_params_yaml():
    import dataclasses

    from aerialseg.core.config import load_params

    shipped = load_params(Path(__file__).resolve().parents[2] / "params.yaml")["survey"]
    assert shipped == dataclasses.asdict(SurveyOptions())


def test_areas_sum_in_ground_units_only_when_every_scene_has_them():
    from aerialseg.inference.mosaic import sum_areas

    metric = {"units": "m2", "classes": {"road": {"pixels": 4, "m2": 1.0, "ha": 1e-4}, "tree": {"pixels": 4, "m2": 1.0}}}
    pixels = {"units": "pixels", "classes": {"road": {"pixels": 2}}}
    both = sum_areas({"a": metric, "b": metric})
    assert both["total_m2"] == 4.0 and both["classes"]["road"] == {"pixels": 8, "m2": 2.0, "ha": 2e-4, "share": 0.5}
    mixed = sum_areas({"a": metric, "b": pixels})
    assert mixed["units"] == "pixels" and mixed["classes"]["road"] == {"pixels": 6, "share": 0.6}


def test_stage_maps_params_scenes_when_none_are_given(bundle, cluster, scenes, tmp_path):
    from aerialseg.stages import survey

    params = {"infer": {"backend": "onnx", "device": "cpu", "preview": False},
              "survey": {"scenes_dir": str(scenes[0].parent), "scenes": ["dubai_tile2*.tif"], "out": str(tmp_path),
                         "scheduler": cluster.scheduler_address, "progress": False}}
    done = survey.run(params, None, bundle)
    assert done["mapped"] == 1 and (tmp_path / f"{scene_id(scenes[1])}_landcover.tif").is_file()
    with pytest.raises(AerialsegError, match="unknown survey key"):
        survey.run({**params, "survey": {**params["survey"], "worker": 3}}, None, bundle)
