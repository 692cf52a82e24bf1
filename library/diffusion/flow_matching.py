"""Rectified-flow training math for SD3/SD3.5 and its one loss step (sd-scripts' sd3_train_network).

The forward process interpolates linearly between data and noise, x_sigma = sigma * noise +
(1 - sigma) * x_0, and the model predicts the velocity v = noise - x_0 (Esser et al. 2024,
"Scaling Rectified Flow Transformers", arXiv:2403.03206). sd-scripts trains against the clean
latents instead: the prediction x_0 = x_sigma - sigma * v is compared with x_0, which equals the
velocity loss scaled by sigma**2; the weighting schemes below partly or wholly undo that factor.

Order of a step, as in sd-scripts: the noise, then u from the timestep density, the training
shift on u, u mapped onto [min_timestep, max_timestep] and truncated to an integer timestep t,
sigma = t / 1000; the model; the element loss, times the scheme's weight, the mask, the mean
over C, H, W, the per-sample loss weights. No noise offset, multi-resolution noise, input
perturbation or SNR weight applies: sd-scripts' SD3 trainer uses none of them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from library.diffusion import losses

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
NUM_TRAIN_TIMESTEPS = 1000

# The SD3 paper's range for the "mode" density's scale: inside it u -> f(u) is a decreasing map of
# [0, 1] onto itself; outside it the sampled sigmas leave [0, 1].
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def _check_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(
            f"--weighting_scheme {weighting_scheme!r} is unknown; use one of {', '.join(WEIGHTING_SCHEMES)}"
        )


def sample_density(
    batch_size: int,
    *,
    weighting_scheme: str,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """u in [0, 1] per sample (B,), float32: where on the noise path each sample trains.

    logit_normal: u = sigmoid(N(logit_mean, logit_std)), most samples mid-path (SD3 paper §3.1).
    mode:         u = 1 - r - mode_scale * (cos(pi r / 2)**2 - 1 + r), r ~ U[0, 1).
    others:       u ~ U[0, 1); sigma_sqrt and cosmap weight the loss instead of the density.
    The draws are the same as diffusers' compute_density_for_timestep_sampling for one generator.
    """
    _check_scheme(weighting_scheme)
    if weighting_scheme == "logit_normal":
        normal = torch.normal(logit_mean, logit_std, size=(batch_size,), generator=generator, device=device)
        return torch.sigmoid(normal)
    u = torch.rand((batch_size,), generator=generator, device=device)
    if weighting_scheme == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """sigma <- s * sigma / (1 + (s - 1) * sigma): s > 1 moves samples toward noise (global
    structure), s < 1 toward the data (detail). Fixes 0 and 1; shifting by s then 1/s is the identity."""
    return sigmas * shift / (1.0 + (shift - 1.0) * sigmas)


def _timestep_range(min_timestep: int | None, max_timestep: int | None, num_train_timesteps: int) -> tuple[int, int]:
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= low <= high <= num_train_timesteps:
        raise ValueError(
            f"--min_timestep {low} / --max_timestep {high}: "
            f"need 0 <= min_timestep <= max_timestep <= {num_train_timesteps}"
        )
    return low, high


def sample_sigmas(
    batch_size: int,
    *,
    weighting_scheme: str,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    shift: float,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(sigmas (B,), timesteps (B,)) as sd-scripts draws them: the shift acts on u before u is
    mapped onto [min_timestep, max_timestep] and truncated, so every sigma is a multiple of
    1/num_train_timesteps and the timesteps are whole numbers, held as float32.

    min == max trains one timestep (sd-scripts' validation relies on it); max may equal
    num_train_timesteps, which is sigma = 1, pure noise.
    """
    low, high = _timestep_range(min_timestep, max_timestep, num_train_timesteps)
    u = sample_density(
        batch_size,
        weighting_scheme=weighting_scheme,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
        device=device,
    )
    u = shift_sigmas(u, shift)
    timesteps = (u * (high - low) + low).long().float()
    return timesteps / num_train_timesteps, timesteps


def loss_weighting(weighting_scheme: str, sigmas: Tensor) -> Tensor:
    """The loss weight per sigma: sigma_sqrt -> sigma**-2 (turns the x_0 loss back into the
    velocity loss; infinite at sigma = 0), cosmap -> 2 / (pi * (1 - 2 sigma + 2 sigma**2)), the
    rest -> 1 (their shaping is in the density)."""
    _check_scheme(weighting_scheme)
    if weighting_scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return torch.ones_like(sigmas)


def _per_sample(sigmas: Tensor, like: Tensor) -> Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device)


def noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """sigma * noise + (1 - sigma) * latents, one sigma per sample."""
    sigma = _per_sample(sigmas, latents)
    return sigma * noise + (1.0 - sigma) * latents


def precondition(model_output: Tensor, noisy: Tensor, sigmas: Tensor) -> Tensor:
    """The clean latents the velocity `model_output` implies: noisy - sigma * v (EDM-style
    preconditioning, Karras et al. 2022 §5, as sd-scripts applies it)."""
    return model_output * -_per_sample(sigmas, model_output) + noisy


@dataclass(frozen=True)
class FlowMatchingLossConfig:
    """The SD3 loss flags of sd-scripts, with its defaults."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: int | None = None
    max_timestep: int | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    masked_loss: bool = False

    def __post_init__(self) -> None:
        _check_scheme(self.weighting_scheme)
        if self.weighting_scheme == "logit_normal" and self.logit_std < 0:
            raise ValueError(f"--logit_std must be >= 0, got {self.logit_std}")
        low, high = MODE_SCALE_RANGE
        if self.weighting_scheme == "mode" and not low <= self.mode_scale <= high:
            raise ValueError(
                f"--mode_scale {self.mode_scale} is outside [{low:g}, {high:.4f}], where the 'mode' density "
                "would give sigmas outside [0, 1]; the SD3 paper uses 1.29"
            )
        if not self.training_shift > 0:
            raise ValueError(f"--training_shift must be > 0 (1 = no shift), got {self.training_shift}")
        _timestep_range(self.min_timestep, self.max_timestep, NUM_TRAIN_TIMESTEPS)
        self._check_loss_type()

    def _check_loss_type(self) -> None:
        losses.check_loss_options(self.loss_type, self.huber_schedule, self.huber_c)
        if self.loss_type not in ("huber", "smooth_l1"):
            return
        if self.huber_schedule == "snr":
            raise ValueError(
                "--huber_schedule snr needs a DDPM noise schedule, which SD3 flow matching does not have; "
                "use --huber_schedule constant or exponential"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FlowMatchingLossConfig:
        """The config from parsed sd-scripts flags (the Namespace is only read)."""
        return cls(
            weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
            training_shift=args.training_shift,
            min_timestep=args.min_timestep,
            max_timestep=args.max_timestep,
            loss_type=args.loss_type,
            huber_schedule=args.huber_schedule,
            huber_c=args.huber_c,
            huber_scale=args.huber_scale,
            masked_loss=bool(args.masked_loss),
        )


class NoisyFlowInput(NamedTuple):
    noise: Tensor
    noisy_latents: Tensor
    sigmas: Tensor  # (B,)
    timesteps: Tensor  # (B,) sigma * 1000, what the MMDiT takes


def sample_noisy_input(
    latents: Tensor, *, config: FlowMatchingLossConfig, generator: torch.Generator | None = None
) -> NoisyFlowInput:
    """Draw the noise, then the sigmas, from `generator` on the latents' device (sd-scripts'
    get_noisy_model_input_and_timesteps, with the draws in its order)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    sigmas, timesteps = sample_sigmas(
        latents.shape[0],
        weighting_scheme=config.weighting_scheme,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        shift=config.training_shift,
        min_timestep=config.min_timestep,
        max_timestep=config.max_timestep,
        generator=generator,
        device=latents.device,
    )
    return NoisyFlowInput(noise, noisy_latents(latents, noise, sigmas), sigmas, timesteps)


def _finite_weights(config: FlowMatchingLossConfig, sigmas: Tensor) -> Tensor:
    # At sigma = 0 the prediction is the latents whatever the model says, so the loss is exactly 0
    # and has no gradient; sigma_sqrt's infinite weight would turn that 0 into NaN (sd-scripts
    # does, about once per 1000 uniform draws). Any finite weight is exact there; 0 is the simplest.
    weights = loss_weighting(config.weighting_scheme, sigmas).float()
    return torch.where(sigmas > 0, weights, torch.zeros_like(weights))


def flow_matching_loss(
    denoise: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    *,
    config: FlowMatchingLossConfig,
    loss_weights: Tensor,
    alpha_masks: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The per-sample training loss (B,) of one batch; the trainer takes `.mean()` and backpropagates.

    denoise(noisy_latents, timesteps) -> the model's velocity v; the family's hook closes over the
        text conditioning. Timesteps are float sigma * 1000.
    loss_weights: (B,) per-sample weights (--prior_loss_weight for regularisation images).
    alpha_masks: (B, H, W) masks in [0, 1] at image resolution, or None.
    """
    if config.masked_loss and alpha_masks is None:
        raise ValueError(
            "--masked_loss needs masks: set alpha_mask = true or conditioning_data_dir in the dataset config"
        )
    _noise, noisy, sigmas, timesteps = sample_noisy_input(latents, config=config, generator=generator)
    model_output = denoise(noisy, timesteps)
    if model_output.shape != latents.shape:
        raise ValueError(
            f"the model returned shape {tuple(model_output.shape)} for latents of shape {tuple(latents.shape)}"
        )
    pred = precondition(model_output, noisy, sigmas)
    threshold = losses.huber_c(
        timesteps,
        schedule=config.huber_schedule,
        huber_c=config.huber_c,
        huber_scale=config.huber_scale,
        loss_type=config.loss_type,
        # Only the snr schedule reads alphas_cumprod, and the config rejects it for flow matching.
        alphas_cumprod=torch.empty(0),
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    )
    loss = losses.elementwise_loss(pred.float(), latents.float(), loss_type=config.loss_type, huber_c=threshold)
    loss = loss * _per_sample(_finite_weights(config, sigmas), loss)
    if alpha_masks is not None:
        loss = losses.masked_mean(loss, alpha_masks)
    else:
        loss = loss.mean(dim=list(range(1, loss.ndim)))
    return loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
