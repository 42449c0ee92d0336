"""evaluate stage (`aerialseg evaluate`; params ``evaluate``, inference knobs from ``infer``).

Scores the map users get: each scene of the split mapped by infer-scene's code path with the same
options as `aerialseg infer-scene`, scored on the split's area (aerialseg.evaluation.evaluate); the macro
means are over the classes the survey labels (params ``classes.labelled``, null = those with train pixels).
"""

from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.fileio import fingerprint
from aerialseg.core.paths import data_stage_outputs
from aerialseg.data.labelled import survey_classes
from aerialseg.data.split import split_patches
from aerialseg.evaluation.evaluate import evaluate_scenes, write_evaluation
from aerialseg.evaluation.metrics import DEFAULT_BF1_TOLERANCE_PX
from aerialseg.inference.scene import InferOptions


def inference_options(params: dict[str, Any]) -> InferOptions:
    """infer-scene's options (params ``infer``) with evaluate's device/backend/tta overrides; no progress bar."""
    cfg = section(params, "evaluate")
    infer = {k: v for k, v in section(params, "infer").items() if k != "model"}  # the model is evaluate's
    return InferOptions.from_params(infer, device=cfg.get("device"), backend=cfg.get("backend"),
                                    tta=cfg.get("tta"), progress=False)


def run(params: dict[str, Any], model: str | Path | None = None, split: str | None = None,
        out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a bundle or model dir on a split; writes metrics.json, evaluation.json, confusion.json, samples.npz."""
    cfg = section(params, "evaluate")
    model = Path(model or cfg.get("model", "models/bundle"))
    split = split or str(cfg.get("split", "test"))
    out_dir = Path(out or cfg.get("out", "reports"))
    manifest, split_file = data_stage_outputs(params)
    options = inference_options(params)
    labelled = survey_classes(manifest, split_file, section(params, "classes").get("labelled"))
    result = evaluate_scenes(model, split_patches(manifest, split_file, split), split, options,
                             float(cfg.get("bf1_tolerance_px", DEFAULT_BF1_TOLERANCE_PX)), int(cfg.get("samples", 8)))
    return write_evaluation(out_dir, result, model, options, labelled, fingerprint([manifest, split_file]))
