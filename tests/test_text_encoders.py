"""CLIP text encoders, tokenizers and sd-scripts' long-prompt chunking.

Oracles: diffusers' single-file CLIP converters (an independent implementation of the key mapping), plain
transformers models built from the same weights, and token sequences written out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.fixtures.tiny_sd import (
    SD2_PAD_TOKEN,
    TINY_PROJECTION_DIM,
    TINY_TEXT_LAYERS,
    TINY_TEXT_WIDTH,
    tiny_clip_vocab,
    tiny_text_config,
    write_tiny_clip_tokenizer,
)
from library.models.checkpoint import CheckpointError, strip_prefix
from library.models.clip_text import encode_chunked, num_chunks, tokenize_chunked
from library.models.text_encoders import (
    canonical_hf_text_state_dict,
    clip_config_from_hf_state_dict,
    hf_text_state_dict,
    hf_text_to_openclip_state_dict,
    load_clip_text_model,
    openclip_to_hf_text_state_dict,
)
from library.models.tokenizers import (
    SD1_TOKENIZER_ID,
    SD2_TOKENIZER_ID,
    SD2_TOKENIZER_SUBFOLDER,
    TokenizerUnavailable,
    load_clip_tokenizer,
)

SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_sd1_checkpoint)


@pytest.fixture(scope="module")
def sd2_file(tiny_sd2_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_sd2_checkpoint)


@pytest.fixture(scope="module")
def sd1_encoder(sd1_file) -> CLIPTextModel:
    return load_clip_text_model(strip_prefix(sd1_file, SD1_TEXT)).eval()


@pytest.fixture(scope="module")
def sd1_tokenizer(tokenizer_cache_dir: Path) -> CLIPTokenizer:
    return load_clip_tokenizer(SD1_TOKENIZER_ID, tokenizer_cache_dir)


@pytest.fixture(scope="module")
def sd2_tokenizer(tokenizer_cache_dir: Path) -> CLIPTokenizer:
    return load_clip_tokenizer(SD2_TOKENIZER_ID, tokenizer_cache_dir, subfolder=SD2_TOKENIZER_SUBFOLDER)


def diffusers_clip(checkpoint: dict, config_dir: Path, layers: int, v2: bool) -> CLIPTextModel:
    """diffusers' own single-file path: its converter, a config read from disk, its loading into the model."""
    config = tiny_text_config(v2)
    config.num_hidden_layers = layers
    config.save_pretrained(config_dir)
    model = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(config_dir), local_files_only=True
    )
    assert all(p.device.type == "cpu" for p in model.parameters()), "diffusers left weights unloaded"
    return model.eval()


def token_ids(caption_words: list[str]) -> list[int]:
    vocab, _ = tiny_clip_vocab()
    return [vocab[word + "</w>"] for word in caption_words]


# ---- single-file CLIP against diffusers -----------------------------------------------------------------


def test_sd1_text_encoder_matches_diffusers_loading(sd1_file, sd1_encoder, tmp_path):
    reference = diffusers_clip(sd1_file, tmp_path, TINY_TEXT_LAYERS, v2=False)
    ids = torch.randint(0, reference.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    ours = sd1_encoder(ids, output_hidden_states=True)
    theirs = reference(ids, output_hidden_states=True)
    assert ours.last_hidden_state.abs().mean() > 0.1
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-6)
    for mine, ref in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


def test_sd2_text_encoder_matches_diffusers_open_clip_conversion(sd2_file, tmp_path):
    ours = load_clip_text_model(
        openclip_to_hf_text_state_dict(strip_prefix(sd2_file, SD2_TEXT), drop_last_layers=1), hidden_act="gelu"
    ).eval()
    reference = diffusers_clip(sd2_file, tmp_path, TINY_TEXT_LAYERS, v2=True)
    assert ours.config.num_hidden_layers == TINY_TEXT_LAYERS == reference.config.num_hidden_layers
    assert ours.config.hidden_act == "gelu"
    ids = torch.randint(0, reference.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_openclip_conversion_agrees_key_by_key_with_diffusers(sd2_file):
    ours = openclip_to_hf_text_state_dict(strip_prefix(sd2_file, SD2_TEXT))
    model = CLIPTextModelWithProjection(tiny_text_config(v2=True))
    theirs = convert_open_clip_checkpoint(model, sd2_file, prefix=SD2_TEXT)
    # diffusers drops text_projection for SD2 (its ignore list); everything else must agree exactly.
    assert set(ours) - set(theirs) == {"text_projection.weight"}
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    projection = sd2_file[SD2_TEXT + "text_projection"]
    assert projection.shape == (TINY_TEXT_WIDTH, TINY_PROJECTION_DIM)
    assert torch.equal(ours["text_projection.weight"], projection.T)


def test_projection_model_applies_openclip_projection_as_x_at_p(sd2_file):
    openclip = strip_prefix(sd2_file, SD2_TEXT)
    model = load_clip_text_model(openclip_to_hf_text_state_dict(openclip), with_projection=True, hidden_act="gelu")
    ids = torch.randint(0, model.config.vocab_size - 1, (1, 77), generator=torch.Generator().manual_seed(2))
    ids[0, 10] = model.config.eos_token_id
    out = model(ids)
    pooled = out.last_hidden_state[0, 10]
    torch.testing.assert_close(out.text_embeds[0], pooled @ openclip["text_projection"], rtol=1e-5, atol=1e-6)


# ---- key adapters ----------------------------------------------------------------------------------------


def test_openclip_hf_round_trip_is_exact(sd2_file):
    openclip = {k: v for k, v in strip_prefix(sd2_file, SD2_TEXT).items() if k != "logit_scale"}
    back = hf_text_to_openclip_state_dict(openclip_to_hf_text_state_dict(openclip))
    assert back.keys() == openclip.keys()
    assert all(torch.equal(back[key], openclip[key]) for key in openclip)


def test_hf_openclip_round_trip_is_exact():
    hf = hf_text_state_dict(CLIPTextModelWithProjection(tiny_text_config(v2=True)))
    again = openclip_to_hf_text_state_dict(hf_text_to_openclip_state_dict(hf))
    assert again.keys() == hf.keys()
    assert all(torch.equal(again[key], hf[key]) for key in hf)


def test_drop_last_layers_removes_the_top_resblocks_only(sd2_file):
    openclip = strip_prefix(sd2_file, SD2_TEXT)
    full = openclip_to_hf_text_state_dict(openclip)
    dropped = openclip_to_hf_text_state_dict(openclip, drop_last_layers=1)
    top = f"text_model.encoder.layers.{TINY_TEXT_LAYERS}."
    assert {key for key in full if key not in dropped} == {key for key in full if key.startswith(top)}
    with pytest.raises(ValueError, match="cannot drop 3"):
        openclip_to_hf_text_state_dict(openclip, drop_last_layers=3)


def test_unknown_openclip_key_is_named():
    with pytest.raises(CheckpointError, match="'transformer.resblocks.0.attn.weird'"):
        openclip_to_hf_text_state_dict({"transformer.resblocks.0.attn.weird": torch.zeros(1)})


def test_canonical_layout_accepts_flat_keys_and_drops_position_ids():
    sd = {"embeddings.position_ids": torch.arange(3), "encoder.x": torch.ones(1), "text_model.final_layer_norm.bias": 1}
    assert canonical_hf_text_state_dict(sd).keys() == {"text_model.encoder.x", "text_model.final_layer_norm.bias"}


# ---- config inference and model construction -------------------------------------------------------------


def test_config_inferred_from_weights():
    made = tiny_text_config(v2=True)
    made.num_hidden_layers = 3
    inferred = clip_config_from_hf_state_dict(hf_text_state_dict(CLIPTextModelWithProjection(made)), hidden_act="gelu")
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "projection_dim", "hidden_act",
    ):  # fmt: skip
        assert getattr(inferred, field) == getattr(made, field), field


def test_full_size_clip_l_config_from_shapes():
    layer = "text_model.encoder.layers.{}.mlp.fc1.weight"
    shapes = {"text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, device="meta")}
    shapes["text_model.embeddings.position_embedding.weight"] = torch.empty(77, 768, device="meta")
    shapes.update({layer.format(i): torch.empty(3072, 768, device="meta") for i in range(12)})
    config = clip_config_from_hf_state_dict(shapes)
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (12, 12, 3072)
    assert (config.bos_token_id, config.eos_token_id, config.hidden_act) == (49406, 49407, "quick_gelu")


def test_config_inference_rejects_non_clip_weights():
    with pytest.raises(CheckpointError, match="token_embedding"):
        clip_config_from_hf_state_dict({"encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="multiple of CLIP.s 64-wide heads"):
        clip_config_from_hf_state_dict({"embeddings.token_embedding.weight": torch.zeros(10, 48)})


def test_load_reports_missing_weights(sd1_file):
    text = strip_prefix(sd1_file, SD1_TEXT)
    del text["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['encoder.layers.1.mlp.fc2.bias'\]"):
        load_clip_text_model(text)
    with pytest.raises(CheckpointError, match="missing"):
        load_clip_text_model(strip_prefix(sd1_file, SD1_TEXT), with_projection=True)


# ---- tokenizers ----------------------------------------------------------------------------------------------


def test_cached_tokenizers_give_clip_ids(sd1_tokenizer, sd2_tokenizer):
    vocab, _ = tiny_clip_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    words = ["a", "photo", "of", "a", "red", "cat"]
    expected = [bos, *token_ids(words), eos]
    for tokenizer in (sd1_tokenizer, sd2_tokenizer):
        assert tokenizer("A photo of a  red cat").input_ids == expected
        assert tokenizer.model_max_length == 77
    assert sd1_tokenizer.pad_token_id == eos
    assert sd2_tokenizer.pad_token_id == vocab[SD2_PAD_TOKEN] == 0
    assert len(sd1_tokenizer) == tiny_text_config().vocab_size


def test_legacy_vocab_and_merges_cache_loads_the_same(tmp_path, sd1_tokenizer):
    folder = write_tiny_clip_tokenizer(tmp_path / "openai_clip-vit-large-patch14")
    (folder / "tokenizer.json").unlink()
    legacy = load_clip_tokenizer(SD1_TOKENIZER_ID, tmp_path)
    caption = "the dog on a purple square, sks style!"
    assert legacy(caption).input_ids == sd1_tokenizer(caption).input_ids


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """CLIPTokenizer.from_pretrained that serves local folders, and hub ids from ``served`` or raises OSError."""
    real = CLIPTokenizer.from_pretrained
    served: dict[str, Path | None] = {}
    calls: list[tuple[str, str | None]] = []

    def from_pretrained(name, *args, subfolder=None, **kwargs):
        if Path(name).is_dir():
            return real(name, *args, **kwargs)
        calls.append((str(name), subfolder))
        if str(name) in served:
            folder = served[str(name)]
            return real(folder) if folder is not None else CLIPTokenizer()  # None: transformers' empty placeholder
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.\nCheck your connection.")

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", from_pretrained)
    return served, calls


def test_hub_tokenizer_is_saved_under_sd_scripts_folder_name(fake_hub, tmp_path):
    served, calls = fake_hub
    served[SD2_TOKENIZER_ID] = write_tiny_clip_tokenizer(tmp_path / "hub", pad_token=SD2_PAD_TOKEN)
    cache = tmp_path / "cache"
    first = load_clip_tokenizer(SD2_TOKENIZER_ID, cache, subfolder=SD2_TOKENIZER_SUBFOLDER)
    assert calls == [(SD2_TOKENIZER_ID, "tokenizer")]
    assert (cache / "stabilityai_stable-diffusion-2" / "tokenizer_config.json").is_file()
    del served[SD2_TOKENIZER_ID]  # now offline: the second load must come from the cache
    second = load_clip_tokenizer(SD2_TOKENIZER_ID, cache, subfolder=SD2_TOKENIZER_SUBFOLDER)
    assert len(calls) == 1
    assert second("a blue circle").input_ids == first("a blue circle").input_ids
    assert second.pad_token_id == 0


def test_offline_without_cache_names_the_expected_folder(fake_hub, tmp_path):
    with pytest.raises(TokenizerUnavailable) as error:
        load_clip_tokenizer(SD2_TOKENIZER_ID, tmp_path, subfolder=SD2_TOKENIZER_SUBFOLDER)
    message = str(error.value)
    assert "--tokenizer_cache_dir" in message and str(tmp_path / "stabilityai_stable-diffusion-2") in message
    assert "\n" not in message
    with pytest.raises(TokenizerUnavailable, match="openai_clip-vit-large-patch14"):
        load_clip_tokenizer(SD1_TOKENIZER_ID, None)


def test_placeholder_tokenizer_from_an_offline_hub_is_refused_and_not_cached(fake_hub, tmp_path):
    served, _ = fake_hub
    served[SD1_TOKENIZER_ID] = None
    with pytest.raises(TokenizerUnavailable, match="offline"):
        load_clip_tokenizer(SD1_TOKENIZER_ID, tmp_path)
    assert not (tmp_path / "openai_clip-vit-large-patch14").exists()


def test_unloadable_cache_folder_says_to_delete_it(fake_hub, tmp_path):
    (tmp_path / "openai_clip-vit-large-patch14").mkdir()
    with pytest.raises(TokenizerUnavailable, match="delete it"):
        load_clip_tokenizer(SD1_TOKENIZER_ID, tmp_path)


# ---- tokenize_chunked -----------------------------------------------------------------------------------------


def test_chunk_counts():
    assert [num_chunks(n) for n in (None, 75, 150, 225)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="--max_token_length"):
        num_chunks(100)


def test_single_chunk_is_the_plain_tokenization(sd1_tokenizer, sd2_tokenizer):
    captions = ["a cat", "", " ".join(["dog"] * 90)]
    for tokenizer in (sd1_tokenizer, sd2_tokenizer):
        plain = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        chunked = tokenize_chunked(tokenizer, captions, None)
        assert chunked.shape == (3, 1, 77)
        assert torch.equal(chunked[:, 0], plain.input_ids)


def test_sd1_chunks_wrap_each_window_in_bos_and_eos(sd1_tokenizer):
    vocab, _ = tiny_clip_vocab()
    bos, eos, cat = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["cat</w>"]
    ids = tokenize_chunked(sd1_tokenizer, [" ".join(["cat"] * 100)], 225)
    assert ids.shape == (1, 3, 77)
    assert ids[0, 0].tolist() == [bos] + [cat] * 75 + [eos]
    assert ids[0, 1].tolist() == [bos] + [cat] * 25 + [eos] * 51
    assert ids[0, 2].tolist() == [bos] + [eos] * 76


def test_sd2_chunks_close_cut_windows_with_eos_and_mark_empty_ones(sd2_tokenizer):
    vocab, _ = tiny_clip_vocab()
    bos, eos, pad, cat = vocab["<|startoftext|>"], vocab["<|endoftext|>"], 0, vocab["cat</w>"]
    ids = tokenize_chunked(sd2_tokenizer, [" ".join(["cat"] * 100), "cat"], 225)
    assert ids[0, 0].tolist() == [bos] + [cat] * 75 + [eos]  # cut inside the text: padding replaced by EOS
    assert ids[0, 1].tolist() == [bos] + [cat] * 25 + [eos] + [pad] * 50
    assert ids[0, 2].tolist() == [bos, eos] + [pad] * 75  # empty window: <BOS> <EOS> <PAD>...
    assert ids[1, 0].tolist() == [bos, cat, eos] + [pad] * 74
    assert ids[1, 1].tolist() == ids[1, 2].tolist() == [bos, eos] + [pad] * 75


def test_overlong_caption_is_truncated_to_the_last_window(sd1_tokenizer, sd2_tokenizer):
    vocab, _ = tiny_clip_vocab()
    bos, eos, dog = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["dog</w>"]
    for tokenizer in (sd1_tokenizer, sd2_tokenizer):
        ids = tokenize_chunked(tokenizer, [" ".join(["dog"] * 300)], 150)
        assert ids.shape == (1, 2, 77)
        assert ids[0, 1].tolist() == [bos] + [dog] * 75 + [eos]


# ---- encode_chunked -----------------------------------------------------------------------------------------


def test_one_chunk_encodes_like_the_model(sd1_encoder, sd1_tokenizer):
    ids = tokenize_chunked(sd1_tokenizer, ["a red circle", "a black square"], None)
    with torch.no_grad():
        torch.testing.assert_close(encode_chunked(sd1_encoder, ids), sd1_encoder(ids[:, 0]).last_hidden_state)


def test_three_chunks_concatenate_bos_bodies_and_last_state(sd1_encoder, sd1_tokenizer):
    ids = tokenize_chunked(sd1_tokenizer, [" ".join(["cat"] * 150), "a dog"], 225)
    with torch.no_grad():
        out = encode_chunked(sd1_encoder, ids)
        per_chunk = [sd1_encoder(ids[:, k]).last_hidden_state for k in range(3)]
    assert out.shape == (2, 227, TINY_TEXT_WIDTH)
    torch.testing.assert_close(out[:, 0], per_chunk[0][:, 0])
    for k in range(3):
        torch.testing.assert_close(out[:, 1 + 75 * k : 76 + 75 * k], per_chunk[k][:, 1:76])
    torch.testing.assert_close(out[:, 226], per_chunk[2][:, 76])


def test_150_token_setting_gives_152_positions(sd2_tokenizer, sd2_file):
    encoder = load_clip_text_model(
        openclip_to_hf_text_state_dict(strip_prefix(sd2_file, SD2_TEXT), drop_last_layers=1), hidden_act="gelu"
    )
    with torch.no_grad():
        assert encode_chunked(encoder, tokenize_chunked(sd2_tokenizer, ["a cat"], 150)).shape == (1, 152, 64)


def test_clip_skip_2_is_the_encoder_without_its_last_layer(sd1_file, sd1_encoder):
    text = strip_prefix(sd1_file, SD1_TEXT)
    top = f"text_model.encoder.layers.{TINY_TEXT_LAYERS - 1}."
    shallower = load_clip_text_model({k: v for k, v in text.items() if not k.startswith(top)}).eval()
    ids = torch.randint(0, shallower.config.vocab_size, (2, 2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        skipped = encode_chunked(sd1_encoder, ids, clip_skip=2)
        expected = encode_chunked(shallower, ids)
        torch.testing.assert_close(skipped, expected)
        torch.testing.assert_close(encode_chunked(sd1_encoder, ids, clip_skip=1), encode_chunked(sd1_encoder, ids))
        assert not torch.allclose(skipped, encode_chunked(sd1_encoder, ids))


def test_clip_skip_on_a_projection_model_uses_its_nested_final_norm(sd2_file):
    hf = openclip_to_hf_text_state_dict(strip_prefix(sd2_file, SD2_TEXT))
    plain = load_clip_text_model(hf, hidden_act="gelu")
    projected = load_clip_text_model(hf, with_projection=True, hidden_act="gelu")
    ids = torch.randint(0, plain.config.vocab_size, (1, 1, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(encode_chunked(projected, ids, clip_skip=2), encode_chunked(plain, ids, clip_skip=2))
        torch.testing.assert_close(encode_chunked(projected, ids), encode_chunked(plain, ids))


def test_clip_skip_beyond_the_layer_count_is_rejected(sd1_encoder):
    with pytest.raises(ValueError, match="--clip_skip 3"):
        encode_chunked(sd1_encoder, torch.zeros(1, 1, 77, dtype=torch.long), clip_skip=3)
