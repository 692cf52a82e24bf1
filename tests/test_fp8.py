"""fp8 weight storage (--fp8_base): what is stored, what is computed, what autograd keeps, LoRA on top (Linear and Conv2d)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.fp8 import (
    FP8_DTYPE,
    Fp8Conv2d,
    Fp8Error,
    Fp8Layout,
    Fp8Linear,
    Fp8Parts,
    fp8_linear,
    move_keeping_fp8,
    store_linear_weights_in_fp8,
)
from networks.lora import LoRAModule


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(F.gelu(self.fc1(self.norm(x)))))


def _frozen_block(seed: int = 0) -> _Block:
    torch.manual_seed(seed)
    block = _Block()
    block.requires_grad_(False)
    return block


def test_frozen_linear_weights_are_stored_in_fp8_and_the_rest_is_untouched():
    block = _frozen_block()
    block.head.weight.requires_grad_(True)  # a trainable layer keeps its weight
    before = {k: v.clone() for k, v in block.state_dict().items()}
    fc1 = block.fc1

    assert store_linear_weights_in_fp8(block) == 2
    assert block.fc1 is fc1 and isinstance(block.fc1, Fp8Linear)
    assert block.fc1.weight.dtype == FP8_DTYPE and block.fc2.weight.dtype == FP8_DTYPE
    assert block.head.weight.dtype == torch.float32 and type(block.head) is nn.Linear
    assert block.fc1.bias.dtype == torch.float32 and block.norm.weight.dtype == torch.float32
    after = block.state_dict()
    assert list(after) == list(before)
    torch.testing.assert_close(after["fc1.weight"], before["fc1.weight"].to(FP8_DTYPE), rtol=0, atol=0)
    # e4m3 keeps 3 mantissa bits: normal numbers (>= 2**-6) round to within 1/16 of themselves.
    big = before["fc1.weight"].abs() >= 2**-6
    rel = (after["fc1.weight"].float() - before["fc1.weight"]).abs() / before["fc1.weight"].abs()
    assert rel[big].max() <= 1 / 16


def test_out_of_range_weights_saturate_instead_of_becoming_nan():
    layer = nn.Linear(2, 2).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1000.0, -1000.0], [0.5, 2.0]]))
    store_linear_weights_in_fp8(layer)
    assert layer.weight.float().tolist() == [[448.0, -448.0], [0.5, 2.0]]


def test_forward_equals_the_upcast_computation():
    block = _frozen_block()
    x = torch.randn(3, 5, 8)
    store_linear_weights_in_fp8(block)
    reference = _frozen_block()
    with torch.no_grad():
        for name in ("fc1", "fc2", "head"):
            getattr(reference, name).weight.copy_(getattr(block, name).weight.float())
    torch.testing.assert_close(block(x), reference(x), rtol=0, atol=0)


def test_under_autocast_the_layer_computes_in_the_autocast_dtype():
    torch.manual_seed(1)
    layer = nn.Linear(8, 4).requires_grad_(False)
    store_linear_weights_in_fp8(layer)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    expected = F.linear(x.bfloat16(), layer.weight.to(torch.bfloat16), layer.bias.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_backward_keeps_the_fp8_weight_not_an_upcast_copy():
    layer = nn.Linear(8, 4).requires_grad_(False)
    store_linear_weights_in_fp8(layer)
    x = torch.randn(2, 8, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.dtype for t in saved] == [FP8_DTYPE]
    assert saved[0].data_ptr() == layer.weight.data_ptr()
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ layer.weight.float(), rtol=1e-6, atol=1e-6)


def test_lora_applied_after_fp8_trains_like_lora_on_the_upcast_weights():
    torch.manual_seed(2)
    x = torch.randn(4, 8, requires_grad=True)
    fp8_block = _frozen_block()
    store_linear_weights_in_fp8(fp8_block)
    reference = _frozen_block()
    with torch.no_grad():
        for name in ("fc1", "fc2", "head"):
            getattr(reference, name).weight.copy_(getattr(fp8_block, name).weight.float())

    def with_lora(block: _Block) -> list[LoRAModule]:
        torch.manual_seed(3)
        loras = [LoRAModule(f"lora_{n}", getattr(block, n), lora_dim=2, alpha=1.0) for n in ("fc1", "fc2")]
        for lora in loras:
            nn.init.normal_(lora.lora_up.weight)  # non-zero, so the gradient reaches lora_down too
            lora.apply_to()
        return loras

    grads = []
    for block in (fp8_block, reference):
        loras = with_lora(block)
        x.grad = None
        block(x).square().sum().backward()
        grads.append([p.grad.clone() for lora in loras for p in lora.parameters()] + [x.grad.clone()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_trainable_bias_gets_its_gradient():
    layer = nn.Linear(8, 4)
    layer.weight.requires_grad_(False)
    reference_bias = layer.bias.detach().clone().requires_grad_(True)
    store_linear_weights_in_fp8(layer)
    x = torch.randn(3, 2, 8)
    layer(x).square().sum().backward()
    F.linear(x, layer.weight.float(), reference_bias).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, reference_bias.grad, rtol=1e-6, atol=1e-6)


def test_fp8_after_lora_is_refused_with_the_fix():
    block = _frozen_block()
    LoRAModule("lora_fc1", block.fc1, lora_dim=2).apply_to()
    with pytest.raises(Fp8Error, match="fc1: .*before applying the network"):
        store_linear_weights_in_fp8(block)


def test_an_fp8_input_is_refused():
    weight = torch.randn(4, 8).to(FP8_DTYPE)
    with pytest.raises(Fp8Error, match="fp8 input"):
        fp8_linear(torch.randn(2, 8).to(FP8_DTYPE), weight)


def test_lora_merge_into_an_fp8_layer_changes_the_stored_weight():
    block = _frozen_block()
    store_linear_weights_in_fp8(block)
    lora = LoRAModule("lora_fc1", block.fc1, lora_dim=2, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    expected = (block.fc1.weight.float() + lora.delta_weight()).clamp(-448, 448).to(FP8_DTYPE)
    lora.merge_to()
    assert block.fc1.weight.dtype == FP8_DTYPE
    assert torch.equal(block.fc1.weight.float(), expected.float())


@pytest.mark.parametrize(
    "fp8_base, fp8_base_unet, expected",
    [(False, False, Fp8Parts()), (True, False, Fp8Parts(True, True)), (False, True, Fp8Parts(True, False)),
     (True, True, Fp8Parts(True, False))],
)
def test_fp8_flags_pick_the_parts_as_sd_scripts(fp8_base, fp8_base_unet, expected):
    args = argparse.Namespace(fp8_base=fp8_base, fp8_base_unet=fp8_base_unet, mixed_precision="bf16")
    assert Fp8Parts.from_args(args) == expected


def test_fp8_without_mixed_precision_is_refused():
    args = argparse.Namespace(fp8_base=True, fp8_base_unet=False, mixed_precision="no")
    with pytest.raises(Fp8Error, match="--fp8_base.*--mixed_precision"):
        Fp8Parts.from_args(args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_linear_under_bf16_autocast_matches_the_upcast_computation():
    torch.manual_seed(4)
    layer = nn.Linear(256, 512).requires_grad_(False).cuda()
    store_linear_weights_in_fp8(layer)
    x = torch.randn(8, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    expected = F.linear(x.detach().bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(y, dtype=torch.bfloat16) @ layer.weight.bfloat16(),
                               rtol=0, atol=0, check_dtype=False)


# --- Conv2d and layouts (SD1/SD2/SDXL U-Nets) -------------------------------------------------------------------


class _ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 8, 1, bias=False)
        self.mixer = nn.Linear(8, 8)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")  # not zero-padded: stays as it is
        self.dtype_source = nn.Linear(8, 8)  # a layer named in `keep`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.silu(self.norm(self.conv_in(x))))
        h = self.proj(h) + self.mixer(h.transpose(1, -1)).transpose(1, -1)
        return self.reflect(h)


UNET_LIKE = Fp8Layout((nn.Linear, nn.Conv2d), keep=("dtype_source",))


def _frozen_conv_block(seed: int = 0) -> _ConvBlock:
    torch.manual_seed(seed)
    return _ConvBlock().requires_grad_(False)


def _upcast_copy(block: nn.Module, stored: nn.Module) -> nn.Module:
    """`block` (a fresh twin of `stored`) carrying `stored`'s fp8 weights, upcast to float32 in plain layers."""
    layers = dict(stored.named_modules())
    with torch.no_grad():
        for name, module in block.named_modules():
            weight = getattr(layers[name], "weight", None)
            if weight is not None and weight.dtype == FP8_DTYPE:
                module.weight.copy_(weight.float())
    return block


def test_a_layout_stores_linear_and_zero_padded_conv_weights_and_keeps_the_rest():
    block = _frozen_conv_block()
    expected = sum(getattr(block, name).weight.numel() for name in ("conv_in", "down", "proj", "mixer"))
    assert UNET_LIKE.weight_params(block) == expected
    assert UNET_LIKE.store(block) == 4
    assert type(block.conv_in) is Fp8Conv2d and type(block.mixer) is Fp8Linear
    for name in ("conv_in", "down", "proj", "mixer"):
        assert getattr(block, name).weight.dtype == FP8_DTYPE, name
    assert type(block.reflect) is nn.Conv2d and block.reflect.weight.dtype == torch.float32
    assert type(block.dtype_source) is nn.Linear and block.dtype_source.weight.dtype == torch.float32
    assert block.conv_in.bias.dtype == torch.float32 and block.norm.weight.dtype == torch.float32
    assert Fp8Layout().weight_params(_frozen_conv_block()) == block.mixer.weight.numel() * 2  # Linear only by default


def test_a_layout_of_an_unknown_layer_type_is_refused():
    with pytest.raises(TypeError, match="not Conv1d"):
        Fp8Layout((nn.Linear, nn.Conv1d))


def test_fp8_conv_forward_and_backward_equal_the_upcast_computation_and_keep_only_the_fp8_weight():
    block = _frozen_conv_block()
    UNET_LIKE.store(block)
    reference = _upcast_copy(_frozen_conv_block(), block)
    x = torch.randn(2, 4, 9, 7, requires_grad=True)  # odd sides: the stride-2 conv's input gradient needs the input size
    x_ref = x.detach().clone().requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block.down(x.new_ones(2, 8, 9, 7).requires_grad_(True))
    assert [t.dtype for t in saved] == [FP8_DTYPE] and saved[0].data_ptr() == block.down.weight.data_ptr()
    y = block(x)
    torch.testing.assert_close(y, reference(x_ref), rtol=0, atol=0)
    y.square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_trainable_conv_bias_gets_its_gradient():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    conv.weight.requires_grad_(False)
    reference_bias = conv.bias.detach().clone().requires_grad_(True)
    UNET_LIKE.store(conv)
    x = torch.randn(2, 3, 8, 8)
    conv(x).square().sum().backward()
    F.conv2d(x, conv.weight.float(), reference_bias, stride=2, padding=1).square().sum().backward()
    torch.testing.assert_close(conv.bias.grad, reference_bias.grad, rtol=1e-5, atol=1e-5)


def test_fp8_conv_under_autocast_computes_in_the_autocast_dtype():
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    UNET_LIKE.store(conv)
    x = torch.randn(1, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    expected = F.conv2d(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), padding=1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_conv_lora_applied_after_fp8_trains_like_conv_lora_on_the_upcast_weights():
    x = torch.randn(2, 4, 8, 8)
    fp8_block = _frozen_conv_block()
    UNET_LIKE.store(fp8_block)
    reference = _upcast_copy(_frozen_conv_block(), fp8_block)
    grads = []
    for block in (fp8_block, reference):
        torch.manual_seed(3)
        loras = [LoRAModule(f"lora_{n}", getattr(block, n), lora_dim=2, alpha=1.0) for n in ("conv_in", "down", "mixer")]
        for lora in loras:
            nn.init.normal_(lora.lora_up.weight)
            lora.apply_to()
        block(x).square().sum().backward()
        grads.append([p.grad.clone() for lora in loras for p in lora.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_moving_keeps_fp8_weights_and_casts_everything_else():
    block = _frozen_conv_block()
    UNET_LIKE.store(block)
    move_keeping_fp8(block, "cpu", torch.bfloat16)
    dtypes = {name: p.dtype for name, p in block.named_parameters()}
    assert dtypes["conv_in.weight"] == FP8_DTYPE and dtypes["mixer.weight"] == FP8_DTYPE
    assert dtypes["conv_in.bias"] == torch.bfloat16 and dtypes["norm.weight"] == torch.bfloat16
    assert dtypes["reflect.weight"] == torch.bfloat16 and dtypes["dtype_source.weight"] == torch.bfloat16


def test_compiled_fp8_layers_give_the_eager_output_and_input_gradient():
    block = _frozen_conv_block()
    UNET_LIKE.store(block)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    eager = block(x)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)
