"""infer-survey (`aerialseg infer-survey`, params ``infer`` + ``survey``): many scenes on Dask, resumable.

Reads the ``infer`` section (how each scene is mapped, as infer-scene) and the ``survey`` section (the scenes
when none are given, output folder, local workers or a scheduler address, retries, block rows); flags that are given win. Calls
``inference.survey.run_survey``, which writes ``survey.out``/ maps, survey.json (manifest), survey.vrt,
survey_polygons.gpkg (--vectors), survey_areas.json and survey_summary.json.
"""

from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.inference.scene import InferOptions
from aerialseg.inference.survey import SurveyOptions, run_survey

SURVEY_KEYS = {"out", "workers", "threads_per_worker", "scheduler", "retries", "block_rows", "mosaic", "progress"}


def run(params: dict[str, Any], scenes: list[Path] | None = None, model: Path | None = None,
        **overrides: Any) -> dict[str, Any]:
    """Map the survey: ``scenes``, else survey.scenes inside survey.scenes_dir; ``overrides`` are keys of
    ``survey`` or ``infer`` (None = the params value)."""
    knobs = dict(section(params, "infer"))
    model = model or (Path(knobs["model"]) if knobs.get("model") else None)
    knobs.pop("model", None)
    if model is None:
        raise AerialsegError("no model given", fix="pass --model BUNDLE or set infer.model in params.yaml")
    survey = SurveyOptions.from_params(dict(section(params, "survey")),
                                       **{k: v for k, v in overrides.items() if k in SURVEY_KEYS})
    options = InferOptions.from_params(knobs, **{k: v for k, v in overrides.items() if k not in SURVEY_KEYS})
    return run_survey(scenes or [Path(survey.scenes_dir) / name for name in survey.scenes], model, options, survey)


def summary(done: dict[str, Any]) -> str:
    """The command's line about a survey run."""
    return (f"infer-survey: {done['mapped']} mapped, {done['skipped']} skipped, {done['failed']} failed "
            f"({done['mpx_per_s']} Mpx/s) -> {done['products'].get('mosaic')}")


def errors(done: dict[str, Any]) -> list[str]:
    """One line per scene that failed and per survey product that could not be made."""
    return [*done["errors"].values(), *done["products"]["errors"]]
