"""sdxl_train_network.py end to end on the tiny SDXL fixture."""

from __future__ import annotations

import pytest
import torch
from train_helpers import lora_metadata, lora_tensors, make_dataset, scalars

import sdxl_train_network
import train_network
from library.args import parse_args
from library.console import setup_logging


def sdxl_argv(checkpoint, tokenizers, dataset, output, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={checkpoint}", f"--tokenizer_cache_dir={tokenizers}", f"--dataset_config={dataset}",
            f"--output_dir={output}", "--output_name=lora", "--network_module=networks.lora", "--network_dim=4",
            "--network_alpha=4", "--learning_rate=1e-3", "--seed=5", "--max_data_loader_n_workers=0", "--max_train_steps=2",
            *extra]


def test_memorises_with_cached_latents_and_text(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path):
    dataset, logs, out = make_dataset(tmp_path / "data"), tmp_path / "logs", tmp_path / "out"
    sdxl_train_network.main(sdxl_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, out, "--max_train_steps=100",
                                      "--learning_rate=1e-2", "--network_dim=8", "--network_alpha=8",
                                      # a narrow timestep window keeps per-step losses comparable
                                      "--min_timestep=300", "--max_timestep=500", "--network_args", "conv_dim=8",
                                      "conv_alpha=8", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
                                      "--gradient_checkpointing", f"--logging_dir={logs}"))
    losses = scalars(logs, "loss/current")
    assert len(losses) == 100 and sum(losses[-20:]) < 0.85 * sum(losses[:20]), losses
    tensors = lora_tensors(out / "lora.safetensors")
    # SGM module paths, as sd-scripts names SDXL LoRA modules; cached text outputs leave the U-Net only.
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.startswith("lora_unet_input_blocks_") and "_transformer_blocks_0_attn1_to_q." in k for k in tensors)
    meta = lora_metadata(out / "lora.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_text_encoder_rates_from_the_guide_flags(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path):
    logs = tmp_path / "logs"
    out = tmp_path / "out"
    sdxl_train_network.main(sdxl_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                      "--unet_lr=1e-4", "--text_encoder_lr1=2e-5", "--text_encoder_lr2=3e-5",
                                      "--max_token_length=150", f"--logging_dir={logs}", "--max_train_steps=1"))
    prefixes = {k.split("_")[1] for k in lora_tensors(out / "lora.safetensors")}
    assert prefixes == {"unet", "te1", "te2"}
    lrs = {tag: scalars(logs, tag) for tag in ("lr/unet", "lr/textencoder 1", "lr/textencoder 2")}
    assert lrs["lr/unet"] == [pytest.approx(1e-4)]
    assert lrs["lr/textencoder 1"] == [pytest.approx(2e-5)] and lrs["lr/textencoder 2"] == [pytest.approx(3e-5)]


def test_size_conditioning_follows_each_images_bucket(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path, monkeypatch):
    """A 96x64 image in a 64x64... bucket: original size is the image's, target the bucket's, crop the real offset."""
    from library.fixtures.images import write_fixture_images

    images = tmp_path / "data" / "images"
    write_fixture_images(images, 2, sizes=((128, 96),), caption_extension=".txt", captions=["a", "b"])
    dataset = tmp_path / "data" / "dataset.toml"
    dataset.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\nenable_bucket = false\n"
                       f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  caption_extension = '.txt'\n")
    seen = []
    original = sdxl_train_network.sdxl_size_embedding

    def spy(pooled, original_size, crop, target):
        seen.append((original_size.tolist(), crop.tolist(), target.tolist()))
        return original(pooled, original_size, crop, target)

    monkeypatch.setattr(sdxl_train_network, "sdxl_size_embedding", spy)
    sdxl_train_network.main(sdxl_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, tmp_path / "out",
                                      "--max_train_steps=1"))
    original_hw, crop, target = seen[0]
    assert original_hw == [[96, 128], [96, 128]] and target == [[64, 64], [64, 64]]
    # Resized to cover 64x64 keeping aspect (85x64), then centre-cropped: 10 or 11 pixels off the left.
    assert all(top == 0 and left in (10, 11) for top, left in crop)


def test_wrong_family_and_rejected_flags(tiny_sd1_checkpoint, tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data")
    with pytest.raises(SystemExit):
        sdxl_train_network.main(sdxl_argv(tiny_sd1_checkpoint, sdxl_tokenizer_cache_dir, dataset, tmp_path / "o"))
    assert "use train_network.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_network.main(sdxl_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, tmp_path / "o"))
    assert "sdxl_train_network.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sdxl_train_network.main(["--clip_skip=2"])
    assert "penultimate" in capsys.readouterr().err


def test_fp16_without_no_half_vae_warns(tiny_sdxl_checkpoint, capsys):
    args = parse_args(sdxl_train_network.setup_parser(),
                                         [f"--pretrained_model_name_or_path={tiny_sdxl_checkpoint}", "--mixed_precision=fp16"])
    setup_logging(args)
    sdxl_train_network.SdxlNetworkTrainer(args)
    assert "--no_half_vae" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_command_line_through_accelerate_launch(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path):
    """The SDXL guide's command line, unchanged but for tiny files (AdamW8bit runs on the CPU too)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dataset, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    gpu = torch.cuda.is_available()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
        *([] if gpu else ["--cpu", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16"]),
        str(Path(sdxl_train_network.__file__)),
        f"--pretrained_model_name_or_path={tiny_sdxl_checkpoint}", f"--dataset_config={dataset}", f"--output_dir={out}",
        "--output_name=my_sdxl_lora", "--save_model_as=safetensors", "--network_module=networks.lora", "--network_dim=32",
        "--network_alpha=16", "--learning_rate=1e-4", "--unet_lr=1e-4", "--text_encoder_lr1=1e-5", "--text_encoder_lr2=1e-5",
        "--optimizer_type=AdamW8bit", "--lr_scheduler=constant", "--max_train_epochs=2",
        "--save_every_n_epochs=1", "--mixed_precision=bf16", "--gradient_checkpointing", "--cache_text_encoder_outputs",
        "--cache_latents", f"--tokenizer_cache_dir={sdxl_tokenizer_cache_dir}", "--max_data_loader_n_workers=0",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "my_sdxl_lora-000001.safetensors").is_file() and (out / "my_sdxl_lora.safetensors").is_file()
