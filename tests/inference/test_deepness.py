"""The bundle's QGIS Deepness model runs in the onnxruntime Deepness installs and gives aerialseg's classes.

Deepness 0.6.5 (the current release) installs ``onnxruntime(-gpu)>=1.12.1,<=1.17.0`` with ``pip install -U``,
so a fresh QGIS gets 1.17.0. The model is checked three ways: its IR version and opset against 1.17's limits
(always); Deepness's pre-processing and class rule (tests/helpers/deepness_rules.py) under the pinned onnxruntime
(always); and the same under onnxruntime 1.17.0 itself, in a throwaway venv built once under
``$AERIALSEG_TEST_CACHE`` (default ``~/.cache/aerialseg-tests``; skipped when it cannot be installed).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch

from helpers import deepness_runner
from aerialseg.inference.bundle import open_bundle
from aerialseg.inference.predictor import Predictor
from aerialseg.models import create_model, save_model
from aerialseg.stages.bundle import build_bundle

MODEL, TILE = "unet_efficientnet_lite0", 64   # a real architecture (Resize, Pad, Clip, depthwise convs)
DEEPNESS_ORT = "1.17.0"
ORT_117_MAX_IR, ORT_117_MAX_OPSET = 9, 20     # onnxruntime 1.17 = ONNX 1.15: IR 9, ai.onnx opset 20
TIE = 1e-4                                    # top-2 probability gap under which argmax may flip on rounding
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def deepness_bundle(tmp_path_factory) -> Path:
    """A bundle of the default architecture (random weights) at 64 px tiles."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("deepness")
    trained = save_model(create_model(MODEL), root / "trained", MODEL, extra={"gsd_m": 0.3})
    return build_bundle(trained, root / "bundle", tile_size=TILE, overlap=8)


@pytest.fixture(scope="module")
def scene_tiles(repo_root) -> np.ndarray:
    """uint8 (N, T, T, 3) tiles of a real orthophoto from the embedded sample (Deepness's NHWC layout)."""
    with rasterio.open(repo_root / "data" / "sample" / "scenes" / "dubai_tile3.tif") as ds:
        pixels = ds.read()
    tiles = [pixels[:, y:y + TILE, x:x + TILE] for y in (0, 300, 600, 900) for x in (0, 450, 900)]
    return np.stack(tiles).transpose(0, 2, 3, 1).copy()


def aerialseg_probabilities(bundle_dir: Path, tiles: np.ndarray) -> np.ndarray:
    """infer-scene's predictor (PyTorch) on uint8 (N, T, T, C) tiles -> probabilities (N, K, T, T)."""
    with open_bundle(bundle_dir) as bundle:
        return Predictor.from_bundle(bundle, "torch", "cpu")(tiles.transpose(0, 3, 1, 2))


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def assert_same_classes(deepness_classes: np.ndarray, probs: np.ndarray) -> None:
    """Class maps equal wherever aerialseg's top two probabilities are not a near-tie."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TIE
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(deepness_classes[clear], probs.argmax(1)[clear])


def test_deepness_model_is_within_onnxruntime_117_limits(deepness_bundle):
    proto = onnx.load(str(deepness_bundle / "model.deepness.onnx"))
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    assert proto.ir_version <= ORT_117_MAX_IR and opsets.pop("ai.onnx") <= ORT_117_MAX_OPSET and not opsets
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "standard operators only"
    assert not any(n.metadata_props for n in proto.graph.node), "no IR-10 fields behind a lower IR stamp"
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert dims(inp) == ["batch", 3, TILE, TILE] and dims(out) == ["batch", 5, TILE, TILE]


def test_deepness_model_gives_aerialseg_classes(deepness_bundle, scene_tiles):
    result = deepness_runner.run(deepness_bundle / "model.deepness.onnx", scene_tiles)
    probs = aerialseg_probabilities(deepness_bundle, scene_tiles)
    assert np.abs(result["output"].sum(1) - 1).max() < 1e-5
    assert np.abs(result["output"] - probs).max() < 1e-4
    assert_same_classes(result["classes"], probs)


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _onnxruntime_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                          capture_output=True, text=True, timeout=120)
    return done.stdout.strip() if done.returncode == 0 else None


def _build_venv(root: Path) -> None:
    """onnxruntime DEEPNESS_ORT + numpy 1.x in a new venv at root (built beside it, then renamed); skip on failure.

    ``--no-deps``: running a session needs numpy only (Deepness also gets coloredlogs, sympy, ... it never uses).
    """
    build = root.parent / f".{root.name}.build-{os.getpid()}"
    steps = ([sys.executable, "-m", "venv", "--clear", str(build)],
             [str(_venv_python(build)), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
              "--retries", "1", "--timeout", "30", f"onnxruntime=={DEEPNESS_ORT}", "numpy<2"])
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(build, ignore_errors=True)
        detail = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()
        pytest.skip(f"cannot install onnxruntime {DEEPNESS_ORT} here: {detail[-1] if detail else exc}")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(build, root)


@pytest.fixture(scope="session")
def onnxruntime_117() -> Path:
    """The Python of a venv with onnxruntime 1.17.0, built once and reused (cached across sessions)."""
    cache = Path(os.environ.get("AERIALSEG_TEST_CACHE") or Path.home() / ".cache" / "aerialseg-tests")
    root = cache / f"onnxruntime-{DEEPNESS_ORT}-py{sys.version_info.major}{sys.version_info.minor}"
    if _onnxruntime_version(_venv_python(root)) != DEEPNESS_ORT:
        _build_venv(root)
    if _onnxruntime_version(_venv_python(root)) != DEEPNESS_ORT:
        pytest.skip(f"onnxruntime {DEEPNESS_ORT} installed at {root} but does not import")
    return _venv_python(root)


@pytest.mark.slow
def test_deepness_model_runs_under_onnxruntime_117(onnxruntime_117, deepness_bundle, scene_tiles, tmp_path):
    np.savez(tmp_path / "tiles.npz", tiles=scene_tiles)
    done = subprocess.run([str(onnxruntime_117), str(HERE.parent / "helpers" / "deepness_runner.py"),
                           str(deepness_bundle / "model.deepness.onnx"), str(tmp_path / "tiles.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = np.load(tmp_path / "out.npz")
    assert str(result["onnxruntime"]) == DEEPNESS_ORT
    probs = aerialseg_probabilities(deepness_bundle, scene_tiles)
    assert np.abs(result["output"].sum(1) - 1).max() < 1e-5
    assert np.abs(result["output"] - probs).max() < 1e-4
    assert_same_classes(result["classes"], probs)


@pytest.mark.slow
def test_onnxruntime_117_refuses_ir_10(onnxruntime_117, deepness_bundle, tmp_path):
    """The venv really enforces 1.17's limit: the same model stamped IR 10 (as the exporter writes) fails."""
    proto = onnx.load(str(deepness_bundle / "model.deepness.onnx"))
    proto.ir_version = 10
    onnx.save(proto, str(tmp_path / "ir10.onnx"))
    code = "import onnxruntime as o, sys; o.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    done = subprocess.run([str(onnxruntime_117), "-c", code, str(tmp_path / "ir10.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unsupported model IR version: 10" in done.stderr
