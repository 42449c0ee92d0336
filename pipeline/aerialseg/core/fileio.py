"""Atomic writes: every output goes to a temp file beside it, then is renamed into place."""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path in dest's folder; rename it onto dest only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".aerialseg-tmp-{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        for side in tmp_path.parent.glob(tmp_path.name + ".*"):  # e.g. GDAL .aux.xml sidecars
            side.unlink(missing_ok=True)


def write_json(dest: str | Path, data: Any) -> Path:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(dest)


def write_text(dest: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def read_stage_json(path: str | Path, what: str, stage: str) -> Any:
    """Read a stage's JSON output; missing or broken files name the stage to (re)run."""
    from aerialseg.core.errors import AerialsegError

    path = Path(path)
    if not path.is_file():
        raise AerialsegError(f"{what} not found", path, f"run aerialseg {stage} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AerialsegError(f"not valid JSON ({exc})", path, f"rerun aerialseg {stage}") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
