"""networks/merge_lora.py with SD3.5's separate text-encoder files (--clip_l / --clip_g / --t5xxl): an SD3.5 file
holds only the MMDiT and the VAE, so a LoRA's lora_te1/2/3 modules are merged into those files, written next to
--save_to in their own layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_loras import FamilyModels, error_line, lora_deltas, outputs, relative_error, save_random_lora
from safetensors.torch import load_file, save_file

from library.fixtures.tiny_sd3 import write_tiny_sd3_checkpoint
from library.models.sd3_loading import load_sd3_models
from networks.merge_lora import main, merge_into_checkpoint, read_loras, text_encoder_output

RATIO = 0.7
NAMES = ("clip_l", "clip_g", "t5xxl")
LORA_PREFIXES = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
# single-file key (what the map names) -> the key in each test file's layout
IN_FILE = {
    "clip_l": lambda key: key.removeprefix("text_encoders.clip_l.transformer."),
    "clip_g": lambda key: "transformer." + key.removeprefix("text_encoders.clip_g.transformer."),
    "t5xxl": lambda key: key,
}


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    """An SD3.5 Medium file as released: MMDiT and VAE, no text encoders."""
    folder = tmp_path_factory.mktemp("sd35")
    return write_tiny_sd3_checkpoint(folder / "sd3.5.safetensors", variant="sd3.5-medium", include_text_encoders=False)


@pytest.fixture(scope="module")
def encoder_files(tiny_sd3_text_encoder_files, tmp_path_factory) -> dict[str, Path]:
    """The three layouts the loader takes: CLIP-L bare HF keys (no text_model.), CLIP-G under transformer. (fp16),
    T5 (fp8) under the single-file prefix text_encoders.t5xxl.transformer."""
    files = dict(tiny_sd3_text_encoder_files)
    t5 = tmp_path_factory.mktemp("t5") / "t5xxl_prefixed.safetensors"
    save_file({f"text_encoders.t5xxl.transformer.{key}": value for key, value in load_file(str(files["t5xxl"])).items()},
              str(t5))
    files["t5xxl"] = t5
    return files


def _models(checkpoint: Path, files: dict[str, Path]) -> FamilyModels:
    models = load_sd3_models(checkpoint, **{name: files[name] for name in NAMES})
    return FamilyModels([models.text.clip_l, models.text.clip_g, models.text.t5xxl], models.mmdit, "sd3")


@pytest.fixture(scope="module")
def lora_and_expected(sd35, encoder_files, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """A random LoRA over MMDiT, embedders, CLIP-L, CLIP-G and T5 (train_t5xxl), and the outputs of the models with
    it applied at run time at RATIO."""
    path = tmp_path_factory.mktemp("sd3_lora") / "lora.safetensors"
    expected = save_random_lora(_models(sd35, encoder_files), path, RATIO)
    assert {prefix for prefix in LORA_PREFIXES.values() if any(name.startswith(prefix) for name in lora_deltas(path))} \
        == set(LORA_PREFIXES.values())
    return path, expected


def _encoder_flags(files: dict[str, Path], names=NAMES) -> list[str]:
    return [argument for name in names for argument in (f"--{name}", str(files[name]))]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor  # float8 has no torch.equal


def test_merged_checkpoint_and_encoder_files_compute_what_the_runtime_lora_computes(sd35, encoder_files,
                                                                                      lora_and_expected, tmp_path):
    lora, expected = lora_and_expected
    merged = tmp_path / "merged.safetensors"
    # float32: CLIP-G (fp16) and T5 (fp8) would round the sums back to their storage dtypes
    main(["--sd_model", str(sd35), "--models", str(lora), "--ratios", str(RATIO), "--save_to", str(merged),
          "--save_precision", "float", *_encoder_flags(encoder_files)])
    outputs_files = {name: text_encoder_output(merged, name) for name in NAMES}
    assert outputs_files == {name: tmp_path / f"merged_{name}.safetensors" for name in NAMES}
    for actual, wanted in zip(outputs(_models(merged, outputs_files)), expected):
        assert relative_error(actual, wanted) < 1e-4


def test_encoder_files_keep_their_keys_dtypes_and_untouched_tensors(sd35, encoder_files, lora_and_expected, tmp_path):
    lora, _ = lora_and_expected
    merged = tmp_path / "merged.safetensors"
    lora_map = merge_into_checkpoint(sd35, read_loras([lora], [RATIO]), merged, text_encoder_files=encoder_files)
    deltas = lora_deltas(lora, RATIO)
    for name in NAMES:
        original, result = load_file(str(encoder_files[name])), load_file(str(text_encoder_output(merged, name)))
        assert result.keys() == original.keys()
        assert all(result[key].dtype == original[key].dtype for key in original)
        changed = {key for key in original if not torch.equal(_bits(original[key]), _bits(result[key]))}
        modules = [module for module in deltas if module.startswith(LORA_PREFIXES[name])]
        assert changed == {IN_FILE[name](lora_map.slots[module].key) for module in modules}
    # CLIP-L is stored bare and in float32: its q_proj is the original plus the LoRA's change
    original, result = load_file(str(encoder_files["clip_l"])), load_file(str(text_encoder_output(merged, "clip_l")))
    key = "encoder.layers.0.self_attn.q_proj.weight"
    delta = deltas["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(result[key].double(), original[key].double() + delta, rtol=1e-5, atol=1e-6)
    checkpoint, merged_checkpoint = load_file(str(sd35)), load_file(str(merged))
    assert merged_checkpoint.keys() == checkpoint.keys()
    changed = {key for key in checkpoint if not torch.equal(checkpoint[key], merged_checkpoint[key])}
    assert changed and all(key.startswith("model.diffusion_model.") for key in changed)


def test_an_encoder_file_no_module_changes_is_not_written(sd35, encoder_files, lora_and_expected, tmp_path, caplog):
    lora, _ = lora_and_expected
    without_t5 = tmp_path / "no_t5.safetensors"
    save_file({key: value for key, value in load_file(str(lora)).items() if not key.startswith("lora_te3_")},
              str(without_t5))
    merged = tmp_path / "merged.safetensors"
    with caplog.at_level("INFO"):
        merge_into_checkpoint(sd35, read_loras([without_t5], [1.0]), merged, text_encoder_files=encoder_files)
    assert text_encoder_output(merged, "clip_l").exists() and text_encoder_output(merged, "clip_g").exists()
    assert not text_encoder_output(merged, "t5xxl").exists()
    assert f"--t5xxl {encoder_files['t5xxl']}: no LoRA module changes it; not written" in caplog.text


def test_a_separate_file_replaces_the_checkpoints_own_encoder(tiny_sd3_checkpoints, encoder_files, lora_and_expected,
                                                             tmp_path):
    """As in the loader: --clip_l wins over the checkpoint's CLIP-L, whose copy is written unchanged."""
    lora, _ = lora_and_expected
    checkpoint = tiny_sd3_checkpoints["sd3.5-medium"]
    merged = tmp_path / "merged.safetensors"
    merge_into_checkpoint(checkpoint, read_loras([lora], [RATIO]), merged,
                          text_encoder_files={"clip_l": encoder_files["clip_l"]})
    original, result = load_file(str(checkpoint)), load_file(str(merged))
    clip_l = [key for key in original if key.startswith("text_encoders.clip_l.")]
    assert clip_l and all(torch.equal(original[key], result[key]) for key in clip_l)
    q_proj = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(original[q_proj], result[q_proj])  # CLIP-G is still merged into the checkpoint
    assert text_encoder_output(merged, "clip_l").exists()


@pytest.mark.parametrize("given", [(), ("clip_l",)])
def test_a_missing_encoder_flag_is_named(given, sd35, encoder_files, lora_and_expected, tmp_path, capsys):
    lora, _ = lora_and_expected
    merged = tmp_path / "merged.safetensors"
    with pytest.raises(SystemExit):
        main(["--sd_model", str(sd35), "--models", str(lora), "--save_to", str(merged),
              *_encoder_flags(encoder_files, given)])
    error = error_line(capsys.readouterr().err)
    missing = [name for name in NAMES if name not in given]
    counts = {name: sum(module.startswith(LORA_PREFIXES[name]) for module in lora_deltas(lora)) for name in missing}
    assert f"add {' '.join(f'--{name} FILE' for name in missing)} (the LoRA has {counts[missing[0]]} " \
           f"{LORA_PREFIXES[missing[0]]}* modules" in error
    assert str(sd35) in error and "CLIP-G text encoder" in error and ("CLIP-L" in error) == (not given)
    assert not merged.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize(("with_checkpoint", "message"), [
    (True, "--clip_l: separate text-encoder files are for SD3/SD3.5 checkpoints only; {checkpoint} is SDXL"),
    (False, "--clip_l: only with --sd_model"),
])
def test_encoder_flags_need_an_sd3_checkpoint(with_checkpoint, message, tiny_sdxl_checkpoint, encoder_files,
                                              lora_and_expected, tmp_path, capsys):
    lora, _ = lora_and_expected
    checkpoint = ["--sd_model", str(tiny_sdxl_checkpoint)] if with_checkpoint else []
    with pytest.raises(SystemExit):
        main([*checkpoint, "--models", str(lora), "--save_to", str(tmp_path / "out.safetensors"),
              "--clip_l", str(encoder_files["clip_l"])])
    assert message.format(checkpoint=tiny_sdxl_checkpoint) in error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_an_unreadable_encoder_file_names_its_flag(sd35, lora_and_expected, tmp_path, capsys):
    lora, _ = lora_and_expected
    missing = tmp_path / "clip_g.safetensors"
    with pytest.raises(SystemExit):
        main(["--sd_model", str(sd35), "--models", str(lora), "--save_to", str(tmp_path / "out.safetensors"),
              "--clip_g", str(missing)])
    assert error_line(capsys.readouterr().err).startswith(f"--clip_g {missing}: ")
