"""SD3 text conditioning: tokenizers, the three encoders, masks, dropout and the joined context / pooled vector.

Oracles: plain transformers models built from the fixture's weights with transformers' own ``load_state_dict``,
the CLIP pooling formula written out (final layer norm at <EOS>, then the projection), T5 run on the unpadded
caption, the sentencepiece processor itself, and layouts written out by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from library.fixtures.tiny_sd import EOS_TOKEN, tiny_clip_vocab
from library.fixtures.tiny_sd3 import (
    TINY_CLIP_G_WIDTH,
    TINY_CLIP_L_WIDTH,
    TINY_T5_WIDTH,
    tiny_clip_config,
    tiny_sd3_text_encoder_weights,
    tiny_t5_config,
    write_tiny_t5_tokenizer,
)
from library.models.sd3_text import (
    CLIP_MAX_LENGTH,
    NO_T5_TOKENS,
    Sd3TextEncoders,
    Sd3TextOptions,
    dropout_masks,
    encode_sd3,
    load_sd3_tokenizers,
    sd3_conditioning,
    tokenize_sd3,
)
from library.models.sd3_loading import load_sd3_models
from library.models.tokenizers import T5_XXL_TOKENIZER_ID, TokenizerUnavailable, load_t5_tokenizer

CAPTIONS = ["a red circle", "a photo of the sks dog on a blue to yellow gradient, blurry style"]
L, G = TINY_CLIP_L_WIDTH, TINY_CLIP_G_WIDTH


@pytest.fixture(scope="module")
def tokenizers(sd3_tokenizer_cache_dir):
    return load_sd3_tokenizers(sd3_tokenizer_cache_dir)


@pytest.fixture(scope="module")
def encoders(tiny_sd3_checkpoints) -> Sd3TextEncoders:
    return load_sd3_models(tiny_sd3_checkpoints["sd3-medium"]).text


@pytest.fixture(scope="module")
def reference_models() -> dict[str, torch.nn.Module]:
    """The same encoders built the plain transformers way, independently of our loaders."""
    weights = tiny_sd3_text_encoder_weights()
    models = {
        "clip_l": CLIPTextModelWithProjection(tiny_clip_config("clip_l")),
        "clip_g": CLIPTextModelWithProjection(tiny_clip_config("clip_g")),
        "t5xxl": T5EncoderModel(tiny_t5_config()),
    }
    for name, model in models.items():
        state = {key: value.float() for key, value in weights[name].items()}
        if name == "t5xxl":
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
        model.load_state_dict(state, strict=False)  # CLIP's position_ids buffer is not stored
        model.eval()
    return models


def encode(encoders, tokenizers, options, captions=CAPTIONS):
    with torch.no_grad():
        return encode_sd3(encoders, tokenize_sd3(tokenizers, captions, options), options)


# ---- tokenizers -------------------------------------------------------------------------------------------------


def test_tokenize_pads_clip_l_with_eos_clip_g_with_zero_and_t5_to_its_length(tokenizers):
    tokens = tokenize_sd3(tokenizers, CAPTIONS, Sd3TextOptions(t5_max_length=40))
    vocab, _ = tiny_clip_vocab()
    eos = vocab[EOS_TOKEN]
    # "a red circle": <BOS> a red circle <EOS>, then padding
    assert tokens["clip_l_mask"][0].tolist() == [1] * 5 + [0] * (CLIP_MAX_LENGTH - 5)
    assert tokens["clip_l_ids"][0, 4:].tolist() == [eos] * (CLIP_MAX_LENGTH - 4)
    assert tokens["clip_g_ids"][0, :5].tolist() == tokens["clip_l_ids"][0, :5].tolist()
    assert tokens["clip_g_ids"][0, 5:].tolist() == [0] * (CLIP_MAX_LENGTH - 5)
    assert torch.equal(tokens["clip_g_mask"], tokens["clip_l_mask"])
    assert tokens["t5_ids"].shape == (2, 40) and tokens["t5_mask"].shape == (2, 40)
    real = int(tokens["t5_mask"][0].sum())
    assert tokens["t5_ids"][0, real - 1] == 1 and tokens["t5_ids"][0, real:].eq(0).all()  # </s>, then <pad>


def test_clip_g_pads_with_zero_even_if_its_tokenizer_pads_otherwise(tokenizers):
    eos_padding = dataclasses.replace(tokenizers, clip_g=tokenizers.clip_l)
    tokens = tokenize_sd3(eos_padding, CAPTIONS, Sd3TextOptions())
    assert tokens["clip_g_ids"][0, 5:].eq(0).all() and tokens["clip_l_ids"][0, 5:].ne(0).all()


def test_t5_tokenizer_is_the_trained_sentencepiece_model(sd3_tokenizer_cache_dir, tokenizers):
    folder = sd3_tokenizer_cache_dir / "google_t5-v1_1-xxl"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    for caption in CAPTIONS:
        assert tokenizers.t5xxl(caption).input_ids == processor.encode(caption) + [processor.eos_id()]


def test_t5_truncates_to_the_max_length_and_keeps_eos(tokenizers):
    tokens = tokenize_sd3(tokenizers, CAPTIONS, Sd3TextOptions(t5_max_length=6))
    assert tokens["t5_ids"].shape == (2, 6)
    assert tokens["t5_mask"][1].tolist() == [1] * 6 and tokens["t5_ids"][1, -1] == 1


def test_cache_folders_use_sd_scripts_names(sd3_tokenizer_cache_dir):
    names = sorted(path.name for path in sd3_tokenizer_cache_dir.iterdir())
    assert names == ["google_t5-v1_1-xxl", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "openai_clip-vit-large-patch14"]
    assert (sd3_tokenizer_cache_dir / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()


@pytest.fixture
def fake_t5_hub(monkeypatch):
    """T5TokenizerFast.from_pretrained that serves local folders, hub ids from ``served`` or raises OSError."""
    real = T5TokenizerFast.from_pretrained
    served: dict[str, Path | None] = {}

    def from_pretrained(name, *args, **kwargs):
        if Path(name).is_dir():
            return real(name, *args, **kwargs)
        if str(name) in served:
            folder = served[str(name)]
            return real(folder) if folder is not None else T5TokenizerFast()  # None: the empty placeholder
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.\nCheck your connection.")

    monkeypatch.setattr(T5TokenizerFast, "from_pretrained", from_pretrained)
    return served


def test_offline_without_cache_says_which_folder_to_fill(fake_t5_hub, tmp_path):
    with pytest.raises(TokenizerUnavailable) as error:
        load_t5_tokenizer(T5_XXL_TOKENIZER_ID, tmp_path)
    message = str(error.value)
    assert "offline" in message and str(tmp_path / "google_t5-v1_1-xxl") in message and "\n" not in message
    with pytest.raises(TokenizerUnavailable, match="--tokenizer_cache_dir DIR"):
        load_t5_tokenizer(T5_XXL_TOKENIZER_ID, None)


def test_hub_t5_tokenizer_is_saved_to_the_cache_and_reused_offline(fake_t5_hub, tmp_path):
    fake_t5_hub[T5_XXL_TOKENIZER_ID] = write_tiny_t5_tokenizer(tmp_path / "hub")
    first = load_t5_tokenizer(T5_XXL_TOKENIZER_ID, tmp_path / "cache")
    assert (tmp_path / "cache" / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()
    del fake_t5_hub[T5_XXL_TOKENIZER_ID]
    second = load_t5_tokenizer(T5_XXL_TOKENIZER_ID, tmp_path / "cache")
    assert second(CAPTIONS).input_ids == first(CAPTIONS).input_ids


def test_placeholder_t5_tokenizer_is_refused_and_not_cached(fake_t5_hub, tmp_path):
    fake_t5_hub[T5_XXL_TOKENIZER_ID] = None
    with pytest.raises(TokenizerUnavailable, match="offline"):
        load_t5_tokenizer(T5_XXL_TOKENIZER_ID, tmp_path)
    assert not (tmp_path / "google_t5-v1_1-xxl").exists()


def test_empty_t5_cache_folder_says_to_delete_it(tmp_path):
    (tmp_path / "google_t5-v1_1-xxl").mkdir()
    with pytest.raises(TokenizerUnavailable, match="delete it"):
        load_t5_tokenizer(T5_XXL_TOKENIZER_ID, tmp_path)


def test_sd3_tokenizers_offline_error_names_the_cache_flag(fake_t5_hub, monkeypatch, tmp_path):
    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.")

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", offline)
    with pytest.raises(TokenizerUnavailable, match="--tokenizer_cache_dir"):
        load_sd3_tokenizers(tmp_path)


# ---- encoders ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_states_are_the_penultimate_layer_without_final_norm(name, encoders, tokenizers, reference_models):
    tokens = tokenize_sd3(tokenizers, CAPTIONS, Sd3TextOptions())
    outputs = encode(encoders, tokenizers, Sd3TextOptions())
    reference = reference_models[name]
    with torch.no_grad():
        run = reference(input_ids=tokens[f"{name}_ids"], output_hidden_states=True)
        final_norm = reference.text_model.final_layer_norm
        assert torch.allclose(outputs[f"{name}_hidden"], run.hidden_states[-2], atol=1e-5)
        assert not torch.allclose(outputs[f"{name}_hidden"], final_norm(run.hidden_states[-2]), atol=1e-2)
        # pooled: the final-normed state at the first <EOS>, projected
        eos = tokens[f"{name}_ids"].eq(tiny_clip_config(name).eos_token_id).int().argmax(dim=1)
        last = final_norm(run.hidden_states[-1])[torch.arange(len(CAPTIONS)), eos]
        assert torch.allclose(outputs[f"{name}_pooled"], last @ reference.text_projection.weight.T, atol=1e-5)


def test_t5_states_are_its_last_hidden_state(encoders, tokenizers, reference_models):
    options = Sd3TextOptions(t5_max_length=32)
    tokens = tokenize_sd3(tokenizers, CAPTIONS, options)
    outputs = encode(encoders, tokenizers, options)
    with torch.no_grad():
        expected = reference_models["t5xxl"](input_ids=tokens["t5_ids"]).last_hidden_state
    assert outputs["t5_hidden"].shape == (2, 32, TINY_T5_WIDTH)
    assert torch.allclose(outputs["t5_hidden"], expected, atol=1e-5)


def test_t5_mask_hides_padding_and_zeroes_its_states(encoders, tokenizers, reference_models):
    masked_options = Sd3TextOptions(t5_max_length=64, apply_t5_attn_mask=True)
    masked = encode(encoders, tokenizers, masked_options)
    plain = encode(encoders, tokenizers, Sd3TextOptions(t5_max_length=64))
    mask = tokenize_sd3(tokenizers, CAPTIONS, masked_options)["t5_mask"]
    for i, caption in enumerate(CAPTIONS):
        real = int(mask[i].sum())
        unpadded_ids = torch.tensor([tokenizers.t5xxl(caption).input_ids])
        with torch.no_grad():
            alone = reference_models["t5xxl"](input_ids=unpadded_ids).last_hidden_state[0]
        # with the mask, real tokens see only real tokens: the same as encoding the caption without padding
        assert torch.allclose(masked["t5_hidden"][i, :real], alone, atol=1e-5)
        assert not torch.allclose(plain["t5_hidden"][i, :real], alone, atol=1e-3)
        assert masked["t5_hidden"][i, real:].eq(0).all() and plain["t5_hidden"][i, real:].abs().sum() > 0


def test_lg_mask_zeroes_clip_padding_and_keeps_real_tokens(encoders, tokenizers):
    masked = encode(encoders, tokenizers, Sd3TextOptions(apply_lg_attn_mask=True))
    plain = encode(encoders, tokenizers, Sd3TextOptions())
    for name in ("clip_l", "clip_g"):
        mask = masked[f"{name}_mask"].bool()
        # CLIP attends causally, so real tokens never saw the padding: only the padding rows change
        assert torch.allclose(masked[f"{name}_hidden"][mask], plain[f"{name}_hidden"][mask], atol=1e-5)
        assert masked[f"{name}_hidden"][~mask].eq(0).all() and plain[f"{name}_hidden"][~mask].abs().sum() > 0
        assert torch.allclose(masked[f"{name}_pooled"], plain[f"{name}_pooled"], atol=1e-5)


def test_masks_zero_the_padding_in_the_joined_context(encoders, tokenizers):
    options = Sd3TextOptions(t5_max_length=24, apply_lg_attn_mask=True, apply_t5_attn_mask=True)
    outputs = encode(encoders, tokenizers, options)
    context, _ = sd3_conditioning(outputs)
    l_real, t5_real = int(outputs["clip_l_mask"][0].sum()), int(outputs["t5_mask"][0].sum())
    assert context[0, l_real:CLIP_MAX_LENGTH].eq(0).all()
    assert context[0, CLIP_MAX_LENGTH + t5_real :].eq(0).all()
    assert context[0, :l_real, : L + G].abs().sum(dim=-1).gt(0).all()  # real tokens survive


# ---- joining and dropout ------------------------------------------------------------------------------------------


def test_context_and_pooled_layout(encoders, tokenizers):
    outputs = encode(encoders, tokenizers, Sd3TextOptions(t5_max_length=24))
    context, pooled = sd3_conditioning(outputs, context_dim=TINY_T5_WIDTH)
    assert context.shape == (2, CLIP_MAX_LENGTH + 24, TINY_T5_WIDTH) and pooled.shape == (2, L + G)
    assert torch.equal(context[:, :CLIP_MAX_LENGTH, :L], outputs["clip_l_hidden"])
    assert torch.equal(context[:, :CLIP_MAX_LENGTH, L : L + G], outputs["clip_g_hidden"])
    assert context[:, :CLIP_MAX_LENGTH, L + G :].eq(0).all()
    assert torch.equal(context[:, CLIP_MAX_LENGTH:], outputs["t5_hidden"])
    assert torch.equal(pooled, torch.cat([outputs["clip_l_pooled"], outputs["clip_g_pooled"]], dim=-1))


def test_dropout_zeroes_exactly_the_dropped_encoder_of_the_dropped_sample(encoders, tokenizers):
    outputs = encode(encoders, tokenizers, Sd3TextOptions(t5_max_length=24))
    context, pooled = sd3_conditioning(outputs)
    drop_first = torch.tensor([True, False])
    text_tokens, t5_tokens = slice(0, CLIP_MAX_LENGTH), slice(CLIP_MAX_LENGTH, None)
    # encoder -> (flag, zeroed context tokens, zeroed context columns, zeroed pooled columns)
    cases = {
        "clip_l": ("clip_l_drop", text_tokens, slice(0, L), slice(0, L)),
        "clip_g": ("clip_g_drop", text_tokens, slice(L, L + G), slice(L, L + G)),
        "t5": ("t5_drop", t5_tokens, slice(None), slice(0, 0)),
    }
    for name, (flag, tokens, columns, pooled_columns) in cases.items():
        dropped_context, dropped_pooled = sd3_conditioning(outputs, **{flag: drop_first})
        expected_context, expected_pooled = context.clone(), pooled.clone()
        expected_context[0, tokens, columns] = 0
        expected_pooled[0, pooled_columns] = 0
        assert torch.equal(dropped_context, expected_context), name
        assert torch.equal(dropped_pooled, expected_pooled), name


def test_dropout_works_on_cached_outputs_one_sample_at_a_time(encoders, tokenizers):
    """Caches store samples separately; batches restack them, then dropout applies."""
    outputs = encode(encoders, tokenizers, Sd3TextOptions(t5_max_length=24))
    cached = [{key: value[i].clone() for key, value in outputs.items()} for i in range(2)]
    restacked = {key: torch.stack([sample[key] for sample in cached]) for key in cached[0]}
    drops = {"clip_l_drop": torch.tensor([False, True]), "t5_drop": torch.tensor([True, False])}
    for fresh, from_cache in zip(sd3_conditioning(outputs, **drops), sd3_conditioning(restacked, **drops)):
        assert torch.equal(fresh, from_cache)


def test_dropped_sample_keeps_gradients_of_the_others():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    outputs = {
        "clip_l_hidden": hidden,
        "clip_g_hidden": torch.randn(2, 3, 4),
        "clip_l_pooled": torch.randn(2, 4),
        "clip_g_pooled": torch.randn(2, 4),
        "t5_hidden": torch.randn(2, 5, 16),
    }
    context, _ = sd3_conditioning(outputs, clip_l_drop=torch.tensor([True, False]))
    context.sum().backward()
    assert hidden.grad[0].eq(0).all() and hidden.grad[1].eq(1).all()


def test_without_t5_the_context_ends_in_77_zero_tokens(tiny_sd3_checkpoints, tokenizers):
    text = load_sd3_models(tiny_sd3_checkpoints["sd3-medium"]).text
    no_t5 = Sd3TextEncoders(clip_l=text.clip_l, clip_g=text.clip_g, t5xxl=None)
    outputs = encode(no_t5, tokenizers, Sd3TextOptions())
    assert "t5_hidden" not in outputs
    context, _ = sd3_conditioning(outputs, context_dim=TINY_T5_WIDTH)
    assert context.shape == (2, CLIP_MAX_LENGTH + NO_T5_TOKENS, TINY_T5_WIDTH)
    assert context[:, CLIP_MAX_LENGTH:].eq(0).all()
    assert torch.equal(context[:, :CLIP_MAX_LENGTH, :L], outputs["clip_l_hidden"])
    with pytest.raises(ValueError, match="context_dim"):
        sd3_conditioning(outputs)


def test_widths_that_do_not_fit_are_errors():
    outputs = {
        "clip_l_hidden": torch.zeros(1, 77, 8),
        "clip_g_hidden": torch.zeros(1, 77, 8),
        "clip_l_pooled": torch.zeros(1, 8),
        "clip_g_pooled": torch.zeros(1, 8),
        "t5_hidden": torch.zeros(1, 4, 12),
    }
    with pytest.raises(ValueError, match="do not fit the 12-wide context"):
        sd3_conditioning(outputs)
    with pytest.raises(ValueError, match="MMDiT takes 32"):
        sd3_conditioning(outputs, context_dim=32)


def test_dropout_masks_follow_the_rates_independently_and_reproducibly():
    generator = torch.Generator().manual_seed(0)
    l_drop, g_drop, t5_drop = dropout_masks(20000, clip_l_rate=0.1, clip_g_rate=0.5, t5_rate=0.0, generator=generator)
    assert l_drop.dtype == torch.bool and l_drop.shape == (20000,)
    assert abs(l_drop.float().mean() - 0.1) < 0.01 and abs(g_drop.float().mean() - 0.5) < 0.015
    assert not t5_drop.any()
    assert abs((l_drop & g_drop).float().mean() - 0.05) < 0.008  # independent draws
    rates = {"clip_l_rate": 0.1, "clip_g_rate": 0.5, "t5_rate": 0.0}
    again = dropout_masks(20000, **rates, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], l_drop) and torch.equal(again[1], g_drop)
    always = dropout_masks(50, clip_l_rate=1.0, clip_g_rate=0.0, t5_rate=1.0, generator=None)
    assert always[0].all() and not always[1].any() and always[2].all()


def test_dropout_rate_outside_0_1_names_the_flag():
    with pytest.raises(ValueError, match="--t5_dropout_rate"):
        dropout_masks(2, clip_l_rate=0.0, clip_g_rate=0.0, t5_rate=1.5, generator=None)


def test_options_from_flags():
    def flags(max_length, lg=False, t5=False):
        return argparse.Namespace(t5xxl_max_token_length=max_length, apply_lg_attn_mask=lg, apply_t5_attn_mask=t5)

    assert Sd3TextOptions.from_args(flags(128, lg=True)) == Sd3TextOptions(128, apply_lg_attn_mask=True)
    assert Sd3TextOptions.from_args(flags(77, t5=True)) == Sd3TextOptions(77, apply_t5_attn_mask=True)
    assert Sd3TextOptions.from_args(flags(None)).t5_max_length == 256
    with pytest.raises(ValueError, match="--t5xxl_max_token_length"):
        Sd3TextOptions.from_args(flags(0))
