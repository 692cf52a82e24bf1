"""Preview images during training for DDPM-trained families: prompts → latents → PNG files under output_dir/sample/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.samplers import ddpm_denoiser, sample, sampling_sigmas
from library.run_config import SampleConfig
from library.sample_prompts import SamplePrompt, load_sample_prompts


def sample_file_name(output_name: str, *, step: int, epoch: int | None, index: int, seed: int | None) -> str:
    """sd-scripts' naming: <name>_<e000001 | 000100>_<index>_<timestamp>[_<seed>].png"""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed_part = f"_{seed}" if seed is not None else ""
    return f"{output_name}_{when}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}{seed_part}.png"


def latents_to_image(decoded: torch.Tensor) -> Image.Image:
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def generate_ddpm_samples(
    config: SampleConfig, *, step: int, epoch: int | None, device: torch.device, v_parameterization: bool,
    schedule: DdpmSchedule, latent_channels: int, vae_scale: float,
    encode_prompt: Callable[[list[str]], torch.Tensor],
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
) -> list[Path]:
    """Render every prompt of config.prompts_file with classifier-free guidance; returns the PNG paths."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, prompt in enumerate(load_sample_prompts(config.prompts_file)):
        image = _render(prompt, config, device, v_parameterization, schedule, latent_channels, vae_scale, encode_prompt, denoise, decode)
        path = config.output_dir / sample_file_name(config.output_name, step=step, epoch=epoch, index=index, seed=prompt.seed)
        image.save(path)
        paths.append(path)
    return paths


def _render(prompt: SamplePrompt, config: SampleConfig, device, v_parameterization, schedule, latent_channels, vae_scale,
            encode_prompt, denoise, decode) -> Image.Image:
    seed = prompt.seed if prompt.seed is not None else (config.seed or 0) + 1
    generator = torch.Generator(device=device).manual_seed(seed)
    cond, uncond = encode_prompt([prompt.prompt, prompt.negative_prompt]).chunk(2)
    # Sizes snap down to multiples of 64 like sd-scripts, so every U-Net level divides evenly.
    height, width = max(64, prompt.height // 64 * 64), max(64, prompt.width // 64 * 64)
    shape = (1, latent_channels, height // 8, width // 8)
    alphas = schedule.alphas_cumprod.float().cpu()

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_cond = denoise(x, t, cond)
        if prompt.cfg_scale == 1.0:
            return out_cond
        out_uncond = denoise(x, t, uncond)
        return out_uncond + prompt.cfg_scale * (out_cond - out_uncond)

    sigmas = sampling_sigmas(alphas, prompt.steps).to(device)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    latents = sample(prompt.sampler or config.sampler, ddpm_denoiser(guided, alphas.to(device), v_parameterization),
                     noise * sigmas[0], sigmas, generator)
    decoded = decode(latents / vae_scale)
    return latents_to_image(decoded[0])
