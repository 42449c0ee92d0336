"""Adapt a trained model to a survey's unlabelled scenes (`aerialseg adapt`): the scenes users map are always
there, so the model may look at them before it maps them.

Methods (``AdaptOptions.method``; ``all`` runs the three in this order):

- ``adabn`` (Li et al. 2016): BatchNorm running means and variances re-estimated on windows of the target
  scenes (a cumulative average over every window); no weight changes; seconds.
- ``tent`` (Wang et al., ICLR 2021): the mean per-pixel prediction entropy on the target windows minimised for
  ``tent_steps`` Adam steps, updating only the BatchNorm affine parameters (weight and bias). Normalisation
  statistics stay fixed (BN in eval mode: the model maps with its running statistics, so it is adapted as it
  will run; ``all`` re-estimates them first).
- ``self`` (self-training): ``self_rounds`` rounds; each labels the windows with the current model (round 1:
  the model given, the teacher), keeps pixels whose probability reaches ``threshold`` (others ignore), and
  fine-tunes every weight for ``self_steps`` steps of cross-entropy on random flips (BN statistics fixed).

Windows are read through the project's scene reader (``geo.scene.SceneReader``) at the model's training GSD,
placed by the window generator (``geo.windows``) on a grid over every scene; at most ``windows`` of them, drawn
with a seeded generator, are read (one scene open at a time), so memory is windows x 3 x window² bytes
whatever the scenes' size. Windows with less than ``min_valid`` valid pixels are skipped; nodata pixels never
count in the losses.

``adapt_bundle`` writes a new bundle (``inference.bundle.assemble_bundle``: verified by checksums like any)
whose model.json and bundle.json record ``adapted: {method, scenes: [{path, sha256}], params, windows}``.
It refuses to write over its input model.
"""

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch import nn

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import sha256_file, write_json
from aerialseg.core.safety import refuse_inputs, temp_dir
from aerialseg.geo.raster import open_raster
from aerialseg.geo.scene import BandPolicy, SceneReader, scene_gsd_m
from aerialseg.geo.windows import window_starts
from aerialseg.inference.bundle import Bundle, assemble_bundle
from aerialseg.models.runtime import resolve_device
from aerialseg.inference.scene import open_model
from aerialseg.models import save_model

log = logging.getLogger(__name__)

METHODS = ("adabn", "tent", "self")
CHOICES = (*METHODS, "all")


@dataclass
class AdaptOptions:
    """The knobs of `aerialseg adapt` (params.yaml section ``adapt``, less ``onnx``)."""

    method: str = "adabn"  # adabn | tent | self | all (adabn, then tent, then self)
    windows: int = 32  # target windows read (the memory cap: windows x 3 x window² bytes)
    window: int = 128  # window side, px on the model's grid (rounded down to the model's pad multiple)
    batch: int = 8
    min_valid: float = 0.5  # windows with a smaller valid fraction are skipped
    gsd_tolerance: float = 1.5  # scenes further from the training GSD than this ratio are read resampled
    tent_steps: int = 10
    tent_lr: float = 0.001
    self_rounds: int = 2
    self_steps: int = 10
    self_lr: float = 0.0001
    threshold: float = 0.9  # pseudo-labels: pixels whose top probability reaches this
    seed: int = 0
    device: str = "auto"

    def methods(self) -> list[str]:
        """The steps ``method`` stands for, in order."""
        if self.method not in CHOICES:
            raise AerialsegError(f"unknown adaptation method '{self.method}'", fix=f"use one of: {', '.join(CHOICES)}")
        return list(METHODS) if self.method == "all" else [self.method]

    def check(self) -> None:
        self.methods()
        if self.windows < 1 or self.window < 32 or self.batch < 1:
            raise AerialsegError("adapt.windows and adapt.batch must be >= 1 and adapt.window >= 32",
                                 fix="set them in params.yaml (adapt) or pass larger values")
        if not 0.0 < self.threshold <= 1.0 or not 0.0 <= self.min_valid <= 1.0:
            raise AerialsegError("adapt.threshold must be in (0, 1] and adapt.min_valid in [0, 1]",
                                 fix="set them in params.yaml (adapt)")


# --- target windows --------------------------------------------------------------------------------

@dataclass
class TargetWindows:
    """Windows of the target scenes: uint8 (N, C, T, T) pixels and bool (N, T, T) validity."""

    images: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def scene_scale(ds: Any, model_gsd: float | None, tolerance: float) -> float:
    """Model-grid pixels per scene pixel (infer-scene's rule): 1 unless the GSDs differ by more than ``tolerance``."""
    gsd = scene_gsd_m(ds)
    if not gsd or not model_gsd:
        return 1.0
    factor = gsd / model_gsd
    return factor if max(factor, 1.0 / factor) > tolerance else 1.0


def read_window(reader: SceneReader, row: int, col: int, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One (C, T, T) window on the model grid and its validity; parts past the scene's edge are invalid."""
    step = 1.0 / scale
    window = Window(col * step, row * step, min(size * step, reader.width - col * step),
                    min(size * step, reader.height - row * step))
    rows, cols = min(size, int(round(window.height * scale))), min(size, int(round(window.width * scale)))
    method = Resampling.average if scale < 1.0 else Resampling.bilinear
    pixels = reader.read(window, None if scale == 1.0 else (rows, cols), method)
    valid = reader.valid(window)
    if scale != 1.0:
        valid = valid[np.minimum((np.arange(rows) * step).astype(int), valid.shape[0] - 1)][
            :, np.minimum((np.arange(cols) * step).astype(int), valid.shape[1] - 1)]
    image = np.zeros((pixels.shape[0], size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    image[:, :pixels.shape[1], :pixels.shape[2]] = pixels
    mask[:valid.shape[0], :valid.shape[1]] = valid
    return image, mask


def draw(total: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of range(total), seeded, sorted (all when there are fewer); O(count) memory."""
    if total <= count:
        return list(range(total))
    rng, picked = np.random.default_rng(seed), set()
    while len(picked) < count:
        picked.update(int(i) for i in rng.integers(0, total, count - len(picked)))
    return sorted(picked)


def read_target_windows(scenes: Sequence[Path], options: AdaptOptions, size: int, policy: BandPolicy,
                        model_gsd: float | None) -> TargetWindows:
    """Up to ``options.windows`` windows drawn (seeded) from the non-overlapping window grids of all scenes (their
    headers only), read one scene at a time; windows under ``options.min_valid`` valid pixels are dropped."""
    grids = []  # per scene: (row starts, col starts, scale) on the model's grid
    for scene in scenes:
        with open_raster(scene) as ds:
            scale = scene_scale(ds, model_gsd, options.gsd_tolerance)
            h, w = max(1, int(ds.height * scale)), max(1, int(ds.width * scale))
        grids.append((window_starts(h, size, 0), window_starts(w, size, 0), scale))
    ends = np.cumsum([len(rows) * len(cols) for rows, cols, _ in grids])
    picked = draw(int(ends[-1]), options.windows, options.seed)
    images, valid = [], []
    for index, (rows, cols, scale) in enumerate(grids):
        first = int(ends[index - 1]) if index else 0
        mine = [k - first for k in picked if first <= k < ends[index]]
        if not mine:
            continue
        with open_raster(scenes[index]) as ds:
            reader = SceneReader(ds, scenes[index], policy)
            for k in mine:
                image, mask = read_window(reader, rows[k // len(cols)], cols[k % len(cols)], size, scale)
                if mask.mean() >= options.min_valid and mask.any():
                    images.append(image)
                    valid.append(mask)
    if not images:
        raise AerialsegError(f"no window of the target scene(s) holds {options.min_valid:.0%} valid pixels",
                             scenes[0], "give scenes with data (check their nodata value) or lower adapt.min_valid")
    log.info("adapt: %d target windows of %d px from %d scene(s)", len(images), size, len(scenes))
    return TargetWindows(np.stack(images), np.stack(valid))


# --- the methods -----------------------------------------------------------------------------------

def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of a model (timm's BatchNormAct2d included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


class Normalise:
    """uint8 (N, C, T, T) numpy -> the model's float input on a device: (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, torch.float32)
        return (x / 255.0 - self.mean) / self.std


def batches(count: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


@torch.no_grad()
def adabn(model: nn.Module, windows: TargetWindows, norm: Normalise, batch: int) -> int:
    """Re-estimate every BatchNorm layer's running statistics on the windows (cumulative average); only the
    statistics change. Returns the number of BN layers."""
    layers = bn_layers(model)
    if not layers:
        raise AerialsegError("the model has no BatchNorm layer: AdaBN has no statistics to re-estimate",
                             fix="use --method tent or self")
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every window weighs the same
        m.train()
    for part in batches(len(windows), batch):
        logits_of(model, norm(windows.images[part]))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.eval()
    return len(layers)


def masked_entropy(logits: torch.Tensor, valid: torch.Tensor, keep: list[int] | None) -> torch.Tensor:
    """Mean per-pixel entropy of the softmax over the valid pixels (over the ``keep`` classes when given)."""
    if keep is not None:
        logits = logits[:, keep]
    logp = F.log_softmax(logits.float(), dim=1)
    entropy = -(logp.exp() * logp).sum(1)
    return (entropy * valid).sum() / valid.sum().clamp(min=1)


def tent(model: nn.Module, windows: TargetWindows, norm: Normalise, options: AdaptOptions,
         keep: list[int] | None = None) -> list[float]:
    """Entropy minimisation updating only BatchNorm weight and bias (statistics fixed); returns the losses."""
    params = [p for m in bn_layers(model) for p in (m.weight, m.bias) if p is not None]
    if not params:
        raise AerialsegError("the model has no BatchNorm affine parameters: TENT has nothing to update",
                             fix="use --method self")
    model.eval()
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=options.tent_lr)
    rng, losses = np.random.default_rng(options.seed), []
    try:
        for _ in range(options.tent_steps):
            pick = rng.choice(len(windows), min(options.batch, len(windows)), replace=False)
            valid = torch.from_numpy(windows.valid[pick]).to(norm.device, torch.float32)
            loss = masked_entropy(logits_of(model, norm(windows.images[pick])), valid, keep)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(round(float(loss.detach()), 6))
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return losses


@torch.no_grad()
def pseudo_labels(model: nn.Module, windows: TargetWindows, norm: Normalise, options: AdaptOptions,
                  keep: list[int] | None = None) -> np.ndarray:
    """uint8 (N, T, T) labels of the model where its top probability reaches the threshold, else ignore."""
    model.eval()
    out = np.full(windows.valid.shape, IGNORE, dtype=np.uint8)
    for part in batches(len(windows), options.batch):
        logits = logits_of(model, norm(windows.images[part])).float()
        if keep is not None:
            drop = [c for c in range(logits.shape[1]) if c not in keep]
            logits[:, drop] = float("-inf")
        conf, label = torch.softmax(logits, dim=1).max(dim=1)
        label[(conf < options.threshold) | ~torch.from_numpy(windows.valid[part]).to(label.device)] = IGNORE
        out[part] = label.cpu().numpy().astype(np.uint8)
    return out


def self_train(model: nn.Module, windows: TargetWindows, norm: Normalise, options: AdaptOptions,
               keep: list[int] | None = None) -> list[dict[str, float]]:
    """Rounds of pseudo-labelling (the current model as teacher) and fine-tuning on the confident pixels."""
    rng, rounds = np.random.default_rng(options.seed), []
    for _ in range(options.self_rounds):
        labels = pseudo_labels(model, windows, norm, options, keep)
        kept = float((labels != IGNORE).sum() / max(int(windows.valid.sum()), 1))
        if kept == 0.0:
            log.warning("adapt self: no pixel reaches threshold %.2f; stopping", options.threshold)
            break
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.self_lr, weight_decay=0.0)
        model.eval()  # BatchNorm statistics fixed; the weights learn
        losses = []
        for _ in range(options.self_steps):
            pick = rng.choice(len(windows), min(options.batch, len(windows)), replace=False)
            x, y = norm(windows.images[pick]), torch.from_numpy(labels[pick]).to(norm.device, torch.long)
            dims = [d for d, flip in ((-1, rng.random() < 0.5), (-2, rng.random() < 0.5)) if flip]
            if dims:
                x, y = x.flip(dims), y.flip(dims)
            loss = F.cross_entropy(logits_of(model, x).float(), y, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        rounds.append({"kept_fraction": round(kept, 4), "mean_loss": round(float(np.mean(losses)), 6)})
    model.eval()
    return rounds


def adapt_model(model: nn.Module, windows: TargetWindows, norm: Normalise, options: AdaptOptions,
                keep: list[int] | None = None) -> dict[str, Any]:
    """Apply ``options.method``'s steps in order; returns what each did."""
    done: dict[str, Any] = {}
    for method in options.methods():
        start = time.perf_counter()
        if method == "adabn":
            result: Any = {"bn_layers": adabn(model, windows, norm, options.batch)}
        elif method == "tent":
            losses = tent(model, windows, norm, options, keep)
            result = {"entropy_first": losses[0] if losses else None, "entropy_last": losses[-1] if losses else None}
        else:
            result = {"rounds": self_train(model, windows, norm, options, keep)}
        done[method] = {**result, "seconds": round(time.perf_counter() - start, 2)}
    return done


# --- the adapted bundle ----------------------------------------------------------------------------

def check_paths(model: Path, scenes: Sequence[Path], out: Path) -> None:
    """Refuse an output that is (or lies inside) the input model or a scene, and scenes that are not files."""
    fix = "pass another --out: adapt writes a new bundle and never replaces its input"
    refuse_inputs([out], [model, *scenes], fix)
    if model.is_dir() and model.resolve() in out.resolve().parents:
        raise AerialsegError("output lies inside the input model folder", out, fix)
    if not scenes:
        raise AerialsegError("no target scene given", fix="name the unlabelled scenes to adapt to")


def window_size(bundle: Bundle, options: AdaptOptions) -> int:
    multiple = int(bundle.manifest.get("pad_multiple") or 32)
    return max(multiple, (min(options.window, bundle.tile_size) // multiple) * multiple)


def adapt_bundle(model: str | Path, scenes: Sequence[str | Path], out: str | Path, options: AdaptOptions,
                 export: Callable[[Path], object] | None = None) -> dict[str, Any]:
    """Adapt a bundle / model dir to the scenes and write the result as a new verified bundle at ``out`` (a
    .zip when ``out`` ends in .zip); ``export`` adds the ONNX files (the stage passes the exporter)."""
    options.check()
    model, out, scenes = Path(model), Path(out), [Path(s) for s in scenes]
    check_paths(model, scenes, out)
    start = time.perf_counter()
    records = [{"path": str(s), "sha256": _scene_hash(s)} for s in scenes]
    with open_model(model) as bundle:
        device = resolve_device(options.device)
        net = bundle.load_torch().to(device)
        windows = read_target_windows(scenes, options, window_size(bundle, options), bundle.band_policy,
                                      bundle.gsd_m)
        done = adapt_model(net, windows, Normalise(bundle.mean, bundle.std, device), options, bundle.labelled_ids)
        adapted = {"method": options.method, "steps": done, "scenes": records, "windows": len(windows),
                   "params": asdict(options), "seconds": round(time.perf_counter() - start, 2),
                   "source": {"path": str(model), "data_hash": bundle.manifest.get("data_hash")}}
        written = write_adapted(net.cpu(), bundle, adapted, out, export)
    log.info("adapt %s: %s on %d windows in %.1f s -> %s", options.method, model, len(windows),
             adapted["seconds"], written)
    return {**adapted, "bundle": str(written)}


def write_adapted(net: nn.Module, bundle: Bundle, adapted: dict[str, Any], out: Path,
                  export: Callable[[Path], object] | None) -> Path:
    """The adapted weights with the input's model.json + ``adapted``, bundled at ``out`` like the input (tile
    size, overlap, GSD) through inference.bundle.assemble_bundle (checksums; ``export`` adds the ONNX files)."""
    meta = json.loads((bundle.root / "model.json").read_text(encoding="utf-8"))
    with temp_dir(out.parent, "adapt") as stage:
        save_model(net, stage, meta["name"], int(meta["classes"]), int(meta["in_channels"]), meta.get("kwargs") or {})
        write_json(stage / "model.json", {**meta, "adapted": adapted})
        return assemble_bundle(stage, out, bundle.tile_size, bundle.overlap, bundle.gsd_m,
                               archive=out.suffix == ".zip", export=export)


def _scene_hash(scene: Path) -> str:
    with open_raster(scene):  # a missing file or a non-raster is one clear error before any work
        pass
    return sha256_file(scene)
