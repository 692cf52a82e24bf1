"""networks/extract_lora_from_models.py: a LoRA extracted from base and (base + LoRA) merges back into the tuned
model, for every family; the text-encoder rule, identical models and mismatched families."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from family_loras import FAMILIES, error_line, family_checkpoint, load_family, lora_deltas, outputs, relative_error
from safetensors import safe_open
from safetensors.torch import load_file

from networks import extract_lora_from_models
from networks.extract_lora_from_models import ExtractConfig, extract, main
from networks.lora import create_network, create_network_from_weights
from networks.merge_lora import merge_into_checkpoint, read_loras

RANK = 4
ARCHITECTURES = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                 "sdxl": "stable-diffusion-xl-v1-base/lora", "sd3": "stable-diffusion-3-5-medium/lora"}
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0", "sd3": "5-medium"}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


def _tuned(request, family: str, folder: Path) -> tuple[Path, Path, Path]:
    """(base checkpoint, the LoRA, base + LoRA written as float32): a LoRA over the default targets and the 3x3
    convs, with changes large enough that every text encoder passes --min_diff."""
    base = family_checkpoint(request, family)
    models = load_family(family, base)
    network = create_network(1.0, RANK, 2.0, None, models.text_encoders, models.denoiser, conv_dim="2", conv_alpha="2")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    lora = folder / "lora.safetensors"
    network.save_weights(str(lora), None, None)
    tuned = folder / "tuned.safetensors"
    merge_into_checkpoint(base, read_loras([lora], [1.0]), tuned, save_dtype=torch.float32)
    return base, lora, tuned


@pytest.mark.parametrize("family", FAMILIES)
def test_extracted_lora_merges_back_into_the_tuned_model(family, request, tmp_path):
    base, lora, tuned = _tuned(request, family, tmp_path)
    extracted = tmp_path / "extracted.safetensors"
    config = ExtractConfig(model_org=base, model_tuned=tuned, save_to=extracted, dim=RANK, conv_dim=2, clamp_quantile=1.0)
    extract(config)

    truth, found = lora_deltas(lora), lora_deltas(extracted)
    assert found.keys() == truth.keys()  # the names training wrote
    for name, delta in found.items():
        assert relative_error(delta, truth[name]) < 1e-4, name
    remerged = tmp_path / "remerged.safetensors"
    merge_into_checkpoint(base, read_loras([extracted], [1.0]), remerged, save_dtype=torch.float32)
    for actual, expected in zip(outputs(load_family(family, remerged)), outputs(load_family(family, tuned))):
        assert relative_error(actual, expected) < 1e-4

    models = load_family(family, base)
    network, _ = create_network_from_weights(1.0, str(extracted), None, models.text_encoders, models.denoiser)
    info = network.load_weights(str(extracted))
    assert not info.missing_keys and not info.unexpected_keys
    metadata = _metadata(extracted)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == str(RANK)
    assert metadata["ss_network_alpha"] == str(float(RANK))
    assert metadata["ss_base_model_version"] == BASE_VERSIONS[family]
    assert metadata["modelspec.architecture"] == ARCHITECTURES[family]
    assert metadata["ss_v2"] == str(family == "sd2") and metadata["sshs_model_hash"]


@pytest.fixture(scope="module")
def sd1_pair(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    return _tuned(request, "sd1", tmp_path_factory.mktemp("sd1_pair"))


def test_default_clamping_changes_the_extracted_change_little(sd1_pair, tmp_path):
    base, lora, tuned = sd1_pair
    extracted = tmp_path / "clamped.safetensors"
    extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=extracted, dim=RANK, conv_dim=2))
    truth, clamped = lora_deltas(lora), lora_deltas(extracted)
    errors = sorted(relative_error(clamped[name], truth[name]) for name in truth)
    # sd-scripts' 0.99 rule clips about 1% of the factors' values at each end: on these tiny layers (a few hundred
    # entries per factor) that costs about a tenth of a module's change (real layers, with far more entries, lose less).
    assert 0 < errors[len(errors) // 2] < 0.2


def test_text_encoders_below_min_diff_are_left_out(sd1_pair, tmp_path):
    base, lora, tuned = sd1_pair
    deltas = lora_deltas(lora)
    names = set(deltas)
    largest_text_change = max(float(delta.abs().max()) for name, delta in deltas.items() if name.startswith("lora_te_"))
    out = tmp_path / "unet_only.safetensors"
    modules = extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=out, dim=RANK,
                                    min_diff=largest_text_change * 1.01))
    assert {module.name for module in modules} == {name for name in names if name.startswith("lora_unet_")
                                                     and "resnets" not in name and "samplers" not in name}
    assert json.loads(_metadata(out)["ss_network_args"]) == {}  # no --conv_dim, no conv modules
    modules = extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=out, dim=2, conv_dim=1,
                                    min_diff=largest_text_change * 0.99))
    assert {module.name for module in modules} == names
    assert {module.rank for module in modules} == {1, 2}


def test_each_difference_is_computed_once(sd1_pair, tmp_path, monkeypatch):
    base, lora, tuned = sd1_pair
    computed = Counter()
    difference = extract_lora_from_models._difference

    def counting(pair, name, *args):
        computed[name] += 1
        return difference(pair, name, *args)

    monkeypatch.setattr(extract_lora_from_models, "_difference", counting)
    modules = extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=tmp_path / "once.safetensors", dim=RANK,
                                    conv_dim=2))
    assert set(computed) == {module.name for module in modules} == set(lora_deltas(lora))
    assert set(computed.values()) == {1}


def test_the_log_counts_the_modules_extracted_not_the_stand_in_network(sd1_pair, tmp_path, caplog):
    """The text encoder is left out here; the networks.lora line of the map's stand-in network counted it."""
    base, lora, tuned = sd1_pair
    largest_text_change = max(float(delta.abs().max()) for name, delta in lora_deltas(lora).items()
                              if name.startswith("lora_te_"))
    level = logging.getLogger("networks.lora").level
    with caplog.at_level(logging.INFO):
        modules = extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=tmp_path / "unet.safetensors",
                                        dim=RANK, min_diff=largest_text_change * 1.01))
    assert not [record for record in caplog.records if record.name == "networks.lora"]
    assert logging.getLogger("networks.lora").level == level
    assert f"extracted 0 text-encoder modules, {len(modules)} U-Net modules;" in caplog.text


def test_identical_checkpoints_have_nothing_to_extract(request, tmp_path, capsys):
    base = family_checkpoint(request, "sdxl")
    out = tmp_path / "none.safetensors"
    with pytest.raises(SystemExit):
        main(["--model_org", str(base), "--model_tuned", str(base), "--save_to", str(out)])
    error = error_line(capsys.readouterr().err)
    assert "no differences to extract" in error and "--min_diff 0.01" in error
    assert not out.exists()


def test_checkpoints_of_two_families_are_refused_naming_both(request, tmp_path, capsys):
    sd1, sdxl = family_checkpoint(request, "sd1"), family_checkpoint(request, "sdxl")
    with pytest.raises(SystemExit):
        main(["--model_org", str(sd1), "--model_tuned", str(sdxl), "--save_to", str(tmp_path / "x.safetensors")])
    error = error_line(capsys.readouterr().err)
    assert f"--model_org {sd1}" in error and f"--model_tuned {sdxl}" in error
    assert "SD1.x" in error and "SDXL" in error


def test_cli_writes_the_lora_with_compatibility_hints(sd1_pair, tmp_path, caplog):
    base, _, tuned = sd1_pair
    out = tmp_path / "cli.safetensors"
    main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "3", "--v2",
          "--save_precision", "fp16", "--no_metadata"])
    tensors = load_file(str(out))
    assert {tensor.dtype for key, tensor in tensors.items() if key.endswith("weight")} == {torch.float16}
    assert {tensor.shape[0] for key, tensor in tensors.items() if key.endswith("lora_down.weight")} == {3}
    metadata = _metadata(out)
    assert metadata["ss_network_dim"] == "3" and not any(key.startswith("modelspec.") for key in metadata)
    assert "--v2: ignored" in caplog.text


@pytest.mark.parametrize(("argv", "message"), [
    (["--dim", "0"], "--dim / --conv_dim"), (["--clamp_quantile", "1.5"], "--clamp_quantile 1.5"),
    (["--save_to", "out.txt"], "--save_to out.txt")])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model_org", "a.safetensors", "--model_tuned", "b.safetensors", "--save_to", "o.safetensors", *argv])
    error = error_line(capsys.readouterr().err)
    assert message in error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extracting_on_cuda_gives_the_cpu_result(sd1_pair, tmp_path):
    base, _, tuned = sd1_pair
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        extract(ExtractConfig(model_org=base, model_tuned=tuned, save_to=out, dim=RANK, conv_dim=2, clamp_quantile=1.0,
                              device=device, org_device=device, tuned_device=device))
        results[device] = lora_deltas(out)
    for name, delta in results["cuda"].items():
        assert relative_error(delta, results["cpu"][name]) < 1e-4, name
