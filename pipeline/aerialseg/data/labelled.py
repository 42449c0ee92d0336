"""Which classes a survey labels: those with labelled pixels in the train split (or params ``classes.labelled``).

A class with no training pixels cannot be learned: split and train warn about it, evaluate leaves it out of the
headline mIoU (named under ``not_labelled``), train records the labelled classes in model.json, and the bundle
carries them so infer-scene and serve can map only to them.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerialseg.core.classes import CLASS_NAMES
from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.data.split import class_shares
from aerialseg.data.tiling import load_manifest

log = logging.getLogger(__name__)


def train_pixels(shares: dict[str, Any]) -> dict[str, int]:
    """Labelled pixels per class in the train split of a class_shares record (``data.split.class_shares``)."""
    pixels = shares["splits"]["train"]["pixels"]
    return {name: int(pixels.get(name, 0)) for name in CLASS_NAMES}


def labelled_classes(pixels: dict[str, int], declared: Sequence[str] | None = None) -> list[str]:
    """The declared class names (checked, in class order), else the classes with training pixels."""
    if declared is None:
        return [name for name in CLASS_NAMES if pixels.get(name, 0) > 0]
    names = [str(n).lower() for n in declared]
    unknown = sorted(set(names) - set(CLASS_NAMES))
    if unknown or not names:
        raise AerialsegError(f"classes.labelled: {', '.join(unknown) or 'empty list'} is not a list of classes",
                             DEFAULT_PARAMS, f"null (detect from the masks) or names among {', '.join(CLASS_NAMES)}")
    return [name for name in CLASS_NAMES if name in names]


def not_labelled(labelled: Sequence[str]) -> list[str]:
    """The classes left out: every class not in ``labelled``."""
    return [name for name in CLASS_NAMES if name not in labelled]


def warn_not_labelled(labelled: Sequence[str], pixels: dict[str, int], stage: str) -> None:
    """One warning line naming the classes without training data (and declared ones that have none)."""
    missing = not_labelled(labelled)
    if missing:
        log.warning("warning: %s: no labelled pixels of %s in the training data: the model cannot learn %s; "
                    "left out of the headline mIoU (metrics.json not_labelled) and of bundle maps "
                    "(infer.labelled_only)", stage, ", ".join(missing), "it" if len(missing) == 1 else "them")
    empty = [name for name in labelled if pixels.get(name, 0) == 0]
    if empty:
        log.warning("warning: %s: classes.labelled names %s, but the train split has no pixel of %s",
                    stage, ", ".join(empty), "it" if len(empty) == 1 else "them")


def survey_classes(manifest: Path, split_file: Path, declared: Sequence[str] | None = None,
                   stage: str | None = None) -> list[str]:
    """The labelled classes of the tiles/split outputs; ``stage`` names it in the warning (None: no warning)."""
    split = json.loads(Path(split_file).read_text(encoding="utf-8"))
    pixels = train_pixels(class_shares(load_manifest(manifest), split))
    labelled = labelled_classes(pixels, declared)
    if stage:
        warn_not_labelled(labelled, pixels, stage)
    return labelled
