"""The metadata a LoRA file carries: sd-scripts' ss_* training keys and the ModelSpec (modelspec.*) keys.

Readers (WebUI extensions, ComfyUI, civitai, sd-scripts' own tools) parse these strings, so the key
names and the value spelling follow sd-scripts exactly: plain values are `str(value)` (so None is
"None" and True is "True"), nested values are `json.dumps` output.
"""

from __future__ import annotations

import base64
import datetime
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# ----------------------------------------------------------------------------- ss_* training metadata
# Field names are the keys without "ss_". sd-scripts writes these from train_network.py (and the SD3
# trainer's update_metadata); listing them lets a misspelt field fail instead of writing a stray key.
_JSON_FIELDS = frozenset({"network_args", "tag_frequency", "dataset_dirs", "reg_dataset_dirs", "bucket_info", "datasets"})
_TEXT_FIELDS = frozenset({
    # run identity and progress
    "session_id", "training_started_at", "training_finished_at", "output_name", "training_comment",
    "sd_scripts_commit_hash", "steps", "epoch", "num_epochs", "max_train_steps", "num_batches_per_epoch",
    # network
    "network_module", "network_dim", "network_alpha", "network_dropout", "scale_weight_norms",
    # base model
    "base_model_version", "v2", "sd_model_name", "sd_model_hash", "new_sd_model_hash", "vae_name", "vae_hash",
    "new_vae_hash", "clip_skip", "max_token_length", "fp8_base", "fp8_base_unet", "lowram",
    # optimisation
    "learning_rate", "unet_lr", "text_encoder_lr", "optimizer", "lr_scheduler", "lr_warmup_steps", "max_grad_norm",
    "mixed_precision", "full_fp16", "gradient_checkpointing", "gradient_accumulation_steps", "seed",
    "batch_size_per_device", "total_batch_size",
    # data
    "num_train_images", "num_reg_images", "num_validation_images", "resolution", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_no_upscale", "cache_latents", "color_aug", "flip_aug", "random_crop", "shuffle_caption",
    "keep_tokens", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "face_crop_aug_range", "resize_interpolation", "prior_loss_weight",
    # noise and loss
    "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
    "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength", "zero_terminal_snr",
    "min_snr_gamma", "debiased_estimation", "loss_type", "huber_schedule", "huber_scale", "huber_c",
    # validation
    "validation_seed", "validation_split", "max_validation_steps", "validate_every_n_epochs", "validate_every_n_steps",
    # SD3 (sd3_train_network.update_metadata)
    "apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    # SD3 keys of ours only: settings that change what trains, which sd-scripts' SD3 trainer leaves out
    "training_shift", "t5xxl_max_token_length",
})

# What --no_metadata still writes: enough for loaders to apply the LoRA correctly (sd-scripts' SS_METADATA_MINIMUM_KEYS).
MINIMUM_KEYS: tuple[str, ...] = (
    "ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
)


def lora_training_metadata(**fields: Any) -> dict[str, str]:
    """ss_* metadata from keyword fields named like the keys without "ss_" (network_dim=16 → ss_network_dim="16").

    Nested fields (network_args, tag_frequency, dataset_dirs, reg_dataset_dirs, bucket_info, datasets)
    take dicts/lists and are stored as JSON; None for one of them leaves the key out. Every other field
    is stored as str(value), as sd-scripts does.
    """
    metadata: dict[str, str] = {}
    for name, value in fields.items():
        if name in _JSON_FIELDS:
            if value is None:
                continue
            if not isinstance(value, (dict, list, tuple)):
                raise ValueError(f"metadata field {name!r} takes a dict or list (stored as JSON), got {type(value).__name__}")
            metadata[f"ss_{name}"] = json.dumps(value)
        elif name in _TEXT_FIELDS:
            metadata[f"ss_{name}"] = str(value)
        else:
            raise ValueError(f"unknown LoRA metadata field {name!r}: sd-scripts writes no ss_{name} key "
                             "(check the spelling, or add it to library/metadata.py if sd-scripts gained it)")
    return metadata


def minimum_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The subset --no_metadata keeps."""
    return {key: metadata[key] for key in MINIMUM_KEYS if key in metadata}


# ----------------------------------------------------------------------------- modelspec (Stability AI ModelSpec 1.0.1)
MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_DIFFUSERS = "diffusers"
IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"

_MODELSPEC_OPTIONAL = frozenset({
    "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase",
    "preprocessor", "is_negative_embedding", "timestep_range", "encoder_layer", "implementation_version",
    "hash_sha256", "unet_dtype", "vae_dtype",
})


def modelspec_metadata(*, architecture: str, implementation: str, title: str | None, resolution: str | int | tuple[int, int],
                       prediction_type: str | None, timestamp: float, **optional: Any) -> dict[str, str]:
    """modelspec.* keys as sd-scripts' sai_model_spec writes them.

    architecture: e.g. "stable-diffusion-v1/lora", "stable-diffusion-xl-v1-base/lora",
    "stable-diffusion-3-5-medium/lora" (the family decides). title: --metadata_title or the output
    name; None gives sd-scripts' "LoRA@<timestamp>". resolution: "WxH", "W,H", W or (W, H).
    optional: the --metadata_* values (author, description, license, tags, usage_hint, thumbnail,
    merged_from, trigger_phrase, preprocessor, is_negative_embedding) and timestep_range ((min, max) or
    "min,max"), encoder_layer (clip skip), implementation_version, hash_sha256, unet_dtype, vae_dtype;
    None values are left out. A thumbnail that is a file path is embedded as a data URL.
    """
    unknown = sorted(set(optional) - _MODELSPEC_OPTIONAL)
    if unknown:
        raise ValueError(f"unknown modelspec field(s) {', '.join(unknown)}; known: {', '.join(sorted(_MODELSPEC_OPTIONAL))}")
    values: dict[str, Any] = {
        "sai_model_spec": MODELSPEC_VERSION,
        "architecture": architecture,
        "implementation": implementation,
        "title": title if title is not None else f"LoRA@{timestamp}",
        "resolution": modelspec_resolution(resolution),
        "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),  # local time, whole seconds, as sd-scripts
        "prediction_type": prediction_type,
    }
    for name, value in optional.items():
        if name == "timestep_range" and isinstance(value, (tuple, list)):
            value = f"{value[0]},{value[1]}"
        elif name == "thumbnail" and value is not None and not str(value).startswith("data:"):
            value = thumbnail_data_url(Path(value))
        values[name] = value
    return {f"modelspec.{name}": str(value) for name, value in values.items() if value is not None}


def modelspec_resolution(resolution: str | int | tuple[int, int]) -> str:
    """"WxH" from the spellings the flags use: 512, "512", "512,768", (512, 768) or already "512x768"."""
    if isinstance(resolution, str):
        if "x" in resolution:
            return resolution
        parts = [int(part) for part in resolution.split(",")]
    elif isinstance(resolution, int):
        parts = [resolution]
    else:
        parts = [int(part) for part in resolution]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"resolution {resolution!r} must be 'size' or 'width,height'")
    return f"{parts[0]}x{parts[1]}"


class ThumbnailNotFoundError(FileNotFoundError):
    """--metadata_thumbnail names a file that does not exist."""


def thumbnail_data_url(path: Path) -> str:
    """An image file as a data: URL, the form ModelSpec stores thumbnails in."""
    if not path.is_file():
        raise ThumbnailNotFoundError(f"--metadata_thumbnail {path}: no such file; give an image path or a data: URL")
    mime_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime_type};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def lora_modelspec_fields(args: Any, facts: BaseModelFacts) -> dict[str, Any]:
    """modelspec_metadata's arguments for a trained LoRA, all but the timestamp (sd-scripts dates each save), read
    from the flags as sd-scripts' get_sai_model_spec reads them: title = --metadata_title, else --output_name;
    resolution = --resolution, else the family's; timestep_range from --min/max_timestep; encoder_layer =
    --clip_skip; the other --metadata_* flags as given. A thumbnail file is read here, so a missing one stops the
    run before it trains."""
    timestep_range = None
    if args.min_timestep is not None or args.max_timestep is not None:
        timestep_range = (0 if args.min_timestep is None else args.min_timestep,
                          1000 if args.max_timestep is None else args.max_timestep)
    thumbnail = args.metadata_thumbnail
    if thumbnail is not None and not thumbnail.startswith("data:"):
        thumbnail = thumbnail_data_url(Path(thumbnail))
    return dict(
        architecture=f"{facts.architecture}/lora", implementation=facts.implementation,
        title=args.metadata_title if args.metadata_title is not None else args.output_name,
        resolution=args.resolution or facts.resolution,
        # sd-scripts' rule for every family, flow-matching SD3 included: "v" with v-parameterization, else "epsilon".
        prediction_type=facts.prediction_type or "epsilon", author=args.metadata_author,
        description=args.metadata_description, license=args.metadata_license, tags=args.metadata_tags,
        usage_hint=args.metadata_usage_hint, thumbnail=thumbnail, merged_from=args.metadata_merged_from,
        trigger_phrase=args.metadata_trigger_phrase, preprocessor=args.metadata_preprocessor,
        is_negative_embedding=args.metadata_is_negative_embedding, timestep_range=timestep_range,
        encoder_layer=args.clip_skip)


# ----------------------------------------------------------------------------- what metadata says about a base model
@dataclass(frozen=True)
class BaseModelFacts:
    """What LoRA and checkpoint metadata say about a base model, in sd-scripts' spellings."""

    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture of the model; LoRA files append "/lora"
    implementation: str  # modelspec.implementation of its LoRA files
    resolution: int  # modelspec.resolution's default side
    prediction_type: str | None  # modelspec.prediction_type (None for flow matching)
    v2: bool  # ss_v2


# SD3 variant -> sd-scripts' model type, which is its ss_base_model_version and follows "stable-diffusion-3-".
_SD3_MODEL_TYPES = {"sd3-medium": "medium", "sd3.5-medium": "5-medium", "sd3.5-large": "5-large"}
_FAMILIES = ("sd1", "sd2", "sdxl", "sd3")


def base_model_facts(family: str, variant: str | None = None, v_parameterization: bool = False) -> BaseModelFacts:
    """Metadata facts for a family ("sd1", "sd2", "sdxl", "sd3"; SD3 also its variant). Whether an SD1/2/SDXL model
    predicts v is not in its weights; the caller says (--v_parameterization)."""
    prediction = "v" if v_parameterization else "epsilon"
    if family in ("sd1", "sd2"):
        version = ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")
        if family == "sd1":
            architecture, resolution = "stable-diffusion-v1", 512
        elif v_parameterization:
            architecture, resolution = "stable-diffusion-v2-768-v", 768
        else:
            architecture, resolution = "stable-diffusion-v2-512", 512
        return BaseModelFacts(version, architecture, IMPLEMENTATION_DIFFUSERS, resolution, prediction, family == "sd2")
    if family == "sdxl":
        return BaseModelFacts("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", IMPLEMENTATION_STABILITY_AI, 1024,
                              prediction, False)
    if family == "sd3":
        if variant not in _SD3_MODEL_TYPES:
            raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {', '.join(_SD3_MODEL_TYPES)}")
        model_type = _SD3_MODEL_TYPES[variant]
        return BaseModelFacts(model_type, f"stable-diffusion-3-{model_type}", IMPLEMENTATION_DIFFUSERS, 1024, None, False)
    raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(_FAMILIES)}")


def facts_for_base_version(base_model_version: str) -> BaseModelFacts | None:
    """The facts whose ss_base_model_version is this one (a LoRA file's own statement), or None if unknown."""
    candidates = [base_model_facts(family, v_parameterization=v) for family in ("sd1", "sd2", "sdxl") for v in (False, True)]
    candidates += [base_model_facts("sd3", variant) for variant in _SD3_MODEL_TYPES]
    return next((facts for facts in candidates if facts.base_model_version == base_model_version), None)

