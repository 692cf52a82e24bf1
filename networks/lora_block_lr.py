"""Block-wise learning rates: sd-scripts' `down_lr_weight` / `mid_lr_weight` / `up_lr_weight` --network_args.

Each U-Net block's LoRA trains at the denoiser's learning rate times its block's weight. A down (or up) weight
is a comma-separated list with one value per block (down: shallow to deep, up: deep to shallow, as the U-Net
runs; an empty item is 0), or a preset curve over the blocks (`sine`, `cosine`, `linear`, `reverse_linear`,
`zeros`) with an optional `+offset` ("cosine+.25" runs 1.25 down to 0.25). `mid_lr_weight` lists the middle
block's weights. Weights not above `block_lr_zero_threshold` (default 0) become 0, and a block of weight 0
gets no LoRA at all. Which block ids the three lists cover is the layout's data (`BlockLrLayout`, in
`networks/lora_targets.py`); blocks outside them (SDXL's embedding and output ids) keep weight 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from networks.lora_config import NetworkArgsError
from networks.lora_targets import BLOCK_LR_WEIGHT_ARGS, BLOCK_LR_ZERO_THRESHOLD_ARG, ModuleTargets

logger = logging.getLogger(__name__)

# Preset curves over the n down (or up) blocks, block i of n; written as sd-scripts computes them, so a curve
# that reaches 0 reaches exactly 0 (and so drops its block at the default threshold).
PRESETS: dict[str, Callable[[int, int], float]] = {
    "sine": lambda i, n: math.sin(math.pi * (i / (n - 1)) / 2),
    "cosine": lambda i, n: math.sin(math.pi * ((n - 1 - i) / (n - 1)) / 2),
    "linear": lambda i, n: i / (n - 1),
    "reverse_linear": lambda i, n: (n - 1 - i) / (n - 1),
    "zeros": lambda i, n: 0.0,
}


@dataclass(frozen=True)
class BlockLr:
    """One denoiser block that has LoRA modules, with its learning-rate weight; `block` None: layers outside
    the numbered blocks, at weight 1."""

    block: int | None
    name: str
    weight: float

    @property
    def description(self) -> str:
        """The param group's name in logs (`lr/unet_block13`), as sd-scripts names it."""
        return "unet" if self.block is None else f"unet_block{self.block}"


@dataclass(frozen=True)
class BlockLrWeights:
    """A learning-rate weight for every block id of a denoiser layout."""

    weights: tuple[float, ...]
    names: tuple[str, ...]

    @property
    def zero_blocks(self) -> frozenset[int]:
        """Blocks that get no LoRA."""
        return frozenset(block for block, weight in enumerate(self.weights) if weight == 0)

    def block_lrs(self, blocks: Iterable[int | None]) -> list[BlockLr]:
        """The distinct blocks among `blocks` (those of the LoRA modules), in block order."""
        present = set(blocks)
        ordered = sorted(block for block in present if block is not None) + ([None] if None in present else [])
        return [BlockLr(None, "outside the blocks", 1.0) if block is None else
                BlockLr(block, self.names[block], self.weights[block]) for block in ordered]


def parse_block_lr_weights(kwargs: Mapping[str, Any], layout: ModuleTargets | None) -> BlockLrWeights | None:
    """The weights the --network_args ask for on this denoiser layout, or None when they ask for none."""
    given = [key for key in BLOCK_LR_WEIGHT_ARGS if kwargs.get(key) is not None]
    if not given:
        if kwargs.get(BLOCK_LR_ZERO_THRESHOLD_ARG) is not None and layout is not None and layout.block_lr is not None:
            logger.warning("--network_args %s has no effect without down_lr_weight, mid_lr_weight or up_lr_weight",
                           BLOCK_LR_ZERO_THRESHOLD_ARG)
        return None
    if layout is None or layout.block_lr is None:
        raise NetworkArgsError(
            f"--network_args {given[0]}: block-wise learning rates exist for the SD1/SD2 and SDXL U-Nets only "
            "(sd-scripts' SD3 LoRA has none; train_block_indices picks the SD3 joint blocks to train)")
    threshold = _threshold(kwargs)
    weights = [1.0] * len(layout.block_names)
    ranges = dict(zip(BLOCK_LR_WEIGHT_ARGS, (layout.block_lr.down, layout.block_lr.mid, layout.block_lr.up)))
    for key in given:
        blocks = ranges[key]
        names = [layout.block_names[block] for block in blocks]
        text = str(kwargs[key]).strip()
        values = _weight_list(key, text, names) if key == "mid_lr_weight" else _side_weights(key, text, names)
        for block, value in zip(blocks, values):
            weights[block] = value if value > threshold else 0.0
    result = BlockLrWeights(tuple(weights), tuple(layout.block_names))
    logger.info("block-wise learning rates: %s",
                ", ".join(f"{name} {weight:g}" for name, weight in zip(result.names, result.weights)))
    return result


def _threshold(kwargs: Mapping[str, Any]) -> float:
    value = kwargs.get(BLOCK_LR_ZERO_THRESHOLD_ARG)
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NetworkArgsError(f"--network_args {BLOCK_LR_ZERO_THRESHOLD_ARG}={value!r}: expected a number") from None


def _side_weights(key: str, text: str, names: Sequence[str]) -> list[float]:
    """A down or up list: comma-separated weights, or a preset name with an optional +offset."""
    if "," in text:
        return _weight_list(key, text, names)
    name, plus, offset = text.partition("+")
    if name not in PRESETS:
        expected = f"{len(names)} comma-separated weights ({names[0]}..{names[-1]}) or a preset: {', '.join(PRESETS)}"
        if _is_number(text):
            raise NetworkArgsError(f"--network_args {key}={text}: expected {expected}")
        raise NetworkArgsError(f"--network_args {key}={text}: unknown preset '{name}'; expected {expected} "
                               "(optionally +offset, e.g. cosine+.25)")
    base = 0.0
    if plus:
        if not _is_number(offset):
            raise NetworkArgsError(f"--network_args {key}={text}: the offset after '+' must be a number, e.g. {name}+.25")
        base = float(offset)
    return [PRESETS[name](i, len(names)) + base for i in range(len(names))]


def _weight_list(key: str, text: str, names: Sequence[str]) -> list[float]:
    items = [item.strip() for item in text.split(",")]
    if not all(item == "" or _is_number(item) for item in items):
        raise NetworkArgsError(f"--network_args {key}={text}: expected comma-separated numbers")
    if len(items) != len(names):
        expected = f"1 weight ({names[0]})" if len(names) == 1 else \
            f"{len(names)} comma-separated weights ({names[0]}..{names[-1]})"
        raise NetworkArgsError(f"--network_args {key}={text}: expected {expected}, got {len(items)}")
    return [float(item) if item else 0.0 for item in items]  # an empty item is 0, as sd-scripts reads it


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
