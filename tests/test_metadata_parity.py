"""The LoRA header of real tiny runs against sd-scripts' own: every key its train_network.py (and the SDXL / SD3
scripts) writes for the same command line, with the value it writes, and the few intended differences.

The tables below are read off sd-scripts' train_network.py (`metadata = {...}`, the dataset branch, save_model),
library/train_util.py (get_sai_model_spec, model_hash, calculate_sha256, precalculate_safetensors_hashes) and
library/sai_model_spec.py. A value is the exact string sd-scripts would store, or a rule for run-dependent values.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import safetensors.torch
from safetensors.torch import load_file
from train_helpers import CAPTIONS, base_argv, lora_metadata, make_dataset

import sd3_train_network
import sdxl_train_network
import train_network
from library.fixtures.images import write_fixture_images

# --------------------------------------------------------------------------------------------- intended differences
# Keys sd-scripts writes that we leave out, and keys we add; each with its reason.
LEFT_OUT = {
    "ss_sd_scripts_commit_hash": "names the sd-scripts commit that trained the file, and sd-scripts did not train it",
    "modelspec.implementation_version": "sd-scripts writes 'sd-scripts/<its commit>' there, for the same reason",
}
ADDED_SD3 = {
    "ss_training_shift": "--training_shift changes the timesteps SD3 trains on; sd-scripts' SD3 trainer does not record it",
    "ss_t5xxl_max_token_length": "the T5 caption length changes the conditioning; sd-scripts' SD3 trainer does not record it",
}
# Values that differ on purpose (not reached by the runs below unless a test says so).
DIFFERENT_VALUES = {
    "ss_network_module": "'networks.lora' when --network_module is not given (sd-scripts cannot run without it)",
    "ss_sd_model_name": "a folder given with a trailing slash is named by the folder (sd-scripts' basename gives '')",
    "modelspec.thumbnail": "a --metadata_thumbnail file that does not exist stops the run before training "
                           "(sd-scripts warns and leaves the key out)",
}

# --------------------------------------------------------------------------------------------- sd-scripts' keys
Rule = Callable[[str, dict[str, str]], bool]


def _is_float(value: str, _meta: dict[str, str]) -> bool:
    return float(value) > 1.6e9


def _session_id(value: str, _meta: dict[str, str]) -> bool:
    return 0 <= int(value) <= 2**32


def _local_date(value: str, meta: dict[str, str]) -> bool:
    """modelspec.date: the save's local time in whole seconds (sd-scripts stamps the model card at each save)."""
    stamped = datetime.datetime.fromtimestamp(int(float(meta["ss_training_finished_at"])))
    return abs(datetime.datetime.fromisoformat(value) - stamped) <= datetime.timedelta(seconds=1)


# Every run, whatever its data: train_network.py's `metadata = {...}` (flag values as str() of sd-scripts' defaults
# for flags the runs below do not set) and what save_model adds.
EVERY_RUN: dict[str, str | Rule] = {
    "ss_session_id": _session_id, "ss_training_started_at": _is_float, "ss_training_finished_at": _is_float,
    "ss_output_name": "lora", "ss_learning_rate": "0.001", "ss_text_encoder_lr": "None", "ss_unet_lr": "None",
    "ss_num_validation_images": "0", "ss_gradient_checkpointing": "False", "ss_gradient_accumulation_steps": "1",
    "ss_lr_warmup_steps": "0", "ss_lr_scheduler": "constant", "ss_network_module": "networks.lora",
    "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_dropout": "None", "ss_mixed_precision": "no",
    "ss_full_fp16": "False", "ss_v2": "False", "ss_clip_skip": "None", "ss_max_token_length": "None",
    "ss_cache_latents": "False", "ss_seed": "7", "ss_lowram": "False", "ss_noise_offset": "None",
    "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3", "ss_adaptive_noise_scale": "None",
    "ss_zero_terminal_snr": "False", "ss_training_comment": "None", "ss_sd_scripts_commit_hash": "(a commit)",
    "ss_optimizer": "torch.optim.adamw.AdamW", "ss_max_grad_norm": "1.0", "ss_caption_dropout_rate": "0.0",
    "ss_caption_dropout_every_n_epochs": "0", "ss_caption_tag_dropout_rate": "0.0", "ss_face_crop_aug_range": "None",
    "ss_prior_loss_weight": "1.0", "ss_min_snr_gamma": "None", "ss_scale_weight_norms": "None",
    "ss_ip_noise_gamma": "None", "ss_debiased_estimation": "False", "ss_noise_offset_random_strength": "False",
    "ss_ip_noise_gamma_random_strength": "False", "ss_loss_type": "l2", "ss_huber_schedule": "snr",
    "ss_huber_scale": "1.0", "ss_huber_c": "0.1", "ss_fp8_base": "False", "ss_fp8_base_unet": "False",
    "ss_validation_seed": "None", "ss_validation_split": "0.0", "ss_max_validation_steps": "None",
    "ss_validate_every_n_epochs": "None", "ss_validate_every_n_steps": "None", "ss_resize_interpolation": "None",
    # sizes of the run, and what each save adds
    "ss_num_train_images": "(per run)", "ss_num_reg_images": "(per run)", "ss_num_batches_per_epoch": "(per run)",
    "ss_num_epochs": "(per run)", "ss_max_train_steps": "(per run)", "ss_base_model_version": "(per family)",
    "ss_steps": "(per save)", "ss_epoch": "(per save)",
    # the base model file (a local file: hashes, and its name only)
    "ss_sd_model_name": "(the checkpoint's file name)", "ss_sd_model_hash": "(rule)", "ss_new_sd_model_hash": "(rule)",
    # hashes for sd-webui-additional-networks
    "sshs_model_hash": "(rule)", "sshs_legacy_hash": "(rule)",
    # the model card (get_sai_model_spec, at each save)
    "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers", "modelspec.title": "lora", "modelspec.resolution": "512x512",
    "modelspec.date": _local_date, "modelspec.prediction_type": "epsilon",
    "modelspec.implementation_version": "sd-scripts/(a commit)",
}
# --dataset_config: the `if use_user_config` branch.
CONFIG_DATASET = ("ss_datasets", "ss_tag_frequency", "ss_dataset_dirs")
# --train_data_dir / --in_json: the flat keys of the `else` branch.
FLAT_DATASET = ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
                "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
                "ss_bucket_info")
# With --vae, --network_args and the optional model-card flags.
VAE_KEYS = ("ss_vae_name", "ss_vae_hash", "ss_new_vae_hash")
SD3_KEYS = ("ss_apply_lg_attn_mask", "ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_logit_mean", "ss_logit_std",
            "ss_mode_scale")
# What --no_metadata keeps (SS_METADATA_MINIMUM_KEYS), then the model card and the hashes.
MINIMUM = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def expected_keys(*groups: Any, sd3: bool = False) -> set[str]:
    """sd-scripts' key set for a run, with our intended differences applied."""
    keys = set(EVERY_RUN)
    for group in groups:
        keys |= set(group)
    if sd3:
        keys |= set(SD3_KEYS) | set(ADDED_SD3)
    return keys - set(LEFT_OUT)


# --------------------------------------------------------------------------------------------- oracles
def _webui_hashes(path: Path) -> tuple[str, str]:
    """sd-scripts' model_hash (old WebUI: 64 KiB at 1 MiB) and calculate_sha256 (the whole file)."""
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(data).hexdigest()


def _addnet_hashes(lora: Path) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes: the file re-serialised with its ss_* keys only; SHA-256 of the
    tensor bytes, and 8 hex digits of the SHA-256 of 64 KiB at 1 MiB."""
    training = {k: v for k, v in lora_metadata(lora).items() if k.startswith("ss_")}
    data = safetensors.torch.save(load_file(str(lora)), training)
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def check_values(meta: dict[str, str], expected: dict[str, str | Rule]) -> None:
    for key, want in expected.items():
        if key in LEFT_OUT or (isinstance(want, str) and want.startswith("(")):
            continue  # left out on purpose, or a placeholder the test checks itself or leaves to the key-set check
        if callable(want):
            assert want(meta[key], meta), (key, meta[key])
        else:
            assert meta[key] == want, (key, meta[key], want)


# --------------------------------------------------------------------------------------------- SD1, dataset config
THUMBNAIL = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def _two_dataset_config(root: Path) -> Path:
    """Dataset 1: captioned images + a regularisation folder, no buckets; dataset 2: the same images again, with
    buckets and caption options (sd-scripts numbers the second 'images (2)' and counts its tags once)."""
    write_fixture_images(root / "images", 4, caption_extension=".txt", captions=CAPTIONS)
    write_fixture_images(root / "reg", 1, caption_extension=None, seed=1)
    config = root / "dataset.toml"
    config.write_text(
        "[general]\ncaption_extension = '.txt'\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 4\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(root / 'images').as_posix()}'\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(root / 'reg').as_posix()}'\n  is_reg = true\n  class_tokens = 'cat'\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\n"
        "max_bucket_reso = 128\nbucket_reso_steps = 32\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(root / 'images').as_posix()}'\n  flip_aug = true\n"
        "  shuffle_caption = true\n  keep_tokens = 1\n  caption_prefix = 'photo'\n")
    return config


def _subset(**values: Any) -> dict[str, Any]:
    """One entry of ss_datasets' "subsets", in sd-scripts' key order (DreamBooth style)."""
    entry = {"img_count": 4, "num_repeats": 1, "color_aug": False, "flip_aug": False, "random_crop": False,
             "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": None,
             "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None,
             "image_dir": "images", "class_tokens": None, "is_reg": False}
    entry.update(values)
    return entry


@pytest.fixture(scope="module")
def sd1_config_run(tmp_path_factory, tiny_sd1_checkpoint, tokenizer_cache_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("parity_sd1")
    vae = root / "vae" / "my_vae.safetensors"
    vae.parent.mkdir()
    shutil.copy(tiny_sd1_checkpoint, vae)  # sd-scripts takes a whole checkpoint as --vae too
    out = root / "out"
    train_network.main(base_argv(
        tiny_sd1_checkpoint, tokenizer_cache_dir, _two_dataset_config(root / "data"), out,
        "--max_train_steps=7", "--save_every_n_steps=3", "--save_every_n_epochs=1", f"--vae={vae}",
        "--text_encoder_lr=5e-5", "--network_args", "conv_dim=2", "conv_alpha=1", "--clip_skip=2",
        "--min_timestep=100", "--max_timestep=900", "--training_comment=parity", "--metadata_title=My LoRA",
        "--metadata_author=me", "--metadata_trigger_phrase=sks", f"--metadata_thumbnail={THUMBNAIL}"))
    return {"out": out, "vae": vae, "checkpoint": tiny_sd1_checkpoint}


def test_sd1_dataset_config_run_writes_sd_scripts_keys_and_values(sd1_config_run):
    out = sd1_config_run["out"]
    meta = lora_metadata(out / "lora.safetensors")
    wanted = expected_keys(CONFIG_DATASET, VAE_KEYS, ["ss_network_args"],
                           ["modelspec.author", "modelspec.trigger_phrase", "modelspec.thumbnail",
                            "modelspec.timestep_range", "modelspec.encoder_layer"])
    assert set(meta) == wanted, (sorted(set(meta) - wanted), sorted(wanted - set(meta)))

    check_values(meta, {
        **EVERY_RUN, "ss_text_encoder_lr": "5e-05", "ss_clip_skip": "2", "ss_training_comment": "parity",
        "ss_num_train_images": "8", "ss_num_reg_images": "1", "ss_num_batches_per_epoch": "4", "ss_num_epochs": "2",
        "ss_max_train_steps": "7", "ss_base_model_version": "sd_v1",
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
        "modelspec.title": "My LoRA", "modelspec.author": "me", "modelspec.trigger_phrase": "sks",
        "modelspec.thumbnail": THUMBNAIL, "modelspec.timestep_range": "100,900", "modelspec.encoder_layer": "2",
    })
    # The base model and the VAE by file name only (no local path leaves the machine), with sd-scripts' hashes.
    checkpoint, vae = sd1_config_run["checkpoint"], sd1_config_run["vae"]
    assert meta["ss_sd_model_name"] == checkpoint.name and meta["ss_vae_name"] == "my_vae.safetensors"
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == _webui_hashes(checkpoint)
    assert (meta["ss_vae_hash"], meta["ss_new_vae_hash"]) == _webui_hashes(vae)
    assert not any(str(checkpoint.parent) in value for value in meta.values())
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _addnet_hashes(out / "lora.safetensors")

    captions = {caption: 1 for caption in CAPTIONS}
    first = {"is_dreambooth": True, "batch_size_per_device": 4, "num_train_images": 4, "num_reg_images": 1,
             "resolution": [64, 64], "enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None,
             "tag_frequency": {"images": captions, "reg": {"cat": 1}}, "bucket_info": None, "resize_interpolation": None,
             "subsets": [_subset(), _subset(img_count=1, image_dir="reg", class_tokens="cat", is_reg=True)]}
    second = {"is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 4, "num_reg_images": 0,
              "resolution": [64, 64], "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
              "tag_frequency": {"images": captions},
              "bucket_info": {"buckets": {0: {"resolution": [64, 64], "count": 4}}, "mean_img_ar_error": 0.0},
              "resize_interpolation": None,
              "subsets": [_subset(flip_aug=True, shuffle_caption=True, keep_tokens=1, caption_prefix="photo")]}
    assert meta["ss_datasets"] == json.dumps([first, second])  # the exact string, key order included
    assert meta["ss_tag_frequency"] == json.dumps({"images": captions, "reg": {"cat": 1}})
    assert meta["ss_dataset_dirs"] == json.dumps({"images": {"n_repeats": 1, "img_count": 4},
                                                  "images (2)": {"n_repeats": 1, "img_count": 4}})


def test_ss_epoch_counts_like_sd_scripts(sd1_config_run):
    """4 steps per epoch, 7 steps: step saves say the epochs completed before them, the epoch save its epoch, and the
    final save the run's epoch count (2) although the second epoch stopped after 3 of its 4 steps."""
    out = sd1_config_run["out"]
    saves = {name: lora_metadata(out / name) for name in
             ("lora-step00000003.safetensors", "lora-000001.safetensors", "lora-step00000006.safetensors", "lora.safetensors")}
    assert {name: (meta["ss_epoch"], meta["ss_steps"]) for name, meta in saves.items()} == {
        "lora-step00000003.safetensors": ("0", "3"), "lora-000001.safetensors": ("1", "4"),
        "lora-step00000006.safetensors": ("1", "6"), "lora.safetensors": ("2", "7")}
    finished = [float(meta["ss_training_finished_at"]) for meta in saves.values()]
    assert finished == sorted(finished) and len({meta["ss_session_id"] for meta in saves.values()}) == 1
    for meta in saves.values():  # each save dates its own model card
        assert _local_date(meta["modelspec.date"], meta)


# --------------------------------------------------------------------------------------------- SD1, folder convention
def _argv_without_config(checkpoint: Path, tokenizers: Path, out: Path, *extra: str) -> list[str]:
    """The shared base command line, its data given by --train_data_dir / --in_json instead of a dataset config."""
    argv = base_argv(checkpoint, tokenizers, Path("none.toml"), out, *extra)
    return [arg for arg in argv if not arg.startswith("--dataset_config=")]


def test_sd1_folder_convention_run_writes_the_flat_dataset_keys(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    """--train_data_dir / --reg_data_dir: sd-scripts' flat keys, bucket_info with its aspect-error mean, no ss_datasets."""
    train_dir, reg_dir = tmp_path / "train", tmp_path / "reg"
    write_fixture_images(train_dir / "2_sks cat", 3, sizes=((64, 64), (64, 64), (96, 64)), caption_extension=None)
    write_fixture_images(reg_dir / "1_cat", 1, sizes=((48, 128),), caption_extension=None)
    train_network.main(_argv_without_config(
        tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path / "out", "--max_train_steps=1", "--train_batch_size=2",
        "--resolution=64", "--enable_bucket", "--min_bucket_reso=32", "--max_bucket_reso=128", "--bucket_reso_steps=32",
        f"--train_data_dir={train_dir}", f"--reg_data_dir={reg_dir}"))
    meta = lora_metadata(tmp_path / "out" / "lora.safetensors")
    assert set(meta) == expected_keys(FLAT_DATASET)

    # Buckets of 64x64 area in steps of 32: the squares and the 96x64 image go to 64x64 (aspect error 1 - 1.5),
    # the 48x128 reg image to 32x96 (1/3 - 0.375); counts include repeats (reg repeated to the 6 training images).
    mean_error = float(np.mean(np.abs([0.0, 0.0, 1 - 96 / 64, 32 / 96 - 48 / 128])))
    check_values(meta, {
        **EVERY_RUN, "ss_num_train_images": "6", "ss_num_reg_images": "1", "ss_num_batches_per_epoch": "6",
        "ss_num_epochs": "1", "ss_max_train_steps": "1", "ss_base_model_version": "sd_v1",
        "ss_batch_size_per_device": "2", "ss_total_batch_size": "2", "ss_resolution": "(64, 64)",
        "ss_color_aug": "False", "ss_flip_aug": "False", "ss_random_crop": "False", "ss_shuffle_caption": "False",
        "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False", "ss_min_bucket_reso": "32",
        "ss_max_bucket_reso": "128", "ss_keep_tokens": "0", "modelspec.resolution": "64x64",  # from --resolution
        "ss_dataset_dirs": json.dumps({"2_sks cat": {"n_repeats": 2, "img_count": 3}}),
        "ss_reg_dataset_dirs": json.dumps({"1_cat": {"n_repeats": 1, "img_count": 1}}),
        "ss_tag_frequency": json.dumps({"2_sks cat": {"sks cat": 3}, "1_cat": {"cat": 1}}),
        "ss_bucket_info": json.dumps({"buckets": {0: {"resolution": [32, 96], "count": 6},
                                                  1: {"resolution": [64, 64], "count": 6}},
                                      "mean_img_ar_error": mean_error}),
    })
    assert meta["ss_epoch"] == "1" and meta["ss_steps"] == "1"


def test_in_json_run_names_the_metadata_file(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    images = tmp_path / "ft"
    paths = write_fixture_images(images, 2, caption_extension=None)
    in_json = tmp_path / "meta_cap.json"
    in_json.write_text(json.dumps({path.stem: {"caption": "a photo", "tags": "Red, square"} for path in paths}))
    train_network.main(_argv_without_config(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path / "out", "--max_train_steps=1",
                                            "--resolution=64", f"--train_data_dir={images}", f"--in_json={in_json}"))
    meta = lora_metadata(tmp_path / "out" / "lora.safetensors")
    assert set(meta) == expected_keys(FLAT_DATASET)
    assert meta["ss_dataset_dirs"] == json.dumps({"meta_cap.json": {"n_repeats": 1, "img_count": 2}})
    assert meta["ss_reg_dataset_dirs"] == "{}" and meta["ss_bucket_info"] == "null"
    assert meta["ss_tag_frequency"] == json.dumps({"meta_cap.json": {"red": 2, "square": 2}})  # tags only, lower-cased


def test_no_metadata_keeps_the_minimum_the_model_card_and_the_hashes(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path / "data"), out,
                                 "--max_train_steps=1", "--no_metadata"))
    meta = lora_metadata(out / "lora.safetensors")
    card = {key for key in EVERY_RUN if key.startswith("modelspec.")} - set(LEFT_OUT)
    # ss_network_args only with --network_args, as in sd-scripts
    assert set(meta) == set(MINIMUM) - {"ss_network_args"} | card | {"sshs_model_hash", "sshs_legacy_hash"}
    check_values(meta, {key: EVERY_RUN[key] for key in MINIMUM if key in EVERY_RUN} | {"ss_base_model_version": "sd_v1"})
    assert meta["modelspec.title"] == "lora" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _addnet_hashes(out / "lora.safetensors")


# --------------------------------------------------------------------------------------------- SDXL and SD3
def test_sdxl_run_writes_sd_scripts_keys(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path):
    out = tmp_path / "out"
    sdxl_train_network.main(base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, make_dataset(tmp_path / "data"),
                                      out, "--max_train_steps=1"))
    meta = lora_metadata(out / "lora.safetensors")
    assert set(meta) == expected_keys(CONFIG_DATASET)
    check_values(meta, {**EVERY_RUN, "ss_base_model_version": "sdxl_base_v1-0",
                        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.resolution": "1024x1024",
                        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    assert meta["ss_sd_model_name"] == tiny_sdxl_checkpoint.name


def test_sd3_run_writes_sd_scripts_keys(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path):
    out = tmp_path / "out"
    sd3_train_network.main(base_argv(tiny_sd3_checkpoints["sd3.5-medium"], sd3_tokenizer_cache_dir,
                                     make_dataset(tmp_path / "data"), out, "--max_train_steps=1",
                                     "--text_encoder_lr", "1e-5", "2e-5", "--weighting_scheme=logit_normal"))
    meta = lora_metadata(out / "lora.safetensors")
    assert set(meta) == expected_keys(CONFIG_DATASET, sd3=True)
    check_values(meta, {
        **EVERY_RUN, "ss_base_model_version": "5-medium", "modelspec.architecture": "stable-diffusion-3-5-medium/lora",
        "modelspec.resolution": "1024x1024",
        # sd-scripts' SD3 model card says epsilon too: its rule is "v" only with --v_parameterization
        "modelspec.prediction_type": "epsilon",
        # its SD3 network takes one rate per text encoder, so the whole list is recorded
        "ss_text_encoder_lr": "[1e-05, 2e-05]",
        "ss_apply_lg_attn_mask": "False", "ss_apply_t5_attn_mask": "False", "ss_weighting_scheme": "logit_normal",
        "ss_logit_mean": "0.0", "ss_logit_std": "1.0", "ss_mode_scale": "1.29",
        "ss_training_shift": "1.0", "ss_t5xxl_max_token_length": "256",
    })
