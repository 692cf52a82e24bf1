"""LoRA training for SDXL and SDXL-derived checkpoints (sd-scripts' sdxl_train_network.py command line).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --output_dir out --network_module networks.lora --network_dim 32 ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from library.args import CLIP_SKIP_IGNORED, UNSUPPORTED, setup_parser_for
from library.args_groups import SDXL_FLAGS, TRAINING_FLAGS
from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.ddpm_step import DdpmLossConfig, ddpm_loss
from library.fingerprint import file_identity
from library.fp8 import Fp8Layout
from library.metadata import BaseModelFacts, base_model_facts
from library.models.sd_unet import DTYPE_SOURCE_LAYER
from library.models.sdxl_conditioning import sdxl_size_embedding
from library.models.sdxl_loading import (
    SDXL_LATENT_SCALE,
    check_sdxl_checkpoint,
    load_sdxl_models,
)
from library.models.sdxl_text import encode_sdxl, load_sdxl_tokenizers, tokenize_sdxl
from library.run_config import SampleConfig
from library.sample_images import cfg, ddpm_latents, generate_samples
from library.sample_prompts import SamplePrompt
from library.trainer import Models, NetworkTrainer, run_cli

logger = logging.getLogger(__name__)

SDXL_UNSUPPORTED = {
    **UNSUPPORTED,
    "v2": "SDXL is not an SD 2.x model; drop --v2",
    "clip_skip": "SDXL always uses the penultimate layer of both text encoders",
}


class SdxlNetworkTrainer(NetworkTrainer):
    """The SDXL hooks: two CLIP text encoders, size conditioning and the DDPM loss shared with SD1/2."""

    # --fp8_base: every Linear and Conv2d weight of the U-Net (but the layer it takes its compute dtype from), and the
    # text encoders' Linear weights (their embeddings keep their dtype, as in sd-scripts).
    fp8_denoiser_layout = Fp8Layout((nn.Linear, nn.Conv2d), keep=(DTYPE_SOURCE_LAYER,))
    fp8_text_encoder_layout = Fp8Layout((nn.Linear,))

    def __init__(self, args: argparse.Namespace):
        self.v_parameterization = args.v_parameterization
        self.max_token_length = args.max_token_length
        self.weighted_captions = args.weighted_captions
        self.loss_config = DdpmLossConfig.from_args(args)
        self.schedule = DdpmSchedule.scaled_linear(zero_terminal_snr=args.zero_terminal_snr)
        if args.mixed_precision == "fp16" and not args.no_half_vae:
            logger.warning("the SDXL VAE overflows in fp16 (NaN latents); add --no_half_vae to run it in fp32")

    def check_model_files(self, args: argparse.Namespace) -> None:
        check_sdxl_checkpoint(args.pretrained_model_name_or_path or "", vae_path=args.vae)

    def load_models(self, args: argparse.Namespace) -> Models:
        tokenizers = load_sdxl_tokenizers(args.tokenizer_cache_dir)
        loaded = load_sdxl_models(args.pretrained_model_name_or_path, vae_path=args.vae,
                                  mmap=not args.disable_mmap_load_safetensors)
        logger.info("loaded SDXL U-Net (%s)", loaded.unet_config)
        return Models(denoiser=loaded.unet, vae=loaded.vae, text_encoders=[loaded.text_encoder_l, loaded.text_encoder_g],
                      tokenizers=[tokenizers])

    def cache_producers(self, args: argparse.Namespace) -> tuple[str, str]:
        checkpoint = file_identity(args.pretrained_model_name_or_path)
        precision = "fp32" if args.no_half_vae or args.mixed_precision == "no" else args.mixed_precision
        latents = f"sdxl-vae:{file_identity(args.vae) if args.vae else checkpoint}:{precision}"
        text = f"sdxl-clip:{checkpoint}:max_token_length={self.max_token_length}"
        if self.weighted_captions:
            text += ":weighted_captions"
        return latents, text

    def encode_images(self, models: Models, images: torch.Tensor) -> torch.Tensor:
        return models.vae.encode(images).sample() * SDXL_LATENT_SCALE

    def encode_text(self, models: Models, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenize_sdxl(models.tokenizers[0], captions, self.max_token_length, weighted=self.weighted_captions)
        return encode_sdxl(models.text_encoders[0], models.text_encoders[1], tokens)

    def compute_loss(self, models: Models, batch: dict, latents: torch.Tensor, text: dict[str, torch.Tensor],
                     generator: torch.Generator | None) -> torch.Tensor:
        if self.schedule.alphas_cumprod.device != latents.device:
            self.schedule = self.schedule.to(latents.device)
        context = text["hidden_states"].to(latents.dtype)
        # Size conditioning from each image's own bucket and crop, as SDXL was trained (original, crop, target).
        y = sdxl_size_embedding(text["pooled"], batch["original_sizes_hw"], batch["crop_top_lefts"],
                                batch["target_sizes_hw"]).to(latents.dtype)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return models.denoiser(noisy, timesteps, context, y)

        return ddpm_loss(denoise, latents, config=self.loss_config, schedule=self.schedule,
                         loss_weights=batch["loss_weights"], alpha_masks=batch["alpha_masks"], generator=generator)

    def sample_images(self, models: Models, sample: SampleConfig, *, step: int, epoch: int | None, device: torch.device) -> list[Path]:
        def render(prompt: SamplePrompt, generator: torch.Generator, sampler: str) -> torch.Tensor:
            text = self.encode_prompts(models, [prompt.prompt, prompt.negative_prompt], device)
            size = (prompt.height // 64 * 64, prompt.width // 64 * 64)
            y = sdxl_size_embedding(text["pooled"], size, (0, 0), size)
            (cond_c, uncond_c), (cond_y, uncond_y) = text["hidden_states"].chunk(2), y.chunk(2)
            guided = cfg(lambda x, t, c: models.denoiser(x, t, c[0], c[1]), (cond_c, cond_y), (uncond_c, uncond_y), prompt.cfg_scale)
            return ddpm_latents(prompt, generator, sampler, guided=guided, schedule=self.schedule,
                                v_parameterization=self.v_parameterization, channels=4)

        return generate_samples(sample, step=step, epoch=epoch, device=device, render=render,
                                decode=lambda z: models.vae.decode((z / SDXL_LATENT_SCALE).to(models.vae.dtype)))

    def model_facts(self, args: argparse.Namespace, models: Models) -> BaseModelFacts:
        return base_model_facts("sdxl", v_parameterization=self.v_parameterization)


def setup_parser() -> argparse.ArgumentParser:
    return setup_parser_for(TRAINING_FLAGS, SDXL_FLAGS, unsupported=SDXL_UNSUPPORTED,
                            ignored_values=CLIP_SKIP_IGNORED, prog="sdxl_train_network.py",
                            description="Train a LoRA for SDXL.")


def sdxl_learning_rates(args: argparse.Namespace) -> argparse.Namespace:
    """--text_encoder_lr1/--text_encoder_lr2 (the SDXL guide's spelling) become the --text_encoder_lr pair."""
    if args.text_encoder_lr1 is None and args.text_encoder_lr2 is None:
        return args
    if args.text_encoder_lr:
        raise ValueError("give either --text_encoder_lr or --text_encoder_lr1/--text_encoder_lr2, not both")
    default = args.learning_rate
    pair = [args.text_encoder_lr1 if args.text_encoder_lr1 is not None else default,
            args.text_encoder_lr2 if args.text_encoder_lr2 is not None else default]
    return argparse.Namespace(**{**vars(args), "text_encoder_lr": pair})


def main(argv: list[str] | None = None) -> None:
    run_cli(SdxlNetworkTrainer, setup_parser(), argv, resolve=sdxl_learning_rates)


if __name__ == "__main__":
    main()
