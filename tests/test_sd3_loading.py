"""Loading SD3 / SD3.5 single files and separate part files, and the errors for files that do not fit.

Oracles: the tensors stored in the fixture files themselves (read back with safetensors), plain transformers
models built from them, and diffusers' own ldm -> diffusers VAE converter for the diffusers-layout --vae file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
from safetensors.torch import load_file, save_file

from library.fixtures.tiny_sd3 import (
    VARIANTS,
    tiny_mmdit_config,
    tiny_sd3_text_encoder_weights,
    tiny_sd3_vae_config,
    write_tiny_sd3_checkpoint,
)
from library.models.checkpoint import CheckpointError, strip_prefix
from library.models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from library.models.sd3_loading import (
    check_sd3_files,
    load_sd3_models,
    load_t5_encoder,
    sd3_variant,
    t5_config_from_state_dict,
)
from library.models.text_encoders import hf_text_state_dict

ENCODERS = ("clip_l", "clip_g", "t5xxl")


def text_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """An encoder's weights in the layout the fixture writes (canonical CLIP keys; T5's ``shared`` only)."""
    if name == "t5xxl":
        state = dict(model.state_dict())
        state.pop("encoder.embed_tokens.weight")
        return state
    return hf_text_state_dict(model)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def sd35_without_text(tmp_path_factory) -> Path:
    """SD3.5's release layout: MMDiT and VAE only."""
    path = tmp_path_factory.mktemp("sd35") / "sd3.5_large.safetensors"
    return write_tiny_sd3_checkpoint(path, variant="sd3.5-large", include_text_encoders=False)


# ---- the single file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_loads_every_part_exactly(variant, tiny_sd3_checkpoints):
    path = tiny_sd3_checkpoints[variant]
    models = load_sd3_models(path)
    stored = load_file(path)
    assert models.variant == variant
    assert models.mmdit_config == tiny_mmdit_config(variant)
    assert_same_tensors(models.mmdit.state_dict(), strip_prefix(stored, "model.diffusion_model."))
    assert models.vae.config == tiny_sd3_vae_config()
    assert_same_tensors(models.vae.state_dict(), strip_prefix(stored, "first_stage_model."))
    for name in ENCODERS:
        expected = {k: v.float() for k, v in strip_prefix(stored, f"text_encoders.{name}.transformer.").items()}
        assert_same_tensors(text_state(getattr(models.text, name), name), expected)


def test_fixture_variants_differ_the_way_the_releases_do(tiny_sd3_checkpoints):
    keys = {variant: set(load_file(path)) for variant, path in tiny_sd3_checkpoints.items()}
    ln_q = "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight"
    attn2 = "model.diffusion_model.joint_blocks.{}.x_block.attn2.qkv.weight"
    assert ln_q not in keys["sd3-medium"] and ln_q in keys["sd3.5-large"] and ln_q in keys["sd3.5-medium"]
    assert [attn2.format(i) in keys["sd3.5-medium"] for i in range(3)] == [True, True, False]
    assert not any(".attn2." in key for key in keys["sd3.5-large"] | keys["sd3-medium"])


def test_variant_names_of_the_released_configs():
    names = [sd3_variant(config) for config in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE)]
    assert names == ["sd3-medium", "sd3.5-medium", "sd3.5-large"]


def test_dtype_applies_to_every_part_and_t5_dtype_to_t5(tiny_sd3_checkpoints):
    models = load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], dtype=torch.bfloat16, t5_dtype=torch.float16)
    for module in (models.mmdit, models.vae, models.text.clip_l, models.text.clip_g):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert models.mmdit.pos_embed.dtype == torch.bfloat16
    assert {p.dtype for p in models.text.t5xxl.parameters()} == {torch.float16}


def test_without_mmap_the_tensors_are_the_same(tiny_sd3_checkpoints):
    mapped = load_sd3_models(tiny_sd3_checkpoints["sd3.5-medium"])
    read = load_sd3_models(tiny_sd3_checkpoints["sd3.5-medium"], mmap=False)
    assert_same_tensors(read.mmdit.state_dict(), mapped.mmdit.state_dict())
    assert_same_tensors(read.text.t5xxl.state_dict(), mapped.text.t5xxl.state_dict())


# ---- separate files -----------------------------------------------------------------------------------------------


def test_separate_files_give_the_single_file_tensors(
    tiny_sd3_checkpoints, tiny_sd3_text_encoder_files, sd35_without_text
):
    whole = load_sd3_models(tiny_sd3_checkpoints["sd3.5-large"]).text
    parts = load_sd3_models(sd35_without_text, **tiny_sd3_text_encoder_files).text
    for name in ENCODERS:
        assert_same_tensors(text_state(getattr(parts, name), name), text_state(getattr(whole, name), name))


def test_fp8_and_fp16_files_are_upcast_to_the_requested_dtype(tiny_sd3_text_encoder_files, sd35_without_text):
    stored = {name: load_file(path) for name, path in tiny_sd3_text_encoder_files.items()}
    assert {v.dtype for v in stored["t5xxl"].values()} == {torch.float8_e4m3fn}
    assert {v.dtype for v in stored["clip_g"].values()} == {torch.float16}
    text = load_sd3_models(sd35_without_text, **tiny_sd3_text_encoder_files).text
    t5 = text_state(text.t5xxl, "t5xxl")
    assert {v.dtype for v in t5.values()} == {torch.float32}
    assert_same_tensors(t5, {key: value.float() for key, value in stored["t5xxl"].items()})
    assert text.clip_g.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32


def test_separate_file_wins_over_the_checkpoint_copy(tiny_sd3_checkpoints, tmp_path):
    other = tiny_sd3_text_encoder_weights(seed=7)["clip_l"]
    save_file(other, tmp_path / "clip_l.safetensors")
    text = load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], clip_l=tmp_path / "clip_l.safetensors").text
    assert_same_tensors(text_state(text.clip_l, "clip_l"), other)


def test_encoder_file_with_the_single_file_prefix_loads(sd35_without_text, tiny_sd3_text_encoder_files, tmp_path):
    weights = tiny_sd3_text_encoder_weights()["t5xxl"]
    save_file({f"text_encoders.t5xxl.transformer.{k}": v for k, v in weights.items()}, tmp_path / "t5.safetensors")
    files = {**tiny_sd3_text_encoder_files, "t5xxl": tmp_path / "t5.safetensors"}
    text = load_sd3_models(sd35_without_text, **files).text
    assert_same_tensors(text_state(text.t5xxl, "t5xxl"), {k: v.float() for k, v in weights.items()})


def test_clip_l_file_without_projection_pools_the_normed_eos_state(
    sd35_without_text, tiny_sd3_text_encoder_files, tmp_path
):
    weights = dict(tiny_sd3_text_encoder_weights()["clip_l"])
    del weights["text_projection.weight"]
    save_file(weights, tmp_path / "clip_l.safetensors")
    files = {**tiny_sd3_text_encoder_files, "clip_l": tmp_path / "clip_l.safetensors"}
    clip_l = load_sd3_models(sd35_without_text, **files).text.clip_l
    ids = torch.tensor([[clip_l.config.bos_token_id, 5, 9, clip_l.config.eos_token_id]])
    with torch.no_grad():
        output = clip_l(input_ids=ids)
    assert torch.allclose(output.text_embeds, output.last_hidden_state[:, -1], atol=1e-6)


def test_t5_loads_from_either_copy_of_its_tied_embedding():
    weights = {key: value.float() for key, value in tiny_sd3_text_encoder_weights()["t5xxl"].items()}
    from_shared = load_t5_encoder(weights)
    renamed = dict(weights)
    renamed["encoder.embed_tokens.weight"] = renamed.pop("shared.weight")
    from_embed = load_t5_encoder(renamed)
    ids = torch.tensor([[4, 6, 17, 8, 1]])
    with torch.no_grad():
        expected = from_shared(input_ids=ids).last_hidden_state
        assert torch.equal(from_embed(input_ids=ids).last_hidden_state, expected)
    assert from_embed.get_input_embeddings().weight is from_embed.shared.weight


def test_t5_config_is_read_off_the_weights():
    config = t5_config_from_state_dict(tiny_sd3_text_encoder_weights()["t5xxl"])
    assert (config.d_model, config.d_kv, config.num_heads, config.d_ff, config.num_layers) == (256, 32, 4, 128, 2)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new" and config.relative_attention_num_buckets == 32


def test_vae_file_in_ldm_or_diffusers_layout(tiny_sd3_checkpoints, tmp_path):
    path = tiny_sd3_checkpoints["sd3-medium"]
    vae = strip_prefix(load_file(path), "first_stage_model.")
    config = tiny_sd3_vae_config()
    ddconfig = {"in_channels": 3, "out_ch": 3, "z_channels": 16, "ch": config.ch, "ch_mult": list(config.ch_mult),
                "num_res_blocks": config.num_res_blocks}  # fmt: skip
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    prefixed = {f"first_stage_model.{key}": value for key, value in vae.items()}
    diffusers_config = create_vae_diffusers_config_from_ldm(original, prefixed, scaling_factor=1.5305)
    save_file(convert_ldm_vae_checkpoint(prefixed, diffusers_config), tmp_path / "diffusers_vae.safetensors")
    save_file(vae, tmp_path / "ldm_vae.safetensors")
    for file in ("diffusers_vae.safetensors", "ldm_vae.safetensors"):
        loaded = load_sd3_models(path, vae=tmp_path / file).vae
        assert_same_tensors(loaded.state_dict(), vae)


# ---- errors -------------------------------------------------------------------------------------------------------


def test_missing_t5_lists_what_was_found_and_the_flag(tmp_path):
    path = write_tiny_sd3_checkpoint(tmp_path / "sd3_medium_incl_clips.safetensors", variant="sd3-medium", t5=False)
    for check in (check_sd3_files, load_sd3_models):
        with pytest.raises(CheckpointError) as error:
            check(path)
        message = str(error.value)
        assert "no T5-XXL (found: MMDiT, VAE, CLIP-L, CLIP-G); pass --t5xxl FILE" in message
        assert str(path) in message and "\n" not in message


def test_sd35_file_without_encoder_files_names_all_three_flags(sd35_without_text, tiny_sd3_text_encoder_files):
    all_three = r"no CLIP-L, CLIP-G, T5-XXL \(found: MMDiT, VAE\); pass --clip_l FILE --clip_g FILE --t5xxl FILE"
    with pytest.raises(CheckpointError, match=all_three):
        check_sd3_files(sd35_without_text)
    with pytest.raises(CheckpointError, match="no CLIP-G .*pass --clip_g FILE$"):
        files = tiny_sd3_text_encoder_files
        check_sd3_files(sd35_without_text, clip_l=files["clip_l"], t5xxl=files["t5xxl"])
    check_sd3_files(sd35_without_text, **tiny_sd3_text_encoder_files)


def test_other_families_are_sent_to_their_script(tiny_sd1_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="SD1.x checkpoint; use train_network.py"):
        check_sd3_files(tiny_sd1_checkpoint)
    sdxl = tmp_path / "sdxl.safetensors"
    sdxl_keys = ("model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.text_model.x")
    save_file({key: torch.zeros(1) for key in sdxl_keys}, sdxl)
    for check in (check_sd3_files, load_sd3_models):
        with pytest.raises(CheckpointError, match="SDXL checkpoint; use sdxl_train_network.py"):
            check(sdxl)


def test_file_without_the_mmdit_lists_what_it_holds(tiny_sd3_checkpoints, tiny_sd3_text_encoder_files, tmp_path):
    stored = load_file(tiny_sd3_checkpoints["sd3-medium"])
    no_mmdit = tmp_path / "text_only.safetensors"
    save_file({k: v for k, v in stored.items() if not k.startswith("model.diffusion_model.")}, no_mmdit)
    with pytest.raises(CheckpointError, match=r"holds no SD3 MMDiT .*found: VAE, CLIP-L, CLIP-G, T5-XXL"):
        check_sd3_files(no_mmdit)
    with pytest.raises(CheckpointError, match="holds no SD3 MMDiT .*found: none of"):
        load_sd3_models(tiny_sd3_text_encoder_files["clip_l"])


def test_missing_files_name_their_flag(tiny_sd3_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="--pretrained_model_name_or_path: file not found"):
        check_sd3_files(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="--clip_g: file not found: .*missing_g.safetensors"):
        load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], clip_g=tmp_path / "missing_g.safetensors")
    with pytest.raises(CheckpointError, match="--vae: .* is a folder"):
        check_sd3_files(tiny_sd3_checkpoints["sd3-medium"], vae=tmp_path)


def test_encoder_file_given_to_the_wrong_flag_is_caught(tiny_sd3_checkpoints, tiny_sd3_text_encoder_files):
    with pytest.raises(CheckpointError, match="pooled width 256 != the MMDiT's 192.*--clip_l"):
        load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], clip_l=tiny_sd3_text_encoder_files["clip_g"])
    with pytest.raises(CheckpointError, match=r"--t5xxl .*clip_l.safetensors: .*T5"):
        load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], t5xxl=tiny_sd3_text_encoder_files["clip_l"])
    with pytest.raises(CheckpointError, match=r"--clip_g .*t5xxl.safetensors: not a CLIP text encoder"):
        load_sd3_models(tiny_sd3_checkpoints["sd3-medium"], clip_g=tiny_sd3_text_encoder_files["t5xxl"])


def test_truncated_mmdit_is_a_checkpoint_error(tiny_sd3_checkpoints, tmp_path):
    stored = load_file(tiny_sd3_checkpoints["sd3-medium"])
    del stored["model.diffusion_model.final_layer.linear.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(stored, broken)
    with pytest.raises(CheckpointError, match=r"broken.safetensors \(MMDiT\): .*final_layer.linear.weight"):
        load_sd3_models(broken)
