"""Small real training data: 64 px patches of Dubai image parts (train ~10, val 4), for the training tests."""

import cv2
import numpy as np

from aerialseg.core.classes import IGNORE
from aerialseg.data.augment import build_transform
from aerialseg.data.datasets import ArrayPatchDataset
from conftest import shared_path
from helpers.dubai import DUBAI_COLORS

FAST = "pspnet_resnet18"  # 0.85 M parameters: the quickest registered model to train
AUGMENT = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomRotate90", "p": 0.5},
           {"name": "RandomBrightnessContrast", "p": 0.5, "brightness_limit": 0.15, "contrast_limit": 0.15}]



def dubai_part(tile: int, part: int, scale: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """One Dubai image part (RGB uint8) and its class mask, downscaled by ``scale``."""
    root = shared_path("dubai-aerial-cc0", f"tile_{tile}")
    image = cv2.cvtColor(cv2.imread(str(root / "images" / f"image_part_{part:03d}.jpg")), cv2.COLOR_BGR2RGB)
    colours = cv2.cvtColor(cv2.imread(str(root / "masks" / f"image_part_{part:03d}.png")), cv2.COLOR_BGR2RGB)
    mask = np.full(colours.shape[:2], IGNORE, np.uint8)
    for colour, cls in DUBAI_COLORS.items():
        mask[(colours == colour).all(-1)] = cls
    if scale != 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    return image, mask


def dubai_patches(parts: list[tuple[int, int]], size: int = 64, scale: float = 0.25) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping ``size`` crops of the given (tile, part)s."""
    out = []
    for tile, part in parts:
        image, mask = dubai_part(tile, part, scale)
        for y in range(0, image.shape[0] - size + 1, size):
            for x in range(0, image.shape[1] - size + 1, size):
                out.append((image[y:y + size, x:x + size].copy(), mask[y:y + size, x:x + size].copy()))
    return out


def small_datasets(augment: bool = False) -> tuple[ArrayPatchDataset, ArrayPatchDataset]:
    """~10 train and 4 val 64 px patches of real Dubai parts; optional on-the-fly augmentation."""
    transform = build_transform({"pipeline": AUGMENT}) if augment else None
    return (ArrayPatchDataset(dubai_patches([(1, 1), (2, 1)]), transform),
            ArrayPatchDataset(dubai_patches([(1, 5)])[:4]))
