"""ss_* training metadata and modelspec.* keys: exact key names, sd-scripts' value spelling, all strings."""

from __future__ import annotations

import base64
import time

import pytest
import safetensors
import torch

from library.metadata import (MINIMUM_KEYS, ThumbnailNotFoundError, lora_training_metadata, minimum_metadata,
                              modelspec_metadata, modelspec_resolution)
from library.saving import save_lora_file

# Every ss_* key sd-scripts' train_network.py writes (and sd3_train_network.py adds), copied from its source.
SD_SCRIPTS_KEYS = """
ss_adaptive_noise_scale ss_base_model_version ss_batch_size_per_device ss_bucket_info ss_bucket_no_upscale ss_cache_latents
ss_caption_dropout_every_n_epochs ss_caption_dropout_rate ss_caption_tag_dropout_rate ss_clip_skip ss_color_aug ss_dataset_dirs
ss_datasets ss_debiased_estimation ss_enable_bucket ss_epoch ss_face_crop_aug_range ss_flip_aug ss_fp8_base ss_fp8_base_unet
ss_full_fp16 ss_gradient_accumulation_steps ss_gradient_checkpointing ss_huber_c ss_huber_scale ss_huber_schedule ss_ip_noise_gamma
ss_ip_noise_gamma_random_strength ss_keep_tokens ss_learning_rate ss_loss_type ss_lowram ss_lr_scheduler ss_lr_warmup_steps
ss_max_bucket_reso ss_max_grad_norm ss_max_token_length ss_max_train_steps ss_max_validation_steps ss_min_bucket_reso ss_min_snr_gamma
ss_mixed_precision ss_multires_noise_discount ss_multires_noise_iterations ss_network_alpha ss_network_args ss_network_dim
ss_network_dropout ss_network_module ss_new_sd_model_hash ss_new_vae_hash ss_noise_offset ss_noise_offset_random_strength
ss_num_batches_per_epoch ss_num_epochs ss_num_reg_images ss_num_train_images ss_num_validation_images ss_optimizer ss_output_name
ss_prior_loss_weight ss_random_crop ss_reg_dataset_dirs ss_resize_interpolation ss_resolution ss_scale_weight_norms ss_sd_model_hash
ss_sd_model_name ss_sd_scripts_commit_hash ss_seed ss_session_id ss_shuffle_caption ss_steps ss_tag_frequency ss_text_encoder_lr
ss_total_batch_size ss_training_comment ss_training_finished_at ss_training_started_at ss_unet_lr ss_v2 ss_vae_hash ss_vae_name
ss_validate_every_n_epochs ss_validate_every_n_steps ss_validation_seed ss_validation_split ss_zero_terminal_snr
ss_apply_lg_attn_mask ss_apply_t5_attn_mask ss_logit_mean ss_logit_std ss_mode_scale ss_weighting_scheme
""".split()
NESTED = {"ss_network_args", "ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info", "ss_datasets"}


def test_values_are_spelled_as_sd_scripts_spells_them():
    metadata = lora_training_metadata(
        network_module="networks.lora", network_dim=16, network_alpha=8.0, network_dropout=None, v2=False,
        clip_skip=None, resolution=(512, 768), learning_rate=1e-4, training_started_at=1700000000.25,
        network_args={"conv_dim": "4", "conv_alpha": "1"}, tag_frequency={"img": {"cat": 3, "dog": 1}},
        dataset_dirs={"img": {"n_repeats": 10, "img_count": 4}}, bucket_info=None, optimizer="torch.optim.adamw.AdamW",
    )
    assert metadata == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "16",
        "ss_network_alpha": "8.0",
        "ss_network_dropout": "None",
        "ss_v2": "False",
        "ss_clip_skip": "None",
        "ss_resolution": "(512, 768)",
        "ss_learning_rate": "0.0001",
        "ss_training_started_at": "1700000000.25",
        "ss_network_args": '{"conv_dim": "4", "conv_alpha": "1"}',
        "ss_tag_frequency": '{"img": {"cat": 3, "dog": 1}}',
        "ss_dataset_dirs": '{"img": {"n_repeats": 10, "img_count": 4}}',
        "ss_optimizer": "torch.optim.adamw.AdamW",
    }


@pytest.mark.parametrize("key", SD_SCRIPTS_KEYS)
def test_every_sd_scripts_key_is_accepted_and_a_string(key):
    value = {"a": 1} if key in NESTED else 7
    metadata = lora_training_metadata(**{key[len("ss_"):]: value})
    assert metadata == {key: '{"a": 1}' if key in NESTED else "7"}


def test_run_keys_spelled_as_sd_scripts_train_network_writes_them():
    """The values train_network.py stores for these keys: str() of the raw flag/value, json.dumps for dir info."""
    metadata = lora_training_metadata(
        output_name="my_lora", session_id=123456789, num_epochs=10, resolution=(512, 512), batch_size_per_device=2,
        total_batch_size=8, cache_latents=False, network_dropout=None, scale_weight_norms=1.0, reg_dataset_dirs={},
        sd_model_hash="925997e9", new_sd_model_hash="a" * 64, adaptive_noise_scale=None, noise_offset_random_strength=False,
        ip_noise_gamma_random_strength=True, huber_scale=1.0, validation_split=0.1, validation_seed=None,
        max_validation_steps=None, validate_every_n_steps=50, validate_every_n_epochs=None,
    )
    assert metadata == {
        "ss_output_name": "my_lora", "ss_session_id": "123456789", "ss_num_epochs": "10", "ss_resolution": "(512, 512)",
        "ss_batch_size_per_device": "2", "ss_total_batch_size": "8", "ss_cache_latents": "False",
        "ss_network_dropout": "None", "ss_scale_weight_norms": "1.0", "ss_reg_dataset_dirs": "{}",
        "ss_sd_model_hash": "925997e9", "ss_new_sd_model_hash": "a" * 64, "ss_adaptive_noise_scale": "None",
        "ss_noise_offset_random_strength": "False", "ss_ip_noise_gamma_random_strength": "True", "ss_huber_scale": "1.0",
        "ss_validation_split": "0.1", "ss_validation_seed": "None", "ss_max_validation_steps": "None",
        "ss_validate_every_n_steps": "50", "ss_validate_every_n_epochs": "None",
    }
    # sd-scripts has no ss_v_parameterization: v-prediction is recorded as modelspec.prediction_type = "v".
    with pytest.raises(ValueError, match="ss_v_parameterization"):
        lora_training_metadata(v_parameterization=True)


def test_misspelt_or_wrongly_typed_fields_are_errors():
    with pytest.raises(ValueError, match="unknown LoRA metadata field 'network_dims'.*ss_network_dims"):
        lora_training_metadata(network_dims=16)
    with pytest.raises(ValueError, match="'tag_frequency' takes a dict or list.*got str"):
        lora_training_metadata(tag_frequency='{"a": 1}')


def test_minimum_metadata_is_what_no_metadata_keeps():
    full = lora_training_metadata(network_module="networks.lora", network_dim=4, network_alpha=1, network_args={},
                                  v2=False, base_model_version="sd_v1", seed=42, tag_frequency={"x": {}})
    assert MINIMUM_KEYS == ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                            "ss_network_args")
    assert minimum_metadata(full) == {"ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
                                      "ss_network_dim": "4", "ss_network_alpha": "1", "ss_network_args": "{}"}


# ----------------------------------------------------------------------------- modelspec
TIMESTAMP = 1700000000.75


def _local_date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(timestamp)))


def test_modelspec_keys_exact():
    metadata = modelspec_metadata(
        architecture="stable-diffusion-v1/lora", implementation="diffusers", title="my_lora", resolution="512,512",
        prediction_type="epsilon", timestamp=TIMESTAMP, author="me", description="d", license="openrail", tags="a,b",
        usage_hint="say cat", merged_from=None, trigger_phrase="sks cat", preprocessor="canny", is_negative_embedding="False",
        thumbnail=None, timestep_range=(100, 900), encoder_layer=2,
    )
    assert metadata == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my_lora",
        "modelspec.resolution": "512x512",
        "modelspec.date": _local_date(TIMESTAMP),
        "modelspec.prediction_type": "epsilon",
        "modelspec.author": "me",
        "modelspec.description": "d",
        "modelspec.license": "openrail",
        "modelspec.tags": "a,b",
        "modelspec.usage_hint": "say cat",
        "modelspec.trigger_phrase": "sks cat",
        "modelspec.preprocessor": "canny",
        "modelspec.is_negative_embedding": "False",
        "modelspec.timestep_range": "100,900",
        "modelspec.encoder_layer": "2",
    }


def test_modelspec_defaults_for_missing_title_and_prediction_type():
    metadata = modelspec_metadata(architecture="flux-1-dev/lora", implementation="x", title=None, resolution=1024,
                                  prediction_type=None, timestamp=TIMESTAMP)
    assert metadata["modelspec.title"] == f"LoRA@{TIMESTAMP}"
    assert "modelspec.prediction_type" not in metadata
    assert all(isinstance(v, str) for v in metadata.values())


@pytest.mark.parametrize("given, expected", [(512, "512x512"), ("768", "768x768"), ("1024,768", "1024x768"),
                                             ((640, 512), "640x512"), ("832x1216", "832x1216")])
def test_modelspec_resolution_spellings(given, expected):
    assert modelspec_resolution(given) == expected


def test_unknown_modelspec_field_is_an_error():
    with pytest.raises(ValueError, match="unknown modelspec field.*trigger_phrases"):
        modelspec_metadata(architecture="a", implementation="b", title="t", resolution=512, prediction_type=None,
                           timestamp=TIMESTAMP, trigger_phrases="x")


def test_thumbnail_file_becomes_a_data_url(tmp_path):
    image = tmp_path / "thumb.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    metadata = modelspec_metadata(architecture="a", implementation="b", title="t", resolution=512, prediction_type="v",
                                  timestamp=TIMESTAMP, thumbnail=str(image))
    prefix = "data:image/png;base64,"
    assert metadata["modelspec.thumbnail"].startswith(prefix)
    assert base64.b64decode(metadata["modelspec.thumbnail"][len(prefix):]) == image.read_bytes()

    url = "data:image/jpeg;base64,AAAA"
    kept = modelspec_metadata(architecture="a", implementation="b", title="t", resolution=512, prediction_type="v",
                              timestamp=TIMESTAMP, thumbnail=url)
    assert kept["modelspec.thumbnail"] == url
    with pytest.raises(ThumbnailNotFoundError, match="--metadata_thumbnail .*missing.png"):
        modelspec_metadata(architecture="a", implementation="b", title="t", resolution=512, prediction_type="v",
                           timestamp=TIMESTAMP, thumbnail=str(tmp_path / "missing.png"))


def test_metadata_survives_a_lora_file(tmp_path):
    metadata = {**lora_training_metadata(network_dim=4, network_args={"conv_dim": "2"}, tag_frequency={"d": {"tag": 1}}),
                **modelspec_metadata(architecture="stable-diffusion-v1/lora", implementation="diffusers", title="t",
                                     resolution=(512, 512), prediction_type="epsilon", timestamp=TIMESTAMP)}
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, {"lora_unet_a.alpha": torch.tensor(4.0)}, metadata)
    with safetensors.safe_open(str(path), framework="pt") as file:
        stored = file.metadata()
    assert {k: stored[k] for k in metadata} == metadata
    assert set(stored) - set(metadata) == {"sshs_model_hash", "sshs_legacy_hash"}


# ----------------------------------------------------------------------------- base model files and the model card
def test_model_files_are_named_not_located(tmp_path):
    """ss_sd_model_name / ss_vae_name as sd-scripts writes them: a local file by name with its WebUI hashes, a
    folder by name with sd-scripts' 'IsADirectory' hashes, a hub id (or any non-path) as given without hashes."""
    import hashlib

    from library.run_metadata import FOLDER_HASH, model_file_metadata

    model = tmp_path / "models" / "base.safetensors"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 5000)  # over 1 MiB, so the legacy hash reads real bytes
    data = model.read_bytes()
    assert model_file_metadata("sd_model", str(model)) == {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(), "ss_sd_model_name": "base.safetensors"}
    assert model_file_metadata("vae", str(tmp_path / "models") + "/") == {
        "ss_vae_hash": FOLDER_HASH, "ss_new_vae_hash": FOLDER_HASH, "ss_vae_name": "models"}
    assert model_file_metadata("sd_model", "stabilityai/sdxl-base") == {"ss_sd_model_name": "stabilityai/sdxl-base"}
    # a hub id resolved to a local copy is still named by the id, without hashes (sd-scripts never sees the copy)
    assert model_file_metadata("sd_model", str(model), hub_id="org/repo") == {"ss_sd_model_name": "org/repo"}
    assert model_file_metadata("vae", None) == {}


def _card_args(**flags):
    import argparse

    values = dict(metadata_title=None, output_name=None, resolution=None, min_timestep=None, max_timestep=None,
                  clip_skip=None, metadata_author=None, metadata_description=None, metadata_license=None,
                  metadata_tags=None, metadata_usage_hint=None, metadata_thumbnail=None, metadata_merged_from=None,
                  metadata_trigger_phrase=None, metadata_preprocessor=None, metadata_is_negative_embedding=None)
    return argparse.Namespace(**{**values, **flags})


def test_model_card_fields_follow_get_sai_model_spec(tmp_path):
    from library.metadata import base_model_facts, lora_modelspec_fields

    sd1 = base_model_facts("sd1")
    card = modelspec_metadata(**lora_modelspec_fields(_card_args(), sd1), timestamp=TIMESTAMP)
    assert card["modelspec.title"] == f"LoRA@{TIMESTAMP}"  # no --output_name, no --metadata_title
    assert card["modelspec.resolution"] == "512x512" and card["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.timestep_range" not in card and "modelspec.encoder_layer" not in card

    card = modelspec_metadata(**lora_modelspec_fields(_card_args(output_name="cats", min_timestep=200, clip_skip=2,
                                                                 resolution="768,512"), sd1), timestamp=TIMESTAMP)
    assert (card["modelspec.title"], card["modelspec.timestep_range"], card["modelspec.encoder_layer"],
            card["modelspec.resolution"]) == ("cats", "200,1000", "2", "768x512")
    sd3 = base_model_facts("sd3", "sd3.5-large")
    assert sd3.prediction_type is None  # the model itself predicts neither
    card = modelspec_metadata(**lora_modelspec_fields(_card_args(max_timestep=500), sd3), timestamp=TIMESTAMP)
    assert card["modelspec.prediction_type"] == "epsilon" and card["modelspec.timestep_range"] == "0,500"
    assert card["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"

    with pytest.raises(ThumbnailNotFoundError, match="--metadata_thumbnail"):
        lora_modelspec_fields(_card_args(metadata_thumbnail=str(tmp_path / "none.png")), sd1)


def test_a_missing_thumbnail_stops_the_run_before_any_model_loads(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path,
                                                                   capsys, no_model_loading):
    from train_helpers import base_argv, make_dataset

    import train_network

    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path / "data"), tmp_path / "out",
                     f"--metadata_thumbnail={tmp_path / 'thumb.png'}")
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    assert exit_info.value.code not in (0, None)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"--metadata_thumbnail {tmp_path / 'thumb.png'}: not found")


def test_tag_frequency_adds_up_within_a_dataset_and_the_first_dataset_wins(tmp_path):
    """sd-scripts counts per dataset by folder name (two subsets of one folder add up); merged over datasets, a
    folder name already seen is skipped."""
    from library.dataset.captions import CaptionOptions
    from library.dataset.config import DatasetConfig, SubsetConfig
    from library.dataset.dataset import TrainDataset
    from library.fixtures.images import write_fixture_images

    write_fixture_images(tmp_path / "a" / "imgs", 2, caption_extension=".txt", captions=["cat, dog", "cat"])
    write_fixture_images(tmp_path / "b" / "imgs", 1, caption_extension=".txt", captions=["bird"])

    def subset(folder):
        return SubsetConfig(image_dir=folder, caption=CaptionOptions(), caption_extension=".txt")

    first = DatasetConfig(resolution=(64, 64), subsets=(subset(tmp_path / "a" / "imgs"), subset(tmp_path / "b" / "imgs")))
    second = DatasetConfig(resolution=(64, 64), subsets=(subset(tmp_path / "b" / "imgs"),))
    dataset = TrainDataset([first, second], seed=0, max_train_steps=1, prior_loss_weight=1.0)
    assert dataset.tag_frequency(0) == {"imgs": {"cat": 2, "dog": 1, "bird": 1}}
    assert dataset.tag_frequency(1) == {"imgs": {"bird": 1}}
    assert dataset.tag_frequency() == {"imgs": {"cat": 2, "dog": 1, "bird": 1}}
    assert dataset.dataset_image_counts == [(3, 0), (1, 0)]
