"""--network_args strings -> a typed LoRA configuration, validated once.

sd-scripts passes `--network_args "conv_dim=4" "block_dims=2,2,..."` to `create_network` as string
kwargs. They are parsed here and nowhere else; the network sees only `RankPlan` and `LoRAConfig`.
Keys sd-scripts' networks.lora ignores are reported by name instead of silently dropped. Family
args (SD3's `emb_dims`, `train_block_indices`, `x_attn_dim` & co., `train_t5xxl`) are accepted
where the model's target layout declares them (`ModuleTargets.accepted_args`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from networks.lora_targets import ModuleTargets, TargetLayer

logger = logging.getLogger(__name__)

DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0

KNOWN_NETWORK_ARGS = frozenset({
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "verbose",
})
_RANK_ARGS = frozenset({"conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                        "emb_dims", "train_block_indices"})


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
        raise NetworkArgsError(f"--network_args {key}: this model family has no per-block ranks; "
                               "use network_dim / conv_dim (SD3: train_block_indices and the per-part *_dim args)")
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


def _flag(kwargs: Mapping[str, Any], key: str) -> bool:
    """A boolean --network_arg: sd-scripts passes the strings "True" / "False"."""
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise NetworkArgsError(f"--network_args {key}={value!r}: expected True or False")
    return text == "true"


def _rank(kwargs: Mapping[str, Any], key: str) -> int | None:
    value = _number(kwargs, key, int)
    if value is not None and value < 0:
        raise NetworkArgsError(f"--network_args {key}={value}: a rank must be 0 (no LoRA) or more")
    return value


def _emb_dims(kwargs: Mapping[str, Any], roots: Sequence[str]) -> dict[str, int]:
    value = kwargs.get("emb_dims")
    if value is None:
        return {}
    if not roots:
        raise NetworkArgsError("--network_args emb_dims: this model family has no embedder layers to train")
    items = value if isinstance(value, (list, tuple)) else str(value).strip().removeprefix("[").removesuffix("]").split(",")
    names = ", ".join(roots)
    try:
        dims = [int(str(item).strip()) for item in items]
    except ValueError:
        raise NetworkArgsError(
            f"--network_args emb_dims={value!r}: expected {len(roots)} comma-separated integers ({names})") from None
    if len(dims) != len(roots) or min(dims) < 0:
        raise NetworkArgsError(f"--network_args emb_dims={value!r}: expected {len(roots)} ranks >= 0 ({names})")
    return dict(zip(roots, dims))


def parse_block_selection(value: str) -> frozenset[int] | None:
    """sd-scripts' `train_block_indices`: "all" (None: every block), "none" or "" (no block), or indices
    and inclusive ranges such as "0-5,10"."""
    text = value.strip()
    if text == "all":
        return None
    if text in ("", "none"):
        return frozenset()
    selected: set[int] = set()
    for item in text.split(","):
        start, _, end = item.strip().partition("-")
        try:
            first, last = int(start), int(end if end else start)
        except ValueError:
            raise NetworkArgsError(f"--network_args train_block_indices={value!r}: '{item}' is not an index or a range "
                                   "like 0-5") from None
        if first < 0 or last < first:
            raise NetworkArgsError(f"--network_args train_block_indices={value!r}: '{item}' is not a valid range")
        selected.update(range(first, last + 1))
    return frozenset(selected)


@dataclass(frozen=True)
class RankPlan:
    """Rank and alpha for each target layer.

    Three ways, as sd-scripts: one rank for Linear / 1x1 layers (+ `conv_dim` for kxk convs);
    per-block ranks (`block_dims` & co., indexed by the layout's block ids); or per-module ranks
    read from a LoRA file (`module_dims`). Rank 0 or None means "no LoRA on this layer".
    On top of the first way, `part_dims` overrides the rank per layout part (SD3's `x_attn_dim` & co.)
    and ranks opt-in layers (SD3's `emb_dims`, keyed by root), and `train_blocks` keeps only the
    layers of those block ids (None: all). `zero_lr_blocks` are blocks whose block-wise learning rate is 0
    (networks/lora_block_lr.py): as in sd-scripts, they get no LoRA.
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
    part_dims: Mapping[str, int] | None = None
    train_blocks: frozenset[int] | None = None
    zero_lr_blocks: frozenset[int] = frozenset()

    @property
    def with_conv(self) -> bool:
        """Whether conv containers (ResNet blocks, resamplers) are searched for layers at all."""
        return self.conv_dim is not None or self.conv_block_dims is not None or self.module_dims is not None

    def rank_for(self, layer: TargetLayer, per_block: bool) -> tuple[int, float] | None:
        """(rank, alpha) for a layer, or None to leave it alone. `per_block` is False for text encoders."""
        if self.module_dims is not None:
            dim = self.module_dims.get(layer.lora_name)
            return None if not dim else (dim, self.module_alphas.get(layer.lora_name, dim))
        if layer.opt_in:
            return self._opt_in_rank(layer)
        if per_block and self.train_blocks is not None and layer.block_index is not None \
                and layer.block_index not in self.train_blocks:
            return None
        if per_block and layer.block_index in self.zero_lr_blocks:
            return None
        if per_block and self.block_dims is not None and layer.block_index is not None:
            return self._block_rank(layer)
        if layer.is_conv_kxk:
            return (self.conv_dim, self.conv_alpha) if self.conv_dim else None
        dim = self.part_dims.get(layer.part, self.dim) if self.part_dims and layer.part else self.dim
        return (dim, self.alpha) if dim else None

    def _opt_in_rank(self, layer: TargetLayer) -> tuple[int, float] | None:
        # As sd-scripts' emb_dims: a kxk conv (the patch embedder) takes conv_dim when one is set.
        if not self.part_dims or layer.part not in self.part_dims:
            return None
        if layer.is_conv_kxk and self.conv_dim:
            return self.conv_dim, self.conv_alpha
        dim = self.part_dims[layer.part]
        return (dim, self.alpha) if dim else None

    def _block_rank(self, layer: TargetLayer) -> tuple[int, float] | None:
        block = layer.block_index
        if layer.is_conv_kxk:
            if self.conv_block_dims is None or not self.conv_block_dims[block]:
                return None
            return self.conv_block_dims[block], self.conv_block_alphas[block]
        return (self.block_dims[block], self.block_alphas[block]) if self.block_dims[block] else None

    @classmethod
    def from_network_args(cls, dim: int | None, alpha: float | None, kwargs: Mapping[str, Any],
                          layout: ModuleTargets | None) -> RankPlan:
        """Ranks from --network_dim / --network_alpha and the rank-related --network_args of the
        denoiser's layout (None: no denoiser)."""
        dim = DEFAULT_DIM if dim is None else int(dim)
        alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
        conv_dim = _number(kwargs, "conv_dim", int)
        conv_alpha = _number(kwargs, "conv_alpha", float)
        if conv_alpha is None:
            conv_alpha = 1.0
        layout_args = _layout_rank_args(kwargs, layout)
        block_names = layout.block_names if layout is not None else ()
        per_block = {key: _per_block(kwargs, key, kind, block_names) for key, kind in
                     (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int), ("conv_block_alphas", float))}
        if all(value is None for value in per_block.values()):
            return cls(dim, alpha, conv_dim, conv_alpha if conv_dim is not None else None, **layout_args)
        n = len(block_names)
        conv_block_dims = per_block["conv_block_dims"] or ((conv_dim,) * n if conv_dim is not None else None)
        return cls(
            dim, alpha, conv_dim, conv_alpha,
            block_dims=per_block["block_dims"] or (dim,) * n,
            block_alphas=per_block["block_alphas"] or (alpha,) * n,
            conv_block_dims=conv_block_dims,
            conv_block_alphas=per_block["conv_block_alphas"] or ((conv_alpha,) * n if conv_block_dims else None),
            **layout_args,
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


def _layout_rank_args(kwargs: Mapping[str, Any], layout: ModuleTargets | None) -> dict[str, Any]:
    """`part_dims` and `train_blocks` for RankPlan from the args the layout declares (others are left to
    LoRAConfig's unknown-args warning)."""
    if layout is None:
        return {}
    part_dims = {part: rank for part in layout.part_names if (rank := _rank(kwargs, f"{part}_dim")) is not None}
    part_dims.update(_emb_dims(kwargs, layout.opt_in_roots))
    selection = kwargs.get("train_block_indices") if layout.block_selection else None
    return {
        "part_dims": part_dims or None,
        "train_blocks": None if selection is None else parse_block_selection(str(selection)),
    }


@dataclass(frozen=True)
class LoRAConfig:
    """Everything `create_network` takes from --network_args besides ranks."""

    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    unknown_args: tuple[str, ...] = field(default=())
    switches: frozenset[str] = frozenset()  # the boolean family args set to True (e.g. train_t5xxl)
    verbose: bool = False

    @classmethod
    def from_network_args(cls, kwargs: Mapping[str, Any], family_args: frozenset[str] = frozenset(),
                          switch_args: frozenset[str] = frozenset()) -> LoRAConfig:
        """`family_args`: the model's own accepted args; `switch_args`: those of them that are booleans
        enabling a layout (see `ModuleTargets.enabled_by`)."""
        unknown = tuple(sorted(key for key in kwargs if key not in KNOWN_NETWORK_ARGS | family_args))
        for key in ("rank_dropout", "module_dropout"):
            value = _number(kwargs, key, float)
            if value is not None and not 0.0 <= value < 1.0:
                raise NetworkArgsError(f"--network_args {key}={value}: expected a probability in [0, 1)")
        if "split_qkv" in family_args and _flag(kwargs, "split_qkv"):
            raise NetworkArgsError("--network_args split_qkv=True is not supported: qkv is trained as one fused LoRA "
                                   "(the file layout is the same); drop the arg")
        return cls(
            rank_dropout=_number(kwargs, "rank_dropout", float),
            module_dropout=_number(kwargs, "module_dropout", float),
            loraplus_lr_ratio=_number(kwargs, "loraplus_lr_ratio", float),
            loraplus_unet_lr_ratio=_number(kwargs, "loraplus_unet_lr_ratio", float),
            loraplus_text_encoder_lr_ratio=_number(kwargs, "loraplus_text_encoder_lr_ratio", float),
            unknown_args=unknown,
            switches=frozenset(key for key in switch_args if _flag(kwargs, key)),
            verbose=_flag(kwargs, "verbose"),
        )

    def warn_unknown(self) -> None:
        if self.unknown_args:
            logger.warning("networks.lora ignores these --network_args: %s", ", ".join(self.unknown_args))


def rank_args_in(kwargs: Mapping[str, Any]) -> list[str]:
    """The rank-related --network_args present (a file's own ranks override them), per-part "*_dim" included."""
    return sorted(key for key in kwargs if key in _RANK_ARGS or key.endswith("_dim"))
