"""The one scene reader: how an orthophoto's bands become the model's 8-bit channels.

Tiling, training, evaluation, infer-scene and serving all read scenes through ``SceneReader``, so a
scene the model was trained on is read the same way when it is mapped. The policy:

- bands: the first ``channels`` colour bands (alpha is never a channel); a palette band is expanded
  to RGB; a single grey band is repeated;
- dtype: 8-bit scenes are read as they are; other dtypes need a declared ``value_range`` [lo, hi]
  that is scaled linearly onto 0..255 (clipped), else they are refused: a uint16 or float scene read
  unscaled maps nonsense;
- validity: nodata, alpha = 0 and NaN pixels are invalid (ignore in masks, nodata in maps).
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from aerialseg.core.errors import AerialsegError
from aerialseg.geo.raster import pixel_area_m2, valid_mask


@dataclass(frozen=True)
class BandPolicy:
    """Declared reading rule (recorded in model bundles): channel count and optional value range."""

    channels: int = 3
    value_range: tuple[float, float] | None = None  # scene values mapped onto 0..255 (non-8-bit scenes)

    def to_json(self) -> dict:
        return {"channels": self.channels, "value_range": list(self.value_range) if self.value_range else None}

    @classmethod
    def from_json(cls, record: dict | None) -> "BandPolicy":
        record = record or {}
        vr = record.get("value_range")
        return cls(int(record.get("channels", 3)), (float(vr[0]), float(vr[1])) if vr else None)


def window_label(window: Window) -> str:
    return f"row {int(window.row_off)} col {int(window.col_off)} {int(window.height)}x{int(window.width)}"


class SceneReader:
    """Windows of a scene as (C, H, W) uint8 model channels, and its valid-data mask."""

    def __init__(self, ds: rasterio.DatasetReader, path: str | Path, policy: BandPolicy = BandPolicy()):
        self.ds, self.path, self.policy = ds, Path(path), policy
        self.palette = ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette
        colour = [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]
        if self.palette:
            self.bands = [1]
        elif len(colour) >= policy.channels:
            self.bands = colour[: policy.channels]
        elif len(colour) == 1:
            self.bands = colour * policy.channels
        else:
            raise AerialsegError(f"scene has {len(colour)} image band(s), the model reads {policy.channels}",
                                 self.path, f"give a {policy.channels}-band (or grey / palette) scene")
        self.scale = self._scale()

    def _scale(self) -> tuple[float, float] | None:
        dtype = self.ds.dtypes[0]
        if dtype == "uint8" and self.policy.value_range is None:
            return None
        if self.policy.value_range is None:
            raise AerialsegError(f"scene is {dtype}; aerialseg models read 8-bit images", self.path,
                                 "convert it (gdal_translate -ot Byte -scale in.tif out.tif) or declare "
                                 "its value range (data.value_range / bundle band_policy)")
        lo, hi = self.policy.value_range
        if not hi > lo:
            raise AerialsegError(f"value_range {list(self.policy.value_range)} is empty", self.path,
                                 "give [low, high] with high > low")
        return lo, 255.0 / (hi - lo)

    @property
    def width(self) -> int:
        return self.ds.width

    @property
    def height(self) -> int:
        return self.ds.height

    def read(self, window: Window | None = None, out_shape: tuple[int, int] | None = None,
             resampling: Resampling = Resampling.nearest) -> np.ndarray:
        """(C, H, W) uint8 channels of a window (resampled to ``out_shape`` when given)."""
        shape = None if out_shape is None else (len(self.bands), *out_shape)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                data = self.ds.read(self.bands, window=window, out_shape=shape, resampling=resampling)
        except RasterioError as exc:
            where = window_label(window) if window is not None else "the scene"
            raise AerialsegError(f"cannot read {where} ({str(exc)[:100]})", self.path,
                                 "re-export the file; it is corrupt or truncated") from None
        if self.palette:
            table = np.zeros((256, 3), dtype=np.uint8)
            for value, rgba in self.ds.colormap(1).items():
                table[value] = rgba[:3]
            return np.ascontiguousarray(table[data[0]].transpose(2, 0, 1))
        if self.scale is None:
            return data
        lo, factor = self.scale
        scaled = (np.nan_to_num(data.astype(np.float32), nan=lo) - lo) * factor
        return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)

    def read_hwc(self, window: Window | None = None) -> np.ndarray:
        """(H, W, C) uint8 (the data path's image layout)."""
        return np.ascontiguousarray(self.read(window).transpose(1, 2, 0))

    def valid(self, window: Window | None = None) -> np.ndarray:
        """Boolean (H, W): False where nodata, alpha-transparent or NaN."""
        mask = valid_mask(self.ds, window)
        if np.dtype(self.ds.dtypes[0]).kind == "f":
            data = self.ds.read(self.bands if not self.palette else [1], window=window)
            mask &= ~np.isnan(data).any(axis=0)
        return mask

    @property
    def gsd_m(self) -> float | None:
        """Ground pixel size in metres (square root of the centre pixel's true ground area)."""
        return scene_gsd_m(self.ds)


def scene_gsd_m(ds: rasterio.DatasetReader) -> float | None:
    """Ground pixel size in metres at the scene's centre, in any CRS (geo.areas); None when not georeferenced."""
    area = pixel_area_m2(ds)
    return math.sqrt(area) if area else None
