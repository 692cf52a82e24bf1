"""Preview images during training: prompts → latents → PNG files under output_dir/sample/.

`generate_samples` handles files and seeds; a family supplies how one prompt becomes latents
(`ddpm_latents` for SD1/2 and SDXL, `flow_latents` for SD3) and how latents become pixels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.flow_sampling import flow_euler_sample, flow_sampling_sigmas
from library.diffusion.samplers import ddpm_denoiser, sample, sampling_sigmas
from library.run_config import SampleConfig
from library.sample_prompts import SamplePrompt, load_sample_prompts

Guided = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep) → CFG-combined model output
MakeGuided = Callable[[SamplePrompt], Guided]


def sample_file_name(output_name: str, *, step: int, epoch: int | None, index: int, seed: int | None) -> str:
    """sd-scripts' naming: <name>_<e000001 | 000100>_<index>_<timestamp>[_<seed>].png"""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed_part = f"_{seed}" if seed is not None else ""
    return f"{output_name}_{when}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}{seed_part}.png"


def to_image(decoded: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → an RGB image."""
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def latent_shape(prompt: SamplePrompt, channels: int) -> tuple[int, int, int, int]:
    # Sizes snap down to multiples of 64 like sd-scripts, so every level of the model divides evenly.
    height, width = max(64, prompt.height // 64 * 64), max(64, prompt.width // 64 * 64)
    return (1, channels, height // 8, width // 8)


def cfg(denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor], cond: object, uncond: object, scale: float) -> Guided:
    """Classifier-free guidance: uncond + scale·(cond − uncond); one model call when scale is 1."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_cond = denoise(x, t, cond)
        if scale == 1.0:
            return out_cond
        out_uncond = denoise(x, t, uncond)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def generate_samples(config: SampleConfig, *, step: int, epoch: int | None, device: torch.device,
                     render: Callable[[SamplePrompt, torch.Generator, str], torch.Tensor],
                     decode: Callable[[torch.Tensor], torch.Tensor]) -> list[Path]:
    """Render every prompt of config.prompts_file; `render(prompt, generator, sampler)` returns latents."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, prompt in enumerate(load_sample_prompts(config.prompts_file)):
        seed = prompt.seed if prompt.seed is not None else (config.seed or 0) + 1
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = render(prompt, generator, prompt.sampler or config.sampler)
        path = config.output_dir / sample_file_name(config.output_name, step=step, epoch=epoch, index=index, seed=prompt.seed)
        with torch.autocast(device.type, enabled=False):  # the VAE keeps its own dtype (fp32 with --no_half_vae)
            decoded = decode(latents)
        to_image(decoded[0]).save(path)
        paths.append(path)
    return paths


def ddpm_latents(prompt: SamplePrompt, generator: torch.Generator, sampler: str, *, guided: Guided, schedule: DdpmSchedule,
                 v_parameterization: bool, channels: int) -> torch.Tensor:
    """Sample a DDPM-trained model (ε or v) with any sd-scripts sampler name."""
    alphas = schedule.sampling_alphas_cumprod.float().cpu()
    device = generator.device
    sigmas = sampling_sigmas(alphas, prompt.steps).to(device)
    noise = torch.randn(latent_shape(prompt, channels), generator=generator, device=device, dtype=torch.float32)
    return sample(sampler, ddpm_denoiser(guided, alphas.to(device), v_parameterization), noise * sigmas[0], sigmas, generator)


def flow_latents(prompt: SamplePrompt, generator: torch.Generator, *, guided: Guided, channels: int, shift: float) -> torch.Tensor:
    """Sample a flow-matching model (velocity output) with Euler steps from σ = 1 to 0."""
    device = generator.device
    noise = torch.randn(latent_shape(prompt, channels), generator=generator, device=device, dtype=torch.float32)
    return flow_euler_sample(guided, noise, flow_sampling_sigmas(prompt.steps, shift).to(device))
