"""SDXL's text conditioning: CLIP-L and OpenCLIP ViT-bigG, tokenized and encoded as sd-scripts does, then joined.

The U-Net takes two tensors per caption:

* ``hidden_states`` (B, 77 + 75*(n-1), 2048): the penultimate hidden states of CLIP-L (768) and bigG (1280),
  neither passed through its final layer norm, concatenated along the width.
* ``pooled`` (B, 1280): bigG's pooled output, i.e. its *last* hidden state after the final layer norm, taken at
  the first <EOS> token and multiplied by ``text_projection``. The U-Net's ``label_emb`` consumes it together
  with the size embedding (see ``sdxl_conditioning``).

``--max_token_length`` 150/225 cuts each caption into n windows of 77 tokens (``clip_text.tokenize_chunked``),
encodes them as separate sequences and stitches the hidden states back: the first window's <BOS>, each window's
75 body states, the last window's final state. The pooled output comes from the first window only
(sd-scripts' ``pool2[::n]``), so the text past token 75 reaches the U-Net through ``hidden_states`` alone.

Tokenizers: CLIP-L pads with <EOS>; bigG pads with "!" (id 0), as the OpenCLIP tokenizer SDXL was trained with
did; sd-scripts forces that id whatever the saved tokenizer says, and so do we. Widths are read off the tensors,
so tiny test encoders go through the same code as the released ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.models.clip_text import apply_token_weights, tokenize_chunked, tokenize_weighted_chunked
from library.models.tokenizers import CLIP_G_TOKENIZER_ID, CLIP_L_TOKENIZER_ID, load_clip_tokenizer

# OpenCLIP's tokenizer pads with id 0 ("!"); sd-scripts sets it on the bigG tokenizer it loads from the hub.
BIGG_PAD_ID = 0


@dataclass
class SdxlTokenizers:
    """CLIP-L's and bigG's tokenizers (the same BPE vocabulary, different padding)."""

    clip_l: CLIPTokenizer
    clip_g: CLIPTokenizer


def load_sdxl_tokenizers(cache_dir: str | Path | None) -> SdxlTokenizers:
    """The tokenizers sd-scripts uses for SDXL, from ``--tokenizer_cache_dir`` or the hub (saved there)."""
    clip_g = load_clip_tokenizer(CLIP_G_TOKENIZER_ID, cache_dir)
    clip_g.pad_token_id = BIGG_PAD_ID
    return SdxlTokenizers(clip_l=load_clip_tokenizer(CLIP_L_TOKENIZER_ID, cache_dir), clip_g=clip_g)


def tokenize_sdxl(
    tokenizers: SdxlTokenizers, captions: Sequence[str], max_token_length: int | None = None, *, weighted: bool = False
) -> dict[str, Tensor]:
    """Token ids ``clip_l_ids`` and ``clip_g_ids``, each (B, n, 77) with n = 1, 2, 3 windows for
    ``--max_token_length`` None/75, 150, 225. The two differ only after the caption's <EOS> (padding).

    ``weighted`` (``--weighted_captions``) reads the captions' prompt weights: the ids are those of the text
    without its weighting brackets, and ``clip_l_weights`` / ``clip_g_weights`` (B, 77 + 75*(n-1)) hold the
    weight of each position of the two encoders' joined hidden states (``encode_sdxl`` applies them).
    """
    captions = list(captions)
    if not weighted:
        return {
            "clip_l_ids": tokenize_chunked(tokenizers.clip_l, captions, max_token_length),
            "clip_g_ids": tokenize_chunked(tokenizers.clip_g, captions, max_token_length),
        }
    ids_l, weights_l = tokenize_weighted_chunked(tokenizers.clip_l, captions, max_token_length)
    ids_g, weights_g = tokenize_weighted_chunked(tokenizers.clip_g, captions, max_token_length)
    return {"clip_l_ids": ids_l, "clip_g_ids": ids_g, "clip_l_weights": weights_l, "clip_g_weights": weights_g}


def encode_sdxl(
    text_encoder_l: CLIPTextModel,
    text_encoder_g: CLIPTextModelWithProjection,
    tokens: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Run both encoders on ``tokenize_sdxl`` output (gradients flow if enabled, for text-encoder LoRA).

    Returns ``hidden_states`` (B, 77 + 75*(n-1), D_l + D_g) and ``pooled`` (B, bigG projection width), on the
    device of ``text_encoder_l``; the dtype is the wider of the two encoders' output dtypes.

    Token weights in ``tokens`` scale each encoder's hidden states position by position (in float32), as
    sd-scripts weights them; the pooled output is left unweighted, as there.
    """
    ids_l, ids_g = tokens["clip_l_ids"], tokens["clip_g_ids"]
    if ids_l.ndim != 3 or ids_l.shape != ids_g.shape:
        raise ValueError(
            f"SDXL token ids must be two (batch, windows, 77) tensors of one shape, got clip_l_ids "
            f"{tuple(ids_l.shape)} and clip_g_ids {tuple(ids_g.shape)}; build them with tokenize_sdxl"
        )
    batch, windows, _ = ids_l.shape
    output_l = text_encoder_l(ids_l.flatten(0, 1).to(text_encoder_l.device), output_hidden_states=True)
    output_g = text_encoder_g(ids_g.flatten(0, 1).to(text_encoder_g.device), output_hidden_states=True)
    hidden_l = join_windows(output_l.hidden_states[-2], windows)
    hidden_g = join_windows(output_g.hidden_states[-2], windows).to(hidden_l.device)
    if "clip_l_weights" in tokens:
        hidden_l = apply_token_weights(hidden_l, tokens["clip_l_weights"])
        hidden_g = apply_token_weights(hidden_g, tokens["clip_g_weights"])
    # text_embeds is the projected final-layer state at the first <EOS> (our configs name <EOS> as eos_token_id).
    pooled = output_g.text_embeds.unflatten(0, (batch, windows))[:, 0]
    return {"hidden_states": torch.cat([hidden_l, hidden_g], dim=-1), "pooled": pooled.to(hidden_l.device)}


def join_windows(hidden: Tensor, windows: int) -> Tensor:
    """Hidden states of windows encoded separately (B*n, 77, D) -> one sequence per caption (B, 77 + 75*(n-1), D):
    the first window's <BOS> state, every window's 75 body states, the last window's final state."""
    if hidden.shape[0] % windows:
        raise ValueError(f"{hidden.shape[0]} encoded windows do not split into captions of {windows} windows")
    per_caption = hidden.unflatten(0, (-1, windows))  # (B, n, 77, D)
    if windows == 1:
        return per_caption[:, 0]
    bodies = per_caption[:, :, 1:-1].flatten(1, 2)  # (B, n*75, D)
    return torch.cat([per_caption[:, 0, :1], bodies, per_caption[:, -1, -1:]], dim=1)
