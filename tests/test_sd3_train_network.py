"""sd3_train_network.py end to end on the tiny SD3 Medium / 3.5 Medium / 3.5 Large fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import lora_metadata, lora_tensors, make_dataset, scalars

import sd3_train_network
from library.fixtures.tiny_sd3 import VARIANTS, write_tiny_sd3_checkpoint

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = {"sd3-medium": "stable-diffusion-3-medium/lora", "sd3.5-medium": "stable-diffusion-3-5-medium/lora",
                 "sd3.5-large": "stable-diffusion-3-5-large/lora"}


def sd3_argv(checkpoint: Path, tokenizers: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={checkpoint}", f"--tokenizer_cache_dir={tokenizers}",
            f"--dataset_config={dataset}", f"--output_dir={output}", "--output_name=lora", "--network_module=networks.lora",
            "--network_dim=4", "--network_alpha=4", "--learning_rate=2e-3", "--seed=3", "--max_data_loader_n_workers=0",
            "--max_train_steps=2", *extra]


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        sd3_train_network.main(argv)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_memorises_with_caches_on_disk(variant, tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data")
    logs, out = tmp_path / "logs", tmp_path / "out"
    sd3_train_network.main(sd3_argv(
        tiny_sd3_checkpoints[variant], sd3_tokenizer_cache_dir, dataset, out, "--max_train_steps=60",
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--weighting_scheme=logit_normal",
        # A narrow timestep window keeps the per-step loss comparable, so the fall is not lost in sigma noise.
        "--min_timestep=450", "--max_timestep=550", "--learning_rate=5e-3",
        "--gradient_checkpointing", "--apply_t5_attn_mask", f"--logging_dir={logs}"))
    losses = scalars(logs, "loss/current")
    assert len(losses) == 60 and sum(losses[-10:]) < 0.85 * sum(losses[:10]), losses

    tensors = lora_tensors(out / "lora.safetensors")
    assert tensors and all(key.startswith("lora_unet_joint_blocks_") for key in tensors)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in tensors
    if variant == "sd3.5-medium":
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in tensors
    meta = lora_metadata(out / "lora.safetensors")
    assert meta["modelspec.architecture"] == ARCHITECTURES[variant]  # sd-scripts' spellings, as its SD3 LoRAs carry
    assert meta["ss_base_model_version"] == ARCHITECTURES[variant].removeprefix("stable-diffusion-3-").removesuffix("/lora")
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon"  # sd-scripts' SD3 LoRAs say so too (tests/test_metadata_parity.py)
    assert meta["ss_weighting_scheme"] == "logit_normal" and meta["ss_apply_t5_attn_mask"] == "True"


def _caches(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in [*folder.glob("*_lat.safetensors"), *folder.glob("*_te.safetensors")]}


def test_caches_are_reused_and_t5_length_recomputes_them(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data")
    images = dataset.parent / "images"
    flags = ("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--max_train_steps=1")
    argv = sd3_argv(tiny_sd3_checkpoints["sd3-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "out", *flags)
    sd3_train_network.main(argv)
    first = _caches(images)
    assert len(first) == 8
    sd3_train_network.main(argv)
    assert _caches(images) == first
    sd3_train_network.main(argv + ["--t5xxl_max_token_length=32"])
    after = _caches(images)
    assert len({n for n in set(after) - set(first) if n.endswith("_te.safetensors")}) == 4
    assert {k: after[k] for k in first} == first


def test_separate_text_encoder_files_and_text_encoder_lora(tiny_sd3_text_encoder_files, sd3_tokenizer_cache_dir, tmp_path):
    """The seed's layout: an MMDiT-only checkpoint plus --clip_l/--clip_g/--t5xxl; CLIP LoRA trains too."""
    checkpoint = write_tiny_sd3_checkpoint(tmp_path / "mmdit_only.safetensors", variant="sd3.5-large",
                                           include_text_encoders=False)
    files = tiny_sd3_text_encoder_files
    dataset = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    sd3_train_network.main(sd3_argv(checkpoint, sd3_tokenizer_cache_dir, dataset, out, f"--clip_l={files['clip_l']}",
                                    f"--clip_g={files['clip_g']}", f"--t5xxl={files['t5xxl']}", "--clip_l_dropout_rate=0.5",
                                    "--t5_dropout_rate=0.5"))
    prefixes = {key.split("_")[1] for key in lora_tensors(out / "lora.safetensors")}
    assert prefixes == {"unet", "te1", "te2"}  # T5 only with train_t5xxl=True


def test_missing_text_encoder_and_wrong_family_are_named(tiny_sd3_text_encoder_files, sd3_tokenizer_cache_dir,
                                                          tiny_sd1_checkpoint, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data")
    checkpoint = write_tiny_sd3_checkpoint(tmp_path / "mmdit_only.safetensors", variant="sd3-medium",
                                           include_text_encoders=False)
    line = _error_line(capsys, sd3_argv(checkpoint, sd3_tokenizer_cache_dir, dataset, tmp_path / "o",
                                        f"--clip_l={tiny_sd3_text_encoder_files['clip_l']}"))
    assert "clip_g" in line
    line = _error_line(capsys, sd3_argv(tiny_sd1_checkpoint, sd3_tokenizer_cache_dir, dataset, tmp_path / "o"))
    assert "SD1" in line or "sd1" in line


@pytest.mark.parametrize("flag, words", [
    ("--save_clip", "never saves the text encoders"),
    ("--v_parameterization", "flow-matching"),
    ("--min_snr_gamma=5", "flow-matching"),
    ("--clip_skip=2", "penultimate"),
])
def test_flags_that_do_not_apply_to_sd3_are_rejected(flag, words, capsys):
    with pytest.raises(SystemExit):
        sd3_train_network.main(["--pretrained_model_name_or_path=x.safetensors", flag])
    assert words in capsys.readouterr().err


def test_block_swap_without_cuda_is_a_clear_error(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    dataset = make_dataset(tmp_path / "data")
    line = _error_line(capsys, sd3_argv(tiny_sd3_checkpoints["sd3.5-large"], sd3_tokenizer_cache_dir, dataset, tmp_path / "o",
                                        "--blocks_to_swap=1", "--gradient_checkpointing"))
    assert "--blocks_to_swap" in line and "CUDA" in line


def test_fp8_base_stores_frozen_weights_in_fp8_and_trains(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path,
                                                          monkeypatch):
    placed = {}
    original = sd3_train_network.Sd3NetworkTrainer.place_denoiser

    def spy(self, args, models, device, dtype, resolutions):
        original(self, args, models, device, dtype, resolutions)
        placed["mmdit"] = {n: p.dtype for n, p in models.denoiser.named_parameters()}
        placed["t5"] = {n: p.dtype for n, p in models.extra["text"].t5xxl.named_parameters()}

    monkeypatch.setattr(sd3_train_network.Sd3NetworkTrainer, "place_denoiser", spy)
    dataset = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    sd3_train_network.main(sd3_argv(tiny_sd3_checkpoints["sd3.5-medium"], sd3_tokenizer_cache_dir, dataset, out,
                                    "--fp8_base", "--mixed_precision=bf16", "--cache_latents"))
    assert placed["mmdit"]["joint_blocks.0.x_block.attn.qkv.weight"] == torch.float8_e4m3fn
    assert placed["mmdit"]["x_embedder.proj.weight"] == torch.bfloat16  # embedders stay in the compute dtype
    assert placed["t5"]["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float8_e4m3fn
    assert all(dtype != torch.float8_e4m3fn for name, dtype in placed["t5"].items() if "DenseReluDense.wo" in name)
    tensors = lora_tensors(out / "lora.safetensors")
    assert any(k.startswith("lora_te1_") for k in tensors)  # LoRA trains on top of fp8 text encoders too
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
def test_seed_command_line_through_accelerate_launch(tiny_sd3_checkpoints, tiny_sd3_text_encoder_files,
                                                     sd3_tokenizer_cache_dir, tmp_path):
    """The guide's command line, with tiny files; on a CPU its GPU-only parts (fp16 autocast, block swap)
    are left out and everything else, AdamW8bit included, is unchanged."""
    files = tiny_sd3_text_encoder_files
    dataset = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    gpu = torch.cuda.is_available()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
        *([] if gpu else ["--cpu", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]),
        str(REPO / "sd3_train_network.py"),
        f"--pretrained_model_name_or_path={tiny_sd3_checkpoints['sd3-medium']}", f"--clip_l={files['clip_l']}",
        f"--clip_g={files['clip_g']}", f"--t5xxl={files['t5xxl']}", f"--dataset_config={dataset}", f"--output_dir={out}",
        "--output_name=my_sd3_lora", "--save_model_as=safetensors", "--network_module=networks.lora", "--network_dim=16",
        "--network_alpha=1", "--learning_rate=1e-4", "--optimizer_type=AdamW8bit",
        "--lr_scheduler=constant", "--sdpa", "--max_train_epochs=2", "--save_every_n_epochs=1",
        f"--mixed_precision={'fp16' if gpu else 'no'}", "--gradient_checkpointing", "--weighting_scheme=sigma_sqrt",
        *(["--blocks_to_swap=1"] if gpu else []), f"--tokenizer_cache_dir={sd3_tokenizer_cache_dir}", "--max_data_loader_n_workers=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "my_sd3_lora-000001.safetensors").is_file() and (out / "my_sd3_lora.safetensors").is_file()


def test_sdxl_style_file_given_to_sd3_script(sd3_tokenizer_cache_dir, tmp_path, capsys):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}, str(sdxl))
    line = _error_line(capsys, sd3_argv(sdxl, sd3_tokenizer_cache_dir, make_dataset(tmp_path / "data"), tmp_path / "o"))
    assert "sdxl" in line.lower()


def test_buckets_must_fit_the_patch_size(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path, capsys):
    """SD3 latents go through 2x2 patches behind the 8x VAE: a 72-px bucket (latent 9) is refused up front."""
    dataset = make_dataset(tmp_path / "data")
    dataset.write_text(dataset.read_text().replace("resolution = 64", "resolution = 72"))
    line = _error_line(capsys, sd3_argv(tiny_sd3_checkpoints["sd3-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "o"))
    assert "72x72" in line and "multiples of 16" in line
