"""SDXL U-Net: numerics against diffusers (size conditioning included), the full-size layout, key adapter,
config inference and sd-scripts' SDXL LoRA targets."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from diffusers_oracle import SDXL_BASE_UNET_CONFIG, randomize_

from library.models.sd_unet import (
    SDXL_UNET_CONFIG,
    SdUNet,
    SdUNetConfig,
    SdxlUNet,
    infer_unet_config,
)
from library.models.sd_unet_keys import (
    diffusers_to_ldm_unet_key,
    ldm_to_diffusers_unet_key,
    unet_state_dict_from_diffusers,
)
from library.models.sdxl_conditioning import sdxl_size_embedding
from networks.lora import create_network
from networks.lora_targets import (
    DIFFUSERS_SD_UNET_TARGETS,
    SD_UNET_TARGETS,
    SDXL_UNET_TARGETS,
    find_target_layers,
    resolve_targets,
)

PREFIX = "model.diffusion_model."
TINY_POOLED = 24
# SDXL's shape in small: no attention at level 0, two and three transformer blocks deeper, Linear
# projections, 8 channels per head, a label_emb over pooled text + 6 x 256 size channels.
TINY_SDXL = SdUNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(1, 2),
    transformer_depth=(0, 2, 3),
    context_dim=40,
    num_head_channels=8,
    use_linear_in_transformer=True,
    norm_groups=16,
    adm_in_channels=TINY_POOLED + 6 * 256,
)


def tiny_diffusers_config() -> dict:
    """TINY_SDXL written as diffusers spells an SDXL U-Net (attention_head_dim holds head counts)."""
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": TINY_SDXL.adm_in_channels,
        "attention_head_dim": [4, 8, 8],  # 32, 64, 64 channels at 8 per head
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 40,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 3],  # level 0 has no attention and ignores its entry
        "use_linear_projection": True,
        "norm_num_groups": 16,
        "sample_size": 16,
    }


def prefixed(sd: dict) -> dict:
    return {PREFIX + key: value for key, value in sd.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[SdxlUNet, UNet2DConditionModel]:
    """Our tiny SDXL U-Net and diffusers' built from it by diffusers' own single-file converter."""
    ours = SdxlUNet(TINY_SDXL).eval()
    randomize_(ours, seed=11)
    dconfig = tiny_diffusers_config()
    theirs = UNet2DConditionModel(**dconfig).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(prefixed(ours.state_dict()), dconfig), strict=True)
    return ours, theirs


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 16, 16, generator=generator),
        "t": torch.tensor([3.0, 870.0]),
        "context": torch.randn(2, 7, TINY_SDXL.context_dim, generator=generator),
        "pooled": torch.randn(2, TINY_POOLED, generator=generator),
        # original (h, w), crop (top, left), target (h, w), as diffusers' time_ids
        "time_ids": torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 640.0, 16.0, 0.0, 768.0, 896.0]]),
    }


def _ours(model: SdUNet, inputs: dict[str, torch.Tensor], time_ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = inputs["time_ids"] if time_ids is None else time_ids
    y = sdxl_size_embedding(inputs["pooled"], ids[:, 0:2], ids[:, 2:4], ids[:, 4:6])
    return model(inputs["x"], inputs["t"], inputs["context"], y)


def test_forward_matches_diffusers(tiny_pair):
    ours, theirs = tiny_pair
    inputs = _inputs(seed=12)
    added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        expected = theirs(inputs["x"], inputs["t"], inputs["context"], added_cond_kwargs=added).sample
        actual = _ours(ours, inputs)
    assert expected.std() > 0.1  # random weights: far from a trivial output
    assert relative_error(actual, expected) < 1e-4


def test_size_conditioning_changes_the_prediction(tiny_pair):
    """label_emb is wired in with weight: other sizes give a clearly different output."""
    ours, _ = tiny_pair
    inputs = _inputs(seed=13)
    other_ids = inputs["time_ids"].flip(0)
    with torch.no_grad():
        assert relative_error(_ours(ours, inputs, other_ids), _ours(ours, inputs)) > 1e-2


def test_size_embedding_layout_matches_sgm_formula_and_diffusers():
    pooled = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.25]])
    original, crop, target = torch.tensor([[1024, 768], [512, 640]]), torch.tensor([[0, 32], [16, 0]]), (896, 1152)
    y = sdxl_size_embedding(pooled, original, crop, target)
    half = 128
    for b in range(2):
        values = [*original[b].tolist(), *crop[b].tolist(), *target]
        expected = []
        for v in values:
            expected += [math.cos(v * 10000 ** (-i / half)) for i in range(half)]
            expected += [math.sin(v * 10000 ** (-i / half)) for i in range(half)]
        assert torch.equal(y[b, :3], pooled[b])
        assert torch.allclose(y[b, 3:], torch.tensor(expected), atol=1e-4)
    time_ids = torch.cat([original, crop, torch.tensor([target, target])], dim=1).float()
    oracle = get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(y[:, 3:], oracle.reshape(2, -1), atol=1e-5)


def test_size_embedding_broadcasts_pairs_and_rejects_bad_shapes():
    pooled = torch.zeros(3, 4, dtype=torch.float16)
    y = sdxl_size_embedding(pooled, (1024, 1024), (0, 0), torch.tensor([[1024, 1024]] * 3))
    assert y.dtype == torch.float16 and y.shape == (3, 4 + 1536)
    assert torch.equal(y[0], y[2])
    assert torch.equal(y, sdxl_size_embedding(pooled, [[1024, 1024]] * 3, [[0, 0]] * 3, (1024, 1024)))
    with pytest.raises(ValueError, match="crop_top_left"):
        sdxl_size_embedding(pooled, (1024, 1024), (0, 0, 0), (1024, 1024))
    with pytest.raises(ValueError, match="original_size_hw"):
        sdxl_size_embedding(pooled, torch.zeros(2, 2), (0, 0), (1024, 1024))


def test_y_is_required_exactly_with_adm_in_channels(tiny_pair):
    ours, _ = tiny_pair
    inputs = _inputs(seed=14)
    with pytest.raises(ValueError, match="adm_in_channels=1560"):
        ours(inputs["x"], inputs["t"], inputs["context"])
    sd1_like = SdUNet(SdUNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=40))
    with pytest.raises(ValueError, match="adm_in_channels=None"):
        sd1_like(inputs["x"], inputs["t"], inputs["context"], torch.zeros(2, 8))
    with pytest.raises(ValueError, match="adm_in_channels"):
        SdxlUNet(SdUNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=40))


def test_full_size_layout_matches_published_diffusers_sdxl():
    with torch.device("meta"):
        ours = SdxlUNet(SDXL_UNET_CONFIG).state_dict()
        theirs = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG).state_dict()
    converted = convert_ldm_unet_checkpoint(prefixed(ours), SDXL_BASE_UNET_CONFIG)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert sum(v.numel() for v in ours.values()) == 2_567_463_684  # the published SDXL U-Net size
    assert infer_unet_config(ours) == SDXL_UNET_CONFIG


@pytest.mark.parametrize("config", [TINY_SDXL, SDXL_UNET_CONFIG], ids=["tiny", "sdxl"])
def test_key_adapter_agrees_with_diffusers_converter(config):
    """Every key, label_emb and the multi-block transformers included, renames as diffusers' converter does."""
    with torch.device("meta"):
        keys = list(SdxlUNet(config).state_dict())
    traced = {PREFIX + key: torch.tensor([i]) for i, key in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(traced, {"layers_per_block": 2, "addition_embed_type": "text_time"})
    expected = {keys[int(value)]: diffusers_key for diffusers_key, value in converted.items()}
    assert len(expected) == len(keys) == len(converted)
    assert expected["label_emb.0.2.weight"] == "add_embedding.linear_2.weight"
    for key in keys:
        assert ldm_to_diffusers_unet_key(key, config) == expected[key]
        assert diffusers_to_ldm_unet_key(expected[key], config) == key


def test_state_dict_from_diffusers_loads_back(tiny_pair):
    ours, theirs = tiny_pair
    restored = unet_state_dict_from_diffusers(theirs.state_dict(), TINY_SDXL)
    original = ours.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[key], original[key]) for key in original)


def test_infer_config_round_trips_tiny_layout():
    with torch.device("meta"):
        sd = SdxlUNet(TINY_SDXL).state_dict()
    inferred = infer_unet_config(sd)
    assert inferred.transformer_depth == (0, 2, 3) and inferred.adm_in_channels == 1560
    assert inferred.attention_levels == (1, 2) and inferred.context_dim == 40
    middle_cut = {k: v for k, v in sd.items() if not k.startswith("middle_block.1.transformer_blocks.2.")}
    with pytest.raises(ValueError, match="middle block has 2 transformer blocks"):
        infer_unet_config(middle_cut)


def test_sdxl_lora_targets_are_sd_scripts_722_modules_with_sgm_names():
    with torch.device("meta"):
        unet = SdxlUNet(SDXL_UNET_CONFIG)
    layout = resolve_targets([], unet).denoiser
    assert layout is SDXL_UNET_TARGETS
    layers = find_target_layers(unet, layout, "lora_unet", with_conv=False)
    assert len(layers) == 722  # sd-scripts: "create LoRA for U-Net: 722 modules."
    names = {layer.lora_name: layer.block_index for layer in layers}
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == 5
    assert names["lora_unet_input_blocks_4_1_proj_in"] == 5
    assert names["lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"] == 11
    assert names["lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0"] == 13
    assert names["lora_unet_output_blocks_5_1_proj_out"] == 18
    assert not any(name.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_8_")) for name in names)


def test_sdxl_conv_lora_targets_are_the_diffusers_resnet_and_resampler_layers():
    """With conv_dim the layer set equals what the same containers hold in diffusers' SDXL U-Net."""
    with torch.device("meta"):
        unet = SdxlUNet(SDXL_UNET_CONFIG)
        theirs = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    ours = find_target_layers(unet, SDXL_UNET_TARGETS, "lora_unet", with_conv=True)
    reference = find_target_layers(theirs, DIFFUSERS_SD_UNET_TARGETS, "lora_unet", with_conv=True)
    paths = {id(module): path for path, module in unet.named_modules()}
    as_diffusers = {
        "lora_unet_" + ldm_to_diffusers_unet_key(paths[id(layer.module)], SDXL_UNET_CONFIG).replace(".", "_")
        for layer in ours
    }
    assert as_diffusers == {layer.lora_name for layer in reference}
    assert sum(layer.is_conv_kxk for layer in ours) == sum(layer.is_conv_kxk for layer in reference) > 0


def test_sd_unet_keeps_its_diffusers_named_layout():
    with torch.device("meta"):
        unet = SdUNet(SdUNetConfig())
    assert resolve_targets([], unet).denoiser is SD_UNET_TARGETS


def test_network_on_tiny_sdxl_unet_names_sgm_modules_and_numbers_23_blocks():
    network = create_network(1.0, 4, 1.0, None, [], SdxlUNet(TINY_SDXL), conv_dim="2")
    names = {lora.lora_name for lora in network.unet_loras}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # a 3x3 conv of a level-0 ResBlock
    assert not any("down_blocks" in name for name in names)
    # sd-scripts' SDXL block_dims: BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT; rank 0 drops a block.
    dims = ["4"] * 23
    dims[1 + 4] = "0"
    network = create_network(1.0, 4, 1.0, None, [], SdxlUNet(TINY_SDXL), block_dims=",".join(dims))
    names = {lora.lora_name for lora in network.unet_loras}
    assert "lora_unet_input_blocks_5_1_proj_in" in names
    assert not any(name.startswith("lora_unet_input_blocks_4_") for name in names)
