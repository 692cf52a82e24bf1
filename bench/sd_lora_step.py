"""Time one LoRA training step of a full-size SD1.5 / SD2.1 / SDXL U-Net the way library/trainer.py runs it.

Random weights (no checkpoint needed). Per step, as the trainer with --cache_latents and
--cache_text_encoder_outputs (U-Net-only LoRA): cached fp32 latents and text states are copied to the GPU,
latents cast to bf16, a per-step generator seeded, the family trainer's own `compute_loss` (train_network's
SdNetworkTrainer, or sdxl_train_network's SdxlNetworkTrainer with its size conditioning; both ddpm_loss) under
torch.autocast(bf16) with the frozen base weights in bf16 and the LoRA weights in fp32, the finiteness check,
backward, clip_grad_norm_(1.0), optimizer step, zero_grad(set_to_none), loss.item(). accelerate's wrappers are
no-ops on one GPU, so plain torch stands in for them.

    python bench/sd_lora_step.py --model sd15 [--resolution 512] [--batch_size 1] [--no_gradient_checkpointing]
    python bench/sd_lora_step.py --model sdxl                 # 1024², epsilon, size-conditioned
    python bench/sd_lora_step.py --model sdxl --flops_only    # meta-device FLOP counts, no GPU needed

Prints a human summary and one JSON line (prefixed "RESULT ") per run; --json_out appends that line to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sdxl_train_network
import train_network
from bench.bench_common import (
    GIB,
    Step,
    add_common_flags,
    bf16_matmul_tflops,
    count_flops,
    count_launches,
    cuda_memory_fields,
    emit,
    host_launch_us,
    launch_summary,
    memory_split,
    profile_steps,
    time_steps,
    timing_fields,
    utilisation,
)
from library.args import parse_args as parse_trainer_args
from library.compile import compile_blocks
from library.console import exit_on_user_error
from library.fixtures.tiny_sdxl import TINY_CLIP_G_PROJECTION, tiny_sdxl_unet_config
from library.models.sd_unet import (
    SD1_UNET_CONFIG,
    SD2_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    SdUNet,
    SdUNetConfig,
    SdxlUNet,
)
from library.optim import OptimizerConfig, build_optimizer
from library.trainer import Models, NetworkTrainer, seed_step
from networks.lora import create_network

SEED = 42
TEXT_TOKENS = 77
SDXL_POOLED = 1280  # bigG's projected pooled width; with the six size embeddings it makes adm_in_channels 2816


@dataclass(frozen=True)
class SdModel:
    """A benchmarked U-Net, the shapes of its cached inputs and the trainer script it stands for."""

    config: SdUNetConfig
    context_dim: int
    resolution: int
    v_parameterization: bool = False  # SD2.1 768-v trains v-prediction
    pooled_dim: int | None = None  # SDXL: the cached pooled text embedding that starts the vector y

    @property
    def sdxl(self) -> bool:
        return self.pooled_dim is not None


MODELS = {
    "sd15": SdModel(SD1_UNET_CONFIG, 768, 512),
    "sd21": SdModel(SD2_UNET_CONFIG, 1024, 768, v_parameterization=True),
    "sdxl": SdModel(SDXL_UNET_CONFIG, 2048, 1024, pooled_dim=SDXL_POOLED),
    # Few-MB stand-ins so the script itself can be checked on a CPU in seconds.
    "tiny": SdModel(SdUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                                 context_dim=64), 64, 64),
    "tiny_sdxl": SdModel(tiny_sdxl_unet_config(), tiny_sdxl_unet_config().context_dim, 64, pooled_dim=TINY_CLIP_G_PROJECTION),
}


@dataclass
class Bench:
    """Everything one training step touches."""

    trainer: NetworkTrainer
    models: Models
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor  # cached on the CPU in fp32, as the latent cache holds them
    text: dict[str, torch.Tensor]  # cached text-encoder outputs, CPU fp32
    batch: dict  # the rest of what compute_loss reads from a batch (SDXL: the bucket's sizes)
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
    add_common_flags(parser)
    return parser.parse_args(argv)


def narrow(spec: SdModel) -> SdModel:
    """The same levels, blocks and transformer depths at widths a CPU runs in seconds: what --count_launches
    steps. SDXL's vector y keeps its six 256-wide size embeddings after the (narrowed) pooled text."""
    heads = {"num_heads": 2} if spec.config.num_head_channels is None else {"num_head_channels": 16}
    pooled = 32 if spec.sdxl else None
    adm = None if pooled is None else spec.config.adm_in_channels - spec.pooled_dim + pooled
    config = dataclasses.replace(spec.config, model_channels=32, context_dim=32, adm_in_channels=adm, **heads)
    return dataclasses.replace(spec, config=config, context_dim=32, resolution=128, pooled_dim=pooled)


def spec_of(options: argparse.Namespace) -> SdModel:
    spec = MODELS[options.model]
    return narrow(spec) if options.count_launches else spec


def resolution_of(options: argparse.Namespace) -> int:
    resolution = options.resolution or spec_of(options).resolution
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} is not a multiple of 8")
    return resolution


def make_trainer(options: argparse.Namespace) -> NetworkTrainer:
    """The family's trainer, built from the flags this step stands for as its own script parses them."""
    spec = spec_of(options)
    script = sdxl_train_network if spec.sdxl else train_network
    argv = ["--mixed_precision=bf16", "--network_module=networks.lora", "--network_train_unet_only",
            "--cache_latents", "--cache_text_encoder_outputs"]
    if spec.v_parameterization:
        argv += ["--v2", "--v_parameterization"]
    trainer_class = sdxl_train_network.SdxlNetworkTrainer if spec.sdxl else train_network.SdNetworkTrainer
    return trainer_class(parse_trainer_args(script.setup_parser(), argv))


def cached_inputs(options: argparse.Namespace) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Random stand-ins for the latent and text-encoder caches, and SDXL's size conditioning: the whole
    image trained at its own size, uncropped (original = target = the resolution, crop top-left 0, 0)."""
    spec, batch = spec_of(options), options.batch_size
    resolution = resolution_of(options)
    side = resolution // 8
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(batch, spec.config.in_channels, side, side, generator=generator)
    text = {"hidden_states": torch.randn(batch, TEXT_TOKENS, spec.context_dim, generator=generator)}
    extra: dict = {}
    if spec.sdxl:
        text["pooled"] = torch.randn(batch, spec.pooled_dim, generator=generator)
        size = torch.tensor([[resolution, resolution]] * batch)
        extra = {"original_sizes_hw": size, "crop_top_lefts": torch.zeros_like(size), "target_sizes_hw": size.clone()}
    return latents, text, extra


def _unet(spec: SdModel) -> SdUNet:
    return SdxlUNet(spec.config) if spec.sdxl else SdUNet(spec.config)


def build(options: argparse.Namespace, optimizer_args: tuple[str, ...] = ()) -> Bench:
    """Model, LoRA, optimizer and cached inputs, in the trainer's dtypes and order."""
    spec = spec_of(options)
    resolution_of(options)
    device = torch.device(options.device)
    trainer = make_trainer(options)
    torch.manual_seed(0)
    with device:  # initialise directly on the GPU: random init of 0.9-2.6G params on a CPU takes a while
        unet = _unet(spec)
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
    optimizer_config = OptimizerConfig(options.optimizer_type, learning_rate=1e-4, optimizer_args=optimizer_args,
                                       max_grad_norm=1.0)
    _, optimizer = build_optimizer(optimizer_config, params)
    latents, text, extra = cached_inputs(options)
    models = Models(denoiser=unet, vae=None, text_encoders=[], tokenizers=[])
    return Bench(trainer, models, network, optimizer, latents, text, extra, device)


def train_step(bench: Bench, after_forward: Callable[[], None] | None = None) -> float:
    """One optimizer step as NetworkTrainer._loop / _step_loss and the family's compute_loss do it;
    `after_forward` runs between the loss and backward (to read memory held for backward)."""
    device = bench.device
    with torch.no_grad():
        latents = bench.latents.to(device, dtype=torch.float32)  # as the trainer: float32 latents, autocast casts
    generator = seed_step(SEED, bench.step, 0, device, False)
    bench.step += 1
    batch = {"loss_weights": torch.ones(latents.shape[0], device=device), "alpha_masks": None,
             **{name: value.to(device) for name, value in bench.batch.items()}}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        text = {name: tensor.to(device) for name, tensor in bench.text.items()}
        loss = bench.trainer.compute_loss(bench.models, batch, latents, text, generator).mean()
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


def meta_model(options: argparse.Namespace) -> tuple[SdUNet, tuple[torch.Tensor | None, ...]]:
    """The U-Net with its LoRA applied and one batch of inputs (x, timesteps, context, y), on the meta device."""
    spec = spec_of(options)
    side, batch = resolution_of(options) // 8, options.batch_size
    with torch.device("meta"):
        unet = _unet(spec).requires_grad_(False)
        network = create_network(1.0, options.network_dim, options.network_alpha, None, None, unet)
        y = torch.randn(batch, spec.config.adm_in_channels) if spec.sdxl else None
        inputs = (torch.randn(batch, spec.config.in_channels, side, side), torch.zeros(batch, dtype=torch.long),
                  torch.randn(batch, TEXT_TOKENS, spec.context_dim), y)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.to("meta").requires_grad_(True)
    return unet, inputs


def meta_flops(options: argparse.Namespace, recompute: bool) -> int:
    """FLOPs of the U-Net's forward + backward with the LoRA, counted on the meta device (no memory, no
    kernels; attention as its two plain matmuls). Without `recompute` this is the usual 'model FLOPs' of
    MFU; with it, gradient checkpointing's second forward of every block is counted too."""
    unet, inputs = meta_model(options)
    unet.set_gradient_checkpointing(recompute)
    unet.train(recompute)
    flops, _ = count_flops(lambda: unet(*inputs).float().square().mean().backward())
    return flops


def model_flops(options: argparse.Namespace) -> int:
    """Forward + backward without checkpoint recompute: the MFU numerator."""
    return meta_flops(options, recompute=False)


def run(options: argparse.Namespace, report: Callable[[str], None] = print) -> dict:
    if options.flops_only:
        return count_only(options, report)
    if options.count_launches:
        return launches_only(options, report)
    bench = build(options)
    device, step = bench.device, _step(bench)
    lora_params = sum(p.numel() for p in bench.network.parameters())
    unet_params = sum(p.numel() for p in bench.models.denoiser.parameters())
    setup_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    flops, per_op = count_flops(lambda: train_step(bench))  # eager: compiled kernels escape the counter
    if options.torch_compile:  # compiles during the warm-up steps; give --warmup enough of them
        compile_blocks(bench.models.denoiser.blocks, options.dynamo_backend)
    no_recompute_flops = model_flops(options)
    split = memory_split(step, device) if device.type == "cuda" else {}
    times = time_steps(step, device, options.warmup, options.steps)
    result = {
        "model": options.model, "resolution": resolution_of(options), "batch_size": options.batch_size,
        "gradient_checkpointing": not options.no_gradient_checkpointing, "optimizer": options.optimizer_type,
        "lora_dtype": "bf16" if options.full_bf16 else "fp32",
        "network_dim": options.network_dim, "unet_params": unet_params, "lora_params": lora_params,
        **timing_fields(times), "tflop_per_step": flops / 1e12, "flops_by_op": per_op,
        "model_tflop_per_step": no_recompute_flops / 1e12,
        "torch": torch.__version__, "torch_compile": options.dynamo_backend if options.torch_compile else None,
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


def launches_only(options: argparse.Namespace, report: Callable[[str], None]) -> dict:
    """--count_launches: one step of a narrow full-depth stand-in on the CPU (after a first step that creates
    the optimizer state), its kernel-launching ops counted. AdamW runs its for-each path, as on CUDA."""
    options = argparse.Namespace(**{**vars(options), "device": "cpu"})
    bench = build(options, optimizer_args=("foreach=True",) if options.optimizer_type == "AdamW" else ())
    train_step(bench)
    result = {"model": options.model, "network_dim": options.network_dim, "optimizer": options.optimizer_type,
              "gradient_checkpointing": not options.no_gradient_checkpointing, **count_launches(_step(bench))}
    emit(result, launch_summary(result), options.json_out, report)
    return result


def count_only(options: argparse.Namespace, report: Callable[[str], None]) -> dict:
    result = {"model": options.model, "resolution": resolution_of(options), "batch_size": options.batch_size,
              "model_tflop_per_step": meta_flops(options, recompute=False) / 1e12,
              "recompute_tflop_per_step": meta_flops(options, recompute=True) / 1e12}
    line = (f"{options.model} {result['resolution']}² bs{options.batch_size}: {result['model_tflop_per_step']:.3f} TFLOP "
            f"forward + backward, {result['recompute_tflop_per_step']:.3f} with checkpoint recompute (meta-device count)")
    emit(result, line, options.json_out, report)
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


def main() -> None:
    exit_on_user_error(lambda: run(parse_args()), (ValueError, OSError))


if __name__ == "__main__":
    main()
