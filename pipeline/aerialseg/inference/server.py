"""aerialseg serve: model bundles behind X-AnyLabeling's remote-server protocol (model-assisted labelling).

Protocol (as X-AnyLabeling's ``remote_server`` model type and X-AnyLabeling-Server speak it):
- ``GET /health`` -> ``{"status": "healthy", "models_loaded": n, "timestamp": ...}`` (never needs the key);
- ``GET /v1/models`` -> ``{"success": true, "data": {model_id: {display_name, classes, widgets, params, ...}}}``;
- ``POST /v1/predict`` with ``{"model", "image": data URI or bare base64, "params": {...}}`` ->
  ``{"success": true, "data": {"shapes": [{label, shape_type: "polygon", points, score, ...}], "description"}}``;
- every error: ``{"success": false, "error": {"code", "message"}}`` with a 4xx/5xx status, never a traceback.

Predictions: the bundle's model over the whole uploaded image (read by the one ``SceneReader``) with
infer-scene's seam-free stitcher (``aerialseg.inference.stitch.blend_scene``), so an image of any size is
tiled; nodata/alpha pixels are left unlabelled. The map becomes polygons through the one converter that
mask-to-label and infer-scene use (``aerialseg.inference.prelabel`` -> ``aerialseg.annotations.regions``):
one polygon per 4-connected region, holes opened rather than cut, never degenerate, painting back exactly
its pixels in label-to-mask, labelme and X-AnyLabeling in any order; regions under ``min_area_px`` are
merged into their surroundings; ``score`` is the region's mean confidence (max probability); background
is never returned. ``filter_classes`` absent or empty = every class (X-AnyLabeling sends [] when all are
ticked).

Safety: binds 127.0.0.1 unless told otherwise; with an API key (``Token`` header, constant-time compare)
every route but /health needs it; the body is capped, the image size is read from its header and refused
before any pixel is decoded; only PNG/JPEG/WEBP/BMP/TIFF are opened, from memory (images never touch the
disk) through the CLI's validated reader (truncated -> 400); the body is read within a deadline (408) before
a slot is taken; at most ``queue`` requests are admitted at once (503 beyond); each request has a deadline
(504); a client that disconnects has its work cancelled (inference/serve_limits.py).
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import rasterio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aerialseg.core.config import typed_section
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.bundle import Bundle, open_bundle
from aerialseg.inference.prelabel import scored_shapes
from aerialseg.inference.runtime_choice import build_runtime
from aerialseg.core.limits import check_pixels
from aerialseg.inference.serve_limits import (ApiError, ClientSlots, cancel_on_disconnect, check_api_key,
                                              client_of, decode_checked, read_body_within, too_large)
from aerialseg.inference.serve_map import predict_dataset
from aerialseg.inference.stitch import Predict

log = logging.getLogger(__name__)

API_KEY_ENV = "AERIALSEG_API_KEY"
TOKEN_HEADER = b"token"  # X-AnyLabeling sends the key as "Token: <key>" (ASGI lower-cases header names)
IMAGE_DRIVERS = ["PNG", "JPEG", "WEBP", "BMP", "GTiff"]  # never VRT & co.: they can read local files
BACKGROUND = 0


@dataclass
class ServeOptions:
    """Every knob of `aerialseg serve` (params.yaml section ``serve``; CLI flags override)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_mb: float = 64.0  # request body cap (base64 image + JSON)
    max_megapixels: float = 50.0  # decoded-pixel cap, checked from the image header before decoding
    min_side_px: int = 16  # smaller images are refused (nothing to segment)
    queue: int = 16  # requests admitted at once (running + waiting); more -> 503
    workers: int = 1  # inference threads (each runs the whole model; torch already uses every core)
    timeout_s: float = 120.0  # per-request deadline -> 504
    body_timeout_s: float = 30.0  # the request body must arrive within this -> 408 (serve_limits)
    per_client: int = 8  # request bodies one client address may send at once; more -> 429 (serve_limits)
    device: str = "auto"  # auto | cpu | cuda
    batch: int = 8  # tiles per forward pass
    overlap: int | None = 0  # px between tiles beyond what the image size forces; None = the bundle's (serve_map)
    conf_threshold: float = 0.0  # default when a request does not set it
    epsilon_factor: float = 0.0  # default simplification (fraction of each ring's perimeter, as X-AnyLabeling)
    min_area_px: float = 16.0  # default: regions smaller than this are not returned

    @classmethod
    def from_params(cls, section: dict[str, Any], **overrides: Any) -> "ServeOptions":
        """Options from the params section 'serve'; overrides that are not None win; unknown keys are errors."""
        return typed_section(cls, "serve", section, **overrides)

    def check(self) -> None:
        positive = {"max_body_mb": self.max_body_mb, "max_megapixels": self.max_megapixels, "queue": self.queue,
                    "workers": self.workers, "timeout_s": self.timeout_s, "batch": self.batch,
                    "body_timeout_s": self.body_timeout_s, "per_client": self.per_client}
        for name, value in positive.items():
            if not value > 0:
                raise AerialsegError(f"serve.{name} must be > 0, got {value}", "params.yaml")
        if not 0 <= self.port < 65536:
            raise AerialsegError(f"port {self.port} is out of range", fix="pass --port 1-65535 (0 = any free port)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise AerialsegError(f"unknown device '{self.device}'", fix="use auto, cpu or cuda")
        if self.overlap is not None and self.overlap < 0:
            raise AerialsegError(f"serve.overlap must be >= 0 or null, got {self.overlap}", "params.yaml")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": {"code": code, "message": message}}, status_code=status)


# --- request schema ----------------------------------------------------------------------------

class PredictParams(BaseModel):
    """``params`` of /v1/predict; unknown names are refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")

    conf_threshold: float | None = Field(None, ge=0.0, le=1.0)
    epsilon_factor: float | None = Field(None, ge=0.0, le=0.1)
    filter_classes: list[str] | None = None
    min_area_px: float | None = Field(None, ge=0.0)
    iou_threshold: float | None = None  # X-AnyLabeling's client sends it on every request; no meaning here


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    image: str
    params: PredictParams = PredictParams()


def parse_request(body: bytes) -> PredictRequest:
    """The JSON body as a PredictRequest; malformed JSON -> 400, wrong fields -> 422."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "INVALID_JSON", f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ApiError(400, "INVALID_JSON", "request body nests too deeply") from None
    try:
        return PredictRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "INVALID_REQUEST", problems) from None


def decode_base64_image(image: str) -> bytes:
    """Bytes of a data URI (``data:image/png;base64,...``) or of bare base64."""
    payload = image
    if image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "INVALID_IMAGE", "data URI is not base64-encoded")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "INVALID_IMAGE", "image is not valid base64") from None
    if not raw:
        raise ApiError(400, "INVALID_IMAGE", "image is empty")
    return raw


@contextmanager
def open_image(raw: bytes, options: ServeOptions) -> Iterator[rasterio.DatasetReader]:
    """Open encoded image bytes from memory; size caps are checked on the header, before decoding."""
    with decode_checked(raw, IMAGE_DRIVERS) as ds:  # the CLI's validated reader: truncated -> 400
        too_large(check_pixels, ds.width, ds.height, options.max_megapixels * 1e6, "image", "image",
                  "serve.max_megapixels")
        if min(ds.width, ds.height) < options.min_side_px:
            raise ApiError(422, "IMAGE_TOO_SMALL", f"image is {ds.width}x{ds.height} px; each side needs at "
                                                   f"least {options.min_side_px} px")
        yield ds


# --- the model ---------------------------------------------------------------------------------

@dataclass
class ServedModel:
    """One bundle, loaded once: its id, its model as a tile function and its class names."""

    model_id: str
    bundle: Bundle
    predict: Predict
    class_names: tuple[str, ...]
    batch: int = 8
    runtime: dict[str, Any] | None = None  # which model runs: precision (int8 | fp32), backend, why
    overlap: int | None = 0  # px between tiles (serve.overlap); None = the bundle's

    @property
    def labels(self) -> list[str]:
        """Class names a prediction can return (background never is)."""
        return [n for i, n in enumerate(self.class_names) if i != BACKGROUND]

    def metadata(self, options: ServeOptions) -> dict[str, Any]:
        """What /v1/models says about the model (X-AnyLabeling reads display_name and widgets)."""
        slider = 1 + round((min(max(options.epsilon_factor, 1e-4), 1e-2) - 1e-4) * 99 / (1e-2 - 1e-4))
        precision = (self.runtime or {}).get("precision", "fp32")
        return {
            "display_name": f"aerialseg {self.bundle.manifest['model']['name']} ({self.model_id}, {precision})",
            "classes": self.labels,
            "batch_processing_mode": "default",
            "widgets": [{"name": "button_run", "value": None}, {"name": "input_conf", "value": None},
                        {"name": "edit_conf", "value": float(options.conf_threshold)},
                        {"name": "mask_fineness_slider", "value": int(slider)},
                        {"name": "mask_fineness_value_label", "value": None},
                        {"name": "toggle_preserve_existing_annotations", "value": False}],
            "params": {"conf_threshold": options.conf_threshold, "epsilon_factor": options.epsilon_factor,
                       "min_area_px": options.min_area_px, "filter_classes": self.labels},
            "tile_size": self.bundle.tile_size,
            "gsd_m": self.bundle.gsd_m,
            "runtime": self.runtime or {"precision": precision},
        }


def model_ids(paths: list[Path]) -> list[str]:
    """A unique id per bundle: its folder (or .zip) name, numbered when names repeat."""
    ids: list[str] = []
    for path in paths:
        base = Path(path).stem or "model"
        name, n = base, 1
        while name in ids:
            n += 1
            name = f"{base}-{n}"
        ids.append(name)
    return ids


def load_models(paths: list[Path], options: ServeOptions, stack: ExitStack) -> dict[str, ServedModel]:
    """Open every bundle (kept open on ``stack``) and load its model once."""
    if not paths:
        raise AerialsegError("no model given", fix="pass --model BUNDLE (several --model allowed)")
    models = {}
    for model_id, path in zip(model_ids(paths), paths):
        bundle = stack.enter_context(open_bundle(path))
        names = tuple(c["name"] for c in bundle.manifest["classes"])
        runtime = build_runtime(bundle, options.device)
        models[model_id] = ServedModel(model_id, bundle, runtime.predict, names, options.batch,
                                       {"precision": runtime.precision, **runtime.info}, options.overlap)
        log.info("serve: model %s <- %s (%s, %s, %d classes)", model_id, path, bundle.manifest["model"]["name"],
                 runtime.precision, len(names))
    return models


def class_filter(model: ServedModel, names: list[str] | None) -> set[int] | None:
    """filter_classes (names, case-insensitive) -> class ids; None or [] = every class; unknown names -> 422."""
    if not names:
        return None
    lookup = {n.lower(): i for i, n in enumerate(model.class_names)}
    unknown = [n for n in names if n.strip().lower() not in lookup]
    if unknown:
        raise ApiError(422, "INVALID_PARAMS", f"filter_classes: unknown class(es) {unknown}; "
                                              f"this model has {model.labels}")
    return {lookup[n.strip().lower()] for n in names}


def handle_predict(models: dict[str, ServedModel], options: ServeOptions, body: bytes,
                   deadline: float, cancelled: threading.Event | None = None) -> dict[str, Any]:
    """The whole /v1/predict work (runs in an inference thread): parse, decode, predict, polygonise."""
    request = parse_request(body)
    model = models.get(request.model)
    if model is None:
        raise ApiError(404, "MODEL_NOT_FOUND", f"model '{request.model}' is not served; "
                                               f"available: {', '.join(models)}")
    params = request.params
    keep = class_filter(model, params.filter_classes)
    raw = decode_base64_image(request.image)
    del request

    def check_deadline(_: int = 0) -> None:
        if cancelled is not None and cancelled.is_set():
            raise ApiError(499, "CLIENT_GONE", "the client disconnected")
        if time.monotonic() > deadline:
            raise ApiError(504, "TIMEOUT", f"prediction took longer than {options.timeout_s:g} s")

    check_deadline()
    with open_image(raw, options) as ds:
        classes, confidence = predict_dataset(model, ds, options.max_megapixels * 1e6, check_deadline)
    del raw
    shapes = scored_shapes(
        classes, confidence, model.class_names,
        options.conf_threshold if params.conf_threshold is None else params.conf_threshold,
        options.epsilon_factor if params.epsilon_factor is None else params.epsilon_factor,
        options.min_area_px if params.min_area_px is None else params.min_area_px, keep, check_deadline)
    return {"shapes": shapes, "description": ""}


# --- the web app -------------------------------------------------------------------------------

class TokenAuth:
    """ASGI middleware: with a key set, every path but /health needs ``Token: <key>`` (constant-time compare)."""

    def __init__(self, app: Any, api_key: str | None):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"] != "/health":
            token = next((value for name, value in scope["headers"] if name == TOKEN_HEADER), b"")
            if not hmac.compare_digest(token, self.key):
                cause = "wrong" if token.strip() else "missing"
                client = scope.get("client") or ("?", 0)
                log.warning("serve: 401 for %s %s from %s: API key %s (header 'Token')", scope.get("method", ""),
                            scope["path"], client[0], cause)
                await error_response(401, "UNAUTHORIZED", f"API key {cause}: send the server's key in the header "
                                                          f"'Token' (X-AnyLabeling: Remote-Server settings, api_key)")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class Gate:
    """Admission control: at most ``limit`` requests in flight; a slot is freed when its work has ended."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise ApiError(503, "QUEUE_FULL", f"{self.active} requests are in progress; try again shortly")
        self.active += 1

    def leave(self, *_: Any) -> None:
        self.active -= 1


def _retrieve(future: asyncio.Future) -> None:
    """Consume a finished future's exception (the request may have timed out and gone)."""
    if not future.cancelled():
        future.exception()


def create_app(models: dict[str, ServedModel], options: ServeOptions, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (already loaded)."""
    executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="aerialseg-predict")
    gate, readers = Gate(options.queue), ClientSlots(options.per_client)
    app = FastAPI(title="aerialseg serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "INVALID_REQUEST", "; ".join(e["msg"] for e in exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("serve: internal error", exc_info=exc)
        return error_response(500, "INTERNAL_ERROR", "internal server error (see the server log)")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {"status": "healthy", "models_loaded": len(models), "timestamp": now}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"success": True, "data": {mid: m.metadata(options) for mid, m in models.items()}}

    @app.get("/v1/models/{model_id}/info")
    async def model_info(model_id: str) -> dict[str, Any]:
        if model_id not in models:
            raise ApiError(404, "MODEL_NOT_FOUND", f"model '{model_id}' is not served")
        return {"success": True, "data": {"model_id": model_id, **models[model_id].metadata(options)}}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        deadline = time.monotonic() + options.timeout_s
        client = client_of(request)
        readers.enter(client)  # one client cannot open body reads without end (429)
        try:  # the body is read before the admission slot is taken, under its own deadline (408)
            body = await read_body_within(request, int(options.max_body_mb * 2**20), options.body_timeout_s)
        finally:
            readers.leave(client)
        gate.enter()
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(executor, handle_predict, models, options, body,
                                                             deadline, cancelled)
        future.add_done_callback(gate.leave)
        future.add_done_callback(_retrieve)
        del body
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, future, cancelled))
        try:
            data = await asyncio.wait_for(asyncio.shield(future), timeout=max(deadline - time.monotonic(), 0) + 1)
        except TimeoutError:
            cancelled.set()
            raise ApiError(504, "TIMEOUT", f"prediction took longer than {options.timeout_s:g} s") from None
        except asyncio.CancelledError:
            if future.cancelled():  # the client went away: its work is cancelled, there is no one to answer
                raise ApiError(499, "CLIENT_GONE", "the client disconnected") from None
            raise
        finally:
            watcher.cancel()
        return {"success": True, "data": data}

    app.add_middleware(TokenAuth, api_key=api_key)
    app.state.executor, app.state.gate = executor, gate
    return app


# --- running it --------------------------------------------------------------------------------

def read_api_key(key_file: Path | None, environ: dict[str, str]) -> str | None:
    """The API key: --api-key-file wins over $AERIALSEG_API_KEY; None = no key (open server)."""
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AerialsegError(f"cannot read the API key file ({exc.__class__.__name__})", key_file,
                                 "give a readable UTF-8 text file holding the key") from None
        if not key:
            raise AerialsegError("the API key file is empty", key_file, "write the key into it")
        return check_api_key(key, str(key_file))
    raw = environ.get(API_KEY_ENV, "")
    return check_api_key(raw.strip(), f"${API_KEY_ENV}") if raw else None


def serve(model_paths: list[Path], options: ServeOptions, api_key: str | None) -> None:
    """Load the bundles and run the server until interrupted (uvicorn)."""
    import uvicorn

    options.check()
    if api_key is None and options.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s without an API key: anyone who can reach it can use the models "
                    "(set %s or pass --api-key-file)", options.host, API_KEY_ENV)
    with ExitStack() as stack:
        app = create_app(load_models(model_paths, options, stack), options, api_key)
        stack.callback(app.state.executor.shutdown, wait=False, cancel_futures=True)
        log.info("serve: %s; settings %s", "API key required (header Token)" if api_key else "no API key",
                 json.dumps({k: v for k, v in asdict(options).items()}))
        uvicorn.run(app, host=options.host, port=options.port, log_level="info", timeout_graceful_shutdown=5)
