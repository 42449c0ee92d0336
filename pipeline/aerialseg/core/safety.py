"""Never destroy a user's data: outputs that are inputs, temp files a later run can clean, disk errors.

- ``refuse_inputs(outputs, inputs)``: an output that is an input of the run (same path, or the same file
  through a symlink, a hard link or another letter case) is an error, before anything is written.
- Temp names: ``temp_prefix(name)`` gives ``.aerialseg-tmp-<name>.<host>-<pid>-<run>.`` so that a later run
  recognises the files and folders of a run that died (kill -9, power cut) and ``remove_stale`` deletes them:
  same host and the process is gone (or the pid now belongs to this process but another run), or older
  than ``STALE_AGE_S`` whatever wrote them (also the legacy names without a token).
- ``environment_error(exc, path)``: a read-only disk, a full disk, permission denied, a folder where a file
  is expected and the like, as the one-line user error.
"""

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aerialseg.core.errors import AerialsegError

TEMP_TAG = ".aerialseg-tmp-"
STALE_AGE_S = 7 * 24 * 3600  # temp entries this old are stale whoever wrote them
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
RUN = secrets.token_hex(3)  # tells this process from an earlier one that had the same pid
_TOKEN = re.compile(r"\.([0-9a-f]{6})-(\d+)-([0-9a-f]{6})\.")
_FRESH: set[str] = set()  # work folders this run made (temp_dir): nothing stale in them, never swept


# --- outputs that are inputs ------------------------------------------------------------------------

def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name one file: equal once resolved, or one inode (symlink, hard link, case)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # symlink loop
        pass
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def file_identity(path: Path) -> tuple[Path | None, tuple[int, int] | None]:
    """(resolved path, (st_dev, st_ino)) of a path, each None when it cannot be had (missing, symlink loop)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # symlink loop
        resolved = None
    try:
        info = path.stat()
    except OSError:
        return resolved, None
    return resolved, (info.st_dev, info.st_ino)


class _Identities:
    """``file_identity`` for many paths, as strings: each folder is resolved once (a symlinked file, fully)."""

    def __init__(self) -> None:
        self.folders: dict[str, str | None] = {}

    def __call__(self, path: str) -> tuple[str | None, tuple[int, int] | None]:
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        folder, name = os.path.split(path)
        if (info is not None and stat.S_ISLNK(info.st_mode)) or name in ("", ".", ".."):
            resolved, inode = file_identity(Path(path))
            return (os.fspath(resolved) if resolved is not None else None), inode
        if folder not in self.folders:
            base = file_identity(Path(folder or "."))[0]
            self.folders[folder] = os.fspath(base) if base is not None else None
        base = self.folders[folder]
        return (os.path.join(base, name) if base is not None else None,
                (info.st_dev, info.st_ino) if info is not None else None)


def refuse_inputs(outputs: Iterable[Path], inputs: Iterable[Path], fix: str) -> None:
    """Raise when any output is (or resolves to) one of the inputs.

    O(outputs + inputs): each path is looked at once (its folder resolved once); outputs are looked up in the
    inputs' resolved-path and (device, inode) tables (``same_file`` for one pair).
    """
    identity = _Identities()
    by_path: dict[str, str] = {}
    by_inode: dict[tuple[int, int], str] = {}
    for src in map(os.fspath, filter(None, inputs)):
        resolved, inode = identity(src)
        if resolved is not None:
            by_path.setdefault(resolved, src)
        if inode is not None:
            by_inode.setdefault(inode, src)
    for out in map(os.fspath, outputs):
        resolved, inode = identity(out)
        src = by_path.get(resolved) if resolved is not None else None
        if src is None and inode is not None:
            src = by_inode.get(inode)
        if src is not None:
            what = "is" if Path(out).absolute() == Path(src).absolute() else "is the same file as"
            raise AerialsegError(f"output {what} the input {src}; writing it would destroy the input", out, fix)


def backup_path(path: Path) -> Path:
    """A free name ``<name>.<UTC time>.bak`` beside path (never an existing file)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(1000):
        cand = path.with_name(f"{path.name}.{stamp}{f'-{n}' if n else ''}.bak")
        if not cand.exists():
            return cand
    raise AerialsegError("too many backups", path, "remove old .bak files")


# --- temp names and stale clean-up ---------------------------------------------------------------------

def temp_prefix(name: str) -> str:
    """Prefix for a temp file or folder of this run: recognisable, with this host, pid and run."""
    return f"{TEMP_TAG}{name[:80]}.{HOST}-{os.getpid()}-{RUN}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(path: Path, now: float | None = None) -> bool:
    """True for a temp entry whose run has ended (see the module docstring)."""
    if not path.name.startswith(TEMP_TAG):
        return False
    match = _TOKEN.search(path.name)
    if match and match.group(1) == HOST:
        pid, run = int(match.group(2)), match.group(3)
        if pid == os.getpid():
            return run != RUN
        if not _alive(pid):
            return True
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AGE_S


def remove_stale(folder: str | Path) -> list[Path]:
    """Delete the stale temp files and folders directly in folder; returns what was removed.

    A work folder of this run (``temp_dir``) is skipped: a run writing thousands of files into it would
    otherwise list it once per file (quadratic).
    """
    if os.fspath(folder) in _FRESH:
        return []
    folder = Path(folder)
    removed = []
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(TEMP_TAG)]
    except OSError:
        return []
    for entry in entries:
        if not is_stale(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # not ours to delete (permissions): leave it
    return removed


@contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A work folder inside parent named for this run (stale ones of dead runs removed first); removed on exit."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        path = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent))
    except OSError as exc:
        raise (environment_error(exc, parent) or exc) from None
    _FRESH.add(os.fspath(path))
    try:
        yield path
    finally:
        _FRESH.discard(os.fspath(path))
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def tempfiles_in(folder: Path) -> Iterator[Path]:
    """Point ``tempfile`` (mkstemp, TemporaryDirectory, ...) at folder for the block: what a library puts in the
    system temp dir then lands in a run-named folder that cannot pile up (see ``temp_dir``)."""
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = before


# --- the environment's errors --------------------------------------------------------------------------

_ERRNO = {
    errno.ENOSPC: ("no space left on the disk", "free disk space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder (--out)"),
    errno.EACCES: ("permission denied", "check the permissions of the file and its folder, or write elsewhere"),
    errno.EPERM: ("operation not permitted", "check the permissions of the file and its folder"),
    errno.EISDIR: ("is a folder, a file was expected", "give the path of a file"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a folder path whose parts are folders"),
    errno.EEXIST: ("exists and is not a folder", "give a folder path, or remove the file"),
    errno.ENOENT: ("not found", "check the path"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.EIO: ("input/output error (failing disk or network share)", "check the disk, then rerun"),
}
_GDAL_PHRASES = (("no space left", errno.ENOSPC), ("free disk space", errno.ENOSPC),
                 ("disk full", errno.ENOSPC), ("read-only file system", errno.EROFS),
                 ("permission denied", errno.EACCES), ("is a directory", errno.EISDIR),
                 ("not a directory", errno.ENOTDIR))


def _existing_parent(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.is_dir():
            return folder
    return Path(".")


def _temp_owner(path: Path) -> Path:
    """A path through temp entries shown as the output it stands for
    (``out/.aerialseg-tmp-map.tif.<token>.xyz.tif`` -> ``out/map.tif``, a staging folder -> the output folder)."""
    parts = []
    for part in path.parts:
        if part.startswith(TEMP_TAG):
            match = _TOKEN.search(part)
            part = part[len(TEMP_TAG):match.start()] if match else part[len(TEMP_TAG):]
        if part:
            parts.append(part)
    return Path(*parts) if parts else path


def disk_full(folder: str | Path, spare: int = 1 << 20) -> bool:
    """True when the file system holding folder has less than ``spare`` bytes left for this user."""
    try:
        info = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return info.f_bavail * info.f_frsize < spare


def environment_error(exc: BaseException, path: str | Path | None = None) -> AerialsegError | None:
    """The one-line error for an OS / GDAL failure caused by the environment; None when it is not one.

    With ``path`` (the output being written), a failure of any kind while its disk is full is reported as the
    full disk: GDAL often notices only later, as a file it cannot read back.
    """
    if isinstance(exc, AerialsegError):
        return None
    code = getattr(exc, "errno", None)
    if code not in _ERRNO or not isinstance(exc, OSError):
        if not (isinstance(exc, OSError) or type(exc).__module__.startswith("rasterio")):
            return None
        text = str(exc).lower()
        code = next((c for phrase, c in _GDAL_PHRASES if phrase in text), None)
        if code is None and path is not None and disk_full(_existing_parent(Path(path))):
            code = errno.ENOSPC
        if code is None:
            return None
    filename = getattr(exc, "filename", None)
    if filename is None or (path is not None and Path(filename).name.startswith(TEMP_TAG)):
        filename = path  # a temp entry stands for the output it becomes
    where = _temp_owner(Path(filename)) if filename else None
    what, fix = _ERRNO[code]
    return AerialsegError(what, where, fix)
