"""Reading checkpoint files, telling families apart, and building SD1/SD2 models from files and folders.

The diffusers folder is written by diffusers itself (its converters + save_pretrained), so loading it back
checks our renaming against an independent implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from diffusers_oracle import diffusers_vae_config, write_diffusers_folder

from library.fixtures.tiny_sd import (
    TINY_TEXT_LAYERS,
    tiny_unet_config,
    tiny_vae_config,
    write_tiny_sd_checkpoint,
)
from library.models.checkpoint import CheckpointError, detect_family, load_state_dict, strip_prefix
from library.models.sd_loading import SdModels, load_sd_models, unet_config_from_diffusers, vae_config_from_diffusers
from library.models.sd_unet import SD1_UNET_CONFIG, SD2_UNET_CONFIG
from library.models.text_encoders import hf_text_state_dict, openclip_to_hf_text_state_dict
from library.models.vae import VaeConfig

UNET, VAE = "model.diffusion_model.", "first_stage_model."

# ---- detect_family / strip_prefix ------------------------------------------------------------------------------

SD1_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
]
SD2_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "cond_stage_model.model.token_embedding.weight",
]
SDXL_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
]
SD3_KEYS = [
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
    "model.diffusion_model.x_embedder.proj.weight",
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
    "first_stage_model.decoder.conv_in.weight",
]


@pytest.mark.parametrize(
    ("keys", "family"), [(SD1_KEYS, "sd1"), (SD2_KEYS, "sd2"), (SDXL_KEYS, "sdxl"), (SD3_KEYS, "sd3")]
)
def test_detect_family_from_keys(keys, family):
    assert detect_family(keys) == family
    assert detect_family(reversed(keys)) == family


def test_unknown_layout_lists_the_prefixes_found():
    with pytest.raises(CheckpointError) as error:
        detect_family(["lora_unet_down.lora_up.weight", "model.diffusion_model.input_blocks.0.0.weight"], "x.pt")
    message = str(error.value)
    assert message.startswith("x.pt is not a recognised")
    assert "[lora_unet_down.lora_up., model.diffusion_model.]" in message


def test_strip_prefix_keeps_only_matching_keys():
    sd = {"a.b.x": 1, "a.bc": 2, "c.a.b.y": 3}
    assert strip_prefix(sd, "a.b.") == {"x": 1}


# ---- load_state_dict ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=generator), "b": torch.arange(5, dtype=torch.float16)}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("mmap", [True, False])
def test_safetensors_read_with_and_without_mmap(tmp_path, small_state_dict, mmap):
    save_file(small_state_dict, tmp_path / "m.safetensors")
    assert_same_tensors(load_state_dict(tmp_path / "m.safetensors", mmap=mmap), small_state_dict)


@pytest.mark.parametrize("mmap", [True, False])
def test_ckpt_state_dict_wrapper_is_unwrapped_and_counters_dropped(tmp_path, small_state_dict, mmap):
    torch.save({"state_dict": {**small_state_dict, "step": 7}, "global_step": 7}, tmp_path / "m.ckpt")
    assert_same_tensors(load_state_dict(tmp_path / "m.ckpt", mmap=mmap), small_state_dict)
    torch.save(small_state_dict, tmp_path / "bare.pt")
    assert_same_tensors(load_state_dict(str(tmp_path / "bare.pt"), mmap=mmap), small_state_dict)


def one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as error:
        load_state_dict(path, **kwargs)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file_and_folder_are_named(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nope.safetensors")
    assert "is a folder" in one_line_error(tmp_path)


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.ckpt"])
@pytest.mark.parametrize("mmap", [True, False])
def test_garbage_bytes_are_a_checkpoint_error(tmp_path, name, mmap):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 4)
    assert "cannot read" in one_line_error(path, mmap=mmap)


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path, small_state_dict):
    save_file(small_state_dict, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    assert "cannot read" in one_line_error(tmp_path / "cut.safetensors")


def test_pickled_python_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "optimizer": Path("x")}, tmp_path / "unsafe.ckpt")
    assert "convert it to .safetensors" in one_line_error(tmp_path / "unsafe.ckpt")


# ---- load_sd_models: single files ------------------------------------------------------------------------------


def assert_module_holds(module: torch.nn.Module, expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == dtype and torch.equal(actual[key], value.to(dtype)), key


@pytest.fixture(scope="module")
def sd1_models(tiny_sd1_checkpoint) -> SdModels:
    return load_sd_models(tiny_sd1_checkpoint, v2=False)


@pytest.fixture(scope="module")
def sd2_models(tiny_sd2_checkpoint) -> SdModels:
    return load_sd_models(tiny_sd2_checkpoint, v2=True)


def test_sd1_single_file_loads_every_tensor(tiny_sd1_checkpoint, sd1_models):
    checkpoint = load_file(tiny_sd1_checkpoint)
    assert sd1_models.v2 is False
    assert sd1_models.unet_config == tiny_unet_config(v2=False)
    assert_module_holds(sd1_models.unet, strip_prefix(checkpoint, UNET))
    assert_module_holds(sd1_models.vae, strip_prefix(checkpoint, VAE))
    text = strip_prefix(checkpoint, "cond_stage_model.transformer.")
    text.pop("text_model.embeddings.position_ids")
    assert hf_text_state_dict(sd1_models.text_encoder).keys() == text.keys()
    assert all(torch.equal(hf_text_state_dict(sd1_models.text_encoder)[k], v) for k, v in text.items())
    assert sd1_models.text_encoder.config.hidden_act == "quick_gelu"


def test_sd1_text_keys_without_text_model_level_load_the_same(tmp_path, tiny_sd1_checkpoint, sd1_models):
    checkpoint = load_file(tiny_sd1_checkpoint)
    old_style = {key.replace("transformer.text_model.", "transformer."): value for key, value in checkpoint.items()}
    save_file(old_style, tmp_path / "old.safetensors")
    models = load_sd_models(tmp_path / "old.safetensors", v2=False)
    ids = torch.arange(77).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(models.text_encoder(ids).last_hidden_state, sd1_models.text_encoder(ids)[0])


def test_sd2_single_file_drops_the_last_text_layer(tiny_sd2_checkpoint, sd2_models):
    checkpoint = load_file(tiny_sd2_checkpoint)
    assert sd2_models.v2 is True
    assert sd2_models.unet_config == tiny_unet_config(v2=True)
    assert sd2_models.unet_config.use_linear_in_transformer and sd2_models.unet_config.num_head_channels == 64
    assert_module_holds(sd2_models.unet, strip_prefix(checkpoint, UNET))
    encoder = sd2_models.text_encoder
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_act) == (TINY_TEXT_LAYERS, "gelu")
    openclip = strip_prefix(checkpoint, "cond_stage_model.model.")
    layer0 = openclip["transformer.resblocks.0.attn.in_proj_weight"]
    q_proj = hf_text_state_dict(encoder)["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_proj, layer0[: layer0.shape[1]])


def test_fp16_file_loads_as_requested_dtype(tmp_path, tiny_sd1_checkpoint):
    path = write_tiny_sd_checkpoint(tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_file(path)
    models = load_sd_models(path, v2=False)
    assert_module_holds(models.unet, strip_prefix(half, UNET), dtype=torch.float32)
    as_half = load_sd_models(path, v2=False, dtype=torch.float16, mmap=False)
    assert_module_holds(as_half.vae, strip_prefix(half, VAE), dtype=torch.float16)
    assert as_half.text_encoder.dtype == torch.float16


def test_ckpt_file_loads_like_safetensors(tmp_path, tiny_sd1_checkpoint, sd1_models):
    torch.save({"state_dict": load_file(tiny_sd1_checkpoint)}, tmp_path / "model.ckpt")
    models = load_sd_models(tmp_path / "model.ckpt", v2=False)
    assert_module_holds(models.unet, sd1_models.unet.state_dict())


@pytest.mark.parametrize(
    ("fixture", "v2", "advice"),
    [("tiny_sd1_checkpoint", True, "drop --v2"), ("tiny_sd2_checkpoint", False, "add --v2")],
)
def test_v2_flag_mismatch_says_which_flag(request, fixture, v2, advice):
    path = request.getfixturevalue(fixture)
    with pytest.raises(CheckpointError, match=advice) as error:
        load_sd_models(path, v2=v2)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("keys", "script"), [(SDXL_KEYS, "is an SDXL checkpoint; use sdxl_train_network.py"), (SD3_KEYS, "sd3_train")]
)
def test_other_family_points_to_its_script(tmp_path, keys, script):
    save_file({key: torch.zeros(1) for key in keys}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=script):
        load_sd_models(tmp_path / "other.safetensors", v2=False)


def test_missing_model_and_vae_files_are_named(tmp_path, tiny_sd1_checkpoint):
    with pytest.raises(CheckpointError, match="model not found: .*missing.safetensors"):
        load_sd_models(tmp_path / "missing.safetensors", v2=False)
    with pytest.raises(CheckpointError, match="--vae file not found"):
        load_sd_models(tiny_sd1_checkpoint, v2=False, vae_path=tmp_path / "vae.safetensors")


def test_checkpoint_without_vae_asks_for_vae(tmp_path, tiny_sd1_checkpoint):
    no_vae = {k: v for k, v in load_file(tiny_sd1_checkpoint).items() if not k.startswith(VAE)}
    save_file(no_vae, tmp_path / "no_vae.safetensors")
    with pytest.raises(CheckpointError, match="no_vae.safetensors: no first_stage_model.* .* pass --vae"):
        load_sd_models(tmp_path / "no_vae.safetensors", v2=False)


def test_broken_unet_is_named_with_the_file(tmp_path, tiny_sd1_checkpoint):
    broken = {k: v for k, v in load_file(tiny_sd1_checkpoint).items() if not k.startswith(UNET + "out.")}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors.*'out.2.weight'"):
        load_sd_models(tmp_path / "broken.safetensors", v2=False)


# ---- --vae overrides ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("other")
    return strip_prefix(load_file(write_tiny_sd_checkpoint(folder / "seed7.safetensors", seed=7)), VAE)


@pytest.mark.parametrize("layout", ["prefixed", "bare", "diffusers"])
def test_vae_override_file_layouts(tmp_path, tiny_sd1_checkpoint, other_vae, layout):
    if layout == "prefixed":
        stored = {VAE + key: value for key, value in other_vae.items()}
    elif layout == "bare":
        stored = other_vae
    else:
        stored = convert_ldm_vae_checkpoint({VAE + k: v for k, v in other_vae.items()}, diffusers_vae_config())
        assert "encoder.down_blocks.0.resnets.0.conv1.weight" in stored
    save_file(stored, tmp_path / "vae.safetensors")
    models = load_sd_models(tiny_sd1_checkpoint, v2=False, vae_path=tmp_path / "vae.safetensors")
    assert_module_holds(models.vae, other_vae)


def test_vae_override_that_is_not_a_vae_is_named(tmp_path, tiny_sd1_checkpoint):
    save_file({"something.else": torch.zeros(2)}, tmp_path / "notvae.safetensors")
    with pytest.raises(CheckpointError, match="--vae .*notvae.safetensors: not an ldm VAE"):
        load_sd_models(tiny_sd1_checkpoint, v2=False, vae_path=tmp_path / "notvae.safetensors")


# ---- diffusers folders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_diffusers_folder_loads_the_same_models_as_the_single_file(request, tmp_path, v2):
    single_file = request.getfixturevalue("tiny_sd2_checkpoint" if v2 else "tiny_sd1_checkpoint")
    expected = request.getfixturevalue("sd2_models" if v2 else "sd1_models")
    write_diffusers_folder(single_file, tmp_path, v2)
    models = load_sd_models(tmp_path, v2=v2)
    assert models.unet_config == expected.unet_config
    assert_module_holds(models.unet, expected.unet.state_dict())
    assert_module_holds(models.vae, expected.vae.state_dict())
    assert_module_holds(models.text_encoder, expected.text_encoder.state_dict())
    assert models.text_encoder.config.hidden_act == ("gelu" if v2 else "quick_gelu")
    with pytest.raises(CheckpointError, match="drop --v2" if v2 is False else "add --v2"):
        load_sd_models(tmp_path, v2=not v2)


def test_diffusers_folder_of_another_family_or_incomplete(tmp_path):
    (tmp_path / "xl" / "text_encoder_2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="SDXL checkpoint; use sdxl_train_network.py"):
        load_sd_models(tmp_path / "xl", v2=False)
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"text_encoder/config.json is missing"):
        load_sd_models(tmp_path / "half", v2=False)


def test_released_diffusers_unet_configs_map_to_sd1_and_sd2():
    sd15 = {
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "layers_per_block": 2,
        "in_channels": 4,
        "out_channels": 4,
        "norm_num_groups": 32,
    }
    sd21 = {**sd15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
    assert unet_config_from_diffusers(sd15) == SD1_UNET_CONFIG
    assert unet_config_from_diffusers(sd21) == SD2_UNET_CONFIG
    with pytest.raises(CheckpointError, match="fit neither the SD1 nor the SD2 rule"):
        unet_config_from_diffusers({**sd21, "attention_head_dim": [5, 7, 20, 20]})


def test_diffusers_vae_config_json_round_trip(tmp_path):
    DiffusersAutoencoderKL(**diffusers_vae_config()).save_pretrained(tmp_path)
    config = vae_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert config == tiny_vae_config() and isinstance(config, VaeConfig)


def test_sd2_loader_text_encoder_equals_converted_openclip(tiny_sd2_checkpoint, sd2_models):
    openclip = strip_prefix(load_file(tiny_sd2_checkpoint), "cond_stage_model.model.")
    expected = openclip_to_hf_text_state_dict(openclip, drop_last_layers=1)
    expected.pop("text_projection.weight")
    actual = hf_text_state_dict(sd2_models.text_encoder)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


# ---- the fixture itself ---------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_seeded_and_has_no_zero_layers(tmp_path, tiny_sd1_checkpoint):
    again = load_file(write_tiny_sd_checkpoint(tmp_path / "again.safetensors", seed=0))
    original = load_file(tiny_sd1_checkpoint)
    assert_same_tensors(again, original)
    other = load_file(write_tiny_sd_checkpoint(tmp_path / "other.safetensors", seed=1))
    assert not torch.equal(other[UNET + "out.2.weight"], original[UNET + "out.2.weight"])
    # ldm zero-initialises these; random values make a wrong mapping visible in the outputs.
    for key in (UNET + "out.2.weight", UNET + "input_blocks.1.1.proj_out.weight", VAE + "decoder.conv_out.weight"):
        assert original[key].std() > 0.01, key
