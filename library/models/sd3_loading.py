"""Loading SD3 / SD3.5 from a single-file checkpoint, with any part replaced by a separate file.

A single file keeps each part under its original prefix: ``model.diffusion_model.*`` (MMDiT),
``first_stage_model.*`` (the 16-channel VAE) and ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` (Hugging
Face naming). SD3 Medium shipped with and without the text encoders; SD3.5 files hold only the MMDiT and VAE,
the encoders coming from ``--clip_l`` / ``--clip_g`` / ``--t5xxl`` (and the VAE possibly from ``--vae``). A
separate file wins over the checkpoint's copy. Separate files come in several shapes (with or without the
``text_model.`` level, under a ``transformer.`` or the full single-file prefix, fp32/fp16/bf16/fp8); they are
brought into one layout here. Configs are read off the tensors, never fetched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.models.checkpoint import CheckpointError, checkpoint_keys, detect_family, load_state_dict, strip_prefix
from library.models.loading_common import (
    VAE_PREFIX,
    adopt_weights,
    build_model,
    cast_floating,
    errors_naming,
    ldm_vae_state_dict,
)
from library.models.mmdit import MMDiT, MMDiTConfig, infer_mmdit_config
from library.models.sd3_text import Sd3TextEncoders
from library.models.text_encoders import (
    PROJECTION_KEY,
    TEXT_MODEL_PREFIX,
    canonical_hf_text_state_dict,
    load_clip_text_model,
    openclip_to_hf_text_state_dict,
)
from library.models.vae import AutoencoderKL, infer_vae_config

MMDIT_PREFIX = "model.diffusion_model."
# SD3's latent normalisation: latents fed to the MMDiT are (z - shift) * scale.
SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609

ENCODERS = ("clip_l", "clip_g", "t5xxl")
_LABELS = {"mmdit": "MMDiT", "vae": "VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
_CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # OpenAI CLIP-L; OpenCLIP bigG
_CLIP_TOKEN_EMBEDDING = TEXT_MODEL_PREFIX + "embeddings.token_embedding.weight"
_T5_SHARED, _T5_EMBED = "shared.weight", "encoder.embed_tokens.weight"
_T5_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")
_OTHER_FAMILY = {
    "sdxl": "an SDXL checkpoint; use sdxl_train_network.py",
    "sd1": "an SD1.x checkpoint; use train_network.py",
    "sd2": "an SD2.x checkpoint; use train_network.py --v2",
}


def text_encoder_prefix(name: str) -> str:
    return f"text_encoders.{name}.transformer."


@dataclass
class Sd3Models:
    mmdit: MMDiT
    mmdit_config: MMDiTConfig
    vae: AutoencoderKL
    text: Sd3TextEncoders
    variant: str  # "sd3-medium" | "sd3.5-medium" | "sd3.5-large"


def sd3_variant(config: MMDiTConfig) -> str:
    """Name the release an MMDiT config belongs to, by sd-scripts' rule: no qk norm is SD3 (Medium); qk norm
    with MMDiT-X self-attention layers is SD3.5 Medium, without them SD3.5 Large."""
    if config.qk_norm is None:
        return "sd3-medium"
    return "sd3.5-medium" if config.x_block_self_attn_layers else "sd3.5-large"


# ---------------------------------------------------------------------------------------------- early checks


def check_sd3_files(
    path: str | Path,
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5xxl: str | Path | None = None,
    vae: str | Path | None = None,
) -> None:
    """Fail before the dataset is scanned or a weight is read: missing files, a checkpoint of another family
    or without the MMDiT, or a text encoder / VAE found neither in the checkpoint nor in its own file.

    Reads safetensors headers only; other formats are checked when loaded.
    """
    path, separate = Path(path), _separate_files(clip_l, clip_g, t5xxl, vae)
    _require_files(path, separate)
    keys = checkpoint_keys(path)
    if keys is not None:
        _check_parts(path, keys, separate)


def _separate_files(clip_l, clip_g, t5xxl, vae) -> dict[str, Path | None]:
    files = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "vae": vae}
    return {name: Path(file) if file is not None else None for name, file in files.items()}


def _require_files(path: Path, separate: Mapping[str, Path | None]) -> None:
    flags = {"--pretrained_model_name_or_path": path} | {f"--{name}": file for name, file in separate.items()}
    for flag, file in flags.items():
        if file is None:
            continue
        if not file.exists():
            raise CheckpointError(f"{flag}: file not found: {file}")
        if file.is_dir():
            raise CheckpointError(f"{flag}: {file} is a folder; SD3 parts are single .safetensors files")


def _check_parts(path: Path, keys: Iterable[str], separate: Mapping[str, Path | None]) -> None:
    """The checkpoint is an SD3 MMDiT file, and every other part is in it or in a separate file."""
    keys = list(keys)
    parts = _parts_in(keys)
    _check_checkpoint(path, keys, parts)
    missing = [name for name in (*ENCODERS, "vae") if name not in parts and separate[name] is None]
    if missing:
        flags = " ".join(f"--{name} FILE" for name in missing)
        labels = ", ".join(_LABELS[name] for name in missing)
        raise CheckpointError(f"{path} has no {labels} (found: {_found(parts)}); pass {flags}")


def _parts_in(keys: Iterable[str]) -> set[str]:
    """Which SD3 parts a single file's keys hold."""
    prefixes = {"mmdit": MMDIT_PREFIX, "vae": VAE_PREFIX} | {name: text_encoder_prefix(name) for name in ENCODERS}
    keys = list(keys)
    return {name for name, prefix in prefixes.items() if any(key.startswith(prefix) for key in keys)}


def _check_checkpoint(path: Path, keys: Iterable[str], parts: set[str]) -> None:
    keys = list(keys)
    if "mmdit" not in parts or not any(key.startswith(MMDIT_PREFIX + "joint_blocks.") for key in keys):
        family = _family_or_none(keys, path)
        if family in _OTHER_FAMILY:
            raise CheckpointError(f"{path} is {_OTHER_FAMILY[family]}")
        raise CheckpointError(
            f"{path} holds no SD3 MMDiT ({MMDIT_PREFIX}joint_blocks.*); found: {_found(parts)}. "
            "--pretrained_model_name_or_path takes the SD3/SD3.5 model file"
        )


def _family_or_none(keys: list[str], path: Path) -> str | None:
    try:
        return detect_family(keys, source=str(path))
    except CheckpointError:
        return None


def _found(parts: set[str]) -> str:
    return ", ".join(_LABELS[name] for name in _LABELS if name in parts) or "none of MMDiT, VAE, CLIP-L, CLIP-G, T5-XXL"


# ---------------------------------------------------------------------------------------------- loading


def load_sd3_models(
    path: str | Path,
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5xxl: str | Path | None = None,
    vae: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    t5_dtype: torch.dtype | None = None,
    mmap: bool = True,
) -> Sd3Models:
    """Build MMDiT, VAE and the three text encoders; every floating tensor ends in ``dtype`` (T5's in
    ``t5_dtype``, default ``dtype``), whatever the files store (fp16, bf16, float8_e4m3fn are upcast).

    ``mmap=False`` (``--disable_mmap_load_safetensors``) reads files whole instead of mapping them.
    """
    path, separate = Path(path), _separate_files(clip_l, clip_g, t5xxl, vae)
    _require_files(path, separate)
    state_dict = load_state_dict(path, mmap=mmap)
    _check_parts(path, state_dict, separate)

    mmdit_weights = cast_floating(strip_prefix(state_dict, MMDIT_PREFIX), dtype)
    mmdit_source = f"{path} (MMDiT)"
    with errors_naming(mmdit_source):
        config = infer_mmdit_config(mmdit_weights)
        with torch.device("meta"):  # buffers too, so adopt_weights catches one the state dict lacks
            mmdit = MMDiT(config)
        adopt_weights(mmdit, mmdit_weights, mmdit_source)
    if separate["vae"] is not None:
        vae_model = _load_vae(load_state_dict(separate["vae"], mmap=mmap), dtype, f"--vae {separate['vae']}")
    else:
        vae_model = _load_vae(state_dict, dtype, f"{path} (VAE)")
    encoders = {}
    for name in ENCODERS:
        file = separate[name]
        weights = _separate_weights(file, name, mmap) if file else strip_prefix(state_dict, text_encoder_prefix(name))
        encoder_dtype = (t5_dtype or dtype) if name == "t5xxl" else dtype
        with errors_naming(f"--{name} {file}" if file else f"{path} ({_LABELS[name]})"):
            encoders[name] = _build_encoder(name, cast_floating(weights, encoder_dtype))
    text = Sd3TextEncoders(**encoders)
    _check_widths(config, text, path)
    return Sd3Models(mmdit=mmdit, mmdit_config=config, vae=vae_model, text=text, variant=sd3_variant(config))


def _load_vae(weights: Mapping[str, Tensor], dtype: torch.dtype, source: str) -> AutoencoderKL:
    """The VAE from the checkpoint's ``first_stage_model.*`` or a ``--vae`` file (ldm keys with or without
    that prefix, or diffusers keys)."""
    with errors_naming(source):
        weights = cast_floating(ldm_vae_state_dict(weights), dtype)
        return build_model(AutoencoderKL, infer_vae_config(weights), weights, source)


def separate_file_prefix(keys: Iterable[str], name: str) -> str:
    """The wrapper a separate encoder file puts before the encoder's own keys: the single-file prefix,
    ``transformer.``, or nothing. Tensors outside the wrapper are not the encoder's."""
    keys = list(keys)
    for prefix in (text_encoder_prefix(name), "transformer."):
        if any(key.startswith(prefix) for key in keys):
            return prefix
    return ""


def _separate_weights(file: Path, name: str, mmap: bool) -> dict[str, Tensor]:
    """A separate encoder file's tensors without any wrapping prefix."""
    weights = load_state_dict(file, mmap=mmap)
    return strip_prefix(weights, separate_file_prefix(weights, name))


def _build_encoder(name: str, weights: dict[str, Tensor]) -> CLIPTextModelWithProjection | T5EncoderModel:
    if name == "t5xxl":
        return load_t5_encoder(weights)
    if "positional_embedding" in weights:  # OpenCLIP naming, as SDXL stores its bigG tower
        weights = openclip_to_hf_text_state_dict(weights)
    file_keys = sorted(weights)[:2]
    weights = canonical_hf_text_state_dict(weights)
    token_embedding = weights.get(_CLIP_TOKEN_EMBEDDING)
    if token_embedding is None:
        raise CheckpointError(f"not a CLIP text encoder: no {_CLIP_TOKEN_EMBEDDING} (found keys like {file_keys})")
    if PROJECTION_KEY not in weights:
        # CLIP-L files made for SD3 often drop the projection; SD3 was trained with CLIP-L's pooled output as
        # it is, which sd-scripts and ComfyUI reproduce with an identity projection.
        weights[PROJECTION_KEY] = torch.eye(token_embedding.shape[1], dtype=token_embedding.dtype)
    return load_clip_text_model(weights, with_projection=True, hidden_act=_CLIP_ACT[name])


def t5_config_from_state_dict(state_dict: Mapping[str, Tensor]) -> T5Config:
    """A T5 encoder config read off its weights. Not stored, so fixed by T5 v1.1's convention: layer-norm
    epsilon 1e-6 and a relative-position horizon of 128; the feed-forward is gated-gelu when ``wi_0`` exists."""
    embedding = state_dict.get(_T5_SHARED, state_dict.get(_T5_EMBED))
    if embedding is None:
        raise CheckpointError(f"T5 weights have neither {_T5_SHARED} nor {_T5_EMBED}; is this a T5 encoder file?")
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = state_dict[attention + "relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state_dict
    first_ff = "wi_0" if gated else "wi"
    return T5Config(
        vocab_size=embedding.shape[0],
        d_model=embedding.shape[1],
        d_kv=state_dict[attention + "q.weight"].shape[0] // heads,
        num_heads=heads,
        d_ff=state_dict[f"encoder.block.0.layer.1.DenseReluDense.{first_ff}.weight"].shape[0],
        num_layers=len({int(match.group(1)) for key in state_dict if (match := _T5_BLOCK.match(key))}),
        feed_forward_proj="gated-gelu" if gated else "relu",
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def load_t5_encoder(state_dict: Mapping[str, Tensor]) -> T5EncoderModel:
    """Build a T5EncoderModel from HF-layout weights (keys ``shared.weight`` / ``encoder.*``).

    Files store the token embedding once, as ``shared.weight`` or as ``encoder.embed_tokens.weight``; the
    model ties the two, so either fills both.
    """
    weights = dict(state_dict)
    config = t5_config_from_state_dict(weights)
    embedding = weights.get(_T5_SHARED, weights.get(_T5_EMBED))
    weights[_T5_SHARED] = weights[_T5_EMBED] = embedding
    return build_model(T5EncoderModel, config, weights, "T5 encoder")


def _check_widths(config: MMDiTConfig, text: Sd3TextEncoders, path: Path) -> None:
    """The encoders must fit the MMDiT: pooled widths add up to adm_in_channels, CLIP states fit in the
    context width, T5's width is the context width. A wrong file given to --clip_l & co. shows up here."""
    l_config, g_config = text.clip_l.config, text.clip_g.config
    pooled = l_config.projection_dim + g_config.projection_dim
    lg_width = l_config.hidden_size + g_config.hidden_size
    t5_width = text.t5xxl.config.d_model if text.t5xxl is not None else config.context_in_dim
    problems = []
    if pooled != config.adm_in_channels:
        problems.append(f"CLIP-L + CLIP-G pooled width {pooled} != the MMDiT's {config.adm_in_channels}")
    if t5_width != config.context_in_dim:
        problems.append(f"T5 width {t5_width} != the MMDiT's context width {config.context_in_dim}")
    if lg_width > config.context_in_dim:
        problems.append(f"CLIP-L + CLIP-G width {lg_width} exceeds the context width {config.context_in_dim}")
    if problems:
        raise CheckpointError(
            f"the text encoders do not fit the MMDiT of {path}: {'; '.join(problems)} "
            "(check that --clip_l, --clip_g and --t5xxl name the right files)"
        )
