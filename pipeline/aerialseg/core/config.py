"""params.yaml: every knob, one section per stage, read and checked once at start-up."""

from pathlib import Path
from typing import Any

import yaml

from aerialseg.core.errors import AerialsegError, set_params_file

DEFAULT_PARAMS = Path("params.yaml")
REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"  # editable install: the checkout's


def load_params(path: str | Path = DEFAULT_PARAMS, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read params.yaml; check the named top-level sections are present."""
    path = Path(path)
    if not path.is_file() and path == DEFAULT_PARAMS and REPO_PARAMS.is_file():
        path = REPO_PARAMS  # outside the repository: the defaults of the checkout aerialseg runs from
    if path.is_dir():
        raise AerialsegError("is a folder, a params YAML file was expected", path, "pass --params FILE.yaml")
    if not path.is_file():
        raise AerialsegError("params file not found", path, "run from the repository root or pass --params")
    set_params_file(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise AerialsegError(f"not valid YAML{where}", path, "fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise AerialsegError("not a UTF-8 YAML file", path, "pass the params.yaml file (--params)") from None
    except RecursionError:
        raise AerialsegError("YAML nested too deeply", path, "pass the params.yaml file (--params)") from None
    if not isinstance(params, dict):
        raise AerialsegError("top level must be a mapping of sections", path)
    missing = [s for s in required if s not in params]
    if missing:
        raise AerialsegError(f"missing section(s) {', '.join(missing)}", path, "add them (see the README)")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One stage's section (an empty dict when absent)."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise AerialsegError(f"section '{name}' must be a mapping", DEFAULT_PARAMS)
    return value


def check_keys(name: str, values: dict[str, Any], allowed: Any) -> None:
    """Unknown keys in a section are an error: a typo must not pass silently."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise AerialsegError(f"unknown {name} key(s) {', '.join(unknown)}", DEFAULT_PARAMS,
                             f"use only: {', '.join(allowed)}")
