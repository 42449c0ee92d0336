"""The one error type users see: a single line naming the file and the fix."""

from pathlib import Path


class AerialsegError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts))
