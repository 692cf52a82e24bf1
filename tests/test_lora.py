"""networks.lora: LoRA module math, the SD1/2 target layout and names, and the sd-scripts network contract."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.sd_unet import SdUNet, SdUNetConfig
from networks.lora import (
    LoRAModule,
    LoRANetwork,
    create_network,
    create_network_from_weights,
    lora_delta_weight,
    max_norm_ratio,
)
from networks.lora_config import NetworkArgsError, RankPlan
from networks.lora_targets import ModuleTargets, NetworkTargets, UnsupportedModelError, sd_unet_block_index

TINY_UNET = SdUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                         context_dim=32, norm_groups=8)
TINY_CLIP = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16)


def _tiny_models(seed: int = 0) -> tuple[CLIPTextModel, SdUNet]:
    torch.manual_seed(seed)
    return CLIPTextModel(TINY_CLIP).eval(), SdUNet(TINY_UNET).eval()


def _randomize_lora(network: LoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def _run(text_encoder: CLIPTextModel, unet: SdUNet) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TINY_CLIP.vocab_size, (2, 8), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 8, TINY_UNET.context_dim, generator=generator)
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state, unet(latents, torch.tensor([10, 500]), context)


# ----------------------------------------------------------------------------- one module
def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(6, 5), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1)]


def _input_for(layer: nn.Module) -> torch.Tensor:
    return torch.randn(3, 7, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 4, 9, 9)


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv3x3_stride2", "conv1x1"])
def test_fresh_lora_leaves_output_unchanged_and_shapes_follow_the_layer(layer):
    x = _input_for(layer)
    expected = layer(x)
    lora = LoRAModule("lora_test", layer, lora_dim=3, alpha=1.0)
    lora.apply_to()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert not torch.all(lora.lora_down.weight == 0)
    if isinstance(layer, nn.Conv2d):
        assert lora.lora_down.weight.shape == (3, 4, *layer.kernel_size)
        assert lora.lora_up.weight.shape == (6, 3, 1, 1)
        assert lora.lora_down.stride == layer.stride and lora.lora_down.padding == layer.padding


def test_forward_adds_up_down_times_multiplier_and_alpha_over_rank():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    lora = LoRAModule("lora_test", layer, multiplier=0.75, lora_dim=4, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(3, 6)
    down, up = lora.lora_down.weight, lora.lora_up.weight
    expected = x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * 0.75 * (2.0 / 4)
    torch.testing.assert_close(layer(x), expected)
    assert lora.scale == 0.5 and float(lora.alpha) == 2.0


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 6), (2, 2, 3, 6)], ids=["2d", "tokens", "4d"])
def test_linear_lora_is_one_fused_add_with_the_same_values_and_gradients(shape):
    """A Linear LoRA adds s * lx @ up^T inside one addmm (no separate mul and add kernels); values and
    gradients equal the plain formula, and under bf16 autocast the output stays bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    lora = LoRAModule("lora_test", layer, multiplier=0.75, lora_dim=4, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(shape, requires_grad=True)
    with Ops() as ops:
        out = layer(x)
    assert ops.names.count("mul") == 0 and ops.names.count("add") == 0 and "addmm" in ops.names
    down, up = lora.lora_down.weight, lora.lora_up.weight
    expected = x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * 0.75 * 0.5
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, down, up))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, down, up))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = layer(x)
    assert half.dtype == torch.bfloat16 and half.shape == expected.shape
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=2e-2)


def test_half_precision_casts_are_made_once_per_step_and_reused_by_the_checkpoint_recompute(monkeypatch):
    """Under autocast a Linear LoRA's fp32 weights are cast once in the forward and the same casts serve
    gradient checkpointing's recompute in backward; gradients equal casting at every use; the casts are let go
    after backward, recast after an optimizer step, and never kept under no_grad."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
    loras = [LoRAModule(f"lora_{i}", layer, lora_dim=4, alpha=2.0) for i, layer in enumerate(layers)]
    for lora in loras:
        nn.init.normal_(lora.lora_up.weight)
        lora.apply_to()
    weights = {id(p): name for lora in loras for name, p in lora.named_parameters(prefix=lora.lora_name)}
    x = torch.randn(2, 3, 8)

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.of = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and id(args[0]) in weights:
                self.of.append(weights[id(args[0])])
            return func(*args, **(kwargs or {}))

    def step() -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = checkpoint(lambda t: layers[1](torch.relu(layers[0](t))), x, use_reentrant=False)
        out.float().square().sum().backward()
        grads = [p.grad.clone() for lora in loras for p in lora.parameters()]
        for lora in loras:
            lora.zero_grad(set_to_none=True)
        return grads

    with Casts() as casts:
        grads = step()
    assert sorted(casts.of) == sorted(weights.values())  # each weight cast once, not again in the recompute
    assert all(lora._casts is None for lora in loras)  # released after backward

    with torch.no_grad():
        for lora in loras:
            lora.lora_up.weight.mul_(2.0)  # an optimizer step: a new version of the weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layers[0](x)
    assert loras[0]._casts is None  # nothing kept without gradients
    with Casts() as casts:
        doubled = step()
    assert sorted(casts.of) == sorted(weights.values())  # the changed weights were cast anew

    monkeypatch.setattr(LoRAModule, "_linear_weights", lambda self, x: (self.lora_down.weight, self.lora_up.weight))
    for got, expected in zip(doubled, step()):
        torch.testing.assert_close(got, expected)
    assert not all(torch.equal(a, b) for a, b in zip(grads, doubled))
    monkeypatch.undo()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layers[0](x)  # gradients on, no backward: the casts stay...
    assert loras[0]._casts is not None
    with torch.no_grad():
        loras[0].lora_up.weight.mul_(3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = layers[0](x)  # ...but a changed weight is not served from them
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("alpha", [None, 0, torch.tensor(0.0)])
def test_missing_alpha_means_alpha_equals_rank(alpha):
    lora = LoRAModule("lora_test", nn.Linear(6, 5), lora_dim=4, alpha=alpha)
    assert lora.scale == 1.0 and float(lora.alpha) == 4.0


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv3x3_stride2", "conv1x1"])
def test_merged_weight_reproduces_runtime_lora(layer):
    x = _input_for(layer)
    lora = LoRAModule("lora_test", layer, multiplier=0.6, lora_dim=3, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    runtime = layer(x)
    lora.merge_to()
    assert not lora.is_applied
    torch.testing.assert_close(layer(x), runtime, rtol=1e-5, atol=1e-5)


def test_conv_delta_matches_composed_convolution_kernel():
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 4, 3, 3, generator=generator), torch.randn(6, 3, 1, 1, generator=generator)
    # Independent route: convolve the transposed down kernel with the 1x1 up kernel.
    expected = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * 0.25
    torch.testing.assert_close(lora_delta_weight(down, up, 0.25), expected)


def test_dropouts_act_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    lora = LoRAModule("lora_test", layer, lora_dim=4, alpha=4.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(5, 8)
    exact = x @ layer.weight.T + layer.bias + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    lora.eval()
    torch.testing.assert_close(layer(x), exact)
    lora.train()
    outputs = [layer(x) for _ in range(8)]
    assert any(not torch.allclose(out, exact) for out in outputs)


def test_module_dropout_skips_the_whole_lora():
    layer = nn.Linear(8, 6)
    lora = LoRAModule("lora_test", layer, lora_dim=4, module_dropout=1.0)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(8, 6, 3, padding=1)], ids=["linear_tokens", "conv"])
def test_rank_dropout_masks_ranks_per_sample_and_rescales(layer):
    lora = LoRAModule("lora_test", layer, multiplier=1.0, lora_dim=4, alpha=2.0, rank_dropout=0.25).train()
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    # One mask per sample and rank, shared by all tokens (Linear) or pixels (conv) of that sample.
    x = torch.randn(3, 5, 8) if isinstance(layer, nn.Linear) else torch.randn(3, 8, 5, 5)
    torch.manual_seed(123)
    actual = layer(x)
    torch.manual_seed(123)
    keep = (torch.rand(3, 4) > 0.25).float()
    if isinstance(layer, nn.Linear):
        hidden = (x @ lora.lora_down.weight.T) * keep[:, None, :]
        update = hidden @ lora.lora_up.weight.T
        base = F.linear(x, layer.weight, layer.bias)
    else:
        hidden = F.conv2d(x, lora.lora_down.weight, padding=1) * keep[:, :, None, None]
        update = F.conv2d(hidden, lora.lora_up.weight)
        base = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(actual, base + update * (2.0 / 4) / 0.75)


def test_rank_dropout_keeps_the_expected_update_on_conv():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    lora = LoRAModule("lora_test", layer, lora_dim=8, alpha=8.0, rank_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(1, 3, 4, 4).expand(4000, 3, 4, 4)
    lora.eval()
    exact = layer(x[:1])
    torch.manual_seed(0)
    lora.train()
    mean = layer(x).mean(dim=0, keepdim=True)
    delta = (exact - F.conv2d(x[:1], layer.weight, layer.bias, padding=1)).detach()
    assert torch.allclose(mean, exact, atol=0.06 * float(delta.abs().max()))


def test_neuron_dropout_drops_down_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    lora = LoRAModule("lora_test", layer, lora_dim=4, alpha=4.0, dropout=0.3).train()
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(5, 8)
    torch.manual_seed(9)
    actual = layer(x)
    torch.manual_seed(9)
    expected = F.linear(x, layer.weight, layer.bias) + F.dropout(x @ lora.lora_down.weight.T, 0.3) @ lora.lora_up.weight.T
    torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------------- SD1/2 targets and names
def _full_size_models(diffusers_unet: bool = False):
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig())
        unet = UNet2DConditionModel(cross_attention_dim=768) if diffusers_unet else SdUNet(SdUNetConfig())
    return text_encoder, unet


def _names(network: LoRANetwork) -> set[str]:
    return {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}


def test_sd15_module_counts_and_names_match_sd_scripts_on_diffusers_unet():
    text_encoder, unet = _full_size_models()
    _, diffusers_unet = _full_size_models(diffusers_unet=True)
    ours = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    reference = create_network(1.0, 4, 1.0, None, text_encoder, diffusers_unet)
    assert len(ours.unet_loras) == 192 and len(ours.text_encoder_loras) == 72
    assert _names(ours) == _names(reference)
    assert {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
    } <= _names(ours)


def test_conv_dim_adds_resnet_and_resampler_layers_as_sd_scripts():
    text_encoder, unet = _full_size_models()
    _, diffusers_unet = _full_size_models(diffusers_unet=True)
    ours = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2", conv_alpha="0.5")
    reference = create_network(1.0, 4, 1.0, None, text_encoder, diffusers_unet, conv_dim="2", conv_alpha="0.5")
    assert len(ours.unet_loras) == 278 and _names(ours) == _names(reference)
    modules = {lora.lora_name: lora for lora in ours.unet_loras}
    down = modules["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.weight.shape == (2, 320, 3, 3) and down.lora_up.weight.shape == (320, 2, 1, 1)
    assert down.lora_down.stride == (2, 2) and down.scale == 0.25
    assert modules["lora_unet_up_blocks_0_upsamplers_0_conv"].lora_down.weight.shape == (2, 1280, 3, 3)
    assert modules["lora_unet_down_blocks_1_resnets_0_conv1"].lora_dim == 2
    # Linear / 1x1 layers of ResNet blocks get the base rank, as sd-scripts' C3Lier.
    assert modules["lora_unet_down_blocks_1_resnets_0_time_emb_proj"].lora_dim == 4
    assert modules["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].lora_down.weight.shape == (4, 320, 1, 1)


def test_tiny_unet_names_match_diffusers_layout():
    text_encoder, unet = _tiny_models()
    diffusers_unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    ours = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="4")
    reference = create_network(1.0, 4, 1.0, None, text_encoder, diffusers_unet, conv_dim="4")
    assert _names(ours) == _names(reference)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("path, block", [
    ("down_blocks.0.attentions.0.proj_in", 1), ("down_blocks.0.resnets.1.conv1", 2),
    ("down_blocks.0.downsamplers.0.conv", 3), ("down_blocks.3.resnets.1.conv2", 11),
    ("mid_block.attentions.0.proj_out", 12), ("up_blocks.0.resnets.0.conv1", 13),
    ("up_blocks.0.upsamplers.0.conv", 15), ("up_blocks.1.attentions.0.proj_in", 16),
    ("up_blocks.3.attentions.2.proj_out", 24), ("conv_in", None), ("time_embedding.linear_1", None),
])
def test_sd_block_ids(path, block):
    assert sd_unet_block_index(path) == block


def test_block_dims_set_per_block_ranks_and_alphas():
    text_encoder, unet = _full_size_models()
    dims = ",".join(str(i + 1) for i in range(25))
    alphas = ",".join(str((i + 1) / 2) for i in range(25))
    conv_dims = ",".join(str(0 if i == 24 else 30 - i) for i in range(25))
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, block_dims=dims, block_alphas=alphas,
                             conv_block_dims=conv_dims)
    modules = {lora.lora_name: lora for lora in network.unet_loras}
    for name, block in [("down_blocks_0_attentions_0_proj_in", 1), ("down_blocks_1_attentions_1_proj_out", 5),
                        ("mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 12),
                        ("up_blocks_1_attentions_0_proj_in", 16), ("up_blocks_3_attentions_2_proj_out", 24)]:
        lora = modules["lora_unet_" + name]
        assert (lora.lora_dim, float(lora.alpha)) == (block + 1, (block + 1) / 2)
    assert modules["lora_unet_down_blocks_0_downsamplers_0_conv"].lora_dim == 30 - 3
    assert modules["lora_unet_down_blocks_3_resnets_1_conv2"].lora_dim == 30 - 11
    assert modules["lora_unet_up_blocks_0_upsamplers_0_conv"].lora_dim == 30 - 15
    assert float(modules["lora_unet_up_blocks_0_upsamplers_0_conv"].alpha) == 1.0  # conv_alpha default
    assert "lora_unet_up_blocks_3_resnets_2_conv1" not in modules  # rank 0 skips the layer
    assert all(lora.lora_dim == 4 for lora in network.text_encoder_loras)  # text encoders keep network_dim


def test_block_dims_need_one_value_per_block():
    text_encoder, unet = _full_size_models()
    with pytest.raises(NetworkArgsError, match="block_dims.*25"):
        create_network(1.0, 4, 1.0, None, text_encoder, unet, block_dims="4,4,4")


def test_bad_network_args_name_the_key():
    text_encoder, unet = _tiny_models()
    with pytest.raises(NetworkArgsError, match="conv_dim"):
        create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="four")
    with pytest.raises(NetworkArgsError, match="rank_dropout"):
        create_network(1.0, 4, 1.0, None, text_encoder, unet, rank_dropout="1.5")


def test_unknown_network_args_are_warned_by_name(caplog):
    text_encoder, unet = _tiny_models()
    with caplog.at_level(logging.WARNING, logger="networks.lora_config"):
        create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2", use_tucker="True", foo="1")
    assert "foo, use_tucker" in caplog.text and "conv_dim" not in caplog.text


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="Linear.*SdUNet"):
        create_network(1.0, 4, 1.0, None, None, nn.Linear(2, 2))


def test_several_text_encoders_are_numbered():
    torch.manual_seed(0)
    encoders = [CLIPTextModel(TINY_CLIP), CLIPTextModel(TINY_CLIP)]
    network = create_network(1.0, 4, 1.0, None, encoders, None)
    names = _names(network)
    assert len(names) == 2 * 2 * 6
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names


class JointBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


class ToyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.joint_blocks = nn.ModuleList([JointBlock(), JointBlock()])
        self.final_layer = nn.Linear(4, 4)


def test_a_family_is_just_a_target_list():
    targets = NetworkTargets(ModuleTargets(prefix="lora_unet", container_classes=frozenset({"JointBlock"})), ())
    network = LoRANetwork(None, ToyTransformer(), RankPlan(dim=2, alpha=1.0), targets=targets)
    assert _names(network) == {f"lora_unet_joint_blocks_{i}_{layer}" for i in range(2) for layer in ("attn", "mlp_0", "mlp_2")}


# ----------------------------------------------------------------------------- the network on real models
def test_only_lora_weights_are_trainable_and_saved():
    text_encoder, unet = _tiny_models()
    base_keys = set(unet.state_dict()) | set(text_encoder.state_dict())
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2")
    network.apply_to(text_encoder, unet)
    network.prepare_grad_etc(text_encoder, unet)
    assert set(unet.state_dict()) | set(text_encoder.state_dict()) == base_keys
    loras = network.text_encoder_loras + network.unet_loras
    expected = {f"{lora.lora_name}.{leaf}" for lora in loras for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(network.state_dict()) == expected
    lora_params = {id(p) for lora in loras for p in (lora.lora_down.weight, lora.lora_up.weight)}
    assert {id(p) for p in network.get_trainable_params()} == lora_params
    assert all(p.requires_grad for p in network.parameters())
    assert not lora_params & {id(p) for p in list(unet.parameters()) + list(text_encoder.parameters())}


def test_applied_network_changes_outputs_and_multiplier_scales_the_change():
    text_encoder, unet = _tiny_models()
    base_text, base_unet = _run(text_encoder, unet)
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    torch.testing.assert_close(_run(text_encoder, unet)[1], base_unet, rtol=0, atol=0)  # zero up: no change
    _randomize_lora(network)
    network.set_multiplier(0.0)
    torch.testing.assert_close(_run(text_encoder, unet)[1], base_unet, rtol=0, atol=0)
    network.set_multiplier(1.0)
    changed_text, changed_unet = _run(text_encoder, unet)
    assert not torch.allclose(changed_text, base_text) and not torch.allclose(changed_unet, base_unet)


def test_apply_to_without_text_encoder_drops_its_modules():
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == []
    assert all(key.startswith("lora_unet_") for key in network.state_dict())
    assert all("forward" not in module.__dict__ for module in text_encoder.modules())
    assert "forward" in unet.input_blocks[1][1].proj_in.__dict__


@pytest.mark.parametrize("suffix, dtype", [(".safetensors", torch.float16), (".pt", None)])
def test_save_load_round_trip(tmp_path, suffix, dtype):
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 2.0, None, text_encoder, unet, conv_dim="2")
    _randomize_lora(network)
    path = tmp_path / f"lora{suffix}"
    network.save_weights(str(path), dtype, {"ss_network_dim": "4"})
    if suffix == ".safetensors":
        with safe_open(str(path), "pt") as file:
            assert file.metadata()["ss_network_dim"] == "4" and len(file.metadata()["sshs_model_hash"]) == 64
            assert {file.get_tensor(key).dtype for key in file.keys()} == {torch.float16}
    fresh = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2")
    info = fresh.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for key, value in network.state_dict().items():
        expected = value.to(dtype).float() if dtype else value
        torch.testing.assert_close(fresh.state_dict()[key].float(), expected, rtol=0, atol=0)
    assert all(lora.scale == 2.0 / lora.lora_dim for lora in fresh.text_encoder_loras)  # the file's alpha


def test_load_weights_missing_file_names_it(tmp_path):
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        network.load_weights(str(tmp_path / "nope.safetensors"))


def test_network_from_weights_restores_ranks_and_merging_reproduces_runtime(tmp_path):
    text_encoder, unet = _tiny_models()
    base_text, base_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    dims = ",".join(str(1 + i % 4) for i in range(25))
    alphas = ",".join(str(0.5 + i % 3) for i in range(25))
    network = create_network(0.7, 4, 1.0, None, text_encoder, unet, block_dims=dims, block_alphas=alphas, conv_dim="3",
                             conv_alpha="1.5")
    network.apply_to(text_encoder, unet)
    _randomize_lora(network, std=0.2)
    runtime = _run(text_encoder, unet)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, None)

    restored, weights = create_network_from_weights(0.7, str(path), None, base_text, base_unet)
    shapes = {k: (v.shape, float(v) if k.endswith("alpha") else None) for k, v in network.state_dict().items()}
    assert {k: (v.shape, float(v) if k.endswith("alpha") else None) for k, v in restored.state_dict().items()} == shapes
    assert restored.is_mergeable()
    restored.merge_to(base_text, base_unet, weights, torch.float32, "cpu")
    for merged, expected in zip(_run(base_text, base_unet), runtime):
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_network_from_weights_without_lora_tensors_is_an_error():
    text_encoder, unet = _tiny_models()
    with pytest.raises(ValueError, match="x.safetensors.*lora_down"):
        create_network_from_weights(1.0, "x.safetensors", None, text_encoder, unet, weights_sd={"foo": torch.zeros(1)})


# ----------------------------------------------------------------------------- optimizer groups
def _groups(network, *args):
    params, descriptions = network.prepare_optimizer_params(*args)
    return [(d, g.get("lr"), {id(p) for p in g["params"]}) for d, g in zip(descriptions, params)]


def _param_ids(loras, which=("lora_down", "lora_up")):
    return {id(getattr(lora, part).weight) for lora in loras for part in which}


def test_optimizer_groups_and_learning_rates():
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    te, un = _param_ids(network.text_encoder_loras), _param_ids(network.unet_loras)
    assert _groups(network, 1e-5, 1e-4, 1e-3) == [("textencoder", 1e-5, te), ("unet", 1e-4, un)]
    assert _groups(network, None, None, 1e-3) == [("textencoder", 1e-3, te), ("unet", 1e-3, un)]
    assert _groups(network, [], 2e-4, 1e-3) == [("textencoder", 1e-3, te), ("unet", 2e-4, un)]
    assert _groups(network, 0.0, 1e-4, 1e-3) == [("unet", 1e-4, un)]


def test_text_encoder_lr_list_gives_one_rate_per_encoder():
    torch.manual_seed(0)
    encoders = [CLIPTextModel(TINY_CLIP), CLIPTextModel(TINY_CLIP)]
    network = create_network(1.0, 4, 1.0, None, encoders, SdUNet(TINY_UNET))
    te1, te2 = (_param_ids(group) for group in network.text_encoder_groups)
    un = _param_ids(network.unet_loras)
    assert _groups(network, [1e-5, 2e-5], 1e-4, 1e-3) == [("textencoder 1", 1e-5, te1), ("textencoder 2", 2e-5, te2),
                                                          ("unet", 1e-4, un)]
    assert [lr for _, lr, _ in _groups(network, [3e-5], 1e-4, 1e-3)] == [3e-5, 3e-5, 1e-4]
    assert [lr for _, lr, _ in _groups(network, 4e-5, 1e-4, 1e-3)] == [4e-5, 4e-5, 1e-4]


def test_loraplus_puts_up_weights_in_a_faster_group():
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, loraplus_lr_ratio="16",
                             loraplus_text_encoder_lr_ratio="4")
    te, un = network.text_encoder_loras, network.unet_loras
    assert _groups(network, 1e-5, 1e-4, 1e-3) == [
        ("textencoder", 1e-5, _param_ids(te, ("lora_down",))), ("textencoder plus", 4e-5, _param_ids(te, ("lora_up",))),
        ("unet", 1e-4, _param_ids(un, ("lora_down",))), ("unet plus", 1.6e-3, _param_ids(un, ("lora_up",))),
    ]


# ----------------------------------------------------------------------------- --scale_weight_norms
def _reference_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    if down.dim() == 2:
        return up @ down * scale
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def test_max_norm_regularization_scales_exactly_like_the_formula():
    text_encoder, unet = _tiny_models()
    network = create_network(1.0, 4, 2.0, None, text_encoder, unet, conv_dim="2", conv_alpha="1")
    _randomize_lora(network, std=0.3)
    loras = network.text_encoder_loras + network.unet_loras
    before = {lora.lora_name: (lora.lora_down.weight.detach().clone(), lora.lora_up.weight.detach().clone()) for lora in loras}
    norms = {name: float(_reference_delta(d, u, float(lora.alpha) / d.shape[0]).norm())
             for lora in loras for name, (d, u) in [(lora.lora_name, before[lora.lora_name])]}
    limit = sorted(norms.values())[len(norms) // 2]  # about half the modules exceed it

    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")

    clipped = [min(norm, limit) for norm in norms.values()]
    assert keys_scaled == sum(norm > limit for norm in norms.values()) > 0
    assert mean_norm == pytest.approx(sum(clipped) / len(clipped), rel=1e-5)
    assert max_norm == pytest.approx(limit, rel=1e-5)
    for lora in loras:
        ratio = min(1.0, limit / norms[lora.lora_name])
        down, up = before[lora.lora_name]
        torch.testing.assert_close(lora.lora_down.weight, down * math.sqrt(ratio))
        torch.testing.assert_close(lora.lora_up.weight, up * math.sqrt(ratio))
    assert max_norm_ratio(3.0, 2.0) == pytest.approx(2.0 / 3.0) and max_norm_ratio(1.0, 2.0) == 1.0


# ----------------------------------------------------------------------------- the file in a reference reader
def test_lora_file_loads_into_diffusers_and_changes_it_like_ours(tmp_path):
    """diffusers' own kohya-format reader (with peft) is the oracle for the file: every module found, same output."""
    from diffusers import StableDiffusionPipeline

    from library.models.sd_unet_keys import ldm_to_diffusers_unet_key

    _, unet = _tiny_models()
    theirs = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8).eval()
    theirs.load_state_dict({ldm_to_diffusers_unet_key(k, TINY_UNET): v for k, v in unet.state_dict().items()})
    network = create_network(0.8, 4, 2.0, None, None, unet, conv_dim="2", conv_alpha="1")
    network.apply_to(None, unet)
    _randomize_lora(network, std=0.2)
    generator = torch.Generator().manual_seed(7)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 8, 32, generator=generator)
    timesteps = torch.tensor([10, 500])
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, None)

    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, theirs, adapter_name="ours")
    theirs.set_adapters(["ours"], weights=[0.8])
    adapted = [module for module in theirs.modules() if hasattr(module, "lora_A") and "ours" in module.lora_A]
    assert len(adapted) == len(network.unet_loras)
    with torch.no_grad():
        expected, actual = unet(latents, timesteps, context), theirs(latents, timesteps, context).sample
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
