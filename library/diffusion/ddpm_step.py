"""The DDPM loss of one batch, shared by the SD1.x/2.x and SDXL trainers.

The order of operations is sd-scripts' (train_network.process_batch): noise (offset, then
multi-resolution), timesteps, input perturbation, forward diffusion; the model; the target
(noise or velocity); the element loss, the mask, the mean over C, H, W, the per-sample loss
weights, then the SNR-based weights.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from library.diffusion import losses, noise as noise_ops
from library.diffusion.ddpm import DdpmSchedule, sample_timesteps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DdpmLossConfig:
    """The DDPM loss flags of sd-scripts, with its defaults. Falsy values (0, None) disable a
    feature exactly where sd-scripts tests the flag for truth."""

    v_parameterization: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False

    def __post_init__(self) -> None:
        losses.check_loss_options(self.loss_type, self.huber_schedule, self.huber_c)
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise ValueError("--adaptive_noise_scale needs --noise_offset; set --noise_offset (e.g. 0.05) or drop it")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise ValueError("--scale_v_pred_loss_like_noise_pred only applies with --v_parameterization; add it or drop the flag")
        if self.v_pred_like_loss and self.v_parameterization:
            raise ValueError("--v_pred_like_loss cannot be used with --v_parameterization; drop one of them")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise ValueError(f"--multires_noise_iterations must be >= 0, got {self.multires_noise_iterations}")
        low, high = self.min_timestep, self.max_timestep
        if (low is not None and low < 0) or (low is not None and high is not None and low > high):
            raise ValueError(f"--min_timestep {low} / --max_timestep {high}: need 0 <= min_timestep <= max_timestep")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DdpmLossConfig":
        """The config from parsed sd-scripts flags (the Namespace is only read)."""
        config = cls(
            v_parameterization=bool(args.v_parameterization),
            min_timestep=args.min_timestep,
            max_timestep=args.max_timestep,
            noise_offset=args.noise_offset,
            noise_offset_random_strength=bool(args.noise_offset_random_strength),
            adaptive_noise_scale=args.adaptive_noise_scale,
            multires_noise_iterations=args.multires_noise_iterations,
            multires_noise_discount=args.multires_noise_discount,
            ip_noise_gamma=args.ip_noise_gamma,
            ip_noise_gamma_random_strength=bool(args.ip_noise_gamma_random_strength),
            zero_terminal_snr=bool(args.zero_terminal_snr),
            loss_type=args.loss_type,
            huber_schedule=args.huber_schedule,
            huber_c=args.huber_c,
            huber_scale=args.huber_scale,
            min_snr_gamma=args.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred=bool(args.scale_v_pred_loss_like_noise_pred),
            v_pred_like_loss=args.v_pred_like_loss,
            debiased_estimation_loss=bool(args.debiased_estimation_loss),
            masked_loss=bool(args.masked_loss),
        )
        if config.zero_terminal_snr and not config.v_parameterization:
            logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot learn the last timestep")
        return config


class NoisyLatents(NamedTuple):
    noise: Tensor  # the loss target's noise (before input perturbation)
    noisy_latents: Tensor
    timesteps: Tensor


def sample_noisy_latents(
    latents: Tensor, *, config: DdpmLossConfig, schedule: DdpmSchedule, generator: torch.Generator | None = None
) -> NoisyLatents:
    """Draw the noise and timesteps and run the forward diffusion (sd-scripts'
    get_noise_noisy_latents_and_timesteps), every draw from `generator` on the latents' device."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if config.noise_offset:
        noise = noise_ops.offset_noise(
            noise,
            latents,
            config.noise_offset,
            config.noise_offset_random_strength,
            generator,
            adaptive_scale=config.adaptive_noise_scale,
        )
    if config.multires_noise_iterations:
        noise = noise_ops.pyramid_noise(noise, config.multires_noise_iterations, config.multires_noise_discount, generator)
    timesteps = sample_timesteps(
        latents.shape[0],
        min_timestep=config.min_timestep,
        max_timestep=config.max_timestep,
        num_train_timesteps=schedule.num_train_timesteps,
        generator=generator,
        device=latents.device,
    )
    diffusion_noise = noise
    if config.ip_noise_gamma:
        diffusion_noise = noise_ops.input_perturbation(
            noise, config.ip_noise_gamma, config.ip_noise_gamma_random_strength, generator
        )
    return NoisyLatents(noise, schedule.add_noise(latents, diffusion_noise, timesteps), timesteps)


def snr_weighted_loss(loss: Tensor, timesteps: Tensor, *, config: DdpmLossConfig, schedule: DdpmSchedule) -> Tensor:
    """Apply the SNR-based weights to a per-sample loss (B,), in sd-scripts' order (post_process_loss)."""
    snr = schedule.weighting_snr_table()
    if config.min_snr_gamma:
        loss = loss * losses.min_snr_weight(timesteps, snr, config.min_snr_gamma, config.v_parameterization).to(loss.device)
    if config.scale_v_pred_loss_like_noise_pred:
        loss = loss * losses.v_pred_like_noise_scale(timesteps, snr).to(loss.device)
    if config.v_pred_like_loss:
        loss = loss + losses.v_pred_like_loss_term(loss, timesteps, snr, config.v_pred_like_loss)
    if config.debiased_estimation_loss:
        loss = loss * losses.debiased_estimation_weight(timesteps, snr, config.v_parameterization).to(loss.device)
    return loss


def _check_schedule(config: DdpmLossConfig, schedule: DdpmSchedule) -> None:
    terminal_is_zero = float(schedule.alphas_cumprod[-1]) == 0.0
    if config.zero_terminal_snr != terminal_is_zero:
        raise ValueError(
            f"--zero_terminal_snr is {config.zero_terminal_snr} but the schedule's last alphas_cumprod is "
            f"{float(schedule.alphas_cumprod[-1]):.3g}; build it with DdpmSchedule.scaled_linear(zero_terminal_snr=...)"
        )


def ddpm_loss(
    denoise: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    *,
    config: DdpmLossConfig,
    schedule: DdpmSchedule,
    loss_weights: Tensor,
    alpha_masks: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The per-sample training loss (B,) of one batch; the trainer takes `.mean()` and backpropagates.

    denoise(noisy_latents, timesteps) -> the model's output (epsilon, or v with --v_parameterization);
        the family's hook closes over the text conditioning.
    loss_weights: (B,) per-sample weights (--prior_loss_weight for regularisation images).
    alpha_masks: (B, H, W) masks in [0, 1] at image resolution (alpha channel, or a conditioning
        image through losses.mask_from_conditioning_image), or None.
    """
    _check_schedule(config, schedule)
    if config.masked_loss and alpha_masks is None:
        raise ValueError("--masked_loss needs masks: set alpha_mask = true or conditioning_data_dir in the dataset config")
    noise, noisy_latents, timesteps = sample_noisy_latents(latents, config=config, schedule=schedule, generator=generator)
    pred = denoise(noisy_latents, timesteps)
    target = schedule.velocity(latents, noise, timesteps) if config.v_parameterization else noise
    if pred.shape != target.shape:
        raise ValueError(f"the model returned shape {tuple(pred.shape)} for latents of shape {tuple(target.shape)}")
    threshold = losses.huber_c(
        timesteps,
        schedule=config.huber_schedule,
        huber_c=config.huber_c,
        huber_scale=config.huber_scale,
        loss_type=config.loss_type,
        alphas_cumprod=schedule.alphas_cumprod,
        num_train_timesteps=schedule.num_train_timesteps,
    )
    loss = losses.elementwise_loss(pred.float(), target.float(), loss_type=config.loss_type, huber_c=threshold)
    if alpha_masks is not None:
        loss = losses.masked_mean(loss, alpha_masks)
    else:
        loss = loss.mean(dim=list(range(1, loss.ndim)))
    loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    return snr_weighted_loss(loss, timesteps, config=config, schedule=schedule)
