"""infer-survey's worker side: the tasks Dask runs (``aerialseg.inference.survey`` submits them).

- ``scene_task``: one scene mapped whole by infer-scene's own steps (``inference.scene.map_with``);
- ``block_task`` + ``assemble_task``: a scene taller than ``survey.block_rows`` as bands of rows, each its own
  task, then one task that stitches them into the same outputs (``inference.blocks``).

The model is loaded once per worker, on its first task, by ``ModelPlugin`` (a Dask worker plugin) and kept there.
A task returns a record; a user error (corrupt scene, no CRS, ...) is a record with state 'failed' and the one-line
error; anything else raises, so that Dask retries the task (a killed worker's task is rescheduled by Dask).
"""

import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file
from aerialseg.inference.scene import InferOptions, map_with


def stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class ModelPlugin(WorkerPlugin):
    """Dask worker plugin: the bundle and its Predictor, built on a worker's first task, kept for the others."""

    def __init__(self, model: str, options: InferOptions, name: str):
        self.model, self.name, self.loads = model, name, 0
        self.args = options.backend, options.device, options.tta, options.labelled_only  # Predictor.from_bundle

    def setup(self, worker: Any = None) -> None:
        self._lock, self._stack, self._loaded = threading.Lock(), ExitStack(), None

    def teardown(self, worker: Any = None) -> None:
        self._stack.close()
        self._loaded = None

    def loaded(self) -> tuple[Any, Any]:
        """(Bundle, Predictor), loaded at the first call (threads of one worker wait for it)."""
        from aerialseg.inference.predictor import Predictor
        from aerialseg.inference.scene import open_model

        with self._lock:
            if self._loaded is None:
                bundle = self._stack.enter_context(open_model(Path(self.model)))
                self._loaded = bundle, Predictor.from_bundle(bundle, *self.args)
                self.loads += 1
            return self._loaded


def _plugin(name: str, model: str, options: InferOptions) -> ModelPlugin:
    """This worker's ModelPlugin (outside a worker: one made here, e.g. for a direct call)."""
    from distributed import get_worker

    try:
        plugin = get_worker().plugins.get(name)
    except ValueError:  # not on a worker
        plugin = None
    if plugin is None:
        plugin = ModelPlugin(model, options, name)
        plugin.setup()
    return plugin


def _worker() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return f"pid {os.getpid()}"


def _run(scene: str, body: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """``body(path, record)`` -> the record's fields when done; a user error -> state 'failed' with its line."""
    path, start = Path(scene), time.perf_counter()
    record: dict[str, Any] = {"scene": scene, "state": "failed", "error": None, "worker": _worker()}
    try:
        record.update(body(path, record), state="done")
    except AerialsegError as exc:
        record["error"] = str(exc)
    except OSError as exc:
        if path.is_file():
            raise
        record["error"] = str(AerialsegError("file not found", path, "check the path"))
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _timed_model(plugin: str, model: str, options: InferOptions) -> tuple[ModelPlugin, Any, Any, list[float]]:
    """(holder, bundle, predict, [forward seconds, load seconds]): the worker's model (loaded on its first task),
    its forward time summed (bench: Dask's overhead and the task's own work as shares of it)."""
    holder = _plugin(plugin, model, options)
    t0 = time.perf_counter()
    bundle, predict = holder.loaded()
    forward = [0.0, time.perf_counter() - t0]

    def timed(tiles: Any) -> Any:
        t0 = time.perf_counter()
        probs = predict(tiles)
        forward[0] += time.perf_counter() - t0
        return probs

    return holder, bundle, timed, forward


def _unchanged(path: Path, before: list[int]) -> None:
    if stat_key(path) != before:
        raise AerialsegError("scene changed while it was mapped", path, "run infer-survey again")


def _outputs(done: dict[str, Any]) -> dict[str, Any]:
    return {"width": done["width"], "height": done["height"], "tiles": done["tiles"],
            "outputs": {role: {"file": p.name, "sha256": sha256_file(p)} for role, p in done["outputs"].items()}}


def scene_task(scene: str, sid: str, out: str, model: str, options: InferOptions, plugin: str) -> dict[str, Any]:
    """One scene on a Dask worker -> its manifest record."""

    def body(path: Path, record: dict[str, Any]) -> dict[str, Any]:
        before = stat_key(path)
        record.update(stat=before, sha256=sha256_file(path))
        holder, bundle, timed, forward = _timed_model(plugin, model, options)
        done = map_with(path, Path(model), bundle, timed, Path(out) / f"{sid}_landcover.tif", options, False)
        _unchanged(path, before)
        return {**_outputs(done), "model_loads": holder.loads, "forward_seconds": round(forward[0], 3),
                "load_seconds": round(forward[1], 3)}

    return _run(scene, body)


def block_task(scene: str, sid: str, rows: tuple[int, int], folder: str, out: str, model: str,
               options: InferOptions, plugin: str) -> dict[str, Any]:
    """Scene rows [y0, y1) on a Dask worker -> the block's record (its files in ``folder``, counts, timing)."""
    from aerialseg.inference.blocks import map_block

    def body(path: Path, record: dict[str, Any]) -> dict[str, Any]:
        before = stat_key(path)
        holder, bundle, timed, forward = _timed_model(plugin, model, options)
        done = map_block(path, Path(model), bundle, timed, Path(out) / f"{sid}_landcover.tif", rows, Path(folder),
                         options)
        _unchanged(path, before)
        return {**done, "stat": before, "model_loads": holder.loads, "forward_seconds": round(forward[0], 3),
                "load_seconds": round(forward[1], 3)}

    return {**_run(scene, body), "rows": list(rows)}


def assemble_task(scene: str, sid: str, folder: str, out: str, model: str, options: InferOptions, plugin: str,
                  blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """A blocked scene's outputs from its blocks (Dask runs it once every block is done) -> the scene's record.
    A block that failed fails the scene with its error; blocks read while the scene changed are refused."""
    from aerialseg.inference.blocks import assemble

    failed = next((b for b in blocks if b["state"] != "done"), None)
    if failed is not None:
        return {**failed, "seconds": round(sum(b["seconds"] for b in blocks), 3),
                "blocks": [{"rows": b["rows"], "worker": b["worker"], "error": b["error"]} for b in blocks]}

    def body(path: Path, record: dict[str, Any]) -> dict[str, Any]:
        before = stat_key(path)
        if any(b["stat"] != before for b in blocks):
            raise AerialsegError("scene changed while it was mapped", path, "run infer-survey again")
        record.update(stat=before, sha256=sha256_file(path))
        holder, bundle, _, loaded = _timed_model(plugin, model, options)
        done = assemble(path, Path(model), bundle, Path(out) / f"{sid}_landcover.tif", blocks, Path(folder), options)
        _unchanged(path, before)
        return {**_outputs(done), "model_loads": max(b["model_loads"] for b in blocks),
                "forward_seconds": round(sum(b["forward_seconds"] for b in blocks), 3),
                "load_seconds": round(loaded[1] + sum(b["load_seconds"] for b in blocks), 3),
                "blocks": [{"rows": b["rows"], "worker": b["worker"], "seconds": b["seconds"], "tiles": b["tiles"]}
                           for b in blocks]}

    record = _run(scene, body)
    record["seconds"] = round(record["seconds"] + sum(b["seconds"] for b in blocks), 3)  # every task of the scene
    return record
