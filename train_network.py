"""LoRA training for Stable Diffusion 1.x / 2.x checkpoints (sd-scripts' train_network.py command line).

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config data.toml --output_dir out --network_module networks.lora --network_dim 16 ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from library.args import TRAINING_FLAGS, setup_parser_for
from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.ddpm_step import DdpmLossConfig, ddpm_loss
from library.fingerprint import file_identity
from library.fp8 import Fp8Layout
from library.metadata import BaseModelFacts, base_model_facts
from library.models.clip_text import apply_token_weights, encode_chunked, tokenize_chunked, tokenize_weighted_chunked
from library.models.sd_loading import check_sd_checkpoint, load_sd_models
from library.models.sd_unet import DTYPE_SOURCE_LAYER
from library.models.tokenizers import (
    SD1_TOKENIZER_ID,
    SD2_TOKENIZER_ID,
    SD2_TOKENIZER_SUBFOLDER,
    load_clip_tokenizer,
)
from library.run_config import SampleConfig
from library.sample_images import cfg, ddpm_latents, generate_samples
from library.sample_prompts import SamplePrompt
from library.trainer import Models, NetworkTrainer, run_cli

logger = logging.getLogger(__name__)

VAE_SCALE = 0.18215


class SdNetworkTrainer(NetworkTrainer):
    """The SD1.x/2.x hooks: CLIP text conditioning, a 4-channel VAE and the DDPM loss."""

    # --fp8_base: every Linear and Conv2d weight of the U-Net (but the layer it takes its compute dtype from), and the
    # text encoders' Linear weights (their embeddings keep their dtype, as in sd-scripts).
    fp8_denoiser_layout = Fp8Layout((nn.Linear, nn.Conv2d), keep=(DTYPE_SOURCE_LAYER,))
    fp8_text_encoder_layout = Fp8Layout((nn.Linear,))

    def __init__(self, args: argparse.Namespace):
        self.v2 = args.v2
        self.v_parameterization = args.v_parameterization
        self.clip_skip = args.clip_skip
        self.max_token_length = args.max_token_length
        self.weighted_captions = args.weighted_captions
        self.loss_config = DdpmLossConfig.from_args(args)
        self.schedule = DdpmSchedule.scaled_linear(zero_terminal_snr=args.zero_terminal_snr)

    def check_model_files(self, args: argparse.Namespace) -> None:
        check_sd_checkpoint(args.pretrained_model_name_or_path or "", v2=self.v2)

    def load_models(self, args: argparse.Namespace) -> Models:
        hub_id, subfolder = (SD2_TOKENIZER_ID, SD2_TOKENIZER_SUBFOLDER) if self.v2 else (SD1_TOKENIZER_ID, None)
        tokenizer = load_clip_tokenizer(hub_id, args.tokenizer_cache_dir, subfolder=subfolder)
        loaded = load_sd_models(args.pretrained_model_name_or_path, v2=self.v2, vae_path=args.vae,
                                mmap=not getattr(args, "disable_mmap_load_safetensors", False))
        logger.info("loaded %s U-Net (%s)", "SD2" if self.v2 else "SD1", loaded.unet_config)
        return Models(denoiser=loaded.unet, vae=loaded.vae, text_encoders=[loaded.text_encoder], tokenizers=[tokenizer])

    def cache_producers(self, args: argparse.Namespace) -> tuple[str, str]:
        model = file_identity(args.vae or args.pretrained_model_name_or_path)
        precision = "fp32" if args.no_half_vae or args.mixed_precision == "no" else args.mixed_precision
        latents = f"sd-vae:{model}:{precision}"
        text = (f"sd-clip:{file_identity(args.pretrained_model_name_or_path)}:v2={self.v2}:clip_skip={self.clip_skip}"
                f":max_token_length={self.max_token_length}")
        if self.weighted_captions:
            text += ":weighted_captions"
        return latents, text

    def encode_images(self, models: Models, images: torch.Tensor) -> torch.Tensor:
        return models.vae.encode(images).sample() * VAE_SCALE

    def encode_text(self, models: Models, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = models.tokenizers[0], models.text_encoders[0]
        if not self.weighted_captions:
            return {"hidden_states": encode_chunked(encoder, tokenize_chunked(tokenizer, captions, self.max_token_length),
                                                    self.clip_skip)}
        ids, weights = tokenize_weighted_chunked(tokenizer, captions, self.max_token_length)
        return {"hidden_states": apply_token_weights(encode_chunked(encoder, ids, self.clip_skip), weights)}

    def compute_loss(self, models: Models, batch: dict, latents: torch.Tensor, text: dict[str, torch.Tensor],
                     generator: torch.Generator | None) -> torch.Tensor:
        context = text["hidden_states"].to(latents.dtype)
        if self.schedule.alphas_cumprod.device != latents.device:
            self.schedule = self.schedule.to(latents.device)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return models.denoiser(noisy, timesteps, context)

        return ddpm_loss(denoise, latents, config=self.loss_config, schedule=self.schedule,
                         loss_weights=batch["loss_weights"], alpha_masks=batch["alpha_masks"], generator=generator)

    def sample_images(self, models: Models, sample: SampleConfig, *, step: int, epoch: int | None, device: torch.device) -> list[Path]:
        def render(prompt: SamplePrompt, generator: torch.Generator, sampler: str) -> torch.Tensor:
            cond, uncond = self.encode_prompts(models, [prompt.prompt, prompt.negative_prompt], device)["hidden_states"].chunk(2)
            guided = cfg(models.denoiser, cond, uncond, prompt.cfg_scale)
            return ddpm_latents(prompt, generator, sampler, guided=guided, schedule=self.schedule,
                                v_parameterization=self.v_parameterization, channels=4)

        return generate_samples(sample, step=step, epoch=epoch, device=device, render=render,
                                decode=lambda z: models.vae.decode((z / VAE_SCALE).to(models.vae.dtype)))

    def model_facts(self, args: argparse.Namespace, models: Models) -> BaseModelFacts:
        return base_model_facts("sd2" if self.v2 else "sd1", v_parameterization=self.v_parameterization)


def setup_parser() -> argparse.ArgumentParser:
    return setup_parser_for(TRAINING_FLAGS, prog="train_network.py", description="Train a LoRA for Stable Diffusion 1.x / 2.x.")


def main(argv: list[str] | None = None) -> None:
    run_cli(SdNetworkTrainer, setup_parser(), argv)


if __name__ == "__main__":
    main()
