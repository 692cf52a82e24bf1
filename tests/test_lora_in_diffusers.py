"""A LoRA file trained by train_network.py loads into a diffusers StableDiffusionPipeline (the independent reader):
every module in the file is used, and the pipeline's text encoder and U-Net then compute what ours compute."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers_oracle import write_diffusers_folder
from train_helpers import base_argv, lora_tensors, make_dataset
from transformers import CLIPTextModel

import train_network
from library.models.sd_loading import load_sd_models
from library.models.tokenizers import SD1_TOKENIZER_ID, load_clip_tokenizer
from networks.lora import create_network_from_weights


@pytest.mark.slow
def test_trained_lora_loads_into_a_diffusers_pipeline_with_every_key_used(tmp_path, tiny_sd1_checkpoint, tokenizer_cache_dir):
    dataset = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    # A few steps at a high rate so lora_up moves away from its zero start in both the text encoder and the U-Net.
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, out, "--max_train_steps=3",
                                 "--learning_rate=2e-2", "--network_args", "conv_dim=2", "conv_alpha=1"))
    lora_path = out / "lora.safetensors"
    tensors = lora_tensors(lora_path)
    module_count = sum(key.endswith(".lora_down.weight") for key in tensors)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)

    folder = tmp_path / "diffusers"
    write_diffusers_folder(tiny_sd1_checkpoint, folder, v2=False)
    tokenizer = load_clip_tokenizer(SD1_TOKENIZER_ID, str(tokenizer_cache_dir))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_pretrained(folder / "unet"), scheduler=DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_path), adapter_name="ours")
    adapted = [m for part in (pipe.unet, pipe.text_encoder) for m in part.modules()
               if hasattr(m, "lora_A") and "ours" in m.lora_A]
    assert len(adapted) == module_count

    ours = load_sd_models(tiny_sd1_checkpoint, v2=False)
    network, _ = create_network_from_weights(1.0, str(lora_path), ours.vae, ours.text_encoder, ours.unet)
    network.apply_to(ours.text_encoder, ours.unet)
    network.load_weights(str(lora_path))

    ids = tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([321])
    with torch.no_grad():
        our_text = ours.text_encoder(ids).last_hidden_state
        their_text = pipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(their_text, our_text, rtol=1e-4, atol=1e-5)
        our_out = ours.unet(latents, timesteps, our_text)
        their_out = pipe.unet(latents, timesteps, their_text).sample
    torch.testing.assert_close(their_out, our_out, rtol=1e-4, atol=1e-5)

    # The LoRA really changes the model: without it the outputs differ.
    pipe.unload_lora_weights()
    with torch.no_grad():
        plain = pipe.unet(latents, timesteps, pipe.text_encoder(ids).last_hidden_state).sample
    assert (plain - our_out).abs().max() > 1e-4
