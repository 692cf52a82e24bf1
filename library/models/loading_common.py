"""What the SD, SDXL and SD3 loaders share: building a model around checkpoint tensors, naming the file in
errors, reading diffusers component folders and the ``--vae`` override.

The family loaders (``sd_loading``, ``sdxl_loading``, ``sd3_loading``) decide which tensors go where; this
module only turns those tensors into models and bad files into one-line ``CheckpointError``s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from library.models.checkpoint import CheckpointError, load_state_dict, strip_prefix
from library.models.vae import VaeConfig, infer_vae_config
from library.models.vae_keys import vae_state_dict_from_diffusers

VAE_PREFIX = "first_stage_model."
# Tried in order: full-precision safetensors first, pickles last.
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)

ModelT = TypeVar("ModelT", bound=nn.Module)


def require_model(path: Path) -> None:
    """``--pretrained_model_name_or_path`` must exist before anything else is checked."""
    if not path.exists():
        raise CheckpointError(f"model not found: {path} (--pretrained_model_name_or_path takes a local file or folder, "
                              "or a Hugging Face id)")


def adopt_weights(model: ModelT, state_dict: Mapping[str, Tensor], source: str) -> ModelT:
    """Assign the checkpoint tensors into a model built without storage (meta device or
    ``init_empty_weights``), strictly: a key missing or left over means the inferred config is wrong.

    Assigning rather than copying keeps one copy of every weight in memory. ``source`` names the file and
    part in the error.
    """
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the inferred {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [name for name, tensor in model.named_buffers() if tensor.is_meta]
    if left_on_meta:  # a non-persistent buffer of a model built on the meta device: a bug in our code
        raise RuntimeError(f"{type(model).__name__} buffers {left_on_meta[:3]} are not in its state dict")
    return model


def build_model(model_class: type[ModelT], config: Any, state_dict: Mapping[str, Tensor], source: str) -> ModelT:
    """``model_class(config)`` holding the checkpoint tensors, without first allocating random weights."""
    with init_empty_weights():
        model = model_class(config)
    return adopt_weights(model, state_dict, source)


@contextmanager
def errors_naming(source: Path | str, flag: str = "") -> Iterator[None]:
    """Re-raise bad-input errors of key adapters and config inference (KeyError, ValueError) as one-line
    CheckpointErrors naming the file; ``flag`` (e.g. ``"--vae "``) goes before the file name."""
    label = f"{flag}{source}"
    try:
        yield
    except KeyError as error:
        raise CheckpointError(f"{label}: required entry {error} is missing") from error
    except ValueError as error:
        if str(error).startswith(label):
            raise
        raise CheckpointError(f"{label}: {error}") from error


def read_diffusers_config(component: Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers component folder (``unet/``, ``vae/``, ``text_encoder/``...)."""
    config_file = component / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{component.parent} is not a diffusers SD folder: {config_file} is missing")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON (line {error.lineno}: {error.msg})") from error


def load_diffusers_weights(component: Path, mmap: bool) -> dict[str, Tensor]:
    """The tensors of a diffusers component folder, from the first weights file of ``DIFFUSERS_WEIGHT_FILES``."""
    for name in DIFFUSERS_WEIGHT_FILES:
        if (component / name).is_file():
            return load_state_dict(component / name, mmap=mmap)
    raise CheckpointError(f"no weights file in {component} (expected one of {', '.join(DIFFUSERS_WEIGHT_FILES)})")


def cast_floating(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors in ``dtype`` (fp16, bf16 and fp8 files alike); integer tensors such as ids unchanged."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}


def ldm_vae_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A VAE's tensors in the ldm layout, from ldm keys with or without ``first_stage_model.`` or from
    diffusers keys (told apart by ``encoder.down_blocks.``)."""
    weights = dict(state_dict)
    if any(key.startswith(VAE_PREFIX) for key in weights):
        weights = strip_prefix(weights, VAE_PREFIX)
    levels = {key.split(".")[2] for key in weights if key.startswith("encoder.down_blocks.")}
    if levels:
        # The renaming only needs the level count; the real config is read off the renamed tensors afterwards.
        weights = vae_state_dict_from_diffusers(weights, VaeConfig(ch_mult=(1,) * len(levels)))
    return weights


def load_vae_override(path: Path, mmap: bool) -> tuple[dict[str, Tensor], VaeConfig]:
    """``--vae``: a diffusers VAE folder (or a pipeline folder with ``vae/``), or a file in the ldm (optionally
    prefixed) or diffusers layout; returns ldm-layout tensors and the config that fits them."""
    if not path.exists():
        raise CheckpointError(f"--vae file not found: {path}")
    with errors_naming(path, "--vae "):
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").exists() else path
            config = vae_config_from_diffusers(read_diffusers_config(folder))
            return vae_state_dict_from_diffusers(load_diffusers_weights(folder, mmap), config), config
        state_dict = ldm_vae_state_dict(load_state_dict(path, mmap=mmap))
        return state_dict, infer_vae_config(state_dict)


def vae_config_from_diffusers(config: dict[str, Any]) -> VaeConfig:
    """VaeConfig from a diffusers ``vae/config.json`` (SD, SDXL and SD3 VAEs share the architecture)."""
    widths = list(config["block_out_channels"])
    return VaeConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        z_channels=config.get("latent_channels", 4),
        ch=widths[0],
        ch_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        use_quant_conv=config.get("use_quant_conv", True),
        norm_groups=config.get("norm_num_groups", 32),
    )
