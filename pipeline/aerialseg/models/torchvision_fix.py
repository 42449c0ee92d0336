"""Declare torchvision's nms/qnms op schemas when its C library cannot load.

The registry's torchvision 0.28.0 is a CUDA build; next to CPU torch its `_C.so` fails to
load and the import of torchvision (and so timm and smp) raises
``operator torchvision::nms does not exist``. Declaring the schemas lets the import finish;
only torchvision's C++ ops stay unavailable (aerialseg never uses them).
"""

import importlib.util
from pathlib import Path

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _c_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision absent: nothing to fix
    libs = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def patch_torchvision_ops() -> None:
    """Define torchvision::nms and torchvision::qnms when the C library did not register them."""
    if _c_library_loads():
        return
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", _SCHEMA)
        except RuntimeError:
            pass  # already defined (re-import)
