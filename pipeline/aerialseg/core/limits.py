"""Caps on every size a user's file can blow up to, checked before anything is allocated or extracted.

One check, ``check_size``, for all of them; it raises ``TooLarge`` (an AerialsegError: one line naming the file
and the knob to change). The CLI prints it, serve answers it with 413. The sizes:

- decoded image pixels (``check_pixels``): read from the image header (label-to-mask's imageData and mask
  bitmaps: ``masks.max_image_pixels``; serve's uploads: ``serve.max_megapixels``);
- the grid a scene is read on at the training GSD (``check_grid``: infer-scene and rank-scenes
  ``infer.max_grid_megapixels``, serve ``serve.max_megapixels``): a scene with 1000 m pixels read at 0.1 m would
  be a grid of 10^12 pixels;
- a .zip bundle's members (``check_zip``): their count and the sum of their uncompressed sizes, from the
  archive's directory before anything is extracted (``$AERIALSEG_MAX_BUNDLE_MB``), and the free space where
  they would go.
"""

import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from aerialseg.core.errors import AerialsegError

MAX_GRID_MEGAPIXELS = 4000.0  # infer.max_grid_megapixels default: a 63,000 x 63,000 px grid
MAX_BUNDLE_MB_ENV = "AERIALSEG_MAX_BUNDLE_MB"
MAX_BUNDLE_MB = 4096.0  # uncompressed bundle members
MAX_ZIP_MEMBERS = 256  # a bundle holds five files


class TooLarge(AerialsegError):
    """A size above its cap (serve: HTTP 413)."""


def _amount(value: float, unit: str) -> str:
    if unit == "px":
        return f"{value / 1e6:,.1f} MPix"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:,.0f} {unit}"


def check_size(amount: float, limit: float, path: str | Path | None, what: str, unit: str, knob: str,
               fix: str | None = None) -> None:
    """Raise TooLarge when ``amount`` exceeds ``limit`` (both in ``unit``: px, bytes or a count); the fix names
    ``knob`` unless given."""
    if amount > limit:
        raise TooLarge(f"{what} is {_amount(amount, unit)}, above the cap of {_amount(limit, unit)}", path,
                       fix or f"raise {knob} if this is intended")


def check_pixels(width: int, height: int, limit: float, path: str | Path | None, what: str, knob: str,
                 fix: str | None = None) -> None:
    """A decoded image of width x height pixels (from its header) must stay within ``limit`` pixels."""
    check_size(int(width) * int(height), limit, path, f"{what} ({width}x{height} px)", "px", knob, fix)


def check_grid(width: int, height: int, scale: float, limit: float, path: str | Path | None, knob: str) -> None:
    """The grid a width x height scene becomes at ``scale`` model px per scene px must stay within ``limit`` px."""
    grid_w, grid_h = max(1, int(width * scale)), max(1, int(height * scale))
    what = f"read at the training GSD ({scale:.3g}x), the scene's grid ({grid_w:,}x{grid_h:,} px)"
    check_size(grid_w * grid_h, limit, path, what, "px", knob)


def bundle_limit_bytes() -> float:
    """The cap on a .zip bundle's uncompressed members ($AERIALSEG_MAX_BUNDLE_MB, else MAX_BUNDLE_MB)."""
    raw = os.environ.get(MAX_BUNDLE_MB_ENV, "").strip()
    try:
        value = float(raw) if raw else MAX_BUNDLE_MB
    except ValueError:
        value = -1.0
    if not value > 0:
        raise AerialsegError(f"${MAX_BUNDLE_MB_ENV} must be a positive number of MiB, got {raw!r}",
                             fix=f"unset it or set it to e.g. {MAX_BUNDLE_MB:g}")
    return value * 2**20


def check_zip(path: Path, zf: zipfile.ZipFile, members: Sequence[zipfile.ZipInfo], dest: Path) -> None:
    """Before extracting ``members`` of the archive at ``path`` into ``dest``: the archive's member count, their
    uncompressed sizes (sum) and the free space in dest."""
    count = len(zf.infolist())
    if count > MAX_ZIP_MEMBERS:
        raise TooLarge(f"archive holds {count:,} members, above the limit of {MAX_ZIP_MEMBERS} (a bundle holds five "
                       "files)", path, "rebuild the bundle with `aerialseg bundle --zip`")
    total = sum(info.file_size for info in members)
    check_size(total, bundle_limit_bytes(), path, "the bundle's uncompressed size", "bytes", f"${MAX_BUNDLE_MB_ENV}")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise TooLarge(f"the bundle unpacks to {_amount(total, 'bytes')}, more than the {_amount(free, 'bytes')} "
                       f"free in {dest}", path, "free disk space there, or set TMPDIR to a disk with room")
