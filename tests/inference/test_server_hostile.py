"""Hostile and slow clients against `aerialseg serve` (issue 27), on a real uvicorn server on loopback in this
process (tiny toy model): validated decoding, the shared size caps, keys checked at start, body deadline,
cancellation on disconnect, and a bounded load test. Grows with each defect found."""

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import cv2
import httpx
import numpy as np
import pytest
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from aerialseg.core.errors import AerialsegError
from aerialseg.inference import server as server_module
from aerialseg.inference.server import ServeOptions, create_app, load_models, read_api_key
from conftest import REPO
from helpers.safety import assert_one_line_error, make_bundle, run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Iterator[dict]:
    bundle = make_bundle(tmp_path_factory.mktemp("hostile_serve"))
    with ExitStack() as stack:
        yield load_models([bundle], ServeOptions(device="cpu"), stack)


def sample_png(side: int = 96) -> bytes:
    with rasterio.open(REPO / "data" / "sample" / "scenes" / "dubai_tile2.tif") as ds:
        rgb = ds.read(window=((0, side), (0, side))).transpose(1, 2, 0)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def body(image: bytes) -> bytes:
    return json.dumps({"model": "bundle", "image": base64.b64encode(image).decode(), "params": {}}).encode()


@contextmanager
def live(models: dict, **options: object) -> Iterator[tuple[str, object]]:
    """The app on uvicorn, on a free loopback port, in a thread: (base URL, app)."""
    import uvicorn

    app = create_app(models, ServeOptions(device="cpu", min_area_px=0, **options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.executor.shutdown(wait=True, cancel_futures=True)


def raw_request(url: str, payload: bytes, declared: int | None = None) -> socket.socket:
    """A socket that has sent the request line and headers (and ``payload`` of the body)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared if declared is not None else len(payload)}\r\n\r\n").encode()
    sock.sendall(head + payload)
    return sock


def read_answer(sock: socket.socket) -> str:
    """What the server sent until it closed the connection or 5 s passed."""
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
            if b"\r\n\r\n" in data and b"}}" in data:
                break
    except OSError:
        pass
    return data.decode(errors="replace")


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- decoding and size caps: the CLI's rules -------------------------------------------------------------

def test_truncated_or_cut_images_are_400(models):
    """Was: the first half of a valid PNG answered 200 with shapes made of garbage pixels."""
    from fastapi.testclient import TestClient

    png = sample_png()
    ok, jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR))
    client = TestClient(create_app(models, ServeOptions(device="cpu")))
    assert client.post("/v1/predict", content=body(png)).status_code == 200
    for cut in (png[:len(png) // 2], png[:-20], jpeg.tobytes()[:len(jpeg) // 2]):
        response = client.post("/v1/predict", content=body(cut))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "INVALID_IMAGE" and "truncated" in error["message"], error


def test_a_coarse_georeferenced_upload_is_refused_by_the_shared_grid_cap(models):
    """A 64 px image with 1000 m pixels at the 0.5 m training GSD: the same check (core.limits) as the CLI."""
    from fastapi.testclient import TestClient

    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32640",
                      transform=from_origin(300000, 2800000, 1000, 1000)) as dst:
            dst.write(np.full((3, 64, 64), 100, np.uint8))
        tiff = mem.read()
    client = TestClient(create_app(models, ServeOptions(device="cpu")))
    response = client.post("/v1/predict", content=body(tiff))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "IMAGE_TOO_LARGE" and "training GSD" in error["message"] and "cap" in error["message"]


# --- API keys -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["   ", "clé-secrète", "tab\there", "k\u200bey"])
def test_unusable_api_keys_are_refused_at_start(tmp_path, key, capsys, monkeypatch):
    """Was: a non-ASCII key was accepted but could never match; a blank one silently meant 'no key'."""
    with pytest.raises(AerialsegError, match="API key"):
        read_api_key(None, {"AERIALSEG_API_KEY": key})
    key_file = tmp_path / "key.txt"
    key_file.write_text(key + "\n", encoding="utf-8")
    with pytest.raises(AerialsegError, match="API key"):
        read_api_key(key_file, {})
    monkeypatch.setenv("AERIALSEG_API_KEY", key)
    code, err = run_cli(["serve", "--model", tmp_path / "no-such-bundle"], capsys)
    assert_one_line_error(code, err, "AERIALSEG_API_KEY", "API key")
    assert read_api_key(None, {"AERIALSEG_API_KEY": ""}) is None  # unset
    assert read_api_key(None, {"AERIALSEG_API_KEY": " good-key "}) == "good-key"


# --- slow and vanishing clients -------------------------------------------------------------------------

def test_a_trickling_client_holds_no_slot_and_is_cut_off(models):
    """Was: a client trickling its body kept its admission slot; with queue 1 every other request got 503."""
    with live(models, queue=1, body_timeout_s=1.5) as (url, app):
        slow = raw_request(url, b'{"model": "bund', declared=10_000)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.1):
                try:
                    slow.sendall(b" ")
                except OSError:
                    return

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/predict", content=body(sample_png()), timeout=30)
        assert response.status_code == 200, response.text
        answer = read_answer(slow)
        stop.set()
        slow.close()
        assert answer.startswith("HTTP/1.1 408") and "BODY_TIMEOUT" in answer, answer
        assert time.monotonic() - start < 10
        assert app.state.gate.active == 0


def test_a_disconnected_client_has_its_work_cancelled(models, monkeypatch):
    """Was: a client that went away mid-inference kept its slot until its prediction ended (107 s once)."""
    real, tiles = server_module.predict_dataset, []

    def slow_predict(model, ds, max_pixels, on_tiles=None):
        for _ in range(200):  # 200 x 20 ms = 4 s unless stopped
            time.sleep(0.02)
            tiles.append(1)
            on_tiles(1)
        return real(model, ds, max_pixels, on_tiles)

    monkeypatch.setattr(server_module, "predict_dataset", slow_predict)
    with live(models, queue=1, workers=1) as (url, app):
        sock = raw_request(url, body(sample_png()))
        assert wait_until(lambda: len(tiles) > 3, 10)  # running
        sock.close()
        start = time.monotonic()
        assert wait_until(lambda: app.state.gate.active == 0, 2.0), "slot still held after the client left"
        freed = time.monotonic() - start
        time.sleep(0.2)
        assert len(tiles) < 150 and freed < 2.0, (len(tiles), freed)  # the work stopped, not ran to its end
        monkeypatch.setattr(server_module, "predict_dataset", real)
        assert httpx.post(f"{url}/v1/predict", content=body(sample_png()), timeout=30).status_code == 200


def test_bounded_loopback_load(models):
    """8 clients for ~3 s against queue 4: only 200 or 503 (never 5xx else), the slots all come back."""
    image = body(sample_png(64))
    with live(models, queue=4, workers=1) as (url, app):
        stop_at = time.monotonic() + 3.0

        def client(_: int) -> list[int]:
            codes = []
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < stop_at:
                    codes.append(http.post(f"{url}/v1/predict", content=image).status_code)
            return codes

        with ThreadPoolExecutor(8) as pool:
            codes = [c for batch in pool.map(client, range(8)) for c in batch]
        assert codes.count(200) >= 8 and set(codes) <= {200, 503}, sorted(set(codes))
        assert wait_until(lambda: app.state.gate.active == 0, 5)
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"
