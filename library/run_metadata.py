"""The metadata a training run writes into its LoRA files, key for key as sd-scripts' train_network.py writes it.

Two parts: the ss_* keys fixed when training starts (flags, dataset, base model and its hashes), and what each
save adds: ss_epoch / ss_steps / ss_training_finished_at and a fresh model card (modelspec.*, dated at the save).
--no_metadata keeps sd-scripts' minimum keys and still the model card. tests/test_metadata_parity.py holds the
table of sd-scripts' keys and the few intended differences.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from library.args import parse_resolution
from library.dataset.dataset import TrainDataset
from library.metadata import BaseModelFacts, lora_modelspec_fields, lora_training_metadata, minimum_metadata, modelspec_metadata
from library.run_config import RunConfig
from library.saving import checkpoint_hashes
from library.trainer_setup import parse_network_args

# What sd-scripts writes for a model path that is a folder (a diffusers model): its hash helpers catch the error
# of opening a folder and return this word.
FOLDER_HASH = "IsADirectory"


@dataclass(frozen=True)
class RunMetadata:
    """Built once when training starts; `for_save` gives the header of each file saved."""

    training: dict[str, str]
    """The ss_* keys fixed for the run."""
    card: dict[str, Any]
    """modelspec_metadata arguments without the timestamp."""
    no_metadata: bool

    def for_save(self, *, epoch: int, steps: int, now: float | None = None) -> dict[str, str]:
        """The header of one saved file. `epoch` counts as sd-scripts does: completed epochs for step and epoch
        saves, the run's epoch count for the final save."""
        now = time.time() if now is None else now
        if self.no_metadata:
            metadata = minimum_metadata(self.training)
        else:
            metadata = dict(self.training, ss_training_finished_at=str(now), ss_steps=str(steps), ss_epoch=str(epoch))
        return {**metadata, **modelspec_metadata(**self.card, timestamp=now)}


def run_metadata(args: argparse.Namespace, facts: BaseModelFacts, family_keys: dict[str, str], train_set: TrainDataset,
                 val_set: TrainDataset | None, *, optimizer_name: str, num_batches_per_epoch: int, max_steps: int,
                 max_epochs: int, run: RunConfig, num_processes: int) -> RunMetadata:
    """Everything sd-scripts records for this run. `family_keys` are the family's own ss_* keys (they win over the
    shared ones of the same name); `num_batches_per_epoch` is the prepared loader's length (per process)."""
    training = lora_training_metadata(**_run_fields(
        args, facts, train_set, val_set, optimizer_name=optimizer_name, num_batches_per_epoch=num_batches_per_epoch,
        max_steps=max_steps, max_epochs=max_epochs, run=run))
    if args.dataset_config:
        training.update(lora_training_metadata(**_datasets_fields(train_set)))
    else:
        training.update(lora_training_metadata(**_single_dataset_fields(args, train_set,
                                                                        num_processes * run.gradient_accumulation_steps)))
        # JSON "null" without buckets: lora_training_metadata leaves a None out, sd-scripts writes it
        training["ss_bucket_info"] = json.dumps(bucket_info(train_set, 0))
    if args.network_args:
        training.update(lora_training_metadata(network_args=parse_network_args(args.network_args)))
    hub_ids = getattr(args, "hub_model_ids", None) or {}  # flags given as hub repo ids, resolved to local copies
    training.update(model_file_metadata("sd_model", args.pretrained_model_name_or_path,
                                        hub_ids.get("pretrained_model_name_or_path")))
    training.update(model_file_metadata("vae", args.vae, hub_ids.get("vae")))
    training.update(family_keys)
    return RunMetadata(training=training, card=lora_modelspec_fields(args, facts), no_metadata=args.no_metadata)


def _run_fields(args: argparse.Namespace, facts: BaseModelFacts, train_set: TrainDataset, val_set: TrainDataset | None,
                *, optimizer_name: str, num_batches_per_epoch: int, max_steps: int, max_epochs: int,
                run: RunConfig) -> dict[str, Any]:
    """The keys sd-scripts writes for every run: flags as given (str() of the raw value), the run's sizes."""
    return dict(
        session_id=random.randint(0, 2**32), training_started_at=time.time(), output_name=args.output_name,
        learning_rate=args.learning_rate, text_encoder_lr=_first(args.text_encoder_lr), unet_lr=args.unet_lr,
        num_train_images=train_set.num_train_images, num_validation_images=val_set.num_train_images if val_set else 0,
        num_reg_images=train_set.num_reg_images, num_batches_per_epoch=num_batches_per_epoch, num_epochs=max_epochs,
        gradient_checkpointing=args.gradient_checkpointing, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_train_steps=max_steps, lr_warmup_steps=args.lr_warmup_steps, lr_scheduler=args.lr_scheduler,
        network_module=args.network_module or "networks.lora", network_dim=args.network_dim,
        network_alpha=args.network_alpha, network_dropout=args.network_dropout, mixed_precision=args.mixed_precision,
        full_fp16=bool(args.full_fp16), v2=facts.v2, base_model_version=facts.base_model_version,
        clip_skip=args.clip_skip, max_token_length=args.max_token_length, cache_latents=bool(args.cache_latents),
        seed=run.seed, lowram=args.lowram, noise_offset=args.noise_offset,
        multires_noise_iterations=args.multires_noise_iterations, multires_noise_discount=args.multires_noise_discount,
        adaptive_noise_scale=args.adaptive_noise_scale, zero_terminal_snr=args.zero_terminal_snr,
        training_comment=args.training_comment, optimizer=optimizer_name, max_grad_norm=args.max_grad_norm,
        caption_dropout_rate=args.caption_dropout_rate, caption_dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=args.caption_tag_dropout_rate, face_crop_aug_range=args.face_crop_aug_range,
        prior_loss_weight=args.prior_loss_weight, min_snr_gamma=args.min_snr_gamma,
        scale_weight_norms=args.scale_weight_norms, ip_noise_gamma=args.ip_noise_gamma,
        debiased_estimation=bool(args.debiased_estimation_loss),
        noise_offset_random_strength=args.noise_offset_random_strength,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength, loss_type=args.loss_type,
        huber_schedule=args.huber_schedule, huber_scale=args.huber_scale, huber_c=args.huber_c,
        fp8_base=bool(args.fp8_base), fp8_base_unet=bool(args.fp8_base_unet), validation_seed=args.validation_seed,
        validation_split=args.validation_split, max_validation_steps=args.max_validation_steps,
        validate_every_n_epochs=args.validate_every_n_epochs, validate_every_n_steps=args.validate_every_n_steps,
        resize_interpolation=args.resize_interpolation,
    )


def _first(values: list[float] | float | None) -> float | None:
    """--text_encoder_lr as sd-scripts' networks.lora records it: the first value (one rate for every encoder)."""
    if isinstance(values, (list, tuple)):
        return values[0] if values else None
    return values


# ----------------------------------------------------------------------------- the data
def _datasets_fields(train_set: TrainDataset) -> dict[str, Any]:
    """--dataset_config: ss_datasets (one JSON entry per dataset, with its subsets), and the merged tag counts and
    folder counts the WebUI metadata editors read."""
    datasets = []
    for index, config in enumerate(train_set.configs):
        train_count, reg_count = train_set.dataset_image_counts[index]
        datasets.append({
            "is_dreambooth": all(subset.metadata_file is None for subset in config.subsets),
            "batch_size_per_device": config.batch_size,
            "num_train_images": train_count,
            "num_reg_images": reg_count,
            "resolution": list(config.resolution),
            "enable_bucket": config.enable_bucket,
            "min_bucket_reso": config.min_bucket_reso if config.enable_bucket else None,
            "max_bucket_reso": config.max_bucket_reso if config.enable_bucket else None,
            "tag_frequency": train_set.tag_frequency(index),
            "bucket_info": bucket_info(train_set, index),
            "resize_interpolation": config.resize_interpolation,
            "subsets": [_subset_entry(record.subset, record.img_count)
                        for record in train_set.subset_records if record.dataset_index == index],
        })
    return dict(datasets=datasets, tag_frequency=train_set.tag_frequency(), dataset_dirs=train_set.dataset_dirs_info())


def _subset_entry(subset: Any, img_count: int) -> dict[str, Any]:
    caption = subset.caption
    entry: dict[str, Any] = {
        "img_count": img_count, "num_repeats": subset.num_repeats, "color_aug": subset.color_aug,
        "flip_aug": subset.flip_aug, "random_crop": subset.random_crop, "shuffle_caption": caption.shuffle_caption,
        "keep_tokens": caption.keep_tokens, "keep_tokens_separator": caption.keep_tokens_separator,
        "secondary_separator": caption.secondary_separator, "enable_wildcard": caption.enable_wildcard,
        "caption_prefix": caption.caption_prefix, "caption_suffix": caption.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }
    if subset.image_dir is not None:
        entry["image_dir"] = subset.image_dir.name
    if subset.metadata_file is None:
        entry.update(class_tokens=subset.class_tokens, is_reg=subset.is_reg)
    else:
        entry["metadata_file"] = subset.metadata_file.name
    return entry


def _single_dataset_fields(args: argparse.Namespace, train_set: TrainDataset, batch_multiplier: int) -> dict[str, Any]:
    """--train_data_dir / --in_json (one dataset built from flags): its settings as flat keys, as sd-scripts keeps
    them for files made before dataset configs existed."""
    config = train_set.configs[0]
    return dict(
        batch_size_per_device=args.train_batch_size, total_batch_size=args.train_batch_size * batch_multiplier,
        resolution=parse_resolution(args.resolution) if args.resolution else None, color_aug=bool(args.color_aug),
        flip_aug=bool(args.flip_aug), random_crop=bool(args.random_crop), shuffle_caption=bool(args.shuffle_caption),
        enable_bucket=config.enable_bucket, bucket_no_upscale=config.enable_bucket and config.bucket_no_upscale,
        min_bucket_reso=config.min_bucket_reso if config.enable_bucket else None,
        max_bucket_reso=config.max_bucket_reso if config.enable_bucket else None, keep_tokens=args.keep_tokens,
        dataset_dirs=train_set.dataset_dirs_info(), reg_dataset_dirs=train_set.reg_dataset_dirs_info(),
        tag_frequency=train_set.tag_frequency(0),
    )


def bucket_info(train_set: TrainDataset, dataset_index: int) -> dict[str, Any] | None:
    """sd-scripts' bucket_info of one dataset: the buckets in use (numbered in resolution order) with their image
    counts including repeats, and the mean |aspect error| over the images; None without bucketing."""
    if not train_set.configs[dataset_index].enable_bucket:
        return None
    buckets = {index: {"resolution": list(reso), "count": count}
               for index, (reso, count) in enumerate(train_set.bucket_counts(dataset_index))}
    errors = train_set.aspect_errors(dataset_index)
    mean_error = float(np.mean(np.abs(np.array(errors)))) if errors else 0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}


# ----------------------------------------------------------------------------- model files
def model_file_metadata(name: str, path: str | None, hub_id: str | None = None) -> dict[str, str]:
    """ss_<name>_name (the file's name only: a local path never leaves the machine), ss_<name>_hash and
    ss_new_<name>_hash for a local file, as sd-scripts writes them. A hub repo id (given as `hub_id`, or a name
    that is no local path) is written as given, without hashes. Nothing when the flag is not set."""
    if path is None:
        return {}
    local = Path(path)
    if hub_id is not None or not local.exists():
        return {f"ss_{name}_name": hub_id or str(path)}
    legacy, full = checkpoint_hashes(local) if local.is_file() else (FOLDER_HASH, FOLDER_HASH)
    return {f"ss_{name}_hash": legacy, f"ss_new_{name}_hash": full, f"ss_{name}_name": local.name}
