"""Helpers for the test_safety_* modules: tiny scenes, labels and bundles, CLI runs, file snapshots.

Run as a script it is the `aerialseg` command with the tiny test model registered (for subprocess runs:
kill -9, tmpfs mounts): ``python tests/helpers/safety.py infer-scene ...``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
TOY = "toy_fcn_safety"
TEMP_TAG = ".aerialseg-tmp-"


def register_toy() -> None:
    """A 3x3-conv model (5 classes, tile 128): fast enough for whole-scene runs in tests."""
    from torch import nn

    from aerialseg.models import list_models, register_model

    def build(classes: int = 5, in_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 1))

    if TOY not in list_models():
        register_model(TOY, tile_size=128, pad_multiple=1, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))(build)


def make_bundle(root: Path) -> Path:
    """A bundle directory (weights + model.json + bundle.json with checksums, no ONNX) of the toy model."""
    import torch

    from aerialseg.stages.bundle import build_bundle
    from aerialseg.models import save_model

    register_toy()
    torch.manual_seed(0)
    from aerialseg.models import create_model

    save_model(create_model(TOY), root / "trained", TOY, extra={"gsd_m": 0.5})
    return build_bundle(root / "trained", root / "bundle", overlap=16, onnx=False)


def write_scene(path: Path, height: int = 96, width: int = 128, georef: bool = True, nodata: int | None = None,
                dtype: str = "uint8", fill: float | None = None, seed: int = 0, **extra) -> Path:
    """A small 3-band GeoTIFF (random texture) on a 0.5 m UTM grid (or with no georeference)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (3, height, width)).astype(dtype)
    if fill is not None:
        pixels[:] = fill
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": dtype, "nodata": nodata,
               **extra}
    if georef:
        profile.update(crs="EPSG:32640", transform=from_origin(300000, 2800000, 0.5, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def write_labels(path: Path, image: str, width: int = 128, height: int = 96, **extra) -> Path:
    """A label file with one road triangle and one building rectangle, imagePath relative to it."""
    doc = {"version": "2.4.0", "flags": {}, "imagePath": image, "imageData": None, "imageWidth": width,
           "imageHeight": height, "shapes": [
               {"label": "road", "points": [[2, 2], [60, 4], [10, 50]], "shape_type": "polygon"},
               {"label": "building", "points": [[70, 20], [110, 60]], "shape_type": "rectangle"}], **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders with its bytes (to compare before and after a run)."""
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


def temp_leftovers(*folders: Path) -> list[Path]:
    """aerialseg temp entries (files or folders) anywhere under the folders."""
    return [p for folder in folders for p in folder.rglob(f"{TEMP_TAG}*")]


def run_cli(argv: list[str | Path], capsys) -> tuple[int, str]:
    """Run the CLI in-process (aerialseg.cli.main): (exit code, stderr)."""
    import pytest

    from aerialseg import cli

    old = sys.argv
    sys.argv = ["aerialseg", *map(str, argv), *(["--params", str(PARAMS)] if "--params" not in argv else [])]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    code = exc.value.code
    return (0 if code is None else code), capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line `error: <file>: <what> — fix: <how>`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and " — fix: " in line and "Traceback" not in err, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def script_command(*argv: str | Path) -> list[str]:
    """The command line that runs this file as the aerialseg CLI in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), *map(str, argv)]


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "pipeline"), env.get("PYTHONPATH", "")])
    return env


def kill_when(command: list[str], ready, cwd: Path, timeout: float = 60.0) -> bool:
    """Start command, SIGKILL it as soon as ready() is true; False when it finished first."""
    proc = subprocess.Popen(command, cwd=cwd, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return False


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "pipeline"))
    import aerialseg  # noqa: F401

    register_toy()
    from aerialseg.cli import main

    sys.argv = ["aerialseg", *sys.argv[1:]]
    main()
