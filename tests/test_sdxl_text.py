"""SDXL text conditioning: both tokenizers, the two encoders' penultimate states, bigG's pooled output and
sd-scripts' --max_token_length windows.

Oracles: diffusers' StableDiffusionXLPipeline.encode_prompt (an independent implementation of SDXL's
conditioning) for single windows, token sequences written out by hand, and per-window encodings stitched by
hand for the long-caption windows, whose only reference is sd-scripts' description.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from library.fixtures.tiny_sd import EOS_TOKEN, write_tiny_clip_tokenizer
from library.fixtures.tiny_sdxl import (
    TINY_CLIP_G_PROJECTION,
    TINY_CLIP_G_WIDTH,
    TINY_CLIP_L_WIDTH,
    tiny_sdxl_text_encoders,
    tiny_sdxl_text_weights,
)
from library.models.sdxl_text import (
    BIGG_PAD_ID,
    SdxlTokenizers,
    encode_sdxl,
    join_windows,
    load_sdxl_tokenizers,
    tokenize_sdxl,
)
from library.models.text_encoders import load_clip_text_model
from library.models.tokenizers import CLIP_G_TOKENIZER_ID, CLIP_L_TOKENIZER_ID, tokenizer_cache_folder

CAPTIONS = ["a photo of a cat", "a red circle on a blue to green gradient"]
# 90 one-token words: longer than one 75-token window, shorter than two.
LONG_CAPTION = " ".join(["red", "dog", "blue"] * 30)


@pytest.fixture(scope="module")
def tokenizers(sdxl_tokenizer_cache_dir: Path) -> SdxlTokenizers:
    return load_sdxl_tokenizers(sdxl_tokenizer_cache_dir)


@pytest.fixture(scope="module")
def encoders():
    return tiny_sdxl_text_encoders(seed=0)


def ids_of(tokenizer, words: str) -> list[int]:
    """Token ids of the words alone, without <BOS>/<EOS>."""
    return tokenizer(words).input_ids[1:-1]


# ---- tokenizers ------------------------------------------------------------------------------------------


def test_tokenizers_come_from_the_cache_with_sdxl_padding(tokenizers):
    bos, eos = tokenizers.clip_l.bos_token_id, tokenizers.clip_l.eos_token_id
    assert tokenizers.clip_l.pad_token_id == eos
    assert tokenizers.clip_g.pad_token_id == BIGG_PAD_ID == 0
    assert tokenizers.clip_g.convert_ids_to_tokens(0) == "!"
    assert (tokenizers.clip_g.bos_token_id, tokenizers.clip_g.eos_token_id) == (bos, eos)


def test_bigg_pads_with_id_0_even_when_its_saved_tokenizer_pads_with_eos(tmp_path):
    write_tiny_clip_tokenizer(tokenizer_cache_folder(tmp_path, CLIP_L_TOKENIZER_ID))
    write_tiny_clip_tokenizer(tokenizer_cache_folder(tmp_path, CLIP_G_TOKENIZER_ID), pad_token=EOS_TOKEN)
    tokenizers = load_sdxl_tokenizers(tmp_path)
    ids = tokenize_sdxl(tokenizers, ["a cat"])["clip_g_ids"]
    assert ids[0, 0, 4:].tolist() == [0] * 73


def test_single_window_tokens_by_hand(tokenizers):
    tokens = tokenize_sdxl(tokenizers, ["a photo of a cat"])
    bos, eos = tokenizers.clip_l.bos_token_id, tokenizers.clip_l.eos_token_id
    words = ids_of(tokenizers.clip_l, "a photo of a cat")
    assert len(words) == 5
    assert tokens["clip_l_ids"].shape == tokens["clip_g_ids"].shape == (1, 1, 77)
    assert tokens["clip_l_ids"][0, 0].tolist() == [bos, *words, eos] + [eos] * 70
    assert tokens["clip_g_ids"][0, 0].tolist() == [bos, *words, eos] + [0] * 70


def test_max_token_length_150_windows_by_hand(tokenizers):
    tokens = tokenize_sdxl(tokenizers, [LONG_CAPTION, "a cat"], max_token_length=150)
    bos, eos = tokenizers.clip_l.bos_token_id, tokenizers.clip_l.eos_token_id
    words = ids_of(tokenizers.clip_l, LONG_CAPTION)
    short = ids_of(tokenizers.clip_l, "a cat")
    assert len(words) == 90
    l_ids, g_ids = tokens["clip_l_ids"], tokens["clip_g_ids"]
    assert l_ids.shape == g_ids.shape == (2, 2, 77)
    # A window cut off inside the text is closed with <EOS> for both tokenizers.
    assert l_ids[0, 0].tolist() == g_ids[0, 0].tolist() == [bos, *words[:75], eos]
    assert l_ids[0, 1].tolist() == [bos, *words[75:], eos] + [eos] * 60
    assert g_ids[0, 1].tolist() == [bos, *words[75:], eos] + [0] * 60
    # An all-padding window starts <BOS> <EOS> (so bigG has an <EOS> to look at) and pads after it.
    assert l_ids[1, 1].tolist() == [bos] + [eos] * 76
    assert g_ids[1, 1].tolist() == [bos, eos] + [0] * 75
    assert g_ids[1, 0].tolist() == [bos, *short, eos] + [0] * 73


def test_max_token_length_must_be_a_multiple_of_75(tokenizers):
    with pytest.raises(ValueError, match="--max_token_length"):
        tokenize_sdxl(tokenizers, CAPTIONS, max_token_length=100)


# ---- encoding --------------------------------------------------------------------------------------------


def test_single_window_equals_diffusers_sdxl_pipeline(tokenizers, encoders):
    clip_l, clip_g = encoders
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=tokenizers.clip_l,
        tokenizer_2=tokenizers.clip_g,
        unet=None,
        scheduler=EulerDiscreteScheduler(),
    )
    with torch.no_grad():
        expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False
        )
        outputs = encode_sdxl(clip_l, clip_g, tokenize_sdxl(tokenizers, CAPTIONS))
    assert outputs["hidden_states"].shape == (2, 77, TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH)
    assert outputs["pooled"].shape == (2, TINY_CLIP_G_PROJECTION)
    torch.testing.assert_close(outputs["hidden_states"], expected_hidden, rtol=0, atol=0)
    torch.testing.assert_close(outputs["pooled"], expected_pooled, rtol=0, atol=0)


def test_states_are_penultimate_without_final_norm_and_pooled_is_projected_eos(tokenizers, encoders):
    clip_l, clip_g = encoders
    tokens = tokenize_sdxl(tokenizers, CAPTIONS)
    with torch.no_grad():
        outputs = encode_sdxl(clip_l, clip_g, tokens)
        l_states = clip_l(tokens["clip_l_ids"][:, 0], output_hidden_states=True).hidden_states
        g_states = clip_g(tokens["clip_g_ids"][:, 0], output_hidden_states=True).hidden_states
        # Pooling by hand: the final layer's state after the final layer norm, at the first <EOS>, projected.
        eos = tokenizers.clip_g.eos_token_id
        first_eos = [row.tolist().index(eos) for row in tokens["clip_g_ids"][:, 0]]
        final = clip_g.text_model.final_layer_norm(g_states[-1])
        pooled = torch.stack([final[b, i] for b, i in enumerate(first_eos)]) @ clip_g.text_projection.weight.T
    assert len(l_states) == len(g_states) == 4  # embeddings + 3 layers: index -2 is the second layer's output
    torch.testing.assert_close(outputs["hidden_states"][..., :TINY_CLIP_L_WIDTH], l_states[2], rtol=0, atol=0)
    torch.testing.assert_close(outputs["hidden_states"][..., TINY_CLIP_L_WIDTH:], g_states[2], rtol=0, atol=0)
    torch.testing.assert_close(outputs["pooled"], pooled)
    assert first_eos == [6, 10]


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_captions_stitch_windows_and_pool_the_first(tokenizers, encoders, max_token_length):
    clip_l, clip_g = encoders
    captions = [LONG_CAPTION, "a cat"]
    tokens = tokenize_sdxl(tokenizers, captions, max_token_length=max_token_length)
    windows = max_token_length // 75
    with torch.no_grad():
        outputs = encode_sdxl(clip_l, clip_g, tokens)
        expected_hidden, expected_pooled = [], []
        for b in range(len(captions)):
            per_window = []
            for k in range(windows):
                l_out = clip_l(tokens["clip_l_ids"][b, k : k + 1], output_hidden_states=True)
                g_out = clip_g(tokens["clip_g_ids"][b, k : k + 1], output_hidden_states=True)
                per_window.append(torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)[0])
                if k == 0:
                    expected_pooled.append(g_out.text_embeds[0])
            pieces = [per_window[0][:1]] + [window[1:76] for window in per_window] + [per_window[-1][76:]]
            expected_hidden.append(torch.cat(pieces))
    assert outputs["hidden_states"].shape == (2, 2 + 75 * windows, TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH)
    torch.testing.assert_close(outputs["hidden_states"], torch.stack(expected_hidden))
    torch.testing.assert_close(outputs["pooled"], torch.stack(expected_pooled))


def test_long_caption_keeps_the_first_window_of_the_plain_encoding(tokenizers, encoders):
    """The first 75 tokens and the pooled vector do not depend on --max_token_length: window 0 is exactly the
    truncated single-window tokenization, so a long caption only adds states."""
    clip_l, clip_g = encoders
    with torch.no_grad():
        plain = encode_sdxl(clip_l, clip_g, tokenize_sdxl(tokenizers, [LONG_CAPTION]))
        long = encode_sdxl(clip_l, clip_g, tokenize_sdxl(tokenizers, [LONG_CAPTION], max_token_length=150))
    torch.testing.assert_close(long["hidden_states"][:, :76], plain["hidden_states"][:, :76])
    torch.testing.assert_close(long["pooled"], plain["pooled"])
    assert not torch.allclose(long["hidden_states"][:, 76], plain["hidden_states"][:, 76])


def test_join_windows_order_by_hand():
    hidden = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(6, 77, 1)  # 2 captions x 3 windows
    joined = join_windows(hidden, 3)
    assert joined.shape == (2, 227, 1)
    for b in range(2):
        base = b * 3 * 77
        expected = [base] + [base + k * 77 + i for k in range(3) for i in range(1, 76)] + [base + 2 * 77 + 76]
        assert joined[b, :, 0].tolist() == expected
    torch.testing.assert_close(join_windows(hidden, 1), hidden)
    with pytest.raises(ValueError, match="windows"):
        join_windows(hidden, 4)


def test_mismatched_token_shapes_are_refused(tokenizers, encoders):
    tokens = tokenize_sdxl(tokenizers, CAPTIONS)
    tokens["clip_g_ids"] = tokens["clip_g_ids"][:1]
    with pytest.raises(ValueError, match="tokenize_sdxl"):
        encode_sdxl(*encoders, tokens)


def test_gradients_reach_both_encoders_and_only_pooling_uses_the_last_layers(tokenizers):
    weights = tiny_sdxl_text_weights(torch.Generator().manual_seed(1))
    clip_l = load_clip_text_model(weights["clip_l"], hidden_act="quick_gelu")
    clip_g = load_clip_text_model(weights["clip_g"], with_projection=True, hidden_act="gelu")
    outputs = encode_sdxl(clip_l, clip_g, tokenize_sdxl(tokenizers, CAPTIONS, max_token_length=150))
    l_layers, g_layers = layers_of(clip_l), layers_of(clip_g)
    outputs["hidden_states"].square().mean().backward(retain_graph=True)
    assert l_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert g_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert l_layers[-1].mlp.fc2.weight.grad is None and g_layers[-1].mlp.fc2.weight.grad is None
    outputs["pooled"].square().mean().backward()
    assert g_layers[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert clip_g.text_projection.weight.grad.abs().sum() > 0
    assert l_layers[-1].mlp.fc2.weight.grad is None


def layers_of(encoder) -> torch.nn.ModuleList:
    # Recent transformers flattened CLIPTextModel; CLIPTextModelWithProjection still nests text_model.
    return getattr(encoder, "text_model", encoder).encoder.layers
