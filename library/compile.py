"""--torch_compile: the denoiser compiled block by block (regional compilation).

Each block that gradient checkpointing wraps is compiled on its own (`nn.Module.compile`, so parameter names and
state dicts are unchanged): the loop over blocks, checkpointing, block swap hooks and the LoRA network stay eager
Python around compiled blocks, and repeated blocks of one shape share one compiled graph. A compiled block fuses
its element-wise work and its LoRA adds, which is what an otherwise launch-bound step needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Compiled variants dynamo keeps per block: a few bucket shapes, training and eval.
VARIANTS_PER_BLOCK = 8


def compile_blocks(blocks: Sequence[nn.Module], backend: str) -> None:
    """Compile every block in place with `backend` (compilation happens on each block's first call)."""
    # All blocks of one class share their forward's code object, and dynamo caps the compiled variants of one
    # code object (8 by default): a U-Net's blocks all differ in width, so raise the cap to cover them.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), VARIANTS_PER_BLOCK * len(blocks)))
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
