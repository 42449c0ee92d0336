"""The annotation tools themselves as test-only references: labelme and X-AnyLabeling in a venv of their own.

``reference_venv()`` builds (once, then reuses) a small venv holding only what the tools' mask code needs,
installed with ``--no-deps`` from the package index: labelme, x-anylabeling-cvhub, numpy, Pillow (the version
aerialseg uses, so both sides draw with the same library) and OpenCV. No Qt, no models: about 20 s and
150 MB the first time. ``reference_masks()`` runs reference_runner.py inside it. Tests skip cleanly when the
venv cannot be built (no package index); set AERIALSEG_REFERENCE_VENV to choose where it lives.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "reference_runner.py"
PINS = ("labelme==6.3.1", "x-anylabeling-cvhub==4.2.1", f"numpy=={np.__version__}", f"pillow=={PIL.__version__}",
        "opencv-contrib-python-headless==5.0.0.93")
VENV = Path(os.environ.get("AERIALSEG_REFERENCE_VENV", Path(tempfile.gettempdir()) / "aerialseg-reference-tools"))


class ReferenceUnavailable(RuntimeError):
    """The reference venv could not be built (e.g. no package index)."""


def reference_venv(venv: Path = VENV) -> Path:
    """The venv's python, building the venv first when it is missing or holds other versions (one builder at a
    time: test workers running in parallel wait on a lock file beside the venv)."""
    import fcntl

    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _built_venv(venv)


def _built_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    stamp = venv / "aerialseg-pins.txt"
    if python.is_file() and stamp.is_file() and stamp.read_text() == "\n".join(PINS):
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True,
                       timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *PINS], check=True,
                       capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ReferenceUnavailable(f"cannot build the reference-tools venv in {venv}: {str(detail)[-300:]}") from exc
    stamp.write_text("\n".join(PINS))
    return python


def run_reference(jobs: list[dict[str, Any]], python: Path | None = None) -> list[dict[str, Any]]:
    """Run reference_runner.py jobs in the reference venv; returns its per-job results."""
    python = python or reference_venv()
    done = subprocess.run([str(python), str(RUNNER)], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=1800, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"reference runner failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def reference_masks(tool: str, label_files: list[Path], classes: dict[str, int], work: Path,
                     python: Path | None = None) -> list[np.ndarray]:
    """Class masks of `tool` ("labelme" or "xanylabeling") for each label file, in order."""
    jobs = [{"tool": tool, "json": str(path), "classes": classes, "out": str(work / f"{tool}-{i}.npy")}
            for i, path in enumerate(label_files)]
    run_reference(jobs, python)
    return [np.load(job["out"]) for job in jobs]
