"""--fp8_base / --fp8_base_unet: frozen Linear weights stored in float8_e4m3fn, upcast per layer.

Storing the frozen base weights in 8 bits halves their memory against bf16 (and halves what block
swapping copies). Each layer upcasts its weight to the compute dtype only for its own matmul, so no
full-precision copy of the model ever exists. Three choices make that hold in training too:
- the backward keeps the fp8 weight, not the upcast one, and upcasts again for the input gradient
  (a plain ``F.linear(x, w.to(bf16))`` would keep every upcast weight alive until the backward);
- layers are converted in place (same module objects, same parameter objects, same state-dict keys),
  so references held by LoRA, the optimizer or `library.offload.BlockSwapper` stay valid;
- the conversion must come before LoRA is applied: LoRA captures the layer's ``forward`` to call it
  as the base path, so that forward must already be the upcasting one.

sd-scripts casts the whole model to fp8 and relies on autocast to upcast; we cast only Linear weights
(norms, biases, convolutions and embeddings keep their dtype) and upcast explicitly, which works
with and without autocast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn


class Fp8Error(ValueError):
    """fp8 weight storage cannot be applied as asked."""


@dataclass(frozen=True)
class Fp8Parts:
    """Which frozen models store their Linear weights in fp8 (sd-scripts' flag semantics)."""

    denoiser: bool = False
    text_encoders: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Fp8Parts:
        """--fp8_base: the denoiser and the frozen text encoders; --fp8_base_unet: the denoiser only."""
        if not (args.fp8_base or args.fp8_base_unet):
            return cls()
        if args.mixed_precision == "no":
            raise Fp8Error("--fp8_base / --fp8_base_unet need --mixed_precision fp16 or bf16: fp8 weights are "
                           "upcast to the mixed-precision dtype for each layer")
        return cls(denoiser=True, text_encoders=not args.fp8_base_unet)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8; saves the fp8 W for the backward instead of an upcast copy.

    W is frozen (no gradient); x and b may need gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A Linear with an fp8 weight, computed in the autocast dtype when autocast is on, else in x's dtype."""
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise Fp8Error("an fp8 Linear got an fp8 input: the caller cast its activations to the weight dtype; "
                       "keep that module out of fp8 storage")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    if bias is not None:
        bias = bias.to(dtype)
    return _Fp8LinearFunction.apply(x.to(dtype), weight, bias)


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored in float8_e4m3fn (made by `store_linear_weights_in_fp8`)."""

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias)


def store_linear_weights_in_fp8(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Store the weight of every frozen nn.Linear in `model` as float8_e4m3fn, in place; returns how many.

    Only exact nn.Linear layers are converted: subclasses may read their weight elsewhere (e.g.
    MultiheadAttention's out_proj). Weights are clamped to fp8's finite range (+-448) first. Modules
    that cast their input to a Linear's weight dtype (MMDiT's timestep embedder does) must be left out
    by converting only the submodules that should be (e.g. ``model.joint_blocks``), or named in `skip`
    (layers whose module name ends with one of these suffixes stay as they are).
    """
    limit = torch.finfo(FP8_DTYPE).max
    converted = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight.requires_grad or name.endswith(skip):
            continue
        if "forward" in vars(module):
            raise Fp8Error(f"{name or type(model).__name__}: its forward is already replaced (LoRA applied?); "
                           "store weights in fp8 before applying the network")
        with torch.no_grad():
            module.weight.data = module.weight.data.clamp(-limit, limit).to(FP8_DTYPE)
        module.__class__ = Fp8Linear  # same object, so every reference to the layer stays valid
        converted += 1
    return converted
