"""Which scene a land-cover map was made from, so that two scenes of one file name never share a map.

infer-scene names its default output after the scene's file name (``<out_dir>/<stem>_landcover.tif``), and
every WebODM orthophoto is ``odm_orthophoto.tif``. The map carries the tag ``AERIALSEG_SCENE`` (a short hash of
the scene's resolved path); a run whose map path holds another scene's map is refused, naming the clash,
instead of replacing it. The same scene run again updates its map as before.
"""

import hashlib
import os
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError

from aerialseg.core.errors import AerialsegError

TAG = "AERIALSEG_SCENE"


def scene_key(scene: Path) -> str:
    """12 hex digits of the SHA-1 of the scene's resolved path."""
    return hashlib.sha1(os.fsencode(Path(scene).resolve())).hexdigest()[:12]


def stamp(raster: Path, scene: Path) -> None:
    """Tag a (plain GeoTIFF) raster with the scene it was made from; copies (COG) keep the tag. A raster that
    cannot be opened (e.g. cut short by a full disk) is left to the next step, whose error names the output."""
    try:
        with rasterio.open(raster, "r+") as ds:
            ds.update_tags(**{TAG: scene_key(scene)})
    except (RasterioError, TypeError):  # rasterio raises TypeError for a file it cannot recognise in r+ mode
        return


def check_owner(map_path: Path, scene: Path) -> None:
    """Refuse to replace a map that another scene (same file name, another folder) produced."""
    if not map_path.is_file():
        return
    try:
        with rasterio.open(map_path) as ds:
            owner = ds.tags().get(TAG)
    except RasterioError:
        return  # not a map we can read: the other output checks decide
    if owner and owner != scene_key(scene):
        raise AerialsegError(f"holds the map of another scene named {scene.name} (scene {owner}, this one "
                             f"{scene_key(scene)}); writing would replace it", map_path,
                             f"pass --out to give this scene's map its own name (e.g. --out "
                             f"{map_path.with_name(f'{scene.parent.name}_{map_path.name}')})")
