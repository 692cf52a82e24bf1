"""--weighted_captions on SD1/SD2 and SDXL: token weights worked out by hand, encoder outputs against the
unweighted encoder output scaled position by position, the cache key, end-to-end runs on the tiny models,
and the checks made before any model loads.

The expectations never go through the weight parser: a weighted caption's expected ids are those of the same
caption written without brackets, and its weights are written out here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_argv, lora_tensors

import sd3_train_network
import sdxl_train_network
import train_network
from library.args import parse_args
from library.fixtures.images import write_fixture_images
from library.fixtures.tiny_sdxl import tiny_sdxl_text_encoders
from library.models.checkpoint import strip_prefix
from library.models.clip_text import encode_chunked, tokenize_chunked, tokenize_weighted_chunked
from library.models.sd_loading import load_sd_models
from library.models.sdxl_loading import load_sdxl_models
from library.models.sdxl_text import encode_sdxl, load_sdxl_tokenizers, tokenize_sdxl
from library.models.text_encoders import load_clip_text_model
from library.models.tokenizers import SD1_TOKENIZER_ID, SD2_TOKENIZER_ID, SD2_TOKENIZER_SUBFOLDER, load_clip_tokenizer
from library.trainer import Models

DOWN = 1 / 1.1
# (weighted caption, the same text without brackets, {conditioning position: weight}); position 0 is <BOS>.
CASES = [
    ("a (red:1.5) ((square)), [dog]", "a red square, dog", {2: 1.5, 3: 1.1 * 1.1, 5: DOWN}),
    (r"a yellow \(dot\)", "a yellow (dot)", {}),
    ("(blue circle:0.5)", "blue circle", {1: 0.5, 2: 0.5}),
]
# 80 one-token words; the 78th (position 78, in the second window of --max_token_length 150) weighs 2.
LONG_WORDS = ["cat", "dog"] * 40
LONG_WEIGHTED = " ".join(LONG_WORDS[:77] + [f"({LONG_WORDS[77]}:2)"] + LONG_WORDS[78:])
LONG_PLAIN = " ".join(LONG_WORDS)


def weight_rows(cases, length: int) -> torch.Tensor:
    rows = torch.ones(len(cases), length)
    for row, (_, _, weights) in enumerate(cases):
        for position, weight in weights.items():
            rows[row, position] = weight
    return rows


def scaled(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The expected weighted conditioning: every position of the unweighted one times its weight."""
    return hidden * weights[..., None]


@pytest.fixture(scope="module")
def sd_tokenizers(tokenizer_cache_dir: Path):
    return {"sd1": load_clip_tokenizer(SD1_TOKENIZER_ID, tokenizer_cache_dir),
            "sd2": load_clip_tokenizer(SD2_TOKENIZER_ID, tokenizer_cache_dir, subfolder=SD2_TOKENIZER_SUBFOLDER)}


@pytest.fixture(scope="module")
def sd1_encoder(tiny_sd1_checkpoint: Path):
    return load_clip_text_model(strip_prefix(load_file(tiny_sd1_checkpoint), "cond_stage_model.transformer.")).eval()


@pytest.fixture(scope="module")
def sdxl_encoders():
    return tiny_sdxl_text_encoders(seed=0)


# ---- token ids and weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_token_weights_by_hand(sd_tokenizers, family):
    tokenizer = sd_tokenizers[family]
    ids, weights = tokenize_weighted_chunked(tokenizer, [weighted for weighted, _, _ in CASES], None)
    assert torch.equal(ids, tokenize_chunked(tokenizer, [plain for _, plain, _ in CASES], None))
    torch.testing.assert_close(weights, weight_rows(CASES, 77))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_long_caption_weights_follow_the_windows(sd_tokenizers, family):
    tokenizer = sd_tokenizers[family]
    ids, weights = tokenize_weighted_chunked(tokenizer, [LONG_WEIGHTED, "a (cat:3)"], 150)
    assert torch.equal(ids, tokenize_chunked(tokenizer, [LONG_PLAIN, "a cat"], 150))
    expected = torch.ones(2, 152)
    expected[0, 78], expected[1, 2] = 2.0, 3.0
    torch.testing.assert_close(weights, expected)
    # 75 tokens: the weighted word is cut off with the rest of the caption
    ids, weights = tokenize_weighted_chunked(tokenizer, [LONG_WEIGHTED], None)
    assert torch.equal(ids, tokenize_chunked(tokenizer, [LONG_PLAIN], None))
    assert torch.equal(weights, torch.ones(1, 77))


# ---- encoded outputs --------------------------------------------------------------------------------------


TRAINERS = {"sd": (train_network, train_network.SdNetworkTrainer),
            "sdxl": (sdxl_train_network, sdxl_train_network.SdxlNetworkTrainer)}


def make_trainer(family: str, *flags: str):
    script, trainer_class = TRAINERS[family]
    return trainer_class(parse_args(script.setup_parser(), list(flags)))


def length_flags(max_token_length: int | None) -> list[str]:
    return [f"--max_token_length={max_token_length}"] if max_token_length else []


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_sd_conditioning_is_the_unweighted_output_scaled_per_token(sd_tokenizers, sd1_encoder, max_token_length):
    tokenizer = sd_tokenizers["sd1"]
    trainer = make_trainer("sd", "--weighted_captions", "--clip_skip=2", *length_flags(max_token_length))
    models = Models(denoiser=None, vae=None, text_encoders=[sd1_encoder], tokenizers=[tokenizer])
    cases = CASES + [(LONG_WEIGHTED, LONG_PLAIN, {78: 2.0} if max_token_length else {})]
    with torch.no_grad():
        weighted = trainer.encode_text(models, [case[0] for case in cases])["hidden_states"]
        plain = encode_chunked(sd1_encoder, tokenize_chunked(tokenizer, [case[1] for case in cases], max_token_length), 2)
    torch.testing.assert_close(weighted, scaled(plain, weight_rows(cases, plain.shape[1])))
    assert not torch.allclose(weighted, plain)


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_sdxl_weights_both_encoders_and_leaves_the_pooled_output(sdxl_tokenizer_cache_dir, sdxl_encoders,
                                                                   max_token_length):
    tokenizers = load_sdxl_tokenizers(sdxl_tokenizer_cache_dir)
    trainer = make_trainer("sdxl", "--weighted_captions", *length_flags(max_token_length))
    models = Models(denoiser=None, vae=None, text_encoders=list(sdxl_encoders), tokenizers=[tokenizers])
    cases = CASES + [(LONG_WEIGHTED, LONG_PLAIN, {78: 2.0} if max_token_length else {})]
    with torch.no_grad():
        weighted = trainer.encode_text(models, [case[0] for case in cases])
        plain = encode_sdxl(*sdxl_encoders, tokenize_sdxl(tokenizers, [case[1] for case in cases], max_token_length))
    # the weights scale CLIP-L's and bigG's halves of every position alike
    expected = scaled(plain["hidden_states"], weight_rows(cases, plain["hidden_states"].shape[1]))
    torch.testing.assert_close(weighted["hidden_states"], expected)
    torch.testing.assert_close(weighted["pooled"], plain["pooled"])


@pytest.mark.parametrize("family, checkpoint", [("sd", "tiny_sd1_checkpoint"), ("sdxl", "tiny_sdxl_checkpoint")])
def test_text_cache_key_records_the_weighting(family, checkpoint, request):
    model = f"--pretrained_model_name_or_path={request.getfixturevalue(checkpoint)}"
    script, _ = TRAINERS[family]
    plain, weighted = (make_trainer(family, model, *flags).cache_keys(parse_args(script.setup_parser(), [model, *flags]))
                       for flags in ([], ["--weighted_captions"]))
    assert weighted[0] == plain[0]  # latents do not depend on it
    assert weighted[1] != plain[1]


# ---- end to end -------------------------------------------------------------------------------------------

E2E_CAPTIONS = ["a (red:1.5) square", "a [blue] circle", "((green)) stripe", r"a yellow \(dot\)"]
E2E_PLAIN = ["a red square", "a blue circle", "green stripe", "a yellow (dot)"]
E2E_WEIGHTS = [{2: 1.5}, {2: DOWN}, {1: 1.1 * 1.1}, {}]


def weighted_dataset(root: Path, captions: list[str] = E2E_CAPTIONS, subset: str = "") -> Path:
    images = root / "images"
    write_fixture_images(images, len(captions), sizes=((64, 64),), caption_extension=".txt", captions=captions)
    toml_path = root / "dataset.toml"
    toml_path.write_text(f"[general]\ncaption_extension = \".txt\"\n\n[[datasets]]\nresolution = 64\nbatch_size = 2\n\n"
                         f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n{subset}\n")
    return toml_path


def cached_text(images: Path, names: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{image stem: tensors} of the text-cache files (those in ``names`` when given)."""
    files = [p for p in images.glob("*_te.safetensors") if names is None or p.name in names]
    return {p.name.rsplit("_", 2)[0]: load_file(p) for p in files}


def test_sd1_trains_on_weighted_captions_and_caches_them_apart(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    dataset = weighted_dataset(tmp_path / "data")
    images = dataset.parent / "images"
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--max_train_steps=1",
                     "--cache_text_encoder_outputs_to_disk")
    train_network.main([*argv, "--weighted_captions"])
    weighted_files = {p.name for p in images.glob("*_te.safetensors")}
    assert len(weighted_files) == 4 and (tmp_path / "out" / "lora.safetensors").is_file()

    encoder, tokenizer = load_sd_models(tiny_sd1_checkpoint, v2=False).text_encoder.eval(), load_clip_tokenizer(
        SD1_TOKENIZER_ID, tokenizer_cache_dir)
    with torch.no_grad():
        plain = encode_chunked(encoder, tokenize_chunked(tokenizer, E2E_PLAIN, None))
        literal = encode_chunked(encoder, tokenize_chunked(tokenizer, E2E_CAPTIONS, None))
    expected = scaled(plain, weight_rows([(c, p, w) for c, p, w in zip(E2E_CAPTIONS, E2E_PLAIN, E2E_WEIGHTS)], 77))
    cached = cached_text(images, weighted_files)
    for row, stem in enumerate(sorted(cached)):
        torch.testing.assert_close(cached[stem]["hidden_states"], expected[row])

    # without the flag the weighted entries are not reused: the brackets are read as text
    train_network.main(argv)
    unweighted_files = {p.name for p in images.glob("*_te.safetensors")} - weighted_files
    assert len(unweighted_files) == 4
    cached = cached_text(images, unweighted_files)
    for row, stem in enumerate(sorted(cached)):
        torch.testing.assert_close(cached[stem]["hidden_states"], literal[row])


def test_sdxl_trains_both_text_encoders_through_weighted_long_captions(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir,
                                                                     tmp_path, monkeypatch):
    captions = [LONG_WEIGHTED, *E2E_CAPTIONS[:3]]
    dataset = weighted_dataset(tmp_path / "data", captions)
    seen = []
    original = sdxl_train_network.SdxlNetworkTrainer.encode_text

    def record(self, models, batch_captions):
        out = original(self, models, batch_captions)
        seen.append((list(batch_captions), out["hidden_states"].requires_grad))
        return out

    monkeypatch.setattr(sdxl_train_network.SdxlNetworkTrainer, "encode_text", record)
    out = tmp_path / "out"
    sdxl_train_network.main(base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, out, "--max_train_steps=2",
                                      "--weighted_captions", "--max_token_length=150"))
    assert sorted(caption for batch, _ in seen for caption in batch) == sorted(captions)
    assert all(requires_grad for _, requires_grad in seen)  # text-encoder LoRA trains through the weighting
    tensors = lora_tensors(out / "lora.safetensors")
    for prefix in ("lora_te1_", "lora_te2_"):
        ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(v.abs().sum() > 0 for v in ups), prefix  # moved from their zero start

    # the same conditioning the weights give by hand, from the checkpoint's own encoders
    loaded = load_sdxl_models(tiny_sdxl_checkpoint)
    loaded.text_encoder_l.eval(), loaded.text_encoder_g.eval()
    tokenizers = load_sdxl_tokenizers(sdxl_tokenizer_cache_dir)
    trainer = make_trainer("sdxl", "--weighted_captions", "--max_token_length=150")
    models = Models(denoiser=None, vae=None, text_encoders=[loaded.text_encoder_l, loaded.text_encoder_g],
                    tokenizers=[tokenizers])
    with torch.no_grad():
        weighted = original(trainer, models, [LONG_WEIGHTED])["hidden_states"]
        plain = encode_sdxl(loaded.text_encoder_l, loaded.text_encoder_g, tokenize_sdxl(tokenizers, [LONG_PLAIN], 150))
    expected = plain["hidden_states"].clone()
    expected[0, 78] *= 2.0
    torch.testing.assert_close(weighted, expected)


# ---- checks before any model loads -----------------------------------------------------------------------


def _error_line(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_shuffled_captions_with_a_separator_inside_brackets_are_refused(tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                                       tmp_path, capsys, no_model_loading):
    captions = ["(red, blue:1.2), square", "a circle"]
    dataset = weighted_dataset(tmp_path / "shuffled", captions, "  shuffle_caption = true\n")
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--weighted_captions", "--dry_run")
    line = _error_line(train_network.main, argv, capsys)
    assert "--weighted_captions: 1 caption(s) put ',' inside weighting brackets" in line
    assert "img_000.png" in line and "shuffle_caption" in line and "'(red:1.2), (blue:1.2)'" in line

    # in order, the same caption is fine; the dry run ends without loading a model
    dataset = weighted_dataset(tmp_path / "ordered", captions)
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out",
                                 "--weighted_captions", "--dry_run"))


def test_malformed_weights_are_refused_with_their_file(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path, capsys,
                                                       no_model_loading):
    dataset = weighted_dataset(tmp_path / "data", ["a (red:1.2.3) square", "a circle"])
    argv = base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, tmp_path / "out", "--weighted_captions",
                     "--dry_run")
    line = _error_line(sdxl_train_network.main, argv, capsys)
    assert "img_000.png" in line and "'1.2.3' is not a number" in line

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --n (blurry:.5.)\n", encoding="utf-8")
    fine = weighted_dataset(tmp_path / "fine", ["a (red:1.2) square", "a circle"])
    argv = base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, fine, tmp_path / "out", "--weighted_captions",
                     "--dry_run", f"--sample_prompts={prompts}")
    line = _error_line(sdxl_train_network.main, argv, capsys)
    assert "sample prompt 1 of" in line and "'.5.' is not a number" in line


def test_sd3_rejects_weighted_captions_with_its_reason(capsys):
    with pytest.raises(SystemExit):
        parse_args(sd3_train_network.setup_parser(), ["--weighted_captions"])
    assert "--weighted_captions is not supported: weighted captions are implemented for SD1/SD2 and SDXL only" in (
        capsys.readouterr().err)
