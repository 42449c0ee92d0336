"""Raster helpers shared by the stages: open scenes safely, valid-data masks, atomic GeoTIFF writes."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path

@contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading; a missing or corrupt file becomes one clear AerialsegError."""
    path = Path(path)
    if not path.is_file():
        raise AerialsegError("file not found", path, "check the path")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise AerialsegError(f"cannot read raster ({str(exc).splitlines()[0][:120]})", path,
                             "re-export the file; it is corrupt or not a raster") from None
    with ds:
        yield ds


def is_georeferenced(ds: rasterio.DatasetReader) -> bool:
    """True when the raster carries a CRS and a non-identity geotransform."""
    return ds.crs is not None and not ds.transform.is_identity


def valid_mask(ds: rasterio.DatasetReader, window: Window | None = None) -> np.ndarray:
    """Boolean (H, W) valid-data mask of a window: False where nodata or alpha-transparent."""
    with np.errstate(all="ignore"):
        mask = ds.dataset_mask(window=window)
    return mask > 0


def pixel_area_m2(ds: rasterio.DatasetReader) -> float | None:
    """Ground area of one pixel in m², or None when not georeferenced or not in a projected CRS."""
    if not is_georeferenced(ds) or not ds.crs.is_projected:
        return None
    unit = ds.crs.linear_units_factor[1] if ds.crs.linear_units_factor else 1.0
    return abs(ds.transform.a * ds.transform.e - ds.transform.b * ds.transform.d) * unit * unit


def mask_profile(ds: rasterio.DatasetReader, **overrides: Any) -> dict[str, Any]:
    """Profile for a single-band uint8 class raster on ds's grid (tiled, deflate, nodata 255)."""
    profile = {
        "driver": "GTiff", "width": ds.width, "height": ds.height, "count": 1, "dtype": "uint8",
        "crs": ds.crs, "transform": ds.transform, "nodata": 255, "compress": "deflate",
        "tiled": True, "blockxsize": 256, "blockysize": 256,
    }
    if ds.width < 256 or ds.height < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize"), profile.pop("blockysize")
    profile.update(overrides)
    return profile


def write_class_geotiff(dest: str | Path, mask: np.ndarray, profile: dict[str, Any],
                        colormap: dict[int, tuple[int, int, int, int]] | None = None) -> Path:
    """Write a (H, W) uint8 class mask as a GeoTIFF atomically, with an optional colour table."""
    with atomic_path(dest) as tmp:
        with rasterio.open(tmp, "w", **profile) as out:
            if colormap:  # before the pixels, or GDAL complains about PhotometricInterpretation
                out.write_colormap(1, colormap)
            out.write(mask, 1)
    return Path(dest)
