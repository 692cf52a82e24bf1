"""Preview-image samplers for DDPM-trained models (SD1/2, SDXL), written in sigma space.

The discrete model ε(x_t, t) or v(x_t, t) becomes a denoiser D(x, σ) with σ = sqrt((1 − ᾱ)/ᾱ), x = x_t / sqrt(ᾱ)
(Karras et al. 2022, "Elucidating the design space", Table 1). Every sampler then integrates the probability-flow
ODE dx/dσ = (x − D(x, σ)) / σ; ancestral variants add fresh noise each step. DDIM with η = 0 is exactly Euler
in this parameterisation, and PNDM's pseudo linear multistep is served by the LMS sampler.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) → denoised x0

# sd-scripts' --sample_sampler names → our sampler.
SAMPLER_ALIASES = {
    "ddim": "euler", "euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
    "heun": "heun", "dpm_2": "dpm_2", "k_dpm_2": "dpm_2", "dpm_2_a": "dpm_2_a", "k_dpm_2_a": "dpm_2_a",
    "lms": "lms", "k_lms": "lms", "pndm": "lms", "dpmsolver": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "dpmsingle": "dpm_2",
}


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sampling_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas from the largest to the smallest training sigma (evenly spaced timesteps), then 0."""
    sigmas = model_sigmas(alphas_cumprod.double())
    t = np.linspace(len(sigmas) - 1, 0, steps)
    values = np.interp(t, np.arange(len(sigmas)), sigmas.numpy())
    return torch.cat([torch.from_numpy(values), torch.zeros(1, dtype=torch.float64)]).float()


def sigma_to_timestep(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for a sigma: interpolate log σ over the training timesteps."""
    log_sigmas = model_sigmas(alphas_cumprod.double()).log().to(sigma.device)
    log_sigma = sigma.double().log()
    index = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
    low, high = log_sigmas[index - 1], log_sigmas[index]
    weight = ((log_sigma.reshape(-1) - low) / (high - low)).clamp(0, 1)
    return (index - 1 + weight).float().reshape(sigma.shape)


def ddpm_denoiser(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor,
                  v_prediction: bool) -> Denoiser:
    """Wrap model(x_t, t) → ε or v into D(x, σ)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1).sqrt()
        timestep = sigma_to_timestep(sigma, alphas_cumprod).expand(x.shape[0])
        out = model((x * c_in).to(x.dtype), timestep).to(x.dtype)
        if v_prediction:
            return x / (sigma**2 + 1) - out * sigma * c_in
        return x - out * sigma

    return denoise


def sample(name: str, denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run sampler `name` (any sd-scripts --sample_sampler name) from noise x·σ_max down the given sigmas."""
    if name not in SAMPLER_ALIASES:
        raise ValueError(f"unknown sampler '{name}'; choose from {sorted(SAMPLER_ALIASES)}")
    return _SAMPLERS[SAMPLER_ALIASES[name]](denoise, x, sigmas.to(x.device), generator)


def _derivative(x, denoised, sigma):
    return (x - denoised) / sigma


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _ancestral_step(sigma_from, sigma_to):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up (η = 1)."""
    if sigma_to == 0:
        return sigma_to, sigma_to * 0
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt()
    return (sigma_to**2 - sigma_up**2).sqrt(), sigma_up


def _euler(denoise, x, sigmas, generator):
    for i in range(len(sigmas) - 1):
        d = _derivative(x, denoise(x, sigmas[i]), sigmas[i])
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _euler_a(denoise, x, sigmas, generator):
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + _derivative(x, denoised, sigmas[i]) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


def _heun(denoise, x, sigmas, generator):
    for i in range(len(sigmas) - 1):
        d = _derivative(x, denoise(x, sigmas[i]), sigmas[i])
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_next = x + d * dt
        d_next = _derivative(x_next, denoise(x_next, sigmas[i + 1]), sigmas[i + 1])
        x = x + (d + d_next) / 2 * dt
    return x


def _dpm_2_step(denoise, x, sigma, sigma_to):
    """DPM-Solver-2 (midpoint in log σ), Euler for the last step to 0."""
    d = _derivative(x, denoise(x, sigma), sigma)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = (sigma.log() + sigma_to.log()).div(2).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = _derivative(x_mid, denoise(x_mid, sigma_mid), sigma_mid)
    return x + d_mid * (sigma_to - sigma)


def _dpm_2(denoise, x, sigmas, generator):
    for i in range(len(sigmas) - 1):
        x = _dpm_2_step(denoise, x, sigmas[i], sigmas[i + 1])
    return x


def _dpm_2_a(denoise, x, sigmas, generator):
    for i in range(len(sigmas) - 1):
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        x = _dpm_2_step(denoise, x, sigmas[i], sigma_down)
        if sigmas[i + 1] > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


def _lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """∫ over [σ_i, σ_{i+1}] of the Lagrange basis polynomial j through the last `order` sigmas."""
    grid = np.linspace(sigmas[i], sigmas[i + 1], 201)
    basis = np.ones_like(grid)
    for k in range(order):
        if k != j:
            basis *= (grid - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float(np.trapezoid(basis, grid))


def _lms(denoise, x, sigmas, generator, max_order: int = 4):
    derivatives: list[torch.Tensor] = []
    sigmas_np = sigmas.double().cpu().numpy()
    for i in range(len(sigmas) - 1):
        derivatives.insert(0, _derivative(x, denoise(x, sigmas[i]), sigmas[i]))
        del derivatives[max_order:]
        order = min(i + 1, max_order)
        for j in range(order):
            x = x + _lms_coefficient(sigmas_np, order, i, j) * derivatives[j]
    return x


def _dpmpp_2m(denoise, x, sigmas, generator):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR time."""
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            break
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if previous is None:
            estimate = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * estimate
        previous = denoised
    return x


_SAMPLERS = {"euler": _euler, "euler_a": _euler_a, "heun": _heun, "dpm_2": _dpm_2, "dpm_2_a": _dpm_2_a, "lms": _lms,
             "dpmpp_2m": _dpmpp_2m}
