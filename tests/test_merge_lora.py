"""networks/merge_lora.py: LoRAs into the tiny checkpoint of every family (the merged model must compute what the
model with the LoRA applied at run time computes), LoRAs for another family, and LoRA + LoRA merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_loras import (
    FAMILIES,
    error_line,
    family_checkpoint,
    load_family,
    lora_deltas,
    outputs,
    random_lora,
    relative_error,
    save_random_lora,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.checkpoint import load_state_dict
from networks import svd_merge_lora
from networks.lora import create_network
from networks.lora_checkpoint_map import map_checkpoint
from networks.lora_svd import factorize
from networks.merge_lora import main, merge_into_checkpoint, merge_lora_files, read_loras, setup_parser

RATIO = 0.7


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


def _lora_file(request, family: str, folder: Path, seed: int = 1, **network_args) -> Path:
    models = load_family(family, family_checkpoint(request, family))
    if network_args:
        network = create_network(1.0, 4, 2.0, None, models.text_encoders, models.denoiser, **network_args)
        network.apply_to(models.text_encoders, models.denoiser)
    else:
        network = random_lora(models, seed)
    path = folder / f"{family}_{seed}.safetensors"
    network.save_weights(str(path), None, {"ss_base_model_version": family, "modelspec.title": f"{family} lora {seed}"})
    return path


# ----------------------------------------------------------------------------- into a checkpoint
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_checkpoint_computes_what_the_runtime_lora_computes(family, request, tmp_path):
    checkpoint = family_checkpoint(request, family)
    lora = tmp_path / "lora.safetensors"
    expected = save_random_lora(load_family(family, checkpoint), lora, RATIO)

    merged = tmp_path / "merged.safetensors"
    # SD3's CLIP-G (fp16) and T5 (fp8) would round the sum back to their storage dtypes; keep it exact here.
    save_dtype = torch.float32 if family == "sd3" else None
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), merged, save_dtype=save_dtype)

    for actual, wanted in zip(outputs(load_family(family, merged)), expected):
        assert relative_error(actual, wanted) < 1e-4
    original, result = load_file(str(checkpoint)), load_file(str(merged))
    assert result.keys() == original.keys()
    if save_dtype is None:
        changed = {key for key in original if not torch.equal(original[key], result[key])}
        lora_map = map_checkpoint({key: value.shape for key, value in original.items()}, str(checkpoint))
        assert changed == {lora_map.slots[name].key for name in lora_deltas(lora)}
        assert all(result[key].dtype == original[key].dtype for key in original)
        assert not any(key.startswith("first_stage_model.") for key in changed)


def test_checkpoint_tensors_keep_their_dtype_by_default(request, tmp_path, caplog):
    """SD3's fp16 CLIP-G and fp8 T5 stay so; a touched tensor is the float32 sum rounded once, and rounding
    into float8 is called out."""
    checkpoint = family_checkpoint(request, "sd3")
    lora = _lora_file(request, "sd3", tmp_path)
    merged = tmp_path / "merged.safetensors"
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), merged)
    fp8_targets = {key for key, value in load_file(str(checkpoint)).items()
                   if value.dtype == torch.float8_e4m3fn and key.endswith("weight") and "t5xxl" in key}
    warnings = [r.getMessage() for r in caplog.records if "float8" in r.getMessage()]
    assert fp8_targets and len(warnings) == 1 and "--save_precision" in warnings[0]
    caplog.clear()
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), tmp_path / "fp16.safetensors", save_dtype=torch.float16)
    assert not [r for r in caplog.records if "float8" in r.getMessage()]
    original, result = load_file(str(checkpoint)), load_file(str(merged))
    assert {key: value.dtype for key, value in result.items()} == {key: value.dtype for key, value in original.items()}
    key = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert original[key].dtype == torch.float16
    delta = lora_deltas(lora, RATIO)["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(result[key], (original[key].double() + delta).half(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_map_names_are_the_names_training_writes(family, request):
    checkpoint = family_checkpoint(request, family)
    models = load_family(family, checkpoint)
    state_dict = load_state_dict(checkpoint)
    lora_map = map_checkpoint({key: value.shape for key, value in state_dict.items()}, str(checkpoint))
    default = create_network(1.0, 4, 4.0, None, models.text_encoders, models.denoiser, conv_dim="2", conv_alpha="2")
    assert lora_map.default_ranks(4, 2) == {lora.lora_name: lora.lora_dim for lora in default._all_loras()}
    everything = random_lora(models, seed=0)
    assert {lora.lora_name for lora in everything._all_loras()} <= lora_map.slots.keys()


def test_openclip_q_k_v_are_rows_of_the_fused_in_proj(request):
    checkpoint = family_checkpoint(request, "sdxl")
    state_dict = load_state_dict(checkpoint)
    slots = map_checkpoint({key: value.shape for key, value in state_dict.items()}, str(checkpoint)).slots
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    width = state_dict[fused].shape[1]
    for index, part in enumerate("qkv"):
        slot = slots[f"lora_te2_text_model_encoder_layers_1_self_attn_{part}_proj"]
        assert (slot.key, slot.rows, slot.shape) == (fused, (index * width, (index + 1) * width), (width, width))
    out = slots["lora_te2_text_model_encoder_layers_1_self_attn_out_proj"]
    assert (out.key, out.rows) == ("conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight", None)


@pytest.mark.parametrize(("lora_family", "checkpoint_family", "named"), [
    ("sd1", "sdxl", "SD1.x/SD2.x"), ("sdxl", "sd3", "SDXL"), ("sd3", "sd1", "SD3/SD3.5"), ("sd1", "sd2", None)])
def test_a_lora_for_another_family_is_a_one_line_error(lora_family, checkpoint_family, named, request, tmp_path):
    lora = _lora_file(request, lora_family, tmp_path, seed=3, conv_dim="2")
    checkpoint = family_checkpoint(request, checkpoint_family)
    with pytest.raises(ValueError) as error:
        merge_into_checkpoint(checkpoint, read_loras([lora], [1.0]), tmp_path / "out.safetensors")
    message = str(error.value)
    assert "\n" not in message and str(lora) in message and str(checkpoint) in message
    assert {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3"}[checkpoint_family] in message
    assert (f"look like a {named} LoRA" in message) if named else "another model family" in message
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- LoRA + LoRA
@pytest.fixture(scope="module")
def two_loras(request, tmp_path_factory) -> tuple[Path, Path]:
    """SD1 LoRAs of different ranks and alphas; only the first has 3x3 conv (and ResNet) modules."""
    folder = tmp_path_factory.mktemp("loras")
    models = load_family("sd1", family_checkpoint(request, "sd1"))
    paths = []
    for seed, (dim, alpha, args) in enumerate([(4, 2.0, {"conv_dim": "2", "conv_alpha": "1"}), (8, 8.0, {})], start=1):
        network = create_network(1.0, dim, alpha, None, models.text_encoders, models.denoiser, **args)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        path = folder / f"lora{seed}.safetensors"
        network.save_weights(str(path), None, {"ss_base_model_version": "sd_v1", "ss_v2": "False",
                                               "modelspec.architecture": "stable-diffusion-v1/lora",
                                               "modelspec.implementation": "diffusers",
                                               "modelspec.resolution": "512x512", "modelspec.title": f"style {seed}"})
        paths.append(path)
    return paths[0], paths[1]


def _expected_sum(paths, ratios) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, ratio in zip(paths, ratios):
        for name, delta in lora_deltas(path, ratio).items():
            total[name] = total.get(name, 0) + delta
    return total


def test_concat_is_the_exact_sum_at_the_summed_rank(two_loras, tmp_path):
    ratios = [0.7, -0.4]
    out = tmp_path / "concat.safetensors"
    main(["--models", *map(str, two_loras), "--ratios", *map(str, ratios), "--save_to", str(out), "--concat"])
    merged, expected = lora_deltas(out), _expected_sum(two_loras, ratios)
    assert merged.keys() == expected.keys()
    for name, delta in expected.items():
        assert relative_error(merged[name], delta) < 1e-5, name
    tensors = load_file(str(out))
    both = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{both}.lora_down.weight"].shape[0] == 4 + 8
    metadata = _metadata(out)
    assert metadata["ss_network_dim"] == "Dynamic"  # 12 where both LoRAs have the module, 4 where only the first
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert metadata["modelspec.merged_from"] == "style 1, style 2"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["sshs_model_hash"]


def test_without_concat_or_new_rank_the_merge_is_the_concat(two_loras, tmp_path):
    default, concat = tmp_path / "default.safetensors", tmp_path / "concat.safetensors"
    main(["--models", *map(str, two_loras), "--save_to", str(default), "--no_metadata"])
    main(["--models", *map(str, two_loras), "--save_to", str(concat), "--no_metadata", "--concat"])
    first, second = load_file(str(default)), load_file(str(concat))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert not any(key.startswith("modelspec.") for key in _metadata(default))
    assert _metadata(default)["ss_network_module"] == "networks.lora"


def test_shuffle_permutes_ranks_without_changing_the_sum(two_loras, tmp_path):
    out = tmp_path / "shuffled.safetensors"
    main(["--models", *map(str, two_loras), "--save_to", str(out), "--shuffle"])
    expected = _expected_sum(two_loras, [1.0, 1.0])
    for name, delta in lora_deltas(out).items():
        assert relative_error(delta, expected[name]) < 1e-5


def test_svd_merge_at_the_summed_rank_is_lossless(two_loras, tmp_path):
    out = tmp_path / "svd.safetensors"
    modules = merge_lora_files(read_loras(two_loras, [0.5, 1.5]), out, new_rank=12, new_conv_rank=2)
    expected = _expected_sum(two_loras, [0.5, 1.5])
    for name, delta in lora_deltas(out).items():
        assert relative_error(delta, expected[name]) < 1e-5, name
    assert max(module.rank for module in modules) <= 12 and all(m.retained_fro > 1 - 1e-6 for m in modules)


def test_svd_merge_at_a_lower_rank_is_the_best_truncation(two_loras, tmp_path):
    out = tmp_path / "svd3.safetensors"
    modules = {m.name: m for m in merge_lora_files(read_loras(two_loras, [1.0, 1.0]), out, new_rank=3, new_conv_rank=1)}
    expected = _expected_sum(two_loras, [1.0, 1.0])
    tensors = load_file(str(out))
    for name, delta in lora_deltas(out).items():
        target = expected[name].float()
        rank = 1 if target.dim() == 4 and target.shape[-1] > 1 else 3
        assert tensors[f"{name}.lora_down.weight"].shape[0] == min(rank, modules[name].rank)
        assert float(tensors[f"{name}.alpha"]) == tensors[f"{name}.lora_down.weight"].shape[0]
        reported = factorize(target, rank)
        kept = float(delta.norm() / target.norm())
        assert kept == pytest.approx(reported.retained_fro, rel=1e-4), name
        assert modules[name].retained_fro == pytest.approx(reported.retained_fro, rel=1e-4)
        # Eckart-Young: the rank-k truncation of the SVD, which is what lora_svd.factorize gives
        truncated = (reported.up.reshape(target.shape[0], -1) @ reported.down.reshape(reported.rank, -1)).reshape(target.shape)
        assert relative_error(delta, truncated * reported.alpha / reported.rank) < 1e-4, name
    assert _metadata(out)["ss_network_dim"] in ("3", "Dynamic")


def _plain_lora(request, family: str, path: Path, seed: int, metadata: dict[str, str] | None = None) -> Path:
    """A random LoRA of `family` with only the metadata given (no ss_base_model_version unless in it)."""
    random_lora(load_family(family, family_checkpoint(request, family)), seed).save_weights(str(path), None, metadata)
    return path


def test_loras_of_two_families_are_refused_naming_both(request, tmp_path, capsys):
    sd1 = _plain_lora(request, "sd1", tmp_path / "sd1.safetensors", seed=1)
    sdxl = _plain_lora(request, "sdxl", tmp_path / "sdxl.safetensors", seed=2)
    out = tmp_path / "mixed.safetensors"
    with pytest.raises(SystemExit):
        main(["--models", str(sd1), str(sdxl), "--save_to", str(out)])
    error = error_line(capsys.readouterr().err)
    assert f"--models {sd1} (SD1.x/SD2.x LoRA) and {sdxl} (SDXL LoRA)" in error and "different model families" in error
    with pytest.raises(SystemExit):  # the --new_rank path too (svd_merge_lora.py)
        main(["--models", str(sdxl), str(sd1), "--save_to", str(out), "--new_rank", "2"])
    assert f"--models {sdxl} (SDXL LoRA) and {sd1} (SD1.x/SD2.x LoRA)" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_loras_whose_metadata_names_different_base_models_are_refused(request, tmp_path):
    """SD1 and SD2 LoRAs have the same module names; their ss_base_model_version tells them apart."""
    sd1 = _plain_lora(request, "sd1", tmp_path / "v1.safetensors", 1, {"ss_base_model_version": "sd_v1"})
    sd2 = _plain_lora(request, "sd1", tmp_path / "v2.safetensors", 2, {"ss_base_model_version": "sd_v2"})
    untold = _plain_lora(request, "sd1", tmp_path / "untold.safetensors", 3)
    with pytest.raises(ValueError) as error:
        merge_lora_files(read_loras([untold, sd1, sd2], [1.0, 1.0, 1.0]), tmp_path / "out.safetensors")
    message = str(error.value)
    assert "\n" not in message
    assert f"--models {sd1} (ss_base_model_version sd_v1) and {sd2} (sd_v2)" in message
    merge_lora_files(read_loras([untold, sd1], [1.0, 1.0]), tmp_path / "ok.safetensors")  # one file is silent
    v_prediction = _plain_lora(request, "sd1", tmp_path / "v2v.safetensors", 4, {"ss_base_model_version": "sd_v2_v"})
    merge_lora_files(read_loras([sd2, v_prediction], [1.0, 1.0]), tmp_path / "v.safetensors")  # same network


def test_a_text_encoder_only_lora_merges_with_a_full_lora_of_its_family(request, tmp_path):
    """lora_te1/te2 names alone could be SDXL or SD3; they agree with an SDXL LoRA."""
    full = _plain_lora(request, "sdxl", tmp_path / "full.safetensors", seed=1)
    text_only = tmp_path / "text.safetensors"
    save_file({key: value for key, value in load_file(str(full)).items() if key.startswith("lora_te")}, str(text_only))
    out = tmp_path / "merged.safetensors"
    merge_lora_files(read_loras([text_only, full], [1.0, 0.5]), out)
    expected = _expected_sum([text_only, full], [1.0, 0.5])
    merged = lora_deltas(out)
    assert merged.keys() == expected.keys()
    for name, delta in expected.items():
        assert relative_error(merged[name], delta) < 1e-5, name


def test_svd_merge_lora_alias_defaults_to_rank_4(two_loras, tmp_path):
    out = tmp_path / "alias.safetensors"
    svd_merge_lora.main(["--models", *map(str, two_loras), "--save_to", str(out)])
    ranks = {tensor.shape[0] for key, tensor in load_file(str(out)).items() if key.endswith("lora_down.weight")}
    assert max(ranks) == 4
    assert svd_merge_lora.setup_parser().parse_args(["--models", "a"]).new_rank == 4
    assert setup_parser().parse_args(["--models", "a"]).new_rank is None


# ----------------------------------------------------------------------------- command line
def test_cli_merges_into_a_checkpoint_with_metadata(request, tmp_path):
    checkpoint = family_checkpoint(request, "sdxl")
    lora = _lora_file(request, "sdxl", tmp_path)
    out = tmp_path / "merged.safetensors"
    main(["--sd_model", str(checkpoint), "--models", str(lora), "--ratios", "0.5", "--save_to", str(out), "--sdxl"])
    metadata = _metadata(out)
    assert metadata["modelspec.merged_from"] == f"{checkpoint.stem}, sdxl lora 1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.title"] == "merged"
    original, merged = load_file(str(checkpoint)), load_file(str(out))
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    delta = lora_deltas(lora, 0.5)["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"]
    torch.testing.assert_close(merged[key].double(), original[key].double() + delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("argv", "message"), [
    (["--ratios", "1", "2"], "--ratios: 2 values for 1 --models"),
    (["--models", "a", "b", "--ratios", "1"], "--ratios: 1 value for 2 --models"),
    (["--save_to", "o.txt"], "--save_to o.txt: must end in .safetensors, .ckpt or .pt"),
    (["--new_rank", "4", "--concat"], "choose one"),
    (["--lbws", "[1,1]"], "--lbws"),
    (["--new_conv_rank", "2"], "--new_conv_rank needs --new_rank"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", str(tmp_path / "a.safetensors"), "--save_to", str(tmp_path / "o.safetensors"), *argv])
    assert exit_info.value.code == 1
    error = error_line(capsys.readouterr().err)
    assert message in error


def test_missing_lora_file_names_the_flag(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit):
        main(["--models", str(missing), "--save_to", str(tmp_path / "o.safetensors")])
    assert f"--models {missing}" in error_line(capsys.readouterr().err)


def test_help_describes_every_flag_in_groups():
    parser = setup_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--sd_model", "--models", "--ratios", "--save_to", "--save_precision", "--precision", "--device",
            "--no_metadata", "--concat", "--shuffle", "--new_rank", "--new_conv_rank", "--v2", "--sdxl"} <= flags
    assert all(action.help for action in parser._actions)
    titles = {group.title for group in parser._action_groups}
    assert {"inputs", "output", "computation"} <= titles


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merging_on_cuda_gives_the_cpu_result(request, two_loras, tmp_path):
    checkpoint = family_checkpoint(request, "sdxl")
    lora = _lora_file(request, "sdxl", tmp_path)
    on_cpu, on_cuda = tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors"
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), on_cpu)
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), on_cuda, device="cuda")
    expected, actual = load_file(str(on_cpu)), load_file(str(on_cuda))
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=1e-4, atol=1e-5)
    svd_cpu, svd_cuda = tmp_path / "svd_cpu.safetensors", tmp_path / "svd_cuda.safetensors"
    merge_lora_files(read_loras(two_loras, [1.0, 0.5]), svd_cpu, new_rank=6)
    merge_lora_files(read_loras(two_loras, [1.0, 0.5]), svd_cuda, new_rank=6, device="cuda")
    cpu_deltas = lora_deltas(svd_cpu)
    for name, delta in lora_deltas(svd_cuda).items():
        assert relative_error(delta, cpu_deltas[name]) < 1e-4, name
