"""Real LoRA files for the tests of the LoRA tools: create_network on the tiny SD1 models, with random
weights (so every module changes its layer), or with module spectra chosen by the test."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextModel

from library.fixtures.tiny_sd import tiny_text_config, tiny_unet_config
from library.models.sd_unet import SdUNet
from networks.lora import LoRANetwork, create_network


def tiny_sd1_network(dim: int = 8, alpha: float = 4.0, seed: int = 0, **network_args: str) -> LoRANetwork:
    """A LoRA over the tiny SD1 text encoder and U-Net (conv_dim=... adds the 3x3 ResNet convs)."""
    torch.manual_seed(seed)
    text_encoder, unet = CLIPTextModel(tiny_text_config()), SdUNet(tiny_unet_config())
    return create_network(1.0, dim, alpha, None, text_encoder, unet, **network_args)


def randomize(network: LoRANetwork, seed: int = 1, std: float = 0.1) -> LoRANetwork:
    """Random down and up weights, as after training (a fresh LoRA's up weights are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return network


def write_lora(path: Path, network: LoRANetwork, metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    network.save_weights(str(path), dtype, metadata)
    return path


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A rows x cols matrix with orthonormal columns (rows >= cols)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q.float()


def set_spectrum(network: LoRANetwork, name: str, singular_values: list[float], seed: int = 0) -> None:
    """Give module `name` the weight change U diag(s) V^T (as dW, alpha/rank included) with random orthonormal U, V."""
    lora = getattr(network, name)
    down, up = lora.lora_down.weight, lora.lora_up.weight
    rank = down.shape[0]
    assert len(singular_values) == rank, f"{name} has rank {rank}"
    generator = torch.Generator().manual_seed(seed)
    u = orthonormal(up.shape[0], rank, generator)
    v = orthonormal(down[0].numel(), rank, generator)
    s = torch.tensor(singular_values) / lora.scale
    with torch.no_grad():
        up.copy_((u * s).reshape(up.shape))
        down.copy_(v.T.reshape(down.shape))
