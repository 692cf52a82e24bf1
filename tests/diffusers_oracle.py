"""diffusers as the independent oracle: our tiny single-file checkpoints converted with diffusers' own
single-file converters and saved as a diffusers folder (for loading tests and for LoRA-in-pipeline tests)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
    create_unet_diffusers_config_from_ldm,
)
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.fixtures.tiny_sd import (
    TINY_TEXT_LAYERS,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae_config,
)
from library.fixtures.tiny_sdxl import tiny_sdxl_text_config, tiny_sdxl_unet_config
from library.models.sd_unet import SdUNetConfig


def diffusers_vae_config() -> dict:
    config = tiny_vae_config()
    widths = [config.ch * mult for mult in config.ch_mult]
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": 32,
    }


def ldm_unet_yaml(config: SdUNetConfig) -> dict:
    """The ldm YAML diffusers' converter reads the U-Net layout from (as a dict)."""
    # ldm/sgm read one depth per level and take the middle block's from the last level; levels without
    # attention ignore theirs, so they carry the middle depth here.
    depth = [count or config.middle_transformer_depth for count in config.transformer_depth]
    if config.num_head_channels is None:
        heads = {"num_heads": config.num_heads}
    else:
        heads = {"num_head_channels": config.num_head_channels}
    params = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "attention_resolutions": [2**level for level in config.attention_levels],
        "num_res_blocks": config.num_res_blocks,
        "channel_mult": list(config.channel_mult),
        "use_linear_in_transformer": config.use_linear_in_transformer,
        "transformer_depth": depth,
        "context_dim": config.context_dim,
        **heads,
    }
    vae_params = {"ddconfig": {"ch_mult": list(tiny_vae_config().ch_mult)}}
    return {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": {"params": vae_params}}}}


def write_diffusers_folder(checkpoint_path: Path, folder: Path, v2: bool) -> None:
    """Convert a tiny single file with diffusers' own converters and save it the way diffusers does."""
    checkpoint = load_file(checkpoint_path)
    unet_config = tiny_unet_config(v2)
    diffusers_unet_config = create_unet_diffusers_config_from_ldm(ldm_unet_yaml(unet_config), checkpoint)
    diffusers_unet_config["norm_num_groups"] = unet_config.norm_groups
    unet = UNet2DConditionModel(**diffusers_unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, diffusers_unet_config), strict=True)
    unet.save_pretrained(folder / "unet")
    vae = DiffusersAutoencoderKL(**diffusers_vae_config())
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, diffusers_vae_config()), strict=True)
    vae.save_pretrained(folder / "vae")
    text_config = tiny_text_config(v2)
    text_config.num_hidden_layers = TINY_TEXT_LAYERS
    text_config.save_pretrained(folder / "text_config")
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(folder / "text_config"), local_files_only=True
    )
    text_encoder.save_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "text_config")


# The published stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: the entries that differ from
# UNet2DConditionModel's defaults and those our diffusers-folder mapping reads.
SDXL_BASE_UNET_CONFIG = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}


def tiny_sdxl_diffusers_unet_config() -> dict:
    """The tiny SDXL U-Net as diffusers spells an SDXL U-Net: head counts per level, a depth for every level."""
    config = tiny_sdxl_unet_config()
    widths = [config.model_channels * mult for mult in config.channel_mult]
    return {
        **SDXL_BASE_UNET_CONFIG,
        "attention_head_dim": [1, 1, 2],  # level 0 has no attention; its entry is ignored
        "block_out_channels": widths,
        "cross_attention_dim": config.context_dim,
        "layers_per_block": config.num_res_blocks,
        "projection_class_embeddings_input_dim": config.adm_in_channels,
        "transformer_layers_per_block": [1, 1, 2],
        "sample_size": 16,
    }


def diffusers_sdxl_text_encoder(
    model_class: type[CLIPTextModel | CLIPTextModelWithProjection],
    checkpoint: Mapping[str, Tensor],
    name: str,
    config_dir: Path,
) -> CLIPTextModel:
    """diffusers' own single-file path for one tiny SDXL encoder ("clip_l" or "clip_g"): a config read from
    disk, its converter (which tells CLIP-L from bigG by the checkpoint's keys), its loading into the model."""
    tiny_sdxl_text_config(name).save_pretrained(config_dir)
    return create_diffusers_clip_model_from_ldm(model_class, checkpoint, config=str(config_dir), local_files_only=True)


def write_sdxl_diffusers_folder(checkpoint: Mapping[str, Tensor], folder: Path) -> UNet2DConditionModel:
    """Convert the tiny SDXL single file (as loaded) with diffusers' converters and save it as a diffusers SDXL
    folder (unet, vae, text_encoder, text_encoder_2); returns diffusers' U-Net, in eval mode."""
    unet_config = tiny_sdxl_diffusers_unet_config()
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(dict(checkpoint), unet_config), strict=True)
    unet.save_pretrained(folder / "unet")
    vae = DiffusersAutoencoderKL(**diffusers_vae_config())
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(checkpoint), diffusers_vae_config()), strict=True)
    vae.save_pretrained(folder / "vae")
    encoders = {"text_encoder": (CLIPTextModel, "clip_l"), "text_encoder_2": (CLIPTextModelWithProjection, "clip_g")}
    for part, (model_class, name) in encoders.items():
        config_dir = folder / f"{part}_config"
        diffusers_sdxl_text_encoder(model_class, checkpoint, name, config_dir).save_pretrained(folder / part)
        shutil.rmtree(config_dir)
    return unet.eval()


def randomize_(module: nn.Module, seed: int) -> None:
    """Seeded fan-in-scaled weights, also where the originals start at zero (zero-initialised output layers
    would make two models agree while their wiring differs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
