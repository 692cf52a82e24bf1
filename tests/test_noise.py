"""Noise shaping: exact values by replaying a seeded generator, plus statistics that pin the intent."""

import pytest
import torch
import torch.nn.functional as F

from library.diffusion.noise import input_perturbation, offset_noise, pyramid_noise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    noise = torch.randn(3, 4, 8, 8, generator=_gen(0))
    latents = torch.randn(3, 4, 8, 8, generator=_gen(1))
    out = offset_noise(noise, latents, 0.1, False, _gen(7))
    expected_shift = 0.1 * torch.randn(3, 4, 1, 1, generator=_gen(7))
    torch.testing.assert_close(out, noise + expected_shift)
    assert not torch.equal(out, noise)


def test_offset_noise_random_strength_scales_by_one_uniform_draw():
    noise = torch.zeros(2, 4, 4, 4)
    latents = torch.zeros(2, 4, 4, 4)
    out = offset_noise(noise, latents, 0.5, True, _gen(3))
    replay = _gen(3)
    strength = torch.rand(1, generator=replay) * 0.5
    shift = torch.randn(2, 4, 1, 1, generator=replay)
    torch.testing.assert_close(out, (strength * shift).expand(2, 4, 4, 4))


def test_offset_noise_adaptive_scale_grows_with_latent_mean():
    noise = torch.zeros(1, 2, 4, 4)
    latents = torch.stack([torch.full((4, 4), -2.0), torch.full((4, 4), 0.0)]).unsqueeze(0)
    out = offset_noise(noise, latents, 0.1, False, _gen(5), adaptive_scale=0.25)
    shift = torch.randn(1, 2, 1, 1, generator=_gen(5))
    strength = torch.tensor([0.1 + 0.25 * 2.0, 0.1]).reshape(1, 2, 1, 1)
    torch.testing.assert_close(out, (strength * shift).expand(1, 2, 4, 4))


def test_offset_noise_negative_adaptive_offset_is_clamped_to_zero():
    noise = torch.randn(1, 1, 4, 4, generator=_gen(0))
    latents = torch.full((1, 1, 4, 4), 3.0)
    out = offset_noise(noise, latents, 0.1, False, _gen(2), adaptive_scale=-1.0)
    torch.testing.assert_close(out, noise)


def test_pyramid_noise_single_level_is_exact_and_unit_std():
    noise = torch.randn(2, 3, 8, 8, generator=_gen(0))
    before = noise.clone()
    out = pyramid_noise(noise, iterations=1, discount=0.4, generator=_gen(11))
    replay = _gen(11)
    torch.rand(1, generator=replay)  # the level's resolution ratio, unused at level 0
    total = noise + torch.randn(2, 3, 8, 8, generator=replay)
    torch.testing.assert_close(out, total / total.std())
    torch.testing.assert_close(noise, before)  # the input is not modified


def test_pyramid_noise_adds_low_frequencies():
    noise = torch.randn(4, 4, 64, 64, generator=_gen(0))
    out = pyramid_noise(noise, iterations=6, discount=0.8, generator=_gen(1))
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    # White noise's per-channel spatial mean has variance 1/(H*W); coarse levels raise it a lot.
    white_var = noise.mean(dim=(2, 3)).var().item()
    pyramid_var = out.mean(dim=(2, 3)).var().item()
    assert white_var < 5.0 / (64 * 64)
    assert pyramid_var > 20 * white_var
    # Neighbouring pixels become correlated.
    neighbour_corr = torch.corrcoef(torch.stack([out[..., :-1].flatten(), out[..., 1:].flatten()]))[0, 1]
    assert neighbour_corr > 0.2


def test_pyramid_noise_stops_at_one_pixel():
    noise = torch.randn(1, 1, 4, 4, generator=_gen(0))
    out = pyramid_noise(noise, iterations=50, discount=0.5, generator=_gen(1))
    replay = _gen(1)
    total = noise.clone()
    for level in range(50):
        ratio = 2.0 + 2.0 * torch.rand(1, generator=replay).item()
        size = max(1, int(4 / ratio**level))
        coarse = torch.randn(1, 1, size, size, generator=replay)
        total = total + F.interpolate(coarse, size=(4, 4), mode="bilinear") * 0.5**level
        if size == 1:
            break
    assert level < 5
    torch.testing.assert_close(out, total / total.std())


def test_input_perturbation_exact_and_random_strength():
    noise = torch.randn(2, 4, 4, 4, generator=_gen(0))
    out = input_perturbation(noise, 0.1, False, _gen(9))
    torch.testing.assert_close(out, noise + 0.1 * torch.randn(2, 4, 4, 4, generator=_gen(9)))

    out = input_perturbation(noise, 0.1, True, _gen(9))
    replay = _gen(9)
    strength = torch.rand(1, generator=replay) * 0.1
    torch.testing.assert_close(out, noise + strength * torch.randn(2, 4, 4, 4, generator=replay))


def test_input_perturbation_variance():
    noise = torch.randn(8, 4, 32, 32, generator=_gen(0))
    out = input_perturbation(noise, 0.5, False, _gen(1))
    assert (out - noise).var().item() == pytest.approx(0.25, rel=0.05)


def test_global_rng_when_no_generator():
    noise = torch.zeros(1, 2, 4, 4)
    torch.manual_seed(123)
    first = input_perturbation(noise, 1.0, False)
    torch.manual_seed(123)
    second = input_perturbation(noise, 1.0, False)
    torch.testing.assert_close(first, second)
    assert first.abs().sum() > 0


def test_non_image_noise_is_rejected():
    with pytest.raises(ValueError, match="B, C, H, W"):
        pyramid_noise(torch.zeros(2, 3), 2, 0.3)
