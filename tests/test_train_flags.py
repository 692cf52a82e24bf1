"""Training flags through train_network.main on the tiny fixtures: each test checks what the flag must change."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_argv, lora_metadata, lora_tensors, make_dataset, scalars

import train_network


class Runner:
    """Trains on a per-test copy of the four-image dataset; returns the output folder."""

    def __init__(self, checkpoint: Path, tokenizers: Path, root: Path):
        self.checkpoint, self.tokenizers, self.root = checkpoint, tokenizers, root
        self.dataset = make_dataset(root / "data")

    def __call__(self, *extra: str, output: str = "out", checkpoint: Path | None = None, dataset: Path | None = None) -> Path:
        out = self.root / output
        train_network.main(base_argv(checkpoint or self.checkpoint, self.tokenizers, dataset or self.dataset, out, *extra))
        return out


@pytest.fixture
def run(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    return Runner(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path)


def test_save_formats_and_precision(run):
    out = run("--save_model_as=ckpt", "--save_precision=fp16")
    state = torch.load(out / "lora.ckpt", weights_only=True)
    assert state and all(t.dtype == torch.float16 for t in state.values())
    out = run("--save_model_as=pt", "--save_precision=bf16", output="pt")
    assert all(t.dtype == torch.bfloat16 for t in torch.load(out / "lora.pt", weights_only=True).values())


def test_epoch_saves_rotate_and_states_are_kept(run):
    out = run("--max_train_epochs=4", "--save_every_n_epochs=1", "--save_last_n_epochs=2", "--save_state",
              "--save_last_n_epochs_state=1")
    assert sorted(p.name for p in out.glob("lora-0000*.safetensors")) == ["lora-000002.safetensors", "lora-000003.safetensors"]
    assert sorted(p.name for p in out.glob("lora-0000*-state")) == ["lora-000003-state"]
    assert lora_metadata(out / "lora.safetensors")["ss_epoch"] == "4"


def test_step_saves_rotate(run):
    out = run("--max_train_steps=8", "--save_every_n_steps=2", "--save_last_n_steps=2")
    # sd-scripts keeps the saves within the last 2 steps, counting the newest: steps 4 and 6 (8 is the final file).
    assert sorted(p.name for p in out.glob("lora-step*.safetensors")) == ["lora-step00000004.safetensors",
                                                                          "lora-step00000006.safetensors"]


def test_network_weights_continue_and_dim_from_weights(run):
    first = run("--network_dim=6", "--learning_rate=1e-2", "--max_train_steps=2", output="first")
    weights = lora_tensors(first / "lora.safetensors")
    # A negligible rate: continuing must start from the loaded weights and take their rank from the file.
    second = run(f"--network_weights={first / 'lora.safetensors'}", "--dim_from_weights", "--network_dim=2",
                 "--learning_rate=1e-12", "--max_train_steps=1", output="second")
    continued = lora_tensors(second / "lora.safetensors")
    assert continued.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(continued[key], weights[key])


def test_unet_only_and_text_encoder_only(run):
    unet_only = lora_tensors(run("--network_train_unet_only", output="u") / "lora.safetensors")
    te_only = lora_tensors(run("--network_train_text_encoder_only", output="t") / "lora.safetensors")
    assert unet_only and all(k.startswith("lora_unet_") for k in unet_only)
    assert te_only and all(k.startswith("lora_te_") for k in te_only)


def test_unet_and_text_encoder_learning_rates_reach_their_groups(run, tmp_path):
    logs = tmp_path / "logs"
    run("--unet_lr=3e-4", "--text_encoder_lr=7e-5", f"--logging_dir={logs}", "--max_train_steps=1")
    assert scalars(logs, "lr/unet") == [pytest.approx(3e-4)]
    assert scalars(logs, "lr/textencoder") == [pytest.approx(7e-5)]


def test_gradient_accumulation_counts_optimizer_steps(run):
    out = run("--gradient_accumulation_steps=2", "--max_train_epochs=2")  # 2 batches per epoch → 1 step per epoch
    assert lora_metadata(out / "lora.safetensors")["ss_steps"] == "2"


def test_scheduler_warmup_ratio_shapes_the_learning_rate(run, tmp_path):
    logs = tmp_path / "logs"
    run("--lr_scheduler=cosine", "--lr_warmup_steps=0.5", "--max_train_steps=4", "--learning_rate=1e-3",
        f"--logging_dir={logs}", "--network_train_unet_only")
    lrs = scalars(logs, "lr/unet")
    # Warm-up over 2 of 4 steps, then half a cosine: values after each optimizer step.
    expected = [1e-3 * 1 / 2, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 2)), 0.0]
    assert lrs == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("optimizer", ["AdamW", "SGDNesterov", "Adafactor", "Prodigy", "AdamWScheduleFree",
                                       "torch.optim.RMSprop"])
def test_optimizers_train(run, optimizer):
    extra = ["--optimizer_args", "relative_step=False", "scale_parameter=False"] if optimizer == "Adafactor" else []
    if optimizer == "Prodigy":
        extra = ["--learning_rate=1.0"]
    out = run(f"--optimizer_type={optimizer}", "--max_train_steps=2", "--learning_rate=1e-2", *extra)
    ups = [t for k, t in lora_tensors(out / "lora.safetensors").items() if k.endswith("lora_up.weight")]
    assert any(t.abs().sum() > 0 for t in ups), optimizer  # the zero-initialised up weights moved
    expected = {"SGDNesterov": "SGD", "AdamWScheduleFree": "AdamWScheduleFree"}.get(optimizer, optimizer.split(".")[-1])
    assert expected.lower() in lora_metadata(out / "lora.safetensors")["ss_optimizer"].lower()


def test_validation_loss_is_logged(run, tmp_path):
    logs = tmp_path / "logs"
    dataset = make_dataset(tmp_path / "val_data", extra_general="validation_split = 0.5")
    run(f"--logging_dir={logs}", "--max_train_steps=2", "--validate_every_n_steps=1", dataset=dataset)
    assert len(scalars(logs, "loss/validation")) >= 2


def test_samples_at_first_and_every_n_steps(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --d 3 --s 3 --l 2\n")
    out = run(f"--sample_prompts={prompts}", "--sample_at_first", "--sample_every_n_steps=2", "--max_train_steps=2",
              "--sample_sampler=k_dpm_2_a")
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert [n.split("_")[1] for n in names] == ["000000", "000002"]


def test_config_file_supplies_flags(run, tmp_path):
    config = tmp_path / "args.toml"
    config.write_text("[saving]\nsave_precision = \"fp16\"\n[metadata]\ntraining_comment = \"from toml\"\n"
                      "[network]\nnetwork_dim = 3\n")
    out = run(f"--config_file={config}")  # the command line's --network_dim=4 wins over the file's 3
    tensors = load_file(out / "lora.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert next(t for k, t in tensors.items() if k.endswith("lora_down.weight")).shape[0] == 4
    assert lora_metadata(out / "lora.safetensors")["ss_training_comment"] == "from toml"


def test_scale_weight_norms_caps_every_module(run):
    out = run("--scale_weight_norms=0.01", "--learning_rate=5e-2", "--max_train_steps=3")
    tensors = lora_tensors(out / "lora.safetensors")
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key].flatten(1), tensors[f"{name}.lora_up.weight"].flatten(1)
        scale = tensors[f"{name}.alpha"].item() / down.shape[0]
        assert (up @ down * scale).norm().item() <= 0.01 * 1.001


@pytest.mark.parametrize("flags", [
    ("--min_snr_gamma=5", "--noise_offset=0.1", "--noise_offset_random_strength"),
    ("--debiased_estimation_loss", "--multires_noise_iterations=3", "--ip_noise_gamma=0.1"),
    ("--loss_type=huber", "--huber_schedule=exponential", "--min_timestep=100", "--max_timestep=900"),
    ("--clip_skip=2", "--max_token_length=150", "--gradient_checkpointing"),
])
def test_loss_options_train_to_a_finite_file(run, flags):
    out = run(*flags)
    assert all(torch.isfinite(t).all() for t in lora_tensors(out / "lora.safetensors").values())


def test_sd2_v_parameterization(run, tiny_sd2_checkpoint):
    out = run("--v2", "--v_parameterization", "--zero_terminal_snr", "--scale_v_pred_loss_like_noise_pred",
              checkpoint=tiny_sd2_checkpoint)
    meta = lora_metadata(out / "lora.safetensors")
    assert meta["ss_v2"] == "True" and meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sd_v2_v"  # as sd-scripts


def test_masked_loss_uses_alpha_masks(run, tmp_path):
    from PIL import Image

    images = tmp_path / "data" / "images"
    for path in images.glob("*.png"):  # transparent right half: only the left half should count
        rgba = Image.open(path).convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        alpha.paste(255, (0, 0, rgba.size[0] // 2, rgba.size[1]))
        rgba.putalpha(alpha)
        rgba.save(path)
    out = run("--masked_loss", "--alpha_mask")
    assert lora_tensors(out / "lora.safetensors")


def test_no_metadata_keeps_only_the_minimum(run):
    meta = lora_metadata(run("--no_metadata") / "lora.safetensors")
    assert "ss_network_dim" in meta and "ss_tag_frequency" not in meta and "ss_dataset_dirs" not in meta


def test_cpu_offload_checkpointing_trains_like_plain_checkpointing(run):
    plain = lora_tensors(run("--gradient_checkpointing", output="plain") / "lora.safetensors")
    offloaded = lora_tensors(run("--gradient_checkpointing", "--cpu_offload_checkpointing", output="off") / "lora.safetensors")
    for key in plain:
        torch.testing.assert_close(offloaded[key], plain[key])


def test_previews_reuse_prompt_outputs_encoded_before_the_text_encoders_leave(run, tmp_path, monkeypatch):
    """With cached text outputs the preview prompts are encoded once up front, never while sampling."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --n blurry --w 64 --h 64 --d 3 --s 2\n")
    sampling, calls = {"on": False}, []
    original_encode, original_sample = train_network.SdNetworkTrainer.encode_text, train_network.SdNetworkTrainer.sample_images

    def encode(self, models, captions):
        calls.append(sampling["on"])
        return original_encode(self, models, captions)

    def sample(self, *args, **kwargs):
        sampling["on"] = True
        try:
            return original_sample(self, *args, **kwargs)
        finally:
            sampling["on"] = False

    monkeypatch.setattr(train_network.SdNetworkTrainer, "encode_text", encode)
    monkeypatch.setattr(train_network.SdNetworkTrainer, "sample_images", sample)
    out = run("--cache_text_encoder_outputs", f"--sample_prompts={prompts}", "--sample_every_n_steps=1")
    assert len(list((out / "sample").glob("*.png"))) == 2
    assert calls and not any(calls)  # every encode happened outside sampling
