"""Time one LoRA training step of a full-size SD3 / SD3.5 MMDiT the way sd3_train_network.py runs it.

Random weights (no checkpoint needed), drawn on the device from a fixed seed so that every run of a
configuration starts from the same model. The step goes through the trainer's own code: the flags are parsed
by sd3_train_network's parser, the LoRA is made by the trainer's `create_network` (MMDiT only), the model is
placed by `Sd3NetworkTrainer.place_denoiser` (with --blocks_to_swap N: move_except_blocks, then a
BlockSwapper prepared and installed) and the loss is `Sd3NetworkTrainer.compute_loss` (flow matching) on
cached inputs: fp32 latents and CLIP-L/CLIP-G/T5 outputs held on the CPU and copied over each step, as with
--cache_latents --cache_text_encoder_outputs. Then the finiteness check, backward, clip_grad_norm_(1.0), the
optimizer step, zero_grad(set_to_none) and loss.item(). accelerate's wrappers are no-ops on one GPU, so
plain torch stands in for them.

    python bench/sd3_lora_step.py --model sd35_large [--blocks_to_swap 19 --compare_swap] [--fp8_base]
    python bench/sd3_lora_step.py --model sd35_large --flops_only      # FLOP counts only, no GPU needed

Prints a human summary and one JSON line (prefixed "RESULT ") per measured configuration; --json_out appends
those lines to a file. --compare_swap measures blocks_to_swap 0 and N in one process and adds a
"swap_comparison" (same-seed losses, time ratio, memory saved) to the second.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
from library.fp8 import Fp8Parts, store_linear_weights_in_fp8
from library.models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiT, MMDiTConfig
from library.offload import check_block_swap_flags, swapped_block_indices
from library.optim import OptimizerConfig, build_optimizer
from library.trainer import Models
from library.trainer_setup import create_network, seed_step
from networks import lora
from sd3_train_network import Sd3NetworkTrainer, setup_parser

CLIP_TOKENS = 77
LATENT_DOWNSCALE = 8  # SD3's VAE
SEED = 42
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Sd3Model:
    """A benchmarked MMDiT and the shapes of its cached inputs."""

    config: MMDiTConfig
    resolution: int
    clip_widths: tuple[int, int]  # CLIP-L, CLIP-G hidden widths; their pooled outputs make adm_in_channels
    t5_tokens: int  # sd-scripts' --t5xxl_max_token_length default


MODELS = {
    "sd35_large": Sd3Model(SD35_LARGE, 1024, (768, 1280), 256),
    "sd35_medium": Sd3Model(SD35_MEDIUM, 1024, (768, 1280), 256),
    "sd3_medium": Sd3Model(SD3_MEDIUM, 1024, (768, 1280), 256),
    # A stand-in with every SD3.5 feature (qk RMSNorm, MMDiT-X attn2, pre-only last block) so the script
    # itself can be checked on a CPU in seconds.
    "tiny": Sd3Model(MMDiTConfig(depth=4, hidden_size=64, num_heads=2, adm_in_channels=48, context_in_dim=64,
                                 pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=(0, 1)),
                     128, (16, 32), 8),
}


@dataclass
class Sd3Bench:
    """Everything one training step touches."""

    trainer: Sd3NetworkTrainer
    models: Models
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor  # cached on the CPU in fp32, as the latent cache holds them
    text: dict[str, torch.Tensor]  # cached text-encoder outputs, CPU fp32
    device: torch.device
    blocks_to_swap: int
    swapped_weight_bytes: int
    step: int = 0
    losses: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd35_large")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (latents are 1/8); model default if unset")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--t5_tokens", type=int, default=None, help="cached T5 tokens (default 256, tiny 8)")
    parser.add_argument("--blocks_to_swap", type=int, default=0, help="joint blocks kept in CPU memory (the trainer's flag)")
    parser.add_argument("--compare_swap", action="store_true",
                        help="also measure --blocks_to_swap 0 in the same process and compare losses, time and memory")
    parser.add_argument("--fp8_base", action="store_true", help="joint-block Linear weights stored in fp8 (the trainer's flag)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    add_common_flags(parser)
    return parser.parse_args(argv)


def narrow(spec: Sd3Model) -> Sd3Model:
    """The same depth and block structure at widths a CPU runs in seconds: what --count_launches steps."""
    config = dataclasses.replace(spec.config, hidden_size=32, num_heads=2, adm_in_channels=32, context_in_dim=32)
    return Sd3Model(config, 128, (16, 16), 16)


def spec_of(options: argparse.Namespace) -> Sd3Model:
    spec = MODELS[options.model]
    return narrow(spec) if options.count_launches else spec


def resolution_of(options: argparse.Namespace) -> int:
    resolution = options.resolution or spec_of(options).resolution
    patch = LATENT_DOWNSCALE * spec_of(options).config.patch_size
    if resolution % patch:
        raise ValueError(f"--resolution {resolution} is not a multiple of {patch} (VAE factor x MMDiT patch size)")
    return resolution


def trainer_args(options: argparse.Namespace, blocks_to_swap: int, optimizer_args: tuple[str, ...] = ()) -> argparse.Namespace:
    """The sd3_train_network.py flags this step stands for, parsed by its own parser."""
    argv = ["--mixed_precision=bf16", "--network_module=networks.lora", f"--network_dim={options.network_dim}",
            f"--network_alpha={options.network_alpha}", "--network_train_unet_only", "--learning_rate=1e-4",
            f"--optimizer_type={options.optimizer_type}", "--max_grad_norm=1.0", f"--blocks_to_swap={blocks_to_swap}",
            "--cache_latents", "--cache_text_encoder_outputs"]
    if optimizer_args:
        argv += ["--optimizer_args", *optimizer_args]
    argv += [flag for flag, on in (("--gradient_checkpointing", not options.no_gradient_checkpointing),
                                   ("--fp8_base", options.fp8_base), ("--full_bf16", options.full_bf16)) if on]
    return parse_trainer_args(setup_parser(), argv)


def random_mmdit(config: MMDiTConfig, device: torch.device, seed: int) -> MMDiT:
    """An MMDiT in bf16 with PyTorch's default initialisation, drawn on `device` (fast, and no fp32 copy
    ever exists) from `seed`: the same seed gives the same weights."""
    with torch.device("meta"):
        mmdit = MMDiT(config).to(DTYPE)
    mmdit.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        # Zero first: tensors no module resets (pos_embed, which only a checkpoint fills) start as MMDiT's own do.
        for tensor in (*mmdit.parameters(), *mmdit.buffers()):
            tensor.zero_()
        for module in mmdit.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return mmdit


def cached_inputs(spec: Sd3Model, options: argparse.Namespace) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random stand-ins for the latent and text-encoder caches, in the shapes and dtype the caches hold."""
    generator = torch.Generator().manual_seed(SEED)
    batch, side = options.batch_size, resolution_of(options) // LATENT_DOWNSCALE
    clip_l, clip_g = spec.clip_widths
    t5_tokens = options.t5_tokens or spec.t5_tokens
    latents = torch.randn(batch, spec.config.in_channels, side, side, generator=generator)
    shapes = {"clip_l_hidden": (batch, CLIP_TOKENS, clip_l), "clip_g_hidden": (batch, CLIP_TOKENS, clip_g),
              "clip_l_pooled": (batch, clip_l), "clip_g_pooled": (batch, clip_g),
              "t5_hidden": (batch, t5_tokens, spec.config.context_in_dim)}
    return latents, {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def build(options: argparse.Namespace, blocks_to_swap: int, optimizer_args: tuple[str, ...] = ()) -> Sd3Bench:
    """Model, LoRA, placement, optimizer and cached inputs, in the order and dtypes of Sd3NetworkTrainer.train."""
    spec, device = spec_of(options), torch.device(options.device)
    args = trainer_args(options, blocks_to_swap, optimizer_args)
    trainer = Sd3NetworkTrainer(args)
    mmdit = random_mmdit(spec.config, device, SEED)
    mmdit.requires_grad_(False)
    mmdit.eval()
    if blocks_to_swap:  # where a loaded checkpoint sits when place_denoiser starts: swapped blocks never touch the GPU
        mmdit.to("cpu")
        _release_cuda_cache(device)
    fp8 = Fp8Parts.from_args(args).denoiser
    if fp8:  # as Sd3NetworkTrainer.load_models: joint blocks only, before LoRA wraps the layers
        store_linear_weights_in_fp8(mmdit.joint_blocks)
    swapped = swapped_weight_bytes(mmdit, blocks_to_swap)
    models = Models(denoiser=mmdit, vae=None, text_encoders=[], tokenizers=[], extra={"fp8": fp8})
    torch.manual_seed(SEED)  # the LoRA's own initialisation
    network = create_network(args, None, None, mmdit, False)
    resolution = resolution_of(options)
    trainer.place_denoiser(args, models, device, DTYPE, [(resolution, resolution)])  # the one bucket trained
    mmdit.set_gradient_checkpointing(args.gradient_checkpointing)
    if args.full_bf16:
        network.to(DTYPE)
    network.to(device)
    params, _ = network.prepare_optimizer_params(None, None, args.learning_rate)
    _, optimizer = build_optimizer(OptimizerConfig.from_args(args), params)
    network.train(True)
    mmdit.train(args.gradient_checkpointing)
    latents, text = cached_inputs(spec, options)
    return Sd3Bench(trainer, models, network, optimizer, latents, text, device, blocks_to_swap, swapped)


def swapped_weight_bytes(mmdit: MMDiT, blocks_to_swap: int) -> int:
    """Bytes of frozen weights that --blocks_to_swap keeps off the device."""
    if not blocks_to_swap:
        return 0
    blocks = mmdit.joint_blocks
    return sum(p.numel() * p.element_size() for i in swapped_block_indices(len(blocks), blocks_to_swap)
               for p in blocks[i].parameters() if not p.requires_grad)


def train_step(bench: Sd3Bench, after_forward: Callable[[], None] | None = None) -> float:
    """One optimizer step as NetworkTrainer._optimizer_step / _step_loss and Sd3NetworkTrainer.compute_loss do it."""
    device = bench.device
    generator = seed_step(SEED, bench.step, 0, device, False)
    bench.step += 1
    with torch.no_grad():
        latents = bench.latents.to(device, dtype=torch.float32)  # as the trainer: float32 latents, autocast casts
    batch = {"loss_weights": torch.ones(latents.shape[0]).to(device), "alpha_masks": None}
    with torch.autocast(device.type, dtype=DTYPE):
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
    value = loss.detach().item()
    bench.losses.append(value)
    return value


def _step(bench: Sd3Bench) -> Step:
    return lambda after_forward: train_step(bench, after_forward)


def meta_model(options: argparse.Namespace) -> tuple[MMDiT, tuple[torch.Tensor, ...]]:
    """The MMDiT with its LoRA applied and one batch of inputs (x, timesteps, context, pooled), on the meta device."""
    spec = spec_of(options)
    side = resolution_of(options) // LATENT_DOWNSCALE
    tokens = CLIP_TOKENS + (options.t5_tokens or spec.t5_tokens)
    batch = options.batch_size
    with torch.device("meta"):
        mmdit = MMDiT(spec.config).requires_grad_(False)
        network = lora.create_network(1.0, options.network_dim, options.network_alpha, None, None, mmdit)
        inputs = (torch.randn(batch, spec.config.in_channels, side, side), torch.zeros(batch),
                  torch.randn(batch, tokens, spec.config.context_in_dim), torch.randn(batch, spec.config.adm_in_channels))
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    network.requires_grad_(True)
    return mmdit, inputs


def meta_flops(options: argparse.Namespace, recompute: bool) -> int:
    """FLOPs of the MMDiT's forward + backward with the LoRA, counted on the meta device (no memory, no
    kernels; attention as its two plain matmuls). Without `recompute` this is the usual 'model FLOPs' of
    MFU; with it, gradient checkpointing's second forward of every joint block is counted too."""
    mmdit, inputs = meta_model(options)
    mmdit.set_gradient_checkpointing(recompute)
    mmdit.train(recompute)
    flops, _ = count_flops(lambda: mmdit(*inputs).float().square().mean().backward())
    return flops


def measure(options: argparse.Namespace, blocks_to_swap: int, device_facts: dict[str, Any], model_flops: int,
            report: Callable[[str], None]) -> dict[str, Any]:
    """Build one configuration, count, time and profile its step; every step's loss is kept in the result.
    Its memory is handed back before this returns, so the next configuration starts from an empty device."""
    result = _measure_bench(build(options, blocks_to_swap), options, device_facts, model_flops, report)
    _release_cuda_cache(torch.device(options.device))
    return result


def _measure_bench(bench: Sd3Bench, options: argparse.Namespace, device_facts: dict[str, Any], model_flops: int,
                   report: Callable[[str], None]) -> dict[str, Any]:
    device, step = bench.device, _step(bench)
    cuda = device.type == "cuda"
    setup_gib = torch.cuda.memory_allocated(device) / GIB if cuda else float("nan")
    flops, per_op = count_flops(lambda: train_step(bench))  # eager: compiled kernels escape the counter
    if options.torch_compile:  # compiles during the warm-up steps; give --warmup enough of them
        compile_blocks(bench.models.denoiser.blocks, options.dynamo_backend)
    split = memory_split(step, device) if cuda else {}
    times = time_steps(step, device, options.warmup, options.steps)
    config = spec_of(options).config
    result = {
        "model": options.model, "resolution": resolution_of(options), "batch_size": options.batch_size,
        "text_tokens": bench.text["t5_hidden"].shape[1] + CLIP_TOKENS, "depth": config.depth,
        "blocks_to_swap": bench.blocks_to_swap, "fp8_base": options.fp8_base,
        "gradient_checkpointing": not options.no_gradient_checkpointing, "optimizer": options.optimizer_type,
        "lora_dtype": "bf16" if options.full_bf16 else "fp32", "network_dim": options.network_dim,
        "mmdit_params": sum(p.numel() for p in bench.models.denoiser.parameters()),
        "lora_params": sum(p.numel() for p in bench.network.parameters()),
        "swapped_weights_gib": bench.swapped_weight_bytes / GIB,
        **timing_fields(times), "tflop_per_step": flops / 1e12, "flops_by_op": per_op, "model_tflop_per_step": model_flops / 1e12,
        "torch": torch.__version__, "torch_compile": options.dynamo_backend if options.torch_compile else None,
    }
    if cuda:
        result.update(cuda_memory_fields(device), setup_gib=setup_gib, **split, host_launch_us=device_facts["host_launch_us"])
        if "bf16_matmul_tflops" in device_facts:
            result.update(utilisation(flops, model_flops, result["s_per_step_median"], device_facts["bf16_matmul_tflops"]))
        if options.profile:
            profiled = profile_steps(step, device)
            report(profiled.pop("table"))
            result.update(profiled)
    result["losses"] = list(bench.losses)
    return result


def _release_cuda_cache(device: torch.device) -> None:
    """Hand freed blocks back to the driver, so the next configuration's reserved memory is its own."""
    gc.collect()  # the block swapper's hooks and the model reference each other
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_swap(no_swap: dict[str, Any], swap: dict[str, Any]) -> dict[str, Any]:
    """Same seed, same steps: the losses must match; the price is time, the gain device memory."""
    pairs = list(zip(no_swap["losses"], swap["losses"]))
    comparison = {
        "against_blocks_to_swap": no_swap["blocks_to_swap"], "steps_compared": len(pairs),
        # The first loss comes from the initial weights alone (forward only): it must match bit for bit even
        # where later steps drift through non-deterministic backward kernels.
        "losses_equal": all(a == b for a, b in pairs), "first_loss_equal": pairs[0][0] == pairs[0][1],
        "max_abs_loss_diff": max(abs(a - b) for a, b in pairs),
        "time_ratio": swap["s_per_step_median"] / no_swap["s_per_step_median"],
    }
    if "peak_allocated_gib" in swap:
        comparison["peak_saved_gib"] = no_swap["peak_allocated_gib"] - swap["peak_allocated_gib"]
    return comparison


def swap_plan(options: argparse.Namespace) -> tuple[list[int], str | None]:
    """The blocks_to_swap values to measure, and why a requested comparison is skipped (None if it is not)."""
    depth, cuda = spec_of(options).config.depth, torch.device(options.device).type == "cuda"
    if options.compare_swap and not options.blocks_to_swap:
        raise ValueError("--compare_swap compares against --blocks_to_swap N; give N > 0 "
                         f"(at most {depth - 1} for {options.model})")
    swapped_block_indices(depth, options.blocks_to_swap)  # a count the model cannot take fails even where swapping is skipped
    if options.compare_swap and not cuda:
        return [0], (f"--compare_swap skipped: block swapping needs a CUDA device and this run is on "
                     f"{options.device}; only --blocks_to_swap 0 was measured")
    plan = [0, options.blocks_to_swap] if options.compare_swap else [options.blocks_to_swap]
    for blocks in plan:
        check_block_swap_flags(blocks, depth, gradient_checkpointing=not options.no_gradient_checkpointing,
                               cpu_offload_checkpointing=False, cuda_available=cuda)
    return plan, None


def run(options: argparse.Namespace, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure each planned configuration and emit its result as soon as it is known."""
    if options.flops_only:
        return [count_only(options, report)]
    if options.count_launches:
        return [launches_only(options, report)]
    resolution_of(options)  # a bad --resolution fails before anything is built
    plan, skipped = swap_plan(options)
    device = torch.device(options.device)
    facts: dict[str, Any] = {}
    if device.type == "cuda":
        facts["host_launch_us"] = host_launch_us(device)
        if options.matmul_size:
            facts["bf16_matmul_tflops"] = bf16_matmul_tflops(device, options.matmul_size)
            _release_cuda_cache(device)
    model_flops = meta_flops(options, recompute=False)
    results: list[dict[str, Any]] = []
    for blocks in plan:
        result = measure(options, blocks, facts, model_flops, report)
        if options.compare_swap and results:
            result["swap_comparison"] = compare_swap(results[0], result)
        elif skipped:
            result["swap_comparison"] = {"skipped": skipped}
        results.append(result)
        emit(result, summary(result), options.json_out, report)
    return results


def count_only(options: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    result = {"model": options.model, "resolution": resolution_of(options), "batch_size": options.batch_size,
              "model_tflop_per_step": meta_flops(options, recompute=False) / 1e12,
              "recompute_tflop_per_step": meta_flops(options, recompute=True) / 1e12}
    line = (f"{options.model} {result['resolution']}² bs{options.batch_size}: {result['model_tflop_per_step']:.2f} TFLOP "
            f"forward + backward, {result['recompute_tflop_per_step']:.2f} with checkpoint recompute (meta-device count)")
    emit(result, line, options.json_out, report)
    return result


def launches_only(options: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    """--count_launches: one step of a narrow full-depth stand-in on the CPU (after a first step that creates
    the optimizer state), its kernel-launching ops counted. AdamW runs its for-each path, as on CUDA."""
    options = argparse.Namespace(**{**vars(options), "device": "cpu", "blocks_to_swap": 0})
    bench = build(options, 0, optimizer_args=("foreach=True",) if options.optimizer_type == "AdamW" else ())
    train_step(bench)
    result = {"model": options.model, "depth": spec_of(options).config.depth, "network_dim": options.network_dim,
              "optimizer": options.optimizer_type, "gradient_checkpointing": not options.no_gradient_checkpointing,
              **count_launches(_step(bench))}
    emit(result, launch_summary(result), options.json_out, report)
    return result


def summary(r: dict[str, Any]) -> str:
    line = (f"{r['model']} {r['resolution']}² bs{r['batch_size']} swap {r['blocks_to_swap']}/{r['depth']}"
            f"{' fp8' if r['fp8_base'] else ''} gc={'on' if r['gradient_checkpointing'] else 'off'} {r['optimizer']} "
            f"LoRA {r['lora_dtype']} {r['lora_params'] / 1e6:.2f}M params: {r['s_per_step_median']:.3f} s/step "
            f"(min {r['s_per_step_min']:.3f}, max {r['s_per_step_max']:.3f}), {r['tflop_per_step']:.2f} TFLOP/step executed, "
            f"{r['model_tflop_per_step']:.2f} model")
    if "peak_allocated_gib" in r:
        line += (f", peak {r['peak_allocated_gib']:.2f} GiB (setup {r['setup_gib']:.2f}, after forward "
                 f"{r['after_forward_gib']:.2f}, swapped weights {r['swapped_weights_gib']:.2f})")
    if "mfu" in r:
        line += (f", MFU {100 * r['mfu']:.1f}% / HFU {100 * r['hfu']:.1f}% of a measured "
                 f"{r['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul")
    if "swap_comparison" in r:
        line += "; " + summary_comparison(r["swap_comparison"])
    return line


def summary_comparison(c: dict[str, Any]) -> str:
    if "skipped" in c:
        return c["skipped"]
    line = (f"vs swap {c['against_blocks_to_swap']}: losses {'identical' if c['losses_equal'] else 'DIFFER'} over "
            f"{c['steps_compared']} steps (first {'equal' if c['first_loss_equal'] else 'DIFFERS'}, max |diff| "
            f"{c['max_abs_loss_diff']:.3g}), time x{c['time_ratio']:.3f}")
    if "peak_saved_gib" in c:
        line += f", peak -{c['peak_saved_gib']:.2f} GiB"
    return line


def main() -> None:
    exit_on_user_error(lambda: run(parse_args()), (ValueError, OSError))


if __name__ == "__main__":
    main()
