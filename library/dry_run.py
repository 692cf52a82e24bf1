"""--dry_run: what a training run would do, worked out before any model weight is read, and its printed report.

The trainer calls `plan_dry_run` after it has parsed the flags, checked the input files and built the dataset
exactly as a real run does, at the point where a real run loads the models. Everything here reuses the code the run
itself uses: the dataset's buckets, `RunConfig`'s step arithmetic, the caches' keys and validity check, the LoRA
network's param-group rule (`plan_param_groups`) and its target rules (on a meta-device denoiser); model sizes come
from safetensors headers (`library/checkpoint_profile.py`), memory from `library/memory_estimate.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.checkpoint_profile import (
    LATENT_DOWNSCALE,
    ModelProfile,
    meta_denoiser,
    read_header,
    read_profile,
)
from library.dataset import cache
from library.dataset.dataset import TrainDataset
from library.lr_schedulers import SchedulerConfig, resolve_steps
from library.memory_estimate import (
    GIB,
    MemoryEstimate,
    MemoryInputs,
    TextEncoderLoad,
    element_bytes,
    estimate_memory,
)
from library.models.checkpoint import CheckpointError
from library.run_config import RunConfig
from library.trainer_setup import network_module, parse_network_args
from networks.lora import ParamGroupPlan, plan_param_groups
from networks.lora_block_lr import BlockLr
from networks.lora_config import LoRAConfig
from networks.lora_targets import BLOCK_LR_WEIGHT_ARGS, T5_TEXT_TARGETS
from networks.plugin_view import network_models, takes_our_models

if TYPE_CHECKING:
    from library.trainer import NetworkTrainer

logger = logging.getLogger(__name__)

_T5_SWITCH = T5_TEXT_TARGETS.enabled_by or "train_t5xxl"


@dataclass
class DryRunPlan:
    """The facts the report prints; tests read them directly."""

    train_set: TrainDataset
    val_set: TrainDataset | None
    batches_per_epoch: int
    num_processes: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    max_steps: int
    max_epochs: int
    latent_cache: dict[str, int] | None  # status -> images; None: latents are not cached
    text_cache: dict[str, int] | None
    latents_to_disk: bool
    text_to_disk: bool
    lr_groups: list[ParamGroupPlan]
    lr_notes: list[str]
    scheduler: str
    warmup_steps: int
    scheduler_steps: int
    profile: ModelProfile | None
    profile_problem: str = ""
    memory: MemoryEstimate | None = None
    pixel_multiple: int = LATENT_DOWNSCALE  # bucket sides must be multiples of this
    denoiser_lora_params: int = 0
    notes: list[str] = field(default_factory=list)


def plan_dry_run(trainer: NetworkTrainer, args: argparse.Namespace, run: RunConfig, num_processes: int,
                 train_set: TrainDataset, val_set: TrainDataset | None) -> DryRunPlan:
    batches = len(train_set)
    steps_per_epoch = run.steps_per_epoch(batches, num_processes)
    max_steps, max_epochs = run.total_steps(steps_per_epoch)
    latent_producer, text_producer = trainer.cache_keys(args)
    datasets = [d for d in (train_set, val_set) if d is not None]
    skip = args.skip_cache_check
    latent_cache = text_cache = None
    if args.cache_latents:
        keyed = [pair for d in datasets for pair in d.latent_cache_keys(latent_producer)]
        latent_cache = _statuses([(item.path, key) for item, key in keyed], cache.LATENT_SUFFIX, args.cache_latents_to_disk, skip)
    if args.cache_text_encoder_outputs:
        captioned = [pair for d in datasets for pair in d.cached_captions()]
        keys = [(item.path, cache.text_key(text_producer, caption)) for item, caption in captioned]
        text_cache = _statuses(keys, cache.TEXT_SUFFIX, args.cache_text_encoder_outputs_to_disk, skip)

    profile, problem = _read_profile(args)
    network_kwargs = parse_network_args(args.network_args or [])
    denoiser = meta_denoiser(profile) if profile is not None else None
    denoiser_network = (_meta_denoiser_network(args, denoiser, network_kwargs)
                        if denoiser is not None and not args.network_train_text_encoder_only else None)
    lora_config = LoRAConfig.from_network_args(network_kwargs, frozenset(network_kwargs), frozenset({_T5_SWITCH}))
    train_text_encoder = not args.network_train_unet_only and not args.cache_text_encoder_outputs
    encoder_names = [te.name for te in profile.text_encoders] if profile else []
    text_parts = [train_text_encoder and (name != "t5xxl" or _T5_SWITCH in lora_config.switches) for name in encoder_names]
    lr_groups = plan_param_groups(
        args.text_encoder_lr or None, args.unet_lr, args.learning_rate, text_encoder_parts=text_parts,
        has_unet=not args.network_train_text_encoder_only,
        text_encoder_plus_ratio=lora_config.loraplus_text_encoder_lr_ratio or lora_config.loraplus_lr_ratio,
        unet_plus_ratio=lora_config.loraplus_unet_lr_ratio or lora_config.loraplus_lr_ratio,
        unet_blocks=_unet_block_lrs(denoiser_network))
    scheduler = SchedulerConfig.from_args(args)
    scheduler_steps = max_steps * num_processes  # as build_lr_scheduler counts them
    plan = DryRunPlan(
        train_set=train_set, val_set=val_set, batches_per_epoch=batches,
        num_processes=num_processes, gradient_accumulation_steps=run.gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch, max_steps=max_steps, max_epochs=max_epochs, latent_cache=latent_cache,
        text_cache=text_cache, latents_to_disk=args.cache_latents_to_disk, text_to_disk=args.cache_text_encoder_outputs_to_disk,
        lr_groups=lr_groups, lr_notes=_optimizer_lr_notes(args.optimizer_type), scheduler=scheduler.lr_scheduler_type or
        scheduler.lr_scheduler, warmup_steps=resolve_steps(scheduler.lr_warmup_steps, scheduler_steps, "--lr_warmup_steps"),
        scheduler_steps=scheduler_steps, profile=profile, profile_problem=problem)
    if denoiser is None and any(key in network_kwargs for key in BLOCK_LR_WEIGHT_ARGS):
        plan.lr_notes.append("block-wise learning rates: the U-Net's per-block groups are unknown without the model's header")
    if profile is not None:
        plan.pixel_multiple = LATENT_DOWNSCALE * denoiser.latent_multiple
        if denoiser_network is not None:
            plan.denoiser_lora_params = sum(param.numel() for param in denoiser_network.parameters())
        inputs = memory_inputs(args, run, profile, train_set, plan.denoiser_lora_params, text_parts)
        if trainer.fp8_denoiser_layout is not None:  # else the family's fp8 part is the blocks' Linear weights (SD3)
            inputs = dataclasses.replace(inputs, denoiser_fp8_params=trainer.fp8_denoiser_layout.weight_params(denoiser))
        plan.memory = estimate_memory(inputs)
    return plan


def _statuses(keys: list[tuple[Path, dict[str, Any]]], suffix: str, to_disk: bool, skip_check: bool) -> dict[str, int]:
    counts = {"valid": 0, "stale": 0, "missing": 0}
    for image_path, key in keys:
        status = cache.entry_status(image_path, key, suffix, skip_check=skip_check) if to_disk else "missing"
        counts[status] += 1
    return counts


def _read_profile(args: argparse.Namespace) -> tuple[ModelProfile | None, str]:
    separate = {name: Path(path) for name in ("clip_l", "clip_g", "t5xxl") if (path := getattr(args, name, None))}
    try:
        return read_profile(Path(args.pretrained_model_name_or_path), vae=Path(args.vae) if args.vae else None,
                            separate_text_encoders=separate), ""
    except (CheckpointError, ValueError) as error:
        return None, str(error)


def _meta_denoiser_network(args: argparse.Namespace, denoiser: torch.nn.Module, kwargs: dict[str, str]) -> Any:
    """The denoiser's LoRA network on the meta-device denoiser, by the network module's own target rules (None
    when a plug-in cannot be built without the model's weights)."""
    module = network_module(args)
    if not takes_our_models(module):
        return _plugin_denoiser_network(args, module, network_models(module, None, denoiser).denoiser, kwargs)
    kwargs = {key: value for key, value in kwargs.items() if key != _T5_SWITCH}  # a text-encoder switch
    with torch.device("meta"):
        if args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, None, None, denoiser, **kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, None, None, denoiser,
                                            neuron_dropout=args.network_dropout, **kwargs)
    return network


def _plugin_denoiser_network(args: argparse.Namespace, module: Any, view: torch.nn.Module, kwargs: dict[str, str]) -> Any:
    """A plug-in's network on the view of the meta-device denoiser. Its own modules are made on the CPU (LyCORIS
    sizes some with .item(), which the meta device refuses) and registered by apply_to, as in a run."""
    try:
        if args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, None, None, view, **kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, None, None, view,
                                            neuron_dropout=args.network_dropout, **kwargs)
        network.apply_to(None, view, False, True)
    except (RuntimeError, NotImplementedError) as error:  # e.g. LyCORIS' DoRA and full copy the base weights
        logger.warning("--dry_run: --network_module %s cannot be sized without the model's weights (%s); the memory "
                       "estimate leaves its parameters out", args.network_module, str(error).splitlines()[0])
        return None
    return network


def _unet_block_lrs(network: Any) -> list[BlockLr] | None:
    """The denoiser's blocks with their learning-rate weights when the network has block-wise rates (networks.lora)."""
    block_lrs = getattr(network, "unet_block_lrs", None)
    return block_lrs() if block_lrs is not None else None


def memory_inputs(args: argparse.Namespace, run: RunConfig, profile: ModelProfile, train_set: TrainDataset,
                  denoiser_lora_params: int, text_parts: list[bool]) -> MemoryInputs:
    """The memory estimate's inputs from the flags, the header profile and the dataset's largest bucket."""
    buckets = [reso for reso, _ in train_set.bucket_summary()] or [(512, 512)]
    largest = max(buckets, key=lambda reso: reso[0] * reso[1])
    batch_size = max((config.batch_size for config in train_set.configs), default=1)
    weight_bytes = element_bytes(args.mixed_precision)
    rank = args.network_dim or 4
    fp8 = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
    t5_tokens = getattr(args, "t5xxl_max_token_length", None) or 256
    t5_off_gpu = (getattr(args, "t5xxl_device", None) or "").startswith("cpu")
    texts_on_gpu = not args.cache_text_encoder_outputs or args.highvram
    file_ranks = _text_encoder_lora_params(args, len(profile.text_encoders))
    encoders = []
    for index, (te, trained) in enumerate(zip(profile.text_encoders, text_parts)):
        t5_dtype = getattr(args, "t5xxl_dtype", None)
        bytes_per_param = {"fp32": 4, "float32": 4}.get(t5_dtype or "", weight_bytes) if te.is_t5 else weight_bytes
        encoders.append(TextEncoderLoad(
            name=te.name, params=te.params, linear_params=te.linear_params, bytes_per_param=bytes_per_param,
            on_gpu=texts_on_gpu and not (te.is_t5 and t5_off_gpu), fp8=fp8 and not getattr(args, "fp8_base_unet", False),
            trained=trained, lora_params=file_ranks[index] if file_ranks else rank * te.lora_sides,
            tokens=t5_tokens if te.is_t5 else (args.max_token_length or 75) + 2, width=te.width, layers=te.layers))
    has_t5 = any(te.is_t5 for te in profile.text_encoders)
    return MemoryInputs(
        denoiser_config=profile.denoiser_config, denoiser_params=profile.denoiser.params,
        denoiser_lora_params=denoiser_lora_params, batch_size=batch_size, resolution=largest,
        mixed_precision=args.mixed_precision, full_precision_lora=run.full_precision_lora,
        optimizer=args.optimizer_type or "AdamW", rank=rank, gradient_checkpointing=args.gradient_checkpointing,
        cpu_offload_checkpointing=args.cpu_offload_checkpointing, blocks_to_swap=getattr(args, "blocks_to_swap", None) or 0,
        block_params=profile.block_params, block_linear_params=profile.block_linear_params, fp8_denoiser=fp8,
        context_tokens=77 + (t5_tokens if has_t5 else 0), vae_params=profile.vae.params if profile.vae else 0,
        vae_on_gpu=not args.cache_latents or bool(args.sample_prompts) or args.highvram,
        vae_bytes_per_param=4 if args.no_half_vae else weight_bytes, latents_cached=args.cache_latents,
        text_encoders=tuple(encoders))


def _text_encoder_lora_params(args: argparse.Namespace, count: int) -> list[int] | None:
    """With --dim_from_weights the file sets the text encoders' LoRA sizes: per encoder, the parameters of its
    lora_te (lora_te1, lora_te2, ...) modules as stored there. None otherwise, or when the file is not readable."""
    if not (args.dim_from_weights and args.network_weights):
        return None
    try:
        header = read_header(Path(args.network_weights))
    except CheckpointError:
        return None
    prefixes = ["lora_te_"] if count == 1 else [f"lora_te{number}_" for number in range(1, count + 1)]
    return [sum(info.numel for key, info in header.items() if key.startswith(prefix) and not key.endswith(".alpha"))
            for prefix in prefixes]


def _optimizer_lr_notes(optimizer_type: str) -> list[str]:
    name = (optimizer_type or "AdamW").lower()
    if name == "adafactor":
        return ["Adafactor with relative_step (its default) computes its own step size; these rates are only reported"]
    if name.startswith("dadapt") or name == "prodigy":
        return ["D-Adaptation/Prodigy use the first group's rate as a multiplier for every group"]
    return []


# ------------------------------------------------------------------------------------------ the report
def format_dry_run(plan: DryRunPlan) -> str:
    sections = [_datasets(plan), _steps(plan), _caches(plan), _learning_rates(plan), _model(plan), _memory(plan)]
    title = "dry run: what training would do (no model weights were loaded)"
    return "\n\n".join([title, *sections]) + "\n"


def _datasets(plan: DryRunPlan) -> str:
    train, val = plan.train_set, plan.val_set
    lines = ["datasets"]
    for index, config in enumerate(train.configs, start=1):
        buckets = (f"buckets {config.min_bucket_reso}-{config.max_bucket_reso} px in steps of {config.bucket_reso_steps}"
                   if config.enable_bucket else "no buckets")
        width, height = config.resolution
        lines.append(f"  dataset {index}: resolution {width}x{height}, batch size {config.batch_size}, {buckets}")
    for label, info in (("", train.dataset_dirs_info()), (" (regularisation)", train.reg_dataset_dirs_info())):
        for name, counts in info.items():
            lines.append(f"    {name}{label}: {counts['img_count']} images x {counts['n_repeats']} repeats")
    lines.append(f"  training images with repeats: {train.num_train_images}; regularisation images: {train.num_reg_images}")
    if val is not None:
        lines.append(f"  validation: {val.num_train_images} images held out, {len(val)} batches")
    if train.skipped_images:
        lines.append(f"  {len(train.skipped_images)} unreadable images skipped")
    lines.append("buckets (width x height: images with repeats)")
    lines += [f"  {w}x{h}: {count}" for (w, h), count in train.bucket_summary()]
    return "\n".join(lines)


def _steps(plan: DryRunPlan) -> str:
    return "\n".join([
        "steps",
        f"  batches per epoch: {plan.batches_per_epoch}",
        f"  processes: {plan.num_processes}, gradient accumulation: {plan.gradient_accumulation_steps}",
        f"  optimizer steps per epoch: {plan.steps_per_epoch}",
        f"  total: {plan.max_steps} steps over {plan.max_epochs} epochs",
    ])


def _cache_line(what: str, counts: dict[str, int] | None, to_disk: bool, suffix: str, uncached: str) -> str:
    if counts is None:
        return f"  {what}: not cached ({uncached})"
    total = sum(counts.values())
    if not to_disk:
        return f"  {what}: in memory, {total} entries computed before training"
    return (f"  {what}: on disk next to the images as <image>_<key hash>{suffix}: {counts['valid']} of {total} already valid, "
            f"{counts['stale']} stale (recomputed), {counts['missing']} missing")


def _caches(plan: DryRunPlan) -> str:
    return "\n".join([
        "caches",
        _cache_line("latents", plan.latent_cache, plan.latents_to_disk, cache.LATENT_SUFFIX, "the VAE encodes every batch"),
        _cache_line("text-encoder outputs", plan.text_cache, plan.text_to_disk, cache.TEXT_SUFFIX,
                    "the text encoders run every step"),
    ])


def _learning_rates(plan: DryRunPlan) -> str:
    lines = ["learning rates (optimizer param groups)"]
    lines += [f"  {group.label}: {'the optimizer default' if group.lr is None else f'{group.lr:g}'}"
              for group in plan.lr_groups] or ["  no group trains anything"]
    if plan.profile is None:
        lines.append("  (text-encoder groups unknown: the model file's header could not be read)")
    lines += [f"  note: {note}" for note in plan.lr_notes]
    lines.append(f"  scheduler: {plan.scheduler}, warm-up {plan.warmup_steps} of {plan.scheduler_steps} scheduler steps")
    return "\n".join(lines)


def _model(plan: DryRunPlan) -> str:
    profile = plan.profile
    if profile is None:
        return f"model\n  not read: {plan.profile_problem}"
    lines = [f"model: {profile.family}"]
    for component in (profile.denoiser, profile.vae, *profile.text_encoders):
        if component is not None:
            dtypes = ", ".join(f"{name} {count:,}" for name, count in component.dtypes.items())
            lines.append(f"  {component.name}: {component.params:,} parameters ({dtypes}) from {component.source.name}")
    return "\n".join(lines)


def _memory(plan: DryRunPlan) -> str:
    estimate = plan.memory
    if estimate is None:
        return f"estimated peak GPU memory\n  not available: {plan.profile_problem}"
    lines = ["estimated peak GPU memory (see library/memory_estimate.py for how)"]
    for term in estimate.terms:
        note = f"  ({term.note})" if term.note else ""
        lines.append(f"  {term.name:<22}{_size(term.bytes)}{note}")
    lines.append(f"  {'peak allocated':<22}{_size(estimate.peak_allocated)}  (as torch.cuda.max_memory_allocated counts)")
    lines.append(f"  + CUDA context {_size(estimate.cuda_context).strip()} and allocator reserve "
                 f"{_size(estimate.allocator_reserve).strip()}: about {_size(estimate.on_gpu).strip()} on the GPU")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f} GiB" if nbytes >= GIB // 10 or nbytes == 0 else f"{nbytes / 2**20:8.1f} MiB"
