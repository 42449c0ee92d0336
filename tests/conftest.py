"""Shared fixtures: the real public data beside the repo (skipped cleanly when absent)."""

import os
from pathlib import Path

import pytest

import aerialseg.models  # noqa: F401  (first: offline defaults, and the torchvision repair before smp/timm)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AERIALSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it skip when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set AERIALSEG_SHARED_DATA)")
    return SHARED_DATA


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the calling test when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use small tensors: one torch thread avoids OpenMP thrash on CI's 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
