"""aerialseg: labelled drone surveys to land-cover models and georeferenced maps.

Importing the package first sets offline defaults and repairs torchvision's missing C
ops on CPU torch (see ../shared/research/environment.md), so timm and smp import cleanly.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made steps 10-50x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from aerialseg._torchvision_fix import patch_torchvision_ops  # noqa: E402

patch_torchvision_ops()

__version__ = "0.1.0"
