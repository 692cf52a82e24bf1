"""LoRA training for Stable Diffusion 3 Medium, 3.5 Medium and 3.5 Large (sd-scripts' sd3_train_network.py command line).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        [--clip_l … --clip_g … --t5xxl …] --dataset_config data.toml --output_dir out --network_module networks.lora ...
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from library.args import CLIP_SKIP_IGNORED, UNSUPPORTED, setup_parser_for
from library.args_groups import SD3_FLAGS, TRAINING_FLAGS
from library.diffusion.flow_matching import FlowMatchingLossConfig, flow_matching_loss
from library.fingerprint import file_identity
from library.fp8 import Fp8Parts, store_linear_weights_in_fp8
from library.metadata import BaseModelFacts, base_model_facts, lora_training_metadata
from library.models.checkpoint import checkpoint_keys
from library.models.sd3_loading import (
    SD3_LATENT_SCALE,
    SD3_LATENT_SHIFT,
    check_sd3_files,
    load_sd3_models,
)
from library.models.sd3_text import (
    Sd3TextOptions,
    T5Placement,
    dropout_masks,
    encode_sd3,
    load_sd3_tokenizers,
    place_sd3_text_encoders,
    sd3_conditioning,
    tokenize_sd3,
)
from library.offload import BlockSwapper, check_block_swap_flags, move_except_blocks
from library.run_config import RunConfig, SampleConfig, precision_dtype
from library.sample_images import cfg, flow_latents, generate_samples
from library.sample_prompts import SamplePrompt
from library.trainer import Models, NetworkTrainer, run_cli

logger = logging.getLogger(__name__)

VAE_SCALE, VAE_SHIFT = SD3_LATENT_SCALE, SD3_LATENT_SHIFT
SAMPLING_SHIFT = 3.0  # the shift SD3's released scheduler config uses at inference
# transformers' gated T5 feed-forward casts its input to `wo`'s weight dtype, which must not be fp8 (sd-scripts keeps it too).
T5_FP8_UNSAFE = ("DenseReluDense.wo",)

_DDPM_ONLY = "SD3 is a flow-matching model; this option belongs to the DDPM models (SD1/2, SDXL)"
SD3_UNSUPPORTED = {
    **UNSUPPORTED,
    "save_clip": "LoRA training never saves the text encoders (full fine-tuning flag)",
    "save_t5xxl": "LoRA training never saves the text encoders (full fine-tuning flag)",
    **{flag: _DDPM_ONLY for flag in (
        "v2", "v_parameterization", "zero_terminal_snr", "scale_v_pred_loss_like_noise_pred", "noise_offset",
        "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
        "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_snr_gamma", "debiased_estimation_loss")}, "clip_skip": "SD3 always uses the penultimate CLIP layers",
    "max_token_length": "SD3 uses 77 CLIP tokens; set the T5 length with --t5xxl_max_token_length",
    "weighted_captions": "weighted captions are implemented for SD1/SD2 and SDXL only (sd-scripts' SD3 trainer has "
                         "no weighted text encoding either)",
}


class Sd3NetworkTrainer(NetworkTrainer):
    """The SD3 hooks: three text encoders, a 16-channel VAE and the flow-matching loss."""

    hub_folder_flags = ()  # SD3 parts are single files, as in sd-scripts (no SD3 diffusers folders)

    def __init__(self, args: argparse.Namespace):
        self.text_options = Sd3TextOptions.from_args(args)
        self.loss_config = FlowMatchingLossConfig.from_args(args)
        self.dropout_rates = (args.clip_l_dropout_rate, args.clip_g_dropout_rate, args.t5_dropout_rate)
        self.t5_placement = T5Placement.from_args(args)
        if not 0.0 <= args.pos_emb_random_crop_rate <= 1.0:
            raise ValueError(f"--pos_emb_random_crop_rate must be between 0 and 1, got {args.pos_emb_random_crop_rate}")
        self.pos_emb_random_crop_rate = args.pos_emb_random_crop_rate
        self.scaled_pos_embed = args.enable_scaled_pos_embed

    def check_model_files(self, args: argparse.Namespace) -> None:
        path = args.pretrained_model_name_or_path or ""
        check_sd3_files(path, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, vae=args.vae)
        keys = checkpoint_keys(path) or []
        blocks = len({key.split(".")[3] for key in keys if key.startswith("model.diffusion_model.joint_blocks.")})
        check_block_swap_flags(args.blocks_to_swap, blocks or (args.blocks_to_swap or 0) + 1,
                               gradient_checkpointing=args.gradient_checkpointing,
                               cpu_offload_checkpointing=args.cpu_offload_checkpointing, cuda_available=torch.cuda.is_available(),
                               torch_compile=args.torch_compile)

    def load_models(self, args: argparse.Namespace) -> Models:
        tokenizers = load_sd3_tokenizers(args.tokenizer_cache_dir)
        # Loaded in the training dtype, not fp32: SD3.5 Large with T5 would otherwise need ~55 GB of RAM.
        loaded = load_sd3_models(args.pretrained_model_name_or_path, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                                 vae=args.vae, dtype=precision_dtype(args.mixed_precision), t5_dtype=self.t5_placement.dtype,
                                 mmap=not args.disable_mmap_load_safetensors)
        logger.info("loaded %s MMDiT (%s)", loaded.variant, loaded.mmdit_config)
        encoders = [loaded.text.clip_l, loaded.text.clip_g] + ([loaded.text.t5xxl] if loaded.text.t5xxl is not None else [])
        fp8 = Fp8Parts.from_args(args)
        # Before LoRA wraps the layers, and frozen first (only frozen weights go to fp8). Only the joint blocks:
        # the embedders cast their inputs to their weights' dtype.
        if fp8.denoiser:
            loaded.mmdit.requires_grad_(False)
            loaded.mmdit.joint_blocks.to(dtype=precision_dtype(args.mixed_precision))
            converted = store_linear_weights_in_fp8(loaded.mmdit.joint_blocks)
            logger.info("fp8 base: %d MMDiT linear weights stored in float8_e4m3fn", converted)
        if fp8.text_encoders:
            for encoder in encoders:
                encoder.requires_grad_(False)
                store_linear_weights_in_fp8(encoder, skip=T5_FP8_UNSAFE)
        return Models(denoiser=loaded.mmdit, vae=loaded.vae, text_encoders=encoders, tokenizers=tokenizers,
                      extra={"variant": loaded.variant, "text": loaded.text, "fp8": fp8.denoiser})

    def place_denoiser(self, args: argparse.Namespace, models: Models, device: torch.device, dtype: torch.dtype,
                       resolutions: list[tuple[int, int]]) -> None:
        if self.scaled_pos_embed:  # sd-scripts also takes the scaled grids from the dataset's buckets
            sizes = bucket_latent_sizes(resolutions)
            logger.info("scaled position embeddings for latent sizes %s", sizes)
            models.denoiser.enable_scaled_pos_embed(sizes)
        mmdit = models.denoiser
        if models.extra["fp8"]:  # fp8 joint blocks keep their storage dtype; everything else takes the compute dtype
            for name, module in mmdit.named_children():
                if module is not mmdit.joint_blocks:
                    module.to(dtype=dtype)
            mmdit.pos_embed.data = mmdit.pos_embed.data.to(dtype)
        else:
            mmdit.to(dtype=dtype)
        if not args.blocks_to_swap:
            mmdit.to(device)
            return
        move_except_blocks(mmdit, mmdit.joint_blocks, device)
        swapper = BlockSwapper(mmdit.joint_blocks, args.blocks_to_swap, device)
        swapper.prepare()
        swapper.install()
        logger.info("block swap: %d of %d joint blocks stay in CPU memory", args.blocks_to_swap, len(mmdit.joint_blocks))

    def place_text_encoders(self, args: argparse.Namespace, run: RunConfig, models: Models, device: torch.device) -> None:
        place_sd3_text_encoders(models.extra["text"], self.t5_placement, device=device, dtype=run.weight_dtype)
        if self.t5_placement != T5Placement():
            t5_device, t5_dtype = self.t5_placement.resolve(device, run.weight_dtype)
            logger.info("T5-XXL encodes on %s in %s", t5_device, t5_dtype)

    def cache_producers(self, args: argparse.Namespace) -> tuple[str, str]:
        checkpoint = file_identity(args.pretrained_model_name_or_path)
        precision = "fp32" if args.no_half_vae or args.mixed_precision == "no" else args.mixed_precision
        latents = f"sd3-vae:{file_identity(args.vae) if args.vae else checkpoint}:{precision}"
        encoders = ";".join(file_identity(p) if p else checkpoint for p in (args.clip_l, args.clip_g, args.t5xxl))
        options = self.text_options
        text = (f"sd3-text:{encoders}:t5_max_length={options.t5_max_length}:lg_mask={options.apply_lg_attn_mask}"
                f":t5_mask={options.apply_t5_attn_mask}")
        if Fp8Parts.from_args(args).text_encoders:
            text += ":fp8_text_encoders"
        t5_dtype = self.t5_placement.dtype
        if t5_dtype is not None and t5_dtype != precision_dtype(args.mixed_precision):  # else the shared key says it
            text += f":t5_dtype={str(t5_dtype).removeprefix('torch.')}"
        return latents, text

    def encode_images(self, models: Models, images: torch.Tensor) -> torch.Tensor:
        return (models.vae.encode(images).sample() - VAE_SHIFT) * VAE_SCALE

    def encode_text(self, models: Models, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenize_sd3(models.tokenizers, captions, self.text_options)
        return encode_sd3(models.extra["text"], tokens, self.text_options)

    def compute_loss(self, models: Models, batch: dict, latents: torch.Tensor, text: dict[str, torch.Tensor],
                     generator: torch.Generator | None) -> torch.Tensor:
        clip_l_rate, clip_g_rate, t5_rate = self.dropout_rates
        drops = dropout_masks(latents.shape[0], clip_l_rate=clip_l_rate, clip_g_rate=clip_g_rate, t5_rate=t5_rate,
                              generator=generator)
        context, pooled = sd3_conditioning(text, clip_l_drop=drops[0], clip_g_drop=drops[1], t5_drop=drops[2],
                                           context_dim=models.denoiser.config.context_in_dim)
        context, pooled = context.to(latents.dtype), pooled.to(latents.dtype)
        crop_range = models.denoiser.pos_embed_crop_range(latents.shape[-2], latents.shape[-1])
        offset = draw_pos_embed_offset(self.pos_emb_random_crop_rate, crop_range, generator, latents.device)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return models.denoiser(noisy, timesteps, context, pooled, pos_embed_offset=offset)

        return flow_matching_loss(denoise, latents, config=self.loss_config, loss_weights=batch["loss_weights"],
                                  alpha_masks=batch["alpha_masks"], generator=generator)

    def sample_images(self, models: Models, sample: SampleConfig, *, step: int, epoch: int | None, device: torch.device) -> list[Path]:
        def render(prompt: SamplePrompt, generator: torch.Generator, sampler: str) -> torch.Tensor:
            context, pooled = sd3_conditioning(self.encode_prompts(models, [prompt.prompt, prompt.negative_prompt], device),
                                               context_dim=models.denoiser.config.context_in_dim)
            (cond_c, uncond_c), (cond_p, uncond_p) = context.chunk(2), pooled.chunk(2)
            guided = cfg(lambda x, t, c: models.denoiser(x, t, c[0], c[1]), (cond_c, cond_p), (uncond_c, uncond_p), prompt.cfg_scale)
            return flow_latents(prompt, generator, guided=guided, channels=16, shift=SAMPLING_SHIFT)

        return generate_samples(sample, step=step, epoch=epoch, device=device, render=render,
                                decode=lambda z: models.vae.decode((z / VAE_SCALE + VAE_SHIFT).to(models.vae.dtype)))

    def model_facts(self, args: argparse.Namespace, models: Models) -> BaseModelFacts:
        return base_model_facts("sd3", models.extra["variant"])

    def model_metadata(self, args: argparse.Namespace, models: Models) -> dict[str, str]:
        """sd-scripts' SD3 keys; its SD3 network takes a rate per text encoder, so ss_text_encoder_lr is the whole
        --text_encoder_lr list. ss_training_shift and ss_t5xxl_max_token_length are ours (they change what trains)."""
        return lora_training_metadata(
            apply_lg_attn_mask=args.apply_lg_attn_mask, apply_t5_attn_mask=args.apply_t5_attn_mask,
            weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
            mode_scale=args.mode_scale, text_encoder_lr=args.text_encoder_lr, training_shift=args.training_shift,
            t5xxl_max_token_length=args.t5xxl_max_token_length)


def bucket_latent_sizes(resolutions: Iterable[tuple[int, int]]) -> list[int]:
    """Per bucket (width, height) in pixels, the side of the square latent of the same area (VAE stride 8),
    as sd-scripts computes the sizes it prepares scaled position embeddings for; sorted, without repeats."""
    return sorted({round(math.sqrt(width * height)) // 8 for width, height in resolutions})


def draw_pos_embed_offset(rate: float, crop_range: tuple[int, int], generator: torch.Generator | None,
                          device: torch.device) -> tuple[int, int] | None:
    """With probability ``rate`` a uniform (top, left) window offset in 0..crop_range, else None (centred).

    sd-scripts' --pos_emb_random_crop_rate, once per model call. Three uniforms are drawn whatever the
    outcome (and none at rate 0), so later draws from the step's generator do not depend on it.
    """
    if rate <= 0.0:
        return None
    device = generator.device if generator is not None else device
    take, top, left = torch.rand(3, generator=generator, device=device).tolist()
    if take >= rate:
        return None
    max_top, max_left = crop_range
    return min(int(top * (max_top + 1)), max_top), min(int(left * (max_left + 1)), max_left)


def setup_parser() -> argparse.ArgumentParser:
    return setup_parser_for(TRAINING_FLAGS, SD3_FLAGS, unsupported=SD3_UNSUPPORTED,
                            ignored_values=CLIP_SKIP_IGNORED, prog="sd3_train_network.py",
                            description="Train a LoRA for Stable Diffusion 3 / 3.5.")


def main(argv: list[str] | None = None) -> None:
    run_cli(Sd3NetworkTrainer, setup_parser(), argv)


if __name__ == "__main__":
    main()
