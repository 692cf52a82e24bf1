"""--torch_compile: the denoiser's blocks are compiled one by one and train exactly as the eager ones do.

The tests use dynamo's "aot_eager" backend: it traces each block and its LoRA layers through dynamo and
AOTAutograd as inductor does, without generating kernels (seconds, no compiler needed)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import base_argv, lora_tensors, make_dataset

import train_network
from library.compile import compile_blocks
from library.fixtures.tiny_sd import tiny_unet_config
from library.models.sd_unet import SdUNet
from networks.lora import create_network


def _unet_with_lora() -> tuple[SdUNet, torch.nn.Module]:
    torch.manual_seed(0)
    unet = SdUNet(tiny_unet_config()).requires_grad_(False)
    network = create_network(1.0, 4, 4, None, None, unet)
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    unet.set_gradient_checkpointing(True)
    unet.train(True)
    return unet, network


def _loss_and_grads(unet: SdUNet, network: torch.nn.Module) -> tuple[float, list[torch.Tensor]]:
    config = unet.config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = unet(x, torch.tensor([10, 500]), context).float().square().mean()
    loss.backward()
    grads = [parameter.grad.clone() for parameter in network.parameters()]
    network.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_lora_gradients():
    eager_loss, eager_grads = _loss_and_grads(*_unet_with_lora())
    unet, network = _unet_with_lora()
    compile_blocks(unet.blocks, "aot_eager")
    assert all(block._compiled_call_impl is not None for block in unet.blocks)
    assert list(unet.state_dict()) == list(SdUNet(unet.config).state_dict())  # names unchanged
    for _ in range(2):  # the second call runs the cached graphs
        loss, grads = _loss_and_grads(unet, network)
        assert loss == pytest.approx(eager_loss, rel=1e-4)
        for grad, eager in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager, rtol=2e-2, atol=1e-4)


def test_torch_compile_flag_hands_the_denoiser_blocks_to_the_compiler(tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                                      tmp_path, monkeypatch):
    """The flag reaches the U-Net's blocks with --dynamo_backend (compiling them is the test above; here the
    blocks are only recorded, which keeps this run fast)."""
    compiled = []
    monkeypatch.setattr("library.trainer.compile_blocks", lambda blocks, backend: compiled.append((blocks, backend)))
    out = tmp_path / "out"
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                 "--torch_compile", "--dynamo_backend=aot_eager", "--gradient_checkpointing"))
    [(blocks, backend)] = compiled
    assert backend == "aot_eager" and all(isinstance(block, torch.nn.Module) for block in blocks)
    assert len(blocks) == len(SdUNet(tiny_unet_config()).blocks)
    assert lora_tensors(out / "lora.safetensors")
