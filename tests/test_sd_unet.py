"""SD1/SD2 U-Net: numerics against diffusers, the ldm <-> diffusers key adapter, config inference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from diffusers.models.embeddings import get_timestep_embedding
from diffusers_oracle import ldm_unet_yaml, randomize_
from torch import nn

from library.models.sd_unet import (
    SD1_UNET_CONFIG,
    SD2_UNET_CONFIG,
    SdUNet,
    SdUNetConfig,
    infer_unet_config,
    timestep_embedding,
)
from library.models.sd_unet_keys import (
    diffusers_to_ldm_unet_key,
    ldm_to_diffusers_unet_key,
    unet_state_dict_from_diffusers,
)

PREFIX = "model.diffusion_model."

# Three levels, level 2 without attention (its upsampler sits at output_blocks.K.1), two res blocks.
TINY_SD1 = SdUNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1), context_dim=32
)
# SD2 style: Linear projections, heads from channels per head, attention only at level 1 (upsampler at .2),
# two transformer blocks per SpatialTransformer, 16 GroupNorm groups.
TINY_SD2 = SdUNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    context_dim=48,
    num_head_channels=8,
    use_linear_in_transformer=True,
    transformer_depth=2,
    norm_groups=16,
)
TINY_CONFIGS = {"sd1": TINY_SD1, "sd2": TINY_SD2}


def diffusers_config(config: SdUNetConfig, prefixed_sd: dict) -> dict:
    out = create_unet_diffusers_config_from_ldm(ldm_unet_yaml(config), prefixed_sd)
    out["norm_num_groups"] = config.norm_groups
    return out


def prefixed(sd: dict) -> dict:
    return {PREFIX + key: value for key, value in sd.items()}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    """(our config, our model, diffusers model, diffusers config) with the same random weights."""
    config = TINY_CONFIGS[request.param]
    torch.manual_seed(0)
    ours = SdUNet(config).eval()
    randomize_(ours, seed=1)
    sd = prefixed(ours.state_dict())
    dconfig = diffusers_config(config, sd)
    theirs = UNet2DConditionModel(**dconfig).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, dconfig), strict=True)
    return config, ours, theirs, dconfig


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_forward_matches_diffusers(tiny_pair):
    config, ours, theirs, _ = tiny_pair
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([3.0, 870.0])
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    with torch.no_grad():
        expected = theirs(x, timesteps, encoder_hidden_states=context).sample
        actual = ours(x, timesteps, context)
    assert expected.std() > 0.1  # random weights: the output is far from trivial
    assert relative_error(actual, expected) < 1e-4


def test_latent_sides_not_divisible_by_the_levels_match_diffusers(tiny_pair):
    """sd-scripts' 32-px buckets give SD1 latents like 60 (not a multiple of 8): upsampling meets the skip's size."""
    config, ours, theirs, _ = tiny_pair
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 13, 10, generator=generator)
    context = torch.randn(1, 7, config.context_dim, generator=generator)
    with torch.no_grad():
        expected = theirs(x, torch.tensor([500.0]), encoder_hidden_states=context).sample
        actual = ours(x, torch.tensor([500.0]), context)
    assert actual.shape == x.shape and relative_error(actual, expected) < 1e-4


def test_timestep_embedding_is_ldm_cos_first():
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    dim = 6
    half = dim // 2
    expected = torch.tensor(
        [
            [math.cos(v * 10000 ** (-i / half)) for i in range(half)]
            + [math.sin(v * 10000 ** (-i / half)) for i in range(half)]
            for v in t.tolist()
        ]
    )
    assert torch.allclose(timestep_embedding(t, dim), expected, atol=1e-5)
    oracle = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 320), oracle, atol=1e-5)


def test_computes_in_weight_dtype_and_returns_input_dtype(tiny_pair):
    config, ours, _, _ = tiny_pair
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, config.context_dim, generator=generator)
    t = torch.tensor([400.0])
    with torch.no_grad():
        reference = ours(x, t, context)
        low_precision = SdUNet(config).eval()
        low_precision.load_state_dict(ours.state_dict())
        actual = low_precision.to(torch.bfloat16)(x, t, context)
    assert actual.dtype == torch.float32
    assert relative_error(actual, reference) < 5e-2


def keyed_by_index(keys: list[str]) -> dict[str, torch.Tensor]:
    """A fake state dict whose values name their ldm key, so converted keys can be traced back."""
    return {PREFIX + key: torch.tensor([i]) for i, key in enumerate(keys)}


@pytest.mark.parametrize(
    "config", [TINY_SD1, TINY_SD2, SD1_UNET_CONFIG, SD2_UNET_CONFIG], ids=["tiny1", "tiny2", "sd15", "sd21"]
)
def test_key_adapter_agrees_with_diffusers_converter(config):
    with torch.device("meta"):
        keys = list(SdUNet(config).state_dict())
    converted = convert_ldm_unet_checkpoint(keyed_by_index(keys), {"layers_per_block": config.num_res_blocks})
    expected = {keys[int(value)]: diffusers_key for diffusers_key, value in converted.items()}
    assert len(expected) == len(keys) == len(converted)
    for key in keys:
        assert ldm_to_diffusers_unet_key(key, config) == expected[key]
        assert diffusers_to_ldm_unet_key(expected[key], config) == key


@pytest.mark.parametrize("config", [SD1_UNET_CONFIG, SD2_UNET_CONFIG], ids=["sd15", "sd21"])
def test_full_size_layout_matches_diffusers(config):
    with torch.device("meta"):
        ours = SdUNet(config).state_dict()
        dconfig = diffusers_config(config, prefixed(ours))
        theirs = UNet2DConditionModel(**dconfig).state_dict()
    converted = convert_ldm_unet_checkpoint(prefixed(ours), dconfig)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if config == SD1_UNET_CONFIG:
        assert sum(v.numel() for v in ours.values()) == 859_520_964  # the published SD1.5 U-Net size


def test_module_paths_name_the_same_diffusers_modules(tiny_pair):
    config, ours, theirs, _ = tiny_pair
    theirs_modules = dict(theirs.named_modules())
    adapted = [(n, m) for n, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(adapted) > 20
    for name, module in adapted:
        diffusers_name = ldm_to_diffusers_unet_key(name, config)
        assert diffusers_name + ".weight" == ldm_to_diffusers_unet_key(name + ".weight", config)
        target = theirs_modules[diffusers_name]
        assert type(target) is type(module)
        assert torch.equal(target.weight, module.weight)
        assert diffusers_to_ldm_unet_key(diffusers_name, config) == name


def test_state_dict_from_diffusers_loads_back(tiny_pair):
    config, ours, theirs, _ = tiny_pair
    restored = unet_state_dict_from_diffusers(theirs.state_dict(), config)
    original = ours.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[key], original[key]) for key in original)


@pytest.mark.parametrize(
    "key",
    [
        "input_blocks.1",  # a container with no diffusers counterpart
        "input_blocks.1.0.in_layers.1",  # an activation
        "input_blocks.1.1.proj_in.weight",  # level 0 has no attention in TINY_SD2
        "output_blocks.1.1.conv.weight",  # TINY_SD2's level-1 upsampler sits at .2
        "input_blocks.9.0.in_layers.0.weight",  # past the last block
        "input_blocks.4.0.op.weight",  # the deepest level does not downsample
        "label_emb.0.0.weight",
    ],
)
def test_unmapped_ldm_keys_raise(key):
    with pytest.raises(ValueError, match="no ldm <-> diffusers counterpart"):
        ldm_to_diffusers_unet_key(key, TINY_SD2)


@pytest.mark.parametrize(
    "key",
    [
        "down_blocks.0.attentions.0.proj_in.weight",  # level 0 has no attention in TINY_SD2
        "down_blocks.1.downsamplers.0.conv.weight",  # the deepest level does not downsample
        "add_embedding.linear_1.weight",  # SDXL only
    ],
)
def test_unmapped_diffusers_keys_raise(key):
    with pytest.raises(ValueError, match="no ldm <-> diffusers counterpart"):
        diffusers_to_ldm_unet_key(key, TINY_SD2)


@pytest.mark.parametrize("config", [TINY_SD1, SD1_UNET_CONFIG, SD2_UNET_CONFIG], ids=["tiny1", "sd15", "sd21"])
def test_infer_config_round_trip(config):
    with torch.device("meta"):
        sd = SdUNet(config).state_dict()
    assert infer_unet_config(sd) == config


def test_infer_config_uses_sd2_head_convention():
    """Heads are not stored in weights: a Linear-projection U-Net gets SD2's 64 channels per head."""
    with torch.device("meta"):
        sd = SdUNet(TINY_SD2).state_dict()
    assert infer_unet_config(sd) == dataclasses.replace(TINY_SD2, num_head_channels=64, norm_groups=32)


def test_infer_config_rejects_other_state_dicts():
    with torch.device("meta"):
        sd = SdUNet(TINY_SD1).state_dict()
    with pytest.raises(ValueError, match="model.diffusion_model."):
        infer_unet_config(prefixed(sd))
    with pytest.raises(ValueError, match="class-label table"):
        infer_unet_config({**sd, "label_emb.weight": torch.zeros(1000, 128)})  # the x4 upscaler's nn.Embedding


def test_config_rejects_attention_level_out_of_range():
    with pytest.raises(ValueError, match="attention_levels"):
        SdUNetConfig(channel_mult=(1, 2), attention_levels=(0, 2))
    with pytest.raises(ValueError, match="attention_levels"):
        SdUNetConfig(channel_mult=(1, 2), attention_levels=())


def test_int_transformer_depth_becomes_one_count_per_level():
    assert SD1_UNET_CONFIG.transformer_depth == (1, 1, 1, 0)
    assert TINY_SD2.transformer_depth == (0, 2)
    assert TINY_SD2.middle_transformer_depth == 2
    assert SdUNetConfig(channel_mult=(1, 2), attention_levels=(1,), transformer_depth=(0, 3)) == dataclasses.replace(
        SdUNetConfig(channel_mult=(1, 2), attention_levels=(1,)), transformer_depth=3
    )


@pytest.mark.parametrize(
    "depth", [(1, 2), (0, 0), (0, 2, 2), (-1, 2)], ids=["depth-without-attention", "zero", "length", "negative"]
)
def test_config_rejects_depth_tuple_that_disagrees_with_attention_levels(depth):
    with pytest.raises(ValueError, match="transformer_depth"):
        SdUNetConfig(channel_mult=(1, 2), attention_levels=(1,), transformer_depth=depth)


def test_gradient_checkpointing_recomputes_blocks_with_identical_grads():
    model = SdUNet(TINY_SD2).train()
    randomize_(model, seed=4)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 3, TINY_SD2.context_dim, generator=generator)
    t = torch.tensor([250.0])
    calls = []
    model.middle_block.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(enabled: bool) -> tuple[list[torch.Tensor], int]:
        model.zero_grad()
        calls.clear()
        model.set_gradient_checkpointing(enabled)
        model(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()], len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block really ran again in backward
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed))
    model.eval()
    calls.clear()
    model(x, t, context).sum().backward()
    assert len(calls) == 1  # no recomputation outside training


def test_cpu_offload_checkpointing_gives_identical_grads(monkeypatch):
    """The checkpointed blocks' saved inputs go through save_on_cpu, and gradients do not change."""
    from library.models import checkpointing

    config = SdUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), context_dim=16)
    torch.manual_seed(0)
    model = SdUNet(config).train()
    randomize_(model, seed=3)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 16)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    offloads = []
    real = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(checkpointing.torch.autograd.graph, "save_on_cpu",
                        lambda **kw: offloads.append(kw) or real(**kw))
    model.set_gradient_checkpointing(True, cpu_offload=True)
    offloaded = grads()
    assert len(offloads) == len(model.input_blocks) + 1 + len(model.output_blocks)
    for a, b in zip(plain, offloaded):
        torch.testing.assert_close(a, b)
