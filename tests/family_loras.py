"""The tiny models of each family as the trainers load them, random LoRAs over them, and their outputs: what the
tests of the merge and extract tools compare files against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from library.models.sd3_loading import load_sd3_models
from library.models.sd_loading import load_sd_models
from library.models.sdxl_loading import load_sdxl_models
from networks.lora import LoRANetwork, create_network

FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
SD3_VARIANT = "sd3.5-medium"  # qk norm and x_block.attn2: the most layers

# Per family: a LoRA over everything the trainer can adapt (3x3 convs; SD3: embedders and T5 too).
NETWORK_ARGS = {
    "sd1": {"conv_dim": "2", "conv_alpha": "1"},
    "sd2": {"conv_dim": "2", "conv_alpha": "1"},
    "sdxl": {"conv_dim": "2", "conv_alpha": "1"},
    "sd3": {"emb_dims": "2,2,2,2,2,2", "train_t5xxl": "True"},
}


def family_checkpoint(request: pytest.FixtureRequest, family: str) -> Path:
    """The session's tiny single-file checkpoint of `family` (read-only)."""
    if family == "sd3":
        return request.getfixturevalue("tiny_sd3_checkpoints")[SD3_VARIANT]
    return request.getfixturevalue(f"tiny_{family}_checkpoint")


@dataclass
class FamilyModels:
    """The text encoders (in the trainer's order) and the denoiser, float32."""

    text_encoders: list[nn.Module]
    denoiser: nn.Module
    family: str


def load_family(family: str, path: Path) -> FamilyModels:
    if family in ("sd1", "sd2"):
        models = load_sd_models(path, v2=family == "sd2")
        return FamilyModels([models.text_encoder], models.unet, family)
    if family == "sdxl":
        models = load_sdxl_models(path)
        return FamilyModels([models.text_encoder_l, models.text_encoder_g], models.unet, family)
    models = load_sd3_models(path)
    return FamilyModels([models.text.clip_l, models.text.clip_g, models.text.t5xxl], models.mmdit, family)


def random_lora(models: FamilyModels, seed: int, dim: int = 4, alpha: float = 2.0, std: float = 0.05) -> LoRANetwork:
    """A LoRA over every layer the family's trainer can adapt, with random down and up weights (every module changes
    its layer), applied to `models` at multiplier 1."""
    network = create_network(1.0, dim, alpha, None, models.text_encoders, models.denoiser, **NETWORK_ARGS[models.family])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    network.apply_to(models.text_encoders, models.denoiser)
    return network


@torch.no_grad()
def outputs(models: FamilyModels) -> list[Tensor]:
    """Every text encoder's last hidden state and the denoiser's prediction on fixed inputs."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 100, (2, 8), generator=generator)
    results = [encoder(ids).last_hidden_state for encoder in models.text_encoders]
    timesteps = torch.tensor([30.0, 870.0])
    denoiser = models.denoiser
    if models.family == "sd3":
        config = denoiser.config
        latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
        context = torch.randn(2, 5, config.context_in_dim, generator=generator)
        y = torch.randn(2, config.adm_in_channels, generator=generator)
        return results + [denoiser(latents, timesteps, context, y)]
    config = denoiser.config
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    y = None if config.adm_in_channels is None else torch.randn(2, config.adm_in_channels, generator=generator)
    return results + [denoiser(latents, timesteps, context, y)]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def save_random_lora(models: FamilyModels, path: Path, ratio: float, seed: int = 1) -> list[Tensor]:
    """Write a random LoRA over `models` (random_lora) to `path`; returns the outputs of the models with it applied
    at run time at `ratio`, each of which the LoRA changes. The models keep the LoRA applied."""
    base = outputs(models)
    network = random_lora(models, seed)
    network.set_multiplier(ratio)
    expected = outputs(models)
    assert all(relative_error(changed, plain) > 1e-3 for changed, plain in zip(expected, base))  # every model changes
    network.save_weights(str(path), None, None)
    return expected


def lora_deltas(path: Path, ratio: float = 1.0) -> dict[str, Tensor]:
    """name -> ratio * up @ down * alpha / rank of a LoRA file, computed here with plain safetensors and torch
    (independently of the tools under test)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = tensor.double()
    deltas = {}
    for name, module in modules.items():
        down, up = module["lora_down.weight"], module["lora_up.weight"]
        rank = down.shape[0]
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        deltas[name] = ratio * product.reshape(up.shape[0], *down.shape[1:]) * float(module["alpha"]) / rank
    return deltas


def error_line(stderr: str) -> str:
    """What a tool's main() printed for a user error: the last line, which must start with "error: " (a message
    running over several lines would not). Lines before it may be log records of handlers other tests left on
    the root logger."""
    lines = stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: "), stderr
    return lines[-1].removeprefix("error: ")
