"""Fail the install loudly if a CUDA build of torch or any NVIDIA/Triton package slipped in."""

import importlib.metadata as md
import sys

import torch

bad = sorted(
    d.metadata["Name"]
    for d in md.distributions()
    if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("nvidia-", "triton"))
)
if torch.version.cuda is not None or bad:
    sys.exit(
        f"install error: CUDA packages present (torch {torch.__version__}, cuda={torch.version.cuda}, "
        f"{', '.join(bad) or 'no nvidia dists'}); remove .venv and rerun tools/install.sh"
    )
print(f"install ok: torch {torch.__version__} (CPU), no CUDA packages")
