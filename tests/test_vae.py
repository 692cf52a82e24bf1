"""ldm VAE: numerics against diffusers' AutoencoderKL, diffusers-folder renaming, config inference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from diffusers_oracle import randomize_

from library.models.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VaeConfig,
    infer_vae_config,
)
from library.models.vae_keys import (
    diffusers_to_ldm_vae_key,
    vae_state_dict_from_diffusers,
)

PREFIX = "first_stage_model."
TINY_SD = VaeConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
# SD3 style: 16 latent channels, no quant convs; 16 GroupNorm groups exercise norm_groups.
TINY_SD3 = VaeConfig(z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=2, use_quant_conv=False, norm_groups=16)
TINY_CONFIGS = {"sd": TINY_SD, "sd3": TINY_SD3}
SD_VAE = VaeConfig()
SD3_VAE = VaeConfig(z_channels=16, use_quant_conv=False)


def diffusers_config(config: VaeConfig, prefixed_sd: dict) -> dict:
    """diffusers' own config builder, fed the ldm ``ddconfig`` this VaeConfig stands for."""
    ddconfig = {
        "in_channels": config.in_channels,
        "out_ch": config.out_channels,
        "z_channels": config.z_channels,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
    }
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    out = create_vae_diffusers_config_from_ldm(original, prefixed_sd, scaling_factor=1.0)
    out.update(
        norm_num_groups=config.norm_groups,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_quant_conv,
    )
    return out


def prefixed(sd: dict) -> dict:
    return {PREFIX + key: value for key, value in sd.items()}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    """(config, our VAE, diffusers' VAE) holding the same random weights."""
    config = TINY_CONFIGS[request.param]
    ours = AutoencoderKL(config).eval()
    randomize_(ours, seed=1)
    sd = prefixed(ours.state_dict())
    dconfig = diffusers_config(config, sd)
    theirs = DiffusersAutoencoderKL(**dconfig).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(sd, dconfig), strict=True)
    return config, ours, theirs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_encode_and_decode_match_diffusers(tiny_pair):
    config, ours, theirs = tiny_pair
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    factor = 2 ** (len(config.ch_mult) - 1)
    latent = torch.randn(2, config.z_channels, 32 // factor, 32 // factor, generator=generator)
    with torch.no_grad():
        expected_posterior = theirs.encode(image).latent_dist
        posterior = ours.encode(image)
        expected_image = theirs.decode(latent).sample
        decoded = ours.decode(latent)
    assert posterior.mean.shape == (2, config.z_channels, 32 // factor, 32 // factor)
    assert relative_error(posterior.mean, expected_posterior.mean) < 1e-4
    assert relative_error(posterior.logvar, expected_posterior.logvar) < 1e-4
    assert expected_image.std() > 0.1
    assert relative_error(decoded, expected_image) < 1e-4


def test_sample_draws_like_diffusers(tiny_pair):
    _, ours, theirs = tiny_pair
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(image)
        expected = theirs.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(4))
    actual = posterior.sample(generator=torch.Generator().manual_seed(4))
    assert relative_error(actual, expected) < 1e-4
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(actual, posterior.mean + torch.exp(0.5 * posterior.logvar) * noise)


def test_posterior_clamps_logvar_like_ldm():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.equal(posterior.mode(), posterior.mean)


def test_state_dict_from_diffusers_restores_ldm_weights(tiny_pair):
    config, ours, theirs = tiny_pair
    restored = vae_state_dict_from_diffusers(theirs.state_dict(), config)
    original = ours.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[key], original[key]) for key in original)


def test_legacy_diffusers_attention_names():
    """diffusers < 0.14 folders name the VAE attention query/key/value/proj_attn."""
    legacy = {
        "encoder.mid_block.attentions.0.query.weight": "encoder.mid.attn_1.q.weight",
        "decoder.mid_block.attentions.0.proj_attn.bias": "decoder.mid.attn_1.proj_out.bias",
        "decoder.mid_block.attentions.0.group_norm.weight": "decoder.mid.attn_1.norm.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight": "decoder.up.2.upsample.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.bias": "encoder.down.1.block.0.nin_shortcut.bias",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for diffusers_key, ldm_key in legacy.items():
        assert diffusers_to_ldm_vae_key(diffusers_key, TINY_SD) == ldm_key


@pytest.mark.parametrize("config", [SD_VAE, SD3_VAE], ids=["sd", "sd3"])
def test_full_size_layout_matches_diffusers(config):
    with torch.device("meta"):
        ours = AutoencoderKL(config).state_dict()
        dconfig = diffusers_config(config, prefixed(ours))
        theirs = DiffusersAutoencoderKL(**dconfig).state_dict()
    converted = convert_ldm_vae_checkpoint(prefixed(ours), dconfig)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if config == SD_VAE:
        assert sum(v.numel() for v in ours.values()) == 83_653_863  # the published SD VAE size


@pytest.mark.parametrize("config", [TINY_SD, SD_VAE, SD3_VAE], ids=["tiny", "sd", "sd3"])
def test_infer_config_round_trip(config):
    with torch.device("meta"):
        sd = AutoencoderKL(config).state_dict()
    assert infer_vae_config(sd) == config


def test_infer_config_defaults_groups_to_32():
    with torch.device("meta"):
        sd = AutoencoderKL(TINY_SD3).state_dict()
    assert infer_vae_config(sd) == dataclasses.replace(TINY_SD3, norm_groups=32)


def test_infer_config_rejects_prefixed_keys():
    with torch.device("meta"):
        sd = AutoencoderKL(TINY_SD).state_dict()
    with pytest.raises(ValueError, match="first_stage_model."):
        infer_vae_config(prefixed(sd))
