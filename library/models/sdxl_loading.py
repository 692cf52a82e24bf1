"""Loading SDXL from a single-file checkpoint or a diffusers folder.

A single file keeps each part under the prefix Stability's sgm code writes: ``model.diffusion_model.*`` (the
U-Net, sgm naming with ``label_emb``), ``first_stage_model.*`` (the VAE, SD's layout),
``conditioner.embedders.0.transformer.*`` (CLIP-L, Hugging Face naming) and ``conditioner.embedders.1.model.*``
(OpenCLIP ViT-bigG naming). bigG is mapped into a transformers ``CLIPTextModelWithProjection`` with all its
layers: SDXL conditions on its penultimate hidden state but pools from the last one (see ``sdxl_text``).
A diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``) is renamed into the same
layouts, so one code path builds the models. Configs come from the tensors (or the folder's config.json),
never from the hub.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.models.checkpoint import CheckpointError, checkpoint_keys, detect_family, load_state_dict, strip_prefix
from library.models.loading_common import (
    VAE_PREFIX,
    errors_naming,
    load_diffusers_weights,
    read_diffusers_config,
    require_model,
)
from library.models.sd_loading import (
    UNetVaeWeights,
    build_unet_and_vae,
    diffusers_unet_fields,
    read_diffusers_unet_vae,
)
from library.models.sd_unet import SdUNetConfig, SdxlUNet, infer_unet_config
from library.models.sdxl_conditioning import SIZE_EMBEDDING_DIM, SIZE_VALUES
from library.models.text_encoders import (
    PROJECTION_KEY,
    canonical_hf_text_state_dict,
    load_clip_text_model,
    openclip_to_hf_text_state_dict,
)
from library.models.vae import AutoencoderKL, VaeConfig, infer_vae_config

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_LATENT_SCALE = 0.13025
CLIP_L_ACT = "quick_gelu"  # OpenAI CLIP-L
CLIP_G_ACT = "gelu"  # OpenCLIP ViT-bigG

_OTHER_FAMILY = {
    "sd1": "an SD1.x checkpoint; use train_network.py",
    "sd2": "an SD2.x checkpoint; use train_network.py --v2",
    "sd3": "an SD3 checkpoint; use sd3_train_network.py",
}
# The refiner's only text encoder is a bigG tower under embedders.0, in OpenCLIP naming.
_REFINER_MARKER = "conditioner.embedders.0.model."
_REFINER = "the SDXL refiner (one OpenCLIP text encoder); sdxl_train_network.py trains SDXL base models"
_FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class SdxlModels:
    """The SDXL models, in the order a training step uses them, plus the U-Net's inferred config."""

    unet: SdxlUNet
    vae: AutoencoderKL
    text_encoder_l: CLIPTextModel
    text_encoder_g: CLIPTextModelWithProjection
    unet_config: SdUNetConfig


@dataclass
class _Weights:
    """State dicts in our layouts (sgm U-Net, ldm VAE, canonical HF CLIP), with what builds them."""

    unet_vae: UNetVaeWeights
    text_l: dict[str, Tensor]
    text_g: dict[str, Tensor]
    act_l: str = CLIP_L_ACT
    act_g: str = CLIP_G_ACT


def load_sdxl_models(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    mmap: bool = True,
) -> SdxlModels:
    """Build U-Net, VAE and both text encoders from ``--pretrained_model_name_or_path`` (file or diffusers
    folder); every floating tensor ends in ``dtype``. ``vae_path`` replaces the checkpoint's VAE (``--vae``: a
    file with or without ``first_stage_model.``, or a diffusers VAE); ``mmap=False`` reads files whole."""
    path = Path(path)
    _require(path, vae_path)
    weights = _folder_weights(path, mmap) if path.is_dir() else _single_file_weights(path, mmap, vae_path is None)
    unet, vae = build_unet_and_vae(SdxlUNet, weights.unet_vae, path, vae_path, mmap)
    with errors_naming(f"{path} (CLIP-L text encoder)"):
        text_encoder_l = load_clip_text_model(weights.text_l, hidden_act=weights.act_l)
    with errors_naming(f"{path} (bigG text encoder)"):
        text_encoder_g = load_clip_text_model(weights.text_g, with_projection=True, hidden_act=weights.act_g)
    _check_widths(weights.unet_vae.unet_config, text_encoder_l, text_encoder_g, path)
    return SdxlModels(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder_l=text_encoder_l.to(dtype),
        text_encoder_g=text_encoder_g.to(dtype),
        unet_config=weights.unet_vae.unet_config,
    )


def check_sdxl_checkpoint(path: str | Path, *, vae_path: str | Path | None = None) -> None:
    """Fail early, before the dataset is scanned or any weights are read: a missing file, a checkpoint of another
    family or without a part SDXL needs. Reads only a safetensors header (other formats are checked on loading)
    or, for a diffusers folder, which component folders exist."""
    path = Path(path)
    _require(path, vae_path)
    if path.is_dir():
        _check_folder(path)
        return
    keys = checkpoint_keys(path)
    if keys is not None:
        _check_single_file_keys(path, keys, need_vae=vae_path is None)


def _require(path: Path, vae_path: str | Path | None) -> None:
    require_model(path)
    if vae_path is not None and not Path(vae_path).exists():
        raise CheckpointError(f"--vae file not found: {vae_path}")


def _check_single_file_keys(path: Path, keys: list[str], need_vae: bool) -> None:
    """The file is an SDXL base checkpoint holding every part (the VAE may come from ``--vae`` instead)."""
    family = detect_family(keys, source=str(path))
    if family in _OTHER_FAMILY:
        raise CheckpointError(f"{path} is {_OTHER_FAMILY[family]}")
    if any(key.startswith(_REFINER_MARKER) for key in keys):
        raise CheckpointError(f"{path} is {_REFINER}")
    parts = {"U-Net": UNET_PREFIX, "CLIP-L text encoder": CLIP_L_PREFIX, "bigG text encoder": CLIP_G_PREFIX}
    if need_vae:
        parts["VAE"] = VAE_PREFIX
    missing = [label for label, prefix in parts.items() if not any(key.startswith(prefix) for key in keys)]
    if missing:
        advice = "; pass --vae with a VAE file" if missing == ["VAE"] else " (an incomplete or extracted file?)"
        prefixes = ", ".join(f"{parts[label]}*" for label in missing)
        raise CheckpointError(f"{path} has no {', '.join(missing)} weights ({prefixes}){advice}")


def _check_folder(folder: Path) -> None:
    if (folder / "transformer").is_dir():
        raise CheckpointError(f"{folder} is an SD3 diffusers folder; use sd3_train_network.py")
    if (folder / "unet").is_dir() and not (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{folder} is an SD1.x/SD2.x diffusers folder (no text_encoder_2/); use train_network.py")
    missing = [part for part in _FOLDER_PARTS if not (folder / part / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a diffusers SDXL folder: missing {', '.join(f'{part}/config.json' for part in missing)}"
        )


def _single_file_weights(path: Path, mmap: bool, need_vae: bool) -> _Weights:
    state_dict = load_state_dict(path, mmap=mmap)
    _check_single_file_keys(path, list(state_dict), need_vae)
    with errors_naming(path):
        unet, vae = strip_prefix(state_dict, UNET_PREFIX), strip_prefix(state_dict, VAE_PREFIX)
        # A file without a VAE got this far only with --vae, which replaces both VAE entries.
        vae_config = infer_vae_config(vae) if vae else VaeConfig()
        return _Weights(
            unet_vae=UNetVaeWeights(unet, _sdxl_unet_config(infer_unet_config(unet)), vae, vae_config),
            text_l=canonical_hf_text_state_dict(strip_prefix(state_dict, CLIP_L_PREFIX)),
            text_g=bigg_to_hf_text_state_dict(strip_prefix(state_dict, CLIP_G_PREFIX)),
        )


def bigg_to_hf_text_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SDXL's OpenCLIP bigG weights (keys without ``conditioner.embedders.1.model.``) -> canonical HF layout.

    Tolerates two variants found in the wild: a ``position_ids`` buffer that ComfyUI writes into the tower, and
    a projection already stored as a Linear weight (``text_projection.weight``, Playground v2), taken as is.
    """
    weights = {key: value for key, value in state_dict.items() if not key.endswith("position_ids")}
    linear_projection = weights.pop("text_projection.weight", None)
    converted = openclip_to_hf_text_state_dict(weights)
    if linear_projection is not None:
        converted[PROJECTION_KEY] = linear_projection
    return converted


def _sdxl_unet_config(config: SdUNetConfig) -> SdUNetConfig:
    if config.adm_in_channels is None:
        raise CheckpointError("the U-Net has no label_emb (size and pooled-text conditioning); not an SDXL U-Net")
    return config


def _folder_weights(folder: Path, mmap: bool) -> _Weights:
    _check_folder(folder)
    with errors_naming(folder):
        return _Weights(
            unet_vae=read_diffusers_unet_vae(folder, mmap, sdxl_unet_config_from_diffusers),
            text_l=canonical_hf_text_state_dict(load_diffusers_weights(folder / "text_encoder", mmap)),
            text_g=canonical_hf_text_state_dict(load_diffusers_weights(folder / "text_encoder_2", mmap)),
            act_l=read_diffusers_config(folder / "text_encoder").get("hidden_act", CLIP_L_ACT),
            act_g=read_diffusers_config(folder / "text_encoder_2").get("hidden_act", CLIP_G_ACT),
        )


def sdxl_unet_config_from_diffusers(config: dict[str, Any]) -> SdUNetConfig:
    """SdUNetConfig from a diffusers ``unet/config.json`` of an SDXL model.

    Diffusers' SDXL configs store head *counts* under ``attention_head_dim`` ([5, 10, 20]); SDXL's rule is a
    constant width per head (64), which is what our config keeps. ``transformer_layers_per_block`` also lists a
    depth for levels without attention ([1, 2, 10]); those levels get 0.
    """
    if config.get("addition_embed_type") != "text_time":
        raise CheckpointError(
            f"unet/config.json has addition_embed_type {config.get('addition_embed_type')!r}, not SDXL's 'text_time'"
        )
    if config.get("addition_time_embed_dim", SIZE_EMBEDDING_DIM) != SIZE_EMBEDDING_DIM:
        raise CheckpointError(
            f"unet/config.json embeds each size value in {config['addition_time_embed_dim']} channels; "
            f"SDXL uses {SIZE_EMBEDDING_DIM}"
        )
    fields = diffusers_unet_fields(config)
    widths, attention_levels = list(config["block_out_channels"]), fields["attention_levels"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * len(widths) if isinstance(depth, int) else list(depth)
    if any(not isinstance(count, int) for count in depth):
        raise CheckpointError(f"per-block transformer depths {depth} are not an SDXL U-Net")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    per_head = {widths[level] // heads[level] for level in attention_levels}
    if len(per_head) != 1:
        raise CheckpointError(f"attention heads {heads} over widths {widths} have no constant head width")
    return SdUNetConfig(
        **fields,
        transformer_depth=tuple(depth[level] if level in attention_levels else 0 for level in range(len(widths))),
        num_head_channels=per_head.pop(),
        adm_in_channels=config["projection_class_embeddings_input_dim"],
    )


def _check_widths(
    config: SdUNetConfig, text_l: CLIPTextModel, text_g: CLIPTextModelWithProjection, source: Path
) -> None:
    """The encoders must fit the U-Net: their widths add up to its context width, and bigG's pooled width plus
    the size embeddings to its adm_in_channels."""
    context = text_l.config.hidden_size + text_g.config.hidden_size
    adm = text_g.config.projection_dim + SIZE_VALUES * SIZE_EMBEDDING_DIM
    problems = []
    if context != config.context_dim:
        problems.append(f"CLIP-L + bigG width {context} != the U-Net's context width {config.context_dim}")
    if adm != config.adm_in_channels:
        problems.append(f"bigG pooled width + size embeddings {adm} != its adm_in_channels {config.adm_in_channels}")
    if problems:
        raise CheckpointError(f"{source}: the text encoders do not fit the U-Net: {'; '.join(problems)}")
