"""Where each LoRA module lands in a single-file checkpoint, for SD1, SD2, SDXL and SD3/3.5.

A LoRA file names a layer as the trained model sees it (`networks/lora_targets.py`: diffusers paths for the
SD1/2 U-Net, Hugging Face CLIP paths for OpenCLIP towers whose q/k/v the checkpoint stores as one fused
`in_proj_weight`), while a checkpoint stores weights under its own keys. Parsing a LoRA name back is
ambiguous (module names contain underscores), so the map is built forward, with the loaders' own code:

1. every checkpoint tensor is replaced by a stand-in of the same shape that costs no memory and whose rows
   hold (tensor number, row number);
2. each part (denoiser, text encoders) goes through the converter its loader uses (OpenCLIP -> HF splits the
   fused rows, canonical HF naming adds `text_model.`), which carries the stand-ins along;
3. models are built on the meta device from the converted shapes, and the LoRA target walk names their layers;
4. the stand-in that arrives under a layer's weight key tells which checkpoint tensor, and which rows of it,
   that layer is.

So a name here is exactly the name training writes, and a key exactly what the loader reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, T5EncoderModel

from library.models.checkpoint import CheckpointError, detect_family, strip_prefix
from library.models.loading_common import errors_naming
from library.models.mmdit import MMDiT, infer_mmdit_config
from library.models.sd3_loading import (
    sd3_variant,
    separate_file_prefix,
    t5_config_from_state_dict,
    text_encoder_prefix,
)
from library.models.sd_unet import SdUNet, SdxlUNet, infer_unet_config
from library.models.sdxl_loading import bigg_to_hf_text_state_dict
from library.models.text_encoders import (
    TEXT_MODEL_PREFIX,
    canonical_hf_text_state_dict,
    clip_config_from_hf_state_dict,
    openclip_to_hf_text_state_dict,
)
from networks.lora import create_network
from networks.lora_targets import (
    CLIP_TEXT_TARGETS,
    ModuleTargets,
    TargetLayer,
    find_target_layers,
    resolve_targets,
)
from networks.plugin_view import sd_scripts_view, view_layers

logger = logging.getLogger(__name__)

FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5"}

_ROW_BITS = 32  # a stand-in value is (tensor number << 32) + row number
_ROW_MASK = (1 << _ROW_BITS) - 1


# ----------------------------------------------------------------------------- per-family parts
@dataclass(frozen=True)
class _Part:
    """One model inside a checkpoint: where its tensors are, how its loader converts them, how to build it."""

    label: str  # for messages: "U-Net", "CLIP-L text encoder", ...
    prefix: str  # checkpoint key prefix
    to_layout: Callable[[dict[str, Tensor]], dict[str, Tensor]]  # checkpoint naming -> the model's state-dict naming
    build: Callable[[dict[str, Tensor]], nn.Module]  # a meta-device model shaped like these tensors
    layout_path: Callable[[str], str] = lambda path: path  # module path in the model -> its path in that naming
    separate_file: str | None = None  # SD3: the loader's name for the file that may hold it instead ("clip_l")


def _meta(model_class: type[nn.Module], config: object) -> nn.Module:
    with torch.device("meta"):
        return model_class(config)


def _sd_unet(state_dict: dict[str, Tensor]) -> nn.Module:
    return _meta(SdUNet, infer_unet_config(state_dict))


def _sdxl_unet(state_dict: dict[str, Tensor]) -> nn.Module:
    return _meta(SdxlUNet, infer_unet_config(state_dict))


def _mmdit(state_dict: dict[str, Tensor]) -> nn.Module:
    return _meta(MMDiT, infer_mmdit_config(state_dict))


def _clip(state_dict: dict[str, Tensor]) -> nn.Module:
    # With or without a projection the attention and MLP layers, the only LoRA targets, are the same.
    return _meta(CLIPTextModel, clip_config_from_hf_state_dict(state_dict))


def _t5(state_dict: dict[str, Tensor]) -> nn.Module:
    return _meta(T5EncoderModel, t5_config_from_state_dict(state_dict))


def _clip_layout_path(path: str) -> str:
    # transformers 5's CLIPTextModel has no `text_model.` level; the canonical naming keeps it.
    return path if path.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + path


def _same(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return state_dict


def _sd2_text(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return openclip_to_hf_text_state_dict(state_dict, drop_last_layers=1)  # SD2 uses the penultimate layer


def _sd3_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # As the SD3 loader: CLIP-G may come in OpenCLIP naming, as SDXL stores it.
    if "positional_embedding" in state_dict:
        state_dict = openclip_to_hf_text_state_dict(state_dict)
    return canonical_hf_text_state_dict(state_dict)


def _clip_part(label: str, prefix: str, to_layout: Callable[[dict[str, Tensor]], dict[str, Tensor]],
               separate_file: str | None = None) -> _Part:
    return _Part(label, prefix, to_layout, _clip, _clip_layout_path, separate_file)


_UNET_PREFIX = "model.diffusion_model."
# Per family: the denoiser, then the text encoders in the order the trainer passes them (which numbers lora_teN).
_FAMILY_PARTS: dict[str, tuple[_Part, tuple[_Part, ...]]] = {
    "sd1": (_Part("U-Net", _UNET_PREFIX, _same, _sd_unet),
            (_clip_part("text encoder", "cond_stage_model.transformer.", canonical_hf_text_state_dict),)),
    "sd2": (_Part("U-Net", _UNET_PREFIX, _same, _sd_unet),
            (_clip_part("text encoder", "cond_stage_model.model.", _sd2_text),)),
    "sdxl": (_Part("U-Net", _UNET_PREFIX, _same, _sdxl_unet),
             (_clip_part("CLIP-L text encoder", "conditioner.embedders.0.transformer.", canonical_hf_text_state_dict),
              _clip_part("bigG text encoder", "conditioner.embedders.1.model.", bigg_to_hf_text_state_dict))),
    "sd3": (_Part("MMDiT", _UNET_PREFIX, _same, _mmdit),
            (_clip_part("CLIP-L text encoder", text_encoder_prefix("clip_l"), _sd3_clip, "clip_l"),
             _clip_part("CLIP-G text encoder", text_encoder_prefix("clip_g"), _sd3_clip, "clip_g"),
             _Part("T5-XXL text encoder", text_encoder_prefix("t5xxl"), _same, _t5, separate_file="t5xxl"))),
}


# ----------------------------------------------------------------------------- what a map holds
@dataclass(frozen=True)
class WeightSlot:
    """A LoRA module's base weight in the checkpoint: `key`, and for a fused tensor the rows [start, stop)."""

    lora_name: str
    key: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the layer's weight shape (the rows' shape for a fused tensor)
    model_label: str  # "U-Net", "bigG text encoder", ...
    is_conv_kxk: bool

    def view(self, tensor: Tensor) -> Tensor:
        """This layer's weight inside the checkpoint tensor (a view: writing to it writes the tensor)."""
        return tensor if self.rows is None else tensor[self.rows[0]:self.rows[1]]


@dataclass(frozen=True)
class AbsentTextEncoder:
    """A text encoder the family has but the mapped files do not hold, and how a LoRA names its modules."""

    label: str  # "CLIP-L text encoder"
    lora_prefix: str  # "lora_te1_"
    separate_file: str | None  # SD3: the loader's name for its own file ("clip_l" for --clip_l)


@dataclass
class LoRACheckpointMap:
    """Every LoRA module name a file may hold for one checkpoint, and where its weight is.

    `slots` covers every layer a LoRA of ours can target: the default targets, 3x3 convs (conv_dim), opt-in
    layers (SD3's emb_dims) and T5 (train_t5xxl); and every other Linear / Conv2d, which a plug-in network such
    as LyCORIS may adapt (networks/plugin_view.py). `default_ranks` says which of them a training run with
    given ranks adapts.
    """

    source: str
    family: str
    variant: str | None  # SD3: "sd3-medium", "sd3.5-medium" or "sd3.5-large"
    slots: dict[str, WeightSlot]
    models_present: tuple[str, ...]  # labels of the parts found in the file
    absent_text_encoders: tuple[AbsentTextEncoder, ...] = ()
    _text_encoders: list[nn.Module | None] = field(repr=False, default_factory=list)
    _denoiser: nn.Module | None = field(repr=False, default=None)

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS[self.family] + (f" ({self.variant})" if self.variant else "")

    def default_ranks(self, dim: int, conv_dim: int | None = None) -> dict[str, int]:
        """LoRA name -> rank for the modules `--network_dim dim [--network_args conv_dim=...]` trains, as
        networks.lora's create_network picks them (T5 and SD3's embedders stay off, as by default)."""
        network_args = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)}
        with torch.device("meta"), _quiet(create_network.__module__):  # its count line is not what a tool writes
            network = create_network(1.0, dim, dim, None, self._text_encoders, self._denoiser, **network_args)
        modules = network.text_encoder_loras + network.unet_loras
        return {lora.lora_name: lora.lora_dim for lora in modules if lora.lora_name in self.slots}

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The names among `names` that address no layer of this checkpoint, sorted."""
        return sorted(set(names) - self.slots.keys())


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Within the block, the logger `logger_name` lets through warnings and errors only."""
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        quieted.setLevel(level)


def map_checkpoint(shapes: Mapping[str, Sequence[int]], source: str) -> LoRACheckpointMap:
    """The LoRA map of a single-file checkpoint, from its tensor names and shapes alone (`source` names the
    file in errors). Parts missing from the file (SD3.5 files ship without text encoders) have no slots."""
    family = detect_family(shapes, source=source)
    denoiser_part, encoder_parts = _FAMILY_PARTS[family]
    keys = list(shapes)
    stand_ins = {key: _stand_in(index, tuple(shapes[key])) for index, key in enumerate(keys)}
    variant = None
    built: list[tuple[_Part, nn.Module, dict[str, Tensor]] | None] = []
    for part in (denoiser_part, *encoder_parts):
        tensors = strip_prefix(stand_ins, part.prefix)
        if not tensors:
            built.append(None)
            continue
        with errors_naming(f"{source} ({part.label})"):
            layout = part.to_layout(tensors)
            model = part.build(layout)
        if isinstance(model, MMDiT):
            variant = sd3_variant(model.config)
        built.append((part, model, layout))
    if built[0] is None:
        raise CheckpointError(f"{source}: no {denoiser_part.label} weights ({denoiser_part.prefix}*)")
    denoiser = built[0][1]
    text_encoders = [entry[1] if entry else None for entry in built[1:]]
    slots = {}
    for entry, layers in zip(built, _target_layers(text_encoders, denoiser)):
        if entry is not None:
            part, model, layout = entry
            paths = {id(module): path for path, module in model.named_modules()}
            for layer in layers:
                slots[layer.lora_name] = _slot(layer, part, paths[id(layer.module)], layout, keys, shapes, source)
    present = tuple(entry[0].label for entry in built if entry is not None)
    absent = tuple(
        AbsentTextEncoder(part.label, _encoder_prefix(CLIP_TEXT_TARGETS.prefix, number, len(encoder_parts)) + "_",
                          part.separate_file)
        for number, (part, entry) in enumerate(zip(encoder_parts, built[1:]), start=1) if entry is None)
    return LoRACheckpointMap(source, family, variant, slots, present, absent, text_encoders, denoiser)


def _target_layers(text_encoders: list[nn.Module | None], denoiser: nn.Module) -> list[list[TargetLayer]]:
    """[denoiser layers, then each text encoder's], with every optional layer included."""
    targets = resolve_targets(text_encoders, denoiser)
    layers = [_all_layers(denoiser, targets.denoiser, targets.denoiser.prefix)]
    for number, (encoder, layout) in enumerate(zip(text_encoders, targets.text_encoders), start=1):
        prefix = _encoder_prefix(layout.prefix, number, len(text_encoders)) if layout else ""
        layers.append([] if encoder is None else _all_layers(encoder, layout, prefix))
    return layers


def _all_layers(model: nn.Module, layout: ModuleTargets, prefix: str) -> list[TargetLayer]:
    """Our LoRA's layers, then every other Linear / Conv2d a plug-in network (LyCORIS) may adapt, named as
    sd-scripts' model names it (SD1/2's conv_in, conv_out, time_embedding.linear_1, ...)."""
    layers = find_target_layers(model, layout, prefix, with_conv=True)
    known = {layer.lora_name for layer in layers}
    for path, module in view_layers(sd_scripts_view(model, layout)):
        name = f"{prefix}_{path.replace('.', '_')}"
        if name not in known:
            is_conv_kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
            layers.append(TargetLayer(name, module, None, is_conv_kxk))
    return layers


def _encoder_prefix(prefix: str, number: int, count: int) -> str:
    # LoRANetwork's numbering: lora_te alone, lora_te1, lora_te2, ... when a model has several encoders
    return prefix + ("" if count == 1 else str(number))


def _slot(layer: TargetLayer, part: _Part, path: str, layout: Mapping[str, Tensor], keys: list[str],
          shapes: Mapping[str, Sequence[int]], source: str) -> WeightSlot:
    layout_key = part.layout_path(path) + ".weight"
    traced = _trace(layout[layout_key]) if layout_key in layout else None
    if traced is None:
        raise CheckpointError(f"{source}: cannot place LoRA module {layer.lora_name} ({part.label} {layout_key}) "
                              "in a checkpoint tensor")
    index, rows = traced
    key = keys[index]
    whole = rows == (0, shapes[key][0])
    return WeightSlot(layer.lora_name, key, None if whole else rows, tuple(layout[layout_key].shape), part.label,
                      layer.is_conv_kxk)


def _stand_in(index: int, shape: tuple[int, ...]) -> Tensor:
    """A tensor of `shape` whose row r holds (index << 32) + r everywhere; an expanded view, so no memory."""
    if not shape:
        return torch.tensor(index << _ROW_BITS)
    rows = torch.arange(shape[0], dtype=torch.int64) + (index << _ROW_BITS)
    return rows.view(-1, *([1] * (len(shape) - 1))).expand(*shape)


def _trace(stand_in: Tensor) -> tuple[int, tuple[int, int]] | None:
    """(tensor number, (first row, end row)) a converted stand-in came from; None unless it is whole rows of
    one tensor in order (a transposed or reassembled tensor cannot take a LoRA delta as rows)."""
    if stand_in.ndim == 0:
        return None
    first = stand_in[(slice(None),) + (0,) * (stand_in.ndim - 1)]
    last = stand_in[(slice(None),) + (-1,) * (stand_in.ndim - 1)]
    index = first >> _ROW_BITS
    rows = first & _ROW_MASK
    start = int(rows[0])
    expected = torch.arange(start, start + len(rows))
    if not torch.equal(first, last) or not bool((index == index[0]).all()) or not torch.equal(rows, expected):
        return None
    return int(index[0]), (start, start + len(rows))


# ----------------------------------------------------------------------------- SD3 text encoders in their own files
@dataclass(frozen=True)
class SeparateTextEncoder:
    """An SD3 text encoder in a file of its own (--clip_l / --clip_g / --t5xxl), as the map sees it: each tensor
    the loader takes from the file sits under `text_encoders.<name>.transformer.`, as in a single file."""

    name: str  # "clip_l", "clip_g" or "t5xxl"
    path: Path
    file_keys: dict[str, str]  # single-file key -> the key in the file
    shapes: dict[str, tuple[int, ...]]  # single-file key -> shape

    @property
    def flag(self) -> str:
        return f"--{self.name}"


def read_separate_text_encoder(name: str, path: Path, shapes: Mapping[str, Sequence[int]]) -> SeparateTextEncoder:
    """Place a separate file's encoder tensors (`shapes`: all the file's keys and shapes) where a single file
    keeps them. The wrapper is the SD3 loader's own rule (`separate_file_prefix`), so a merged file loads as
    its input did."""
    wrapper = separate_file_prefix(shapes, name)
    own = [key for key in shapes if key.startswith(wrapper)]
    if not own:
        raise CheckpointError(f"--{name} {path}: holds no tensors")
    prefix = text_encoder_prefix(name)
    return SeparateTextEncoder(name, Path(path), {prefix + key[len(wrapper):]: key for key in own},
                               {prefix + key[len(wrapper):]: tuple(shapes[key]) for key in own})


def map_with_text_encoder_files(shapes: Mapping[str, Sequence[int]], source: str,
                                encoders: Sequence[SeparateTextEncoder]) -> LoRACheckpointMap:
    """The map of a checkpoint plus separate SD3 text-encoder files. As in the SD3 loader, a separate file wins
    over the checkpoint's own copy of that encoder, which then takes no LoRA module (and is written unchanged)."""
    if not encoders:
        return map_checkpoint(shapes, source)
    family = detect_family(shapes, source=source)
    if family != "sd3":
        flags = ", ".join(encoder.flag for encoder in encoders)
        raise ValueError(f"{flags}: separate text-encoder files are for SD3/SD3.5 checkpoints only; {source} is "
                         f"{FAMILY_LABELS[family]}")
    combined = dict(shapes)
    for encoder in encoders:
        prefix = text_encoder_prefix(encoder.name)
        replaced = [key for key in combined if key.startswith(prefix)]
        if replaced:
            logger.info("%s %s replaces the %s in %s for the merge; the checkpoint's copy is left unchanged",
                        encoder.flag, encoder.path, encoder.name, source)
        for key in replaced:
            del combined[key]
        combined.update(encoder.shapes)
    return map_checkpoint(combined, source)
