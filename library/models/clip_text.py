"""sd-scripts' long-prompt handling for CLIP: ``--max_token_length`` 150/225 and ``--clip_skip``.

CLIP sees 77 positions: <BOS>, 75 tokens, <EOS>/padding. sd-scripts tokenizes a caption to
``max_token_length + 2`` tokens, cuts the 75-token body into windows of 75, wraps each window in the
caption's own first and last token, encodes the windows as separate sequences and concatenates the hidden
states back: the first window's <BOS>, every window's 75 body states, and the last window's final state.
A 225-token setting therefore always yields 1 + 3*75 + 1 = 227 conditioning positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import LongTensor, Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.prompt_weights import parse_prompt_weights


def num_chunks(max_token_length: int | None, body_length: int = 75) -> int:
    """Windows a ``--max_token_length`` needs: None or 75 -> 1, 150 -> 2, 225 -> 3."""
    if max_token_length is None:
        return 1
    if max_token_length <= 0 or max_token_length % body_length:
        raise ValueError(
            f"--max_token_length must be a multiple of {body_length} (75, 150 or 225), got {max_token_length}"
        )
    return max_token_length // body_length


def tokenize_chunked(tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int | None) -> LongTensor:
    """Token ids (B, n_chunks, 77), each window ``<BOS> 75 tokens <last token>`` as sd-scripts builds them.

    With one window this is exactly the plain padded tokenization. When the tokenizer pads with something
    other than <EOS> (SD2, SDXL's second encoder), windows are closed the way sd-scripts closes them: a window
    cut off inside the text ends in <EOS> rather than padding, and an all-padding window starts ``<BOS> <EOS>``.
    """
    body = tokenizer.model_max_length - 2
    chunks = num_chunks(max_token_length, body)
    ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=chunks * body + 2, return_tensors="pt"
    ).input_ids
    return _windows(tokenizer, ids, chunks)


def tokenize_weighted_chunked(
    tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int | None
) -> tuple[LongTensor, Tensor]:
    """``tokenize_chunked`` for captions with prompt weights (``--weighted_captions``): the token ids (B, n, 77)
    of the text with its weighting brackets read (``library.prompt_weights``), and the weight (B, 77 + 75*(n-1))
    of each position of the joined conditioning ``encode_chunked`` returns.

    Every token of a weighted span carries the span's weight; <BOS>, <EOS>, padding and the window edges 1.0.
    Each span is tokenized alone, as sd-scripts does, so a bracket also ends a word. Text without brackets
    gives exactly ``tokenize_chunked``'s ids and all-ones weights.
    """
    body = tokenizer.model_max_length - 2
    chunks = num_chunks(max_token_length, body)
    room = chunks * body
    spans = [parse_prompt_weights(caption) for caption in captions]
    # Each span is cut to the room there is (the joined tokens are cut again below), which also keeps the
    # tokenizer from warning that a long caption overflows the model.
    texts = [text for caption in spans for text, _ in caption]
    span_ids = iter(tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room).input_ids)
    rows, weights = [], []
    for caption in spans:
        pieces = [(next(span_ids), weight) for _, weight in caption]
        ids = [token for piece, _ in pieces for token in piece][:room]
        row_weights = [weight for piece, weight in pieces for _ in piece][:room]
        padding = room - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *row_weights] + [1.0] * (padding + 1))
    return _windows(tokenizer, torch.tensor(rows), chunks), torch.tensor(weights, dtype=torch.float32)


def apply_token_weights(hidden: Tensor, weights: Tensor) -> Tensor:
    """Scale each conditioning position (B, L, D) by its weight (B, L), in float32 as sd-scripts does.

    The mean is not restored afterwards: sd-scripts' training path has not re-normalised it since its
    tokenize/encode rework (its older helper and its preview pipeline still do)."""
    if weights.shape != hidden.shape[:2]:
        raise ValueError(f"token weights {tuple(weights.shape)} do not match the conditioning {tuple(hidden.shape)}")
    return hidden * weights.to(hidden.device, torch.float32).unsqueeze(-1)


def _windows(tokenizer: CLIPTokenizer, ids: LongTensor, chunks: int) -> LongTensor:
    """Padded ids (B, 75n + 2) cut into n windows (B, n, 77)."""
    body = tokenizer.model_max_length - 2
    first, last = ids[:, :1], ids[:, -1:]
    windows = [torch.cat([first, ids[:, 1 + k * body : 1 + (k + 1) * body], last], dim=1) for k in range(chunks)]
    stacked = torch.stack(windows, dim=1)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        stacked = _close_padded_windows(stacked, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return stacked


def _close_padded_windows(ids: LongTensor, pad_id: int, eos_id: int) -> LongTensor:
    ids = ids.clone()
    cut_in_text = (ids[..., -2] != eos_id) & (ids[..., -2] != pad_id)
    ids[..., -1] = torch.where(cut_in_text, eos_id, ids[..., -1])
    ids[..., 1] = torch.where(ids[..., 1] == pad_id, eos_id, ids[..., 1])
    return ids


def encode_chunked(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection, input_ids: LongTensor, clip_skip: int | None = None
) -> Tensor:
    """Hidden states (B, 77 + 75*(n-1), D) of windowed token ids (B, n, 77).

    ``clip_skip=k`` conditions on the output of the k-th layer from the top, passed through the final layer
    norm as the last layer's output is (k=1, like None, is the usual last hidden state).

    sd-scripts has an SD2-only branch meant to replace the <EOS> state of empty middle windows by the next
    padding state, but its test compares a token id with the token *string*, so it never fires; the SD1 and
    SD2 concatenations are therefore identical, and so are ours.
    """
    batch, chunks, window = input_ids.shape
    flat_ids = input_ids.reshape(batch * chunks, window).to(text_encoder.device)
    hidden = _hidden_states(text_encoder, flat_ids, clip_skip)
    hidden = hidden.reshape(batch, chunks * window, hidden.shape[-1])
    if chunks == 1:
        return hidden
    bodies = [hidden[:, k * window + 1 : (k + 1) * window - 1] for k in range(chunks)]
    return torch.cat([hidden[:, :1], *bodies, hidden[:, -1:]], dim=1)


def _hidden_states(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection, input_ids: LongTensor, clip_skip: int | None
) -> Tensor:
    if clip_skip is None or clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    num_layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= num_layers:
        raise ValueError(f"--clip_skip {clip_skip} is outside 1..{num_layers}, the text encoder's layer count")
    outputs = text_encoder(input_ids, output_hidden_states=True)
    return _final_layer_norm(text_encoder)(outputs.hidden_states[-clip_skip])


def _final_layer_norm(text_encoder: CLIPTextModel | CLIPTextModelWithProjection) -> nn.Module:
    # Recent transformers flattened CLIPTextModel; CLIPTextModelWithProjection still nests text_model.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm
