"""Which layers of which model get LoRA, and what the LoRA file calls them.

A model family's LoRA is data: a `ModuleTargets` entry (prefix, container classes, name mapping,
block ids) registered against the model classes it applies to. `networks/lora.py` is the one
generic network that walks these targets. Adding SDXL or SD3 means adding entries to
`DENOISER_TARGETS` / `TEXT_ENCODER_TARGETS`, nothing else.

Layers are found in containers named by class (`container_classes`) or by module path
(`container_path`, for models whose block classes are ours to name, e.g. MMDiT's joint blocks), plus
opt-in layers outside them (`opt_in_roots`: SD3's embedders and final layer, trained only through
`emb_dims`). A layer's `part` lets per-part ranks (SD3's `x_attn_dim` & co.) override the base rank.

Classes are matched with `isinstance`, but only against modules that are already imported: a model
object of class X implies X's module is loaded, so matching never imports diffusers or a model file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

SD_UNET_NUM_BLOCKS = 25  # IN00..IN11, MID, OUT00..OUT11 as sd-scripts numbers a full-size SD1/2 U-Net
SD_BLOCK_NAMES = tuple([f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)])
# sd-scripts' 23 SDXL blocks: embeddings (no LoRA), input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out.
SDXL_BLOCK_NAMES = tuple(
    ["BASE"] + [f"IN{i:02d}" for i in range(9)] + [f"MID{i:02d}" for i in range(3)] + [f"OUT{i:02d}" for i in range(9)]
    + ["OUT"]
)


@dataclass(frozen=True)
class BlockLrLayout:
    """The block ids that sd-scripts' `down_lr_weight`, `mid_lr_weight` and `up_lr_weight` lists cover, in list
    order (networks/lora_block_lr.py reads them)."""

    down: range
    mid: range
    up: range


# sd-scripts' --network_args for block-wise learning rates: the weight lists (in BlockLrLayout's field order) and
# the threshold at or below which a weight becomes 0.
BLOCK_LR_WEIGHT_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_LR_ZERO_THRESHOLD_ARG = "block_lr_zero_threshold"

# SD1/2: 12 down weights (IN00..IN11; IN00 is conv_in, which has no LoRA), MID, 12 up weights (OUT00..OUT11).
SD_BLOCK_LR = BlockLrLayout(down=range(0, 12), mid=range(12, 13), up=range(13, 25))
# SDXL: 9 down weights (IN00..IN08), 3 mid (MID00..MID02), 9 up (OUT00..OUT08); BASE and OUT keep weight 1.
SDXL_BLOCK_LR = BlockLrLayout(down=range(1, 10), mid=range(10, 13), up=range(13, 22))


def _same_path(model: nn.Module, path: str) -> str:
    return path


@dataclass(frozen=True)
class ModuleTargets:
    """The LoRA layout of one model (a denoiser or one text encoder).

    Every `nn.Linear` and 1x1 `nn.Conv2d` inside a module whose class name is in `container_classes`
    (or whose path fully matches `container_path`) gets a LoRA. When conv LoRA is on (`conv_dim`,
    `conv_block_dims` or a file with conv weights), the layers inside `conv_container_classes` are
    added too: their kxk convs get the conv rank and their Linear / 1x1 convs the base rank
    (sd-scripts' C3Lier adds ResNet `time_emb_proj` and `conv_shortcut` that way).
    """

    prefix: str  # "lora_unet", "lora_te" (numbered lora_te1, lora_te2, ... when a model has several)
    container_classes: frozenset[str]
    conv_container_classes: frozenset[str] = frozenset()
    # module path in our model -> the dotted path the LoRA name is spelled with
    lora_path: Callable[[nn.Module, str], str] = _same_path
    # that dotted LoRA path -> block id for block_dims (None: not in any numbered block)
    block_index: Callable[[str], int | None] | None = None
    block_names: tuple[str, ...] = ()  # one name per block id, for messages and --network_args docs
    container_path: str | None = None  # regex on module paths, for containers known by place, not class
    # LoRA path -> part name; "<part>_dim" --network_args override the rank of that part's layers
    part_of: Callable[[str], str | None] | None = None
    part_names: tuple[str, ...] = ()
    # Module paths outside the containers whose layers get a LoRA only when `emb_dims` ranks them, in
    # emb_dims order. Every Linear or Conv2d under them counts, whatever its kernel.
    opt_in_roots: tuple[str, ...] = ()
    # The boolean --network_args that must be "True" for this layout to be used at all (else: no LoRA).
    enabled_by: str | None = None
    # Whether `train_block_indices` may restrict training to some numbered blocks.
    block_selection: bool = False
    # --network_args this family takes beyond the generic ones (parsed in networks/lora_config.py).
    family_args: frozenset[str] = frozenset()
    # Where block-wise learning-rate weights land (None: the family has none).
    block_lr: BlockLrLayout | None = None

    def accepted_args(self) -> frozenset[str]:
        """Family-specific --network_args names this layout gives a meaning to."""
        names = set(self.family_args) | {f"{part}_dim" for part in self.part_names}
        if self.opt_in_roots:
            names.add("emb_dims")
        if self.block_selection:
            names.add("train_block_indices")
        if self.enabled_by:
            names.add(self.enabled_by)
        if self.block_lr is not None:
            names.update((*BLOCK_LR_WEIGHT_ARGS, BLOCK_LR_ZERO_THRESHOLD_ARG))
        return frozenset(names)


@dataclass(frozen=True)
class TargetLayer:
    """One layer a layout targets; the rank plan decides whether it gets a LoRA."""

    lora_name: str
    module: nn.Module  # nn.Linear or nn.Conv2d
    block_index: int | None
    is_conv_kxk: bool  # a conv with a kernel larger than 1x1: ranked by conv_dim, not network_dim
    part: str | None = None  # the layout's part name, or the opt-in root for opt-in layers
    opt_in: bool = False  # outside the containers: only trained when given a rank explicitly


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

    def accepted_args(self) -> frozenset[str]:
        """Family-specific --network_args any of these layouts takes."""
        layouts = [self.denoiser, *self.text_encoders]
        return frozenset().union(*(layout.accepted_args() for layout in layouts if layout is not None))

    def enabled(self, switches: frozenset[str]) -> NetworkTargets:
        """These layouts without the opt-in ones whose switch (`enabled_by`) is not in `switches`."""
        def keep(layout: ModuleTargets | None) -> ModuleTargets | None:
            return None if layout is None or (layout.enabled_by and layout.enabled_by not in switches) else layout

        return NetworkTargets(keep(self.denoiser), tuple(keep(layout) for layout in self.text_encoders))


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


_SGM_UNET_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_SGM_BLOCK_OFFSET = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def sdxl_unet_block_index(path: str) -> int | None:
    """Block id of an SDXL U-Net layer from its sgm module path (sd-scripts' SDXL numbering):
    input_blocks.i -> 1 + i, middle_block.i -> 10 + i, output_blocks.i -> 13 + i."""
    match = _SGM_UNET_BLOCK.match(path)
    return _SGM_BLOCK_OFFSET[match.group(1)] + int(match.group(2)) if match else None


def _sd_unet_lora_path(unet: nn.Module, path: str) -> str:
    # sd-scripts trains SD1/2 on a diffusers-named U-Net, so its files spell diffusers paths.
    from library.models.sd_unet_keys import ldm_to_diffusers_unet_key

    return ldm_to_diffusers_unet_key(path, unet.config)


def _clip_lora_path(text_encoder: nn.Module, path: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level (CLIPTextModelWithProjection keeps it, with
    # text_projection beside it); LoRA files keep it.
    return path if hasattr(text_encoder, "text_model") else "text_model." + path


SD_UNET_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset({"SpatialTransformer"}),
    conv_container_classes=frozenset({"ResBlock", "Downsample", "Upsample"}),
    lora_path=_sd_unet_lora_path,
    block_index=sd_unet_block_index,
    block_names=SD_BLOCK_NAMES,
    block_lr=SD_BLOCK_LR,
)

# SDXL: the same containers, but sd-scripts' SDXL files spell the sgm module paths, which are ours.
SDXL_UNET_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset({"SpatialTransformer"}),
    conv_container_classes=frozenset({"ResBlock", "Downsample", "Upsample"}),
    block_index=sdxl_unet_block_index,
    block_names=SDXL_BLOCK_NAMES,
    block_lr=SDXL_BLOCK_LR,
)

# A diffusers UNet2DConditionModel already has the names sd-scripts writes: same file, other classes.
DIFFUSERS_SD_UNET_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset({"Transformer2DModel"}),
    conv_container_classes=frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"}),
    block_index=sd_unet_block_index,
    block_names=SD_BLOCK_NAMES,
    block_lr=SD_BLOCK_LR,
)

CLIP_TEXT_TARGETS = ModuleTargets(
    prefix="lora_te",
    container_classes=frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}),
    lora_path=_clip_lora_path,
)

# T5-XXL (SD3's third text encoder) is trained only with --network_args train_t5xxl=True, as sd-scripts.
# Its HF module paths are the LoRA paths ComfyUI maps from `t5xxl.transformer.*`.
T5_TEXT_TARGETS = ModuleTargets(
    prefix="lora_te",
    container_classes=frozenset({"T5Attention", "T5DenseGatedActDense"}),
    enabled_by="train_t5xxl",
)

_JOINT_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")
_MMDIT_PART = re.compile(r"^joint_blocks\.\d+\.(context|x)_block\.(attn2?|mlp|adaLN_modulation)\.")
_MMDIT_PART_KIND = {"attn": "attn", "attn2": "attn", "mlp": "mlp", "adaLN_modulation": "mod"}

# sd-scripts' per-part rank args are "<part>_dim"; x_block.attn2 (SD3.5 Medium) counts as x_attn.
MMDIT_PARTS = ("context_attn", "context_mlp", "context_mod", "x_attn", "x_mlp", "x_mod")
# In sd-scripts' emb_dims order; x_embedder.proj is the 2x2 patch conv.
MMDIT_EMBEDDING_ROOTS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder",
                         "final_layer.adaLN_modulation", "final_layer.linear")


def mmdit_block_index(path: str) -> int | None:
    """Joint-block number of an MMDiT layer path (None for embedders and the final layer)."""
    match = _JOINT_BLOCK.match(path)
    return int(match.group(1)) if match else None


def mmdit_part(path: str) -> str | None:
    """Which per-part rank arg governs an MMDiT layer: "x_attn", "context_mod", ... (None outside joint blocks)."""
    match = _MMDIT_PART.match(path)
    return f"{match.group(1)}_{_MMDIT_PART_KIND[match.group(2)]}" if match else None


# Every Linear of every joint block; module paths are the checkpoint keys, so they are the LoRA paths.
MMDIT_TARGETS = ModuleTargets(
    prefix="lora_unet",
    container_classes=frozenset(),
    container_path=r"joint_blocks\.\d+",
    block_index=mmdit_block_index,
    part_of=mmdit_part,
    part_names=MMDIT_PARTS,
    opt_in_roots=MMDIT_EMBEDDING_ROOTS,
    block_selection=True,
    family_args=frozenset({"split_qkv"}),
)

# First match wins: SdxlUNet subclasses SdUNet, so it comes first.
DENOISER_TARGETS: tuple[FamilyEntry, ...] = (
    FamilyEntry("SDXL U-Net", ("library.models.sd_unet:SdxlUNet",), SDXL_UNET_TARGETS),
    FamilyEntry("SD1/2 U-Net", ("library.models.sd_unet:SdUNet",), SD_UNET_TARGETS),
    FamilyEntry(
        "SD1/2 U-Net (diffusers)",
        ("diffusers.models.unets.unet_2d_condition:UNet2DConditionModel",),
        DIFFUSERS_SD_UNET_TARGETS,
    ),
    FamilyEntry("SD3 MMDiT", ("library.models.mmdit:MMDiT",), MMDIT_TARGETS),
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
    FamilyEntry("T5 text encoder", ("transformers.models.t5.modeling_t5:T5EncoderModel",), T5_TEXT_TARGETS),
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


def _adaptable_layers(model: nn.Module, targets: ModuleTargets,
                      containers: frozenset[str]) -> Iterator[tuple[str, nn.Module]]:
    by_path = re.compile(targets.container_path) if targets.container_path else None
    for path, module in model.named_modules():
        if type(module).__name__ not in containers and not (by_path and by_path.fullmatch(path)):
            continue
        for child_path, child in module.named_modules(prefix=path):
            if _is_adaptable(child):
                yield child_path, child


def _opt_in_layers(model: nn.Module, roots: Sequence[str]) -> Iterator[tuple[str, str, nn.Module]]:
    for root in roots:
        try:
            module = model.get_submodule(root)
        except AttributeError:
            continue  # a variant without this part
        for child_path, child in module.named_modules(prefix=root):
            if _is_adaptable(child):
                yield root, child_path, child


def find_target_layers(model: nn.Module, targets: ModuleTargets, prefix: str, with_conv: bool) -> list[TargetLayer]:
    """Every layer of `model` that the layout adapts, in module order, each once; then the opt-in layers.

    Linear / 1x1 layers in the conv containers come too when `with_conv`; whether a layer finally
    gets a LoRA is the rank plan's call (rank 0 or None skips it).
    """
    containers = targets.container_classes | (targets.conv_container_classes if with_conv else frozenset())
    layers: dict[str, TargetLayer] = {}
    for path, module in _adaptable_layers(model, targets, containers):
        if path in layers:
            continue  # nested containers reach the same layer twice
        lora_path = targets.lora_path(model, path)
        block = targets.block_index(lora_path) if targets.block_index is not None else None
        part = targets.part_of(lora_path) if targets.part_of is not None else None
        layers[path] = TargetLayer(_lora_name(prefix, lora_path), module, block, _is_conv_kxk(module), part)
    for root, path, module in _opt_in_layers(model, targets.opt_in_roots):
        if path not in layers:
            lora_path = targets.lora_path(model, path)
            layers[path] = TargetLayer(_lora_name(prefix, lora_path), module, None, _is_conv_kxk(module), root, opt_in=True)
    return list(layers.values())


def _lora_name(prefix: str, lora_path: str) -> str:
    return f"{prefix}_{lora_path.replace('.', '_')}"
