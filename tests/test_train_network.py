"""train_network.py end to end on the tiny SD1/SD2 fixtures: the real command line, the files it writes,
cache reuse and invalidation, exact resume, and what stops a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import base_argv, lora_metadata, lora_tensors, make_dataset, scalars

import train_network
from library.args import parse_args
from library.trainer import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def train(*argv: str) -> None:
    train_network.main(list(argv))


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture
def argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path):
    def build(*extra: str, output: Path | None = None) -> list[str]:
        return base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, output or tmp_path / "out", *extra)

    return build


@pytest.mark.slow
def test_cli_memorises_the_images_with_caches_on_disk(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path):
    """The real command line in a fresh process: loss falls on four images, the file has the right keys and metadata."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    command = [sys.executable, str(REPO / "train_network.py"),
               *base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, out, "--max_train_steps=120",
                          "--learning_rate=3e-3", "--network_dim=8", "--network_alpha=8", "--cache_latents_to_disk",
                          "--cache_text_encoder_outputs_to_disk", f"--logging_dir={logs}", "--save_model_as=safetensors")]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two test workers share two cores
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    losses = scalars(logs, "loss/current")
    assert len(losses) == 120
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)

    lora = out / "lora.safetensors"
    tensors = lora_tensors(lora)
    # Cached text-encoder outputs leave only the U-Net LoRA to train, named with diffusers module paths.
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 8
    meta = lora_metadata(lora)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_steps"] == "120" and meta["sshs_model_hash"]
    assert len(list((dataset.parent / "images").glob("*_lat.safetensors"))) == 4
    assert len(list((dataset.parent / "images").glob("*_te.safetensors"))) == 4


def _cache_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in [*folder.glob("*_lat.safetensors"), *folder.glob("*_te.safetensors")]}


def test_caches_are_reused_and_recomputed_when_their_producer_changes(argv, dataset, capsys):
    images = dataset.parent / "images"
    flags = ("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--max_train_steps=1")
    train(*argv(*flags))
    assert "only the denoiser's LoRA trains" in capsys.readouterr().err
    first = _cache_files(images)
    assert len(first) == 8  # 4 latents + 4 text outputs

    train(*argv(*flags))
    assert _cache_files(images) == first  # same flags: nothing re-encoded

    train(*argv(*flags, "--max_token_length=150"))
    after = _cache_files(images)
    new_text = {name for name in set(after) - set(first) if name.endswith("_te.safetensors")}
    assert len(new_text) == 4 and {k: after[k] for k in first} == first  # text outputs recomputed, latents reused


@pytest.mark.parametrize("seeded", [True, False], ids=["with_seed", "random_seed"])
def test_resume_continues_to_the_same_weights(argv, tmp_path, seeded):
    """Stop after 3 of 6 steps, resume from the saved state: the LoRA equals the uninterrupted run's.
    Without --seed the state folder carries the drawn seed."""
    common = ("--max_train_steps=6", "--network_dropout=0.1", "--save_every_n_steps=3", "--save_state",
              "--lr_scheduler=cosine", "--lr_warmup_steps=2")

    def without_seed(flags: list[str]) -> list[str]:
        return flags if seeded else [flag for flag in flags if not flag.startswith("--seed=")]

    train(*without_seed(argv(*common, output=tmp_path / "full")))
    state = tmp_path / "full" / "lora-step00000003-state"
    assert (state / "train_state.json").is_file()
    train(*without_seed(argv(*common, f"--resume={state}", output=tmp_path / "resumed")))

    full, resumed = lora_tensors(tmp_path / "full" / "lora.safetensors"), lora_tensors(tmp_path / "resumed" / "lora.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert lora_metadata(tmp_path / "resumed" / "lora.safetensors")["ss_steps"] == "6"


def test_nan_loss_stops_with_the_step_and_keeps_earlier_saves(argv, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = train_network.SdNetworkTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(train_network.SdNetworkTrainer, "compute_loss", poisoned)
    out = tmp_path / "out"
    args = parse_args(train_network.setup_parser(), argv("--max_train_steps=5", "--save_every_n_steps=2"))
    with pytest.raises(TrainingDiverged, match="at step 3"):
        train_network.SdNetworkTrainer(args).train(args)
    saved = out / "lora-step00000002.safetensors"
    assert lora_tensors(saved)  # the last good save loads
    assert not (out / "lora.safetensors").exists()


@pytest.mark.parametrize("cache", [["--cache_latents"], []], ids=["cached", "encoded"])
def test_latents_reach_the_loss_in_float32_under_half_precision(argv, monkeypatch, cache):
    """Noise, noisy input and target are formed from float32 latents even in a bf16 run (autocast casts the
    U-Net's input), whether the latents come from the cache or from the VAE in the step."""
    seen = []
    original = train_network.SdNetworkTrainer.compute_loss

    def record(self, models, batch, latents, text, generator):
        seen.append((latents.dtype, torch.is_autocast_enabled("cpu")))
        return original(self, models, batch, latents, text, generator)

    monkeypatch.setattr(train_network.SdNetworkTrainer, "compute_loss", record)
    train(*argv("--mixed_precision=bf16", "--max_train_steps=1", *cache))
    assert seen == [(torch.float32, True)]


def _error_line(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train(*argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_inputs_are_one_line_errors_before_training(argv, tmp_path, capsys, dataset):
    missing = argv()
    missing[0] = f"--pretrained_model_name_or_path={tmp_path / 'nope.safetensors'}"
    assert "model not found" in _error_line(capsys, *missing) and "nope.safetensors" in _error_line(capsys, *missing)

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, str(sdxl))
    wrong_family = argv()
    wrong_family[0] = f"--pretrained_model_name_or_path={sdxl}"
    assert "SDXL checkpoint; use sdxl_train_network.py" in _error_line(capsys, *wrong_family)

    dataset.write_text(dataset.read_text().replace("num_repeats", "num_repeat"))
    line = _error_line(capsys, *argv())
    assert "num_repeat" in line and str(dataset.name) in line


def test_conflicting_cache_and_caption_options_are_refused(argv, capsys):
    line = _error_line(capsys, *argv("--cache_text_encoder_outputs", "--shuffle_caption"))
    assert "shuffle_caption" in line and "cache" in line


def test_corrupt_image_is_skipped_counted_and_named(argv, dataset, capsys):
    (dataset.parent / "images" / "broken.png").write_bytes(b"not a png at all")
    (dataset.parent / "images" / "broken.txt").write_text("broken")
    train(*argv("--max_train_steps=1"))
    log = capsys.readouterr().err  # the script's own log handler writes to stderr
    assert "broken.png" in log and "1 unreadable images were skipped" in log


def test_prefill_tools_write_the_caches_training_reuses(argv, dataset):
    from tools import cache_latents, cache_text_encoder_outputs

    images = dataset.parent / "images"
    cache_latents.main(argv())
    cache_text_encoder_outputs.main(argv())
    prefilled = _cache_files(images)
    assert sum(n.endswith("_lat.safetensors") for n in prefilled) == 4
    assert sum(n.endswith("_te.safetensors") for n in prefilled) == 4
    train(*argv("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--max_train_steps=1"))
    assert _cache_files(images) == prefilled  # training found every file valid and encoded nothing


@pytest.mark.parametrize("lora_precision", [(), ("--full_bf16",)], ids=["fp32_lora", "bf16_lora"])
def test_bf16_mixed_precision_trains_text_encoder_and_unet(argv, tmp_path, lora_precision):
    """bf16 base weights with fp32 (or bf16) LoRA weights in both the text encoder and the U-Net."""
    out = tmp_path / "bf16"
    train(*argv("--mixed_precision=bf16", *lora_precision, "--save_precision=float", output=out))
    tensors = lora_tensors(out / "lora.safetensors")
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("script", ["train_network", "sdxl_train_network", "sd3_train_network"])
def test_a_missing_base_model_flag_is_named(script, capsys, tmp_path):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).main([f"--output_dir={tmp_path}"])
    assert "--pretrained_model_name_or_path is required" in capsys.readouterr().err


def test_buckets_the_model_cannot_divide_are_refused_before_encoding(argv, dataset, capsys):
    """The SD U-Net takes any latent size, the VAE works in 8-pixel steps: a 68x68 bucket cannot be encoded."""
    dataset.write_text(dataset.read_text().replace("resolution = 64", "resolution = 68"))
    line = _error_line(capsys, *argv("--cache_latents_to_disk"))
    assert "68x68" in line and "multiples of 8" in line
    assert not list((dataset.parent / "images").glob("*_lat.safetensors"))  # nothing was encoded
