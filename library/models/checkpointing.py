"""Gradient checkpointing of one block, optionally keeping its saved inputs in CPU memory.

Non-reentrant checkpointing saves a block's inputs through the saved-tensor hooks active at call time,
so wrapping the call in `save_on_cpu` moves exactly those inputs to the CPU (pinned when they come from
CUDA) — sd-scripts' --cpu_offload_checkpointing.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

T = TypeVar("T")


def checkpointed(block: Callable[..., T], *inputs: torch.Tensor, cpu_offload: bool = False) -> T:
    """Run block(*inputs), recomputing it in the backward pass instead of storing its activations."""
    if not cpu_offload:
        return checkpoint(block, *inputs, use_reentrant=False)
    with torch.autograd.graph.save_on_cpu(pin_memory=inputs[0].is_cuda):
        return checkpoint(block, *inputs, use_reentrant=False)
