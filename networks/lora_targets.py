"""Which layers of which model get LoRA, and what the LoRA file calls them.

A model family's LoRA is data: a `ModuleTargets` entry (prefix, container classes, name mapping,
block ids) registered against the model classes it applies to. `networks/lora.py` is the one
generic network that walks these targets. Adding SDXL or SD3 means adding entries to
`DENOISER_TARGETS` / `TEXT_ENCODER_TARGETS`, nothing else.

Classes are matched with `isinstance`, but only against modules that are already imported: a model
object of class X implies X's module is loaded, so matching never imports diffusers or a model file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from torch import nn

SD_UNET_NUM_BLOCKS = 25  # IN00..IN11, MID, OUT00..OUT11 as sd-scripts numbers a full-size SD1/2 U-Net
SD_BLOCK_NAMES = tuple([f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)])


def _same_path(model: nn.Module, path: str) -> str:
    return path


@dataclass(frozen=True)
class ModuleTargets:
    """The LoRA layout of one model (a denoiser or one text encoder).

    Every `nn.Linear` and 1x1 `nn.Conv2d` inside a module whose class name is in `container_classes`
    gets a LoRA. When conv LoRA is on (`conv_dim`, `conv_block_dims` or a file with conv weights),
    the layers inside `conv_container_classes` are added too: their kxk convs get the conv rank and
    their Linear / 1x1 convs the base rank (sd-scripts' C3Lier adds ResNet `time_emb_proj` and
    `conv_shortcut` that way).
    """

    prefix: str  # "lora_unet", "lora_te" (numbered lora_te1, lora_te2, ... when a model has several)
    container_classes: frozenset[str]
    conv_container_classes: frozenset[str] = frozenset()
    # module path in our model -> the dotted path the LoRA name is spelled with
    lora_path: Callable[[nn.Module, str], str] = _same_path
    # that dotted LoRA path -> block id for block_dims (None: not in any numbered block)
    block_index: Callable[[str], int | None] | None = None
    block_names: tuple[str, ...] = ()  # one name per block id, for messages and --network_args docs


@dataclass(frozen=True)
class TargetLayer:
    """One layer that gets a LoRA."""

    lora_name: str
    module: nn.Module  # nn.Linear or nn.Conv2d
    block_index: int | None
    is_conv_kxk: bool  # a conv with a kernel larger than 1x1: ranked by conv_dim, not network_dim


@dataclass(frozen=True)
class FamilyEntry:
    """A target layout and the model classes ("module:Class") it applies to."""

    name: str
    model_classes: tuple[str, ...]
    targets: ModuleTargets


@dataclass(frozen=True)
class NetworkTargets:
    """The layouts for one network: the denoiser's and one per text encoder (None for empty slots)."""

    denoiser: ModuleTargets | None
    text_encoders: tuple[ModuleTargets | None, ...]


_DIFFUSERS_UNET_PART = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)")


def sd_unet_block_index(diffusers_path: str) -> int | None:
    """Block id of a layer of an SD1/2 U-Net from its diffusers module path (sd-scripts' numbering).

    down_blocks.i: resnets/attentions.j -> IN(1 + 3i + j), downsamplers -> IN(3 + 3i);
    mid_block -> MID (12); up_blocks.i: resnets/attentions.j -> OUT(3i + j), upsamplers -> OUT(3i + 2).
    IN00 (conv_in) never has a LoRA.
    """
    if diffusers_path.startswith("mid_block."):
        return 12
    match = _DIFFUSERS_UNET_PART.match(diffusers_path)
    if match is None:
        return None
    direction, block, kind, index = match.groups()
    within = 2 if kind in ("downsamplers", "upsamplers") else int(index)
    offset = 3 * int(block) + within
    return 1 + offset if direction == "down" else 13 + offset


def _sd_unet_lora_path(unet: nn.Module, path: str) -> str:
    # sd-scripts trains SD1/2 on a diffusers-named U-Net, so its files spell diffusers paths.
    from library.models.sd_unet_keys import ldm_to_diffusers_unet_key

    return ldm_to_diffusers_unet_key(path, unet.config)


def _clip_lora_path(text_encoder: nn.Module, path: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files keep it.
    return path if path.startswith("text_model.") else "text_model." + path


SD_UNET_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset({"SpatialTransformer"}),
    conv_container_classes=frozenset({"ResBlock", "Downsample", "Upsample"}),
    lora_path=_sd_unet_lora_path,
    block_index=sd_unet_block_index,
    block_names=SD_BLOCK_NAMES,
)

# A diffusers UNet2DConditionModel already has the names sd-scripts writes: same file, other classes.
DIFFUSERS_SD_UNET_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset({"Transformer2DModel"}),
    conv_container_classes=frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"}),
    block_index=sd_unet_block_index,
    block_names=SD_BLOCK_NAMES,
)

CLIP_TEXT_TARGETS = ModuleTargets(
    prefix="lora_te",
    container_classes=frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}),
    lora_path=_clip_lora_path,
)

DENOISER_TARGETS: tuple[FamilyEntry, ...] = (
    FamilyEntry("SD1/2 U-Net", ("library.models.sd_unet:SdUNet",), SD_UNET_TARGETS),
    FamilyEntry(
        "SD1/2 U-Net (diffusers)",
        ("diffusers.models.unets.unet_2d_condition:UNet2DConditionModel",),
        DIFFUSERS_SD_UNET_TARGETS,
    ),
)

TEXT_ENCODER_TARGETS: tuple[FamilyEntry, ...] = (
    FamilyEntry(
        "CLIP text encoder",
        (
            "transformers.models.clip.modeling_clip:CLIPTextModel",
            "transformers.models.clip.modeling_clip:CLIPTextModelWithProjection",
        ),
        CLIP_TEXT_TARGETS,
    ),
)


class UnsupportedModelError(ValueError):
    """A model has no registered LoRA layout."""


def _loaded_class(qualified: str) -> type | None:
    module_name, class_name = qualified.split(":")
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def find_targets(model: nn.Module, entries: Sequence[FamilyEntry], role: str) -> ModuleTargets:
    """The layout registered for `model`'s class; `role` names the model in the error."""
    for entry in entries:
        classes = [cls for cls in map(_loaded_class, entry.model_classes) if cls is not None]
        if classes and isinstance(model, tuple(classes)):
            return entry.targets
    known = ", ".join(qualified.split(":")[1] for entry in entries for qualified in entry.model_classes)
    raise UnsupportedModelError(
        f"networks.lora: no LoRA targets for {role} of class {type(model).__name__}; supported: {known}"
    )


def resolve_targets(text_encoders: Sequence[nn.Module | None], denoiser: nn.Module | None) -> NetworkTargets:
    """Pick the layouts for a denoiser and its text encoders from their classes."""
    return NetworkTargets(
        denoiser=None if denoiser is None else find_targets(denoiser, DENOISER_TARGETS, "the denoiser"),
        text_encoders=tuple(
            None if encoder is None else find_targets(encoder, TEXT_ENCODER_TARGETS, f"text encoder {i + 1}")
            for i, encoder in enumerate(text_encoders)
        ),
    )


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _is_conv_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _adaptable_layers(model: nn.Module, containers: frozenset[str]) -> Iterator[tuple[str, nn.Module]]:
    for path, module in model.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_path, child in module.named_modules(prefix=path):
            if _is_adaptable(child):
                yield child_path, child


def find_target_layers(model: nn.Module, targets: ModuleTargets, prefix: str, with_conv: bool) -> list[TargetLayer]:
    """Every layer of `model` that the layout adapts, in module order, each once.

    Linear / 1x1 layers in the conv containers come too when `with_conv`; whether a layer finally
    gets a LoRA is the rank plan's call (rank 0 skips it).
    """
    containers = targets.container_classes | (targets.conv_container_classes if with_conv else frozenset())
    layers: dict[str, TargetLayer] = {}
    for path, module in _adaptable_layers(model, containers):
        if path in layers:
            continue  # nested containers reach the same layer twice
        lora_path = targets.lora_path(model, path)
        block = targets.block_index(lora_path) if targets.block_index is not None else None
        name = f"{prefix}_{lora_path.replace('.', '_')}"
        layers[path] = TargetLayer(name, module, block, _is_conv_kxk(module))
    return list(layers.values())
