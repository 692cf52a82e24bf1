"""The DDPM forward process that SD1.x/2.x and SDXL are trained with.

Everything is computed in float32 in the same order as diffusers' `DDPMScheduler`, because that is
the table sd-scripts trains against; matching it bit for bit keeps our losses comparable to theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rescale_betas_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale `betas` so the last timestep carries no signal at all (Lin et al. 2023, Alg. 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is kept;
    without this the model never sees pure noise in training but starts from pure noise at inference.
    """
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = sqrt_alphas_cumprod[0].clone()
    last = sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _snr_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _per_sample(values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """values[timesteps] in `like`'s dtype and device, shaped (B, 1, 1, ...) to broadcast over it."""
    picked = values.to(device=like.device)[timesteps.to(like.device)].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class DdpmSchedule:
    """A discrete DDPM noise schedule, described by its cumulative alpha products.

    alphas_cumprod: (T,) the signal fraction alpha_bar_t for t = 0 .. T-1.
    weighting_alphas_cumprod: (T,) the table the SNR-based loss weights read, or None for the same
        table. sd-scripts computes those weights before it applies --zero_terminal_snr, so a
        rescaled schedule keeps the original table here; that also keeps 1/SNR finite at t = T-1.
    """

    alphas_cumprod: Tensor
    weighting_alphas_cumprod: Tensor | None = None

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
    ) -> "DdpmSchedule":
        """The Stable Diffusion schedule: betas linear in sqrt-space from beta_start to beta_end."""
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        original = torch.cumprod(1.0 - betas, dim=0)
        if not zero_terminal_snr:
            return cls(alphas_cumprod=original)
        rescaled = torch.cumprod(1.0 - rescale_betas_zero_terminal_snr(betas), dim=0)
        return cls(alphas_cumprod=rescaled, weighting_alphas_cumprod=original)

    def to(self, device: torch.device | str) -> "DdpmSchedule":
        """The same schedule with its tables on `device` (indexing them there avoids a copy every step)."""
        weighting = None if self.weighting_alphas_cumprod is None else self.weighting_alphas_cumprod.to(device)
        return DdpmSchedule(self.alphas_cumprod.to(device), weighting)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise."""
        alpha_bar = _per_sample(self.alphas_cumprod, timesteps, latents)
        return alpha_bar**0.5 * latents + (1.0 - alpha_bar) ** 0.5 * noise

    def velocity(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0."""
        alpha_bar = _per_sample(self.alphas_cumprod, timesteps, latents)
        return alpha_bar**0.5 * noise - (1.0 - alpha_bar) ** 0.5 * latents

    def snr(self, timesteps: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of this schedule at `timesteps`."""
        table = _snr_from_alphas_cumprod(self.alphas_cumprod)
        return table.to(timesteps.device)[timesteps]

    @property
    def sampling_alphas_cumprod(self) -> Tensor:
        """(T,) the table preview images are sampled with: the one before any zero-terminal rescale.

        A rescaled table ends in alpha_bar = 0, i.e. sigma = inf at the first sampling step, which turns every
        preview black; sd-scripts samples --zero_terminal_snr runs with the ordinary schedule, and so do we.
        """
        return self.alphas_cumprod if self.weighting_alphas_cumprod is None else self.weighting_alphas_cumprod

    def weighting_snr_table(self) -> Tensor:
        """(T,) SNR per timestep as the loss weights see it (see `weighting_alphas_cumprod`)."""
        table = self.alphas_cumprod if self.weighting_alphas_cumprod is None else self.weighting_alphas_cumprod
        return _snr_from_alphas_cumprod(table)


def sample_timesteps(
    batch_size: int,
    *,
    min_timestep: int | None,
    max_timestep: int | None,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One timestep per sample, uniform over [min_timestep, max_timestep) (defaults 0 and T).

    min == max trains a single timestep, as sd-scripts does (its validation pass relies on it).
    """
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= low <= high <= num_train_timesteps:
        raise ValueError(
            f"--min_timestep {low} / --max_timestep {high}: need 0 <= min_timestep <= max_timestep <= {num_train_timesteps}"
        )
    if low == high:
        if high >= num_train_timesteps:
            raise ValueError(f"--min_timestep = --max_timestep = {high} is not a timestep; use at most {num_train_timesteps - 1}")
        return torch.full((batch_size,), high, dtype=torch.long, device=device)
    return torch.randint(low, high, (batch_size,), generator=generator, device=device, dtype=torch.long)
