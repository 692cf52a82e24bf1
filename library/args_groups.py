"""The command-line surface of train_network.py as data: every sd-scripts flag, grouped by purpose.

Names, types, defaults, choices and nargs are sd-scripts' own (see the flag reference in
``shared/reference/sd-scripts-flags.txt``), so existing command lines and ``--config_file`` TOMLs work unchanged.
The table is data rather than ``add_argument`` calls so that one place can route rejected flags into the
"not supported" help group, write ``--output_config`` in sections and let tests compare the whole surface.

A model family adds its flags as another tuple of ``FlagGroup``s (``SDXL_FLAGS``, ``SD3_FLAGS``) that
``library.args.setup_parser_for`` merges with ``TRAINING_FLAGS``; a group with an existing key is extended.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping


def int_or_float(text: str) -> int | float:
    """A step count or a ratio of the total steps, as sd-scripts' --lr_warmup_steps takes it.

    "10" is 10 steps; "0.1" and "10%" are a tenth of the run. Values from 1 up must be whole steps.
    """
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a step count, a ratio below 1 or a percentage") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is negative; give a step count or a ratio of the run")
    if value.is_integer() and not text.endswith("%"):
        return int(value)
    if text.endswith("%") or value < 1:
        return value
    raise argparse.ArgumentTypeError(f"'{text}' is neither a whole step count nor a ratio below 1")


@dataclass(frozen=True)
class Flag:
    """One flag: its name without dashes, a short help text, and the options handed to ``add_argument``."""

    name: str
    help: str
    options: Mapping[str, Any]


def flag(name: str, help: str, **options: Any) -> Flag:
    """A flag taking a value; ``options`` are ``add_argument`` keywords (type, default, choices, nargs)."""
    return Flag(name, help, MappingProxyType(options))


def switch(name: str, help: str) -> Flag:
    """An on/off flag (``store_true``)."""
    return Flag(name, help, MappingProxyType({"action": "store_true"}))


@dataclass(frozen=True)
class FlagGroup:
    """A titled block of --help; ``key`` also names the TOML section --output_config writes it to."""

    key: str
    title: str
    description: str
    flags: tuple[Flag, ...]


_LR_SCHEDULERS = ("linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
                  "cosine_with_min_lr, warmup_stable_decay, inverse_sqrt, piecewise_constant, adafactor")
_SAMPLERS = ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
             "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
# "no" is accelerate's spelling of "do not compile", which the kohya_ss GUI writes (sd-scripts' choices lack it).
_DYNAMO_BACKENDS = ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                    "fx2trt", "onnxrt", "tensort", "ipex", "tvm", "no"]
_INTERPOLATIONS = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]

MODEL = FlagGroup("model", "model", "The base checkpoint to train on and how to read it.", (
    flag("pretrained_model_name_or_path", "base model: a .safetensors/.ckpt file, a diffusers folder, or a Hugging Face id "
         "(owner/name of a diffusers repo, owner/name/file.safetensors)", type=str,
         metavar="PATH"),
    switch("v2", "the base model is Stable Diffusion 2.x (OpenCLIP ViT-H text encoder)"),
    switch("v_parameterization", "the base model predicts v (SD 2.x 768-v); train against the v target"),
    flag("vae", "replace the checkpoint's VAE with this file or folder (or a Hugging Face id)", type=str, metavar="PATH"),
    flag("tokenizer_cache_dir", "folder of saved tokenizers, so training needs no network access", type=str,
         metavar="DIR"),
    flag("clip_skip", "condition on the text encoder's N-th layer from the end (1 = last layer)", type=int),
    flag("max_token_length", "caption length in tokens: 75 when unset, or 150/225 in chunks of 75",
         type=int, choices=[None, 75, 150, 225]),
    switch("no_half_vae", "keep the VAE in float32 under --mixed_precision"),
))

DATASET = FlagGroup("dataset", "dataset", "Where the images come from and how they are batched. --dataset_config "
                    "(a TOML file) replaces the folder flags; the other flags here become its defaults.", (
    flag("dataset_config", "dataset TOML file ([general], [[datasets]], [[datasets.subsets]])", type=Path),
    flag("train_data_dir", "folder of '<repeats>_<class tokens>' sub-folders of training images", type=str,
         metavar="DIR"),
    flag("reg_data_dir", "folder of '<repeats>_<class tokens>' sub-folders of regularisation images", type=str,
         metavar="DIR"),
    flag("in_json", "metadata JSON of captions/tags per image (fine-tuning style dataset)", type=str,
         metavar="PATH"),
    flag("dataset_repeats", "how often each image repeats per epoch with --in_json", type=int, default=1),
    flag("dataset_class", "import path of a custom dataset class (package.module.Class)", type=str),
    flag("resolution", "training resolution in pixels: 'size' or 'width,height'", type=str, metavar="SIZE"),
    switch("enable_bucket", "group images into aspect-ratio buckets instead of cropping all to one size"),
    flag("min_bucket_reso", "smallest bucket side in pixels", type=int, default=256),
    flag("max_bucket_reso", "largest bucket side in pixels", type=int, default=1024),
    flag("bucket_reso_steps", "bucket sides are multiples of this many pixels", type=int, default=64),
    switch("bucket_no_upscale", "never enlarge an image to fit a bucket; size buckets from the images"),
    flag("resize_interpolation", "resampling filter when resizing images (area when unset)",
         type=str, choices=_INTERPOLATIONS),
    switch("flip_aug", "randomly mirror images left-right"),
    switch("color_aug", "randomly shift image hue slightly (incompatible with cached latents)"),
    switch("random_crop", "crop at a random place instead of the centre (incompatible with cached latents)"),
    flag("face_crop_aug_range", "face-centred crop augmentation with this scale range, e.g. '2.0,4.0'", type=str),
    switch("alpha_mask", "use each image's alpha channel as the loss mask"),
    flag("conditioning_data_dir", "folder of conditioning images (ControlNet-style data)", type=str, metavar="DIR"),
    flag("train_batch_size", "images per batch on each device", type=int, default=1),
    flag("max_data_loader_n_workers", "data-loading worker processes (fewer use less RAM)", type=int, default=8),
    switch("persistent_data_loader_workers", "keep data-loading workers alive between epochs"),
    switch("cache_info", "cache captions and image sizes to speed up dataset loading (folder datasets)"),
    switch("debug_dataset", "show what the dataset yields and exit without training"),
))

CAPTIONS = FlagGroup("captions", "captions", "How caption text is read, shuffled and dropped.", (
    flag("caption_extension", "caption file extension next to each image", type=str, default=".caption"),
    flag("caption_extention", "old misspelling of --caption_extension; overrides it when given", type=str),
    flag("caption_prefix", "text put before every caption", type=str),
    flag("caption_suffix", "text put after every caption", type=str),
    flag("caption_separator", "separator between caption tags", type=str, default=","),
    switch("shuffle_caption", "shuffle the tags of each caption every time it is used"),
    flag("keep_tokens", "number of leading tags kept in place when shuffling", type=int, default=0),
    flag("keep_tokens_separator", "tags before this separator are kept in place when shuffling", type=str,
         default=""),
    flag("secondary_separator", "separator joining tags that shuffle and drop as one; becomes "
         "--caption_separator afterwards", type=str),
    switch("enable_wildcard", "expand '{a|b|c}' in captions to one choice at random"),
    flag("token_warmup_min", "tags used at the start of tag warm-up", type=int, default=1),
    flag("token_warmup_step", "steps until all tags are used (a ratio of the run when below 1)",
         type=float, default=0),
    flag("caption_dropout_rate", "probability of training an image with an empty caption", type=float, default=0.0),
    flag("caption_dropout_every_n_epochs", "drop all captions every N-th epoch", type=int, default=0),
    flag("caption_tag_dropout_rate", "probability of dropping each tag", type=float, default=0.0),
    switch("weighted_captions", "read '(word:1.3)' weights in captions"),
))

CACHING = FlagGroup("caching", "caching", "Encode images once instead of every step (needs augmentations that "
                    "do not change pixels: no --color_aug or --random_crop).", (
    switch("cache_latents", "encode all images with the VAE before training and keep the latents in RAM"),
    switch("cache_latents_to_disk", "also store cached latents next to the images (implies --cache_latents)"),
    flag("vae_batch_size", "images per VAE batch while caching latents", type=int, default=1),
    switch("skip_cache_check", "trust existing cache files without checking their contents"),
    switch("cache_text_encoder_outputs", "encode every caption once before training and keep the outputs in RAM "
           "(trains the U-Net LoRA only; captions must not change between steps)"),
    switch("cache_text_encoder_outputs_to_disk", "also store text-encoder outputs next to the images "
           "(implies --cache_text_encoder_outputs)"),
    flag("text_encoder_batch_size", "captions per batch while caching text-encoder outputs (default: --vae_batch_size)",
         type=int, default=None),
))

NETWORK = FlagGroup("network", "network (LoRA)", "The adapter that is trained.", (
    flag("network_module", "network to train, e.g. networks.lora", type=str, metavar="NAME"),
    flag("network_dim", "LoRA rank", type=int),
    flag("network_alpha", "LoRA alpha; the update is scaled by alpha/rank", type=float, default=1),
    flag("network_dropout", "dropout probability on LoRA activations (none when unset)", type=float),
    flag("network_args", "extra network options as key=value, e.g. conv_dim=4", type=str, nargs="*"),
    flag("network_weights", "start from the weights of this LoRA file", type=str, metavar="PATH"),
    switch("dim_from_weights", "take the rank from --network_weights"),
    switch("network_train_unet_only", "train only the U-Net's LoRA"),
    switch("network_train_text_encoder_only", "train only the text encoder's LoRA"),
    flag("base_weights", "LoRA files merged into the base model before training", type=str, nargs="*",
         metavar="PATH"),
    flag("base_weights_multiplier", "strength of each --base_weights file (1 when unset)", type=float, nargs="*"),
    flag("scale_weight_norms", "cap the norm of each LoRA update at this value (1 is a good start)", type=float),
))

OPTIMIZER = FlagGroup("optimizer", "optimizer and schedule", "Optimizer, learning rates and their schedule.", (
    flag("optimizer_type", "optimizer: AdamW (when empty), AdamW8bit, Lion, SGDNesterov, Adafactor, Prodigy, "
         "DAdaptation…, *ScheduleFree, or an import path", type=str, default="", metavar="NAME"),
    switch("use_8bit_adam", "old spelling of --optimizer_type AdamW8bit"),
    switch("use_lion_optimizer", "old spelling of --optimizer_type Lion"),
    flag("optimizer_args", "extra optimizer options as key=value, e.g. weight_decay=0.01 betas=0.9,0.999",
         type=str, nargs="*"),
    flag("learning_rate", "learning rate", type=float, default=2e-06),
    flag("unet_lr", "learning rate of the U-Net LoRA (--learning_rate when unset)", type=float),
    flag("text_encoder_lr", "learning rate of the text-encoder LoRA, one value or one per encoder",
         type=float, nargs="*"),
    flag("max_grad_norm", "clip the gradient norm to this value (0 = no clipping)", type=float, default=1.0),
    flag("lr_scheduler", f"learning-rate schedule: {_LR_SCHEDULERS}", type=str, default="constant", metavar="NAME"),
    flag("lr_scheduler_type", "import path of a custom scheduler class (overrides --lr_scheduler)", type=str,
         default="", metavar="NAME"),
    flag("lr_scheduler_args", "extra scheduler options as key=value, e.g. T_max=100", type=str, nargs="*"),
    flag("lr_warmup_steps", "warm-up length: steps, or a ratio/percentage of the run", type=int_or_float, default=0),
    flag("lr_decay_steps", "decay length: steps, or a ratio/percentage of the run", type=int_or_float, default=0),
    flag("lr_scheduler_num_cycles", "restarts of cosine_with_restarts", type=int, default=1),
    flag("lr_scheduler_power", "exponent of the polynomial schedule", type=float, default=1),
    flag("lr_scheduler_timescale", "timescale of inverse_sqrt (the warm-up steps when unset)", type=int),
    flag("lr_scheduler_min_lr_ratio", "lowest learning rate as a ratio of the start, for cosine_with_min_lr and "
         "warmup_stable_decay", type=float),
    switch("fused_backward_pass", "apply the optimizer step during the backward pass to save memory"),
))

TRAINING = FlagGroup("training", "training", "Length of the run, precision and resuming.", (
    flag("max_train_steps", "optimizer steps to train", type=int, default=1600),
    flag("max_train_epochs", "epochs to train (overrides --max_train_steps)", type=int),
    flag("gradient_accumulation_steps", "batches whose gradients add up to one optimizer step", type=int, default=1),
    flag("seed", "random seed (random when unset)", type=int),
    flag("mixed_precision", "compute dtype of the frozen model", type=str, default="no",
         choices=["no", "fp16", "bf16"]),
    switch("full_fp16", "keep the LoRA weights and gradients in fp16 too (needs --mixed_precision fp16)"),
    switch("full_bf16", "keep the LoRA weights and gradients in bf16 too (needs --mixed_precision bf16)"),
    switch("fp8_base", "store the frozen base model in fp8"),
    switch("fp8_base_unet", "store only the frozen U-Net in fp8"),
    switch("gradient_checkpointing", "recompute activations in the backward pass to save memory"),
    switch("cpu_offload_checkpointing", "keep checkpointed activations in CPU memory"),
    flag("resume", "training-state folder to resume from (written by --save_state)", type=str, metavar="DIR"),
    flag("initial_epoch", "epoch number to start counting from (1 = first epoch)", type=int),
    flag("initial_step", "step number to start counting from (0 = first step; overrides --initial_epoch)", type=int),
    switch("skip_until_initial_step", "read and skip batches up to the initial step so the data order matches"),
    switch("dry_run", "check the flags and dataset, then print buckets, step counts, caches, learning rates and a "
           "peak GPU memory estimate, and exit without loading any model weights"),
))

SPEED = FlagGroup("speed", "speed and memory", "How attention runs and where models live. Attention always runs "
                  "through PyTorch's scaled_dot_product_attention, which picks flash or memory-efficient kernels; "
                  "--xformers/--mem_eff_attn/--sdpa are accepted for compatibility.", (
    switch("sdpa", "use PyTorch scaled-dot-product attention (always on)"),
    switch("xformers", "sd-scripts' xformers attention; served by PyTorch SDPA here"),
    switch("mem_eff_attn", "sd-scripts' memory-efficient attention; served by PyTorch SDPA here"),
    switch("torch_compile", "compile the model with torch.compile"),
    flag("dynamo_backend", "torch.compile backend", type=str, default="inductor", choices=_DYNAMO_BACKENDS),
    switch("lowram", "load models straight to the GPU (for machines with more VRAM than RAM)"),
    switch("highvram", "skip freeing GPU memory between cache batches (for machines with plenty of VRAM)"),
))

DISTRIBUTED = FlagGroup("distributed", "distributed (accelerate launch)", "Options for multi-GPU runs.", (
    flag("ddp_timeout", "DDP timeout in minutes (accelerate's default when unset)", type=int),
    switch("ddp_gradient_as_bucket_view", "let DDP gradients share memory with its buckets"),
    switch("ddp_static_graph", "tell DDP the graph is the same every step"),
    switch("deepspeed", "train with DeepSpeed"),
    flag("zero_stage", "DeepSpeed ZeRO stage", type=int, default=2, choices=[0, 1, 2, 3]),
    flag("offload_optimizer_device", "DeepSpeed: where to offload optimizer state", type=str,
         choices=[None, "cpu", "nvme"]),
    flag("offload_optimizer_nvme_path", "DeepSpeed: NVMe folder for offloaded optimizer state", type=str,
         metavar="DIR"),
    flag("offload_param_device", "DeepSpeed: where to offload parameters", type=str, choices=[None, "cpu", "nvme"]),
    flag("offload_param_nvme_path", "DeepSpeed: NVMe path for offloaded parameters", type=str, metavar="DIR"),
    switch("zero3_init_flag", "DeepSpeed: build the model partitioned (ZeRO-3)"),
    switch("zero3_save_16bit_model", "DeepSpeed: gather a 16-bit model when saving (ZeRO-3)"),
    switch("fp16_master_weights_and_gradients", "DeepSpeed: keep master weights and gradients in fp16"),
))

NOISE_AND_LOSS = FlagGroup("noise_and_loss", "noise and loss", "Noise, timesteps and how the loss is weighted.", (
    flag("noise_offset", "add per-channel offset noise of this strength (about 0.1)", type=float),
    switch("noise_offset_random_strength", "draw the offset strength uniformly from 0 to --noise_offset"),
    flag("adaptive_noise_scale", "add mean |latent| × this value to --noise_offset", type=float),
    flag("multires_noise_iterations", "add multi-resolution (pyramid) noise with this many levels (6-10)", type=int),
    flag("multires_noise_discount", "strength decay per multi-resolution level", type=float, default=0.3),
    flag("ip_noise_gamma", "input-perturbation noise strength (about 0.1)", type=float),
    switch("ip_noise_gamma_random_strength", "draw the perturbation strength uniformly from 0 to --ip_noise_gamma"),
    switch("zero_terminal_snr", "rescale the noise schedule so the last timestep is pure noise"),
    flag("min_timestep", "lowest timestep trained (0 when unset)", type=int),
    flag("max_timestep", "timesteps trained are below this (1000 when unset)", type=int),
    flag("loss_type", "loss between prediction and target", type=str, default="l2",
         choices=["l1", "l2", "huber", "smooth_l1"]),
    flag("huber_schedule", "how the Huber parameter changes with the timestep", type=str, default="snr",
         choices=["constant", "exponential", "snr"]),
    flag("huber_c", "Huber parameter (at timestep 0 for the decaying schedules)", type=float, default=0.1),
    flag("huber_scale", "scale of the Huber parameter", type=float, default=1.0),
    flag("min_snr_gamma", "min-SNR loss weighting with this gamma (5 in the paper)", type=float),
    switch("scale_v_pred_loss_like_noise_pred", "weight the v-prediction loss like an epsilon loss"),
    flag("v_pred_like_loss", "add a v-prediction-like loss with this weight", type=float),
    switch("debiased_estimation_loss", "weight the loss by 1/sqrt(SNR)"),
    switch("masked_loss", "compute the loss only where the image's mask is set (--alpha_mask or mask folders)"),
    flag("prior_loss_weight", "loss weight of regularisation images", type=float, default=1.0),
))

SAVING = FlagGroup("saving", "saving", "Where and how often the LoRA and the training state are written.", (
    flag("output_dir", "folder for the saved LoRA files", type=str, metavar="DIR"),
    flag("output_name", "file name of the LoRA without extension", type=str, metavar="NAME"),
    flag("save_model_as", "file format of the LoRA", type=str, default="safetensors",
         choices=[None, "ckpt", "pt", "safetensors"]),
    flag("save_precision", "dtype of the saved weights (the training dtype when unset)", type=str,
         choices=[None, "float", "fp16", "bf16"]),
    flag("save_every_n_epochs", "save the LoRA every N epochs", type=int),
    flag("save_every_n_steps", "save the LoRA every N steps", type=int),
    flag("save_n_epoch_ratio", "save at least N times over the run, evenly spaced in epochs", type=int),
    flag("save_last_n_epochs", "keep only the last N epoch saves", type=int),
    flag("save_last_n_epochs_state", "keep only the last N epoch states (--save_last_n_epochs when unset)", type=int),
    flag("save_last_n_steps", "delete step saves older than N steps", type=int),
    flag("save_last_n_steps_state", "delete step states older than N steps", type=int),
    switch("save_state", "save the training state (optimizer, scheduler, RNG) with each save, for --resume"),
    switch("save_state_on_train_end", "save the training state once at the end"),
    switch("no_metadata", "write no training metadata into the LoRA file"),
    flag("training_comment", "comment stored in the LoRA metadata", type=str),
    flag("huggingface_repo_id", "Hugging Face Hub repository to upload to", type=str),
    flag("huggingface_repo_type", "Hub repository type", type=str),
    flag("huggingface_path_in_repo", "path inside the Hub repository", type=str),
    flag("huggingface_token", "Hub access token", type=str),
    flag("huggingface_repo_visibility", "Hub repository visibility (public or private)", type=str),
    switch("save_state_to_huggingface", "also upload training states to the Hub"),
    switch("resume_from_huggingface", "resume from a state stored on the Hub"),
    switch("async_upload", "upload to the Hub in the background"),
))

METADATA = FlagGroup("metadata", "model-card metadata", "modelspec.* fields written into the LoRA file.", (
    flag("metadata_title", "title (the output name when unset)", type=str),
    flag("metadata_author", "author", type=str),
    flag("metadata_description", "description", type=str),
    flag("metadata_license", "license", type=str),
    flag("metadata_tags", "comma-separated tags", type=str),
    flag("metadata_usage_hint", "usage hint", type=str),
    flag("metadata_thumbnail", "thumbnail: a data URL, or an image file that is converted to one", type=str),
    flag("metadata_merged_from", "models this one was merged from", type=str),
    flag("metadata_trigger_phrase", "phrase that triggers the LoRA", type=str),
    flag("metadata_preprocessor", "preprocessor used", type=str),
    flag("metadata_is_negative_embedding", "whether this is a negative embedding", type=str),
))

SAMPLING = FlagGroup("sampling", "sample images", "Preview images generated during training.", (
    flag("sample_prompts", "prompt file (.txt, .toml or .json) for preview images", type=str, metavar="PATH"),
    flag("sample_every_n_steps", "generate previews every N steps", type=int),
    flag("sample_every_n_epochs", "generate previews every N epochs (overrides --sample_every_n_steps)", type=int),
    switch("sample_at_first", "generate previews before training starts"),
    flag("sample_sampler", "sampler for previews", type=str, default="ddim", choices=_SAMPLERS),
))

VALIDATION = FlagGroup("validation", "validation", "Loss on held-out images, logged but never trained on.", (
    flag("validation_split", "fraction of the images held out for validation", type=float, default=0.0),
    flag("validation_seed", "seed for choosing and noising the held-out images (--seed when unset)", type=int),
    flag("validate_every_n_steps", "validate every N steps (every epoch when unset)", type=int),
    flag("validate_every_n_epochs", "validate every N epochs (every epoch when unset)", type=int),
    flag("max_validation_steps", "validate on at most N batches (all when unset)", type=int),
))

LOGGING = FlagGroup("logging", "logging", "Console output and experiment trackers.", (
    flag("console_log_level", "console log level (INFO when unset)", type=str,
         choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    flag("console_log_file", "write the log to this file instead of the console", type=str, metavar="PATH"),
    switch("console_log_simple", "plain log lines without colours"),
    flag("logging_dir", "folder for tracker logs (TensorBoard when --log_with is unset)", type=str, metavar="DIR"),
    flag("log_with", "tracker(s) to log to", type=str, choices=["tensorboard", "wandb", "all"]),
    flag("log_prefix", "prefix of the timestamped log folder", type=str),
    flag("log_tracker_name", "run name for the tracker", type=str),
    flag("log_tracker_config", "TOML file of extra tracker options", type=str, metavar="PATH"),
    flag("wandb_run_name", "name of the Weights & Biases run", type=str),
    flag("wandb_api_key", "Weights & Biases API key (better kept in a --config_file)", type=str),
    switch("log_config", "log all flags to the tracker"),
))

CONFIG = FlagGroup("config", "config file", "Read flags from a TOML file, or write the current ones to one.", (
    flag("config_file", "TOML file of flags (sections are ignored; command-line flags override it)", type=str,
         metavar="PATH"),
    switch("output_config", "write the non-default flags to --config_file and exit (the API key is left out)"),
))

TRAINING_FLAGS: tuple[FlagGroup, ...] = (
    MODEL, DATASET, CAPTIONS, CACHING, NETWORK, OPTIMIZER, TRAINING, SPEED, DISTRIBUTED, NOISE_AND_LOSS, SAVING,
    METADATA, SAMPLING, VALIDATION, LOGGING, CONFIG,
)
"""Every flag of sd-scripts' train_network.py, in --help order."""


_WEIGHTING_SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]

SD3_MODEL = FlagGroup("model", "model", "", (
    flag("clip_l", "CLIP-L text encoder file (when the checkpoint has none; or owner/name/file on the hub)", type=str,
         metavar="PATH"),
    flag("clip_g", "CLIP-G text encoder file (when the checkpoint has none; or owner/name/file on the hub)", type=str,
         metavar="PATH"),
    flag("t5xxl", "T5-XXL text encoder file (when the checkpoint has none; or owner/name/file on the hub)", type=str,
         metavar="PATH"),
    switch("disable_mmap_load_safetensors", "read .safetensors files whole instead of memory-mapping them"),
    flag("t5xxl_device", "device T5-XXL runs on while encoding (default: the training device)", type=str),
    flag("t5xxl_dtype", "dtype of T5-XXL (default: the --mixed_precision dtype)", type=str),
    flag("t5xxl_max_token_length", "T5 tokens per caption", type=int, default=256),
    switch("apply_lg_attn_mask", "zero CLIP-L/CLIP-G outputs at padding positions"),
    switch("apply_t5_attn_mask", "mask T5 padding in its attention and zero its outputs there"),
))

SD3_TRAINING = FlagGroup("sd3", "SD3 training", "Flow-matching timesteps, text-encoder dropout and memory options of SD3.", (
    flag("weighting_scheme", "timestep density / loss weighting", type=str, default="uniform", choices=_WEIGHTING_SCHEMES),
    flag("logit_mean", "mean of the logit-normal timestep density", type=float, default=0.0),
    flag("logit_std", "standard deviation of the logit-normal timestep density", type=float, default=1.0),
    flag("mode_scale", "scale of the 'mode' timestep density", type=float, default=1.29),
    flag("training_shift", "shift of the sampled sigmas: s*sigma / (1 + (s-1)*sigma)", type=float, default=1.0),
    flag("clip_l_dropout_rate", "probability of dropping the CLIP-L conditioning of a sample", type=float, default=0.0),
    flag("clip_g_dropout_rate", "probability of dropping the CLIP-G conditioning of a sample", type=float, default=0.0),
    flag("t5_dropout_rate", "probability of dropping the T5 conditioning of a sample", type=float, default=0.0),
    flag("pos_emb_random_crop_rate", "probability of a random (instead of centred) crop of the position embedding",
         type=float, default=0.0),
    switch("enable_scaled_pos_embed", "scale the position embedding per bucket resolution (multi-resolution training)"),
    flag("blocks_to_swap", "joint blocks kept in CPU memory and copied to the GPU when used", type=int),
    switch("save_clip", "save CLIP-L/G with the model (full fine-tuning only)"),
    switch("save_t5xxl", "save T5-XXL with the model (full fine-tuning only)"),
))

SD3_FLAGS: tuple[FlagGroup, ...] = (SD3_MODEL, SD3_TRAINING)
"""What sd3_train_network.py adds to TRAINING_FLAGS (sd-scripts' add_dit_training_arguments + add_sd3_training_arguments)."""


SDXL_TRAINING = FlagGroup("sdxl", "SDXL training", "SDXL's extra options.", (
    switch("disable_mmap_load_safetensors", "read .safetensors files whole instead of memory-mapping them"),
    flag("text_encoder_lr1", "learning rate of the CLIP-L text encoder's LoRA (default: --learning_rate)", type=float),
    flag("text_encoder_lr2", "learning rate of the CLIP-G (bigG) text encoder's LoRA (default: --learning_rate)", type=float),
))

SDXL_FLAGS: tuple[FlagGroup, ...] = (SDXL_TRAINING,)
"""What sdxl_train_network.py adds to TRAINING_FLAGS (sd-scripts' add_sdxl_training_arguments; the text-encoder
caching flags are already shared; --text_encoder_lr1/2 are the SDXL guide's per-encoder rates)."""
