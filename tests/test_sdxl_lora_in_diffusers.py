"""A LoRA file trained by sdxl_train_network.py loads into diffusers' StableDiffusionXLPipeline (the independent
reader): every module in the file adapts a layer of the U-Net or one of the two text encoders, with the file's
rank and alpha, and the pipeline then encodes prompts and denoises as our models do with the network applied or
merged. Unloading gives back the base model.

The file is sd-scripts' SDXL format: U-Net modules under sgm names (``lora_unet_input_blocks_4_1_...``), 3x3 conv
modules from ``conv_dim``, CLIP-L under ``lora_te1_`` and bigG under ``lora_te2_``; diffusers maps the sgm block
numbers to its own with the U-Net's ``layers_per_block``, which the tiny model keeps at 1 (SDXL: 2).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers_oracle import write_sdxl_diffusers_folder
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import Tensor
from train_helpers import CAPTIONS, base_argv, lora_tensors, make_dataset
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import sdxl_train_network
from library.models.sdxl_conditioning import sdxl_size_embedding
from library.models.sdxl_loading import SdxlModels, load_sdxl_models
from library.models.sdxl_text import encode_sdxl, load_sdxl_tokenizers, tokenize_sdxl
from networks.lora import create_network_from_weights

ADAPTER = "ours"
# Which part of the pipeline each file prefix belongs to.
PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
PROMPTS = CAPTIONS[:2]
# Per-sample SDXL size conditioning: original (h, w), crop (top, left), target (h, w).
ORIGINAL = torch.tensor([[64, 96], [80, 64]])
CROP = torch.tensor([[0, 16], [8, 0]])
TARGET = torch.tensor([[64, 64], [96, 64]])
PREDICTIONS = ("hidden_states", "pooled", "noise")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir) -> Path:
    """Three steps at a high rate with the text encoders trained, so lora_up leaves zero wherever the forward pass
    reaches (not CLIP-L's last layer: SDXL reads its penultimate state). Linear modules get alpha/rank 1/4 and
    conv modules 1/2, so a reader that drops per-module alphas shows."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    argv = base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, make_dataset(root / "data"), root / "out",
                     "--max_train_steps=3", "--learning_rate=2e-2", "--network_alpha=1",
                     "--network_args", "conv_dim=2", "conv_alpha=1")
    sdxl_train_network.main(argv)
    return root / "out" / "lora.safetensors"


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny_sdxl_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("sdxl_diffusers")
    write_sdxl_diffusers_folder(load_file(tiny_sdxl_checkpoint), folder)
    return folder


@pytest.fixture
def pipe(diffusers_folder, sdxl_tokenizer_cache_dir, lora_file) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline from the converted folder, with our file loaded through its own loader."""
    tokenizers = load_sdxl_tokenizers(sdxl_tokenizer_cache_dir)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(diffusers_folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(diffusers_folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(diffusers_folder / "text_encoder_2"),
        tokenizer=tokenizers.clip_l, tokenizer_2=tokenizers.clip_g,
        unet=UNet2DConditionModel.from_pretrained(diffusers_folder / "unet"),
        scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipeline.load_lora_weights(str(lora_file), adapter_name=ADAPTER)
    return pipeline


def adapted_layers(pipeline: StableDiffusionXLPipeline, part: str) -> list[LoraLayer]:
    return [m for m in getattr(pipeline, part).modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def latents_and_timesteps() -> tuple[Tensor, Tensor]:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([321, 654])


def their_predictions(pipeline: StableDiffusionXLPipeline) -> dict[str, Tensor]:
    """Text conditioning from the pipeline's own encode_prompt; the U-Net given the sizes as time_ids."""
    latents, timesteps = latents_and_timesteps()
    with torch.no_grad():
        hidden, _, pooled, _ = pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.cat([ORIGINAL, CROP, TARGET], dim=1).float()
        added = {"text_embeds": pooled, "time_ids": time_ids}
        noise = pipeline.unet(latents, timesteps, hidden, added_cond_kwargs=added).sample
    return {"hidden_states": hidden, "pooled": pooled, "noise": noise}


def our_predictions(models: SdxlModels, tokenizer_cache_dir: Path) -> dict[str, Tensor]:
    latents, timesteps = latents_and_timesteps()
    with torch.no_grad():
        text = encode_sdxl(models.text_encoder_l, models.text_encoder_g,
                           tokenize_sdxl(load_sdxl_tokenizers(tokenizer_cache_dir), PROMPTS))
        y = sdxl_size_embedding(text["pooled"], ORIGINAL, CROP, TARGET)
        noise = models.unet(latents, timesteps, text["hidden_states"], y)
    return {**text, "noise": noise}


def our_models_with_lora(checkpoint: Path, lora_path: Path, merged: bool) -> SdxlModels:
    models = load_sdxl_models(checkpoint)
    encoders = [models.text_encoder_l, models.text_encoder_g]
    network, weights = create_network_from_weights(1.0, str(lora_path), models.vae, encoders, models.unet)
    if merged:
        network.merge_to(encoders, models.unet, weights, None, "cpu")
    else:
        network.apply_to(encoders, models.unet)
        network.load_weights(str(lora_path))
    return models


def rank_and_scale(tensors: dict[str, Tensor], name: str) -> tuple[int, float]:
    rank = tensors[f"{name}.lora_down.weight"].shape[0]
    return rank, tensors[f"{name}.alpha"].item() / rank


def assert_predictions_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for key in PREDICTIONS:
        torch.testing.assert_close(
            actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=lambda message, key=key: f"{key}: {message}"
        )


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.slow
def test_every_module_in_the_file_adapts_a_pipeline_layer_with_its_rank_and_alpha(pipe, lora_file):
    tensors = lora_tensors(lora_file)
    modules = sorted({key.split(".")[0] for key in tensors if key.endswith(".lora_down.weight")})
    assert any(tensors[f"{name}.lora_down.weight"].shape[2:] == (3, 3) for name in modules)  # conv_dim took effect
    for part, prefix in PARTS.items():
        in_file = [name for name in modules if name.startswith(prefix)]
        layers = adapted_layers(pipe, part)
        assert in_file and len(layers) == len(in_file), part
        # diffusers names modules its own way; the (rank, alpha / rank) pairs must still match one for one.
        expected = Counter(rank_and_scale(tensors, name) for name in in_file)
        assert Counter((layer.r[ADAPTER], layer.scaling[ADAPTER]) for layer in layers) == expected, part
    assert sum(len(adapted_layers(pipe, part)) for part in PARTS) == len(modules)


@pytest.mark.slow
@pytest.mark.parametrize("merged", [False, True], ids=["applied", "merged"])
def test_pipeline_encodes_and_denoises_as_our_lora_network(
    pipe, lora_file, tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, merged
):
    ours = our_predictions(our_models_with_lora(tiny_sdxl_checkpoint, lora_file, merged), sdxl_tokenizer_cache_dir)
    theirs = their_predictions(pipe)
    # CLIP-L's and bigG's penultimate states side by side, then bigG's pooled projection: both encoders' LoRA.
    assert_predictions_close(ours, theirs)
    assert theirs["noise"].std() > 0.1


@pytest.mark.slow
def test_unloading_gives_back_the_base_model_which_the_lora_changes(
    pipe, tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir
):
    with_lora = their_predictions(pipe)
    pipe.unload_lora_weights()
    assert not any(adapted_layers(pipe, part) for part in PARTS)
    plain = their_predictions(pipe)
    base = our_predictions(load_sdxl_models(tiny_sdxl_checkpoint), sdxl_tokenizer_cache_dir)
    assert_predictions_close(plain, base)
    for key in PREDICTIONS:
        # Far above the tolerance the LoRA comparisons use, so those comparisons are not vacuous.
        assert relative_error(with_lora[key], plain[key]) > 1e-2, key
