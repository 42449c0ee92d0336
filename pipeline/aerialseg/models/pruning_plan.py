"""Pruning plans: the channel-removal history of a pruned model, replayed on a fresh model at load time.

``aerialseg.compression.prune`` records the plan (torch-pruning's history, plain JSON in model.json);
``aerialseg.models.registry.load_model`` replays it before loading the pruned weights.
"""

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from aerialseg.core.errors import AerialsegError

PLAN_FORMAT = "torch-pruning-history/1"


def apply_pruning_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Replay a saved plan on a freshly built model of the same architecture (in place)."""
    if plan.get("format") != PLAN_FORMAT:
        raise AerialsegError(f"unknown pruning plan format {plan.get('format')!r}", fix="re-run `aerialseg prune`")
    size = int(plan["example_size"])
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, int(plan["in_channels"]), size, size))
    try:
        graph.load_pruning_history([tuple(item) for item in plan["history"]])
    except (AttributeError, IndexError, RuntimeError) as exc:
        raise AerialsegError(f"pruning plan does not fit the model ({type(exc).__name__})",
                             fix="check model.json names the model that was pruned") from None
    return model
