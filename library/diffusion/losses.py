"""Per-element losses and per-timestep loss weights for DDPM training (sd-scripts' loss flags).

Weight functions take the schedule's whole SNR table (T,) and the batch's timesteps (B,) and
return one weight per sample (B,), so they compose with a loss already reduced to (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# SNR at t = 0 is about 1175 for Stable Diffusion's schedule; sd-scripts caps it where a weight
# divides by it, which keeps the first timesteps from dominating.
_SNR_CAP = 1000.0


def _snr_at(snr: Tensor, timesteps: Tensor) -> Tensor:
    return snr.to(timesteps.device)[timesteps].float()


def huber_c(
    timesteps: Tensor,
    *,
    schedule: str,
    huber_c: float,
    huber_scale: float,
    loss_type: str,
    alphas_cumprod: Tensor,
    num_train_timesteps: int,
) -> Tensor | None:
    """The Huber threshold c per sample (B,), or None when `loss_type` uses none (l1, l2).

    constant:    c * huber_scale
    exponential: huber_scale * exp(t/T * ln c), i.e. huber_scale at t = 0 falling to c * huber_scale at t = T
    snr:         (1 - c) / (1 + sigma_t)**2 + c with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t):
                 about 1 (an L2-like loss) on clean inputs, c (L1-like, robust) on noisy ones.
                 sd-scripts leaves huber_scale out of this schedule, and so do we.
    """
    if loss_type not in ("huber", "smooth_l1"):
        return None
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        if huber_c <= 0:
            raise ValueError(f"--huber_c must be > 0 with --huber_schedule exponential, got {huber_c}")
        decay = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-decay * timesteps.float()) * huber_scale
    if schedule == "snr":
        alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"--huber_schedule {schedule!r} is unknown; use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: Tensor, target: Tensor, *, loss_type: str, huber_c: Tensor | None) -> Tensor:
    """Unreduced loss between `pred` and `target`; `huber_c` holds one threshold per sample (B,).

    huber:     2c * (sqrt(d**2 + c**2) - c), a pseudo-Huber loss: d**2 for |d| << c, 2c|d| beyond.
    smooth_l1: 2 * (sqrt(d**2 + c**2) - c), the same divided by c: d**2 / c near 0, 2|d| beyond.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    diff = pred - target
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if huber_c is None:
        raise ValueError(f"--loss_type {loss_type} needs a Huber threshold; compute it with huber_c()")
    c = huber_c.to(diff.device).reshape(-1, *([1] * (diff.ndim - 1)))
    smooth = 2.0 * (torch.sqrt(diff**2 + c**2) - c)
    return c * smooth if loss_type == "huber" else smooth


def min_snr_weight(timesteps: Tensor, snr: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """--min_snr_gamma (Hang et al. 2023, arXiv:2303.09556): min(SNR_t, gamma) / SNR_t.

    For v-prediction the loss already carries a factor SNR_t + 1 relative to epsilon, hence
    min(SNR_t, gamma) / (SNR_t + 1) there.
    """
    snr_t = _snr_at(snr, timesteps)
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if v_prediction else clipped / snr_t


def v_pred_like_noise_scale(timesteps: Tensor, snr: Tensor) -> Tensor:
    """SNR_t / (SNR_t + 1) with SNR capped at 1000: a v-prediction loss times this equals the
    epsilon loss of the same error (--scale_v_pred_loss_like_noise_pred)."""
    snr_t = torch.clamp(_snr_at(snr, timesteps), max=_SNR_CAP)
    return snr_t / (snr_t + 1.0)


def debiased_estimation_weight(timesteps: Tensor, snr: Tensor, v_prediction: bool) -> Tensor:
    """--debiased_estimation_loss (arXiv:2310.08442): 1 / sqrt(SNR_t), or 1 / (SNR_t + 1) for
    v-prediction, with SNR capped at 1000."""
    snr_t = torch.clamp(_snr_at(snr, timesteps), max=_SNR_CAP)
    return 1.0 / (snr_t + 1.0) if v_prediction else 1.0 / snr_t.sqrt()


def v_pred_like_loss_term(loss: Tensor, timesteps: Tensor, snr: Tensor, weight: float) -> Tensor:
    """--v_pred_like_loss: the term weight * loss / v_pred_like_noise_scale that sd-scripts ADDS
    to an epsilon loss, approximating a v-prediction loss mixed in at `weight`."""
    return loss / v_pred_like_noise_scale(timesteps, snr).to(loss.device) * weight


def mask_from_conditioning_image(images: Tensor) -> Tensor:
    """A (B, H, W) mask in [0, 1] from conditioning images in [-1, 1]: their red channel, as sd-scripts reads it."""
    return images[:, 0] / 2.0 + 0.5


def masked_mean(loss: Tensor, mask: Tensor) -> Tensor:
    """Per-sample mean (B,) of `loss` (B, C, H, W) weighted by `mask` ((B, H', W') or (B, 1, H', W'), 0..1).

    The mask is area-resized to the loss's spatial size. Like sd-scripts, the mean is over all
    elements, not over the mask's weight: a half-masked image contributes half as much loss.
    """
    if loss.ndim != 4:
        raise ValueError(f"masked_mean expects a (B, C, H, W) loss, got shape {tuple(loss.shape)}")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[0] != loss.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a loss of shape {tuple(loss.shape)}")
    mask = F.interpolate(mask.to(device=loss.device, dtype=loss.dtype), size=loss.shape[2:], mode="area")
    return (loss * mask).mean(dim=(1, 2, 3))


def check_loss_options(loss_type: str, huber_schedule: str, huber_c: float) -> None:
    """One-line errors for --loss_type / --huber_schedule / --huber_c values no loss can use."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"--huber_schedule {huber_schedule!r} is unknown; use one of {', '.join(HUBER_SCHEDULES)}")
    if loss_type in ("huber", "smooth_l1") and huber_schedule == "exponential" and huber_c <= 0:
        raise ValueError(f"--huber_c must be > 0 with --huber_schedule exponential, got {huber_c}")
