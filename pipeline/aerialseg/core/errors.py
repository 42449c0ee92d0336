"""The one error type users see: a single line naming the file and the fix."""

from pathlib import Path

PARAMS_NAME = "params.yaml"
_params_file: Path | None = None  # the params file this run actually read (load_params records it)


def set_params_file(path: str | Path | None) -> None:
    """Record the params file read, so errors about "params.yaml" name the file the user gave (--params)."""
    global _params_file
    _params_file = Path(path) if path is not None else None


class AerialsegError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        if path is not None and str(path) == PARAMS_NAME and _params_file is not None:
            path = _params_file
        self.path, self.fix = path, fix
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts))


class ConfigError(AerialsegError):
    """params.yaml or a profile is wrong: a bad section, an unknown key, a value out of range."""


class InputError(AerialsegError):
    """A user's input file is unreadable or invalid: a label file, a scene, a mask, a bundle."""


class MissingStageOutput(AerialsegError):
    """An earlier stage's output is missing: the fix names the stage (or `dvc repro`) to run first."""
