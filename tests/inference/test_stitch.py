"""Stitching is exact: weights form a partition of unity, identity models reproduce their input, and a
fully convolutional model whose receptive field fits in the margin reproduces the whole-image result."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from aerialseg.inference.predictor import Predictor
from aerialseg.geo.windows import window_starts
from aerialseg.inference.stitch import BandAccumulator, axis_weights, blend_scene, pad_reflect


def _stitch(image: np.ndarray, predict, channels: int, tile: int, overlap: int, margin: int,
            batch: int = 3) -> np.ndarray:
    """Run blend_scene over an in-memory (B, H, W) image and reassemble the bands."""
    _, height, width = image.shape
    out = np.full((channels, height, width), np.nan, dtype=np.float32)
    next_row = 0
    for top, band in blend_scene(lambda r, n: image[:, r:r + n], height, width, predict, channels, tile,
                                 overlap, margin, batch):
        assert top == next_row, "bands must come out in order, without gaps or repeats"
        out[:, top:top + band.shape[1]] = band
        next_row = top + band.shape[1]
    assert next_row == height
    return out


def test_window_starts_cover_the_axis_and_end_on_the_edge():
    for length, tile, overlap in [(100, 32, 8), (32, 32, 8), (33, 32, 0), (1000, 256, 64), (10, 32, 8)]:
        starts = window_starts(length, tile, overlap)
        assert starts[0] == 0
        assert starts[-1] == max(length - tile, 0)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        window_starts(100, 32, 32)


@pytest.mark.parametrize("length,tile,overlap,margin", [
    (100, 32, 8, 2), (101, 32, 31, 5), (64, 32, 0, 0), (70, 32, 16, 16), (1000, 256, 64, 16),
    (33, 32, 1, 0), (20, 32, 8, 2), (500, 64, 50, 0),
])
def test_axis_weights_are_a_partition_of_unity(length, tile, overlap, margin):
    starts = window_starts(length, tile, overlap)
    weights = axis_weights(length, tile, starts, margin)
    total = np.zeros(max(length, tile))
    for start, w in zip(starts, weights):
        total[start:start + tile] += w
    assert np.all(weights >= 0)
    np.testing.assert_allclose(total[:length], 1.0, atol=1e-12)
    assert weights[0, 0] == 1.0 and weights[-1, min(length, tile) - 1] == 1.0  # full weight at scene edges


def test_inner_margins_get_zero_weight():
    starts = window_starts(200, 64, 24)
    weights = axis_weights(200, 64, starts, margin=5)
    for i in range(1, len(starts)):
        assert np.all(weights[i, :5] == 0), "a tile must not vote on its first margin px inside the scene"
        assert np.all(weights[i - 1, -5:] == 0)
    ramp = weights[1, :starts[0] + 64 - starts[1]]
    assert np.all(np.diff(ramp) >= 0) and 0 < ramp[12] < 1  # tapered inside the overlap


@pytest.mark.parametrize("shape,tile,overlap", [
    ((3, 37, 53), 16, 5),  # odd, non-square
    ((3, 64, 64), 32, 8),  # exact multiples
    ((3, 10, 7), 16, 4),  # smaller than one tile: reflect-padded, never dropped
    ((3, 1, 40), 16, 4),  # one row
    ((3, 90, 17), 16, 15),  # overlap close to the tile: three tiles overlap
])
def test_identity_model_reconstructs_input(shape, tile, overlap):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = _stitch(image, lambda tiles: tiles.astype(np.float32), 3, tile, overlap, margin=overlap // 4)
    np.testing.assert_allclose(out, image.astype(np.float32), atol=1e-4)


def test_identity_through_the_torch_predictor_with_tta():
    image = np.random.default_rng(1).integers(0, 256, size=(3, 45, 29), dtype=np.uint8)
    predict = Predictor(lambda x: x, [0.0] * 3, [1 / 255.0] * 3, torch.device("cpu"), tta=True,
                             activation="none")
    out = _stitch(image, predict, 3, 16, 6, margin=1)
    np.testing.assert_allclose(out, image.astype(np.float32), atol=1e-3)


def _toy_fcn(seed: int = 0) -> nn.Module:
    """Three 3x3 convs: receptive field radius 3 px; zero padding like the real models."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.mark.parametrize("shape,tile,overlap", [((3, 67, 45), 32, 12), ((3, 40, 100), 24, 10),
                                                ((3, 33, 33), 32, 8)])
def test_stitched_equals_whole_image_when_receptive_field_fits(shape, tile, overlap):
    model = _toy_fcn()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    predict = Predictor(model, mean, std, torch.device("cpu"))
    image = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    whole = predict(image[None])[0]
    stitched = _stitch(image, predict, 4, tile, overlap, margin=3)
    np.testing.assert_allclose(stitched, whole, atol=1e-5)
    # the same tiles without a margin let tile borders vote: the test can tell the difference
    seamy = _stitch(image, predict, 4, tile, overlap, margin=0)
    assert np.abs(seamy - whole).max() > 1e-4


def test_accumulator_is_one_band_whatever_the_height():
    reads = []

    def read_rows(row: int, rows: int) -> np.ndarray:
        reads.append((row, rows))
        return np.zeros((1, rows, 50), dtype=np.uint8)

    shapes = set()
    for _, band in blend_scene(read_rows, 1000, 50, lambda t: t.astype(np.float32), 1, 32, 8):
        shapes.add(band.shape[1] <= 32)
    assert shapes == {True}
    assert len(reads) == len(window_starts(1000, 32, 8)) and all(n == 32 for _, n in reads)
    acc = BandAccumulator(5, 32, 50)
    assert acc.sum.shape == (5, 32, 50)


def test_pad_reflect_handles_tiny_and_exact_sizes():
    stripe = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    padded = pad_reflect(stripe, 8, 8)
    assert padded.shape == (1, 8, 8)
    np.testing.assert_array_equal(padded[:, :2, :3], stripe)
    assert pad_reflect(stripe, 2, 3) is stripe
    assert pad_reflect(np.ones((2, 1, 1), np.uint8), 4, 4).shape == (2, 4, 4)


def test_weights_sum_to_one_in_2d():
    height, width, tile, overlap = 75, 58, 24, 9
    rows, cols = window_starts(height, tile, overlap), window_starts(width, tile, overlap)
    wy, wx = axis_weights(height, tile, rows, 2), axis_weights(width, tile, cols, 2)
    total = np.zeros((height + tile, width + tile))
    for (iy, r), (ix, c) in itertools.product(enumerate(rows), enumerate(cols)):
        total[r:r + tile, c:c + tile] += wy[iy][:, None] * wx[ix][None, :]
    np.testing.assert_allclose(total[:height, :width], 1.0, atol=1e-12)


@pytest.mark.parametrize("shape, tile, expected", [((200, 180), 512, 224), ((256, 256), 512, 256),
                                                   ((700, 300), 512, 512)])
def test_a_scene_smaller_than_the_tile_is_not_padded_to_it(shape, tile, expected):
    seen = []

    def identity(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape[-1])
        return batch.astype(np.float32)

    image = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    bands = [band.copy() for _, band in blend_scene(lambda r, n: image[:, r:r + n], *shape, identity, 3, tile, 64)]
    assert set(seen) == {expected}  # a 256 px scene under a 512 px bundle: 1x its pixels, not 4x
    np.testing.assert_allclose(np.concatenate(bands, axis=1), image, atol=1e-6)
