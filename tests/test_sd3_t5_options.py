"""--t5xxl_device / --t5xxl_dtype for sd3_train_network.py, and SD3 tokenizers from a local model folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import lora_tensors, make_dataset

import sd3_train_network
from library.args import parse_args
from library.fixtures.tiny_sd import SD2_PAD_TOKEN, write_tiny_clip_tokenizer
from library.fp8 import FP8_DTYPE, store_linear_weights_in_fp8
from library.models.sd3_loading import load_sd3_models
from library.models.sd3_text import (
    Sd3TextOptions,
    T5Placement,
    encode_sd3,
    load_sd3_tokenizers,
    place_sd3_text_encoders,
    tokenize_sd3,
)
from library.models.tokenizers import CLIP_L_TOKENIZER_ID, TokenizerUnavailable, load_clip_tokenizer, tokenizer_cache_folder

CAPTIONS = ["a red circle", "a photo of the sks dog on a blue to yellow gradient, blurry style"]
CPU = torch.device("cpu")
# Where sd-scripts' hub-id cache folders sit in a diffusers SD3 model folder.
DIFFUSERS_NAMES = {"openai_clip-vit-large-patch14": "tokenizer", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k": "tokenizer_2",
                   "google_t5-v1_1-xxl": "tokenizer_3"}


def _flags(dtype: str | None = None, device: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(t5xxl_dtype=dtype, t5xxl_device=device)


@pytest.fixture(scope="module")
def tokenizers(sd3_tokenizer_cache_dir):
    return load_sd3_tokenizers(sd3_tokenizer_cache_dir)


@pytest.fixture
def encoders(tiny_sd3_checkpoints):
    return load_sd3_models(tiny_sd3_checkpoints["sd3-medium"]).text


@pytest.fixture
def diffusers_tokenizer_folder(sd3_tokenizer_cache_dir, tmp_path) -> Path:
    """The fixture tokenizers laid out as in a downloaded diffusers SD3 model (tokenizer, tokenizer_2, tokenizer_3)."""
    folder = tmp_path / "stable-diffusion-3.5-medium"
    for cache_name, subfolder in DIFFUSERS_NAMES.items():
        shutil.copytree(sd3_tokenizer_cache_dir / cache_name, folder / subfolder)
    return folder


# ---- flag values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, dtype", [("fp32", torch.float32), ("float", torch.float32), ("fp16", torch.float16),
                                          ("bf16", torch.bfloat16), (None, None)])
def test_dtype_values_are_sd_scripts_own(value, dtype):
    assert T5Placement.from_args(_flags(dtype=value)).dtype == dtype


def test_defaults_resolve_to_the_training_device_and_mixed_precision_dtype():
    assert T5Placement.from_args(_flags()).resolve(CPU, torch.bfloat16) == (CPU, torch.bfloat16)
    placement = T5Placement.from_args(_flags(dtype="fp32", device="cpu"))
    assert placement.resolve(torch.device("meta"), torch.float16) == (CPU, torch.float32)


@pytest.mark.parametrize("flag, words", [
    ("--t5xxl_dtype=fp8", "--fp8_base"),
    ("--t5xxl_dtype=half", "fp32, float, fp16, bf16"),
    ("--t5xxl_device=gpu", "not a device name"),
    ("--t5xxl_device=meta", "no meta device"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(flag, words, capsys):
    with pytest.raises(SystemExit) as info:
        sd3_train_network.main(["--pretrained_model_name_or_path=x.safetensors", flag])
    assert info.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert flag.split("=")[0] in lines[-1] and words in lines[-1]


def test_an_absent_accelerator_device_is_refused():
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="devices"):
            T5Placement.from_args(_flags(device=f"cuda:{torch.cuda.device_count()}"))
    else:
        with pytest.raises(ValueError, match="no cuda device"):
            T5Placement.from_args(_flags(device="cuda"))


# ---- placement and encoding ------------------------------------------------------------------------------------


def _encode(encoders, tokenizers):
    options = Sd3TextOptions(t5_max_length=16)
    with torch.no_grad():
        return encode_sd3(encoders, tokenize_sd3(tokenizers, CAPTIONS, options), options)


def test_bf16_t5_is_close_to_fp32_but_not_equal_and_clips_are_untouched(encoders, tokenizers):
    place_sd3_text_encoders(encoders, T5Placement(), device=CPU, dtype=torch.float32)
    full = _encode(encoders, tokenizers)
    place_sd3_text_encoders(encoders, T5Placement(dtype=torch.bfloat16), device=CPU, dtype=torch.float32)
    assert {p.dtype for p in encoders.t5xxl.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in encoders.clip_l.parameters()} == {torch.float32}
    half = _encode(encoders, tokenizers)
    assert half["t5_hidden"].dtype == torch.bfloat16
    error = (half["t5_hidden"].float() - full["t5_hidden"]).norm() / full["t5_hidden"].norm()
    assert 0 < error < 0.03  # bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few roundings deep
    torch.testing.assert_close(half["clip_l_hidden"], full["clip_l_hidden"], rtol=0, atol=0)


def test_fp32_t5_computes_in_fp32_under_the_training_autocast(encoders, tokenizers):
    """A bf16 run keeps --t5xxl_dtype fp32 meaningful: T5 leaves the step's autocast, the CLIPs stay in it."""
    place_sd3_text_encoders(encoders, T5Placement(dtype=torch.float32), device=CPU, dtype=torch.float32)
    plain = _encode(encoders, tokenizers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _encode(encoders, tokenizers)
    torch.testing.assert_close(autocast["t5_hidden"], plain["t5_hidden"], rtol=0, atol=0)
    assert not torch.equal(autocast["clip_l_hidden"].float(), plain["clip_l_hidden"])


def test_fp8_stored_weights_stay_fp8_when_placed(encoders):
    converted = store_linear_weights_in_fp8(encoders.t5xxl.requires_grad_(False))
    place_sd3_text_encoders(encoders, T5Placement(dtype=torch.bfloat16), device=CPU, dtype=torch.float32)
    layer = encoders.t5xxl.encoder.block[0].layer[0].SelfAttention.q
    assert converted > 0 and layer.weight.dtype == FP8_DTYPE
    assert encoders.t5xxl.get_input_embeddings().weight.dtype == torch.bfloat16


def test_t5_goes_to_its_device_unless_it_carries_lora(encoders):
    meta = T5Placement(device=torch.device("meta"))  # "meta" stands in for a second device on a one-device machine
    q = encoders.t5xxl.encoder.block[0].layer[0].SelfAttention.q
    q.forward = q.forward  # what LoRA's apply_to does: the layer's forward becomes an instance attribute
    with pytest.raises(ValueError, match="--t5xxl_device meta.*train_t5xxl"):
        place_sd3_text_encoders(encoders, meta, device=CPU, dtype=torch.float32)
    place_sd3_text_encoders(encoders, T5Placement(device=CPU), device=CPU, dtype=torch.float32)  # same device: fine

    del q.forward
    fc1 = encoders.clip_l.text_model.encoder.layers[0].mlp.fc1
    fc1.forward = fc1.forward  # LoRA on a CLIP does not tie T5 down
    place_sd3_text_encoders(encoders, meta, device=CPU, dtype=torch.float32)
    assert {p.device.type for p in encoders.t5xxl.parameters()} == {"meta"}
    assert {p.device.type for p in encoders.clip_g.parameters()} == {"cpu"}


# ---- the training command --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t5_dtype, mixed_precision, expected", [
    ("bf16", "no", torch.bfloat16),     # half-precision T5 in a full-precision run
    ("fp32", "bf16", torch.float32),    # full-precision T5 in a bf16 run (outside its autocast)
])
def test_cli_trains_with_t5_where_the_flags_say(t5_dtype, mixed_precision, expected, tiny_sd3_checkpoints,
                                                diffusers_tokenizer_folder, tmp_path, monkeypatch):
    """Every T5 forward of the run happens on the requested device in the requested dtype, and the trainer's
    generic placement never casts T5 back to the base-weight dtype."""
    seen, casts, t5s = [], [], []
    load_models = sd3_train_network.Sd3NetworkTrainer.load_models

    def spying_load_models(self, args):
        models = load_models(self, args)
        t5 = models.extra["text"].t5xxl
        t5s.append(t5)
        t5.register_forward_hook(lambda module, inputs, output: seen.append(
            (module.get_input_embeddings().weight.device, module.get_input_embeddings().weight.dtype,
             output.last_hidden_state.dtype)))
        original_to = t5.to
        t5.to = lambda *a, **k: casts.append((a, k)) or original_to(*a, **k)
        return models

    monkeypatch.setattr(sd3_train_network.Sd3NetworkTrainer, "load_models", spying_load_models)
    out = tmp_path / "out"
    sd3_train_network.main([
        f"--pretrained_model_name_or_path={tiny_sd3_checkpoints['sd3.5-large']}",
        f"--tokenizer_cache_dir={diffusers_tokenizer_folder}", f"--dataset_config={make_dataset(tmp_path / 'data')}",
        f"--output_dir={out}", "--output_name=lora", "--network_module=networks.lora", "--network_dim=4",
        "--learning_rate=1e-3", "--max_data_loader_n_workers=0", "--max_train_steps=2",
        f"--mixed_precision={mixed_precision}", f"--t5xxl_dtype={t5_dtype}", "--t5xxl_device=cpu"])
    assert len(seen) == 2  # two steps of one two-caption batch each, outputs not cached
    assert set(seen) == {(CPU, expected, expected)}
    # placement moves T5 tensor by tensor (library.fp8.move_keeping_fp8); any .to() call must not recast it either
    assert all(kwargs.get("dtype") in (None, expected) for _, kwargs in casts)
    assert {p.dtype for p in t5s[0].parameters()} == {expected}
    assert all(torch.isfinite(t).all() for t in lora_tensors(out / "lora.safetensors").values())
    assert sorted(p.name for p in diffusers_tokenizer_folder.iterdir()) == ["tokenizer", "tokenizer_2", "tokenizer_3"]


def test_t5_dtype_is_part_of_the_text_cache_key_when_it_changes_the_outputs(tiny_sd3_checkpoints):
    base = [f"--pretrained_model_name_or_path={tiny_sd3_checkpoints['sd3-medium']}", "--mixed_precision=bf16"]

    def text_key(*extra: str) -> str:
        args = parse_args(sd3_train_network.setup_parser(), base + list(extra))
        return sd3_train_network.Sd3NetworkTrainer(args).cache_keys(args)[1]

    assert text_key("--t5xxl_dtype=bf16") == text_key() == text_key("--t5xxl_device=cpu")
    assert text_key("--t5xxl_dtype=fp32") == text_key("--t5xxl_dtype=float") != text_key()
    assert "t5_dtype=float32" in text_key("--t5xxl_dtype=fp32")


# ---- tokenizers from a local folder ----------------------------------------------------------------------------


def test_a_diffusers_model_folder_serves_the_three_tokenizers(diffusers_tokenizer_folder, tokenizers):
    local = load_sd3_tokenizers(diffusers_tokenizer_folder)
    options = Sd3TextOptions(t5_max_length=24)
    expected = tokenize_sd3(tokenizers, CAPTIONS, options)
    for key, ids in tokenize_sd3(local, CAPTIONS, options).items():
        assert torch.equal(ids, expected[key]), key
    assert local.clip_g.pad_token == SD2_PAD_TOKEN and local.clip_l.pad_token != SD2_PAD_TOKEN
    assert sorted(p.name for p in diffusers_tokenizer_folder.iterdir()) == ["tokenizer", "tokenizer_2", "tokenizer_3"]


def test_sd_scripts_cache_folder_wins_over_the_diffusers_one(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tokenizer", pad_token=SD2_PAD_TOKEN)
    assert load_clip_tokenizer(CLIP_L_TOKENIZER_ID, tmp_path, diffusers_folder="tokenizer").pad_token == SD2_PAD_TOKEN
    write_tiny_clip_tokenizer(tokenizer_cache_folder(tmp_path, CLIP_L_TOKENIZER_ID))
    assert load_clip_tokenizer(CLIP_L_TOKENIZER_ID, tmp_path, diffusers_folder="tokenizer").pad_token != SD2_PAD_TOKEN


def test_an_unusable_diffusers_tokenizer_folder_is_named(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(TokenizerUnavailable) as error:
        load_clip_tokenizer(CLIP_L_TOKENIZER_ID, tmp_path, diffusers_folder="tokenizer")
    message = str(error.value)
    assert str(tmp_path / "tokenizer") in message and "no CLIP tokenizer" in message and "\n" not in message
    assert not tokenizer_cache_folder(tmp_path, CLIP_L_TOKENIZER_ID).exists()
