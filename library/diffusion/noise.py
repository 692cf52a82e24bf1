"""Ways of shaping the Gaussian noise a DDPM training step starts from (sd-scripts' noise flags).

Each function returns a new tensor and draws its randomness from `generator` (None: torch's global
RNG) on the device of its input, so a seeded generator reproduces a step exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _random_fraction(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """One U(0, 1) draw shared by the whole batch (sd-scripts' `*_random_strength` flags)."""
    return torch.rand(1, generator=generator, device=like.device, dtype=like.dtype)


def offset_noise(
    noise: Tensor,
    latents: Tensor,
    offset: float,
    random_strength: bool,
    generator: torch.Generator | None = None,
    *,
    adaptive_scale: float | None = None,
) -> Tensor:
    """--noise_offset: add one random constant per sample and channel to the noise.

    A zero-mean noise can never change an image's mean brightness, so models trained on it cannot
    render very dark or bright images; a per-channel offset lets them
    (https://www.crosslabs.org/blog/diffusion-with-offset-noise).

    random_strength: scale the offset by one U(0, 1) draw (--noise_offset_random_strength).
    adaptive_scale: --adaptive_noise_scale; adds adaptive_scale * |spatial mean of the latent channel|
        to the offset, clamped at 0, so latents far from zero mean get a larger offset.
    """
    if noise.ndim != 4:
        raise ValueError(f"offset_noise expects (B, C, H, W) noise, got shape {tuple(noise.shape)}")
    strength: Tensor | float = offset
    if random_strength:
        strength = _random_fraction(noise, generator) * offset
    if adaptive_scale is not None:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * latent_mean, min=0.0)
    shift = torch.randn((*noise.shape[:2], 1, 1), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * shift


def pyramid_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator | None = None) -> Tensor:
    """--multires_noise_iterations: add noise drawn at ever coarser resolutions, upsampled.

    Level i is drawn at size / r**i with r ~ U(2, 4) per level and weighted by discount**i; coarse
    levels destroy low frequencies that plain white noise leaves intact. The sum is rescaled to unit
    standard deviation over the whole batch.
    (https://wandb.ai/johnowhitaker/multires_noise/reports/Multi-Resolution-Noise-for-Diffusion-Model-Training--VmlldzozNjYyOTU2)
    """
    if noise.ndim != 4:
        raise ValueError(f"pyramid_noise expects (B, C, H, W) noise, got shape {tuple(noise.shape)}")
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for level in range(iterations):
        ratio = 2.0 + 2.0 * _random_fraction(noise, generator).item()
        level_h = max(1, int(height / ratio**level))
        level_w = max(1, int(width / ratio**level))
        coarse = torch.randn(
            (batch, channels, level_h, level_w), generator=generator, device=noise.device, dtype=noise.dtype
        )
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if level_h == 1 or level_w == 1:
            break
    return result / result.std()


def input_perturbation(
    noise: Tensor, gamma: float, random_strength: bool, generator: torch.Generator | None = None
) -> Tensor:
    """--ip_noise_gamma: the noise used to build the noisy latents, noise + gamma * N(0, 1).

    The loss target keeps the unperturbed noise; the mismatch regularises against the exposure bias
    between training and sampling (Ning et al. 2023, arXiv:2301.11706).
    random_strength: scale gamma by one U(0, 1) draw (--ip_noise_gamma_random_strength).
    """
    strength: Tensor | float = gamma
    if random_strength:
        strength = _random_fraction(noise, generator) * gamma
    perturbation = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * perturbation
