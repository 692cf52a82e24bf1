"""--network_weights files that cannot be used: another family, another rank, an empty or unreadable file. Each is
one line on stderr naming the file and what is wrong, through train_network.main as a user runs it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import base_argv, make_dataset

import train_network
from networks.lora_family import lora_file_family


@pytest.fixture
def argv(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data")

    def build(*extra: str, output: str = "out") -> list[str]:
        return base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / output, "--max_train_steps=1", *extra)

    return build


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err.strip().splitlines()[-1]


def _lora_file(path, modules: dict[str, tuple[int, int]], metadata: dict[str, str] | None = None):
    """A LoRA file with these modules (name -> (rank, in features); out features 8)."""
    tensors = {}
    for name, (rank, features) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(rank, features)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata=metadata)
    return path


SDXL_MODULES = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (4, 64),
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, 32)}


@pytest.mark.parametrize("dim_from_weights", [False, True])
def test_a_file_of_another_family_names_both_families(argv, tmp_path, capsys, dim_from_weights):
    path = _lora_file(tmp_path / "sdxl_lora.safetensors", SDXL_MODULES,
                      {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    extra = ["--dim_from_weights"] if dim_from_weights else []
    line = _error_line(capsys, argv(f"--network_weights={path}", *extra))
    assert line.endswith(f"{path} is a LoRA for SDXL (per modelspec.architecture stable-diffusion-xl-v1-base/lora), but "
                         "this run trains SD1.x/SD2.x: none of its 1 denoiser modules match "
                         "(first: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q)")


def test_a_file_without_metadata_is_placed_by_its_module_names(argv, tmp_path, capsys):
    path = _lora_file(tmp_path / "sd3.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4, 64),
                                                     "lora_unet_joint_blocks_0_x_block_mlp_fc1": (4, 64)})
    line = _error_line(capsys, argv(f"--network_weights={path}"))
    assert "is a LoRA for SD3/SD3.5 (per its module names), but this run trains SD1.x/SD2.x: none of its 2 denoiser" in line


def test_same_names_with_other_shapes_is_another_model(argv, tmp_path, capsys):
    """SD1 and SD2 LoRAs share module names; the shapes tell them apart (SD2's cross-attention reads 1024 features)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = _lora_file(tmp_path / "sd2.safetensors", {name: (4, 1024)}, {"ss_base_model_version": "sd_v2"})
    line = _error_line(capsys, argv(f"--network_weights={path}"))
    assert f"{name}.lora_down.weight has shape [4, 1024] in the file, but this model's layer needs [4, 64]" in line
    assert line.endswith("the file is for SD2.x (per ss_base_model_version sd_v2)")


def test_a_file_of_another_rank_names_the_module_and_suggests_dim_from_weights(argv, tmp_path, capsys):
    train_network.main(argv("--network_dim=8", "--network_alpha=8", output="first"))
    path = tmp_path / "first" / "lora.safetensors"
    line = _error_line(capsys, argv(f"--network_weights={path}", "--network_dim=4"))
    assert f"{path}: module lora_te_text_model_encoder_layers_0_mlp_fc1 has rank 8 in the file but rank 4 in the network" in line
    assert "more modules); add --dim_from_weights to take each module's rank from the file" in line
    # What the message suggests works.
    train_network.main(argv(f"--network_weights={path}", "--network_dim=4", "--dim_from_weights", output="second"))
    assert (tmp_path / "second" / "lora.safetensors").is_file()


@pytest.mark.parametrize("name, content, message", [
    ("empty.safetensors", b"", "the file is empty (0 bytes)"),
    ("empty.pt", b"", "the file is empty (0 bytes)"),
    ("notes.safetensors", b"not a tensor file at all", "not a readable safetensors file"),
])
def test_empty_or_unreadable_files_are_refused_before_any_model_loads(argv, tmp_path, capsys, no_model_loading,
                                                                       name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    line = _error_line(capsys, argv(f"--network_weights={path}"))
    assert f"--network_weights {path}: {message}" in line


def test_a_torch_file_that_is_no_state_dict_is_one_line(argv, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"this is not a pickle")
    line = _error_line(capsys, argv(f"--network_weights={path}"))
    assert f"{path}: not a state dict torch.load can read" in line


@pytest.mark.parametrize("metadata, names, family", [
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, [], ("SD1.x", "modelspec.architecture stable-diffusion-v1/lora")),
    ({"modelspec.architecture": "lumina-2/lora"}, [], ("lumina-2", "modelspec.architecture lumina-2/lora")),
    ({"ss_base_model_version": "sd_v2_v"}, [], ("SD2.x", "ss_base_model_version sd_v2_v")),
    ({"ss_base_model_version": "5-large"}, [], ("SD3/SD3.5", "ss_base_model_version 5-large")),
    ({}, ["lora_unet_double_blocks_0_img_attn_qkv"], ("FLUX.1", "its module names")),
    ({}, ["lora_te1_text_model_encoder_layers_0_mlp_fc1"], ("SDXL or SD3", "its module names")),
    ({}, ["unet.down_blocks.0.lora_A"], None),
])
def test_file_family_from_metadata_then_names(metadata, names, family):
    assert lora_file_family(metadata, names) == family
