"""Atomic writes: every output goes to a temp file beside it, then is renamed into place."""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aerialseg.core.errors import AerialsegError

SIDECARS = (".aux.xml", ".aux", ".msk", ".ovr")  # files GDAL may write beside a temp raster


@contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path in dest's folder; rename it onto dest only if the block succeeds.

    The temp name carries this run's token (``aerialseg.core.safety``): temp files of a killed run are
    removed by the next run that writes into the same folder. The output gets the usual umask-derived mode
    (mkstemp's 0600 would keep other users out). A full or read-only disk, a permission problem or a path
    that is not a folder becomes the one-line error naming ``dest``.
    """
    from aerialseg.core.safety import environment_error, remove_stale, temp_prefix

    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=suffix or dest.suffix, dir=dest.parent)
        os.close(fd)
        mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
    except OSError as exc:
        raise (environment_error(exc, dest) or exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if dest.is_dir():
            raise AerialsegError("is a folder, a file was expected", dest, "give the path of a file")
        os.chmod(tmp_path, mode)  # again: writers that replace the file (safetensors) leave 0600
        os.replace(tmp_path, dest)
    except Exception as exc:
        error = environment_error(exc, dest)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        for suffix in SIDECARS:  # named, not globbed: a glob lists the whole folder on every write
            tmp_path.with_name(tmp_path.name + suffix).unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    path = Path(path)
    if not path.is_file():
        raise AerialsegError(f"{what} not found", path, f"run aerialseg {stage} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AerialsegError(f"not valid JSON ({exc})", path, f"rerun aerialseg {stage}") from None
    except RecursionError:
        raise AerialsegError("JSON nested too deeply", path, f"rerun aerialseg {stage}") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(paths: "list[str | Path] | tuple[str | Path, ...]") -> str:
    """sha256 over the names and bytes of files: the data fingerprint (tiles manifest + split.json) that
    model.json (``training_data_sha256``), bundle.json (``data_hash``) and every report input carry."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()
