"""Whether pretraining runs, and its "disabled" marker: torch-free, so a disabled pretrain stage is instant."""

import logging
from pathlib import Path
from typing import Any

from aerialseg.core.config import DEFAULT_PARAMS
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json

log = logging.getLogger(__name__)


def pretrain_enabled(enabled: Any, root: str | Path | None) -> tuple[bool, str]:
    """Whether to pretrain, and why not: ``enabled`` true / false, or ``auto`` = when ``root`` holds images."""
    if enabled == "auto":
        folder = Path(str(root or ""))
        found = bool(root) and any((d / "images").is_dir() for d in [folder, *folder.glob("*")]
                                   if folder.is_dir())
        return found, "" if found else f"pretrain.enabled is auto and {folder} holds no OpenEarthMap images/: " \
                                       "train starts from the default init"
    if not isinstance(enabled, bool):
        raise AerialsegError(f"pretrain.enabled must be true, false or auto, not {enabled!r}", DEFAULT_PARAMS)
    return enabled, "" if enabled else "pretrain.enabled is false: train starts from the default init"


def write_disabled(out_dir: str | Path, reason: str) -> dict[str, Any]:
    """The marker of a disabled pretraining (``pretrain.json`` = {"enabled": false}) that train skips."""
    record = {"enabled": False, "reason": reason}
    write_json(Path(out_dir) / "pretrain.json", record)
    log.info("pretraining disabled: wrote %s", Path(out_dir) / "pretrain.json")
    return record
