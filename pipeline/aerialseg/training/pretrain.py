"""Pretraining on OpenEarthMap (remapped to the 5 aerialseg classes), then fine-tune with train.

The pretrain stage (``aerialseg.stages.pretrain``) reads the ``pretrain`` params and calls this module.

OpenEarthMap (Xia et al. 2023) ships ``images/`` and ``labels/`` GeoTIFFs per region (``<root>/<region>/
images/<name>.tif``) or in one folder (``<root>/images``); labels hold 0..8 and are remapped with
``aerialseg.core.classes.OEM_TO_AERIALSEG`` (4 road, 6 water, 5 tree, 8 building, 1/2/3/7 background,
0 unknown -> ignore); ``pretrain.classes`` overrides it by OpenEarthMap class name (``OEM_CLASSES``), e.g.
``{rangeland: tree, agriculture: tree}`` where a survey's "tree" labels cover all vegetation. When ``<root>/train.txt`` and ``val.txt`` exist (the official split) they choose
the images; otherwise ``pretrain.val_fraction`` of the pairs (by a hash of the name) validate.

Ground sampling distance: OpenEarthMap is 0.25-0.5 m per pixel, drone surveys are a few cm.
``pretrain.resample_factor`` f rescales OpenEarthMap before cropping (output GSD = OEM GSD / f; f = 2
turns 0.5 m into 0.25 m): images with area interpolation, labels with nearest neighbour. A patch of
``patch_size`` px is cut from a ``patch_size / f`` px source window, so memory does not grow with f.

With ``pretrain.enabled: auto`` pretraining runs when ``pretrain.root`` holds OpenEarthMap
``images/`` (the GPU profile). With ``pretrain.enabled: false`` (the default: the embedded sample has no OpenEarthMap data and the
OpenEarthMap labels are CC BY-NC-SA, so none ship with aerialseg) the stage writes only
``pretrain.json`` saying so, and ``train.init_from`` pointing at that folder starts from the default
initialisation.
"""

import hashlib
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rasterio.windows import Window
from torch.utils.data import Dataset

from aerialseg.annotations.anylabeling import class_id
from aerialseg.core.classes import OEM_TO_AERIALSEG, lut
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.geo.raster import open_raster
from aerialseg.training.pretrain_switch import pretrain_enabled, write_disabled  # noqa: F401  (re-exported)
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import train_model

log = logging.getLogger(__name__)

SUFFIXES = (".tif", ".tiff")
OEM_LUT = lut(OEM_TO_AERIALSEG)
# OpenEarthMap's values 0..8 by name (bao18/open_earth_map numbering; paper names shortened).
OEM_CLASSES = ("unknown", "bareland", "rangeland", "developed", "road", "tree", "water", "agriculture", "building")


def oem_lut(overrides: dict[str, str] | None = None) -> np.ndarray:
    """The OpenEarthMap -> aerialseg lookup table: ``OEM_TO_AERIALSEG`` with ``{OEM class: aerialseg class
    or ignore}`` overrides (``pretrain.classes``); an unknown name on either side is an error."""
    mapping = dict(OEM_TO_AERIALSEG)
    for source, target in (overrides or {}).items():
        if source not in OEM_CLASSES:
            raise AerialsegError(f"pretrain.classes: '{source}' is not an OpenEarthMap class", DEFAULT_PARAMS,
                                 f"use one of {', '.join(OEM_CLASSES)}")
        mapping[OEM_CLASSES.index(source)] = class_id(target, f"pretrain.classes: {source}")
    return lut(mapping)


def find_pairs(root: str | Path, names: set[str] | None = None) -> list[tuple[Path, Path]]:
    """(image, label) GeoTIFF pairs under root, matched by file name in sibling images/ and labels/ folders.

    ``names`` (file names such as ``aachen_1.tif``) restricts the pairs; an image without a label, or a
    listed name with no image, is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise AerialsegError("OpenEarthMap folder not found", root, "set pretrain.root to your OpenEarthMap copy")
    images = sorted(p for d in [root / "images", *root.glob("*/images")] if d.is_dir()
                    for p in d.iterdir() if p.suffix.lower() in SUFFIXES)
    if names is not None:
        images = [p for p in images if p.name in names]
        missing = sorted(names - {p.name for p in images})
        if missing:
            raise AerialsegError(f"{len(missing)} listed image(s) not found, e.g. {missing[0]}", root,
                                 "check train.txt / val.txt against the images/ folders")
    if not images:
        raise AerialsegError("no images/*.tif found", root, "point pretrain.root at a folder holding images/ "
                                                             "and labels/ (or <region>/images, <region>/labels)")
    pairs, unpaired = [], []
    for image in images:
        label = image.parent.parent / "labels" / image.name
        (pairs if label.is_file() else unpaired).append((image, label))
    if unpaired:
        raise AerialsegError(f"{len(unpaired)} image(s) without a label, e.g. {unpaired[0][0]}", root,
                             f"add {unpaired[0][1]} or remove the image (or list the images in train.txt/val.txt)")
    return pairs


def read_list(path: Path) -> set[str] | None:
    """File names listed one per line (the official train.txt / val.txt), or None without the file."""
    if not path.is_file():
        return None
    return {Path(line.strip()).name for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def split_names(root: str | Path, val_fraction: float) -> tuple[set[str] | None, set[str] | None]:
    """Train and val file names: the official lists when present, else a hash split of all pairs."""
    root = Path(root)
    train, val = read_list(root / "train.txt"), read_list(root / "val.txt")
    if train is not None and val is not None:
        return train, val
    names = sorted(image.name for image, _ in find_pairs(root))
    if len(names) < 2:
        raise AerialsegError(f"{len(names)} labelled image(s): need 2 or more to train and validate", root)
    score = {n: int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for n in names}
    val = {n for n in names if score[n] < val_fraction} or {min(names, key=score.get)}
    if len(val) == len(names):
        val = {min(names, key=score.get)}
    return set(names) - val, val


class OpenEarthMapDataset(Dataset):
    """OpenEarthMap crops as (image uint8 HxWx3, mask uint8 HxW in aerialseg classes).

    ``mode="random"``: ``crops_per_image`` random crops per image and epoch (positions from NumPy's
    global RNG, which the training loop seeds every epoch); ``mode="grid"``: every non-overlapping
    ``patch_size`` crop (the last row/column flush with the edge), for validation.
    ``resample`` is the GSD factor described in the module docstring; ``classes`` the lookup table of
    OpenEarthMap values to aerialseg classes (``oem_lut``).
    """

    gsd_m = None  # 0.25-0.5 m depending on the region; see the module docstring

    def __init__(self, root: str | Path, patch_size: int = 256, resample: float = 1.0, mode: str = "random",
                 crops_per_image: int = 8, names: set[str] | None = None, transform: Any = None,
                 classes: np.ndarray = OEM_LUT):
        if mode not in ("random", "grid") or patch_size < 8 or resample <= 0:
            raise AerialsegError(f"bad OpenEarthMap crop settings (mode {mode}, patch {patch_size}, "
                                 f"resample {resample})", DEFAULT_PARAMS, "check the pretrain section")
        self.pairs = find_pairs(root, names)
        self.patch_size, self.resample, self.mode = int(patch_size), float(resample), mode
        self.crops_per_image, self.transform, self.classes = int(crops_per_image), transform, classes
        self.shapes = [self._check_pair(image, label) for image, label in self.pairs]
        self.windows = self._grid() if mode == "grid" else []

    @staticmethod
    def _check_pair(image: Path, label: Path) -> tuple[int, int]:
        with open_raster(image) as img, open_raster(label) as lab:
            if (img.height, img.width) != (lab.height, lab.width):
                raise AerialsegError(f"label is {lab.width}x{lab.height}, image {img.width}x{img.height}", label,
                                     "use the label that belongs to this image")
            if img.count < 3:
                raise AerialsegError(f"image has {img.count} band(s), need RGB", image)
            return img.height, img.width

    def _scaled(self, index: int) -> tuple[int, int]:
        h, w = self.shapes[index]
        return max(1, int(h * self.resample)), max(1, int(w * self.resample))

    def _grid(self) -> list[tuple[int, int, int]]:
        windows = []
        for index in range(len(self.pairs)):
            h, w = self._scaled(index)
            rows = _offsets(h, self.patch_size)
            cols = _offsets(w, self.patch_size)
            windows += [(index, r, c) for r in rows for c in cols]
        return windows

    @property
    def fingerprint(self) -> str:
        """sha256 over image names and sizes (hashing every OpenEarthMap byte would take minutes)."""
        digest = hashlib.sha256(f"{self.patch_size}:{self.resample}:{self.mode}".encode() + self.classes.tobytes())
        for (image, label), shape in zip(self.pairs, self.shapes):
            digest.update(f"{image.name}:{shape}:{image.stat().st_size}:{label.stat().st_size}".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.windows) if self.mode == "grid" else len(self.pairs) * self.crops_per_image

    def __getitem__(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "grid":
            index, row, col = self.windows[item]
        else:
            index = item // self.crops_per_image
            h, w = self._scaled(index)
            row = int(np.random.randint(0, max(h - self.patch_size, 0) + 1))
            col = int(np.random.randint(0, max(w - self.patch_size, 0) + 1))
        image, mask = self.read_crop(index, row, col)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask

    def read_crop(self, index: int, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """The crop at (row, col) of the resampled image: RGB uint8 and remapped labels (outside = ignore)."""
        image_path, label_path = self.pairs[index]
        f, size = self.resample, self.patch_size
        src = Window(round(col / f), round(row / f), max(1, round(size / f)), max(1, round(size / f)))
        with open_raster(image_path) as img, open_raster(label_path) as lab:
            rgb = img.read([1, 2, 3], window=src, boundless=True, fill_value=0)
            labels = lab.read(1, window=src, boundless=True, fill_value=0)  # 0 = unknown -> ignore
        rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0))
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            labels = cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)
        return rgb.astype(np.uint8, copy=False), self.classes[labels]


def _offsets(length: int, size: int) -> list[int]:
    """Non-overlapping crop offsets along one axis; the last one flush with the end."""
    if length <= size:
        return [0]
    offsets = list(range(0, length - size + 1, size))
    return offsets if offsets[-1] == length - size else offsets + [length - size]


def pretrain_datasets(root: str | Path | None, val_fraction: float = 0.1, patch_size: int = 256,
                      resample_factor: float = 1.0,
                      crops_per_image: int = 8, classes: dict[str, str] | None = None,
                      ) -> tuple[OpenEarthMapDataset, OpenEarthMapDataset]:
    """Train (random crops) and val (grid crops) datasets of the OpenEarthMap copy at ``root``; ``classes``
    overrides the OpenEarthMap -> aerialseg class mapping (``oem_lut``)."""
    if not root:
        raise AerialsegError("pretrain.root is not set", DEFAULT_PARAMS, "point it at your OpenEarthMap copy")
    root = Path(root)
    train_names, val_names = split_names(root, val_fraction)
    common = {"patch_size": patch_size, "resample": resample_factor, "classes": oem_lut(classes)}
    train = OpenEarthMapDataset(root, mode="random", crops_per_image=crops_per_image, names=train_names, **common)
    val = OpenEarthMapDataset(root, mode="grid", names=val_names, **common)
    return train, val


def pretrain(cfg: TrainConfig, datasets: tuple[OpenEarthMapDataset, OpenEarthMapDataset], out_dir: str | Path,
             root: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on OpenEarthMap datasets of ``root``; writes a model dir (as train) plus
    ``pretrain.json`` and returns that record."""
    train_ds, val_ds = datasets
    summary = train_model(cfg, datasets, out_dir, resume=resume)
    record = {"enabled": True, "root": str(root), "train_images": len(train_ds.pairs),
              "val_images": len(val_ds.pairs), "resample_factor": train_ds.resample,
              "patch_size": train_ds.patch_size, "model": summary["model"],
              "best_val_mIoU": summary["best_val_mIoU"], "epochs_run": summary["epochs_run"]}
    write_json(Path(out_dir) / "pretrain.json", record)
    return record
