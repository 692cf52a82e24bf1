"""Loading SD1.x/2.x models from a single-file checkpoint or a diffusers folder.

Single files keep the original ldm prefixes: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*``
(VAE) and the text encoder under ``cond_stage_model.transformer.*`` (SD1: HF CLIP-L) or
``cond_stage_model.model.*`` (SD2: OpenCLIP ViT-H, whose last layer is dropped because SD2 conditions on the
penultimate one). Diffusers folders are renamed into the same layouts, so from here on one code path
builds the models. Configs come from the tensors (or the folder's config.json), never from the hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import CLIPTextModel

from library.models.checkpoint import CheckpointError, checkpoint_keys, detect_family, load_state_dict, strip_prefix
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
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SD1_TEXT_ACT = "quick_gelu"  # OpenAI CLIP-L
SD2_TEXT_ACT = "gelu"  # OpenCLIP ViT-H

_OTHER_FAMILY = {
    "sdxl": "an SDXL checkpoint; use sdxl_train_network.py",
    "sd3": "an SD3 checkpoint; use sd3_train_network.py",
}
_DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


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

    unet: dict[str, Tensor]
    unet_config: SdUNetConfig
    vae: dict[str, Tensor]
    vae_config: VaeConfig
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
    if not path.exists():
        raise CheckpointError(f"model not found: {path} (--pretrained_model_name_or_path takes a local file or folder)")
    weights = _folder_weights(path, v2, mmap) if path.is_dir() else _single_file_weights(path, v2, mmap)
    if vae_path is not None:
        weights.vae, weights.vae_config = _vae_override(Path(vae_path), mmap)
    unet = _build(SdUNet, weights.unet_config, weights.unet, f"{path} (U-Net)")
    vae = _build(AutoencoderKL, weights.vae_config, weights.vae, f"{vae_path or path} (VAE)")
    with _errors_naming(f"{path} (text encoder)"):
        text_encoder = load_clip_text_model(weights.text, hidden_act=weights.text_act)
    return SdModels(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        unet_config=weights.unet_config,
        v2=v2,
    )


def check_sd_checkpoint(path: str | Path, *, v2: bool) -> None:
    """Fail early, before the dataset is scanned or any weights are read, on a missing file or a checkpoint
    of another family (reads only a safetensors header)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path} (--pretrained_model_name_or_path takes a local file or folder)")
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
    with _errors_naming(path):
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
            unet=unet,
            unet_config=infer_unet_config(unet),
            vae=vae,
            vae_config=infer_vae_config(vae),
            text=text,
            text_act=SD2_TEXT_ACT if v2 else SD1_TEXT_ACT,
        )


def _folder_weights(folder: Path, v2: bool, mmap: bool) -> _Weights:
    if (folder / "transformer").is_dir():
        raise CheckpointError(f"{folder} is {_OTHER_FAMILY['sd3']}")
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{folder} is {_OTHER_FAMILY['sdxl']}")
    text_config = _read_config(folder / "text_encoder")
    text_act = text_config.get("hidden_act", SD1_TEXT_ACT)
    _check_family("sd2" if text_act == SD2_TEXT_ACT else "sd1", v2, folder)
    with _errors_naming(folder):
        unet_config = unet_config_from_diffusers(_read_config(folder / "unet"))
        vae_config = vae_config_from_diffusers(_read_config(folder / "vae"))
        return _Weights(
            unet=unet_state_dict_from_diffusers(_load_component(folder / "unet", mmap), unet_config),
            unet_config=unet_config,
            vae=vae_state_dict_from_diffusers(_load_component(folder / "vae", mmap), vae_config),
            vae_config=vae_config,
            text=canonical_hf_text_state_dict(_load_component(folder / "text_encoder", mmap)),
            text_act=text_act,
        )


def _vae_override(path: Path, mmap: bool) -> tuple[dict[str, Tensor], VaeConfig]:
    """``--vae``: a diffusers VAE folder, or a file in the ldm (optionally prefixed) or diffusers layout."""
    if not path.exists():
        raise CheckpointError(f"--vae file not found: {path}")
    with _errors_naming(path, "--vae "):
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").exists() else path
            config = vae_config_from_diffusers(_read_config(folder))
            return vae_state_dict_from_diffusers(_load_component(folder, mmap), config), config
        state_dict = load_state_dict(path, mmap=mmap)
        if any(key.startswith(VAE_PREFIX) for key in state_dict):
            state_dict = strip_prefix(state_dict, VAE_PREFIX)
        levels = {key.split(".")[2] for key in state_dict if key.startswith("encoder.down_blocks.")}
        if levels:
            # The renaming only needs the level count; the real config is read off the renamed tensors below.
            state_dict = vae_state_dict_from_diffusers(state_dict, VaeConfig(ch_mult=(1,) * len(levels)))
        return state_dict, infer_vae_config(state_dict)


def _build(model_class: type[nn.Module], config: Any, state_dict: dict[str, Tensor], source: str) -> nn.Module:
    """Instantiate without allocating random weights, then adopt the checkpoint tensors (strict)."""
    with init_empty_weights():
        model = model_class(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the inferred {type(config).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@contextmanager
def _errors_naming(source: Path | str, flag: str = "") -> Iterator[None]:
    """Re-raise bad-input errors of the key adapters and config inference as CheckpointErrors naming the file."""
    label = f"{flag}{source}"
    try:
        yield
    except KeyError as error:
        raise CheckpointError(f"{label}: required entry {error} is missing") from error
    except ValueError as error:
        if str(error).startswith(label):
            raise
        raise CheckpointError(f"{label}: {error}") from error


def _read_config(component: Path) -> dict[str, Any]:
    config_file = component / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{component.parent} is not a diffusers SD folder: {config_file} is missing")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON (line {error.lineno}: {error.msg})") from error


def _load_component(component: Path, mmap: bool) -> dict[str, Tensor]:
    for name in _DIFFUSERS_WEIGHT_FILES:
        if (component / name).is_file():
            return load_state_dict(component / name, mmap=mmap)
    raise CheckpointError(f"no weights file in {component} (expected one of {', '.join(_DIFFUSERS_WEIGHT_FILES)})")


def unet_config_from_diffusers(config: dict[str, Any]) -> SdUNetConfig:
    """SdUNetConfig from a diffusers ``unet/config.json`` of an SD1/SD2 model.

    Diffusers' SD configs store the head *count* under ``attention_head_dim`` (8 for SD1, [5, 10, 20, 20] for
    SD2); a per-level list with a constant width per head is SD2's 64-channels-per-head rule.
    """
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise CheckpointError("the U-Net takes class/time embeddings (SDXL or an upscaler), not an SD1/SD2 U-Net")
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
    return SdUNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=widths[0],
        channel_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attention_levels=tuple(i for i, kind in enumerate(config["down_block_types"]) if kind.startswith("CrossAttn")),
        context_dim=config["cross_attention_dim"],
        num_heads=num_heads,
        num_head_channels=head_channels,
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        transformer_depth=depth,
        norm_groups=config.get("norm_num_groups", 32),
    )


def vae_config_from_diffusers(config: dict[str, Any]) -> VaeConfig:
    """VaeConfig from a diffusers ``vae/config.json``."""
    widths = list(config["block_out_channels"])
    return VaeConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        z_channels=config.get("latent_channels", 4),
        ch=widths[0],
        ch_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        use_quant_conv=config.get("use_quant_conv", True),
        norm_groups=config.get("norm_num_groups", 32),
    )
