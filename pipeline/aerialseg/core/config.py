"""params.yaml: every knob, one section per stage, read and checked once at start-up."""

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from aerialseg.core.errors import ConfigError, set_params_file

PARAMS_YAML = Path("params.yaml")
T = TypeVar("T")
DEFAULT_PARAMS = PARAMS_YAML  # the path of errors about params keys; AerialsegError names the file actually read
# Keys that hold paths: relative values are relative to the params file (not to the working directory).
PATH_KEYS = (
    "data.labels", "data.images", "masks.out", "tiles.out", "split.out", "augment.out", "pretrain.root",
    "pretrain.out", "train.out", "train.init_from", "distil.teacher", "distil.out", "bundle.out",
    "evaluate.model", "evaluate.out", "infer.model", "infer.out_dir", "prune.model_dir", "prune.out",
    "quantize.model_dir", "quantize.out", "quantize.table.out_json", "quantize.table.out_md", "report.out",
    "report.figures", "report.metrics", "report.confusion", "report.class_shares", "report.history",
    "report.samples", "report.models", "report.compare", "report.compression", "report.loso", "report.profile.out",
    "stats.runs_dir", "stats.out", "postprocess.out", "loso.out",
)
REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"  # editable install: the checkout's


def load_params(path: str | Path = PARAMS_YAML, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a params file; relative paths in it (PATH_KEYS) are relative to the file; check required sections."""
    path = Path(path)
    fallback = not path.is_file() and path == PARAMS_YAML and REPO_PARAMS.is_file()
    if fallback:
        path = REPO_PARAMS  # outside the repository: the defaults of the checkout (paths stay cwd-relative)
    if path.is_dir():
        raise ConfigError("is a folder, a params YAML file was expected", path, "pass --params FILE.yaml")
    if not path.is_file():
        raise ConfigError("params file not found", path, "run from the repository root or pass --params")
    set_params_file(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"not valid YAML{where}", path, "fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 YAML file", path, "pass the params.yaml file (--params)") from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply", path, "pass the params.yaml file (--params)") from None
    if not isinstance(params, dict):
        raise ConfigError("top level must be a mapping of sections", path)
    base = path.resolve().parent
    if not fallback and base != Path.cwd().resolve():
        params = relative_to(params, base)
    missing = [s for s in required if s not in params]
    if missing:
        raise ConfigError(f"missing section(s) {', '.join(missing)}", path, "add them (see the README)")
    return params


def _rebase(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    if isinstance(value, list):
        return [_rebase(v, base) for v in value]
    return value


def relative_to(params: dict[str, Any], base: Path) -> dict[str, Any]:
    """params with every relative path of PATH_KEYS (and quantize.table entries) made relative to ``base``."""
    params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = node = dict(child)
        else:
            if leaf in node:
                node[leaf] = _rebase(node[leaf], base)
    table = (params.get("quantize") or {}).get("table")
    if isinstance(table, dict) and isinstance(table.get("entries"), list):
        table["entries"] = [{k: (_rebase(v, base) if k in ("model_dir", "pruned_dir") else v) for k, v in e.items()}
                            if isinstance(e, dict) else e for e in table["entries"]]
    return params


# The keys of the sections that no dataclass types (typed sections check theirs in typed_section): a key
# not listed here is a typo, refused when any stage reads the section. tests/core/test_config_sections.py checks
# that params.yaml and these agree.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("labels", "images", "gsd_m"),
    "classes": ("labels", "labelled"),
    "masks": ("out", "vertex_convention", "line_width_px", "point_radius_px", "priority", "all_touched",
              "simplify_px", "min_area_px", "allow_ungeoreferenced", "max_image_pixels"),
    "tiles": ("out", "size", "overlap", "keep_empty_fraction", "seed"),
    "split": ("out", "fractions", "group", "block_px", "seed", "candidates"),
    "augment": ("out", "copies", "seed", "shard_size", "pipeline"),
    "report": ("out", "figures", "metrics", "confusion", "class_shares", "history", "max_runs", "samples",
               "max_samples", "models", "compare", "compression", "loso", "profile"),
    "bundle": ("out", "tile_size", "overlap", "gsd_m", "onnx", "zip", "int8"),
    "export": ("opset", "max_abs_diff", "parity_tiles"),
    "evaluate": ("model", "split", "out", "samples", "bf1_tolerance_px", "device", "backend", "tta"),
    "model": ("name", "kwargs"),
    "stats": ("runs_dir", "models", "seeds", "epochs", "split", "metrics", "primary", "baseline", "out"),
    "loso": ("out", "folds", "epochs", "profile", "val_fraction", "adapt", "keep_models"),
    "adapt": ("method", "windows", "window", "batch", "min_valid", "gsd_tolerance", "tent_steps", "tent_lr",
              "self_rounds", "self_steps", "self_lr", "threshold", "seed", "device", "onnx"),
}


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One stage's section (an empty dict when absent); unknown keys of an untyped section are an error."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"section '{name}' must be a mapping", DEFAULT_PARAMS)
    if name in SECTION_KEYS:
        check_keys(name, value, SECTION_KEYS[name])
    return value


def check_keys(name: str, values: dict[str, Any], allowed: Any) -> None:
    """Unknown keys in a section are an error: a typo must not pass silently."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown {name} key(s) {', '.join(unknown)}", DEFAULT_PARAMS,
                          f"use only: {', '.join(allowed)}")


def typed_section(cls: type[T], name: str, values: dict[str, Any], **overrides: Any) -> T:
    """A section's dataclass: unknown keys are an error (check_keys), ``overrides`` that are not None win
    (CLI flags), then its ``validate()`` runs if it has one."""
    check_keys(name, values, [f.name for f in fields(cls)])
    config = cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def merge_profile(params: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """params with a profile's sections merged over them (nested mappings merged, other values replaced)."""
    merged = dict(params)
    for key, value in profile.items():
        base = merged.get(key)
        merged[key] = merge_profile(base, value) if isinstance(value, dict) and isinstance(base, dict) else value
    return merged


def load_profile(name_or_path: str | Path, profiles_dir: Path = Path("profiles")) -> tuple[Path, dict[str, Any]]:
    """A profile by name (profiles/<name>.yaml) or path; unknown keys are caught when the stages read them."""
    path = Path(name_or_path)
    if not path.suffix:
        path = profiles_dir / f"{name_or_path}.yaml"
        if not path.is_file() and (REPO_PARAMS.parent / path).is_file():
            path = REPO_PARAMS.parent / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in profiles_dir.glob("*.yaml"))) or "none"
        raise ConfigError("profile not found", path, f"name one of: {known}, or give a YAML file")
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise ConfigError("not valid YAML", path, "fix the YAML syntax") from None
    if not isinstance(profile, dict):
        raise ConfigError("a profile must be a mapping of params sections", path)
    return path, profile
