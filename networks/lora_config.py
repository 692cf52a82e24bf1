"""--network_args strings -> a typed LoRA configuration, validated once.

sd-scripts passes `--network_args "conv_dim=4" "block_dims=2,2,..."` to `create_network` as string
kwargs. They are parsed here and nowhere else; the network sees only `RankPlan` and `LoRAConfig`.
Keys sd-scripts' networks.lora ignores are reported by name instead of silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from networks.lora_targets import TargetLayer

logger = logging.getLogger(__name__)

DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0

KNOWN_NETWORK_ARGS = frozenset({
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
})
_RANK_ARGS = frozenset({"conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"})


class NetworkArgsError(ValueError):
    """A --network_args value that cannot be used."""


def _number(kwargs: Mapping[str, Any], key: str, kind: type) -> Any:
    value = kwargs.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise NetworkArgsError(f"--network_args {key}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None


def _per_block(kwargs: Mapping[str, Any], key: str, kind: type, block_names: Sequence[str]) -> tuple | None:
    value = kwargs.get(key)
    if value is None:
        return None
    if not block_names:
        raise NetworkArgsError(f"--network_args {key}: this model family has no numbered blocks; use network_dim / conv_dim")
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        parsed = tuple(kind(str(item).strip()) for item in items)
    except ValueError:
        raise NetworkArgsError(f"--network_args {key}={value!r}: expected comma-separated {kind.__name__}s") from None
    if len(parsed) != len(block_names):
        raise NetworkArgsError(
            f"--network_args {key}: expected {len(block_names)} comma-separated values "
            f"({block_names[0]}..{block_names[-1]}), got {len(parsed)}"
        )
    return parsed


@dataclass(frozen=True)
class RankPlan:
    """Rank and alpha for each target layer.

    Three ways, as sd-scripts: one rank for Linear / 1x1 layers (+ `conv_dim` for kxk convs);
    per-block ranks (`block_dims` & co., indexed by the layout's block ids); or per-module ranks
    read from a LoRA file (`module_dims`). Rank 0 or None means "no LoRA on this layer".
    """

    dim: int = DEFAULT_DIM
    alpha: float = DEFAULT_ALPHA
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    module_dims: Mapping[str, int] | None = None
    module_alphas: Mapping[str, float] | None = None

    @property
    def with_conv(self) -> bool:
        """Whether conv containers (ResNet blocks, resamplers) are searched for layers at all."""
        return self.conv_dim is not None or self.conv_block_dims is not None or self.module_dims is not None

    def rank_for(self, layer: TargetLayer, per_block: bool) -> tuple[int, float] | None:
        """(rank, alpha) for a layer, or None to leave it alone. `per_block` is False for text encoders."""
        if self.module_dims is not None:
            dim = self.module_dims.get(layer.lora_name)
            return None if not dim else (dim, self.module_alphas.get(layer.lora_name, dim))
        if per_block and self.block_dims is not None and layer.block_index is not None:
            return self._block_rank(layer)
        if layer.is_conv_kxk:
            return (self.conv_dim, self.conv_alpha) if self.conv_dim else None
        return (self.dim, self.alpha) if self.dim else None

    def _block_rank(self, layer: TargetLayer) -> tuple[int, float] | None:
        block = layer.block_index
        if layer.is_conv_kxk:
            if self.conv_block_dims is None or not self.conv_block_dims[block]:
                return None
            return self.conv_block_dims[block], self.conv_block_alphas[block]
        return (self.block_dims[block], self.block_alphas[block]) if self.block_dims[block] else None

    @classmethod
    def from_network_args(cls, dim: int | None, alpha: float | None, kwargs: Mapping[str, Any],
                          block_names: Sequence[str]) -> RankPlan:
        """Ranks from --network_dim / --network_alpha and the rank-related --network_args."""
        dim = DEFAULT_DIM if dim is None else int(dim)
        alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
        conv_dim = _number(kwargs, "conv_dim", int)
        conv_alpha = _number(kwargs, "conv_alpha", float)
        if conv_alpha is None:
            conv_alpha = 1.0
        per_block = {key: _per_block(kwargs, key, kind, block_names) for key, kind in
                     (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int), ("conv_block_alphas", float))}
        if all(value is None for value in per_block.values()):
            return cls(dim, alpha, conv_dim, conv_alpha if conv_dim is not None else None)
        n = len(block_names)
        conv_block_dims = per_block["conv_block_dims"] or ((conv_dim,) * n if conv_dim is not None else None)
        return cls(
            dim, alpha, conv_dim, conv_alpha,
            block_dims=per_block["block_dims"] or (dim,) * n,
            block_alphas=per_block["block_alphas"] or (alpha,) * n,
            conv_block_dims=conv_block_dims,
            conv_block_alphas=per_block["conv_block_alphas"] or ((conv_alpha,) * n if conv_block_dims else None),
        )

    @classmethod
    def from_weights(cls, weights_sd: Mapping[str, Any]) -> RankPlan:
        """Per-module ranks from a LoRA state dict: rank = lora_down rows, alpha = `.alpha` (rank if absent)."""
        dims: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for key, value in weights_sd.items():
            name, _, leaf = key.partition(".")
            if leaf == "alpha":
                alphas[name] = float(value)
            elif leaf == "lora_down.weight":
                dims[name] = int(value.shape[0])
        return cls(module_dims=dims, module_alphas={name: alphas.get(name, float(dim)) for name, dim in dims.items()})


@dataclass(frozen=True)
class LoRAConfig:
    """Everything `create_network` takes from --network_args besides ranks."""

    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    unknown_args: tuple[str, ...] = field(default=())

    @classmethod
    def from_network_args(cls, kwargs: Mapping[str, Any]) -> LoRAConfig:
        unknown = tuple(sorted(key for key in kwargs if key not in KNOWN_NETWORK_ARGS))
        for key in ("rank_dropout", "module_dropout"):
            value = _number(kwargs, key, float)
            if value is not None and not 0.0 <= value < 1.0:
                raise NetworkArgsError(f"--network_args {key}={value}: expected a probability in [0, 1)")
        return cls(
            rank_dropout=_number(kwargs, "rank_dropout", float),
            module_dropout=_number(kwargs, "module_dropout", float),
            loraplus_lr_ratio=_number(kwargs, "loraplus_lr_ratio", float),
            loraplus_unet_lr_ratio=_number(kwargs, "loraplus_unet_lr_ratio", float),
            loraplus_text_encoder_lr_ratio=_number(kwargs, "loraplus_text_encoder_lr_ratio", float),
            unknown_args=unknown,
        )

    def warn_unknown(self) -> None:
        if self.unknown_args:
            logger.warning("networks.lora ignores these --network_args: %s", ", ".join(self.unknown_args))


def rank_args_in(kwargs: Mapping[str, Any]) -> list[str]:
    """The rank-related --network_args present (a file's own ranks override them)."""
    return sorted(key for key in kwargs if key in _RANK_ARGS)
