"""The DDPM schedule against diffusers' DDPMScheduler, timestep sampling, and the shared loss step."""

import argparse
import math

import pytest
import torch
from diffusers import DDPMScheduler

from library.diffusion.ddpm import DdpmSchedule, sample_timesteps
from library.diffusion.ddpm_step import DdpmLossConfig, ddpm_loss


def _diffusers_scheduler(zero_terminal_snr: bool = False) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


ORACLE = _diffusers_scheduler()
SCHEDULE = DdpmSchedule.scaled_linear()
ZERO_SNR_SCHEDULE = DdpmSchedule.scaled_linear(zero_terminal_snr=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- schedule -------------------------------------------------------------------------------


def test_alphas_cumprod_match_diffusers():
    torch.testing.assert_close(SCHEDULE.alphas_cumprod, ORACLE.alphas_cumprod, rtol=0, atol=1e-6)
    assert SCHEDULE.num_train_timesteps == 1000


def test_zero_terminal_snr_matches_diffusers_rescale():
    oracle = _diffusers_scheduler(zero_terminal_snr=True)
    torch.testing.assert_close(ZERO_SNR_SCHEDULE.alphas_cumprod, oracle.alphas_cumprod, rtol=0, atol=1e-6)
    assert ZERO_SNR_SCHEDULE.alphas_cumprod[-1].item() == 0.0
    assert ZERO_SNR_SCHEDULE.alphas_cumprod[0].item() == pytest.approx(SCHEDULE.alphas_cumprod[0].item(), rel=1e-6)
    # Loss weights keep the original SNR table, as sd-scripts computes it before the rescale.
    a = ORACLE.alphas_cumprod
    torch.testing.assert_close(ZERO_SNR_SCHEDULE.weighting_snr_table(), a / (1 - a))


def test_add_noise_and_velocity_match_diffusers():
    latents = torch.randn(4, 4, 8, 8, generator=_gen(0))
    noise = torch.randn(4, 4, 8, 8, generator=_gen(1))
    timesteps = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        SCHEDULE.add_noise(latents, noise, timesteps), ORACLE.add_noise(latents, noise, timesteps), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        SCHEDULE.velocity(latents, noise, timesteps), ORACLE.get_velocity(latents, noise, timesteps), rtol=0, atol=1e-6
    )


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    timesteps = torch.tensor([0, 1, 300, 999])
    a = ORACLE.alphas_cumprod[timesteps]
    torch.testing.assert_close(SCHEDULE.snr(timesteps), a / (1 - a))
    # float32 cancellation in 1 - alpha_bar_0 costs a few 1e-5 here, as in sd-scripts' own table
    assert SCHEDULE.snr(timesteps)[0].item() == pytest.approx((1 - 0.00085) / 0.00085, rel=1e-4)
    assert ZERO_SNR_SCHEDULE.snr(torch.tensor([999])).item() == 0.0


def test_schedule_rejects_bad_parameters():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DdpmSchedule.scaled_linear(num_train_timesteps=1)
    with pytest.raises(ValueError, match="beta_start"):
        DdpmSchedule.scaled_linear(beta_start=0.02, beta_end=0.01)


# --- timesteps ------------------------------------------------------------------------------


def test_sample_timesteps_bounds():
    t = sample_timesteps(20000, min_timestep=100, max_timestep=200, generator=_gen(0))
    assert t.dtype == torch.long
    assert t.min().item() == 100 and t.max().item() == 199  # [min, max): max itself is never drawn
    assert len(torch.unique(t)) == 100
    t = sample_timesteps(20000, min_timestep=None, max_timestep=None, generator=_gen(1))
    assert t.min().item() == 0 and t.max().item() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=10)


def test_sample_timesteps_single_timestep_and_reproducibility():
    torch.testing.assert_close(sample_timesteps(3, min_timestep=500, max_timestep=500), torch.full((3,), 500))
    first = sample_timesteps(8, min_timestep=None, max_timestep=None, generator=_gen(5))
    second = sample_timesteps(8, min_timestep=None, max_timestep=None, generator=_gen(5))
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("low,high", [(300, 200), (-1, 10), (0, 1001), (1000, 1000)])
def test_sample_timesteps_rejects_bad_range(low, high):
    with pytest.raises(ValueError, match="timestep"):
        sample_timesteps(2, min_timestep=low, max_timestep=high)


# --- the loss step --------------------------------------------------------------------------


def _recover_noise(latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Invert diffusers' forward process in float64: the noise that turned `latents` into `noisy`."""
    a = ORACLE.alphas_cumprod.double()[timesteps].reshape(-1, 1, 1, 1)
    return (noisy.double() - a.sqrt() * latents.double()) / (1 - a).sqrt()


def _oracle_denoiser(latents, predict_v: bool, seen: dict | None = None):
    def denoise(noisy, timesteps):
        if seen is not None:
            seen.update(noisy=noisy, timesteps=timesteps)
        noise = _recover_noise(latents, noisy, timesteps)
        if not predict_v:
            return noise.to(latents.dtype)
        a = ORACLE.alphas_cumprod.double()[timesteps].reshape(-1, 1, 1, 1)
        return (a.sqrt() * noise - (1 - a).sqrt() * latents.double()).to(latents.dtype)

    return denoise


def _loss(denoise, latents, config, *, seed=0, weights=None, masks=None, schedule=SCHEDULE):
    weights = torch.ones(latents.shape[0]) if weights is None else weights
    return ddpm_loss(
        denoise, latents, config=config, schedule=schedule, loss_weights=weights, alpha_masks=masks, generator=_gen(seed)
    )


LATENTS = torch.randn(3, 4, 8, 8, generator=_gen(42))


@pytest.mark.parametrize("v_pred", [False, True])
def test_predicting_the_target_gives_zero_loss(v_pred):
    config = DdpmLossConfig(v_parameterization=v_pred, min_timestep=50)
    loss = _loss(_oracle_denoiser(LATENTS, predict_v=v_pred), LATENTS, config)
    assert loss.shape == (3,)
    assert loss.abs().max().item() < 1e-10
    wrong = _loss(_oracle_denoiser(LATENTS, predict_v=not v_pred), LATENTS, config)
    assert wrong.min().item() > 1e-3


def test_noise_offset_and_multires_noise_shape_the_target():
    config = DdpmLossConfig(noise_offset=1.0, multires_noise_iterations=3, min_timestep=50)
    seen = {}
    latents = torch.randn(4, 4, 16, 16, generator=_gen(1))
    loss = _loss(_oracle_denoiser(latents, predict_v=False, seen=seen), latents, config)
    assert loss.abs().max().item() < 1e-10  # the target is the shaped noise itself
    noise = _recover_noise(latents, seen["noisy"], seen["timesteps"])
    assert noise.std().item() == pytest.approx(1.0, abs=1e-4)  # multires renormalises
    assert noise.mean(dim=(2, 3)).var().item() > 20 / (16 * 16)  # per-channel offsets survive


def test_input_perturbation_keeps_the_unperturbed_target():
    gamma = 0.3
    config = DdpmLossConfig(ip_noise_gamma=gamma, min_timestep=50)
    latents = torch.randn(4, 4, 32, 32, generator=_gen(2))
    # The oracle recovers the perturbed noise, so the loss is the perturbation's energy, gamma**2.
    loss = _loss(_oracle_denoiser(latents, predict_v=False), latents, config)
    assert loss.mean().item() == pytest.approx(gamma**2, rel=0.1)


def test_loss_weights_scale_each_sample():
    config = DdpmLossConfig(min_snr_gamma=5.0)
    zero = lambda noisy, t: torch.zeros_like(noisy)  # noqa: E731
    base = _loss(zero, LATENTS, config, seed=3)
    weights = torch.tensor([1.0, 0.0, 2.5])
    torch.testing.assert_close(_loss(zero, LATENTS, config, seed=3, weights=weights), base * weights)


def test_same_seed_same_loss():
    config = DdpmLossConfig(noise_offset=0.1, noise_offset_random_strength=True, ip_noise_gamma=0.1, multires_noise_iterations=2)
    zero = lambda noisy, t: torch.zeros_like(noisy)  # noqa: E731
    torch.testing.assert_close(_loss(zero, LATENTS, config, seed=7), _loss(zero, LATENTS, config, seed=7))
    assert not torch.equal(_loss(zero, LATENTS, config, seed=7), _loss(zero, LATENTS, config, seed=8))


def _hand_loss(config, latents, noisy, timesteps, pred, mask=None):
    """The whole loss written out per sample from the paper formulas and diffusers' alphas."""
    a_all = ORACLE.alphas_cumprod.double()
    noise = _recover_noise(latents, noisy, timesteps)
    out = []
    for i, t in enumerate(timesteps.tolist()):
        a = a_all[t].item()
        snr = a / (1 - a)
        target = math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i].double() if config.v_parameterization else noise[i]
        d = pred[i].double() - target
        c = {"snr": (1 - config.huber_c) / (1 + math.sqrt((1 - a) / a)) ** 2 + config.huber_c,
             "constant": config.huber_c * config.huber_scale,
             "exponential": config.huber_scale * config.huber_c ** (t / 1000)}[config.huber_schedule]
        elem = {"l2": d**2, "l1": d.abs(), "huber": 2 * c * ((d**2 + c * c).sqrt() - c),
                "smooth_l1": 2 * ((d**2 + c * c).sqrt() - c)}[config.loss_type]
        if mask is not None:
            elem = elem * mask[i]
        value = elem.mean().item()
        if config.min_snr_gamma:
            value *= min(snr, config.min_snr_gamma) / (snr + 1 if config.v_parameterization else snr)
        capped = min(snr, 1000.0)
        if config.scale_v_pred_loss_like_noise_pred:
            value *= capped / (capped + 1)
        if config.v_pred_like_loss:
            value += value * (capped + 1) / capped * config.v_pred_like_loss
        if config.debiased_estimation_loss:
            value *= 1 / (capped + 1) if config.v_parameterization else 1 / math.sqrt(capped)
        out.append(value)
    return torch.tensor(out)


HAND_CONFIGS = [
    DdpmLossConfig(min_snr_gamma=5.0),
    DdpmLossConfig(loss_type="l1", debiased_estimation_loss=True),
    DdpmLossConfig(loss_type="huber", huber_schedule="snr", huber_c=0.2, v_parameterization=True, min_snr_gamma=3.0,
                   scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True),
    DdpmLossConfig(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.3, huber_scale=2.0, v_pred_like_loss=0.5),
    DdpmLossConfig(loss_type="huber", huber_schedule="constant", huber_c=0.5, huber_scale=0.5, min_timestep=0, max_timestep=3),
]


@pytest.mark.parametrize("config", HAND_CONFIGS, ids=lambda c: f"{c.loss_type}-{c.huber_schedule}-v{int(c.v_parameterization)}")
def test_loss_matches_hand_formulas(config):
    seen = {}
    pred = 0.5 * torch.randn(LATENTS.shape, generator=_gen(9))

    def denoise(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return pred

    got = _loss(denoise, LATENTS, config, seed=11)
    expected = _hand_loss(config, LATENTS, seen["noisy"], seen["timesteps"], pred)
    torch.testing.assert_close(got, expected.float(), rtol=2e-4, atol=1e-6)


def test_masked_loss_weights_pixels_by_the_resized_mask():
    config = DdpmLossConfig(masked_loss=True)
    masks = torch.zeros(3, 16, 16)  # image resolution: twice the latent size
    masks[0] = 1.0
    masks[1, :, :8] = 1.0
    seen = {}
    zero_pred = torch.zeros_like(LATENTS)

    def denoise(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return zero_pred

    got = _loss(denoise, LATENTS, config, seed=4, masks=masks)
    latent_mask = torch.zeros(3, 1, 8, 8)
    latent_mask[0] = 1.0
    latent_mask[1, :, :, :4] = 1.0
    expected = _hand_loss(config, LATENTS, seen["noisy"], seen["timesteps"], zero_pred, mask=latent_mask)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-7)
    assert got[2].item() == 0.0


def test_masked_loss_without_masks_is_an_error():
    with pytest.raises(ValueError, match="--masked_loss"):
        _loss(lambda n, t: n, LATENTS, DdpmLossConfig(masked_loss=True))


def test_zero_terminal_snr_keeps_weights_finite_at_the_last_timestep():
    config = DdpmLossConfig(zero_terminal_snr=True, v_parameterization=True, min_snr_gamma=5.0,
                            debiased_estimation_loss=True, min_timestep=999, max_timestep=999)
    loss = _loss(lambda n, t: torch.zeros_like(n), LATENTS, config, schedule=ZERO_SNR_SCHEDULE)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    with pytest.raises(ValueError, match="--zero_terminal_snr"):
        _loss(lambda n, t: n, LATENTS, config, schedule=SCHEDULE)


def test_wrong_prediction_shape_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        _loss(lambda n, t: n[:, :3], LATENTS, DdpmLossConfig())


# --- config ---------------------------------------------------------------------------------


def _namespace(**overrides) -> argparse.Namespace:
    flags = dict(
        v_parameterization=False, min_timestep=None, max_timestep=None, noise_offset=None,
        noise_offset_random_strength=False, adaptive_noise_scale=None, multires_noise_iterations=None,
        multires_noise_discount=0.3, ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
        zero_terminal_snr=False, loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0,
        min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
        debiased_estimation_loss=False, masked_loss=False,
    )
    flags.update(overrides)
    return argparse.Namespace(**flags)


def test_from_args_reads_every_flag():
    args = _namespace(v_parameterization=True, min_timestep=10, max_timestep=900, noise_offset=0.05,
                      adaptive_noise_scale=0.01, loss_type="huber", huber_c=0.3, min_snr_gamma=5.0,
                      scale_v_pred_loss_like_noise_pred=True, masked_loss=True)
    config = DdpmLossConfig.from_args(args)
    assert config == DdpmLossConfig(v_parameterization=True, min_timestep=10, max_timestep=900, noise_offset=0.05,
                                    adaptive_noise_scale=0.01, loss_type="huber", huber_c=0.3, min_snr_gamma=5.0,
                                    scale_v_pred_loss_like_noise_pred=True, masked_loss=True)
    assert DdpmLossConfig.from_args(_namespace()) == DdpmLossConfig()


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(loss_type="l3"), "--loss_type"),
        (dict(huber_schedule="cosine"), "--huber_schedule"),
        (dict(loss_type="huber", huber_schedule="exponential", huber_c=0.0), "--huber_c"),
        (dict(adaptive_noise_scale=0.1), "--adaptive_noise_scale"),
        (dict(scale_v_pred_loss_like_noise_pred=True), "--scale_v_pred_loss_like_noise_pred"),
        (dict(v_parameterization=True, v_pred_like_loss=0.1), "--v_pred_like_loss"),
        (dict(min_timestep=500, max_timestep=100), "--min_timestep"),
    ],
)
def test_from_args_rejects_bad_flags(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        DdpmLossConfig.from_args(_namespace(**overrides))
