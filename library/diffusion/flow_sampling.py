"""Euler sampling of a rectified-flow model: x_σ = σ·noise + (1 − σ)·x0 and the model predicts v = noise − x0,
so dx/dσ = v and an Euler step is x ← x + (σ_next − σ)·v (Esser et al. 2024, SD3)."""

from __future__ import annotations

from typing import Callable

import torch


def flow_sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """`steps + 1` sigmas from 1 to 0, shifted as at training time: σ ← sσ / (1 + (s − 1)σ)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                      sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate from pure noise at sigmas[0] = 1 down to sigmas[-1] = 0; velocity(x, timestep = σ·1000)."""
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        timestep = (sigma * 1000).expand(x.shape[0])
        x = x + (sigma_next - sigma) * velocity(x, timestep).to(x.dtype)
    return x
