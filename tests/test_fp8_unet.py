"""--fp8_base / --fp8_base_unet on SD1/SD2 and SDXL: what is stored in fp8 after placement, that LoRA (conv LoRA and
text-encoder LoRA included) trains on top, and how far the U-Net's output moves from bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from train_helpers import base_argv, lora_tensors, make_dataset

import sdxl_train_network
import train_network
from library.fp8 import FP8_DTYPE, move_keeping_fp8
from library.models.sd_loading import load_sd_models
from library.models.sdxl_loading import load_sdxl_models

COMPUTE = torch.bfloat16


def _record_models(monkeypatch, trainer_class) -> dict:
    """The trainer's Models, caught when the denoiser is placed (their dtypes are read after the run)."""
    caught = {}
    original = trainer_class.place_denoiser

    def spy(self, args, models, device, dtype, resolutions):
        original(self, args, models, device, dtype, resolutions)
        caught["models"] = models

    monkeypatch.setattr(trainer_class, "place_denoiser", spy)
    return caught


def _unet_dtypes_as_sd_scripts_stores_them(unet: nn.Module) -> None:
    """Every Linear matrix and conv kernel of the U-Net in fp8, except time_embed.0 (the U-Net computes in its
    dtype); norms and biases in the compute dtype (sd-scripts casts those to fp8 too and lets autocast upcast them:
    they are 0.4% of the bytes)."""
    wrong = {name: p.dtype for name, p in unet.named_parameters()
             if p.dtype != (FP8_DTYPE if p.ndim in (2, 4) and name != "time_embed.0.weight" else COMPUTE)}
    assert not wrong, wrong
    assert sum(p.dtype == FP8_DTYPE for p in unet.parameters()) == sum(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules()) - 1


def _text_encoder_dtypes(encoder: nn.Module, fp8: bool) -> None:
    """Linear weights in fp8 with --fp8_base; token and position embeddings, norms and biases in the compute
    dtype (sd-scripts keeps the embeddings too: nn.Embedding has no fp8 kernel)."""
    for name, p in encoder.named_parameters():
        linear = p.ndim == 2 and "embedding" not in name
        assert p.dtype == (FP8_DTYPE if fp8 and linear else COMPUTE), (name, p.dtype)


def _trained(tensors: dict[str, torch.Tensor], prefix: str) -> bool:
    """Some LoRA up weight under `prefix` moved off its zero initialisation, and everything is finite."""
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    return any(t.abs().sum() > 0 for k, t in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight"))


def test_sd1_fp8_base_trains_unet_conv_and_text_encoder_lora_and_samples(tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                                         tmp_path, monkeypatch):
    caught = _record_models(monkeypatch, train_network.SdNetworkTrainer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --d 3 --s 2 --l 2\n")
    out = tmp_path / "out"
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                 "--fp8_base", "--mixed_precision=bf16", "--gradient_checkpointing",
                                 "--network_args", "conv_dim=4", "conv_alpha=2",
                                 f"--sample_prompts={prompts}", "--sample_every_n_steps=2"))
    models = caught["models"]
    _unet_dtypes_as_sd_scripts_stores_them(models.denoiser)
    _text_encoder_dtypes(models.text_encoders[0], fp8=True)
    tensors = lora_tensors(out / "lora.safetensors")
    assert _trained(tensors, "lora_unet_") and _trained(tensors, "lora_te_")
    assert _trained(tensors, "lora_unet_down_blocks_0_resnets_0_conv1.")  # C3Lier on an fp8 3x3 conv
    assert len(list((out / "sample").glob("*.png"))) == 1


def test_sd1_fp8_base_unet_leaves_the_text_encoder_in_the_compute_dtype(tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                                       tmp_path, monkeypatch):
    caught = _record_models(monkeypatch, train_network.SdNetworkTrainer)
    out = tmp_path / "out"
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                 "--fp8_base_unet", "--mixed_precision=bf16", "--cache_latents"))
    _unet_dtypes_as_sd_scripts_stores_them(caught["models"].denoiser)
    _text_encoder_dtypes(caught["models"].text_encoders[0], fp8=False)
    assert _trained(lora_tensors(out / "lora.safetensors"), "lora_te_")


def test_sdxl_fp8_base_trains_with_cached_text_offloaded_checkpointing_and_full_bf16(
        tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path, monkeypatch):
    caught = _record_models(monkeypatch, sdxl_train_network.SdxlNetworkTrainer)
    out = tmp_path / "out"
    sdxl_train_network.main(base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                      "--fp8_base", "--mixed_precision=bf16", "--full_bf16", "--cache_text_encoder_outputs",
                                      "--gradient_checkpointing", "--cpu_offload_checkpointing",
                                      "--network_args", "conv_dim=4", "conv_alpha=2"))
    models = caught["models"]
    _unet_dtypes_as_sd_scripts_stores_them(models.denoiser)
    for encoder in models.text_encoders:  # stored in fp8 after their outputs were cached from the bf16 weights
        _text_encoder_dtypes(encoder, fp8=True)
    tensors = lora_tensors(out / "lora.safetensors")
    assert _trained(tensors, "lora_unet_input_blocks_1_0_in_layers_2.")  # conv LoRA, sgm names
    assert _trained(tensors, "lora_unet_") and not any(k.startswith("lora_te") for k in tensors)


# Tolerance of the fp8 U-Net's output against the same U-Net in bf16, as a relative L2 error. Each stored weight is
# rounded to e4m3's 3 mantissa bits: at most 2^-4 of itself, 2.7% RMS over a layer (measured on these weights).
# Independent per-layer errors add in quadrature along the deepest path: about 70 weight layers in these tiny
# U-Nets (conv_in, each res block's two convs, each transformer's 7 sequential projections, ..., conv_out), so
# sqrt(70) x 2.7% = 0.23; residual connections shorten the effective depth. Measured: 0.131 (SD1), 0.140 (SDXL),
# against 0.017 / 0.018 for bf16 itself against fp32. A wrong up-cast (scale, dropped bias, fp8 activations) errs
# by order 1. The test also checks that the whole difference is the weight rounding (exact equality below).
FP8_VS_BF16_TOLERANCE = 0.25


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_unet_output_is_bf16_with_rounded_weights_and_within_tolerance(family, request):
    if family == "sd1":
        unet = load_sd_models(request.getfixturevalue("tiny_sd1_checkpoint"), v2=False).unet
        layout = train_network.SdNetworkTrainer.fp8_denoiser_layout
    else:
        unet = load_sdxl_models(request.getfixturevalue("tiny_sdxl_checkpoint")).unet
        layout = sdxl_train_network.SdxlNetworkTrainer.fp8_denoiser_layout
    unet.requires_grad_(False).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([100, 700])
    context = torch.randn(2, 77, unet.config.context_dim, generator=generator)
    y = torch.randn(2, unet.config.adm_in_channels, generator=generator) if unet.config.adm_in_channels else None

    def output(model: nn.Module) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=COMPUTE):
            return model(x, timesteps, context, y).float()

    bf16 = copy.deepcopy(unet).to(COMPUTE)
    fp8 = copy.deepcopy(unet)
    layout.store(fp8)
    move_keeping_fp8(fp8, "cpu", COMPUTE)
    rounded = copy.deepcopy(unet)  # plain bf16 layers carrying the fp8-rounded weights
    stored = dict(fp8.named_parameters())
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            parameter.copy_(stored[name].float())
    rounded.to(COMPUTE)

    torch.testing.assert_close(output(fp8), output(rounded), rtol=0, atol=0)
    reference = output(bf16)
    relative_error = ((output(fp8) - reference).norm() / reference.norm()).item()
    assert relative_error < FP8_VS_BF16_TOLERANCE, relative_error
