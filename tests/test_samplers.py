"""Preview samplers: Euler against diffusers' EulerDiscreteScheduler, and every sd-scripts sampler name runs."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.samplers import SAMPLER_ALIASES, ddpm_denoiser, sample, sampling_sigmas, sigma_to_timestep


def toy_model(x, t):
    """A smooth stand-in for ε(x_t, t) that depends on both inputs."""
    return 0.3 * torch.tanh(x) + 1e-4 * t.reshape(-1, 1, 1, 1)


def test_euler_matches_diffusers():
    schedule = DdpmSchedule.scaled_linear()
    steps = 12
    oracle = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace")
    oracle.set_timesteps(steps)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()

    x = x0 * oracle.init_noise_sigma
    for t in oracle.timesteps:
        model_in = oracle.scale_model_input(x, t)
        x = oracle.step(toy_model(model_in, t.reshape(1)), t, x).prev_sample

    sigmas = sampling_sigmas(schedule.alphas_cumprod.float(), steps)
    ours = sample("euler", ddpm_denoiser(toy_model, schedule.alphas_cumprod.float(), False), x0 * sigmas[0], sigmas)
    assert torch.allclose(sigmas[:-1], oracle.sigmas[:-1].float(), rtol=1e-5)
    assert (ours - x).abs().max() / x.abs().max() < 1e-4


def test_sigma_to_timestep_inverts_training_sigmas():
    alphas = DdpmSchedule.scaled_linear().alphas_cumprod.float()
    sigmas = ((1 - alphas) / alphas).sqrt()
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(sigma_to_timestep(sigmas[t], alphas), t.float(), atol=1e-3)


@pytest.mark.parametrize("name", sorted(SAMPLER_ALIASES))
def test_every_sampler_denoises_a_known_image(name):
    """With a perfect denoiser for a single target x0, every sampler must land on x0."""
    target = torch.full((1, 4, 4, 4), 0.5)
    alphas = DdpmSchedule.scaled_linear().alphas_cumprod.float()
    perfect = lambda x, sigma: target  # noqa: E731  D(x, σ) = x0 exactly
    sigmas = sampling_sigmas(alphas, 10)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    out = sample(name, perfect, noise * sigmas[0], sigmas, torch.Generator().manual_seed(2))
    assert torch.allclose(out, target, atol=1e-3), name


def test_v_prediction_denoiser_recovers_x0():
    """v = α·ε − σ·x0 in DDPM terms; our D(x, σ) must return x0 for a model predicting the true v."""
    schedule = DdpmSchedule.scaled_linear()
    x0, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = 400
    a = schedule.alphas_cumprod[t].float()
    sigma = ((1 - a) / a).sqrt()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    model = lambda x_in, timestep: v  # noqa: E731
    denoise = ddpm_denoiser(model, schedule.alphas_cumprod.float(), True)
    assert torch.allclose(denoise(x_t / a.sqrt(), sigma), x0, atol=1e-4)


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'foo'"):
        sample("foo", lambda x, s: x, torch.zeros(1), torch.ones(2))


def test_flow_euler_reaches_the_clean_latents_with_the_exact_velocity():
    """On the straight path x_σ = σ·n + (1 − σ)·x0 the velocity is (x − x0)/σ; Euler is exact on it."""
    from library.diffusion.flow_sampling import flow_euler_sample, flow_sampling_sigmas

    x0 = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    velocity = lambda x, t: (x - x0) / (t.reshape(-1, 1, 1, 1) / 1000)  # noqa: E731
    out = flow_euler_sample(velocity, noise, flow_sampling_sigmas(7, shift=3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_flow_sigmas_are_shifted_and_span_one_to_zero():
    from library.diffusion.flow_sampling import flow_sampling_sigmas

    sigmas = flow_sampling_sigmas(4, shift=3.0)
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.allclose(sigmas, 3 * plain / (1 + 2 * plain))
    assert sigmas[0] == 1 and sigmas[-1] == 0


def test_zero_terminal_snr_previews_sample_the_ordinary_schedule():
    """A rescaled table ends in alpha_bar = 0 (sigma = inf); previews use the table before the rescale, as sd-scripts."""
    from library.sample_images import ddpm_latents
    from library.sample_prompts import SamplePrompt

    plain, rescaled = DdpmSchedule.scaled_linear(), DdpmSchedule.scaled_linear(zero_terminal_snr=True)
    assert torch.equal(rescaled.sampling_alphas_cumprod, plain.alphas_cumprod)
    assert torch.equal(plain.sampling_alphas_cumprod, plain.alphas_cumprod)
    sigmas = sampling_sigmas(rescaled.sampling_alphas_cumprod.float(), 6)
    assert torch.isfinite(sigmas).all() and sigmas[0] == pytest.approx(sampling_sigmas(plain.alphas_cumprod.float(), 6)[0].item())

    prompt = SamplePrompt("a cat", width=64, height=64, steps=6)
    latents = ddpm_latents(prompt, torch.Generator().manual_seed(0), "euler", guided=toy_model, schedule=rescaled,
                           v_parameterization=True, channels=4)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all() and latents.abs().max() > 0


def test_preview_decoding_runs_outside_autocast(tmp_path):
    """--no_half_vae keeps an fp32 VAE while the render runs under fp16/bf16 autocast; decoding must not be cast."""
    from library.run_config import SampleConfig
    from library.sample_images import generate_samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --d 5\n", encoding="utf-8")
    config = SampleConfig(prompts_file=prompts, sampler="euler", every_n_steps=None, every_n_epochs=None, at_first=False,
                          output_dir=tmp_path / "sample", output_name="run", seed=None)
    seen = {}

    def render(prompt, generator, sampler):
        seen["render"] = torch.is_autocast_enabled("cpu")
        return torch.zeros(1, 4, 8, 8)

    def decode(latents):
        seen["decode"] = torch.is_autocast_enabled("cpu")
        return torch.zeros(1, 3, 64, 64)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        paths = generate_samples(config, step=3, epoch=None, device=torch.device("cpu"), render=render, decode=decode)
    assert seen == {"render": True, "decode": False}
    assert len(paths) == 1 and paths[0].name.startswith("run_000003_00_") and paths[0].name.endswith("_5.png")
