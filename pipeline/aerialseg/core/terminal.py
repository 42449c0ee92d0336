"""The terminal side of the CLI: library chatter kept off the user's screen, and the one-line error for
failures the user can fix (the environment's, GDAL's)."""

import logging
import sys

from aerialseg.core.errors import AerialsegError


def quiet_libraries() -> None:
    """GDAL/rasterio and OpenCV chatter (warnings about the corrupt file we are about to refuse) stays off the
    terminal unless --verbose: the user sees aerialseg's one line."""
    import os
    import warnings

    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    if "-v" not in sys.argv and "--verbose" not in sys.argv:
        logging.getLogger("rasterio").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module="rasterio")
        warnings.filterwarnings("ignore", category=UserWarning, module="pyogrio")


class HeldStderr:
    """C libraries (libtiff, libpng, GDAL's default handler) write to file descriptor 2 directly. For the raster
    commands those bytes go to memory instead and are shown after a run that succeeded (or failed with a
    traceback); a run that ends in a one-line user error drops them. Python's own stderr is not held."""

    def __init__(self) -> None:
        import os

        self.saved = os.dup(2)
        self.python_stderr = sys.stderr
        self.buffer = os.memfd_create("aerialseg-stderr") if hasattr(os, "memfd_create") else None
        if self.buffer is None:
            import tempfile

            self.buffer = os.dup(tempfile.TemporaryFile().fileno())
        sys.stderr.flush()
        sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(self.buffer, 2)

    @classmethod
    def wanted(cls, commands: set[str]) -> bool:
        """Hold for these commands (the raster ones), unless --verbose or stderr is redirected in-process."""
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        verbose = "-v" in sys.argv or "--verbose" in sys.argv
        return command in commands and not verbose and sys.stderr is sys.__stderr__

    def release(self, show: bool) -> None:
        """Restore file descriptor 2; write what the libraries said when ``show``."""
        import os

        if self.buffer is None:
            return
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = self.python_stderr
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.lseek(self.buffer, 0, os.SEEK_SET)
        held = b"".join(iter(lambda: os.read(self.buffer, 1 << 16), b""))
        os.close(self.buffer)
        self.buffer = None
        if show and held:
            sys.stderr.write(held.decode("utf-8", "replace"))
            sys.stderr.flush()


def user_error(exc: BaseException) -> AerialsegError | None:
    """The one-line error for a failure the user can fix: the environment's (full or read-only disk,
    permission denied, a folder where a file is expected, a file where a folder is expected) or GDAL's."""
    from aerialseg.core.safety import environment_error

    if isinstance(exc, AerialsegError):
        return exc
    if isinstance(exc, RecursionError):
        return AerialsegError("input nested too deeply to read (a malformed JSON or YAML file?)",
                              fix="check the files you passed")
    error = environment_error(exc)
    if error is None and isinstance(exc, OSError) and exc.filename:
        error = AerialsegError(exc.strerror or type(exc).__name__, exc.filename, "check the path")
    if error is None and type(exc).__module__.startswith("rasterio"):
        error = AerialsegError(f"GDAL cannot read or write a raster ({str(exc).splitlines()[0][:160]})",
                               fix="check the input rasters and the output folder; rerun with -v for details")
    return error
