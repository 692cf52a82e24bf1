"""networks.lora on SD3: MMDiT targets and names (sd-scripts' rule, ComfyUI's key map), SD3 --network_args,
the CLIP-L / CLIP-G / T5 text-encoder LoRAs, and the file on a tiny real MMDiT."""

from __future__ import annotations

import copy
import importlib
import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from library.models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiT, MMDiTConfig
from networks.lora import LoRANetwork, create_network, create_network_from_weights
from networks.lora_config import NetworkArgsError

TINY_MMDIT = MMDiTConfig(depth=3, hidden_size=64, num_heads=1, adm_in_channels=16, context_in_dim=32, pos_embed_max_size=8,
                         qk_norm="rms", x_block_self_attn_layers=(0,))
TINY_CLIP_L = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16, projection_dim=12)
TINY_CLIP_G = CLIPTextConfig(vocab_size=99, hidden_size=40, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=16, projection_dim=20, hidden_act="gelu")
TINY_T5 = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")

# The MMDiT's embedders and final layer, by sd-scripts' emb_dims order, and their LoRA names.
EMB_NAMES = (
    ("lora_unet_context_embedder",),
    ("lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2"),
    ("lora_unet_x_embedder_proj",),
    ("lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2"),
    ("lora_unet_final_layer_adaLN_modulation_1",),
    ("lora_unet_final_layer_linear",),
)
CLIP_LAYER_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def _meta_mmdit(config: MMDiTConfig) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(config)


def _meta_network(*args, **kwargs) -> LoRANetwork:
    with torch.device("meta"):  # full-size LoRA weights are never looked at, only their shapes
        return create_network(*args, **kwargs)


def _names(loras) -> set[str]:
    return {lora.lora_name for lora in loras}


def _by_name(network: LoRANetwork) -> dict:
    return {lora.lora_name: lora for lora in network.text_encoder_loras + network.unet_loras}


def _kohya_name(prefix: str, key: str) -> str:
    return prefix + "_" + key.removesuffix(".weight").replace(".", "_")


def _rule_names(mmdit_sd: dict[str, Tensor]) -> set[str]:
    """sd-scripts' SD3 rule restated on checkpoint keys: every matrix weight (Linear) inside a joint block."""
    return {_kohya_name("lora_unet", k) for k, v in mmdit_sd.items()
            if k.startswith("joint_blocks.") and k.endswith(".weight") and v.dim() == 2}


def comfyui_sd3_names(mmdit_sd, clip_l_sd=None, clip_g_sd=None, t5_sd=None) -> dict[str, tuple[str, str]]:
    """The kohya-style LoRA names ComfyUI's SD3 key map accepts -> (model, weight key it patches).

    Facts from comfy/lora.py: lora_unet_<diffusion_model key> for every .weight of the MMDiT;
    lora_te1_ / lora_te2_ text_model_encoder_layers_<b>_<CLIP layer> for CLIP-L / CLIP-G (with CLIP-L
    present); lora_te3_<key> for every .weight of the T5 (te index 3 when both CLIPs are present).
    """
    accepted = {_kohya_name("lora_unet", k): ("mmdit", k) for k in mmdit_sd if k.endswith(".weight")}
    for prefix, model, sd in (("lora_te1", "clip_l", clip_l_sd), ("lora_te2", "clip_g", clip_g_sd)):
        for key in sd or {}:
            match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", key)
            if match and match.group(2) in CLIP_LAYER_MAP:
                accepted[_kohya_name(prefix, key)] = (model, key)
    for key in t5_sd or {}:
        if key.endswith(".weight"):
            accepted[_kohya_name("lora_te3", key)] = ("t5", key)
    return accepted


# ----------------------------------------------------------------------------- names on full-size models
@pytest.mark.parametrize("config, count", [(SD35_LARGE, 37 * 10 + 7), (SD35_MEDIUM, 23 * 10 + 7 + 13 * 2),
                                           (SD3_MEDIUM, 23 * 10 + 7)], ids=["sd35_large", "sd35_medium", "sd3_medium"])
def test_default_targets_are_every_joint_block_linear_with_comfyui_names(config, count):
    # Per block: x and context streams each qkv, proj, fc1, fc2, adaLN (10); the last context block is
    # pre-only (qkv, adaLN: 7 in that block); SD3.5 Medium adds attn2.qkv / attn2.proj on blocks 0-12.
    mmdit = _meta_mmdit(config)
    network = _meta_network(1.0, 4, 1.0, None, None, mmdit)
    mmdit_sd = mmdit.state_dict()
    names = _names(network.unet_loras)
    assert len(network.unet_loras) == count
    assert names == _rule_names(mmdit_sd)
    assert names <= set(comfyui_sd3_names(mmdit_sd))
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1",
            f"lora_unet_joint_blocks_{config.depth - 1}_context_block_attn_qkv"} <= names
    assert f"lora_unet_joint_blocks_{config.depth - 1}_context_block_mlp_fc1" not in names
    assert ("lora_unet_joint_blocks_12_x_block_attn2_qkv" in names) == (config is SD35_MEDIUM)
    qkv = _by_name(network)["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv.lora_down.weight.shape == (4, config.hidden_size) and qkv.lora_up.weight.shape == (3 * config.hidden_size, 4)


def test_emb_dims_add_exactly_the_embedders_and_final_layer():
    mmdit = _meta_mmdit(SD35_LARGE)
    base = _names(_meta_network(1.0, 4, 1.0, None, None, mmdit).unet_loras)
    network = _meta_network(1.0, 4, 2.0, None, None, mmdit, emb_dims="[2, 3, 5, 6, 7, 8]")
    modules = _by_name(network)
    assert set(modules) - base == {name for group in EMB_NAMES for name in group}
    assert set(modules) >= base and set(modules) <= set(comfyui_sd3_names(mmdit.state_dict()))
    for group, rank in zip(EMB_NAMES, (2, 3, 5, 6, 7, 8)):
        assert all(modules[name].lora_dim == rank and modules[name].scale == 2.0 / rank for name in group)
    patch = modules["lora_unet_x_embedder_proj"]  # the 2x2 / stride-2 patch conv keeps its kernel and stride
    assert patch.lora_down.weight.shape == (5, 16, 2, 2) and patch.lora_down.stride == (2, 2)
    assert patch.lora_up.weight.shape == (2432, 5, 1, 1)

    partial = _names(_meta_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="0,3,0,0,0,1").unet_loras) - base
    assert partial == {"lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2", "lora_unet_final_layer_linear"}
    # sd-scripts gives the patch conv conv_dim / conv_alpha when conv_dim is set.
    conv = _by_name(_meta_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="1,1,1,1,1,1", conv_dim="6", conv_alpha="3"))
    assert conv["lora_unet_x_embedder_proj"].lora_dim == 6 and conv["lora_unet_x_embedder_proj"].scale == 0.5


@pytest.mark.parametrize("value", ["1,2,3", "1,2,3,4,5,x", "1,2,3,4,5,-1"])
def test_emb_dims_need_six_ranks(value):
    with pytest.raises(NetworkArgsError, match="emb_dims.*6.*context_embedder"):
        _meta_network(1.0, 4, 1.0, None, None, _meta_mmdit(SD3_MEDIUM), emb_dims=value)


def _blocks(network: LoRANetwork) -> set[int]:
    return {int(m.group(1)) for lora in network.unet_loras if (m := re.match(r"lora_unet_joint_blocks_(\d+)_", lora.lora_name))}


def test_train_block_indices_keep_only_those_blocks():
    mmdit = _meta_mmdit(SD35_LARGE)
    network = _meta_network(1.0, 4, 1.0, None, None, mmdit, train_block_indices="0-2, 5,37", emb_dims="1,1,1,1,1,1")
    assert _blocks(network) == {0, 1, 2, 5, 37}
    assert len(network.unet_loras) == 4 * 10 + 7 + 8  # embedders are not in any block and stay
    assert _blocks(_meta_network(1.0, 4, 1.0, None, None, mmdit, train_block_indices="all")) == set(range(38))
    assert _meta_network(1.0, 4, 1.0, None, None, mmdit, train_block_indices="none").unet_loras == []


@pytest.mark.parametrize("value, message", [("38", "block 38 does not exist.*0-37"), ("3-1", "not a valid range"),
                                            ("a-b", "'a-b' is not an index")])
def test_bad_train_block_indices_are_clear_errors(value, message):
    with pytest.raises(NetworkArgsError, match=f"train_block_indices.*{message}"):
        _meta_network(1.0, 4, 1.0, None, None, _meta_mmdit(SD35_LARGE), train_block_indices=value)


def test_per_part_dims_override_the_rank_and_zero_skips():
    network = _meta_network(1.0, 4, 1.0, None, None, _meta_mmdit(SD35_MEDIUM), x_attn_dim="8", context_mlp_dim="0",
                            x_mod_dim="2", context_mod_dim="4")
    modules = _by_name(network)
    shapes = {name: (lora.lora_down.weight.shape, lora.lora_up.weight.shape) for name, lora in modules.items()}
    d = 1536
    assert shapes["lora_unet_joint_blocks_3_x_block_attn_qkv"] == ((8, d), (3 * d, 8))
    assert shapes["lora_unet_joint_blocks_3_x_block_attn_proj"] == ((8, d), (d, 8))
    assert shapes["lora_unet_joint_blocks_12_x_block_attn2_qkv"] == ((8, d), (3 * d, 8))  # attn2 is x attention too
    assert shapes["lora_unet_joint_blocks_12_x_block_adaLN_modulation_1"] == ((2, d), (9 * d, 2))
    assert shapes["lora_unet_joint_blocks_13_x_block_adaLN_modulation_1"] == ((2, d), (6 * d, 2))
    assert shapes["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"] == ((4, d), (2 * d, 4))
    assert shapes["lora_unet_joint_blocks_3_x_block_mlp_fc1"] == ((4, d), (4 * d, 4))  # not overridden
    assert shapes["lora_unet_joint_blocks_3_context_block_attn_proj"] == ((4, d), (d, 4))
    assert not any("context_block_mlp" in name for name in modules)
    assert len(modules) == 263 - 23 * 2


def test_family_args_belong_to_their_family():
    mmdit = _meta_mmdit(SD3_MEDIUM)
    with pytest.raises(NetworkArgsError, match="block_dims.*train_block_indices"):
        _meta_network(1.0, 4, 1.0, None, None, mmdit, block_dims=",".join(["4"] * 24))
    with pytest.raises(NetworkArgsError, match="split_qkv=True is not supported"):
        _meta_network(1.0, 4, 1.0, None, None, mmdit, split_qkv="True")
    with pytest.raises(NetworkArgsError, match="x_attn_dim.*integer"):
        _meta_network(1.0, 4, 1.0, None, None, mmdit, x_attn_dim="big")


# ----------------------------------------------------------------------------- text encoders
def _full_size_text_encoders() -> list[nn.Module]:
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
    return [clip_l, clip_g, t5]


def test_text_encoder_prefixes_and_t5_only_with_train_t5xxl():
    encoders = _full_size_text_encoders()
    mmdit = _meta_mmdit(SD3_MEDIUM)
    accepted = comfyui_sd3_names(mmdit.state_dict(), *(encoder.state_dict() for encoder in encoders))
    network = _meta_network(1.0, 4, 1.0, None, encoders, mmdit)
    assert [len(group) for group in network.text_encoder_groups] == [12 * 6, 32 * 6, 0] and not network.train_t5xxl
    with_t5 = _meta_network(1.0, 4, 1.0, None, encoders, mmdit, train_t5xxl="True")
    assert [len(group) for group in with_t5.text_encoder_groups] == [12 * 6, 32 * 6, 24 * 7] and with_t5.train_t5xxl
    names = _names(with_t5.text_encoder_loras)
    assert names <= set(accepted)
    t5_rule = {_kohya_name("lora_te3", k) for k in encoders[2].state_dict()
               if re.fullmatch(r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))\.weight", k)}
    assert {name for name in names if name.startswith("lora_te3_")} == t5_rule
    assert {"lora_te1_text_model_encoder_layers_11_mlp_fc2", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1"} <= names
    assert not any("text_projection" in name or "relative_attention_bias" in name for name in names)
    assert _names(_meta_network(1.0, 4, 1.0, None, [encoders[0], encoders[1], None], mmdit, train_t5xxl="True")
                  .text_encoder_loras) == names - t5_rule
    with pytest.raises(NetworkArgsError, match="train_t5xxl='yes'.*True or False"):
        _meta_network(1.0, 4, 1.0, None, encoders, mmdit, train_t5xxl="yes")


def _tiny_models(seed: int = 0) -> tuple[list[nn.Module], MMDiT]:
    torch.manual_seed(seed)
    encoders = [CLIPTextModelWithProjection(TINY_CLIP_L).eval(), CLIPTextModelWithProjection(TINY_CLIP_G).eval(),
                T5EncoderModel(TINY_T5).eval()]
    mmdit = MMDiT(TINY_MMDIT).eval()
    with torch.no_grad():
        mmdit.pos_embed.normal_()  # zero until a checkpoint fills it
    return encoders, mmdit


def _param_ids(loras) -> set[int]:
    return {id(p) for lora in loras for p in lora.parameters()}


def test_text_encoder_lr_lists_of_up_to_three_values():
    encoders, mmdit = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, encoders, mmdit, train_t5xxl="True")
    te1, te2, te3 = (_param_ids(group) for group in network.text_encoder_groups)
    unet = _param_ids(network.unet_loras)

    def groups(text_encoder_lr):
        params, descriptions = network.prepare_optimizer_params(text_encoder_lr, 1e-4, 1e-3)
        return [(d, g["lr"], {id(p) for p in g["params"]}) for d, g in zip(descriptions, params)]

    assert groups([1e-5, 2e-5, 3e-5]) == [("textencoder 1", 1e-5, te1), ("textencoder 2", 2e-5, te2),
                                          ("textencoder 3", 3e-5, te3), ("unet", 1e-4, unet)]
    # sd-scripts: one value for all three; two values -> the second also for T5; none -> the default lr.
    assert [lr for _, lr, _ in groups([4e-5])] == [4e-5, 4e-5, 4e-5, 1e-4]
    assert [lr for _, lr, _ in groups([1e-5, 2e-5])] == [1e-5, 2e-5, 2e-5, 1e-4]
    assert [lr for _, lr, _ in groups(None)] == [1e-3, 1e-3, 1e-3, 1e-4]
    assert [d for d, _, _ in groups([1e-5, 0.0, 3e-5])] == ["textencoder 1", "textencoder 3", "unet"]
    no_t5 = create_network(1.0, 4, 1.0, None, encoders, mmdit)
    assert no_t5.prepare_optimizer_params([1e-5, 2e-5, 3e-5], 1e-4, 1e-3)[1] == ["textencoder 1", "textencoder 2", "unet"]


# ----------------------------------------------------------------------------- the file on a tiny MMDiT
def _randomize(network: LoRANetwork, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in network.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def _run(encoders: list[nn.Module], mmdit: MMDiT) -> list[Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (2, 8), generator=generator)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    context = torch.randn(2, 5, TINY_MMDIT.context_in_dim, generator=generator)
    y = torch.randn(2, TINY_MMDIT.adm_in_channels, generator=generator)
    with torch.no_grad():
        texts = [encoder(ids).last_hidden_state for encoder in encoders]
        return texts + [mmdit(latents, torch.tensor([30.0, 870.0]), context, y)]


SD3_ARGS = {"emb_dims": "2,3,4,5,6,7", "x_attn_dim": "6", "context_mod_dim": "3", "train_block_indices": "0,2",
            "train_t5xxl": "True"}


def _trained_network(encoders, mmdit) -> LoRANetwork:
    network = create_network(0.8, 4, 2.0, None, encoders, mmdit, **SD3_ARGS)
    network.apply_to(encoders, mmdit)
    _randomize(network)
    return network


def test_save_load_round_trip_keeps_names_ranks_and_t5(tmp_path):
    encoders, mmdit = _tiny_models()
    network = _trained_network(encoders, mmdit)
    path = tmp_path / "sd3_lora.safetensors"
    network.save_weights(str(path), torch.bfloat16, {"ss_network_args": "{}"})
    saved = load_file(str(path))
    assert set(saved) == {f"{name}.{leaf}" for name in _by_name(network) for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}

    fresh_encoders, fresh_mmdit = _tiny_models()
    restored, _ = create_network_from_weights(0.8, str(path), None, fresh_encoders, fresh_mmdit)
    assert restored.train_t5xxl  # T5 modules come back from the file without train_t5xxl=True
    expected = {k: (v.shape, float(v) if k.endswith("alpha") else None) for k, v in network.state_dict().items()}
    assert {k: (v.shape, float(v) if k.endswith("alpha") else None) for k, v in restored.state_dict().items()} == expected
    info = restored.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for key, value in network.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_merged_weights_reproduce_the_runtime_lora(tmp_path):
    encoders, mmdit = _tiny_models()
    base = _run(encoders, mmdit)
    merged_encoders, merged_mmdit = copy.deepcopy(encoders), copy.deepcopy(mmdit)
    network = _trained_network(encoders, mmdit)
    runtime = _run(encoders, mmdit)
    assert all(not torch.allclose(a, b) for a, b in zip(runtime, base))  # every model is changed
    path = tmp_path / "sd3_lora.safetensors"
    network.save_weights(str(path), None, None)

    restored, weights = create_network_from_weights(0.8, str(path), None, merged_encoders, merged_mmdit)
    restored.merge_to(merged_encoders, merged_mmdit, weights, torch.float32, "cpu")
    for merged, expected in zip(_run(merged_encoders, merged_mmdit), runtime):
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_file_applied_by_comfyui_key_map_matches_runtime(tmp_path):
    """Patch weights the way ComfyUI does (name -> weight key from its SD3 map, W += s * alpha/rank * up@down):
    an independent reader of the file that must consume every module and reproduce our output."""
    encoders, mmdit = _tiny_models()
    reference = {"clip_l": copy.deepcopy(encoders[0]), "clip_g": copy.deepcopy(encoders[1]),
                 "t5": copy.deepcopy(encoders[2]), "mmdit": copy.deepcopy(mmdit)}
    network = _trained_network(encoders, mmdit)
    runtime = _run(encoders, mmdit)
    path = tmp_path / "sd3_lora.safetensors"
    network.save_weights(str(path), None, None)

    lora = load_file(str(path))
    accepted = comfyui_sd3_names(*(reference[m].state_dict() for m in ("mmdit", "clip_l", "clip_g", "t5")))
    names = {key.split(".")[0] for key in lora}
    assert names <= set(accepted)
    assert any(name.startswith("lora_te3_") for name in names) and "lora_unet_x_embedder_proj" in names
    with torch.no_grad():
        for name in names:
            model, key = accepted[name]
            weight = reference[model].get_parameter(key)
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            scale = 0.8 * float(lora[f"{name}.alpha"]) / down.shape[0]
            weight += (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    patched = _run([reference["clip_l"], reference["clip_g"], reference["t5"]], reference["mmdit"])
    for actual, expected in zip(patched, runtime):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_lora_trains_through_gradient_checkpointed_mmdit():
    _, mmdit = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="1,1,1,1,1,1")
    network.apply_to(None, mmdit)
    network.prepare_grad_etc(None, mmdit)
    mmdit.requires_grad_(False)
    mmdit.set_gradient_checkpointing(True)
    mmdit.train()
    generator = torch.Generator().manual_seed(3)
    out = mmdit(torch.randn(1, 16, 4, 4, generator=generator), torch.tensor([500.0]),
                torch.randn(1, 3, 32, generator=generator), torch.randn(1, 16, generator=generator))
    out.square().mean().backward()
    # lora_up starts at zero, so only up weights get a gradient on the first step; every module must get one.
    assert all(lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0 for lora in network.unet_loras)
    assert all(p.grad is None for p in mmdit.parameters())


def test_lora_sd3_module_is_the_same_network():
    alias = importlib.import_module("networks.lora_sd3")
    assert alias.create_network is create_network and alias.create_network_from_weights is create_network_from_weights


def test_verbose_logs_every_module_and_the_skipped_ones(caplog):
    _, mmdit = _tiny_models()
    with caplog.at_level(logging.INFO, logger="networks.lora"):
        create_network(1.0, 4, 1.0, None, None, mmdit, context_mlp_dim="0", verbose="True")
    assert "lora_unet_joint_blocks_1_x_block_attn_qkv" in caplog.text and "rank 4, alpha 1" in caplog.text
    assert "skipped because their rank is 0: lora_unet_joint_blocks_0_context_block_mlp_fc1" in caplog.text
