"""`aerialseg infer-scene SCENE` (params ``infer``; not a DVC stage: the infer stage maps a survey through
stages/survey.py): one scene mapped by aerialseg.inference.scene with the CLI's overrides."""

from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.scene import InferOptions, InferResult, infer_scene


def run(params: dict[str, Any], scene: Path, model: Path | None, out: Path | None, **overrides: Any) -> InferResult:
    """Map ``scene`` with ``model`` (else infer.model); overrides that are not None win over params ``infer``."""
    knobs = dict(section(params, "infer"))
    model = model or (Path(knobs["model"]) if knobs.get("model") else None)
    knobs.pop("model", None)
    if model is None:
        raise AerialsegError("no model given", fix="pass --model BUNDLE or set infer.model in params.yaml")
    return infer_scene(scene, model, out, InferOptions.from_params(knobs, **overrides))
