"""diffusers as the independent oracle: our tiny single-file checkpoints converted with diffusers' own
single-file converters and saved as a diffusers folder (for loading tests and for LoRA-in-pipeline tests)."""

from __future__ import annotations

import math
import shutil
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
from torch import nn
from transformers import CLIPTextModel

from library.fixtures.tiny_sd import (
    TINY_TEXT_LAYERS,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae_config,
)
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
