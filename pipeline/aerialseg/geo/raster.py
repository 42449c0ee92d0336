"""Raster helpers shared by the stages: open scenes safely, valid-data masks, atomic GeoTIFF writes."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Interleaving
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.windows import Window

from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import atomic_path

CORRUPT_FIX = "re-export the file; it is corrupt or truncated"


@contextmanager
def open_raster(path: str | Path, check_complete: bool = True) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading; a missing, unreadable, corrupt or truncated file is one clear AerialsegError.

    ``check_complete``: a TIFF whose image blocks reach past the end of the file, a PNG without its IEND
    chunk or a JPEG without its end marker is refused before any pixel is read (GDAL would otherwise read
    zeros or garbage with only a warning).
    """
    path = Path(path)
    if path.is_dir():
        raise AerialsegError("is a folder, a raster file was expected", path, "give the path of the image file")
    if not path.is_file():
        raise AerialsegError("file not found", path, "check the path")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise AerialsegError(f"cannot read ({exc.strerror})", path, "check the file permissions") from None
    if check_complete:
        _check_trailer(path, head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise AerialsegError(f"cannot read raster ({str(exc).splitlines()[0][:120]})", path,
                             "re-export the file; it is corrupt or not a raster") from None
    with ds:
        if check_complete and ds.driver == "GTiff":
            _check_tiff_blocks(ds, path)
        yield ds


def _check_trailer(path: Path, head: bytes) -> None:
    """PNG and JPEG files end with a fixed marker; a file cut short lacks it."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 1024))
        tail = fh.read()
    check_trailer(head, tail, path)


def check_trailer(head: bytes, tail: bytes, path: str | Path) -> None:
    """Refuse a PNG without its IEND chunk or a JPEG without its end marker (``head``: the first 16 bytes,
    ``tail``: the last 1024)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" not in tail[-12:]:
        raise AerialsegError("PNG is truncated (no IEND chunk at its end)", path, CORRUPT_FIX)
    if head.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in tail:
        raise AerialsegError("JPEG is truncated (no end-of-image marker)", path, CORRUPT_FIX)


@contextmanager
def open_encoded(raw: bytes, shown: str, drivers: list[str]) -> Iterator[rasterio.DatasetReader]:
    """``open_raster`` for an image held in memory (serve's uploads): the same completeness checks (PNG/JPEG
    end markers, TIFF blocks inside the data) before any pixel is read; ``shown`` names it in errors."""
    check_trailer(raw[:16], raw[-1024:], shown)
    with MemoryFile(raw) as memfile, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            ds = memfile.open(driver=drivers)
        except RasterioError:
            raise AerialsegError("not a readable image", shown, "send a PNG, JPEG, WEBP, BMP or TIFF image") from None
        with ds:
            if ds.driver == "GTiff":
                _check_tiff_blocks(ds, shown, len(raw))
            yield ds


def _check_tiff_blocks(ds: rasterio.DatasetReader, path: str | Path, size: int | None = None) -> None:
    """Every image block of a TIFF must lie inside the file (GDAL's TIFF metadata: block offsets/sizes)."""
    size = Path(path).stat().st_size if size is None else size
    block_h, block_w = ds.block_shapes[0]
    rows, cols = -(-ds.height // block_h), -(-ds.width // block_w)
    bands = range(1, ds.count + 1) if ds.interleaving != Interleaving.pixel else (1,)
    for band in bands:
        for y in range(rows):
            for x in range(cols):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
                if offset is None:
                    return  # not a plain TIFF GDAL can describe: nothing to check
                length = ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
                if int(offset) and int(offset) + int(length or 0) > size:
                    raise AerialsegError(f"TIFF is truncated: block row {y} col {x} of band {band} lies past the "
                                         f"end of the file ({size} bytes)", path, CORRUPT_FIX)


def is_georeferenced(ds: rasterio.DatasetReader) -> bool:
    """True when the raster carries a CRS and a non-identity geotransform."""
    return ds.crs is not None and not ds.transform.is_identity


def valid_mask(ds: rasterio.DatasetReader, window: Window | None = None) -> np.ndarray:
    """Boolean (H, W) valid-data mask of a window: False where nodata or alpha-transparent."""
    with np.errstate(all="ignore"):
        mask = ds.dataset_mask(window=window)
    return mask > 0


def pixel_area_m2(ds: rasterio.DatasetReader) -> float | None:
    """True ground area in m² of the scene's centre pixel in any CRS (geo.areas), None when not georeferenced."""
    from aerialseg.geo.areas import centre_pixel_area_m2  # pyproj only when a ground area is asked for

    if not is_georeferenced(ds) or not (ds.crs.is_projected or ds.crs.is_geographic):
        return None
    return centre_pixel_area_m2(ds.crs, ds.transform, ds.width, ds.height)


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


def temp_profile(ds: rasterio.DatasetReader, nodata: int, blocksize: int) -> dict[str, Any]:
    """Tiled deflate (level 1) uint8 profile on the scene's grid for the stripe temp files."""
    return {"driver": "GTiff", "width": ds.width, "height": ds.height, "count": 1, "dtype": "uint8",
            "crs": ds.crs, "transform": ds.transform, "nodata": nodata, "tiled": True,
            "blockxsize": blocksize, "blockysize": blocksize, "compress": "deflate", "zlevel": 1,
            "bigtiff": "if_safer"}


class RowWriter:
    """Writes consecutive full-width rows into band 1 of a tiled GeoTIFF, whole block rows at a time."""

    def __init__(self, dst: rasterio.io.DatasetWriter, block_rows: int):
        self.dst, self.block_rows = dst, block_rows
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.next_row = 0

    def write(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        if self.pending_rows >= self.block_rows:
            self._flush(self.pending_rows - self.pending_rows % self.block_rows)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, count: int) -> None:
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.dst.write(data[:count], 1, window=Window(0, self.next_row, self.dst.width, count))
        self.next_row += count
        rest = data[count:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
