"""Typed views of the flags the training loop itself uses (run length, precision, saving, sampling).

Built once from the parsed flags; the loop never reads the Namespace for these.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen base weights are stored in for a --mixed_precision value."""
    return _DTYPES[mixed_precision]


@dataclass(frozen=True)
class RunConfig:
    seed: int
    mixed_precision: str
    full_precision_lora: bool  # --full_fp16 / --full_bf16: LoRA weights in the half dtype too
    gradient_accumulation_steps: int
    max_grad_norm: float
    max_train_steps: int
    max_train_epochs: int | None
    weight_dtype: torch.dtype  # frozen base weights
    vae_dtype: torch.dtype  # fp32 with --no_half_vae (the SDXL VAE overflows in fp16), else weight_dtype
    gradient_checkpointing: bool
    scale_weight_norms: float | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, resumed_seed: int | None = None) -> "RunConfig":
        """`resumed_seed`: the seed stored in the --resume state, used when --seed is not given."""
        seed = args.seed if args.seed is not None else resumed_seed
        if seed is None:
            seed = random.randint(0, 2**32 - 1)
        return cls(seed=seed, mixed_precision=args.mixed_precision, full_precision_lora=args.full_fp16 or args.full_bf16,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
                   max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs,
                   weight_dtype=precision_dtype(args.mixed_precision),
                   vae_dtype=torch.float32 if args.no_half_vae else precision_dtype(args.mixed_precision),
                   gradient_checkpointing=args.gradient_checkpointing, scale_weight_norms=args.scale_weight_norms)

    def steps_per_epoch(self, batches_per_epoch: int, num_processes: int) -> int:
        """Optimizer steps per epoch: the processes share the batches, and --gradient_accumulation_steps batches
        make one step (both rounded up, as sd-scripts)."""
        return math.ceil(batches_per_epoch / num_processes / self.gradient_accumulation_steps)

    def total_steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(optimizer steps, epochs). --max_train_epochs wins over --max_train_steps, as in sd-scripts."""
        if steps_per_epoch <= 0:
            raise ValueError("the dataset yields no batches per epoch; add images or lower the batch size")
        if self.max_train_epochs:
            return self.max_train_epochs * steps_per_epoch, self.max_train_epochs
        return self.max_train_steps, math.ceil(self.max_train_steps / steps_per_epoch)


@dataclass(frozen=True)
class SaveConfig:
    output_dir: Path
    output_name: str
    ext: str
    dtype: torch.dtype | None
    no_metadata: bool
    every_n_epochs: int | None
    every_n_steps: int | None
    last_n_epochs: int | None
    last_n_steps: int | None
    last_n_epochs_state: int | None
    last_n_steps_state: int | None
    save_state: bool
    save_state_on_train_end: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, max_epochs: int) -> "SaveConfig":
        output_dir = Path(args.output_dir or ".")
        every_n_epochs = args.save_every_n_epochs
        if args.save_n_epoch_ratio:  # save about that many times over the run, as sd-scripts
            every_n_epochs = max(1, math.floor(max_epochs / args.save_n_epoch_ratio))
        output_dir.mkdir(parents=True, exist_ok=True)
        return cls(output_dir=output_dir, output_name=args.output_name or "last", ext="." + (args.save_model_as or "safetensors"),
                   dtype=_SAVE_DTYPES[args.save_precision], no_metadata=args.no_metadata,
                   every_n_epochs=every_n_epochs, every_n_steps=args.save_every_n_steps,
                   last_n_epochs=args.save_last_n_epochs, last_n_steps=args.save_last_n_steps,
                   last_n_epochs_state=args.save_last_n_epochs_state, last_n_steps_state=args.save_last_n_steps_state,
                   save_state=args.save_state, save_state_on_train_end=args.save_state_on_train_end)


@dataclass(frozen=True)
class SampleConfig:
    prompts_file: Path | None
    sampler: str
    every_n_steps: int | None
    every_n_epochs: int | None
    at_first: bool
    output_dir: Path
    output_name: str
    seed: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SampleConfig":
        prompts = Path(args.sample_prompts) if args.sample_prompts else None
        if prompts is not None and not prompts.is_file():
            raise FileNotFoundError(f"--sample_prompts {prompts}: file not found")
        # sd-scripts: --sample_every_n_epochs, when given, replaces --sample_every_n_steps.
        every_n_steps = None if args.sample_every_n_epochs else args.sample_every_n_steps
        return cls(prompts_file=prompts, sampler=args.sample_sampler, every_n_steps=every_n_steps,
                   every_n_epochs=args.sample_every_n_epochs, at_first=args.sample_at_first,
                   output_dir=Path(args.output_dir or ".") / "sample", output_name=args.output_name or "last", seed=args.seed)


@dataclass(frozen=True)
class ValidationConfig:
    every_n_steps: int | None
    every_n_epochs: int | None  # None: after every epoch
    max_batches: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ValidationConfig":
        return cls(every_n_steps=args.validate_every_n_steps, every_n_epochs=args.validate_every_n_epochs,
                   max_batches=args.max_validation_steps)

    def due(self, *, step: int, epoch: int, epoch_end: bool) -> bool:
        if epoch_end:
            return self.every_n_epochs is None or epoch % self.every_n_epochs == 0
        return bool(self.every_n_steps) and step % self.every_n_steps == 0
