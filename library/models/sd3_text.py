"""SD3's text conditioning: CLIP-L, CLIP-G and T5-XXL, tokenized and encoded as sd-scripts does, then joined.

The MMDiT takes two tensors per caption:

* ``context`` (B, 77 + T, context_in_dim): the penultimate hidden states of CLIP-L and CLIP-G (not passed
  through the final layer norm), concatenated along the width (768 + 1280 = 2048), zero-padded to T5's width
  (4096) and followed along the sequence by T5's last hidden state (T = ``--t5xxl_max_token_length``).
* ``pooled`` (B, adm_in_channels): CLIP-L's projected pooled output, then CLIP-G's (768 + 1280).

Encoding and joining are separate steps so that the per-encoder outputs can be cached and the per-sample
dropout of one encoder (``--clip_l_dropout_rate`` & co.) applied at batch time, to cached outputs as well.
The outputs of ``encode_sd3`` therefore keep each encoder's part under its own key; widths are read off the
tensors, never assumed, so tiny test models work the same as the released ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from library.fp8 import move_keeping_fp8
from library.models.tokenizers import (
    CLIP_G_TOKENIZER_ID,
    CLIP_L_TOKENIZER_ID,
    T5_XXL_TOKENIZER_ID,
    load_clip_tokenizer,
    load_t5_tokenizer,
)

CLIP_MAX_LENGTH = 77
# sd-scripts pads CLIP-G's tokens with id 0 ("!"), as the OpenCLIP bigG tokenizer did; CLIP-L pads with <EOS>.
CLIP_G_PAD_ID = 0
# Without T5, SD3's reference code conditions on 77 zero tokens in T5's place; sd-scripts does the same.
NO_T5_TOKENS = 77


@dataclass
class Sd3TextEncoders:
    """The three SD3 text encoders. ``t5xxl`` may be None: its part of the context is then zeros."""

    clip_l: CLIPTextModelWithProjection
    clip_g: CLIPTextModelWithProjection
    t5xxl: T5EncoderModel | None


@dataclass
class Sd3Tokenizers:
    """The tokenizer of each encoder; sd-scripts loads them from the hub ids in ``library.models.tokenizers``."""

    clip_l: CLIPTokenizer
    clip_g: CLIPTokenizer
    t5xxl: T5TokenizerFast


@dataclass(frozen=True)
class Sd3TextOptions:
    """How captions become encoder outputs; anything here changes the outputs, so it belongs in cache keys.

    t5_max_length: T5 tokens per caption (``--t5xxl_max_token_length``), padded or truncated to it.
    apply_lg_attn_mask / apply_t5_attn_mask: give the encoders the tokenizer's attention mask, so no token
        attends to padding, and zero the hidden states at padding positions. sd-scripts' flag help promises
        the zeroing ("zero embs") and its first implementation did only that; its current code only passes
        the mask. Doing both keeps each promise; the MMDiT itself attends to every token either way.
    """

    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False

    def __post_init__(self) -> None:
        if self.t5_max_length < 1:
            raise ValueError(f"--t5xxl_max_token_length must be a positive number of tokens, got {self.t5_max_length}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sd3TextOptions:
        """The options from parsed sd-scripts flags (the Namespace is only read)."""
        max_length = args.t5xxl_max_token_length
        return cls(
            t5_max_length=cls.t5_max_length if max_length is None else max_length,
            apply_lg_attn_mask=bool(args.apply_lg_attn_mask),
            apply_t5_attn_mask=bool(args.apply_t5_attn_mask),
        )


# sd-scripts' --t5xxl_dtype values; fp8 is not one (--fp8_base stores T5's Linear weights in fp8 instead).
T5_DTYPES = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class T5Placement:
    """Where T5-XXL runs and in which dtype (``--t5xxl_device``, ``--t5xxl_dtype``).

    None means the default: the training device, and the dtype the other frozen weights take from
    ``--mixed_precision``. T5-XXL is 4.7B parameters (9.5 GB in bf16): ``cpu`` keeps it off the GPU when its
    outputs are not cached, and ``fp32`` avoids the fp16 overflow T5 is known for.
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> T5Placement:
        """The placement from parsed sd-scripts flags; bad values raise a ValueError naming the flag."""
        dtype = None
        if args.t5xxl_dtype is not None:
            dtype = T5_DTYPES.get(args.t5xxl_dtype)
            if dtype is None:
                hint = " (for fp8 weights use --fp8_base with --network_train_unet_only)" if "fp8" in args.t5xxl_dtype else ""
                raise ValueError(f"--t5xxl_dtype {args.t5xxl_dtype!r}: expected one of {', '.join(T5_DTYPES)}{hint}")
        device = _available_device(args.t5xxl_device) if args.t5xxl_device is not None else None
        return cls(device=device, dtype=dtype)

    def resolve(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) for T5, given the training device and the base-weight dtype."""
        return self.device or device, self.dtype or dtype


def _available_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--t5xxl_device {text!r} is not a device name; use e.g. cpu, cuda or cuda:1") from error
    if device.type == "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type != device.type:
        have = f"cpu and {accelerator.type}" if accelerator is not None else "only cpu"
        raise ValueError(f"--t5xxl_device {text}: this machine has no {device.type} device ({have})")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise ValueError(f"--t5xxl_device {text}: this machine has {torch.accelerator.device_count()} {device.type} devices")
    return device


def place_sd3_text_encoders(encoders: Sd3TextEncoders, t5: T5Placement, *, device: torch.device, dtype: torch.dtype) -> None:
    """CLIP-L and CLIP-G go to the training device in ``dtype``; T5 where ``t5`` says.

    Linear weights stored in fp8 (``--fp8_base``) keep their storage dtype. A T5 that carries LoRA layers must
    stay on the training device, where the trained LoRA weights live.
    """
    for clip in (encoders.clip_l, encoders.clip_g):
        move_keeping_fp8(clip, device, dtype)
    if encoders.t5xxl is None:
        return
    t5_device, t5_dtype = t5.resolve(device, dtype)
    if not _same_device(t5_device, device) and _has_replaced_forward(encoders.t5xxl):
        raise ValueError(f"--t5xxl_device {t5_device}: T5-XXL's LoRA (train_t5xxl=True) trains on the training device "
                         f"{device}; drop --t5xxl_device, or train without T5 LoRA")
    move_keeping_fp8(encoders.t5xxl, t5_device, t5_dtype)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    current = torch.accelerator.current_device_index()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _has_replaced_forward(model: nn.Module) -> bool:
    """Whether a network module (LoRA & co.) routes any layer's forward through itself, as sd-scripts' networks do."""
    return any("forward" in vars(module) for module in model.modules())


def load_sd3_tokenizers(cache_dir: str | Path | None) -> Sd3Tokenizers:
    """The tokenizers sd-scripts uses for SD3, from ``--tokenizer_cache_dir`` (sd-scripts' hub-id folders, or a
    diffusers SD3 model folder's ``tokenizer``, ``tokenizer_2``, ``tokenizer_3``) or the hub (saved there)."""
    return Sd3Tokenizers(
        clip_l=load_clip_tokenizer(CLIP_L_TOKENIZER_ID, cache_dir, diffusers_folder="tokenizer"),
        clip_g=load_clip_tokenizer(CLIP_G_TOKENIZER_ID, cache_dir, diffusers_folder="tokenizer_2"),
        t5xxl=load_t5_tokenizer(T5_XXL_TOKENIZER_ID, cache_dir, diffusers_folder="tokenizer_3"),
    )


def tokenize_sd3(tokenizers: Sd3Tokenizers, captions: Sequence[str], options: Sd3TextOptions) -> dict[str, Tensor]:
    """Token ids and attention masks: ``clip_l_ids``/``clip_g_ids`` (B, 77), ``t5_ids`` (B, T) and the
    matching ``*_mask`` (1 on real tokens, including <BOS>/<EOS>, 0 on padding)."""
    captions = list(captions)
    clip_l = _tokenize(tokenizers.clip_l, captions, CLIP_MAX_LENGTH)
    clip_g = _tokenize(tokenizers.clip_g, captions, CLIP_MAX_LENGTH)
    t5 = _tokenize(tokenizers.t5xxl, captions, options.t5_max_length)
    # Forced rather than trusted to the tokenizer's config: a bigG tokenizer saved with another pad token
    # would otherwise change the conditioning.
    g_ids = torch.where(clip_g.attention_mask.bool(), clip_g.input_ids, CLIP_G_PAD_ID)
    return {
        "clip_l_ids": clip_l.input_ids,
        "clip_g_ids": g_ids,
        "t5_ids": t5.input_ids,
        "clip_l_mask": clip_l.attention_mask,
        "clip_g_mask": clip_g.attention_mask,
        "t5_mask": t5.attention_mask,
    }


def _tokenize(tokenizer: CLIPTokenizer | T5TokenizerFast, captions: list[str], max_length: int):
    return tokenizer(captions, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")


def encode_sd3(encoders: Sd3TextEncoders, tokens: dict[str, Tensor], options: Sd3TextOptions) -> dict[str, Tensor]:
    """Run the encoders (gradients flow if enabled, for text-encoder LoRA). Returns per-encoder parts:

    ``clip_l_hidden`` (B, 77, 768), ``clip_g_hidden`` (B, 77, 1280), ``clip_l_pooled`` (B, 768),
    ``clip_g_pooled`` (B, 1280), ``t5_hidden`` (B, T, 4096) unless there is no T5, and the three masks.
    Hidden states are on CLIP-L's device (the training device): T5 may run elsewhere (``--t5xxl_device``) and
    its states are brought over, in T5's dtype.
    """
    l_hidden, l_pooled = _encode_clip(encoders.clip_l, tokens["clip_l_ids"], tokens["clip_l_mask"], options)
    g_hidden, g_pooled = _encode_clip(encoders.clip_g, tokens["clip_g_ids"], tokens["clip_g_mask"], options)
    outputs = {
        "clip_l_hidden": l_hidden,
        "clip_g_hidden": g_hidden,
        "clip_l_pooled": l_pooled,
        "clip_g_pooled": g_pooled,
        "clip_l_mask": tokens["clip_l_mask"],
        "clip_g_mask": tokens["clip_g_mask"],
    }
    if encoders.t5xxl is not None:
        t5_hidden = _encode_t5(encoders.t5xxl, tokens["t5_ids"], tokens["t5_mask"], options)
        outputs["t5_hidden"] = t5_hidden.to(l_hidden.device)
        outputs["t5_mask"] = tokens["t5_mask"]
    return outputs


def _encode_clip(
    encoder: CLIPTextModelWithProjection, ids: Tensor, mask: Tensor, options: Sd3TextOptions
) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states without the final layer norm, projected pooled output), as SD3 uses them."""
    mask = mask.to(encoder.device)
    output = encoder(
        input_ids=ids.to(encoder.device),
        attention_mask=mask if options.apply_lg_attn_mask else None,
        output_hidden_states=True,
    )
    hidden = output.hidden_states[-2]
    if options.apply_lg_attn_mask:
        hidden = zero_padding(hidden, mask)
    return hidden, output.text_embeds


def _encode_t5(encoder: T5EncoderModel, ids: Tensor, mask: Tensor, options: Sd3TextOptions) -> Tensor:
    """T5 computes in its own dtype (``--t5xxl_dtype``), whatever autocast the training step runs under: an fp32
    T5 in a bf16 run stays fp32, and a half-precision T5 gets autocast in its dtype so fp32 LoRA weights on it
    still work. The dtype is read off the token embedding, which fp8 storage never touches."""
    device, dtype = encoder.device, encoder.get_input_embeddings().weight.dtype
    mask = mask.to(device)
    with torch.autocast(device.type, dtype=dtype if dtype in _HALF_DTYPES else torch.bfloat16, enabled=dtype in _HALF_DTYPES):
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask if options.apply_t5_attn_mask else None)
    hidden = hidden.last_hidden_state
    return zero_padding(hidden, mask) if options.apply_t5_attn_mask else hidden


def zero_padding(hidden: Tensor, mask: Tensor) -> Tensor:
    """Hidden states (B, L, D) with the positions where ``mask`` (B, L) is 0 set to zero."""
    return hidden * mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)


def dropout_masks(
    batch_size: int, *, clip_l_rate: float, clip_g_rate: float, t5_rate: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Which samples drop CLIP-L, CLIP-G and T5 (bool (B,) each, drawn independently in that order).

    A rate of 0 never drops and 1 always does, as in sd-scripts' ``--clip_l_dropout_rate`` & co.
    """
    rates = {"--clip_l_dropout_rate": clip_l_rate, "--clip_g_dropout_rate": clip_g_rate, "--t5_dropout_rate": t5_rate}
    for flag, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{flag} must be between 0 and 1, got {rate}")
    device = generator.device if generator is not None else "cpu"
    draws = [torch.rand(batch_size, generator=generator, device=device) for _ in rates]
    l_drop, g_drop, t5_drop = (draw < rate for draw, rate in zip(draws, rates.values(), strict=True))
    return l_drop, g_drop, t5_drop


def sd3_conditioning(
    outputs: dict[str, Tensor],
    *,
    clip_l_drop: Tensor | None = None,
    clip_g_drop: Tensor | None = None,
    t5_drop: Tensor | None = None,
    context_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Join ``encode_sd3`` outputs (fresh or cached) into the MMDiT's (context, pooled).

    A dropped encoder's part is zeroed for those samples, as sd-scripts does: CLIP-L's hidden states and
    its half of ``pooled``, CLIP-G's likewise, T5's tokens. ``context_dim`` (the MMDiT's context_in_dim) is
    needed only when there is no T5 output to take the width from; given both, they must agree.
    """
    l_hidden = _keep(outputs["clip_l_hidden"], clip_l_drop)
    g_hidden = _keep(outputs["clip_g_hidden"], clip_g_drop).to(l_hidden)
    l_pooled = _keep(outputs["clip_l_pooled"], clip_l_drop)
    pooled = torch.cat([l_pooled, _keep(outputs["clip_g_pooled"], clip_g_drop).to(l_pooled)], dim=-1)
    lg_hidden = torch.cat([l_hidden, g_hidden], dim=-1)
    t5_hidden = outputs.get("t5_hidden")
    width = _context_width(lg_hidden.shape[-1], t5_hidden, context_dim)
    if t5_hidden is None:
        t5_hidden = lg_hidden.new_zeros(lg_hidden.shape[0], NO_T5_TOKENS, width)
    else:
        t5_hidden = _keep(t5_hidden.to(lg_hidden), t5_drop)
    lg_hidden = torch.nn.functional.pad(lg_hidden, (0, width - lg_hidden.shape[-1]))
    return torch.cat([lg_hidden, t5_hidden], dim=1), pooled


def _keep(part: Tensor, drop: Tensor | None) -> Tensor:
    """``part`` with the rows of dropped samples zeroed (multiplied, so gradients stay defined)."""
    if drop is None:
        return part
    keep = (~drop.to(device=part.device, dtype=torch.bool)).to(part.dtype)
    return part * keep.view(-1, *([1] * (part.ndim - 1)))


def _context_width(lg_width: int, t5_hidden: Tensor | None, context_dim: int | None) -> int:
    if t5_hidden is None and context_dim is None:
        raise ValueError("SD3 conditioning without T5 outputs needs context_dim (the MMDiT's context_in_dim)")
    width = t5_hidden.shape[-1] if t5_hidden is not None else context_dim
    if context_dim is not None and width != context_dim:
        raise ValueError(f"T5 outputs are {width} wide but the MMDiT takes {context_dim}-wide context tokens")
    if lg_width > width:
        raise ValueError(f"CLIP-L + CLIP-G states ({lg_width} wide) do not fit the {width}-wide context")
    return width
