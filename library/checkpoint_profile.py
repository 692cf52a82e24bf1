"""What a run's model files hold, read from safetensors headers alone (names, shapes, dtypes; never the weights).

`read_profile` gives the family, the parameter count and stored bytes of each component (denoiser, VAE, each
text encoder, in the order the family's trainer uses them) and the denoiser's config, inferred by the same
functions the loaders use. `meta_denoiser` builds that denoiser on the meta device, where it allocates nothing,
so the LoRA network can be created on it to count its parameters with the real target rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from library.models.checkpoint import CheckpointError, detect_family
from library.models.loading_common import DIFFUSERS_WEIGHT_FILES, read_diffusers_config
from library.models.mmdit import MMDiT, MMDiTConfig, infer_mmdit_config
from library.models.sd_loading import unet_config_from_diffusers
from library.models.sd_unet import SdUNet, SdUNetConfig, SdxlUNet, infer_unet_config
from library.models.sdxl_loading import sdxl_unet_config_from_diffusers

DENOISER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
LATENT_DOWNSCALE = 8  # pixels per latent pixel: every SD1/2, SDXL and SD3 VAE downsamples three times

# Text encoders per family, in the order the family's trainer lists them, with their single-file prefix.
TEXT_ENCODER_PREFIXES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("text_encoder", "cond_stage_model.transformer."),),
    "sd2": (("text_encoder", "cond_stage_model.model."),),
    "sdxl": (("clip_l", "conditioner.embedders.0.transformer."), ("clip_g", "conditioner.embedders.1.model.")),
    "sd3": (("clip_l", "text_encoders.clip_l."), ("clip_g", "text_encoders.clip_g."), ("t5xxl", "text_encoders.t5xxl.")),
}

# Diffusers pipeline folders: each family's text-encoder folders, in the trainer's order.
FOLDER_TEXT_ENCODERS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("text_encoder", "text_encoder"),),
    "sd2": (("text_encoder", "text_encoder"),),
    "sdxl": (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")),
}
SD2_CONTEXT_DIM = 1024  # OpenCLIP-H's width; SD1's CLIP-L gives 768

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_LAYER_INDEX = re.compile(r"\.(?:layers|resblocks|block)\.(\d+)\.")
_TEXT_LORA_LAYER = re.compile(r"(self_attn|mlp|\.attn|SelfAttention|DenseReluDense)\.")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", ...

    @property
    def numel(self) -> int:
        count = 1
        for side in self.shape:
            count *= side
        return count


@dataclass(frozen=True)
class ComponentProfile:
    """One model of the checkpoint: how many parameters, how they are stored, and its rough shape."""

    name: str
    source: Path
    params: int
    stored_bytes: int
    dtypes: Mapping[str, int] = field(default_factory=dict)  # dtype name -> parameters stored in it
    linear_params: int = 0  # parameters in Linear weights (what fp8 storage shrinks)
    width: int = 0  # text encoders: hidden width (0 when unknown)
    layers: int = 0  # text encoders: transformer layers (0 when unknown)
    lora_sides: int = 0  # text encoders: sum of in + out features over the layers LoRA adapts (rank x this = LoRA params)

    @property
    def is_t5(self) -> bool:
        return self.name == "t5xxl"


@dataclass(frozen=True)
class ModelProfile:
    family: str  # "sd1", "sd2", "sdxl", "sd3"
    denoiser_config: SdUNetConfig | MMDiTConfig
    denoiser: ComponentProfile
    vae: ComponentProfile | None
    text_encoders: tuple[ComponentProfile, ...]
    block_params: tuple[int, ...] = ()  # MMDiT: parameters of each joint block (what --blocks_to_swap moves)
    block_linear_params: tuple[int, ...] = ()  # MMDiT: of those, the Linear weights (what --fp8_base stores in fp8)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's shape and dtype from a .safetensors header."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise CheckpointError(f"{path}: the memory estimate reads single .safetensors files (headers only)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            infos = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                infos[key] = TensorInfo(tuple(piece.get_shape()), piece.get_dtype())
            return infos
    except (OSError, ValueError) as error:  # safetensors' own error derives from neither on some versions
        raise CheckpointError(f"{path}: unreadable safetensors header ({error})") from None


def read_profile(checkpoint: Path, *, vae: Path | None = None, separate_text_encoders: Mapping[str, Path | None] = {}
                 ) -> ModelProfile:
    """The profile of a single-file checkpoint (or an SD1/SD2/SDXL diffusers folder), with a --vae file and (SD3)
    --clip_l/--clip_g/--t5xxl files in place of the checkpoint's own parts."""
    if checkpoint.is_dir():
        return read_folder_profile(checkpoint, vae=vae)
    header = read_header(checkpoint)
    family = detect_family(header, str(checkpoint))
    denoiser_tensors = _under(header, DENOISER_PREFIX)
    meta = {key: torch.empty(info.shape, device="meta") for key, info in denoiser_tensors.items()}
    config = infer_mmdit_config(meta) if family == "sd3" else infer_unet_config(meta)
    vae_tensors = _vae_header(vae) if vae else _under(header, VAE_PREFIX)
    encoders = []
    for name, prefix in TEXT_ENCODER_PREFIXES[family]:
        separate = separate_text_encoders.get(name)
        tensors = _under(read_header(separate), prefix, keep_all=True) if separate else _under(header, prefix)
        if tensors:
            encoders.append(_component(name, separate or checkpoint, tensors, text=True))
    blocks, linear = _joint_blocks(denoiser_tensors) if family == "sd3" else ((), ())
    return ModelProfile(family=family, denoiser_config=config, denoiser=_component("denoiser", checkpoint, denoiser_tensors),
                        vae=_component("vae", vae or checkpoint, vae_tensors) if vae_tensors else None,
                        text_encoders=tuple(encoders), block_params=blocks, block_linear_params=linear)


def read_folder_profile(folder: Path, *, vae: Path | None = None) -> ModelProfile:
    """The profile of a diffusers pipeline folder: unet/config.json and the headers of each component's weights."""
    if (folder / "transformer").is_dir():
        raise CheckpointError(f"{folder}: an SD3 diffusers folder; the memory estimate reads SD3 single files")
    sdxl = (folder / "text_encoder_2").is_dir()
    unet_config = read_diffusers_config(folder / "unet")
    config = sdxl_unet_config_from_diffusers(unet_config) if sdxl else unet_config_from_diffusers(unet_config)
    family = "sdxl" if sdxl else "sd2" if config.context_dim == SD2_CONTEXT_DIM else "sd1"
    encoders = tuple(_component(name, folder / part, _folder_header(folder / part), text=True)
                     for name, part in FOLDER_TEXT_ENCODERS[family])
    vae_component = (_component("vae", vae, _vae_header(vae)) if vae
                     else _component("vae", folder / "vae", _folder_header(folder / "vae")))
    return ModelProfile(family=family, denoiser_config=config,
                        denoiser=_component("denoiser", folder / "unet", _folder_header(folder / "unet")),
                        vae=vae_component, text_encoders=encoders)


def _vae_header(vae: Path) -> dict[str, TensorInfo]:
    """--vae: a file (ldm keys with or without first_stage_model., or diffusers keys) or a diffusers VAE folder
    (the vae/ of a pipeline folder); parameter counts do not depend on the layout."""
    if vae.is_dir():
        return _folder_header(vae / "vae" if (vae / "vae" / "config.json").is_file() else vae)
    return _under(read_header(vae), VAE_PREFIX, keep_all=True)


def _folder_header(component: Path) -> dict[str, TensorInfo]:
    for name in DIFFUSERS_WEIGHT_FILES:
        if name.endswith(".safetensors") and (component / name).is_file():
            return read_header(component / name)
    raise CheckpointError(f"{component}: no .safetensors weights (the memory estimate reads safetensors headers)")


def meta_denoiser(profile: ModelProfile) -> torch.nn.Module:
    """The denoiser's modules on the meta device: the real layer tree, no memory."""
    model_class = {"sd3": MMDiT, "sdxl": SdxlUNet}.get(profile.family, SdUNet)
    with torch.device("meta"):
        return model_class(profile.denoiser_config)


def _under(header: Mapping[str, TensorInfo], prefix: str, keep_all: bool = False) -> dict[str, TensorInfo]:
    """The tensors under `prefix`, prefix removed; with `keep_all` (a file of its own) every tensor when none has it."""
    found = {key[len(prefix):]: info for key, info in header.items() if key.startswith(prefix)}
    return dict(header) if keep_all and not found else found


def _component(name: str, source: Path, tensors: Mapping[str, TensorInfo], text: bool = False) -> ComponentProfile:
    dtypes: dict[str, int] = {}
    for info in tensors.values():
        if info.dtype in _FLOAT_DTYPES:  # integer buffers (position ids) are not parameters
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    linear = sum(info.numel for key, info in tensors.items() if _is_linear_weight(key, info))
    width = layers = sides = 0
    if text:
        embeddings = [info.shape[1] for key, info in tensors.items() if len(info.shape) == 2
                      and (("embed" in key and "token" in key) or key.endswith("shared.weight"))]
        width = max(embeddings, default=0)
        layers = len({int(match.group(1)) for key in tensors for match in [_LAYER_INDEX.search("." + key)] if match})
        sides = sum(_lora_sides(key, info) for key, info in tensors.items())
    return ComponentProfile(name=name, source=source, params=sum(dtypes.values()),
                            stored_bytes=sum(info.numel * _DTYPE_BYTES.get(info.dtype, 4) for info in tensors.values()),
                            dtypes=dtypes, linear_params=linear, width=width, layers=layers, lora_sides=sides)


def _is_linear_weight(key: str, info: TensorInfo) -> bool:
    return len(info.shape) == 2 and key.endswith("weight") and "embed" not in key and not key.endswith("shared.weight")


def _lora_sides(key: str, info: TensorInfo) -> int:
    """in + out features of a text-encoder layer LoRA adapts: CLIP attention and MLP (OpenCLIP's fused in_proj is
    three layers once converted), T5 attention and feed-forward."""
    if not _is_linear_weight(key, info) or not _TEXT_LORA_LAYER.search(key):
        return 0
    out_features, in_features = info.shape
    if key.endswith("in_proj_weight"):
        return 3 * (out_features // 3 + in_features)
    return out_features + in_features


def _joint_blocks(tensors: Mapping[str, TensorInfo]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    totals: dict[int, list[int]] = {}
    for key, info in tensors.items():
        if key.startswith("joint_blocks."):
            sums = totals.setdefault(int(key.split(".")[1]), [0, 0])
            sums[0] += info.numel
            if len(info.shape) == 2 and key.endswith(".weight") and "ln_" not in key:
                sums[1] += info.numel
    ordered: Sequence[list[int]] = [totals[index] for index in sorted(totals)]
    return tuple(total for total, _ in ordered), tuple(linear for _, linear in ordered)
