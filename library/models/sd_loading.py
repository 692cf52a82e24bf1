"""Loading SD1.x/2.x models from a single-file checkpoint or a diffusers folder.

Single files keep the original ldm prefixes: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*``
(VAE) and the text encoder under ``cond_stage_model.transformer.*`` (SD1: HF CLIP-L) or
``cond_stage_model.model.*`` (SD2: OpenCLIP ViT-H, whose last layer is dropped because SD2 conditions on the
penultimate one). Diffusers folders are renamed into the same layouts, so from here on one code path
builds the models. Configs come from the tensors (or the folder's config.json), never from the hub.

The U-Net + VAE steps at the end of the file are public because SDXL's loader uses them as they are; what
all three families share (SD3 too) is in ``loading_common``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from transformers import CLIPTextModel

from library.models.checkpoint import CheckpointError, checkpoint_keys, detect_family, load_state_dict, strip_prefix
from library.models.loading_common import (
    VAE_PREFIX,
    build_model,
    errors_naming,
    load_diffusers_weights,
    load_vae_override,
    read_diffusers_config,
    require_model,
    vae_config_from_diffusers,
)
from library.models.sd_unet import SdUNet, SdUNetConfig, infer_unet_config
from library.models.sd_unet_keys import unet_state_dict_from_diffusers
from library.models.text_encoders import (
    canonical_hf_text_state_dict,
    load_clip_text_model,
    openclip_to_hf_text_state_dict,
)
from library.models.vae import AutoencoderKL, VaeConfig, infer_vae_config
from library.models.vae_keys import vae_state_dict_from_diffusers

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SD1_TEXT_ACT = "quick_gelu"  # OpenAI CLIP-L
SD2_TEXT_ACT = "gelu"  # OpenCLIP ViT-H

UNetT = TypeVar("UNetT", bound=SdUNet)

_OTHER_FAMILY = {
    "sdxl": "an SDXL checkpoint; use sdxl_train_network.py",
    "sd3": "an SD3 checkpoint; use sd3_train_network.py",
}


@dataclass
class SdModels:
    """The three SD1/SD2 models, in the order a training step uses them, plus what the trainer needs to know."""

    unet: SdUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet_config: SdUNetConfig
    v2: bool


@dataclass
class _Weights:
    """State dicts in our layouts (ldm U-Net/VAE, canonical HF CLIP), with the configs to build them."""

    unet_vae: UNetVaeWeights
    text: dict[str, Tensor]
    text_act: str


def load_sd_models(
    path: str | Path,
    *,
    v2: bool,
    vae_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    mmap: bool = True,
) -> SdModels:
    """Build U-Net, VAE and text encoder from ``--pretrained_model_name_or_path`` (file or diffusers folder).

    ``v2`` must match the checkpoint (the error says which flag to add or drop); ``vae_path`` replaces the
    checkpoint's VAE (``--vae``: a file with or without ``first_stage_model.``, or a diffusers VAE).
    """
    path = Path(path)
    require_model(path)
    weights = _folder_weights(path, v2, mmap) if path.is_dir() else _single_file_weights(path, v2, mmap)
    unet, vae = build_unet_and_vae(SdUNet, weights.unet_vae, path, vae_path, mmap)
    with errors_naming(f"{path} (text encoder)"):
        text_encoder = load_clip_text_model(weights.text, hidden_act=weights.text_act)
    return SdModels(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        unet_config=weights.unet_vae.unet_config,
        v2=v2,
    )


def check_sd_checkpoint(path: str | Path, *, v2: bool) -> None:
    """Fail early, before the dataset is scanned or any weights are read, on a missing file or a checkpoint
    of another family (reads only a safetensors header)."""
    path = Path(path)
    require_model(path)
    keys = None if path.is_dir() else checkpoint_keys(path)
    if keys is not None:
        _check_family(detect_family(keys, source=str(path)), v2, path)


def _check_family(family: str, v2: bool, source: Path) -> None:
    if family in _OTHER_FAMILY:
        raise CheckpointError(f"{source} is {_OTHER_FAMILY[family]}")
    if family == "sd2" and not v2:
        raise CheckpointError(f"{source} is an SD2.x checkpoint (OpenCLIP text encoder); add --v2")
    if family == "sd1" and v2:
        raise CheckpointError(f"{source} is an SD1.x checkpoint (CLIP-L text encoder); drop --v2")


def _single_file_weights(path: Path, v2: bool, mmap: bool) -> _Weights:
    state_dict = load_state_dict(path, mmap=mmap)
    _check_family(detect_family(state_dict, source=str(path)), v2, path)
    with errors_naming(path):
        unet, vae = strip_prefix(state_dict, UNET_PREFIX), strip_prefix(state_dict, VAE_PREFIX)
        if not unet:
            raise CheckpointError(f"no {UNET_PREFIX}* (U-Net) weights")
        if not vae:
            raise CheckpointError(f"no {VAE_PREFIX}* (VAE) weights; pass --vae with a VAE file")
        if v2:
            text = openclip_to_hf_text_state_dict(strip_prefix(state_dict, SD2_TEXT_PREFIX), drop_last_layers=1)
        else:
            text = canonical_hf_text_state_dict(strip_prefix(state_dict, SD1_TEXT_PREFIX))
        return _Weights(
            unet_vae=UNetVaeWeights(unet, infer_unet_config(unet), vae, infer_vae_config(vae)),
            text=text,
            text_act=SD2_TEXT_ACT if v2 else SD1_TEXT_ACT,
        )


def _folder_weights(folder: Path, v2: bool, mmap: bool) -> _Weights:
    if (folder / "transformer").is_dir():
        raise CheckpointError(f"{folder} is {_OTHER_FAMILY['sd3']}")
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{folder} is {_OTHER_FAMILY['sdxl']}")
    text_config = read_diffusers_config(folder / "text_encoder")
    text_act = text_config.get("hidden_act", SD1_TEXT_ACT)
    _check_family("sd2" if text_act == SD2_TEXT_ACT else "sd1", v2, folder)
    with errors_naming(folder):
        return _Weights(
            unet_vae=read_diffusers_unet_vae(folder, mmap, unet_config_from_diffusers),
            text=canonical_hf_text_state_dict(load_diffusers_weights(folder / "text_encoder", mmap)),
            text_act=text_act,
        )


def unet_config_from_diffusers(config: dict[str, Any]) -> SdUNetConfig:
    """SdUNetConfig from a diffusers ``unet/config.json`` of an SD1/SD2 model.

    Diffusers' SD configs store the head *count* under ``attention_head_dim`` (8 for SD1, [5, 10, 20, 20] for
    SD2); a per-level list with a constant width per head is SD2's 64-channels-per-head rule.
    """
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise CheckpointError("the U-Net takes class/time embeddings (SDXL or an upscaler), not an SD1/SD2 U-Net")
    fields = diffusers_unet_fields(config)
    widths = list(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise CheckpointError(f"per-level transformer depths {depth} are not an SD1/SD2 U-Net")
        depth = depth[0]
    num_heads, head_channels = 8, None
    if isinstance(heads, int) or len(set(heads)) == 1:
        num_heads = heads if isinstance(heads, int) else heads[0]
    else:
        per_head = {width // count for width, count in zip(widths, heads, strict=True)}
        if len(per_head) != 1:
            raise CheckpointError(f"attention heads {heads} over widths {widths} fit neither the SD1 nor the SD2 rule")
        head_channels = per_head.pop()
    return SdUNetConfig(**fields, num_heads=num_heads, num_head_channels=head_channels, transformer_depth=depth)


# ---------------------------------------------------------------------------------------------- shared with SDXL
# SD1/SD2 and SDXL differ in their text encoders and in the rules of their U-Net configs; what follows is the
# part of the U-Net + VAE handling where they agree (sdxl_loading uses it too).


@dataclass
class UNetVaeWeights:
    """A U-Net's tensors (ldm/sgm layout) and a VAE's (ldm layout), with the configs that build them."""

    unet: dict[str, Tensor]
    unet_config: SdUNetConfig
    vae: dict[str, Tensor]
    vae_config: VaeConfig


def read_diffusers_unet_vae(
    folder: Path, mmap: bool, unet_config_reader: Callable[[dict[str, Any]], SdUNetConfig]
) -> UNetVaeWeights:
    """``unet/`` and ``vae/`` of a diffusers pipeline folder, renamed into our layouts; ``unet_config_reader``
    applies the family's rules to ``unet/config.json``."""
    unet_config = unet_config_reader(read_diffusers_config(folder / "unet"))
    vae_config = vae_config_from_diffusers(read_diffusers_config(folder / "vae"))
    return UNetVaeWeights(
        unet=unet_state_dict_from_diffusers(load_diffusers_weights(folder / "unet", mmap), unet_config),
        unet_config=unet_config,
        vae=vae_state_dict_from_diffusers(load_diffusers_weights(folder / "vae", mmap), vae_config),
        vae_config=vae_config,
    )


def build_unet_and_vae(
    unet_class: type[UNetT], weights: UNetVaeWeights, path: Path, vae_path: str | Path | None, mmap: bool
) -> tuple[UNetT, AutoencoderKL]:
    """The U-Net and the VAE, the latter from ``vae_path`` (``--vae``) when given, else from ``weights``."""
    if vae_path is not None:
        weights.vae, weights.vae_config = load_vae_override(Path(vae_path), mmap)
    unet = build_model(unet_class, weights.unet_config, weights.unet, f"{path} (U-Net)")
    vae = build_model(AutoencoderKL, weights.vae_config, weights.vae, f"{vae_path or path} (VAE)")
    return unet, vae


def diffusers_unet_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The SdUNetConfig fields that a diffusers ``unet/config.json`` states alike for SD1/SD2 and SDXL; the
    head-count and transformer-depth rules differ and stay with each family's loader."""
    widths = list(config["block_out_channels"])
    down_blocks = config["down_block_types"]
    return {
        "in_channels": config.get("in_channels", 4),
        "out_channels": config.get("out_channels", 4),
        "model_channels": widths[0],
        "channel_mult": tuple(width // widths[0] for width in widths),
        "num_res_blocks": config.get("layers_per_block", 2),
        "attention_levels": tuple(i for i, kind in enumerate(down_blocks) if kind.startswith("CrossAttn")),
        "context_dim": config["cross_attention_dim"],
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "norm_groups": config.get("norm_num_groups", 32),
    }
