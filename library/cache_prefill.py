"""Fill the on-disk caches before training (tools/cache_latents.py, tools/cache_text_encoder_outputs.py).

The files are keyed exactly as the trainer keys them (same producer strings, same seed for the
validation split), so a later training run with the same flags reuses them instead of encoding again.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from library.dataset import cache
from library.dataset.config import DatasetConfig, DatasetOptions, load_dataset_configs
from library.dataset.dataset import DatasetError, TrainDataset, split_validation
from library.run_config import RunConfig

if TYPE_CHECKING:  # the trainer pulls in accelerate and the networks; the dataset helpers here need neither
    from library.trainer import Models, NetworkTrainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillConfig:
    """What the cache tools take from train_network.py's flags, read once.

    latent_key / text_key: the producer strings of the trainer's ``cache_keys``; a file made under another
    key is stale to the trainer. seed: the validation split's seed (--seed), so both parts are cached.
    """

    dataset: DatasetOptions
    latent_key: str
    text_key: str
    vae_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    vae_batch_size: int
    text_encoder_batch_size: int
    skip_check: bool = False
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, cache_keys: tuple[str, str]) -> "PrefillConfig":
        run = RunConfig.from_args(args)
        return cls(
            dataset=DatasetOptions.from_args(args), latent_key=cache_keys[0], text_key=cache_keys[1],
            vae_dtype=run.vae_dtype, text_encoder_dtype=run.weight_dtype, vae_batch_size=args.vae_batch_size,
            text_encoder_batch_size=args.text_encoder_batch_size or args.vae_batch_size,
            skip_check=args.skip_cache_check, seed=args.seed,
        )


def prefill(trainer: NetworkTrainer, models: Models, config: PrefillConfig, *, latents: bool, text: bool,
            device: torch.device | None = None) -> None:
    """Encode with the family's own ``encode_images`` / ``encode_text`` and write every cache file."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = load_dataset_configs(config.dataset)
    with torch.no_grad():
        if latents:
            models.vae.to(device, dtype=config.vae_dtype).eval()
            sets = prefill_latent_cache(
                configs, config.dataset,
                lambda images: trainer.encode_images(models, images.to(device, config.vae_dtype)).float().cpu(),
                config.latent_key, batch_size=config.vae_batch_size, skip_check=config.skip_check, seed=config.seed)
            logger.info("latents cached on disk for %d images", sum(len(s.items) for s in sets))
        if text:
            for encoder in models.text_encoders:
                encoder.to(device, dtype=config.text_encoder_dtype).eval()
            sets = prefill_text_cache(
                configs, config.dataset,
                lambda captions: {k: v.float().cpu() for k, v in trainer.encode_text(models, captions).items()},
                config.text_key, batch_size=config.text_encoder_batch_size, skip_check=config.skip_check, seed=config.seed)
            logger.info("text-encoder outputs cached on disk for %d images", sum(len(s.items) for s in sets))


def prefill_cli(trainer_class: type[NetworkTrainer], parser: argparse.ArgumentParser, argv: list[str] | None, *,
                latents: bool, text: bool) -> None:
    """What the cache tools run: the training script's flags and trainer, its models and cache keys, then the
    chosen caches written to disk."""
    from library.args import log_notes, parse_flags
    from library.console import setup_logging
    from library.hub_models import resolve_hub_models

    args, notes = parse_flags(parser, argv)
    setup_logging(args)
    log_notes(notes)
    trainer = trainer_class(args)
    args = resolve_hub_models(args, trainer.hub_folder_flags)
    config = PrefillConfig.from_args(args, trainer.cache_keys(args))
    prefill(trainer, trainer.prepare_models(args), config, latents=latents, text=text)


def prefill_latent_cache(
    configs: Sequence[DatasetConfig],
    options: DatasetOptions,
    encode: Callable[[torch.Tensor], torch.Tensor],
    producer: str,
    *,
    batch_size: int,
    skip_check: bool = False,
    seed: int | None = None,
) -> list[TrainDataset]:
    """Write the on-disk latents of every image (training and validation parts).

    Pass the producer string and seed the trainer will use, or the trainer will not recognise the files.
    """
    datasets = _all_parts(configs, options, seed, cache.latent_cache_conflicts, "--cache_latents")
    for dataset in datasets:
        dataset.cache_latents(encode, producer, to_disk=True, batch_size=batch_size, skip_check=skip_check)
    return datasets


def prefill_text_cache(
    configs: Sequence[DatasetConfig],
    options: DatasetOptions,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    producer: str,
    *,
    batch_size: int,
    skip_check: bool = False,
    seed: int | None = None,
) -> list[TrainDataset]:
    """Write the on-disk text-encoder outputs of every image (training and validation parts)."""
    datasets = _all_parts(configs, options, seed, cache.text_cache_conflicts, "--cache_text_encoder_outputs")
    for dataset in datasets:
        dataset.cache_text_outputs(encode, producer, to_disk=True, batch_size=batch_size, skip_check=skip_check)
    return datasets


def _all_parts(
    configs: Sequence[DatasetConfig],
    options: DatasetOptions,
    seed: int | None,
    conflicts: Callable[[Sequence[DatasetConfig]], list[str]],
    flag: str,
) -> list[TrainDataset]:
    problems = conflicts(configs)
    if problems:
        raise DatasetError("; ".join(problems))
    datasets = [dataset for dataset in split_validation(configs, options, seed=seed) if dataset is not None]
    if not any(len(dataset) for dataset in datasets):
        raise DatasetError(f"{flag}: the dataset has no readable images")
    return datasets
