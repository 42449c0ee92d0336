"""How QGIS Deepness 0.6.5 reads and runs a segmentation ONNX, re-implemented for the tests.

Written from reading PUTvision/qgis-plugin-deepness at 0.6.5 (the current release): metadata parsing in
``processing/models/model_base.py``; output handling in ``processing/models/segmentor.py``; what "Load default
parameters" changes in ``deepness_dockwidget.py``; the UI defaults in ``common/config_entry_key.py``; overlap in
pixels in ``common/processing_overlap.py``; pre-processing in ``processing/models/preprocessing_utils.py``; the
per-pixel class rule and the median filter in ``processing/map_processor/map_processor_segmentation.py``.

Only numpy and the standard library: the module also runs inside the throwaway onnxruntime 1.17 venv.
"""

import ast
import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

MODEL_TYPES = ("Segmentor", "Regressor", "Detector", "Superresolution", "Recognition")


@dataclass(frozen=True)
class Settings:
    """The dock widget's state that matters for a segmentation run."""

    model_type: str | None
    class_names: list[list[str]] | None
    mean: np.ndarray
    std: np.ndarray
    tile_size: int                 # the model input's size; "Load default parameters" sets metadata tile_size
    batch_size: int | None         # None: dynamic batch, the user's choice
    resolution_cm: float = 3.0     # UI defaults until "Load default parameters" is clicked
    overlap_percent: int = 15
    threshold_enabled: bool = True
    threshold: float = 0.5
    small_segment_enabled: bool = True
    small_segment: int = 9


def _value(meta: dict[str, str], key: str) -> Any:
    """Deepness's metadata getters: json.loads of the value, None when the key is absent."""
    return json.loads(meta[key]) if key in meta else None


def parse_class_names(meta: dict[str, str]) -> list[list[str]] | None:
    """'class_names' (or legacy 'names'): JSON, else a Python literal; one dict per output; ids 0..K-1."""
    for key in ("class_names", "names"):
        if key not in meta:
            continue
        try:
            names = json.loads(meta[key])
        except json.JSONDecodeError:
            names = ast.literal_eval(meta[key])
        per_output = [names] if isinstance(names, dict) else names
        result = []
        for mapping in per_output:
            pairs = sorted(mapping.items(), key=lambda kv: int(kv[0]))
            if [int(k) for k, _ in pairs] != list(range(len(pairs))):
                raise ValueError("class ids are not consecutive from 0")
            result.append([str(v) for _, v in pairs])
        return result
    return None


def load_model(meta: dict[str, str], input_shape: list[Any]) -> Settings:
    """What the dock shows right after the model file is loaded (before "Load default parameters")."""
    channels = int(input_shape[-3])
    mean, std = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    if "standardization_mean" in meta and "standardization_std" in meta:
        mean = np.array([float(v) for v in _value(meta, "standardization_mean")], dtype=np.float32)
        std = np.array([float(v) for v in _value(meta, "standardization_std")], dtype=np.float32)
    model_type, batch = _value(meta, "model_type"), input_shape[0]
    return Settings(model_type=None if model_type is None else str(model_type).capitalize(),
                    class_names=parse_class_names(meta), mean=mean, std=std, tile_size=int(input_shape[-1]),
                    batch_size=None if isinstance(batch, str) or batch is None else int(batch))


def load_default_parameters(settings: Settings, meta: dict[str, str]) -> Settings:
    """The "Load default parameters" button: each key present overrides its widget."""
    changes: dict[str, Any] = {}
    if (value := _value(meta, "resolution")) is not None:
        changes["resolution_cm"] = float(value)
    if (value := _value(meta, "tile_size")) is not None:  # Deepness reads tile_size, not the documented tiles_size
        changes["tile_size"] = int(value)
    if (value := _value(meta, "tiles_overlap")) is not None:
        changes["overlap_percent"] = int(value)
    if (value := _value(meta, "seg_thresh")) is not None:
        changes.update(threshold_enabled=float(value) != 0, threshold=float(value))
    if (value := _value(meta, "seg_small_segment")) is not None:
        changes.update(small_segment_enabled=int(value) != 0, small_segment=int(value))
    return replace(settings, **changes)


def output_channels(output_shape: list[Any]) -> int:
    """Classes of one output: 1-channel (or 3-D) outputs are sigmoid masks, read as 2 classes."""
    return 2 if len(output_shape) == 3 or output_shape[-3] == 1 else int(output_shape[-3])


def overlap_px(tile_size: int, percent: float) -> int:
    """Tile overlap in pixels for an overlap given in percent (always even)."""
    return int(tile_size * percent / 100 * 2) // 2


def median_kernel(settings: Settings) -> int:
    """Kernel of the median filter run on the class map (1 = no change)."""
    size = settings.small_segment if settings.small_segment_enabled else 0
    return int(size // 2) * 2 + 1


def preprocess(tiles: np.ndarray, settings: Settings) -> np.ndarray:
    """uint8 (N, H, W, C) tiles -> float32 (N, C, H, W) model input."""
    x = np.float32(tiles[..., : len(settings.mean)] * 1.0 / 255.0)
    return np.transpose((x - settings.mean) / settings.std, (0, 3, 1, 2))


def class_map(output: np.ndarray, settings: Settings) -> np.ndarray:
    """(N, K, H, W) model output -> (N, H, W) class ids: values under the threshold zeroed, then argmax."""
    gated = output.copy()
    gated[gated < (settings.threshold if settings.threshold_enabled else 0)] = 0.0
    return gated.argmax(axis=1)
