"""profile stage (`aerialseg profile-models`, params ``report.profile``): parameters, FLOPs and CPU latency."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aerialseg.core.config import section
from aerialseg.core.errors import AerialsegError
from aerialseg.reporting.profile import profile_models, write_model_table


def run(params: dict[str, Any], models: Sequence[str] | None = None, out: str | Path | None = None,
                  tile: int | None = None, threads: int | None = None, runs: int | None = None,
                  onnx: dict[str, str] | None = None) -> Path:
    """`aerialseg profile-models`: profile the listed models (flags override report.profile)."""
    cfg = section(section(params, "report"), "profile")
    models = list(models or cfg.get("models") or [])
    if not models:
        raise AerialsegError("no models to profile", fix="pass --model NAME_OR_DIR or set report.profile.models")
    rows = profile_models(models, tile=int(tile or cfg.get("tile", 512)),
                          threads=int(threads if threads is not None else cfg.get("threads", 0)),
                          runs=int(runs or cfg.get("runs", 10)), warmup=int(cfg.get("warmup", 3)),
                          onnx={**(cfg.get("onnx") or {}), **(onnx or {})})
    return write_model_table(rows, out or cfg.get("out", "reports/models.json"))
