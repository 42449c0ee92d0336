"""params.yaml: every knob, one section per stage, read and checked once at start-up."""

import os
from pathlib import Path
from typing import Any

import yaml

from aerialseg.core.errors import AerialsegError, set_params_file

PARAMS_YAML = Path("params.yaml")


class _ParamsInUse(os.PathLike):
    """The params file this run read: what errors about a params key name (params.yaml until loaded)."""

    path: Path = PARAMS_YAML

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __format__(self, spec: str) -> str:
        return format(str(self.path), spec)


DEFAULT_PARAMS = _ParamsInUse()  # pass as the path of errors about params keys: names the file actually read
REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"  # editable install: the checkout's


def load_params(path: str | Path = PARAMS_YAML, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read params.yaml; check the named top-level sections are present."""
    path = Path(path)
    if not path.is_file() and path == PARAMS_YAML and REPO_PARAMS.is_file():
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
    DEFAULT_PARAMS.path = path
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
        raise AerialsegError("profile not found", path, f"name one of: {known}, or give a YAML file")
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise AerialsegError("not valid YAML", path, "fix the YAML syntax") from None
    if not isinstance(profile, dict):
        raise AerialsegError("a profile must be a mapping of params sections", path)
    return path, profile
