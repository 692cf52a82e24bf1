"""The pieces of a training run that are set up once from the flags: accelerate, trackers, input checks,
the LoRA network, and the per-step seeding and gradient averaging the loop relies on."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from library.dataset.dataset import TrainDataset
from library.fingerprint import file_identity
from library.run_config import RunConfig
from library.train_state import TrainState
from networks.lora_weights_check import check_weights_file
from networks.network_module import check_adapted, check_network_args, load_network_module
from networks.plugin_view import NetworkModels, network_models, takes_our_models

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- accelerate
def make_accelerator(args: argparse.Namespace, run: RunConfig) -> Accelerator:
    log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
    if log_with in ("wandb", "all") and args.wandb_api_key:
        import wandb

        wandb.login(key=args.wandb_api_key)
    trackers = ["tensorboard", "wandb"] if log_with == "all" else log_with
    logging_dir = None
    if args.logging_dir:
        logging_dir = str(Path(args.logging_dir) / ((args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")))
    project = ProjectConfiguration(project_dir=logging_dir or args.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(gradient_accumulation_steps=run.gradient_accumulation_steps, mixed_precision=run.mixed_precision,
                              log_with=trackers, project_config=project, kwargs_handlers=_ddp_handlers(args))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(f"launched as {launched} processes but accelerate runs each alone (no GPU found?); "
                         "on CPU set ACCELERATE_USE_CPU=true for a multi-process run")
    return accelerator


def _ddp_handlers(args: argparse.Namespace) -> list:
    if not (args.ddp_timeout or args.ddp_gradient_as_bucket_view or args.ddp_static_graph):
        return []
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = [DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                    static_graph=args.ddp_static_graph)]
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    return handlers


def allow_fp16_gradients(accelerator: Accelerator) -> None:
    """--full_fp16: the LoRA weights (and so their gradients) are fp16, which accelerate's grad scaler refuses to
    unscale; let it, as sd-scripts does."""
    scaler = accelerator.scaler
    if scaler is None:
        return
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(optimizer, inv_scale, found_inf, True)


def init_trackers(accelerator: Accelerator, args: argparse.Namespace) -> None:
    if not (args.log_with or args.logging_dir):
        return
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))} if args.log_config else {}
    init_kwargs = {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}
    if args.log_tracker_config:
        import toml

        init_kwargs.update(toml.load(args.log_tracker_config))
    accelerator.init_trackers(args.log_tracker_name or "network_train", config=config, init_kwargs=init_kwargs)


# ---------------------------------------------------------------------------------------------- checks and notes
def check_input_files(args: argparse.Namespace) -> None:
    """Every file or folder a flag names must exist, and --network_module must import, checked before anything
    slow happens."""
    if not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required: the checkpoint file (or diffusers folder) to train on")
    network_module(args)
    check_network_args(args.network_module, parse_network_args(args.network_args or []),
                       fp8_base=bool(args.fp8_base or args.fp8_base_unet))
    named = {"--vae": args.vae, "--network_weights": args.network_weights, "--resume": args.resume,
             "--sample_prompts": args.sample_prompts, "--dataset_config": args.dataset_config,
             "--train_data_dir": args.train_data_dir, "--reg_data_dir": args.reg_data_dir, "--in_json": args.in_json}
    named.update({f"--base_weights {path}": path for path in args.base_weights or []})
    if args.metadata_thumbnail and not args.metadata_thumbnail.startswith("data:"):
        named["--metadata_thumbnail"] = args.metadata_thumbnail
    for flag, path in named.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag.split()[0]} {path}: not found")
    for flag, path in [("--network_weights", args.network_weights), *(("--base_weights", p) for p in args.base_weights or [])]:
        if path is not None:
            check_weights_file(flag, path)
    if args.base_weights_multiplier and len(args.base_weights_multiplier) != len(args.base_weights or []):
        raise ValueError("--base_weights_multiplier needs one value per --base_weights file")


def log_flag_notes(args: argparse.Namespace) -> None:
    """Flags that select something we always do, or that interact, said once so nobody thinks they were ignored."""
    if args.xformers or args.mem_eff_attn or args.sdpa:
        logger.info("attention: PyTorch scaled_dot_product_attention (it picks flash / memory-efficient kernels itself)")
    if args.lowram:
        logger.info("--lowram: safetensors checkpoints are memory-mapped, so models never sit in RAM twice")
    if args.resume and (args.initial_step is not None or args.initial_epoch is not None):
        logger.warning("--resume continues from the step saved in the state; --initial_step/--initial_epoch are ignored")
    if args.full_fp16 and (args.optimizer_type or "adamw").lower() == "adamw":
        logger.warning("--full_fp16 with AdamW: its eps (1e-8) is 0 in fp16, which can turn the first updates into NaN; "
                       "prefer --full_bf16, AdamW8bit, or --optimizer_args eps=1e-4")


def base_weights_identity(args: argparse.Namespace) -> str:
    """What --base_weights merges into the models, for the keys of the caches it changes."""
    if not args.base_weights:
        return ""
    multipliers = args.base_weights_multiplier or [1.0] * len(args.base_weights)
    return ":base=" + ",".join(f"{file_identity(p)}*{m}" for p, m in zip(args.base_weights, multipliers))


def initial_state(args: argparse.Namespace, steps_per_epoch: int, seed: int) -> TrainState:
    """Where a fresh run starts: --initial_step (0-based) or --initial_epoch (1-based), as in sd-scripts."""
    if args.initial_step is not None:
        step = args.initial_step
    elif args.initial_epoch is not None:
        step = (args.initial_epoch - 1) * steps_per_epoch
    else:
        step = 0
    return TrainState(epoch=step // steps_per_epoch, global_step=step, seed=seed)


def show_dataset(dataset: TrainDataset, epoch: int = 0) -> None:
    """--debug_dataset: print every batch of one epoch (bucket, images, processed captions) instead of training."""
    dataset.select_epoch(epoch)
    for index in range(len(dataset)):
        batch = dataset[index]
        pixels = batch["latents"] if batch["latents"] is not None else batch["images"]
        print(f"batch {index}: {tuple(pixels.shape)}  loss weights {batch['loss_weights'].tolist()}")
        for key, caption in zip(batch["keys"], batch["captions"]):
            print(f"  {key}: {caption}")


# ---------------------------------------------------------------------------------------------- the LoRA network
def parse_network_args(items: list[str]) -> dict[str, str]:
    """--network_args "conv_dim=4" "rank_dropout=0.1" → {"conv_dim": "4", ...} (values stay strings, as sd-scripts passes them)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--network_args: '{item}' is not key=value")
        parsed[key.strip()] = value.strip()
    return parsed


def network_module(args: argparse.Namespace) -> ModuleType:
    return load_network_module(args.network_module)


def merge_base_weights(args: argparse.Namespace, vae: torch.nn.Module, text_encoder: Any, denoiser: torch.nn.Module) -> None:
    """--base_weights: LoRA files merged into the frozen models before training (and before caching)."""
    module = network_module(args)
    seen = network_models(module, text_encoder, denoiser)
    multipliers = args.base_weights_multiplier or [1.0] * len(args.base_weights or [])
    for path, multiplier in zip(args.base_weights or [], multipliers):
        base, weights = module.create_network_from_weights(multiplier, path, vae, seen.text_encoder, seen.denoiser,
                                                           for_inference=True)
        base.merge_to(seen.text_encoder, seen.denoiser, weights, getattr(denoiser, "dtype", torch.float32), "cpu")
        logger.info("merged base weights %s (multiplier %s)", path, multiplier)


def models_for_network(args: argparse.Namespace, text_encoder: Any, denoiser: torch.nn.Module) -> NetworkModels:
    """The text encoder(s) and denoiser as --network_module is handed them: ours for networks.lora, views shaped
    like sd-scripts' models for a plug-in. Build them once per run and pass them to every call of the network."""
    return network_models(network_module(args), text_encoder, denoiser)


def create_network(args: argparse.Namespace, vae: torch.nn.Module, text_encoder: Any, denoiser: torch.nn.Module,
                   train_text_encoder: bool, seen: NetworkModels | None = None) -> Any:
    """The trained network through sd-scripts' module contract (any --network_module written for it works).
    `seen`: the models as the module sees them (`models_for_network`), when the caller keeps them for later calls."""
    module, kwargs = network_module(args), parse_network_args(args.network_args or [])
    seen = seen or network_models(module, text_encoder, denoiser)
    if args.dim_from_weights:
        network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, seen.text_encoder, seen.denoiser,
                                                        neuron_dropout=args.network_dropout, **kwargs)
    else:
        if not takes_our_models(module):
            kwargs.setdefault("dropout", args.network_dropout)  # as sd-scripts: LyCORIS reads no neuron_dropout
        network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, seen.text_encoder, seen.denoiser,
                                        neuron_dropout=args.network_dropout, **kwargs)
    if network is None:
        raise ValueError(f"--network_module {args.network_module} created no network")
    train_denoiser = not args.network_train_text_encoder_only
    network.apply_to(seen.text_encoder, seen.denoiser, train_text_encoder, train_denoiser)
    check_adapted(network, args.network_module, train_denoiser=train_denoiser, train_text_encoder=train_text_encoder)
    if args.network_weights:
        info = network.load_weights(args.network_weights)
        logger.info("loaded network weights from %s: %s", args.network_weights, info)
    network.prepare_grad_etc(seen.text_encoder, seen.denoiser)
    return network


# ---------------------------------------------------------------------------------------------- per step
def set_seed(seed: int, process_index: int) -> None:
    random.seed(seed + process_index)
    np.random.seed((seed + process_index) % 2**32)
    torch.manual_seed(seed + process_index)


def seed_step(seed: int, micro_step: int, process_index: int, device: torch.device, validation: bool) -> torch.Generator:
    """Seed everything random in one micro-step from (seed, step, rank, stream) alone.

    Noise and timesteps come from the returned generator; LoRA dropouts use the global RNG, reseeded here.
    A resumed run therefore draws exactly what the uninterrupted run drew at the same step.
    """
    stream = 1 if validation else 0
    derived = (seed * 1_000_003 + micro_step * 1_009 + process_index * 7 + stream) % (2**63)
    if not validation:
        torch.manual_seed(derived)
    generator = torch.Generator(device=device)
    generator.manual_seed(derived ^ 0x5DEECE66D)
    return generator


def average_gradients(accelerator: Accelerator, network: torch.nn.Module) -> None:
    """Average the LoRA gradients over all processes, in one all-reduce.

    DDP's own all-reduce is armed by the wrapped module's forward(), and the LoRA network's forward is never
    called: its modules are patched into the U-Net and text encoders. Without this every rank would step on
    its own gradients and the copies would drift apart (sd-scripts' all_reduce_network does the same).
    A module skipped by module_dropout on one rank only has no gradient there: it counts as zero, so every
    rank sends the same number of values.
    """
    if accelerator.num_processes == 1:
        return
    params = [p for p in network.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


def any_rank_diverged(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True on every process when the loss is NaN/inf on any of them, so all stop together instead of hanging."""
    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item())
