"""aerialseg: labelled drone surveys to land-cover models and georeferenced maps.

Importing the package sets offline defaults only; it imports no torch, so `aerialseg --help` and the
torch-free stages start fast. The torchvision repair (CPU torch next to a CUDA torchvision build, see
../shared/research/environment.md) runs in `aerialseg.models`, where models are built.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made steps 10-50x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
