"""infer-survey: many scenes mapped on Dask distributed, resumable from a manifest, one product at the end.

Each scene is one Dask task (``client.submit(..., retries=N)``, ``as_completed``): a killed worker's task is
rescheduled, an exception retried, a user error (corrupt scene, no CRS, ...) fails that scene alone. The model
is loaded once per worker, on its first task, by ``ModelPlugin`` (a Dask worker plugin) and kept there
(``inference.survey_tasks``: the worker side). A scene taller than ``block_rows`` is mapped as bands of rows,
each its own task, and one more task stitches them into the same outputs (``inference.blocks``); the bands are
written into a run-named folder in ``--out``, removed when the scene is recorded. The scene is recorded (done)
only when that last task has checked every band's file and renamed every output into place.

A scene is mapped by infer-scene's own steps (``aerialseg.inference.scene``), with the worker's predictor:
the same COG, polygons and areas, byte for byte. Outputs go to ``<out>/<stem>-<8 hex of the resolved path>
_landcover.tif`` (+ ``_polygons.gpkg``, ``_areas.json``, ...), so two scenes with one file name never collide.

The manifest (``<out>/survey.json``, rewritten atomically after each scene) records per scene its size, mtime
and SHA-256, the bundle's and options' hashes, each output's SHA-256 and the state (done / failed + its error).
A rerun skips a scene whose record matches and whose outputs hash as recorded; a scene with unchanged size and
mtime is trusted to be the file hashed before (else it is re-hashed: touched but identical is still skipped).
"""

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aerialseg.core.config import DEFAULT_PARAMS, typed_section
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file, write_json
from aerialseg.core.safety import temp_prefix
from aerialseg.inference.blocks import plan_blocks
from aerialseg.inference.mosaic import write_products
from aerialseg.inference.scene import InferOptions
from aerialseg.inference.survey_tasks import ModelPlugin, assemble_task, block_task, scene_task, stat_key

log = logging.getLogger(__name__)

MANIFEST = "survey.json"
FORMAT = "aerialseg-survey"
SCENE_SUFFIXES = (".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list")
# options that change no output byte (progress bars, where infer-scene would write, GDAL's cache)
NEUTRAL_OPTIONS = ("progress", "out_dir", "overwrite", "gdal_cache_mb")


@dataclass
class SurveyOptions:
    """infer-survey's own knobs (params.yaml section ``survey``; CLI flags override)."""

    scenes_dir: str = "data/sample/scenes"  # where the scenes are when none are given (DVC stage survey)
    scenes: list[str] = field(default_factory=lambda: ["dubai_tile4.tif"])  # names or globs in scenes_dir
    out: str = "outputs/survey"
    workers: int = 1  # local cluster: worker processes (one per GPU on GPU machines)
    threads_per_worker: int = 1  # scenes a worker maps at once (they share its model)
    scheduler: str | None = None  # address of an existing Dask scheduler (then workers/threads are its own)
    retries: int = 2  # a scene's task is retried this often after an unexpected error
    block_rows: int = 16384  # a scene taller than this is mapped as bands of about this many rows (0 = never)
    mosaic: bool = True  # survey.vrt over all maps
    progress: bool = True

    @classmethod
    def from_params(cls, section: dict[str, Any], **overrides: Any) -> "SurveyOptions":
        return typed_section(cls, "survey", section, **overrides)

    def validate(self) -> None:
        if self.workers < 1 or self.threads_per_worker < 1:
            raise AerialsegError("workers and threads per worker must be >= 1", fix="pass 1 or more")
        if self.retries < 0:
            raise AerialsegError("retries must be >= 0", fix="pass --retries 0 or more")
        if self.block_rows is not None and self.block_rows < 0:
            raise AerialsegError(f"survey.block_rows must be >= 0, got {self.block_rows}", DEFAULT_PARAMS,
                                 "set it to 0 (never split a scene) or e.g. 16384")


# --- scenes and their names --------------------------------------------------------------------

def _expand(item: Path) -> list[Path]:
    """One argument -> scene paths: a folder (its .tif/.tiff), a list file (one path a line), a glob, a file."""
    if item.is_dir():
        return sorted(p for p in item.iterdir() if p.suffix.lower() in SCENE_SUFFIXES and p.is_file())
    if item.suffix.lower() in LIST_SUFFIXES and item.is_file():
        lines = (ln.strip() for ln in item.read_text(encoding="utf-8").splitlines())
        return [(item.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    if any(ch in str(item) for ch in "*?["):
        anchor = Path(item.anchor) if item.is_absolute() else Path(".")
        return sorted(anchor.glob(str(item.relative_to(item.anchor)) if item.is_absolute() else str(item)))
    return [item]


def collect_scenes(items: Iterable[str | Path]) -> list[Path]:
    """Scenes from files, folders, globs and list files; each file once (by its resolved path), in order."""
    seen: dict[Path, Path] = {}
    items = list(items)
    for item in items:
        for path in _expand(Path(item)):
            seen.setdefault(path.resolve(), path)
    if not seen:
        raise AerialsegError("no scenes found", ", ".join(str(i) for i in items) or None,
                             "pass GeoTIFF files, folders holding them, globs or a list file")
    return list(seen.values())


def scene_id(scene: Path) -> str:
    """``<stem>-<8 hex>``: the hex of the resolved path keeps same-named scenes of other folders apart."""
    return f"{scene.stem}-{hashlib.sha1(str(scene.resolve()).encode()).hexdigest()[:8]}"


def options_digest(options: InferOptions) -> str:
    """SHA-256 of the options that shape the outputs (sorted JSON)."""
    knobs = {k: v for k, v in asdict(options).items() if k not in NEUTRAL_OPTIONS}
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()


def bundle_digest(model: Path) -> str:
    """A bundle folder: SHA-256 of its bundle.json (which lists every file's SHA-256); a .zip: of the file."""
    manifest = model / "bundle.json"
    if model.is_dir():
        if not manifest.is_file():
            raise AerialsegError("no bundle.json here", model, "package the model with `aerialseg bundle` first")
        return sha256_file(manifest)
    return sha256_file(model)


# --- the manifest ------------------------------------------------------------------------------------

@dataclass
class Manifest:
    """survey.json: one record per scene id, saved atomically after every change."""

    path: Path
    scenes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: unreadable survey manifest: every scene is mapped again", path)
            return cls(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AerialsegError("not an infer-survey manifest", path, "pass another --out folder")
        return cls(path, dict(data.get("scenes") or {}))

    def save(self) -> None:
        write_json(self.path, {"format": FORMAT, "version": 1, "scenes": self.scenes})

    def stale(self, sid: str, scene: Path, bundle_sha: str, options_sha: str) -> str | None:
        """Why this scene must be mapped (None: its maps verify and it can be skipped)."""
        rec = self.scenes.get(sid)
        if rec is None:
            return "new"
        if rec.get("state") != "done":
            return "failed before"
        if (rec.get("bundle_sha256"), rec.get("options_sha256")) != (bundle_sha, options_sha):
            return "model or options changed"
        if not scene.is_file():
            return "scene missing"
        if rec.get("stat") != stat_key(scene):
            if sha256_file(scene) != rec.get("sha256"):
                return "scene changed"
            rec["stat"] = stat_key(scene)
        for role, out in (rec.get("outputs") or {}).items():
            path = self.path.parent / out["file"]
            if not path.is_file():
                return f"{role} missing"
            if sha256_file(path) != out["sha256"]:
                return f"{role} changed or corrupt"
        return None

    def outputs(self, role: str, sids: Iterable[str]) -> dict[str, Path]:
        """{scene id: its ``role`` output} of the done scenes that have one, in the order given."""
        recs = {s: self.scenes.get(s) or {} for s in sids}
        return {s: self.path.parent / r["outputs"][role]["file"] for s, r in recs.items()
                if r.get("state") == "done" and role in (r.get("outputs") or {})}


# --- the client side -------------------------------------------------------------------------------

@contextmanager
def dask_client(survey: SurveyOptions) -> Iterator[Any]:
    """A Client on --scheduler, else on a local cluster of worker processes (loopback, no dashboard)."""
    from distributed import Client, LocalCluster

    if not log.isEnabledFor(logging.DEBUG):  # Dask's INFO lines (workers starting, closing) only with -v
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if survey.scheduler:
        try:
            client = Client(survey.scheduler, timeout="30s")
        except OSError as exc:
            raise AerialsegError(f"cannot reach the Dask scheduler ({exc})", survey.scheduler,
                                 "start it (dask scheduler) or check the address") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=survey.workers, threads_per_worker=survey.threads_per_worker, processes=True,
                      host="127.0.0.1", dashboard_address=None,
                      silence_logs=logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


@dataclass
class SurveyPlan:
    """What a run maps and what it skips (scene id -> path, and why each one is mapped)."""

    scenes: dict[str, Path]
    todo: dict[str, str]  # scene id -> reason
    bundle_sha: str
    options_sha: str
    blocks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # scene id -> its bands' rows


def plan_survey(scenes: list[Path], model: Path, options: InferOptions, manifest: Manifest) -> SurveyPlan:
    """Hash the bundle and options; each scene is skipped when its record and outputs verify."""
    bundle_sha, options_sha = bundle_digest(model), options_digest(options)
    ids = {scene_id(p): p for p in scenes}
    todo = {sid: why for sid, p in ids.items() if (why := manifest.stale(sid, p, bundle_sha, options_sha))}
    return SurveyPlan(ids, todo, bundle_sha, options_sha)


def _failed(scene: Path, exc: BaseException) -> dict[str, Any]:
    """The record of a task that failed after its retries (or whose worker kept dying)."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        message = "the workers mapping it died repeatedly (out of memory?)"
        fix = "give workers more memory (docs/survey.md) or fewer threads per worker"
    else:
        message, fix = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", \
            "rerun with -v; a rerun maps only the scenes not done"
    return {"scene": str(scene), "state": "failed", "error": str(AerialsegError(message, scene, fix))}


def _pixels(rec: dict[str, Any]) -> int:
    return int(rec.get("width", 0)) * int(rec.get("height", 0))  # 0 for a failed scene


def _weight(scene: Path) -> float:
    """Megapixels of a scene for the progress bar (1 when unreadable: it fails in its task)."""
    import rasterio

    try:
        with rasterio.open(scene) as ds:
            return ds.width * ds.height / 1e6
    except Exception:  # noqa: BLE001  (the task reports the error)
        return 1.0


def map_survey(plan: SurveyPlan, model: Path, out: Path, options: InferOptions, survey: SurveyOptions,
               manifest: Manifest) -> dict[str, float]:
    """Map the scenes to do (one task each) and record each as it completes; returns {mapped_mpx, seconds}."""
    from tqdm import tqdm

    start = time.perf_counter()
    if not plan.todo:
        return {"mapped_mpx": 0.0, "seconds": 0.0, "tasks_seconds": 0.0}
    folders: dict[str, Path] = {}
    name = f"aerialseg-model-{plan.bundle_sha[:12]}-{options_digest(options)[:12]}"
    weights = {sid: _weight(plan.scenes[sid]) for sid in plan.todo}
    with dask_client(survey) as client, tqdm(total=round(sum(weights.values()), 2), unit="Mpx", desc="survey",
                                             disable=None if survey.progress else True, dynamic_ncols=True) as bar:
        client.register_plugin(ModelPlugin(str(model), options, name), name)
        try:
            submitted = time.perf_counter()
            futures = {_submit(client, plan, sid, (str(out), str(model), options, name), survey.retries, folders): sid
                       for sid in plan.todo}
            for sid, rec in _results(futures, plan):
                manifest.scenes[sid] = rec
                manifest.save()
                shutil.rmtree(folders.pop(sid, out / "-"), ignore_errors=True)  # its blocks, now in the map
                bar.update(round(weights[sid], 2))
                line = (f"{sid}: {rec['error']}" if rec["state"] != "done" else
                        f"{sid}: done in {rec['seconds']:.1f} s ({_pixels(rec) / 1e6:.1f} Mpx, "
                        f"{len(rec['blocks']) if 'blocks' in rec else 'one'} block(s), {rec['worker']})")
                bar.write(line) if survey.progress else log.debug(line)
            tasks_seconds = time.perf_counter() - submitted  # first submit to last result (bench: Dask overhead)
        finally:
            client.unregister_worker_plugin(name)
            for folder in folders.values():  # Ctrl-C: blocks of unfinished scenes
                shutil.rmtree(folder, ignore_errors=True)
    mapped = sum(_pixels(manifest.scenes[sid]) for sid in plan.todo) / 1e6
    return {"mapped_mpx": mapped, "seconds": time.perf_counter() - start, "tasks_seconds": tasks_seconds}


def _submit(client: Any, plan: SurveyPlan, sid: str, args: tuple[str, str, InferOptions, str], retries: int,
            folders: dict[str, Path]) -> Any:
    """Submit one scene: one task, or one task per block + the task that assembles them (its future returned;
    the blocks' folder goes into ``folders``)."""
    scene, key, blocks = str(plan.scenes[sid]), f"{sid}-{plan.options_sha[:8]}", plan.blocks.get(sid) or []
    if len(blocks) < 2:
        return client.submit(scene_task, scene, sid, *args, key=f"map-{key}", retries=retries, pure=False)
    out = Path(args[0])
    folders[sid] = folder = Path(tempfile.mkdtemp(prefix=temp_prefix(f"blocks-{sid}"), dir=out))
    parts = [client.submit(block_task, scene, sid, rows, str(folder), *args, key=f"block-{key}-{rows[0]}",
                           retries=retries, pure=False) for rows in blocks]
    return client.submit(assemble_task, scene, sid, str(folder), *args, parts, key=f"map-{key}", retries=retries,
                         pure=False)


def _results(futures: dict[Any, str], plan: SurveyPlan) -> Iterator[tuple[str, dict[str, Any]]]:
    """(scene id, record) as tasks finish; a task that failed after its retries becomes a 'failed' record."""
    from distributed import as_completed

    for future in as_completed(futures):
        sid = futures[future]
        try:
            rec = future.result()
        except Exception as exc:  # noqa: BLE001  (after Dask's retries: this scene fails, the rest go on)
            rec = _failed(plan.scenes[sid], exc)
        rec.update(bundle_sha256=plan.bundle_sha, options_sha256=plan.options_sha, mapped_because=plan.todo[sid])
        yield sid, rec


def run_survey(scenes: Iterable[str | Path], model: str | Path, options: InferOptions,
               survey: SurveyOptions) -> dict[str, Any]:
    """Map every scene not yet done (on Dask), then write the survey products and survey_summary.json."""
    from aerialseg.inference.scene import open_model

    start = time.perf_counter()
    options.check()
    if options.format != "geotiff":
        raise AerialsegError("infer-survey writes GeoTIFF maps only", fix="set infer.format to geotiff")
    options.areas, options.progress = True, False
    model, out = Path(model).absolute(), Path(survey.out).absolute()  # workers may have another cwd
    paths = [p.absolute() for p in collect_scenes(scenes)]
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out / MANIFEST)
    with open_model(model) as bundle:  # a broken bundle is one line here, not one per scene on the workers
        overlap = bundle.overlap if options.overlap is None else int(options.overlap)
        if not 0 <= overlap < bundle.tile_size:
            raise AerialsegError(f"overlap {overlap} px must be >= 0 and below the tile size {bundle.tile_size}",
                                 fix="pass a smaller --overlap")
        plan = plan_survey(paths, model, options, manifest)
        plan.blocks = {sid: plan_blocks(plan.scenes[sid], bundle, options, survey.block_rows) for sid in plan.todo}
    manifest.save()
    timing = map_survey(plan, model, out, options, survey, manifest)
    states = {sid: (manifest.scenes.get(sid) or {}).get("state") for sid in plan.scenes}
    failed = {sid: manifest.scenes[sid]["error"] for sid, st in states.items() if st != "done"}
    summary = {
        "scenes": len(plan.scenes), "mapped": len(plan.todo) - len(failed),
        "skipped": len(plan.scenes) - len(plan.todo), "failed": len(failed), "errors": failed,
        "mapped_mpx": round(timing["mapped_mpx"], 3), "map_seconds": round(timing["seconds"], 3),
        "tasks_seconds": round(timing["tasks_seconds"], 3),
        "mpx_per_s": round(timing["mapped_mpx"] / timing["seconds"], 4) if timing["seconds"] else None,
        "workers": survey.scheduler or f"local {survey.workers} x {survey.threads_per_worker} threads",
    }
    outputs = {role: manifest.outputs(role, plan.scenes) for role in ("map", "vectors", "areas")}
    summary["products"] = write_products(out, outputs, survey.mosaic)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    write_json(out / "survey_summary.json", summary)
    return summary
