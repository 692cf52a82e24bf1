"""SD3 flow matching: densities and weights against diffusers' training_utils and the SD3 paper's
formulas, the shift as a property over a grid, and the loss step against a hand computation."""

import argparse
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from library.args import TRAINING_FLAGS, setup_parser_for
from library.args_groups import SD3_FLAGS
from library.diffusion.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingLossConfig,
    flow_matching_loss,
    loss_weighting,
    noisy_latents,
    precondition,
    sample_density,
    sample_sigmas,
    shift_sigmas,
)

DENSITY = {"logit_mean": 0.3, "logit_std": 0.8, "mode_scale": 1.29}
LATENTS = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(123))
GRID = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
SHIFTS = [0.25, 0.5, 1.0, 1.7, 3.0, 6.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- densities ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_density_replays_diffusers_draws(scheme):
    got = sample_density(64, weighting_scheme=scheme, generator=_gen(5), **DENSITY)
    expected = compute_density_for_timestep_sampling(scheme, 64, generator=_gen(5), **DENSITY)
    assert torch.equal(got, expected)


def test_logit_normal_is_sigmoid_of_a_normal():
    u = sample_density(4, weighting_scheme="logit_normal", generator=_gen(1), **DENSITY)
    normal = 0.3 + 0.8 * torch.randn(4, generator=_gen(1))
    torch.testing.assert_close(u, torch.sigmoid(normal))
    many = sample_density(200_000, weighting_scheme="logit_normal", generator=_gen(2), **DENSITY)
    logits = torch.logit(many.double())
    assert logits.mean().item() == pytest.approx(0.3, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)


def test_mode_replays_its_formula():
    r = torch.rand(6, generator=_gen(3))
    expected = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    torch.testing.assert_close(sample_density(6, weighting_scheme="mode", generator=_gen(3), **DENSITY), expected)


def _mode_map(r: float, scale: float) -> float:
    return 1 - r - scale * (math.cos(math.pi * r / 2) ** 2 - 1 + r)


def test_mode_distribution_follows_its_inverse():
    # f decreases from 1 to 0, so P(f(r) <= x) = 1 - f^-1(x); f^-1 found by bisection.
    u = sample_density(100_000, weighting_scheme="mode", generator=_gen(4), **DENSITY)
    assert 0.0 <= u.min().item() and u.max().item() <= 1.0
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if _mode_map(mid, 1.29) > x else (low, mid)
        assert (u <= x).double().mean().item() == pytest.approx(1 - low, abs=0.006)


@pytest.mark.parametrize("scheme", ["uniform", "none", "sigma_sqrt", "cosmap"])
def test_other_schemes_draw_uniform(scheme):
    u = sample_density(8, weighting_scheme=scheme, generator=_gen(6), **DENSITY)
    assert torch.equal(u, torch.rand(8, generator=_gen(6)))


def test_unknown_scheme_is_named_in_the_error():
    with pytest.raises(ValueError, match="'lognorm'"):
        sample_density(2, weighting_scheme="lognorm", **DENSITY)
    with pytest.raises(ValueError, match="'lognorm'"):
        loss_weighting("lognorm", torch.ones(2))


# --- loss weighting -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.001, 1.0, 1000)
    torch.testing.assert_close(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_loss_weighting_formulas():
    sigmas = torch.tensor([0.1, 0.5, 0.8, 1.0], dtype=torch.float64)
    for i, s in enumerate(sigmas.tolist()):
        assert loss_weighting("sigma_sqrt", sigmas)[i].item() == pytest.approx(1 / s**2, rel=1e-6)
        cosmap = 2 / (math.pi * (1 - 2 * s + 2 * s * s))
        assert loss_weighting("cosmap", sigmas)[i].item() == pytest.approx(cosmap, rel=1e-12)
    for scheme in ("logit_normal", "mode", "none", "uniform"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones_like(sigmas))


# --- shift ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS)
def test_shift_properties_over_a_grid(shift):
    shifted = shift_sigmas(GRID, shift)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
    assert (shifted.diff() > 0).all()
    torch.testing.assert_close(shift_sigmas(shifted, 1 / shift), GRID)
    torch.testing.assert_close(shift_sigmas(shift_sigmas(GRID, shift), 2.0), shift_sigmas(GRID, 2.0 * shift))
    inner = slice(1, -1)
    if shift > 1:
        assert (shifted[inner] > GRID[inner]).all()
    elif shift < 1:
        assert (shifted[inner] < GRID[inner]).all()
    else:
        assert torch.equal(shifted, GRID)


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shift_matches_diffusers_scheduler(shift):
    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    oracle = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
    torch.testing.assert_close(shift_sigmas(base, shift), oracle)


# --- sigmas and timesteps -------------------------------------------------------------------


def _sigmas(seed: int, batch: int = 5, **overrides):
    kwargs = dict(weighting_scheme="logit_normal", shift=3.0, **DENSITY)
    kwargs.update(overrides)
    return sample_sigmas(batch, generator=_gen(seed), **kwargs)


@pytest.mark.parametrize("low,high", [(None, None), (100, 700), (0, 1000)])
def test_sigmas_replay_sd_scripts_steps(low, high):
    sigmas, timesteps = _sigmas(8, batch=64, min_timestep=low, max_timestep=high)
    u = compute_density_for_timestep_sampling("logit_normal", 64, generator=_gen(8), **DENSITY).double()
    u = 3.0 * u / (1 + 2.0 * u)
    t_min, t_max = low or 0, 1000 if high is None else high
    expected = torch.floor(u * (t_max - t_min) + t_min)
    assert torch.equal(timesteps, expected.float())
    assert torch.equal(sigmas, timesteps / 1000)
    assert t_min <= timesteps.min().item() and timesteps.max().item() <= t_max


def test_shifted_sigmas_follow_the_inverse_shift_distribution():
    # sigma = f_s(U), U uniform: P(sigma <= x) = f_{1/s}(x); truncation to 1/1000 adds at most 0.001.
    sigmas, _ = _sigmas(9, batch=100_000, weighting_scheme="uniform")
    for x in (0.2, 0.5, 0.8, 0.95):
        expected = shift_sigmas(torch.tensor(x, dtype=torch.float64), 1 / 3.0).item()
        assert (sigmas <= x).double().mean().item() == pytest.approx(expected, abs=0.006)


def test_equal_min_and_max_timestep_train_one_timestep():
    sigmas, timesteps = _sigmas(0, min_timestep=250, max_timestep=250)
    assert torch.equal(timesteps, torch.full((5,), 250.0))
    assert torch.equal(sigmas, torch.full((5,), 0.25))


@pytest.mark.parametrize("low,high", [(500, 100), (-1, 10), (0, 1001)])
def test_bad_timestep_range_is_an_error(low, high):
    with pytest.raises(ValueError, match="--min_timestep"):
        _sigmas(0, min_timestep=low, max_timestep=high)


# --- forward process and preconditioning ----------------------------------------------------


def test_noisy_latents_interpolate_per_sample():
    noise = torch.randn(LATENTS.shape, generator=_gen(1))
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = noisy_latents(LATENTS, noise, sigmas)
    assert torch.equal(noisy[0], LATENTS[0]) and torch.equal(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.25 * noise[1] + 0.75 * LATENTS[1])


def test_the_true_velocity_predicts_the_latents():
    noise = torch.randn(LATENTS.shape, generator=_gen(2))
    sigmas = torch.tensor([0.001, 0.5, 1.0])
    noisy = noisy_latents(LATENTS, noise, sigmas)
    torch.testing.assert_close(precondition(noise - LATENTS, noisy, sigmas), LATENTS, rtol=0, atol=1e-6)
    torch.testing.assert_close(precondition(torch.zeros_like(noisy), noisy, sigmas), noisy)


# --- the loss step --------------------------------------------------------------------------


def _loss(denoise, config, seed=0, masks=None, weights=None):
    weights = torch.ones(LATENTS.shape[0]) if weights is None else weights
    return flow_matching_loss(
        denoise, LATENTS, config=config, loss_weights=weights, alpha_masks=masks, generator=_gen(seed)
    )


def _replayed_noise(seed: int) -> torch.Tensor:
    return torch.randn(LATENTS.shape, generator=_gen(seed))


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_the_true_velocity_gives_zero_loss(scheme):
    velocity = _replayed_noise(7) - LATENTS
    loss = _loss(lambda noisy, t: velocity, FlowMatchingLossConfig(weighting_scheme=scheme), seed=7)
    assert loss.abs().max().item() < 1e-9


def _hand_loss(scheme: str, seed: int, output: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """sd-scripts' step written out with diffusers' functions: noise, then u, then the steps."""
    gen = _gen(seed)
    noise = torch.randn(LATENTS.shape, generator=gen)
    u = compute_density_for_timestep_sampling(scheme, 3, generator=gen, **DENSITY)
    sigmas = (torch.floor(u * 1000) / 1000).view(-1, 1, 1, 1)
    noisy = sigmas * noise + (1 - sigmas) * LATENTS
    pred = output * -sigmas + noisy
    weighted = (pred - LATENTS) ** 2 * compute_loss_weighting_for_sd3(scheme, sigmas)
    return weighted.mean(dim=(1, 2, 3)) * loss_weights


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_loss_matches_a_hand_computation(scheme):
    output = torch.randn(LATENTS.shape, generator=_gen(11))
    weights = torch.tensor([1.0, 0.5, 2.0])
    seen = {}

    def denoise(noisy, timesteps):
        seen.update(timesteps=timesteps)
        return output

    config = FlowMatchingLossConfig(weighting_scheme=scheme, **DENSITY)
    got = _loss(denoise, config, seed=12, weights=weights)
    torch.testing.assert_close(got, _hand_loss(scheme, 12, output, weights), rtol=1e-5, atol=1e-7)
    assert torch.equal(seen["timesteps"], torch.floor(seen["timesteps"])) and seen["timesteps"].dtype == torch.float32


def test_sigma_sqrt_l2_is_the_velocity_loss():
    # (sigma * (v - v*))**2 * sigma**-2 = (v - v*)**2: the weighting undoes the preconditioning's sigma.
    output = torch.randn(LATENTS.shape, generator=_gen(13))
    got = _loss(lambda noisy, t: output, FlowMatchingLossConfig(weighting_scheme="sigma_sqrt"), seed=14)
    expected = ((output - (_replayed_noise(14) - LATENTS)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-6)


def test_sigma_sqrt_at_sigma_zero_is_finite_with_finite_gradients():
    config = FlowMatchingLossConfig(weighting_scheme="sigma_sqrt", min_timestep=0, max_timestep=0)
    output = torch.randn(LATENTS.shape, generator=_gen(15), requires_grad=True)
    loss = _loss(lambda noisy, t: output, config)
    loss.mean().backward()
    assert torch.equal(loss, torch.zeros(3))
    assert torch.isfinite(output.grad).all()


def test_same_seed_same_loss_other_seed_other_loss():
    output = torch.randn(LATENTS.shape, generator=_gen(16))
    config = FlowMatchingLossConfig(weighting_scheme="logit_normal", training_shift=3.0)
    first, again, other = (_loss(lambda n, t: output, config, seed=s) for s in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_exponential_huber_uses_the_flow_timesteps(loss_type):
    config = FlowMatchingLossConfig(loss_type=loss_type, huber_schedule="exponential", huber_c=0.2, huber_scale=1.5)
    output = torch.randn(LATENTS.shape, generator=_gen(17))
    seen = {}

    def denoise(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return output

    got = _loss(denoise, config, seed=18)
    sigmas = (seen["timesteps"] / 1000).view(-1, 1, 1, 1)
    diff = output * -sigmas + seen["noisy"] - LATENTS
    c = (1.5 * torch.exp(math.log(0.2) * seen["timesteps"] / 1000)).view(-1, 1, 1, 1)
    smooth = 2 * (torch.sqrt(diff**2 + c**2) - c)
    expected = (c * smooth if loss_type == "huber" else smooth).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_masked_loss_weights_pixels_by_the_resized_mask():
    masks = torch.zeros(3, 16, 16)  # image resolution: twice the latent size
    masks[0] = 1.0
    masks[1, :, :8] = 1.0
    output = torch.randn(LATENTS.shape, generator=_gen(19))
    seen = {}

    def denoise(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return output

    got = _loss(denoise, FlowMatchingLossConfig(masked_loss=True), seed=20, masks=masks)
    unmasked = _loss(lambda n, t: output, FlowMatchingLossConfig(), seed=20)
    sigma = seen["timesteps"][1] / 1000
    left_half = ((output[1] * -sigma + seen["noisy"][1] - LATENTS[1]) ** 2)[:, :, :4]
    assert got[0].item() == pytest.approx(unmasked[0].item(), rel=1e-6)
    # the mean runs over every element, as in sd-scripts: half the image weighs half
    assert got[1].item() == pytest.approx(left_half.sum().item() / LATENTS[1].numel(), rel=1e-5)
    assert got[2].item() == 0.0


def test_masked_loss_without_masks_is_an_error():
    with pytest.raises(ValueError, match="--masked_loss"):
        _loss(lambda n, t: n, FlowMatchingLossConfig(masked_loss=True))


def test_wrong_prediction_shape_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        _loss(lambda n, t: n[:, :3], FlowMatchingLossConfig())


# --- config ---------------------------------------------------------------------------------


def _parsed(*argv: str) -> argparse.Namespace:
    return setup_parser_for(TRAINING_FLAGS, SD3_FLAGS).parse_args(list(argv))


def test_from_args_reads_every_flag():
    args = _parsed("--weighting_scheme", "mode", "--logit_mean", "0.5", "--logit_std", "2", "--mode_scale", "1.1",
                   "--training_shift", "3", "--min_timestep", "10", "--max_timestep", "900", "--loss_type", "huber",
                   "--huber_schedule", "constant", "--huber_c", "0.3", "--huber_scale", "2", "--masked_loss")
    assert FlowMatchingLossConfig.from_args(args) == FlowMatchingLossConfig(
        weighting_scheme="mode", logit_mean=0.5, logit_std=2.0, mode_scale=1.1, training_shift=3.0, min_timestep=10,
        max_timestep=900, loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=2.0, masked_loss=True)
    assert FlowMatchingLossConfig.from_args(_parsed()) == FlowMatchingLossConfig()


@pytest.mark.parametrize(
    "overrides,flag",
    [
        ({"weighting_scheme": "lognorm"}, "--weighting_scheme"),
        ({"weighting_scheme": "mode", "mode_scale": 2.0}, "--mode_scale"),
        ({"weighting_scheme": "logit_normal", "logit_std": -1.0}, "--logit_std"),
        ({"training_shift": 0.0}, "--training_shift"),
        ({"min_timestep": 500, "max_timestep": 100}, "--min_timestep"),
        ({"loss_type": "huber"}, "--huber_schedule snr"),
        ({"loss_type": "smooth_l1", "huber_schedule": "exponential", "huber_c": 0.0}, "--huber_c"),
        ({"loss_type": "l3"}, "--loss_type"),
    ],
)
def test_config_rejects_bad_flags(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        FlowMatchingLossConfig(**overrides)
