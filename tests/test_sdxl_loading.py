"""Loading SDXL: the single file (OpenCLIP bigG mapped into transformers), diffusers folders, --vae, dtypes,
the early family check and its one-line errors, and the tiny fixture itself.

Oracle: diffusers' own single-file converters (create_diffusers_clip_model_from_ldm for both text encoders,
convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint for the folder), fed configs from disk only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers_oracle import (
    SDXL_BASE_UNET_CONFIG,
    diffusers_sdxl_text_encoder,
    diffusers_vae_config,
    write_sdxl_diffusers_folder,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.fixtures.tiny_sd import write_tiny_sd_checkpoint
from library.fixtures.tiny_sdxl import (
    TINY_CLIP_G_PROJECTION,
    tiny_sdxl_unet_config,
    write_tiny_sdxl_checkpoint,
)
from library.models.checkpoint import CheckpointError, strip_prefix
from library.models.sd_unet import SDXL_UNET_CONFIG, SdxlUNet
from library.models.sdxl_conditioning import sdxl_size_embedding
from library.models.sdxl_loading import (
    SdxlModels,
    bigg_to_hf_text_state_dict,
    check_sdxl_checkpoint,
    load_sdxl_models,
    sdxl_unet_config_from_diffusers,
)
from library.models.text_encoders import (
    canonical_hf_text_state_dict,
    hf_text_state_dict,
)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def checkpoint(tiny_sdxl_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_sdxl_checkpoint)


@pytest.fixture(scope="module")
def models(tiny_sdxl_checkpoint: Path) -> SdxlModels:
    return load_sdxl_models(tiny_sdxl_checkpoint)


@pytest.fixture(scope="module")
def diffusers_encoders(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers_text_configs")
    clip_l = diffusers_sdxl_text_encoder(CLIPTextModel, checkpoint, "clip_l", folder / "l")
    clip_g = diffusers_sdxl_text_encoder(CLIPTextModelWithProjection, checkpoint, "clip_g", folder / "g")
    return clip_l, clip_g


def assert_module_holds(module: torch.nn.Module, expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    """The module's weights equal ``expected`` (CLIP text models compared in the canonical layout)."""
    is_clip = isinstance(module, (CLIPTextModel, CLIPTextModelWithProjection))
    actual = hf_text_state_dict(module) if is_clip else module.state_dict()
    if is_clip:
        expected = canonical_hf_text_state_dict(expected)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == dtype and torch.equal(actual[key], value.to(dtype)), key


# ---- the single file --------------------------------------------------------------------------------------------


def test_single_file_loads_every_unet_and_vae_tensor(checkpoint, models):
    assert isinstance(models.unet, SdxlUNet)
    assert models.unet_config == tiny_sdxl_unet_config()
    assert_module_holds(models.unet, strip_prefix(checkpoint, UNET))
    assert_module_holds(models.vae, strip_prefix(checkpoint, VAE))


def test_text_encoders_hold_the_weights_diffusers_converts(models, diffusers_encoders):
    clip_l, clip_g = diffusers_encoders
    assert_module_holds(models.text_encoder_l, hf_text_state_dict(clip_l))
    assert_module_holds(models.text_encoder_g, hf_text_state_dict(clip_g))
    assert models.text_encoder_g.config.num_hidden_layers == 3  # bigG keeps every layer, unlike SD2's ViT-H
    assert models.text_encoder_g.config.projection_dim == TINY_CLIP_G_PROJECTION
    assert (models.text_encoder_l.config.hidden_act, models.text_encoder_g.config.hidden_act) == ("quick_gelu", "gelu")


def test_text_encoder_outputs_equal_diffusers(models, diffusers_encoders):
    clip_l, clip_g = diffusers_encoders
    vocab = models.text_encoder_g.config.vocab_size
    ids = torch.tensor([[vocab - 2, 320, 515, 516, vocab - 1] + [0] * 72, [vocab - 2, 7, vocab - 1] + [0] * 74])
    with torch.no_grad():
        ours_l = models.text_encoder_l(ids, output_hidden_states=True)
        theirs_l = clip_l(ids, output_hidden_states=True)
        ours_g = models.text_encoder_g(ids, output_hidden_states=True)
        theirs_g = clip_g(ids, output_hidden_states=True)
    for ours, theirs in ((ours_l, theirs_l), (ours_g, theirs_g)):
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
        for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    torch.testing.assert_close(ours_g.text_embeds, theirs_g.text_embeds, rtol=0, atol=0)
    assert ours_g.text_embeds.shape == (2, TINY_CLIP_G_PROJECTION)


def test_fp16_file_loads_in_the_requested_dtype_with_and_without_mmap(tmp_path, checkpoint):
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in checkpoint.items()}, path)
    as_fp32 = load_sdxl_models(path, dtype=torch.float32, mmap=True)
    assert_module_holds(as_fp32.unet, {k: v.half() for k, v in strip_prefix(checkpoint, UNET).items()})
    as_bf16 = load_sdxl_models(path, dtype=torch.bfloat16, mmap=False)
    parts = (as_bf16.unet, as_bf16.vae, as_bf16.text_encoder_l, as_bf16.text_encoder_g)
    assert {p.dtype for part in parts for p in part.parameters()} == {torch.bfloat16}
    assert_module_holds(as_bf16.text_encoder_l, as_fp32.text_encoder_l.state_dict(), dtype=torch.bfloat16)


def test_ckpt_file_loads_like_safetensors(tmp_path, checkpoint, models):
    torch.save({"state_dict": checkpoint, "global_step": 3}, tmp_path / "tiny.ckpt")
    check_sdxl_checkpoint(tmp_path / "tiny.ckpt")  # keys of a pickle are only known on loading
    loaded = load_sdxl_models(tmp_path / "tiny.ckpt")
    assert_module_holds(loaded.text_encoder_g, models.text_encoder_g.state_dict())
    assert_module_holds(loaded.unet, models.unet.state_dict())


def test_bigg_variants_found_in_the_wild(checkpoint):
    openclip = strip_prefix(checkpoint, CLIP_G)
    expected = bigg_to_hf_text_state_dict(openclip)
    projection = openclip.pop("text_projection")
    variant = {
        **openclip,
        "transformer.text_model.embeddings.position_ids": torch.arange(77)[None],  # ComfyUI writes this
        "text_projection.weight": projection.T.contiguous(),  # Playground v2: already a Linear weight
    }
    converted = bigg_to_hf_text_state_dict(variant)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[key], expected[key]) for key in expected)
    assert expected["text_projection.weight"].shape == (TINY_CLIP_G_PROJECTION, projection.shape[0])


# ---- --vae ------------------------------------------------------------------------------------------------------


def test_vae_override_replaces_the_checkpoint_vae(tmp_path, tiny_sdxl_checkpoint, checkpoint):
    other = {key: -value for key, value in strip_prefix(checkpoint, VAE).items()}
    diffusers_layout = convert_ldm_vae_checkpoint({VAE + k: v for k, v in other.items()}, diffusers_vae_config())
    save_file(diffusers_layout, tmp_path / "vae.safetensors")
    loaded = load_sdxl_models(tiny_sdxl_checkpoint, vae_path=tmp_path / "vae.safetensors")
    assert_module_holds(loaded.vae, other)


def test_file_without_vae_needs_vae_flag(tmp_path, checkpoint, models):
    save_file({k: v for k, v in checkpoint.items() if not k.startswith(VAE)}, tmp_path / "no_vae.safetensors")
    save_file({VAE + k: v for k, v in models.vae.state_dict().items()}, tmp_path / "vae.safetensors")
    for call in (check_sdxl_checkpoint, load_sdxl_models):
        with pytest.raises(CheckpointError, match=r"no_vae.safetensors has no VAE weights .*; pass --vae"):
            call(tmp_path / "no_vae.safetensors")
    check_sdxl_checkpoint(tmp_path / "no_vae.safetensors", vae_path=tmp_path / "vae.safetensors")
    loaded = load_sdxl_models(tmp_path / "no_vae.safetensors", vae_path=tmp_path / "vae.safetensors")
    assert_module_holds(loaded.vae, models.vae.state_dict())


# ---- bad input ----------------------------------------------------------------------------------------------------


def one_line_error(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def write_keys(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(1) for key in keys}, path)
    return path


@pytest.mark.parametrize(
    ("keys", "advice"),
    [
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "is an SD1.x checkpoint; use train_net"),
        (["cond_stage_model.model.ln_final.weight"], r"is an SD2.x checkpoint; use train_network.py --v2"),
        ([UNET + "joint_blocks.0.x_block.attn.qkv.weight"], "is an SD3 checkpoint; use sd3_train_network.py"),
        (["conditioner.embedders.0.model.ln_final.weight", UNET + "out.2.weight"], "is the SDXL refiner"),
        (["lora_unet_x.lora_down.weight"], "not a recognised SD1/SD2/SDXL/SD3 checkpoint"),
    ],
)
def test_early_check_names_the_family_and_the_script(tmp_path, keys, advice):
    path = write_keys(tmp_path / "other.safetensors", keys)
    message = one_line_error(check_sdxl_checkpoint, path, match=advice)
    assert str(path) in message
    one_line_error(load_sdxl_models, path, match=advice)


def test_real_sd1_file_is_refused_before_loading(tmp_path):
    path = write_tiny_sd_checkpoint(tmp_path / "sd1.safetensors")
    one_line_error(check_sdxl_checkpoint, path, match="sd1.safetensors is an SD1.x checkpoint; use train_network.py")


def test_missing_files_are_named(tmp_path, tiny_sdxl_checkpoint):
    one_line_error(check_sdxl_checkpoint, tmp_path / "gone.safetensors", match="model not found: .*gone.safetensors")
    one_line_error(load_sdxl_models, tmp_path / "gone.safetensors", match="model not found")
    one_line_error(
        check_sdxl_checkpoint, tiny_sdxl_checkpoint, vae_path=tmp_path / "v.safetensors", match="--vae file not found"
    )


def test_missing_text_encoder_is_named(tmp_path, checkpoint):
    path = tmp_path / "no_clip_l.safetensors"
    save_file({k: v for k, v in checkpoint.items() if not k.startswith(CLIP_L)}, path)
    one_line_error(check_sdxl_checkpoint, path, match=r"has no CLIP-L text encoder weights \(conditioner.embedders.0")


def test_unet_without_label_emb_is_not_sdxl(tmp_path, checkpoint):
    path = tmp_path / "no_label_emb.safetensors"
    save_file({k: v for k, v in checkpoint.items() if not k.startswith(UNET + "label_emb.")}, path)
    one_line_error(load_sdxl_models, path, match="no_label_emb.safetensors: .*no label_emb")


def test_text_encoders_that_do_not_fit_the_unet_are_named(tmp_path, checkpoint):
    path = tmp_path / "narrow_pool.safetensors"
    narrowed = dict(checkpoint)
    narrowed[CLIP_G + "text_projection"] = checkpoint[CLIP_G + "text_projection"][:, :64].contiguous()
    save_file(narrowed, path)
    one_line_error(load_sdxl_models, path, match="do not fit the U-Net: bigG pooled width .* 1600 != .* 1632")


def test_broken_unet_is_named_with_the_file(tmp_path, checkpoint):
    path = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in checkpoint.items() if not k.startswith(UNET + "out.")}, path)
    one_line_error(load_sdxl_models, path, match="broken.safetensors.*'out.2.weight'")


# ---- diffusers folders ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(checkpoint, tmp_path_factory) -> tuple[Path, UNet2DConditionModel]:
    folder = tmp_path_factory.mktemp("sdxl_diffusers")
    return folder, write_sdxl_diffusers_folder(checkpoint, folder)


def test_diffusers_folder_loads_the_same_models_as_the_single_file(diffusers_folder, models):
    folder, _ = diffusers_folder
    check_sdxl_checkpoint(folder)
    loaded = load_sdxl_models(folder)
    assert loaded.unet_config == models.unet_config
    for part in ("unet", "vae", "text_encoder_l", "text_encoder_g"):
        assert_module_holds(getattr(loaded, part), getattr(models, part).state_dict())
    assert loaded.text_encoder_g.config.hidden_act == "gelu"


def test_tiny_unet_predicts_what_diffusers_predicts_with_size_conditioning(diffusers_folder, models):
    """The fixture is a valid SDXL model for diffusers, so LoRA and pipeline tests can use it as their oracle."""
    _, diffusers_unet = diffusers_folder
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 12, generator=generator)
    timesteps = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, models.unet_config.context_dim, generator=generator)
    pooled = torch.randn(2, TINY_CLIP_G_PROJECTION, generator=generator)
    original, crop, target = torch.tensor([[512, 768], [640, 640]]), torch.tensor([[0, 32], [16, 0]]), [64, 96]
    time_ids = torch.cat([original, crop, torch.tensor([target, target])], dim=1).float()
    with torch.no_grad():
        ours = models.unet(latents, timesteps, context, y=sdxl_size_embedding(pooled, original, crop, target))
        theirs = diffusers_unet(
            latents, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    assert (ours - theirs).norm() / theirs.norm() < 1e-4


def test_released_sdxl_unet_json_maps_to_the_sdxl_config():
    assert sdxl_unet_config_from_diffusers(SDXL_BASE_UNET_CONFIG) == SDXL_UNET_CONFIG
    sd15 = {**SDXL_BASE_UNET_CONFIG, "addition_embed_type": None}
    one_line_error(sdxl_unet_config_from_diffusers, sd15, match="addition_embed_type None, not SDXL's 'text_time'")
    uneven = {**SDXL_BASE_UNET_CONFIG, "attention_head_dim": [5, 10, 10]}
    one_line_error(sdxl_unet_config_from_diffusers, uneven, match="no constant head width")


def test_diffusers_folder_of_another_family_or_incomplete(tmp_path):
    (tmp_path / "sd1" / "unet").mkdir(parents=True)
    one_line_error(check_sdxl_checkpoint, tmp_path / "sd1", match="SD1.x/SD2.x diffusers folder .*use train_network.py")
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    one_line_error(load_sdxl_models, tmp_path / "sd3", match="SD3 diffusers folder; use sd3_train_network.py")
    for part in ("unet", "text_encoder_2"):
        (tmp_path / "half" / part).mkdir(parents=True)
        (tmp_path / "half" / part / "config.json").write_text(json.dumps({}))
    one_line_error(load_sdxl_models, tmp_path / "half", match="missing vae/config.json, text_encoder/config.json")


# ---- the fixture itself ---------------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_seeded_in_the_real_layout_without_zero_layers(tmp_path, checkpoint):
    again = load_file(write_tiny_sdxl_checkpoint(tmp_path / "again.safetensors", seed=0))
    assert again.keys() == checkpoint.keys() and all(torch.equal(again[k], checkpoint[k]) for k in checkpoint)
    # The layout SDXL files have: OpenCLIP bigG with fused q/k/v and an (width, projection) matrix, HF CLIP-L.
    assert checkpoint[CLIP_G + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 128, 128)
    assert checkpoint[CLIP_G + "text_projection"].shape == (128, TINY_CLIP_G_PROJECTION)
    assert CLIP_L + "text_model.encoder.layers.2.mlp.fc2.weight" in checkpoint
    assert checkpoint[UNET + "label_emb.0.0.weight"].shape[1] == TINY_CLIP_G_PROJECTION + 6 * 256
    assert not any(key.startswith(UNET + "input_blocks.1.1.") for key in checkpoint)  # no attention at level 0
    # sgm zero-initialises these; random values make a wrong mapping visible in the outputs.
    for key in (UNET + "out.2.weight", UNET + "input_blocks.3.1.proj_out.weight", VAE + "decoder.conv_out.weight"):
        assert checkpoint[key].std() > 0.01, key
