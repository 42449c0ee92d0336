"""The environment's errors are user errors; outputs others can read; temp files that do not pile up."""

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from aerialseg.core import safety
from aerialseg.core.safety import HOST, RUN, remove_stale
from helpers.safety import (PARAMS, REPO, TEMP_TAG, assert_one_line_error, kill_when, make_bundle, run_cli, script_command,
                            script_env, snapshot, temp_leftovers, write_labels, write_scene)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("safety_bundle"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- 5. disks, permissions, paths ----------------------------------------------------------------------

def test_out_under_a_regular_file(bundle, tmp_path, capsys):
    scene = write_scene(tmp_path / "s.tif")
    labels = write_labels(tmp_path / "s.json", "s.tif")
    cv2.imwrite(str(tmp_path / "s_mask.png"), np.ones((96, 128), np.uint8))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    before = snapshot(tmp_path)
    for argv in (["label-to-mask", labels, "--out", blocker / "masks"],
                 ["infer-scene", scene, "--model", bundle, "--out", blocker / "map.tif"],
                 ["mask-to-label", tmp_path / "s_mask.png", "--image", scene, "--out", blocker / "labels"],
                 ["mask-to-label", tmp_path / "s_mask.png", "--image", scene, "--out", blocker]):
        code, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "notes.txt")
    assert snapshot(tmp_path) == before and not temp_leftovers(tmp_path)


def test_folder_where_a_file_is_expected(bundle, tmp_path, capsys):
    folder = tmp_path / "scene.tif"
    folder.mkdir()
    code, err = run_cli(["infer-scene", folder, "--model", bundle, "--out", tmp_path / "m.tif"], capsys)
    assert_one_line_error(code, err, "scene.tif", "is a folder")
    code, err = run_cli(["label-to-mask", tmp_path / "labels", "--params", tmp_path], capsys)
    assert_one_line_error(code, err, str(tmp_path), "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_files(tmp_path, capsys):
    write_scene(tmp_path / "s.tif")
    labels = write_labels(tmp_path / "s.json", "s.tif")
    labels.chmod(0)
    try:
        code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "m"], capsys)
        assert_one_line_error(code, err, "s.json", "ermission")
    finally:
        labels.chmod(0o644)
    (tmp_path / "s.tif").chmod(0)
    try:
        code, err = run_cli(["label-to-mask", labels, "--out", tmp_path / "m"], capsys)
        assert_one_line_error(code, err, "s.tif")
    finally:
        (tmp_path / "s.tif").chmod(0o644)


def test_deeply_nested_json(tmp_path, capsys):
    deep = tmp_path / "labels" / "deep.json"
    deep.parent.mkdir()
    deep.write_text("[" * 200_000)
    for source in (deep, deep.parent):
        code, err = run_cli(["label-to-mask", source, "--out", tmp_path / "m"], capsys)
        assert_one_line_error(code, err, "deep.json", "nested too deeply")


def _namespace_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


DISK_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
from pathlib import Path
root, tests = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, tests)
from helpers import safety
safety.register_toy()
from aerialseg.cli import main
plan = json.loads(sys.argv[3])

def run(argv):
    sys.stdout.flush(); sys.stderr.flush()
    with tempfile.TemporaryFile(dir=root) as cap:
        saved = os.dup(2)
        os.dup2(cap.fileno(), 2)
        sys.argv = ["aerialseg", *argv]
        try:
            main()
            rc = 0
        except SystemExit as exc:
            rc = exc.code or 0
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        return {"rc": rc, "err": cap.read().decode()}

def files(disk):
    return {str(p): p.read_bytes().hex() for p in sorted(disk.rglob("*")) if p.is_file() and p.name != "fill"}

report = {}
for mode, disk in (("full", root / "full"), ("readonly", root / "ro")):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    first = run(plan["first"] + ["--out", str(disk / "masks")])
    before = files(disk)
    if mode == "full":
        fh = open(disk / "fill", "wb", buffering=0)
        try:
            while True:
                fh.write(b"\\0" * 4096)
        except OSError:
            pass
        fh.close()
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    results = {name: run([a.replace("DISK", str(disk)) for a in argv]) for name, argv in plan["runs"].items()}
    report[mode] = {"first": first, "same": files(disk) == before, "results": results,
                    "leftovers": [str(p) for p in disk.rglob(".aerialseg-tmp-*")]}
print(json.dumps(report))
"""


def test_full_and_read_only_disks(bundle, tmp_path):
    """tmpfs mounts in a private mount namespace (skipped where unprivileged namespaces are not allowed)."""
    if not shutil.which("unshare") or not _namespace_ok():
        pytest.skip("cannot mount a tmpfs here (no unprivileged user/mount namespaces)")
    scenes = tmp_path / "scenes"
    write_scene(scenes / "s.tif", 200, 200)
    labels = write_labels(scenes / "s.json", "s.tif", 200, 200)
    (tmp_path / "full").mkdir()
    (tmp_path / "ro").mkdir()
    params = ["--params", str(PARAMS)]
    other = write_scene(tmp_path / "other" / "s.tif", 200, 200, seed=3)  # masks from it would differ
    other_labels = write_labels(tmp_path / "other" / "s.json", "s.tif", 200, 200)
    plan = {"first": ["label-to-mask", str(labels)] + params, "runs": {
        "label-to-mask": ["label-to-mask", str(other_labels), "--out", "DISK/masks"] + params,
        "mask-to-label": ["mask-to-label", "DISK/masks/s.tif", "--image", str(other), "--out", "DISK/labels"] + params,
        "infer-scene": ["infer-scene", str(scenes / "s.tif"), "--model", str(bundle), "--out", "DISK/maps/s.tif"]
        + params}}
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_SCRIPT, str(tmp_path),
                           str(Path(__file__).parents[1]), json.dumps(plan)],
                          capture_output=True, text=True, env=script_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for mode, what, disk in (("full", "no space left", tmp_path / "full"), ("readonly", "read-only", tmp_path / "ro")):
        result = report[mode]
        assert result["first"]["rc"] == 0, result["first"]["err"]
        for name, run in result["results"].items():
            line = assert_one_line_error(run["rc"], run["err"], what)
            assert str(disk) in line, (name, line)
        assert result["same"], f"{mode}: the previous masks changed"
        assert result["leftovers"] == [], mode


# --- 6. modes, stale temp files, kill -9, bounded memory -------------------------------------------------

def test_outputs_get_umask_modes(bundle, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        scene = write_scene(tmp_path / "s.tif")
        labels = write_labels(tmp_path / "s.json", "s.tif")
        assert run_cli(["label-to-mask", labels, "--out", tmp_path / "m"], capsys)[0] == 0
        assert run_cli(["mask-to-label", tmp_path / "m" / "s.tif", "--image", scene, "--out", tmp_path / "l"],
                       capsys)[0] == 0
        assert run_cli(["infer-scene", scene, "--model", bundle, "--out", tmp_path / "map.tif", "--areas"],
                       capsys)[0] == 0
        fresh = make_bundle(tmp_path / "b")
        outputs = [tmp_path / "m" / "s.tif", tmp_path / "m" / "index.json", tmp_path / "l" / "s.json",
                   tmp_path / "map.tif", tmp_path / "map_areas.json", tmp_path / "map_preview.png",
                   fresh / "model.safetensors", fresh / "bundle.json"]
        assert {str(p): oct(p.stat().st_mode & 0o777) for p in outputs} == {str(p): "0o640" for p in outputs}
    finally:
        os.umask(old)


def test_stale_temp_entries_are_recognised(tmp_path, monkeypatch):
    dead = _dead_pid()
    old_time = time.time() - safety.STALE_AGE_S - 60
    names = {
        f".aerialseg-tmp-a.tif.{HOST}-{dead}-abcdef.x1y2z3w4.tif": True,  # this host, process gone
        f".aerialseg-tmp-b.tif.{HOST}-{os.getpid()}-{'0' * 6 if RUN != '0' * 6 else '1' * 6}.q.tif": True,
        f".aerialseg-tmp-c.tif.{HOST}-{os.getpid()}-{RUN}.q.tif": False,  # this very run
        f".aerialseg-tmp-d.tif.{HOST}-{os.getppid()}-abcdef.q.tif": False,  # a live process
        ".aerialseg-tmp-e.tif.ffffff-1-abcdef.q.tif": False,  # another host: only by age
        ".aerialseg-tmp-f.tif.k2j3h4g5.tif": False,  # legacy name, fresh
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    stale_dir = tmp_path / f".aerialseg-tmp-masks.{HOST}-{dead}-abcdef.d1r2"
    stale_dir.mkdir()
    (stale_dir / "x.tif").write_bytes(b"x")
    for name in (".aerialseg-tmp-g.tif.ffffff-1-abcdef.q.tif", ".aerialseg-tmp-h.tif.k2j3h4g5.tif"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old_time, old_time))
        names[name] = True
    (tmp_path / "user-file.tif").write_bytes(b"keep")
    removed = {p.name for p in remove_stale(tmp_path)}
    assert removed == {n for n, stale in names.items() if stale} | {stale_dir.name}
    assert (tmp_path / "user-file.tif").is_file()


def test_temp_names_map_back_to_their_output():
    tmp = Path("out") / f"{safety.temp_prefix('map.tif')}abcd1234.tif"
    assert safety._temp_owner(tmp) == Path("out/map.tif")
    assert safety._temp_owner(Path("data") / f"{safety.temp_prefix('masks')}x9" / "index.json") == \
        Path("data/masks/index.json")


def _survey(root: Path, count: int, size: int = 256) -> Path:
    for i in range(count):
        write_scene(root / "scenes" / f"s{i:02d}.tif", size, size, seed=i)
        write_labels(root / "labels" / f"s{i:02d}.json", f"../scenes/s{i:02d}.tif", size, size)
    return root


def test_kill_9_label_to_mask_then_clean_rerun(tmp_path, capsys):
    root = _survey(tmp_path, 40)
    masks = root / "masks"
    assert run_cli(["label-to-mask", root / "labels", "--out", masks], capsys)[0] == 0
    good = snapshot(masks)
    for label_file in (root / "labels").iterdir():  # the rerun's masks would differ
        label_file.write_text(label_file.read_text().replace('"road"', '"water"'))

    def staged() -> bool:
        return any(p.is_dir() and any(p.iterdir()) for p in root.glob(".aerialseg-tmp-masks.*"))

    killed = kill_when([sys.executable, "-m", "aerialseg.cli", "label-to-mask", str(root / "labels"), "--out",
                        str(masks), "--params", str(PARAMS)], staged, REPO)
    assert killed, "the run ended before it could be killed"
    assert snapshot(masks) == good, "a killed run changed the previous masks"
    assert temp_leftovers(root), "the killed run left its staging folder (removed by the next run)"
    assert run_cli(["label-to-mask", root / "labels", "--out", masks], capsys)[0] == 0
    assert not temp_leftovers(root)
    index = json.loads((masks / "index.json").read_text())
    assert sorted(os.listdir(masks)) == sorted([Path(e["mask"]).name for e in index] + ["index.json"])
    assert snapshot(masks) != good


def test_kill_9_infer_scene_then_clean_rerun(bundle, tmp_path, capsys):
    scene = write_scene(tmp_path / "big.tif", 1024, 1024)
    out = tmp_path / "maps" / "big.tif"
    argv = ["infer-scene", scene, "--model", bundle, "--out", out, "--confidence"]
    assert run_cli(argv, capsys)[0] == 0
    good = snapshot(out.parent)

    def working() -> bool:
        return any(out.parent.glob(".aerialseg-tmp-infer-work.*"))

    killed = kill_when(script_command(*argv, "--params", PARAMS), working, REPO)
    assert killed, "the run ended before it could be killed"
    assert {k: v for k, v in snapshot(out.parent).items() if TEMP_TAG not in k} == good
    assert temp_leftovers(out.parent)
    assert run_cli(argv, capsys)[0] == 0
    assert not temp_leftovers(out.parent)
    assert snapshot(out.parent) == good  # deterministic map, nothing else beside it


def test_zip_bundle_extracts_into_a_run_folder_that_does_not_pile_up(bundle, tmp_path, monkeypatch, capsys):
    system_tmp = tmp_path / "systmp"
    system_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_tmp))
    stale = system_tmp / f".aerialseg-tmp-bundle.{HOST}-{_dead_pid()}-abcdef.zz11"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in bundle.iterdir():
            zf.write(f, f.name)
    scene = write_scene(tmp_path / "s.tif")
    assert run_cli(["infer-scene", scene, "--model", archive, "--out", tmp_path / "m.tif"], capsys)[0] == 0
    assert list(system_tmp.iterdir()) == []


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64


def test_image_data_pixels_are_capped_before_decoding(tmp_path, capsys):
    """A 520 KB JSON whose imageData was a 20000x20000 PNG once took 3.7 GB."""
    bomb = write_labels(tmp_path / "bomb.json", "", 20000, 20000,
                        imageData=base64.b64encode(_png_header(20000, 20000)).decode())
    code, err = run_cli(["label-to-mask", bomb, "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, "bomb.json", "20000x20000", "cap", "max_image_pixels")
    ok, png = cv2.imencode(".png", np.zeros((96, 128, 3), np.uint8))
    small = write_labels(tmp_path / "small.json", "", imageData=base64.b64encode(png.tobytes()).decode())
    assert run_cli(["label-to-mask", small, "--out", tmp_path / "m"], capsys)[0] == 0
    from aerialseg.annotations.anylabeling import load_label_json, resolve_scene
    from aerialseg.core.errors import AerialsegError

    with pytest.raises(AerialsegError, match="cap"):
        resolve_scene(load_label_json(small), small, None, max_pixels=1000)
