"""LoRA for every model family, with sd-scripts' `--network_module` contract.

`create_network` / `create_network_from_weights` build one generic `LoRANetwork` over the layers a
family's target layout names (`networks/lora_targets.py`); --network_args are parsed in
`networks/lora_config.py`. A LoRA module adds `up(down(x)) * multiplier * alpha / rank` to a Linear or
Conv2d by replacing that layer's `forward`, so the base model is never re-wired and the network's
state dict holds only `{name}.lora_down.weight`, `{name}.lora_up.weight` and `{name}.alpha`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.saving import save_lora_file
from networks.lora_block_lr import BlockLr, BlockLrWeights, parse_block_lr_weights
from networks.lora_config import LoRAConfig, NetworkArgsError, RankPlan, rank_args_in
from networks.lora_family import guess_lora_family
from networks.lora_targets import (
    ModuleTargets,
    NetworkTargets,
    TargetLayer,
    find_target_layers,
    resolve_targets,
)
from networks.lora_weights_check import check_weights_fit, read_lora_metadata

logger = logging.getLogger(__name__)


def lora_delta_weight(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """The weight change a LoRA makes, shaped like its base layer's weight.

    Linear: scale * up @ down. Conv (down kxk, up 1x1): the 1x1 conv after a kxk conv is one kxk conv
    with kernel W[o, i] = sum_r up[o, r] * down[r, i], so the same product over flattened kernels.
    """
    out_dim, rank = up.shape[0], down.shape[0]
    product = up.reshape(out_dim, rank) @ down.reshape(rank, -1)
    return product.reshape(out_dim, *down.shape[1:]) * scale


def max_norm_ratio(norm: float, max_norm: float) -> float:
    """--scale_weight_norms: the factor that brings ||dW|| down to `max_norm` (1 when already within)."""
    return max_norm / norm if norm > max_norm else 1.0


class LoRAModule(nn.Module):
    """A low-rank adapter on one Linear or Conv2d.

    lora_down mirrors the base layer's input side (Linear in->r, or a kxk conv with its stride and
    padding), lora_up maps r->out (Linear or 1x1 conv). Initialised as sd-scripts (and Microsoft's
    LoRA): down kaiming-uniform, up zero, so a fresh network changes nothing.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | Tensor | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.lora_down, self.lora_up = _make_down_up(lora_name, org_module, lora_dim)
        if isinstance(alpha, Tensor):
            alpha = float(alpha.detach().float())
        alpha = float(lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A plain attribute, not a child: the base layer must stay out of the network's state dict.
        object.__setattr__(self, "org_module", org_module)
        self.org_forward = None
        self._casts: tuple[Tensor, Tensor] | None = None  # see _linear_weights
        self._cast_key: tuple | None = None

    @property
    def is_applied(self) -> bool:
        return self.org_forward is not None

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (idempotent)."""
        if self.is_applied:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        if self.is_applied:
            self.org_module.forward = self.org_forward
            self.org_forward = None

    def forward(self, x: Tensor) -> Tensor:
        base = self.org_forward(x)
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            return base
        linear = isinstance(self.lora_down, nn.Linear)
        if linear:
            down, up = self._linear_weights(x)
            lx = F.linear(x, down)
        else:
            lx = self.lora_down(x)
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller: keep the expected update
        if linear:
            # base + s * lx @ up^T as one GEMM epilogue: two fewer kernels (and output round trips) per layer
            # than mm, mul, add, and one rounding instead of three in half precision.
            out = torch.addmm(base.reshape(-1, base.shape[-1]), lx.reshape(-1, lx.shape[-1]), up.t(),
                              alpha=self.multiplier * scale)
            return out.view(base.shape)
        return base + self.lora_up(lx) * (self.multiplier * scale)

    def _linear_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """lora_down's and lora_up's weights as the matmuls use them. Under autocast with gradients on, their
        half-precision casts are kept from the forward until backward has used them: gradient checkpointing's
        recompute then reuses them instead of casting again (autocast's own cast cache ends with its region,
        before backward). A changed weight (optimizer step, loaded state) has a new version and is cast anew."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if torch.compiler.is_compiling():  # a compiled block casts inside its own graph (and recompiles none of this)
            return down, up
        device_type = x.device.type
        if not (torch.is_grad_enabled() and torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type)):
            return down, up
        dtype = torch.get_autocast_dtype(device_type)
        if down.dtype == dtype and up.dtype == dtype:
            return down, up
        key = (dtype, down._version, up._version)
        if self._casts is None or self._cast_key != key:
            casts = (down.to(dtype), up.to(dtype))
            if casts[0].requires_grad:
                # down's gradient comes last in backward, after any recompute of this layer: then let the casts go.
                casts[0].register_hook(self._forget_casts)
            self._casts, self._cast_key = casts, key
        return self._casts

    def _forget_casts(self, grad: Tensor) -> None:
        self._casts = self._cast_key = None

    def _rank_mask(self, lx: Tensor) -> Tensor:
        """A keep-mask over (batch, rank), broadcast over tokens (Linear) or pixels (conv)."""
        keep = torch.rand((lx.shape[0], self.lora_dim), device=lx.device) > self.rank_dropout
        if isinstance(self.lora_down, nn.Conv2d):
            return keep[:, :, None, None]
        return keep.view(lx.shape[0], *([1] * (lx.dim() - 2)), self.lora_dim)

    def delta_weight(self, weights: Mapping[str, Tensor] | None = None, device: torch.device | str | None = None) -> Tensor:
        """multiplier * dW in float32, from this module's weights or a file's `lora_down.weight`,
        `lora_up.weight` (and `alpha`; rank when absent) for this layer."""
        if weights is None:
            down, up, scale = self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.scale
        else:
            down, up = weights["lora_down.weight"], weights["lora_up.weight"]
            scale = float(weights.get("alpha", down.shape[0])) / down.shape[0]
        delta = lora_delta_weight(down.to(device, torch.float32), up.to(device, torch.float32), scale)
        return delta * self.multiplier

    def merge_to(self, weights: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add multiplier * dW into the base weight, summing in float32 on `device`; the runtime path is removed.

        `dtype` is accepted for sd-scripts callers; the merged weight keeps its layer's dtype, so no extra
        rounding happens (sd-scripts rounds through `dtype`, e.g. a float32 text encoder through bf16).
        """
        self.restore()
        weight = self.org_module.weight
        merged = weight.detach().to(device, torch.float32) + self.delta_weight(weights, device)
        with torch.no_grad():
            weight.copy_(merged)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # Loaded weights bring their own alpha; the scale must follow it or training and file disagree.
        self.scale = float(self.alpha.float()) / self.lora_dim


def _make_down_up(lora_name: str, org_module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    if isinstance(org_module, nn.Conv2d):
        if org_module.groups != 1:
            raise ValueError(f"{lora_name}: LoRA on a grouped Conv2d (groups={org_module.groups}) is not supported")
        down = nn.Conv2d(org_module.in_channels, rank, org_module.kernel_size, org_module.stride,
                         org_module.padding, org_module.dilation, bias=False)
        return down, nn.Conv2d(rank, org_module.out_channels, 1, bias=False)
    if isinstance(org_module, nn.Linear):
        return nn.Linear(org_module.in_features, rank, bias=False), nn.Linear(rank, org_module.out_features, bias=False)
    raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")


class LoRANetwork(nn.Module):
    """All LoRA modules of one training run: the text encoders' and the denoiser's.

    Modules are registered under their LoRA names at construction, so `state_dict()` and
    `load_weights` work before `apply_to`; `apply_to` drops the parts that will not be trained.
    """

    def __init__(self, text_encoder: nn.Module | Sequence[nn.Module | None] | None, unet: nn.Module | None,
                 ranks: RankPlan, multiplier: float = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 targets: NetworkTargets | None = None):
        super().__init__()
        text_encoders = _as_list(text_encoder)
        # Layouts behind a switch (T5: train_t5xxl) stay off unless the caller passes targets with them on.
        targets = targets or resolve_targets(text_encoders, unet).enabled(frozenset())
        self.multiplier = multiplier
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weights: BlockLrWeights | None = None
        make = {"ranks": ranks, "multiplier": multiplier, "dropout": dropout, "rank_dropout": rank_dropout,
                "module_dropout": module_dropout}
        self.text_encoder_groups: list[list[LoRAModule]] = []
        self.skipped_names: list[str] = []  # targeted layers that a rank of 0 leaves alone (for verbose logs)
        for i, (encoder, layout) in enumerate(zip(text_encoders, targets.text_encoders)):
            number = "" if len(text_encoders) == 1 else str(i + 1)  # lora_te, or lora_te1, lora_te2, ...
            prefix = layout.prefix + number if layout else ""
            self.text_encoder_groups.append(_create_modules(encoder, layout, prefix, self.skipped_names, per_block=False, **make))
        self.unet_block_of: dict[str, int | None] = {}  # denoiser LoRA name -> its block id (block-wise learning rates)
        self.unet_loras = [] if unet is None else _create_modules(unet, targets.denoiser, targets.denoiser.prefix,
                                                                  self.skipped_names, per_block=True,
                                                                  block_of=self.unet_block_of, **make)
        for lora in self._all_loras():
            if hasattr(self, lora.lora_name):
                raise ValueError(f"duplicated LoRA name {lora.lora_name}: two layers map to one name")
            self.add_module(lora.lora_name, lora)
        # The family of the model, from the names of every layer it offers (messages about files of another family).
        self.model_family = guess_lora_family([lora.lora_name for lora in self._all_loras()] + self.skipped_names)
        logger.info("LoRA: %d text-encoder modules, %d U-Net modules", len(self.text_encoder_loras), len(self.unet_loras))

    @property
    def text_encoder_loras(self) -> list[LoRAModule]:
        return [lora for group in self.text_encoder_groups for lora in group]

    @property
    def train_t5xxl(self) -> bool:
        """sd-scripts' SD3 trainer reads this: whether the T5 text encoder (lora_te3) has LoRA modules."""
        return any(lora.lora_name.startswith("lora_te3_") for lora in self.text_encoder_loras)

    def _all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def log_modules(self) -> None:
        """--network_args verbose=True: every module with its rank and alpha, then the skipped layers."""
        for lora in self._all_loras():
            logger.info("  %-60s rank %d, alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))
        if self.skipped_names:
            logger.info("%d layers skipped because their rank is 0: %s", len(self.skipped_names), ", ".join(self.skipped_names))

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the LoRA modules into their layers; parts not applied are removed from the network."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_groups = [[] for _ in self.text_encoder_groups]
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self._all_loras():
            lora.apply_to()

    def _drop(self, loras: Iterable[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self._all_loras():
            lora.multiplier = multiplier

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None,
                              loraplus_text_encoder_lr_ratio: float | None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_block_lr_weights(self, weights: BlockLrWeights | None) -> None:
        """Block-wise learning rates for the denoiser's LoRA (None: one rate for all of it)."""
        self.block_lr_weights = weights

    def unet_block_lrs(self) -> list[BlockLr] | None:
        """The denoiser blocks that have LoRA modules, with their learning-rate weights (None: not block-wise)."""
        if self.block_lr_weights is None:
            return None
        return self.block_lr_weights.block_lrs(self.unet_block_of.get(lora.lora_name) for lora in self.unet_loras)

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """Optimizer param groups and one description per group ("textencoder", "unet", "… plus").

        `text_encoder_lr` is one value, one per text encoder (a short list repeats its last value, as
        sd-scripts' --text_encoder_lr nargs='*'), or None for `default_lr`. LoRA+ puts each part's
        lora_up weights in a "plus" group at lr * ratio. With block-wise learning rates the denoiser has
        one group per block ("unet_block13", ...) at its lr * the block's weight. Groups with lr 0 are
        left out (frozen).
        """
        self.requires_grad_(True)
        plans = plan_param_groups(
            text_encoder_lr, unet_lr, default_lr, text_encoder_parts=[bool(loras) for loras in self.text_encoder_groups],
            has_unet=bool(self.unet_loras), text_encoder_plus_ratio=self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
            unet_plus_ratio=self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, unet_blocks=self.unet_block_lrs())
        groups = []
        for plan in plans:
            params = [param for lora in self._group_loras(plan) for name, param in lora.named_parameters()
                      if plan.selects(name)]
            groups.append({"params": params} if plan.lr is None else {"params": params, "lr": plan.lr})
        return groups, [plan.description for plan in plans]

    def _group_loras(self, plan: ParamGroupPlan) -> list[LoRAModule]:
        if plan.part is not None:
            return self.text_encoder_groups[plan.part]
        if plan.block is None:
            return self.unet_loras
        return [lora for lora in self.unet_loras if self.unet_block_of.get(lora.lora_name) == plan.block.block]

    def enable_gradient_checkpointing(self) -> None:
        """LoRA layers hold no activations worth checkpointing; the call exists for sd-scripts callers."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder, unet, weights_sd: Mapping[str, Tensor], dtype: torch.dtype | None,
                 device: torch.device | str | None) -> None:
        """Add the LoRA deltas stored in `weights_sd` into the base weights (--base_weights, merging tools)."""
        per_module: dict[str, dict[str, Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, leaf = key.partition(".")
            per_module.setdefault(name, {})[leaf] = value
        consumed = 0
        for lora in self._all_loras():
            own = per_module.get(lora.lora_name, {})
            if "lora_down.weight" in own:
                lora.merge_to(own, dtype, device)
                consumed += len(own)
        if consumed < len(weights_sd):
            logger.warning("merge: %d of %d LoRA tensors match no layer of this model", len(weights_sd) - consumed, len(weights_sd))

    def load_weights(self, file: str) -> Any:
        """Load a LoRA file into this network (non-strict, as sd-scripts); returns the missing/unexpected keys.
        A file of another family (no module matches) or of other ranks is a ValueError naming the file."""
        weights = load_lora_state_dict(file)
        check_weights_fit(str(file), {key: value.shape for key, value in weights.items()},
                          {key: value.shape for key, value in self.state_dict().items()}, self.model_family,
                          read_lora_metadata(file))
        info = self.load_state_dict(weights, strict=False)
        if info.missing_keys or info.unexpected_keys:
            logger.warning("%s: %d keys missing, %d unexpected (first unexpected: %s)", file, len(info.missing_keys),
                           len(info.unexpected_keys), info.unexpected_keys[:3])
        return info

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the LoRA atomically: safetensors with metadata and sshs_* hashes, or .ckpt/.pt state dicts."""
        save_lora_file(Path(file), self.state_dict(), metadata or None, dtype=dtype)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str) -> tuple[int, float, float]:
        """--scale_weight_norms: shrink each module whose ||dW|| exceeds the limit, splitting the factor
        evenly between up and down. Returns (modules scaled, mean norm, max norm) after scaling."""
        keys_scaled, norms = 0, []
        for lora in self._all_loras():
            down, up = lora.lora_down.weight, lora.lora_up.weight
            norm = float(lora_delta_weight(down.to(device, torch.float32), up.to(device, torch.float32), lora.scale).norm())
            ratio = max_norm_ratio(norm, max_norm_value)
            if ratio != 1.0:
                keys_scaled += 1
                down.mul_(ratio ** 0.5)
                up.mul_(ratio ** 0.5)
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def _as_list(text_encoder: nn.Module | Sequence[nn.Module | None] | None) -> list[nn.Module | None]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _create_modules(model: nn.Module | None, layout: ModuleTargets | None, prefix: str, skipped: list[str],
                    ranks: RankPlan, per_block: bool, block_of: dict[str, int | None] | None = None,
                    **module_args: Any) -> list[LoRAModule]:
    """The LoRA modules of one model; `skipped` collects the targeted layers left alone, `block_of` each
    module's block id."""
    if model is None or layout is None:
        return []
    layers = find_target_layers(model, layout, prefix, ranks.with_conv)
    if per_block:
        _check_block_selection(ranks, layers)
    loras = []
    for layer in layers:
        rank = ranks.rank_for(layer, per_block)
        if rank is not None:
            loras.append(LoRAModule(layer.lora_name, layer.module, lora_dim=rank[0], alpha=rank[1], **module_args))
            if block_of is not None:
                block_of[layer.lora_name] = layer.block_index
        elif not layer.opt_in:
            skipped.append(layer.lora_name)
    return loras


def _check_block_selection(ranks: RankPlan, layers: Sequence[TargetLayer]) -> None:
    if not ranks.train_blocks:
        return
    present = {layer.block_index for layer in layers if layer.block_index is not None}
    absent = sorted(ranks.train_blocks - present)
    if absent:
        raise NetworkArgsError(f"--network_args train_block_indices: block {absent[0]} does not exist; "
                               f"this model has blocks 0-{max(present, default=-1)}")


def _text_encoder_lrs(text_encoder_lr: float | Sequence[float] | None, count: int, default_lr: float | None) -> list[float | None]:
    if count == 0:  # nothing to spread the rates over (e.g. a dry run that could not read the model's header)
        return []
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
        return [default_lr] * count
    if not isinstance(text_encoder_lr, (list, tuple)):
        return [float(text_encoder_lr)] * count
    if len(text_encoder_lr) > count:
        logger.warning("--text_encoder_lr has %d values for %d text encoders; the rest are ignored", len(text_encoder_lr), count)
    values = [float(v) for v in text_encoder_lr[:count]]
    return values + [values[-1]] * (count - len(values))


@dataclass(frozen=True)
class ParamGroupPlan:
    """One optimizer param group, decided from the flags alone: which part, which weights, which learning rate."""

    description: str  # "textencoder", "textencoder 2", "unet", "unet plus", ...
    part: int | None  # index of the text encoder, None for the denoiser
    lr: float | None  # None: the optimizer's own --learning_rate
    plus: bool = False  # LoRA+: this group holds the part's lora_up weights
    split: bool = False  # LoRA+ is on for this part, so its lora_up weights live in the "plus" group
    block: BlockLr | None = None  # block-wise learning rates: the denoiser block whose LoRA this group holds

    @property
    def label(self) -> str:
        """The description, with the block's name and weight when the group is one block's."""
        if self.block is None:
            return self.description
        return f"{self.description} ({self.block.name}, weight {self.block.weight:g})"

    def selects(self, param_name: str) -> bool:
        """Whether a LoRA module's parameter (`lora_down.weight`, `lora_up.weight`) belongs to this group."""
        is_up = param_name.startswith("lora_up")
        return is_up if self.plus else not (self.split and is_up)


def plan_param_groups(text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None,
                      *, text_encoder_parts: Sequence[bool], has_unet: bool, text_encoder_plus_ratio: float | None = None,
                      unet_plus_ratio: float | None = None, unet_blocks: Sequence[BlockLr] | None = None
                      ) -> list[ParamGroupPlan]:
    """The param groups `prepare_optimizer_params` builds, without any model: `text_encoder_parts` says which
    text encoders have LoRA modules, `has_unet` whether the denoiser has, `unet_blocks` its blocks with their
    learning-rate weights (None: one group for the denoiser). Groups with lr 0 are left out."""
    plans: list[ParamGroupPlan] = []
    te_lrs = _text_encoder_lrs(text_encoder_lr, len(text_encoder_parts), default_lr)
    for i, (present, lr) in enumerate(zip(text_encoder_parts, te_lrs)):
        name = "textencoder" if len(text_encoder_parts) == 1 else f"textencoder {i + 1}"
        if present:
            plans += _part_plans(name, i, lr, text_encoder_plus_ratio)
    if has_unet:
        lr = unet_lr if unet_lr is not None else default_lr
        if unet_blocks is None:
            plans += _part_plans("unet", None, lr, unet_plus_ratio)
        else:
            for block in unet_blocks:
                plans += _part_plans(block.description, None, _block_lr(lr, block), unet_plus_ratio, block)
    return plans


def _block_lr(lr: float | None, block: BlockLr) -> float | None:
    if block.weight == 1.0:
        return lr
    if lr is None:
        raise NetworkArgsError("block-wise learning rates (down/mid/up_lr_weight) need a learning rate: "
                               "set --learning_rate or --unet_lr")
    return lr * block.weight


def _part_plans(name: str, part: int | None, lr: float | None, plus_ratio: float | None,
                block: BlockLr | None = None) -> list[ParamGroupPlan]:
    split = plus_ratio is not None
    candidates = [(ParamGroupPlan(name, part, lr, split=split, block=block), 1.0)]
    if split:
        candidates.append((ParamGroupPlan(f"{name} plus", part, lr, plus=True, split=True, block=block), plus_ratio))
    plans = []
    for plan, factor in candidates:
        if lr == 0:
            logger.info("%s: learning rate 0, its LoRA weights are not trained", plan.description)
            continue
        if lr is None and factor != 1.0:
            raise NetworkArgsError("loraplus ratios need a learning rate: set --learning_rate / --unet_lr / --text_encoder_lr")
        plans.append(plan if lr is None else dataclasses.replace(plan, lr=lr * factor))
    return plans


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, Tensor]:
    """A LoRA file's tensors (.safetensors, or a torch state dict read with weights_only); an empty or unreadable
    file is a ValueError naming it."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights file not found: {path} (check --network_weights / --base_weights)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the LoRA file is empty (0 bytes); was it saved or downloaded completely?")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a malformed pickle fails in torch's unpickler with any error type; the file is at fault

        raise ValueError(f"{path}: not a state dict torch.load can read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'})") from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path}: holds {type(state).__name__}, not a state dict of tensors")
    return state


def _check_dropout(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise NetworkArgsError(f"{name}={value}: expected a probability in [0, 1)")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs: Any) -> LoRANetwork:
    """sd-scripts' entry point: a LoRA over the family's default targets, ranks from the flags."""
    _check_dropout("--network_dropout", neuron_dropout)
    text_encoders = _as_list(text_encoder)
    targets = resolve_targets(text_encoders, unet)
    block_lr = parse_block_lr_weights(kwargs, targets.denoiser)
    config = _config(kwargs, targets)
    targets = targets.enabled(config.switches)  # e.g. T5 only with train_t5xxl=True
    ranks = RankPlan.from_network_args(network_dim, network_alpha, kwargs, targets.denoiser)
    if block_lr is not None:
        ranks = dataclasses.replace(ranks, zero_lr_blocks=block_lr.zero_blocks)
    return _build(text_encoders, unet, ranks, config, multiplier, neuron_dropout, targets, block_lr)


def _config(kwargs: Mapping[str, Any], targets: NetworkTargets) -> LoRAConfig:
    switches = frozenset(layout.enabled_by for layout in (targets.denoiser, *targets.text_encoders)
                         if layout is not None and layout.enabled_by)
    config = LoRAConfig.from_network_args(kwargs, targets.accepted_args(), switches)
    config.warn_unknown()
    return config


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: dict[str, Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[LoRANetwork, dict[str, Tensor]]:
    """A network shaped like a LoRA file (rank and alpha per module); the weights are not loaded here.

    `for_inference` is accepted for sd-scripts callers; our modules serve both uses. Rank-related
    --network_args are overridden by the file; dropouts and LoRA+ ratios still apply. Every layout is
    searched (T5 included, embedders included): the file's module names decide what gets a LoRA.
    """
    if weights_sd is None:
        weights_sd = load_lora_state_dict(file)
    ranks = RankPlan.from_weights(weights_sd)
    if not ranks.module_dims:
        raise ValueError(f"{file}: no '<name>.lora_down.weight' tensors; is it a LoRA file?")
    overridden = rank_args_in(kwargs)
    if overridden:
        logger.info("ranks come from %s; ignoring --network_args %s", file, ", ".join(overridden))
    neuron_dropout = kwargs.pop("neuron_dropout", None)
    text_encoders = _as_list(text_encoder)
    targets = resolve_targets(text_encoders, unet)
    # The file decides which modules exist; a block of weight 0 keeps its modules, frozen (lr 0), as in sd-scripts.
    block_lr = parse_block_lr_weights(kwargs, targets.denoiser)
    config = _config({k: v for k, v in kwargs.items() if k not in overridden}, targets)
    network = _build(text_encoders, unet, ranks, config, multiplier, neuron_dropout, targets, block_lr)
    source = str(file) if file is not None else "the LoRA weights"
    layers = [lora.lora_name for lora in network._all_loras()] + network.skipped_names  # what the file could match
    check_weights_fit(source, {key: value.shape for key, value in weights_sd.items()},
                      {key: value.shape for key, value in network.state_dict().items()}, network.model_family,
                      read_lora_metadata(file), layers)
    missing = sorted(set(ranks.module_dims) - {lora.lora_name for lora in network._all_loras()})
    if missing:
        logger.warning("%s: %d LoRA modules match no layer of this model (first: %s); is it for another model family?",
                       file, len(missing), missing[0])
    return network, weights_sd


def _build(text_encoders: list, unet, ranks: RankPlan, config: LoRAConfig, multiplier: float,
           neuron_dropout: float | None, targets: NetworkTargets, block_lr: BlockLrWeights | None) -> LoRANetwork:
    network = LoRANetwork(text_encoders, unet, ranks, multiplier, dropout=neuron_dropout, rank_dropout=config.rank_dropout,
                          module_dropout=config.module_dropout, targets=targets)
    network.set_loraplus_lr_ratio(config.loraplus_lr_ratio, config.loraplus_unet_lr_ratio, config.loraplus_text_encoder_lr_ratio)
    network.set_block_lr_weights(block_lr)
    if config.verbose:
        network.log_modules()
    return network
