"""--fp8_base / --fp8_base_unet: frozen Linear (and Conv2d) weights stored in float8_e4m3fn, upcast per layer.

Storing the frozen base weights in 8 bits halves their memory against bf16 (and halves what block
swapping copies). Each layer upcasts its weight to the compute dtype only for its own matmul or
convolution, so no full-precision copy of the model ever exists. Three choices make that hold in
training too:
- the backward keeps the fp8 weight, not the upcast one, and upcasts again for the input gradient
  (a plain ``F.linear(x, w.to(bf16))`` would keep every upcast weight alive until the backward);
- layers are converted in place (same module objects, same parameter objects, same state-dict keys),
  so references held by LoRA, the optimizer or `library.offload.BlockSwapper` stay valid;
- the conversion must come before LoRA is applied: LoRA captures the layer's ``forward`` to call it
  as the base path, so that forward must already be the upcasting one.

sd-scripts casts the whole model to fp8 (norms and biases too) and relies on autocast to upcast; we
cast only the weights of the layers a family's `Fp8Layout` names (norms, biases and embeddings keep
their dtype: a negligible share of the bytes) and upcast explicitly, which works with and without
autocast.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Error(ValueError):
    """fp8 weight storage cannot be applied as asked."""


@dataclass(frozen=True)
class Fp8Parts:
    """Which frozen models store their weights in fp8 (sd-scripts' flag semantics)."""

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


def _compute_dtype(x: Tensor, layer: str) -> torch.dtype:
    """The dtype an fp8 layer upcasts to: the autocast dtype when autocast is on, else x's dtype."""
    if x.dtype in FP8_DTYPES:
        raise Fp8Error(f"an fp8 {layer} got an fp8 input: the caller cast its activations to the weight dtype; "
                       "keep that module out of fp8 storage")
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A Linear with an fp8 weight, computed in the autocast dtype when autocast is on, else in x's dtype."""
    dtype = _compute_dtype(x, "Linear")
    if bias is not None:
        bias = bias.to(dtype)
    return _Fp8LinearFunction.apply(x.to(dtype), weight, bias)


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored in float8_e4m3fn (made by `Fp8Layout.store`)."""

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias)


class _Fp8Conv2dFunction(torch.autograd.Function):
    """conv2d(x, W) + b with W stored in fp8; keeps only the fp8 W and x's shape for the backward.

    W is frozen (no gradient), so x itself is not needed: the input gradient is the transposed
    convolution of the output gradient with W, upcast again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...], groups: int) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.geometry, ctx.has_bias = x.shape, (stride, padding, dilation, groups), bias is not None
        return F.conv2d(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(grad.dtype), grad, *ctx.geometry)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            channel_dim = grad.dim() - 3  # (B, C, H, W) or unbatched (C, H, W)
            grad_bias = grad.sum([d for d in range(grad.dim()) if d != channel_dim])
        return grad_x, None, grad_bias, None, None, None, None


def fp8_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
               dilation: tuple[int, ...], groups: int) -> Tensor:
    """A zero-padded Conv2d with an fp8 weight, computed in the autocast dtype when autocast is on, else in x's dtype."""
    dtype = _compute_dtype(x, "Conv2d")
    if bias is not None:
        bias = bias.to(dtype)
    return _Fp8Conv2dFunction.apply(x.to(dtype), weight, bias, stride, padding, dilation, groups)


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d (zero padding) whose frozen weight is stored in float8_e4m3fn (made by `Fp8Layout.store`)."""

    def forward(self, x: Tensor) -> Tensor:
        return fp8_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# Each layer type fp8 storage knows, and the class that upcasts its weight. Exact types only: subclasses may read
# their weight elsewhere (e.g. MultiheadAttention's out_proj).
FP8_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def _storable(module: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> bool:
    if type(module) not in layer_types:
        return False
    # Fp8Conv2d computes a zero-padded convolution with numeric padding; other padding modes keep their dtype.
    return not isinstance(module, nn.Conv2d) or (module.padding_mode == "zeros" and not isinstance(module.padding, str))


@dataclass(frozen=True)
class Fp8Layout:
    """Which frozen layers of one model --fp8_base stores in fp8: every layer of `layer_types` (exact types, keys of
    `FP8_CLASSES`) whose module name does not end with one of the `keep` suffixes.

    `keep` names layers whose weight dtype other code reads to choose a dtype (a model that casts its input to
    a layer's weight dtype would otherwise cast its activations to fp8).
    """

    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [t.__name__ for t in self.layer_types if t not in FP8_CLASSES]
        if unknown:
            raise TypeError(f"fp8 storage knows {', '.join(t.__name__ for t in FP8_CLASSES)}, not {', '.join(unknown)}")

    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The (name, layer) pairs this layout stores in fp8, trainable or not."""
        for name, module in model.named_modules():
            if _storable(module, self.layer_types) and not (self.keep and name.endswith(self.keep)):
                yield name, module

    def weight_params(self, model: nn.Module) -> int:
        """How many parameters `store` puts in fp8 once the model is frozen (works on the meta device)."""
        return sum(module.weight.numel() for _, module in self.layers(model))

    def store(self, model: nn.Module) -> int:
        """Store the weight of every frozen layer of the layout as float8_e4m3fn, in place; returns how many.

        Weights are clamped to fp8's finite range (+-448) first. Trainable weights keep their dtype.
        """
        limit = torch.finfo(FP8_DTYPE).max
        converted = 0
        for name, module in self.layers(model):
            if module.weight.requires_grad:
                continue
            if "forward" in vars(module):
                raise Fp8Error(f"{name or type(model).__name__}: its forward is already replaced (LoRA applied?); "
                               "store weights in fp8 before applying the network")
            with torch.no_grad():
                module.weight.data = module.weight.data.clamp(-limit, limit).to(FP8_DTYPE)
            module.__class__ = FP8_CLASSES[type(module)]  # same object, so every reference to the layer stays valid
            converted += 1
        return converted


def store_linear_weights_in_fp8(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """`Fp8Layout` for nn.Linear only: store every frozen Linear weight in `model` as float8_e4m3fn; returns how many.

    Modules that cast their input to a Linear's weight dtype (MMDiT's timestep embedder does) must be left out
    by converting only the submodules that should be (e.g. ``model.joint_blocks``), or named in `skip`
    (layers whose module name ends with one of these suffixes stay as they are).
    """
    return Fp8Layout((nn.Linear,), keep=skip).store(model)


def move_keeping_fp8(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)`` except that fp8 tensors keep their dtype (``Module.to`` would upcast them)."""

    def convert(tensor: Tensor) -> Tensor:
        cast = tensor.is_floating_point() and tensor.dtype not in FP8_DTYPES
        return tensor.to(device=device, dtype=dtype if cast else None)

    # Module.to's own traversal, tensor by tensor: parameters keep their identity where the tensor types allow (as
    # with .to), and a float32 model never lands on the device whole before its cast.
    module._apply(convert)
