"""serve's class map of an uploaded image: read at the training GSD like infer-scene, then tiled for speed.

infer-scene's seam-free stitcher (``aerialseg.inference.stitch.blend_scene``) runs over the image with the
bundle's tile and blending margin, but with serve's own overlap (``serve.overlap``): 0 places only the tiles
the image size needs (a 1024 px image under 512 px tiles: 2 x 2 = 4 tiles, where the bundle's 64 px overlap
gives 3 x 3 = 9), and tiles still overlap, and blend, wherever the image is not a multiple of the tile.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from aerialseg.core.classes import IGNORE
from aerialseg.core.errors import AerialsegError
from aerialseg.core.limits import check_grid
from aerialseg.geo.raster import is_georeferenced
from aerialseg.geo.scene import SceneReader
from aerialseg.inference.bundle import Bundle
from aerialseg.inference.scene import Grid, InferOptions, make_reader, resample_scale
from aerialseg.inference.serve_limits import ApiError, too_large
from aerialseg.inference.stitch import Predict, blend_scene


class MapModel(Protocol):
    """What a served model needs to map an image (server.ServedModel)."""

    bundle: Bundle
    predict: Predict
    batch: int
    overlap: int | None  # px between tiles; None = the bundle's


def predict_array(model: MapModel, image: np.ndarray,
                  on_tiles: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, H, W) -> (classes uint8, confidence float32) (H, W): the stitcher over the image."""
    _, height, width = image.shape
    classes = np.empty((height, width), np.uint8)
    confidence = np.empty((height, width), np.float32)
    bundle = model.bundle
    overlap = bundle.overlap if model.overlap is None else min(int(model.overlap), bundle.tile_size - 1)
    for top, probs in blend_scene(lambda row, rows: image[:, row:row + rows], height, width, model.predict,
                                  bundle.num_classes, bundle.tile_size, overlap, bundle.overlap // 4,
                                  model.batch, on_tiles=on_tiles):
        rows = probs.shape[1]
        classes[top:top + rows] = probs.argmax(axis=0)
        probs.max(axis=0, out=confidence[top:top + rows])
    return classes, confidence


def predict_dataset(model: MapModel, ds: rasterio.DatasetReader, max_pixels: float,
                    on_tiles: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An opened image -> (classes, confidence) on its grid, read at the training GSD like infer-scene
    (at most ``max_pixels`` there); nodata/alpha pixels are IGNORE."""
    try:
        reader = SceneReader(ds, "image", model.bundle.band_policy)
    except AerialsegError as exc:  # band count, bit depth
        raise ApiError(422, "INVALID_IMAGE", str(exc).removeprefix("image: ")) from None
    scale = resample_scale(ds, model.bundle, InferOptions(), Path("image")) if is_georeferenced(ds) else 1.0
    grid = Grid(ds.height, ds.width, scale)
    too_large(check_grid, ds.width, ds.height, scale, max_pixels, "image", "serve.max_megapixels")
    try:
        pixels = make_reader(reader, grid)(0, grid.model_height)
        valid = reader.valid()
    except (AerialsegError, RasterioError):
        raise ApiError(400, "INVALID_IMAGE", "the image data is corrupt or truncated") from None
    classes, confidence = predict_array(model, pixels, on_tiles)
    if grid.scale != 1.0:
        rows = grid.model_index(ds.height, grid.model_height)[:, None]
        cols = grid.model_index(ds.width, grid.model_width)[None, :]
        classes, confidence = classes[rows, cols], confidence[rows, cols]
    classes[~valid] = IGNORE
    return classes, confidence
