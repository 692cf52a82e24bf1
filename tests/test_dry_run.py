"""--dry_run on the three entry scripts: buckets, steps, caches, learning rates and memory, with no model loaded."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from train_helpers import base_argv, lora_metadata

import library.trainer
import sd3_train_network
import sdxl_train_network
import train_network
from library.fixtures.images import write_fixture_images
from library.trainer_setup import create_network

SQUARE, WIDE = (128, 128), (128, 64)  # land in the 128x128 and 160x96 buckets of the dataset below


def two_bucket_dataset(root: Path, *, extra_dataset: str = "") -> Path:
    """Three square images repeated twice and two wide ones once: two buckets, 8 images per epoch."""
    write_fixture_images(root / "square", 3, sizes=(SQUARE,), captions=["a red square", "a blue square", "a dot"])
    write_fixture_images(root / "wide", 2, sizes=(WIDE,), captions=["a wide stripe", "a wide band"])
    path = root / "dataset.toml"
    path.write_text(
        "[general]\ncaption_extension = \".txt\"\n\n"
        f"[[datasets]]\nresolution = 128\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 64\n"
        f"max_bucket_reso = 256\nbucket_reso_steps = 32\n{extra_dataset}\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(root / 'square').as_posix()}'\n  num_repeats = 2\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(root / 'wide').as_posix()}'\n  num_repeats = 1\n")
    return path


@pytest.fixture
def plans(monkeypatch):
    """The DryRunPlan of every dry run in the test, recorded on its way to the printer."""
    recorded = []
    original = library.trainer.format_dry_run

    def record(plan):
        recorded.append(plan)
        return original(plan)

    monkeypatch.setattr(library.trainer, "format_dry_run", record)
    return recorded


def _scripts(request) -> dict:
    """entry module and base command line per family, built from the session's tiny checkpoints."""
    return {
        "sd1": (train_network, request.getfixturevalue("tiny_sd1_checkpoint"), request.getfixturevalue("tokenizer_cache_dir")),
        "sdxl": (sdxl_train_network, request.getfixturevalue("tiny_sdxl_checkpoint"),
                 request.getfixturevalue("sdxl_tokenizer_cache_dir")),
        "sd3": (sd3_train_network, request.getfixturevalue("tiny_sd3_checkpoints")["sd3.5-medium"],
                request.getfixturevalue("sd3_tokenizer_cache_dir")),
    }


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_dry_run_reports_buckets_steps_and_missing_caches_without_loading(family, request, tmp_path, plans,
                                                                        no_model_loading, capsys):
    script, checkpoint, tokenizers = _scripts(request)[family]
    dataset = two_bucket_dataset(tmp_path / "data")
    script.main(base_argv(checkpoint, tokenizers, dataset, tmp_path / "out", "--max_train_epochs=3",
                          "--gradient_accumulation_steps=2", "--cache_latents_to_disk", "--dry_run"))
    out = capsys.readouterr().out
    plan = plans[-1]
    assert plan.train_set.bucket_summary() == [((128, 128), 6), ((160, 96), 2)]
    assert re.search(r"^  128x128: 6$", out, re.M) and re.search(r"^  160x96: 2$", out, re.M)
    assert "square: 3 images x 2 repeats" in out and "wide: 2 images x 1 repeats" in out
    # 3 batches of 2 square images + 1 batch of 2 wide ones; two batches per optimizer step.
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.max_steps, plan.max_epochs) == (4, 2, 6, 3)
    assert "total: 6 steps over 3 epochs" in out
    assert plan.latent_cache == {"valid": 0, "stale": 0, "missing": 5}
    assert plan.profile.family == {"sd1": "sd1", "sdxl": "sdxl", "sd3": "sd3"}[family]
    assert plan.memory is not None and "peak allocated" in out
    assert not list((tmp_path / "data").rglob("*_lat.safetensors"))


def test_step_counts_match_a_real_run(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path, plans):
    dataset = two_bucket_dataset(tmp_path / "data")
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--max_train_epochs=2",
                     "--gradient_accumulation_steps=3", "--network_train_unet_only", "--cache_latents_to_disk")
    train_network.main(argv + ["--dry_run"])
    plan = plans[-1]
    train_network.main(argv)
    meta = lora_metadata(tmp_path / "out" / "lora.safetensors")
    assert (int(meta["ss_max_train_steps"]), int(meta["ss_num_epochs"])) == (plan.max_steps, plan.max_epochs) == (4, 2)
    assert int(meta["ss_steps"]) // int(meta["ss_epoch"]) == plan.steps_per_epoch

    # The real run filled the disk cache: a second dry run finds every entry valid.
    train_network.main(argv + ["--dry_run"])
    assert plans[-1].latent_cache == {"valid": 5, "stale": 0, "missing": 0}
    # Another VAE precision is another producer: every entry is stale.
    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision in the same process
    train_network.main(argv + ["--dry_run", "--mixed_precision=bf16"])
    assert plans[-1].latent_cache == {"valid": 0, "stale": 5, "missing": 0}
    # A retouched image invalidates its own entry only.
    image = next((tmp_path / "data" / "wide").glob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_network.main(argv + ["--dry_run"])
    assert plans[-1].latent_cache == {"valid": 4, "stale": 1, "missing": 0}


def test_text_cache_status_follows_the_cache_key(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path, plans):
    dataset = two_bucket_dataset(tmp_path / "data")
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out",
                     "--cache_text_encoder_outputs_to_disk", "--max_train_steps=1")
    train_network.main(argv + ["--dry_run"])
    assert plans[-1].text_cache == {"valid": 0, "stale": 0, "missing": 5}
    assert [group.description for group in plans[-1].lr_groups] == ["unet"]  # cached outputs: no text-encoder LoRA
    train_network.main(argv)
    train_network.main(argv + ["--dry_run"])
    assert plans[-1].text_cache == {"valid": 5, "stale": 0, "missing": 0}
    train_network.main(argv + ["--dry_run", "--clip_skip=2"])
    assert plans[-1].text_cache == {"valid": 0, "stale": 5, "missing": 0}


def _real_groups(trainer_class, argv: list[str], parser) -> tuple[list[str], list[float | None], int]:
    """The param groups (descriptions, lrs) and LoRA size of the network a real run builds from these flags."""
    from library.args import parse_args

    args = parse_args(parser, argv)
    if trainer_class is sdxl_train_network.SdxlNetworkTrainer:
        args = sdxl_train_network.sdxl_learning_rates(args)
    trainer = trainer_class(args)
    models = trainer.prepare_models(args)
    train_te = not args.network_train_unet_only and not args.cache_text_encoder_outputs
    network = create_network(args, models.vae, models.text_encoder_arg(), models.denoiser, train_te)
    groups, names = network.prepare_optimizer_params(args.text_encoder_lr or None, args.unet_lr, args.learning_rate)
    unet_params = sum(p.numel() for lora in network.unet_loras for p in lora.parameters())
    return names, [group.get("lr") for group in groups], unet_params


@pytest.mark.parametrize("family,extra", [
    ("sdxl", ["--text_encoder_lr1=3e-4", "--text_encoder_lr2=0", "--unet_lr=1e-4", "--network_args", "loraplus_lr_ratio=8"]),
    ("sd3", ["--text_encoder_lr", "2e-4", "5e-5", "--network_args", "train_t5xxl=True", "loraplus_unet_lr_ratio=4"]),
    ("sd1", ["--network_train_text_encoder_only", "--text_encoder_lr=7e-5"]),
    ("sd1", ["--unet_lr=2e-4", "--network_args", "down_lr_weight=sine", "mid_lr_weight=0", "loraplus_lr_ratio=4",
             "up_lr_weight=1,1,1,0.5,0.5,0.5,0.25,0.25,0.25,0,0,0"]),
    ("sdxl", ["--network_args", "conv_dim=4", "mid_lr_weight=0.5,0,2", "up_lr_weight=reverse_linear+.1"]),
])
def test_learning_rates_and_lora_size_match_the_optimizer_a_real_run_builds(family, extra, request, tmp_path, plans):
    script, checkpoint, tokenizers = _scripts(request)[family]
    dataset = two_bucket_dataset(tmp_path / "data")
    argv = base_argv(checkpoint, tokenizers, dataset, tmp_path / "out", *extra)
    script.main(argv + ["--dry_run"])
    plan = plans[-1]
    trainer_class = {"sd1": train_network.SdNetworkTrainer, "sdxl": sdxl_train_network.SdxlNetworkTrainer,
                     "sd3": sd3_train_network.Sd3NetworkTrainer}[family]
    names, lrs, unet_params = _real_groups(trainer_class, argv, script.setup_parser())
    assert [group.description for group in plan.lr_groups] == names
    assert [group.lr for group in plan.lr_groups] == pytest.approx(lrs)
    assert plan.denoiser_lora_params == unet_params


def test_dry_run_reports_the_errors_a_real_run_reports(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path, capsys,
                                                        no_model_loading):
    dataset = two_bucket_dataset(tmp_path / "data", extra_dataset="color_aug = true")
    argv = base_argv(tiny_sd3_checkpoints["sd3-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "out",
                     "--cache_latents", "--dry_run")
    with pytest.raises(SystemExit):
        sd3_train_network.main(argv)
    assert "color_aug" in capsys.readouterr().err


def test_a_model_without_a_safetensors_header_still_gets_a_plan(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path,
                                                                 plans, no_model_loading, capsys):
    """A .ckpt has no header to read: the dry run says what it cannot report (model sizes, memory, the text
    encoders' groups) instead of failing, --text_encoder_lr included."""
    import torch
    from safetensors.torch import load_file

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1_checkpoint))}, checkpoint)
    dataset = two_bucket_dataset(tmp_path / "data")
    train_network.main(base_argv(checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--text_encoder_lr=5e-5",
                                 "--dry_run"))
    out = capsys.readouterr().out
    assert plans[-1].profile is None and plans[-1].memory is None
    assert "not read: " in out and "model.ckpt" in out and "text-encoder groups unknown" in out
    assert [group.description for group in plans[-1].lr_groups] == ["unet"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_folder_gets_the_same_sizes_and_estimate_as_its_single_file(family, request, tmp_path, plans,
                                                                                no_model_loading):
    """The folder's parts are read from their own headers (unet/, vae/, text_encoder*/) and its U-Net config from
    unet/config.json: the same parameter counts, and so the same memory estimate, as the single file it came from."""
    from diffusers_oracle import write_diffusers_folder, write_sdxl_diffusers_folder
    from safetensors.torch import load_file

    script, checkpoint, tokenizers = _scripts(request)[family]
    folder = tmp_path / "pipeline"
    if family == "sd1":
        write_diffusers_folder(checkpoint, folder, v2=False)
    else:
        write_sdxl_diffusers_folder(load_file(str(checkpoint)), folder)
    dataset = two_bucket_dataset(tmp_path / "data")
    for model in (checkpoint, folder):
        script.main(base_argv(model, tokenizers, dataset, tmp_path / "out", "--dry_run"))
    single, from_folder = plans[-2], plans[-1]
    assert from_folder.profile.family == single.profile.family == family
    assert from_folder.profile.denoiser_config == single.profile.denoiser_config
    for part in ("denoiser", "vae"):
        assert getattr(from_folder.profile, part).params == getattr(single.profile, part).params
    # OpenCLIP's bigG stores one scalar more (logit_scale) than the transformers model of a diffusers folder
    assert [te.params for te in from_folder.profile.text_encoders] == pytest.approx(
        [te.params for te in single.profile.text_encoders], abs=1)
    assert from_folder.memory.peak_allocated == pytest.approx(single.memory.peak_allocated, rel=0.01)


def test_dim_from_weights_sizes_every_part_from_the_file(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path, plans):
    """With --dim_from_weights the LoRA the estimate counts is the file's, text encoder included, whatever
    --network_dim says."""
    from train_helpers import lora_tensors

    dataset = two_bucket_dataset(tmp_path / "data")
    trained = tmp_path / "first"
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, trained, "--network_dim=8",
                                 "--max_data_loader_n_workers=0"))
    in_file = sum(t.numel() for key, t in lora_tensors(trained / "lora.safetensors").items() if not key.endswith(".alpha"))
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--network_dim=2",
                                 f"--network_weights={trained / 'lora.safetensors'}", "--dim_from_weights", "--dry_run"))
    [lora_term] = [term for term in plans[-1].memory.terms if term.name == "LoRA weights"]
    assert f"{in_file:,} parameters" in lora_term.note


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_base_takes_a_byte_off_every_unet_linear_and_conv_weight(family, request, tmp_path, plans, no_model_loading):
    """--fp8_base_unet stores each U-Net matrix and conv kernel in one byte instead of bf16's two (but time_embed.0,
    whose dtype the U-Net computes in); --fp8_base also the text encoders' Linear weights. Counted here from the
    checkpoint header, independently of the model classes the dry run builds."""
    from library.checkpoint_profile import read_header

    script, checkpoint, tokenizers = _scripts(request)[family]
    dataset = two_bucket_dataset(tmp_path / "data")
    for extra in ([], ["--fp8_base_unet"], ["--fp8_base"]):
        script.main(base_argv(checkpoint, tokenizers, dataset, tmp_path / "out", "--mixed_precision=bf16", "--dry_run", *extra))
    plain, unet_only, both = (plan.memory for plan in plans[-3:])
    prefix = "model.diffusion_model."
    unet_fp8 = sum(info.numel for key, info in read_header(checkpoint).items()
                   if key.startswith(prefix) and key.endswith(".weight") and len(info.shape) in (2, 4)
                   and key != prefix + "time_embed.0.weight")
    assert plain.term("denoiser weights") - unet_only.term("denoiser weights") == unet_fp8
    assert unet_only.term("denoiser weights") == both.term("denoiser weights")
    assert unet_only.term("text encoder weights") == plain.term("text encoder weights")
    assert both.term("text encoder weights") < plain.term("text encoder weights")
    assert both.peak_allocated < unet_only.peak_allocated < plain.peak_allocated
