"""How our models look to a third-party `--network_module` (LyCORIS and any other sd-scripts plug-in).

sd-scripts' plug-in contract hands `create_network(...)` the text encoder(s) and the U-Net/MMDiT themselves. A
plug-in walks them and picks the layers to adapt by module CLASS NAME (LyCORIS: `Transformer2DModel`,
`ResnetBlock2D`, `SingleDiTBlock`, `CLIPAttention`, ...) and by module PATH (`conv_in`,
`time_embedding.linear_1`), then names each adapted layer `lora_unet_<path>` / `lora_te<N>_<path>`. Our models
keep the original checkpoints' layouts and the reference implementations' class names, so such a plug-in would
adapt nothing in them, or write names no loader knows.

A view is a tree of empty containers shaped and named like sd-scripts' model, whose leaves are OUR layers (the
same module objects): a plug-in that patches or hooks a leaf acts on the layer our model calls. Two facts per
layout build it: the sd-scripts path of each of our layers, which is the LoRA path `networks/lora_targets.py`
already spells (sd-scripts' files name layers by their path in sd-scripts' model), and sd-scripts' class names
(`SD_SCRIPTS_NAMES` below). `networks.lora` works on our models directly and never sees a view.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from networks import lora
from networks.lora_targets import (
    CLIP_TEXT_TARGETS,
    DENOISER_TARGETS,
    DIFFUSERS_SD_UNET_TARGETS,
    MMDIT_TARGETS,
    SD_UNET_TARGETS,
    SDXL_UNET_TARGETS,
    T5_TEXT_TARGETS,
    TEXT_ENCODER_TARGETS,
    ModuleTargets,
    find_targets,
)


@dataclass(frozen=True)
class SdScriptsNames:
    """sd-scripts' class names for the modules of one of our layouts (leaves keep their own classes)."""

    root: str | None  # the model's class in sd-scripts (None: the same as ours)
    classes: Mapping[str, str] = field(default_factory=dict)  # our container class -> sd-scripts' at that place
    # (regex on sd-scripts' module path, class) for containers only sd-scripts' layout has
    containers: tuple[tuple[str, str], ...] = ()


_SD_UNET_CLASSES = {"SpatialTransformer": "Transformer2DModel", "ResBlock": "ResnetBlock2D",
                    "Downsample": "Downsample2D", "Upsample": "Upsample2D"}

SD_SCRIPTS_NAMES: dict[ModuleTargets, SdScriptsNames] = {
    # sd-scripts' library/original_unet.py: a diffusers-named U-Net. Its `time_embedding` is a TimestepEmbedding,
    # a class LyCORIS 4 also targets (for another model) while it targets the two Linears inside by name too: on
    # sd-scripts' own U-Net its default preset stops with "duplicated lora name". The view leaves that container
    # unnamed, so both layers are adapted once, under the names sd-scripts' files use.
    SD_UNET_TARGETS: SdScriptsNames("UNet2DConditionModel", _SD_UNET_CLASSES,
                                    ((r"mid_block", "UNetMidBlock2DCrossAttn"),)),
    # sd-scripts' library/sdxl_original_unet.py keeps the sgm paths, which are ours.
    SDXL_UNET_TARGETS: SdScriptsNames("SdxlUNet2DConditionModel", _SD_UNET_CLASSES),
    DIFFUSERS_SD_UNET_TARGETS: SdScriptsNames(None),
    # sd-scripts' library/sd3_models.py keeps the checkpoint paths, which are ours, under its own class names.
    MMDIT_TARGETS: SdScriptsNames("MMDiT", {
        "JointBlock": "MMDiTBlock", "DiTBlock": "SingleDiTBlock", "SelfAttention": "AttentionLinears", "Mlp": "MLP",
        "TimestepEmbedder": "TimestepEmbedding", "VectorEmbedder": "Embedder", "FinalLayer": "UnPatch"}),
    # transformers 4 (which sd-scripts pins) nests every CLIP text model under `text_model`.
    CLIP_TEXT_TARGETS: SdScriptsNames(None, containers=((r"text_model", "CLIPTextTransformer"),)),
    T5_TEXT_TARGETS: SdScriptsNames(None),
}


class ViewContainer(nn.Module):
    """A container of a view: it holds layers for a network module to find; the model itself runs them."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} here is a view of one of our models for a network module; "
                           "call the model itself")


@functools.cache
def _container_class(name: str) -> type[ViewContainer]:
    return type(name, (ViewContainer,), {"__module__": __name__, "__qualname__": name})


def sd_scripts_view(model: nn.Module, targets: ModuleTargets) -> nn.Module:
    """`model` as sd-scripts' model of the same layout looks to a network module: sd-scripts' module paths and
    container class names, our layers as the leaves."""
    names = SD_SCRIPTS_NAMES[targets]
    leaves: dict[str, nn.Module] = {}
    our_classes: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        try:
            view_path = targets.lora_path(model, path)
        except ValueError:  # a container or an activation with no counterpart in sd-scripts' layout
            continue
        if next(module.children(), None) is None:
            leaves[view_path] = module
        else:
            our_classes[view_path] = type(module).__name__
    root = _container_class(names.root or type(model).__name__)()
    for view_path, leaf in leaves.items():
        _place(root, view_path, leaf, lambda at: _class_at(at, names, our_classes))
    return root


def _class_at(view_path: str, names: SdScriptsNames, our_classes: Mapping[str, str]) -> str | None:
    for pattern, class_name in names.containers:
        if re.fullmatch(pattern, view_path):
            return class_name
    ours = our_classes.get(view_path)
    return names.classes.get(ours, ours) if ours else None


def _place(root: nn.Module, view_path: str, leaf: nn.Module, class_at: Callable[[str], str | None]) -> None:
    parent, parts = root, view_path.split(".")
    for depth, part in enumerate(parts[:-1], start=1):
        child = parent._modules.get(part)
        if child is None:
            at = ".".join(parts[:depth])
            child = _container_class(class_at(at) or _generic_name(parts[depth]))()
            parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], leaf)


def _generic_name(first_child: str) -> str:
    # sd-scripts' unnamed containers are ModuleLists (numbered children) or plain modules.
    return "ModuleList" if first_child.isdigit() else "Module"


# ---------------------------------------------------------------------------------------------- per network module
def takes_our_models(module: ModuleType) -> bool:
    """Whether a network module is ours (networks.lora and its aliases), which works on our models as they are."""
    return getattr(module, "create_network", None) is lora.create_network


def text_encoder_view(encoder: nn.Module | None) -> nn.Module | None:
    if encoder is None:
        return None
    return sd_scripts_view(encoder, find_targets(encoder, TEXT_ENCODER_TARGETS, "a text encoder"))


def denoiser_view(denoiser: nn.Module | None) -> nn.Module | None:
    if denoiser is None:
        return None
    return sd_scripts_view(denoiser, find_targets(denoiser, DENOISER_TARGETS, "the denoiser"))


@dataclass(frozen=True)
class NetworkModels:
    """The text encoder(s) and the denoiser as one network module is handed them, in every call of sd-scripts'
    contract (create_network, apply_to, prepare_grad_etc, on_epoch_start, merge_to, ...)."""

    text_encoder: Any  # one module or a list, as sd-scripts passes them
    denoiser: nn.Module | None


def network_models(module: ModuleType, text_encoder: nn.Module | Sequence[nn.Module | None] | None,
                   denoiser: nn.Module | None) -> NetworkModels:
    """Our models for our own network module; for a plug-in, views of them shaped like sd-scripts' models."""
    if takes_our_models(module):
        return NetworkModels(text_encoder, denoiser)
    if isinstance(text_encoder, (list, tuple)):
        return NetworkModels([text_encoder_view(encoder) for encoder in text_encoder], denoiser_view(denoiser))
    return NetworkModels(text_encoder_view(text_encoder), denoiser_view(denoiser))


def view_layers(view: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(sd-scripts path, layer) of every Linear and Conv2d a view holds: the layers a plug-in may adapt."""
    for path, module in view.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module
