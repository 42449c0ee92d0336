"""aerialseg serve as a real process (uvicorn on a free loopback port) driven with httpx and with
X-AnyLabeling's own RemoteServer client: protocol, shapes that paint back to infer-scene's map, bad input."""

import base64
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import rasterio
import torch
import yaml

from aerialseg.annotations.anylabeling import Shape
from aerialseg.annotations.labels import labels_to_masks
from aerialseg.annotations.rasterize import MaskOptions, rasterize_shapes
from aerialseg.core.config import load_params
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.scene import InferOptions, infer_scene
from aerialseg.inference.prelabel import scored_shapes
from aerialseg.inference.server import ServeOptions, model_ids, read_api_key
from aerialseg.models import create_model, save_model
from aerialseg.stages.bundle import build_bundle
from aerialseg.stages.masks import label_table

from conftest import REPO

KEY = "s3cret-key"
CLASSES = ["road", "water", "tree", "building"]
XANYLABELING = "x-anylabeling-cvhub==4.2.1"


# --- fixtures: a bundle, images, a running server ----------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real registered model (PSPNet-ResNet18, random init, seeded: smooth, blocky regions), tile 256."""
    root = tmp_path_factory.mktemp("serve-bundle")
    torch.manual_seed(0)
    save_model(create_model("pspnet_resnet18"), root / "trained", "pspnet_resnet18", extra={"gsd_m": 0.5})
    return build_bundle(root / "trained", root / "bundle", tile_size=256, overlap=32, onnx=False)


def sample_rgb(rows: int = 256, cols: int = 320) -> np.ndarray:
    """A crop of the embedded Dubai sample scene 2 as RGB (H, W, 3)."""
    with rasterio.open(REPO / "data" / "sample" / "scenes" / "dubai_tile2.tif") as ds:
        return ds.read(window=((0, rows), (0, cols))).transpose(1, 2, 0)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]) if rgb.shape[2] == 3 else
                           rgb[..., [2, 1, 0, 3]])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-image") / "dubai_crop.png"
    path.write_bytes(png_bytes(sample_rgb()))
    return path


@contextmanager
def running_server(bundle: Path, folder: Path, env: dict[str, str], **serve: object) -> Iterator[str]:
    """`aerialseg serve` in a subprocess on a free loopback port (--port 0); yields its base URL."""
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"device": "cpu", "min_area_px": 0, **serve}}))
    log = folder / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "aerialseg.cli", "serve", "--model", str(bundle),
                                 "--port", "0", "--params", str(params)], stdout=sink, stderr=subprocess.STDOUT,
                                env={**{k: v for k, v in os.environ.items() if k != "AERIALSEG_API_KEY"}, **env})
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory) -> Iterator[str]:
    with running_server(bundle, tmp_path_factory.mktemp("server"), {"AERIALSEG_API_KEY": KEY}, queue=2) as url:
        yield url


def predict(url: str, image: bytes | str, model: str = "bundle", key: str | None = KEY,
            **params: object) -> httpx.Response:
    body = {"model": model, "image": image if isinstance(image, str) else base64.b64encode(image).decode(),
            "params": params}
    return httpx.post(f"{url}/v1/predict", json=body, headers={"Token": key} if key else {}, timeout=120)


def paint(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """Paint returned shapes as label-to-mask does (the annotation tools' rule); unpainted = background."""
    names = ["background", *CLASSES]
    parsed = [Shape(i, s["label"], names.index(s["label"]), "polygon", np.asarray(s["points"], np.float64))
              for i, s in enumerate(shapes)]
    return rasterize_shapes(parsed, width, height)


@pytest.fixture(scope="module")
def scene_map(bundle, image, tmp_path_factory) -> np.ndarray:
    """infer-scene's class map of the test image (the reference for every paint-back check)."""
    out = tmp_path_factory.mktemp("infer") / "map.tif"
    infer_scene(image, bundle, out, InferOptions(progress=False, preview=False, device="cpu",
                                                 allow_ungeoreferenced=True))
    with rasterio.open(out) as ds:
        return ds.read(1)


# --- protocol ----------------------------------------------------------------------------------

def test_health_is_open_and_models_need_the_key(server):
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert health.json()["models_loaded"] == 1
    for headers, cause in (({}, "missing"), ({"Token": ""}, "missing"), ({"Token": "wrong"}, "wrong"),
                           ({"Token": KEY + "x"}, "wrong")):
        response = httpx.get(f"{server}/v1/models", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert response.json() == {"success": False, "error": {"code": "UNAUTHORIZED", "message": error["message"]}}
        assert error["message"].startswith(f"API key {cause}") and "Token" in error["message"]
        assert "wrong" not in error["message"].removeprefix("API key wrong") and KEY not in error["message"]
    models = httpx.get(f"{server}/v1/models", headers={"Token": KEY}).json()
    assert models["success"] is True
    meta = models["data"]["bundle"]
    assert meta["classes"] == CLASSES and "pspnet_resnet18" in meta["display_name"]
    assert {"button_run", "edit_conf", "mask_fineness_slider"} <= {w["name"] for w in meta["widgets"]}
    assert meta["runtime"]["precision"] == "fp32" and "fp32" in meta["display_name"]  # which model runs
    assert meta["runtime"]["int8"] == "no model.int8.onnx in the bundle"
    info = httpx.get(f"{server}/v1/models/bundle/info", headers={"Token": KEY}).json()
    assert info["data"]["model_id"] == "bundle"


def test_prediction_paints_back_to_the_scene_map(server, image, scene_map):
    response = predict(server, image.read_bytes(), conf_threshold=0.0, epsilon_factor=0.0, iou_threshold=0.45)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    shapes = data["shapes"]
    assert shapes and data["description"] == ""
    for shape in shapes:
        assert shape["label"] in CLASSES and shape["shape_type"] == "polygon"
        assert 0.0 <= shape["score"] <= 1.0 and len(shape["points"]) >= 3
    painted = paint(shapes, *scene_map.shape)
    assert (painted == scene_map).all()  # exact; background is implied, never returned
    assert (paint(shapes[::-1], *scene_map.shape) == scene_map).all()  # in any order
    # the same image as a data URI gives the same shapes
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    assert predict(server, uri, epsilon_factor=0.0).json()["data"]["shapes"] == shapes


def test_params_threshold_filter_and_simplify(server, image):
    raw = image.read_bytes()
    everything = predict(server, raw).json()["data"]["shapes"]
    scores = sorted({s["score"] for s in everything})
    threshold = scores[len(scores) // 2]
    confident = predict(server, raw, conf_threshold=threshold).json()["data"]["shapes"]
    assert confident and all(s["score"] >= threshold for s in confident) and len(confident) < len(everything)
    label = everything[0]["label"]
    only = predict(server, raw, filter_classes=[label.upper()]).json()["data"]["shapes"]
    assert only and {s["label"] for s in only} == {label}
    assert predict(server, raw, filter_classes=[]).json()["data"]["shapes"] == everything  # [] = every class
    coarse = predict(server, raw, epsilon_factor=0.01).json()["data"]["shapes"]
    assert sum(len(s["points"]) for s in coarse) < sum(len(s["points"]) for s in everything)
    big = predict(server, raw, min_area_px=200).json()["data"]["shapes"]
    assert len(big) < len(everything)


def test_transparent_pixels_are_not_labelled(server):
    rgba = np.dstack([sample_rgb(), np.full((256, 320), 255, np.uint8)])
    rgba[:, :120, 3] = 0
    shapes = predict(server, png_bytes(rgba)).json()["data"]["shapes"]
    assert shapes and max(p[0] for s in shapes for p in s["points"]) > 200
    assert min(p[0] for s in shapes for p in s["points"]) >= 120


def geotiff_bytes(pixels: np.ndarray, gsd_m: float) -> bytes:
    """(B, H, W) uint8 as an in-memory deflate GeoTIFF in UTM 40N with ``gsd_m`` pixels."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    with MemoryFile() as memfile:
        with memfile.open(driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=pixels.shape[0],
                          dtype="uint8", crs="EPSG:32640", transform=from_origin(301000, 2790000, gsd_m, gsd_m),
                          compress="deflate") as dst:
            dst.write(pixels)
        return memfile.read()


def test_geotiff_upload_matches_png_of_the_same_pixels(server, image):
    rgb = sample_rgb()
    from_png = predict(server, image.read_bytes()).json()["data"]["shapes"]
    from_tif = predict(server, geotiff_bytes(rgb.transpose(2, 0, 1), 0.5)).json()["data"]["shapes"]
    assert from_tif == from_png


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height black pixels that compresses to a few hundred KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


VRT = (b'<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
       b'<SourceFilename>/etc/hostname</SourceFilename></SimpleSource></VRTRasterBand></VRTDataset>')
ONE_PIXEL = png_bytes(np.zeros((1, 1, 3), np.uint8))


@pytest.mark.parametrize("case, status, code", [
    ("missing token", 401, "UNAUTHORIZED"),
    ("wrong token", 401, "UNAUTHORIZED"),
    ("bad base64", 400, "INVALID_IMAGE"),
    ("not an image", 400, "INVALID_IMAGE"),
    ("local-file VRT", 400, "INVALID_IMAGE"),
    ("one pixel", 422, "IMAGE_TOO_SMALL"),
    ("100 MPix PNG bomb", 413, "IMAGE_TOO_LARGE"),
    ("16-bit image", 422, "INVALID_IMAGE"),
    ("GeoTIFF 10x the training GSD", 413, "IMAGE_TOO_LARGE"),
    ("truncated JSON", 400, "INVALID_JSON"),
    ("JSON not an object", 422, "INVALID_REQUEST"),
    ("deeply nested JSON", 400, "INVALID_JSON"),
    ("unknown model", 404, "MODEL_NOT_FOUND"),
    ("unknown params", 422, "INVALID_REQUEST"),
    ("conf_threshold out of range", 422, "INVALID_REQUEST"),
    ("unknown filter class", 422, "INVALID_PARAMS"),
    ("body over the cap", 413, "BODY_TOO_LARGE"),
    ("chunked body over the cap", 413, "BODY_TOO_LARGE"),
    ("wrong method", 405, "METHOD_NOT_ALLOWED"),
])
def test_bad_input_is_a_clean_4xx_and_the_server_keeps_serving(server, image, case, status, code):
    good = base64.b64encode(image.read_bytes()).decode()
    url, headers = f"{server}/v1/predict", {"Token": KEY}
    sixteen_bit = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint16))[1].tobytes()
    calls = {
        "missing token": lambda: predict(server, good, key=None),
        "wrong token": lambda: predict(server, good, key="nope"),
        "bad base64": lambda: predict(server, "data:image/png;base64,@@not base64@@"),
        "not an image": lambda: predict(server, b"plain text, not pixels"),
        "local-file VRT": lambda: predict(server, VRT),
        "one pixel": lambda: predict(server, ONE_PIXEL),
        "100 MPix PNG bomb": lambda: predict(server, png_bomb(10_000, 10_000)),
        "16-bit image": lambda: predict(server, sixteen_bit),
        "GeoTIFF 10x the training GSD": lambda: predict(server, geotiff_bytes(np.zeros((3, 1000, 1000), np.uint8),
                                                                              5.0)),
        "truncated JSON": lambda: httpx.post(url, content=b'{"model": "bundle", "ima', headers=headers),
        "JSON not an object": lambda: httpx.post(url, content=b'[1, 2]', headers=headers),
        "deeply nested JSON": lambda: httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=headers),
        "unknown model": lambda: predict(server, good, model="no-such-model"),
        "unknown params": lambda: predict(server, good, score_threshold=0.5),
        "conf_threshold out of range": lambda: predict(server, good, conf_threshold=2),
        "unknown filter class": lambda: predict(server, good, filter_classes=["car"]),
        "body over the cap": lambda: httpx.post(url, content=b" " * (65 * 2**20), headers=headers),
        "chunked body over the cap": lambda: httpx.post(url, content=(b" " * 2**20 for _ in range(65)),
                                                        headers=headers),
        "wrong method": lambda: httpx.get(url, headers=headers),
    }
    response = calls[case]()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert response.json() == {"success": False, "error": {"code": code, "message": error["message"]}}
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert httpx.get(f"{server}/health").status_code == 200
    assert predict(server, ONE_PIXEL).status_code == 422  # still answering predictions


def test_full_queue_answers_503_and_admitted_requests_succeed(server):
    raw = png_bytes(cv2.resize(sample_rgb(), (768, 768)))
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: predict(server, raw), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "QUEUE_FULL"
    results = [r.json()["data"]["shapes"] for r in responses if r.status_code == 200]
    assert all(shapes == results[0] for shapes in results)
    assert predict(server, raw).status_code == 200  # slots are freed


def test_timeout_answers_504_and_the_server_recovers(bundle, image, tmp_path):
    with running_server(bundle, tmp_path, {}, timeout_s=1e-6, queue=1) as url:
        response = predict(url, image.read_bytes(), key=None)
        assert response.status_code == 504 and response.json()["error"]["code"] == "TIMEOUT"
        assert predict(url, image.read_bytes(), key=None).status_code == 504  # the slot was released
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"


# --- X-AnyLabeling's own client ----------------------------------------------------------------

def xanylabeling_python() -> Path:
    """Python of a test-only venv with X-AnyLabeling (cached); skip when it cannot be had.

    $AERIALSEG_XANYLABELING_PYTHON points at an existing one; otherwise it is built once under
    $AERIALSEG_TEST_CACHE (default ~/.cache/aerialseg-tests).
    """
    given = os.environ.get("AERIALSEG_XANYLABELING_PYTHON")
    if given:
        return Path(given) if Path(given).is_file() else pytest.skip(f"{given} not found")
    cache = Path(os.environ.get("AERIALSEG_TEST_CACHE", Path.home() / ".cache" / "aerialseg-tests"))
    venv = cache / XANYLABELING.replace("==", "-")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import anylabeling.services.auto_labeling.remote_server"]
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    if python.is_file() and subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", XANYLABELING], check=True, capture_output=True,
                       timeout=900)
        subprocess.run(probe, env=env, check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"cannot install {XANYLABELING} into {venv}: {exc}")
    return python


CLIENT = r'''
import json, os, sys, tempfile
url, key, model_id, image_path, epsilon = sys.argv[1:6]
from anylabeling import config
work = tempfile.mkdtemp()
config.set_work_directory(work)  # its user config goes here, not into the home folder
config.current_config_file = os.path.join(work, "settings.yaml")
with open(config.current_config_file, "w") as f:
    json.dump({"remote_server_settings": {"server_url": url, "api_key": key}}, f)
from PyQt6.QtGui import QImage
from PyQt6.QtWidgets import QApplication
app = QApplication([])
from anylabeling.services.auto_labeling.remote_server import RemoteServer
messages = []
model = RemoteServer({"type": "remote_server", "name": "remote_server", "display_name": "Remote-Server"},
                     messages.append)
models = model.get_available_models()
model.set_model_id(model_id)
model.set_mask_fineness(float(epsilon))
result = model.predict_shapes(QImage(image_path), image_path)
print(json.dumps({"models": models, "messages": messages, "shapes": [
    {"label": s.label, "shape_type": s.shape_type, "score": s.score, "group_id": None, "flags": {},
     "description": "", "points": [[p.x(), p.y()] for p in s.points]} for s in result.shapes]}))
'''


def canopy_png(folder: Path) -> Path:
    """A real 256x256 crop of an OpenEarthMap tile (Houston, 0.5 m) that is 75 % tree canopy, as PNG."""
    from conftest import shared_path

    with rasterio.open(shared_path("openearthmap-samples", "images", "houston_16.tif")) as ds:
        rgb = ds.read(window=((768, 1024), (256, 512))).transpose(1, 2, 0)
    path = folder / "canopy.png"
    path.write_bytes(png_bytes(rgb))
    return path


def usable(points: list[list[float]]) -> bool:
    """>= 3 distinct vertices and a non-zero area (what labelme's and X-AnyLabeling's loaders need)."""
    x, y = np.asarray(points, float).T
    return len({tuple(p) for p in points}) >= 3 and abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) > 0


@pytest.mark.parametrize("scene", ["dubai", "canopy"])
def test_xanylabeling_remote_server_client(server, image, scene_map, bundle, scene, tmp_path):
    """X-AnyLabeling's own RemoteServer client: shapes it keeps are usable, one per region, and what it saves
    paints back to infer-scene's map through label-to-mask, labelme and X-AnyLabeling's mask export."""
    python = xanylabeling_python()
    if scene == "canopy":
        image = canopy_png(tmp_path)
        out = tmp_path / "canopy.tif"
        infer_scene(image, bundle, out, InferOptions(progress=False, preview=False, device="cpu",
                                                     allow_ungeoreferenced=True))
        with rasterio.open(out) as ds:
            scene_map = ds.read(1)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    epsilon = 0.0001  # the finest setting of X-AnyLabeling's mask fineness slider
    run = subprocess.run([str(python), str(script), server, KEY, "bundle", str(image), str(epsilon)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["messages"] == [] and list(out["models"]) == ["bundle"]
    shapes = out["shapes"]
    assert shapes and {s["label"] for s in shapes} <= set(CLASSES)
    assert all(s["shape_type"] == "polygon" and 0 <= s["score"] <= 1 for s in shapes)
    assert all(usable(s["points"]) for s in shapes)  # after X-AnyLabeling's own Shape.add_point
    regions = sum(cv2.connectedComponents((scene_map == v).view(np.uint8), connectivity=4)[0] - 1
                  for v in range(1, len(CLASSES) + 1))
    assert len(shapes) <= 1.2 * regions, (len(shapes), regions)
    print(f"{scene}: X-AnyLabeling kept {len(shapes)} shapes for {regions} regions")
    # what X-AnyLabeling would save -> label-to-mask -> the same classes as infer-scene's map
    height, width = scene_map.shape
    (tmp_path / "labels").mkdir()
    label_file = tmp_path / "labels" / f"{scene}.json"
    label_file.write_text(json.dumps({"version": "2.4.0", "flags": {}, "shapes": shapes,
                                      "imagePath": os.path.relpath(image, label_file.parent), "imageData": None,
                                      "imageHeight": height, "imageWidth": width}))
    params = load_params(REPO / "params.yaml")
    [mask_path] = labels_to_masks([label_file], tmp_path / "masks", label_table(params), MaskOptions())
    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)
    assert mask.shape == scene_map.shape
    agreement = (mask == scene_map).mean()
    assert agreement >= 0.99, agreement
    try:  # the tools' own loaders and mask export on the saved file
        from helpers import reference_tools

        tools_python = reference_tools.reference_venv()
    except reference_tools.ReferenceUnavailable:
        return
    classes = {"background": 0, **{name: i + 1 for i, name in enumerate(CLASSES)}}
    for tool in ("labelme", "xanylabeling"):
        [theirs] = reference_tools.reference_masks(tool, [label_file], classes, tmp_path, tools_python)
        assert np.array_equal(theirs, mask), (tool, int((theirs != mask).sum()))


# --- pieces ------------------------------------------------------------------------------------

def test_scored_shapes_one_per_region_and_paint_back_exactly():
    rng = np.random.default_rng(0)
    classes = cv2.resize(rng.integers(0, 5, (12, 16), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST)
    classes[30:90, 40:120] = 1  # a road block around islands of other classes
    classes[45:75, 55:70] = 0
    classes[50:60, 90:100] = 4
    classes[rng.random(classes.shape) < 0.01] = 3
    confidence = rng.random(classes.shape).astype(np.float32)
    names = ("background", *CLASSES)
    shapes = scored_shapes(classes, confidence, names)
    assert "background" not in {s["label"] for s in shapes}
    assert (paint(shapes, *classes.shape) == classes).all()
    assert (paint(shapes[::-1], *classes.shape) == classes).all()  # order does not matter
    regions = sum(cv2.connectedComponents((classes == v).view(np.uint8), connectivity=4)[0] - 1 for v in range(1, 5))
    assert len(shapes) == regions  # one shape per region, holes and all
    _, labels = cv2.connectedComponents((classes == 1).view(np.uint8), connectivity=4)
    road = labels == labels[35, 45]
    pieces = [s for s in shapes if s["label"] == "road" and [40, 30] in np.asarray(s["points"], int).tolist()]
    assert len(pieces) == 1 and pieces[0]["score"] == pytest.approx(confidence[road].mean(), abs=1e-4)
    # thresholds drop whole regions; min area merges small ones; filter keeps classes
    kept = scored_shapes(classes, confidence, names, conf_threshold=0.5)
    assert all(s["score"] >= 0.5 for s in kept) and len(kept) < len(shapes)
    assert len(scored_shapes(classes, confidence, names, min_area_px=50)) < len(shapes)
    assert {s["label"] for s in scored_shapes(classes, confidence, names, keep={4})} == {"building"}
    coarse = scored_shapes(classes, confidence, names, epsilon_factor=0.02)
    assert sum(len(s["points"]) for s in coarse) < sum(len(s["points"]) for s in shapes)


def test_options_ids_and_api_key(tmp_path):
    assert ServeOptions.from_params(load_params(REPO / "params.yaml")["serve"]) == ServeOptions()  # one default
    assert model_ids([Path("a/bundle"), Path("b/bundle"), Path("c/model.zip")]) == ["bundle", "bundle-2", "model"]
    with pytest.raises(AerialsegError, match="unknown serve key"):
        ServeOptions.from_params({"max_body": 3})
    with pytest.raises(AerialsegError, match="queue"):
        ServeOptions(queue=0).check()
    assert read_api_key(None, {}) is None
    assert read_api_key(None, {"AERIALSEG_API_KEY": " k1 "}) == "k1"
    key_file = tmp_path / "key.txt"
    key_file.write_text("k2\n")
    assert read_api_key(key_file, {"AERIALSEG_API_KEY": "k1"}) == "k2"
    key_file.write_text("  \n")
    with pytest.raises(AerialsegError, match="empty"):
        read_api_key(key_file, {})


def test_cli_bad_model_is_one_line_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "aerialseg.cli", "serve", "--model", str(tmp_path / "missing"),
                          "--port", "0", "--params", str(REPO / "params.yaml")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1


def test_401_says_missing_or_wrong_and_the_log_names_it(caplog):
    from fastapi.testclient import TestClient

    from aerialseg.inference.server import create_app

    client = TestClient(create_app({}, ServeOptions(), api_key=KEY))
    with caplog.at_level("WARNING", logger="aerialseg.inference.server"):
        missing = client.get("/v1/models")
        wrong = client.get("/v1/models", headers={"Token": "guess-" + KEY[:3]})
        right = client.get("/v1/models", headers={"Token": KEY})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"]["message"].startswith("API key missing")
    assert wrong.json()["error"]["message"].startswith("API key wrong") and "guess" not in wrong.text
    logged = [r.getMessage() for r in caplog.records]
    assert any("API key missing" in m and "/v1/models" in m for m in logged)
    assert any("API key wrong" in m for m in logged) and not any("guess" in m or KEY in m for m in logged)


def test_int8_is_used_only_when_its_gate_passed(tmp_path):
    from types import SimpleNamespace

    from aerialseg.inference.runtime_choice import int8_candidate

    bundle = SimpleNamespace(root=tmp_path, manifest={}, tile_size=512)  # a plain folder: nothing to list
    assert int8_candidate(bundle) == (None, {"int8": "no model.int8.onnx in the bundle"})
    (tmp_path / "model.int8.onnx").write_bytes(b"onnx")
    assert int8_candidate(bundle)[0] is None and "quantize.json" in int8_candidate(bundle)[1]["int8"]
    accuracy = {"fp32": {"mIoU": 0.55}, "int8": {"mIoU": 0.548}, "delta_miou_points": 0.2}
    report = tmp_path / "quantize.json"
    report.write_text(json.dumps({"accuracy": accuracy}))  # written before the gate field existed: passed
    path, why = int8_candidate(bundle)
    assert path == tmp_path / "model.int8.onnx" and why["gate"]["passed"] is True
    assert why["accuracy"] == {"delta_miou_points": 0.2, "miou_fp32": 0.55, "miou_int8": 0.548}
    report.write_text(json.dumps({"accuracy": accuracy, "gate": {"passed": False, "max_delta_miou": 0.1}}))
    path, why = int8_candidate(bundle)
    assert path is None and why["int8"].startswith("accuracy gate failed") and why["gate"]["passed"] is False
    report.write_text(json.dumps({"accuracy": accuracy, "gate": {"passed": True}}))
    assert int8_candidate(bundle)[0] == tmp_path / "model.int8.onnx"
