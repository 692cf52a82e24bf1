"""Time one LoRA training step of a full-size SD1.5 / SD2.1 U-Net the way library/trainer.py runs it.

Random weights (no checkpoint needed). Per step, as the trainer with --cache_latents and
--cache_text_encoder_outputs (U-Net-only LoRA): cached fp32 latents and text states are copied to the GPU,
latents cast to bf16, a per-step generator seeded, ddpm_loss under torch.autocast(bf16) with the frozen
base weights in bf16 and the LoRA weights in fp32, the finiteness check, backward, clip_grad_norm_(1.0),
optimizer step, zero_grad(set_to_none), loss.item(). accelerate's wrappers are no-ops on one GPU, so plain
torch stands in for them.

    python bench/sd_lora_step.py --model sd15 [--resolution 512] [--batch_size 1] [--no_gradient_checkpointing]

Prints a human summary and one JSON line (prefixed "RESULT ") per run; --json_out appends that line to a file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_common import (
    GIB,
    Step,
    bf16_matmul_tflops,
    count_flops,
    cuda_memory_fields,
    emit,
    host_launch_us,
    memory_split,
    profile_steps,
    time_steps,
    timing_fields,
    utilisation,
)
from library.diffusion.ddpm import DdpmSchedule
from library.diffusion.ddpm_step import DdpmLossConfig, ddpm_loss
from library.models.sd_unet import (
    SD1_UNET_CONFIG,
    SD2_UNET_CONFIG,
    SdUNet,
    SdUNetConfig,
)
from library.optim import OptimizerConfig, build_optimizer
from library.trainer import seed_step
from networks.lora import create_network

# (U-Net config, context width, default resolution, v-parameterization): SD2.1 768-v trains v-prediction at 768².
MODELS = {
    "sd15": (SD1_UNET_CONFIG, 768, 512, False),
    "sd21": (SD2_UNET_CONFIG, 1024, 768, True),
    # A few-MB stand-in so the script itself can be checked on a CPU in seconds.
    "tiny": (SdUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          context_dim=64), 64, 64, False),
}
TEXT_TOKENS = 77


@dataclass
class Bench:
    """Everything one training step touches."""

    unet: SdUNet
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor  # cached on the CPU in fp32, as the latent cache holds them
    context: torch.Tensor  # cached text-encoder output, CPU fp32
    loss_config: DdpmLossConfig
    schedule: DdpmSchedule
    device: torch.device
    step: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (latents are 1/8); model default if unset")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--network_alpha", type=float, default=16.0)
    parser.add_argument("--optimizer_type", default="AdamW")
    parser.add_argument("--full_bf16", action="store_true", help="LoRA weights in bf16 too (the trainer's --full_bf16)")
    parser.add_argument("--matmul_size", type=int, default=8192, help="side of the bf16 matmul that measures the peak rate; 0 skips it")
    parser.add_argument("--profile", action="store_true", help="also profile 3 steps: kernel time, launches, top kernels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json_out", default=None)
    return parser.parse_args(argv)


def build(options: argparse.Namespace) -> Bench:
    """Model, LoRA, optimizer and cached inputs, in the trainer's dtypes and order."""
    config, context_dim, default_resolution, v_param = MODELS[options.model]
    resolution = options.resolution or default_resolution
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} is not a multiple of 8")
    device = torch.device(options.device)
    torch.manual_seed(0)
    with device:  # initialise directly on the GPU: random init of ~900M params on a CPU takes a while
        unet = SdUNet(config)
    unet.requires_grad_(False)
    unet.eval()
    network = create_network(1.0, options.network_dim, options.network_alpha, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.prepare_grad_etc(None, unet)
    unet.to(device, dtype=torch.bfloat16)  # the LoRA modules are not children of the U-Net: they stay fp32
    gradient_checkpointing = not options.no_gradient_checkpointing
    unet.set_gradient_checkpointing(gradient_checkpointing)
    unet.train(gradient_checkpointing)
    network.to(device)
    if options.full_bf16:
        network.to(torch.bfloat16)
    params, _ = network.prepare_optimizer_params(None, None, 1e-4)
    optimizer_config = OptimizerConfig(options.optimizer_type, learning_rate=1e-4, optimizer_args=(), max_grad_norm=1.0)
    _, optimizer = build_optimizer(optimizer_config, params)
    side = resolution // 8
    latents = torch.randn(options.batch_size, config.in_channels, side, side)
    context = torch.randn(options.batch_size, TEXT_TOKENS, context_dim)
    return Bench(unet, network, optimizer, latents, context, DdpmLossConfig(v_parameterization=v_param),
                 DdpmSchedule.scaled_linear(), device)


def train_step(bench: Bench, after_forward: Callable[[], None] | None = None) -> float:
    """One optimizer step as NetworkTrainer._loop / _step_loss / SdNetworkTrainer.compute_loss do it;
    `after_forward` runs between the loss and backward (to read memory held for backward)."""
    device = bench.device
    with torch.no_grad():
        latents = bench.latents.to(device, dtype=torch.bfloat16)
    context = bench.context.to(device)
    generator = seed_step(42, bench.step, 0, device, False)
    bench.step += 1
    loss_weights = torch.ones(latents.shape[0])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        cond = context.to(latents.dtype)
        per_sample = ddpm_loss(lambda noisy, t: bench.unet(noisy, t, cond), latents, config=bench.loss_config,
                               schedule=bench.schedule, loss_weights=loss_weights, alpha_masks=None, generator=generator)
    loss = per_sample.mean()
    if after_forward is not None:
        after_forward()
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} at step {bench.step}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(bench.network.parameters(), 1.0)
    bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


def _step(bench: Bench) -> Step:
    return lambda after_forward: train_step(bench, after_forward)


def model_flops(options: argparse.Namespace) -> int:
    """FLOPs of forward + backward without checkpoint recompute (the usual 'model FLOPs' of MFU), counted
    on the meta device: no memory, no kernels, and attention counted as its two plain matmuls."""
    config, context_dim, default_resolution, _ = MODELS[options.model]
    side = (options.resolution or default_resolution) // 8
    with torch.device("meta"):
        unet = SdUNet(config)
    unet.requires_grad_(False)
    network = create_network(1.0, options.network_dim, options.network_alpha, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.to("meta").requires_grad_(True)
    latents = torch.randn(options.batch_size, config.in_channels, side, side, device="meta")
    context = torch.randn(options.batch_size, TEXT_TOKENS, context_dim, device="meta")
    timesteps = torch.zeros(options.batch_size, dtype=torch.long, device="meta")
    flops, _ = count_flops(lambda: unet(latents, timesteps, context).float().square().mean().backward())
    return flops


def run(options: argparse.Namespace, report: Callable[[str], None] = print) -> dict:
    bench = build(options)
    device, step = bench.device, _step(bench)
    lora_params = sum(p.numel() for p in bench.network.parameters())
    unet_params = sum(p.numel() for p in bench.unet.parameters())
    setup_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    flops, per_op = count_flops(lambda: train_step(bench))
    no_recompute_flops = model_flops(options)
    split = memory_split(step, device) if device.type == "cuda" else {}
    times = time_steps(step, device, options.warmup, options.steps)
    result = {
        "model": options.model, "resolution": (options.resolution or MODELS[options.model][2]), "batch_size": options.batch_size,
        "gradient_checkpointing": not options.no_gradient_checkpointing, "optimizer": options.optimizer_type,
        "lora_dtype": "bf16" if options.full_bf16 else "fp32",
        "network_dim": options.network_dim, "unet_params": unet_params, "lora_params": lora_params,
        **timing_fields(times), "tflop_per_step": flops / 1e12, "flops_by_op": per_op,
        "model_tflop_per_step": no_recompute_flops / 1e12,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result.update(cuda_memory_fields(device), setup_gib=setup_gib, **split, host_launch_us=host_launch_us(device))
        if options.matmul_size:
            result.update(utilisation(flops, no_recompute_flops, result["s_per_step_median"],
                                      bf16_matmul_tflops(device, options.matmul_size)))
        if options.profile:
            profiled = profile_steps(step, device)
            report(profiled.pop("table"))
            result.update(profiled)
    emit(result, summary(result), options.json_out, report)
    return result


def summary(r: dict) -> str:
    line = (f"{r['model']} {r['resolution']}² bs{r['batch_size']} gc={'on' if r['gradient_checkpointing'] else 'off'} "
            f"{r['optimizer']} LoRA {r['lora_dtype']} {r['lora_params'] / 1e6:.2f}M params: {r['s_per_step_median'] * 1e3:.1f} ms/step "
            f"(min {r['s_per_step_min'] * 1e3:.1f}, max {r['s_per_step_max'] * 1e3:.1f}), {r['tflop_per_step']:.3f} TFLOP/step "
            f"executed, {r['model_tflop_per_step']:.3f} model")
    if "peak_allocated_gib" in r:
        line += (f", peak {r['peak_allocated_gib']:.2f} GiB (setup {r['setup_gib']:.2f}, after forward "
                 f"{r['after_forward_gib']:.2f}), host {r['host_launch_us']:.1f} us/launch")
    if "mfu" in r:
        line += (f", MFU {100 * r['mfu']:.1f}% / HFU {100 * r['hfu']:.1f}% of a measured "
                 f"{r['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul")
    return line


if __name__ == "__main__":
    run(parse_args())
