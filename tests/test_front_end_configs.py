"""Configs that front ends write: every key, unsupported features at their off values, keys that are no flag.

The kohya_ss GUI writes a flat TOML of (nearly) every setting and runs ``<script> --config_file that.toml``;
sd-scripts' own ``--output_config`` writes every flag that differs from its default. Both must start here: a
rejected flag stops a run only when its value asks for the missing behaviour, a key that is no flag is a warning,
and sd-scripts' spellings of "off" mean the default.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import toml
from train_helpers import lora_tensors, make_dataset

import sd3_train_network
import sdxl_train_network
import train_network
from library.args import INERT_UNLESS, OFF_SPELLINGS, parse_args, parse_flags

SCRIPTS = {"train_network.py": train_network, "sdxl_train_network.py": sdxl_train_network,
           "sd3_train_network.py": sd3_train_network}


def _action(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    return parser._option_string_actions[f"--{name}"]


def _off_value(action: argparse.Action):
    """The TOML value a front end writes for "off": false, an empty list, 0 or ""."""
    if action.nargs == 0:
        return False
    if action.nargs in ("*", "+"):
        return []
    return 0 if action.type in (int, float) else ""


def _asking_argv(parser: argparse.ArgumentParser, name: str) -> list[str]:
    """argv that asks for the flag's behaviour: on, a real choice, or a value no family ignores."""
    action = _action(parser, name)
    if action.nargs == 0:
        return [f"--{name}"]
    if action.choices:
        off = (None, action.default, OFF_SPELLINGS.get(name))
        return [f"--{name}", str(next(c for c in action.choices if c not in off))]
    return [f"--{name}", {int: "7", float: "0.5"}.get(action.type, "x")]


def _refusal(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(parser, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_rejected_flag_passes_off_and_fails_on(script, tmp_path, capsys):
    parser = SCRIPTS[script].setup_parser()
    assert parser.unsupported, script
    for name, reason in parser.unsupported.items():
        action = _action(parser, name)
        off = _off_value(action)
        config = tmp_path / f"{name}.toml"
        config.write_text(toml.dumps({name: off}), encoding="utf-8")
        parse_args(parser, ["--config_file", str(config)])  # off in a config file: accepted
        if action.nargs != 0 and not action.choices:  # the same value on the command line
            parse_args(parser, [f"--{name}", str(off)])
        argv = _asking_argv(parser, name)
        master = INERT_UNLESS.get(name)
        if master:  # a setting of a feature that is off does nothing: accepted until the feature is asked for
            parse_args(parser, argv)
            argv += _asking_argv(parser, master)
        refused = master if master in parser.unsupported else name
        assert f"--{refused} is not supported: {parser.unsupported[refused]}" in _refusal(parser, argv, capsys)


@pytest.mark.parametrize("script", ["sdxl_train_network.py", "sd3_train_network.py"])
def test_clip_skip_values_a_family_ignores_are_noted_others_refused(script, capsys):
    parser = SCRIPTS[script].setup_parser()
    for value in ("1", "2"):
        args, notes = parse_flags(parser, ["--clip_skip", value])
        assert args.clip_skip is None  # it changes nothing, so nothing downstream sees it
        assert [n.message for n in notes if n.level == logging.INFO] == [
            f"--clip_skip {value} has no effect here: {parser.unsupported['clip_skip']}"]
    assert "--clip_skip is not supported" in _refusal(parser, ["--clip_skip", "3"], capsys)


def test_off_spellings_mean_the_default(capsys):
    parser = sd3_train_network.setup_parser()
    args = parse_args(parser, ["--dynamo_backend", "no", "--max_token_length", "75"])
    assert (args.dynamo_backend, args.max_token_length) == ("inductor", None)
    assert "--max_token_length is not supported" in _refusal(parser, ["--max_token_length", "150"], capsys)
    assert "compiles nothing" in _refusal(parser, ["--torch_compile", "--dynamo_backend", "no"], capsys)
    assert parse_args(train_network.setup_parser(), ["--max_token_length", "75"]).max_token_length is None


def test_config_keys_that_are_no_flag_warn_with_the_closest_flag(tmp_path):
    config = tmp_path / "gui.toml"
    config.write_text('epoch = 3\nnoise_offset_type = "Original"\nlearnig_rate = 1e-4\nnetwork_dim = 8\n')
    args, notes = parse_flags(train_network.setup_parser(), ["--config_file", str(config)])
    assert args.network_dim == 8 and args.learning_rate == 2e-6  # the misspelt key did not set the rate
    warnings = [n.message for n in notes if n.level == logging.WARNING]
    assert warnings == [
        f"{config}: 'epoch' is not a flag of train_network.py; ignored (the closest flag is 'max_train_epochs')",
        f"{config}: 'noise_offset_type' is not a flag of train_network.py; ignored (the closest flag is 'noise_offset')",
        f"{config}: 'learnig_rate' is not a flag of train_network.py; ignored (the closest flag is 'learning_rate')",
    ]


def test_a_misspelt_command_line_flag_is_an_error_naming_the_closest(capsys):
    parser = train_network.setup_parser()
    message = _refusal(parser, ["--learnig_rate", "1e-4"], capsys)
    assert "unrecognized arguments: --learnig_rate 1e-4 (did you mean --learning_rate?)" in message


def test_front_end_value_spellings_are_read_where_harmless(tmp_path, capsys):
    """Switches as 0/1 and whole numbers as 64.0 (as the GUI writes them); other wrong types stay errors."""
    config = tmp_path / "gui.toml"
    config.write_text("persistent_data_loader_workers = 1\ncache_latents = 0\nbucket_reso_steps = 64.0\n")
    args = parse_args(train_network.setup_parser(), ["--config_file", str(config)])
    assert (args.persistent_data_loader_workers, args.cache_latents, args.bucket_reso_steps) == (True, False, 64)
    assert type(args.bucket_reso_steps) is int
    config.write_text("bucket_reso_steps = 64.5\n")
    assert "'bucket_reso_steps' must be a whole number" in _refusal(train_network.setup_parser(),
                                                                    ["--config_file", str(config)], capsys)


# --- whole configs as the kohya_ss GUI writes them -----------------------------------------------------------

def _gui_config(family: str, checkpoint: dict[str, Path], dataset: Path, out: Path) -> dict:
    """The keys and default values the kohya_ss GUI's LoRA tab writes (its writer drops "", false, 0 and None),
    with a few features switched on as its presets do."""
    config = {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
        "clip_skip": 1, "dataset_config": str(dataset), "dynamo_backend": "no", "enable_bucket": True, "epoch": 1,
        "gradient_accumulation_steps": 1, "huber_c": 0.1, "huber_scale": 1, "huber_schedule": "snr",
        "learning_rate": 0.0001, "logging_dir": str(out / "log"), "loss_type": "l2", "lr_scheduler": "cosine",
        "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "max_bucket_reso": 2048,
        "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_timestep": 1000, "max_token_length": 75,
        "max_train_steps": 1, "min_bucket_reso": 64, "mixed_precision": "fp16", "network_alpha": 1,
        "network_args": [], "network_dim": 8, "network_module": "networks.lora", "noise_offset_type": "Original",
        "optimizer_type": "AdamW8bit", "output_dir": str(out), "output_name": "last",
        "pretrained_model_name_or_path": str(checkpoint["model"]), "prior_loss_weight": 1, "resolution": "64,64",
        "sample_prompts": str(out / "sample" / "prompt.txt"), "sample_sampler": "euler_a", "save_every_n_epochs": 1,
        "save_model_as": "safetensors", "save_precision": "fp16", "sdpa": True, "seed": 1234, "train_batch_size": 1,
        "unet_lr": 0.0001, "wandb_run_name": "last", "text_encoder_lr": [0.0001],
        "tokenizer_cache_dir": str(checkpoint["tokenizers"]),
    }
    if family == "sdxl":
        config.update({"no_half_vae": True, "cache_text_encoder_outputs": True, "network_train_unet_only": True})
    if family == "sd3":
        config.update({"logit_std": 1.0, "mode_scale": 1.29, "weighting_scheme": "logit_normal",
                       "t5xxl_dtype": "bf16", "text_encoder_batch_size": 1, "cache_text_encoder_outputs": True})
    return dict(sorted(config.items()))


@pytest.fixture
def families(request) -> dict[str, tuple]:
    return {
        "sd1": (train_network, {"model": request.getfixturevalue("tiny_sd1_checkpoint"),
                                "tokenizers": request.getfixturevalue("tokenizer_cache_dir")}),
        "sdxl": (sdxl_train_network, {"model": request.getfixturevalue("tiny_sdxl_checkpoint"),
                                      "tokenizers": request.getfixturevalue("sdxl_tokenizer_cache_dir")}),
        "sd3": (sd3_train_network, {"model": request.getfixturevalue("tiny_sd3_checkpoints")["sd3.5-medium"],
                                    "tokenizers": request.getfixturevalue("sd3_tokenizer_cache_dir")}),
    }


def _write_gui_config(family: str, checkpoint: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    (out / "sample" / "prompt.txt").write_text("a red square --w 64 --h 64\n")  # the GUI always writes this file
    path = tmp_path / f"config_lora-{family}.toml"
    path.write_text(toml.dumps(_gui_config(family, checkpoint, make_dataset(tmp_path / "data"), out)))
    return path


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_gui_config_passes_the_dry_run(family, families, tmp_path, no_model_loading, capsys):
    module, checkpoint = families[family]
    module.main(["--config_file", str(_write_gui_config(family, checkpoint, tmp_path)), "--dry_run"])
    captured = capsys.readouterr()
    assert "steps" in captured.out and "peak" in captured.out
    # parse notes are logged once logging is set up, in the log's format
    assert "WARNING library.args: " in captured.err and "'epoch' is not a flag" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("family, trains_text_encoder", [("sd1", True), ("sdxl", False), ("sd3", False)])
def test_gui_config_trains_with_only_the_precision_changed_for_the_cpu(family, trains_text_encoder, families, tmp_path):
    """The GUI's default fp16 needs a GPU; the command line overrides it, as a user testing on a CPU would.
    (The SDXL and SD3 configs cache text-encoder outputs, so only the denoiser's LoRA trains there.)"""
    module, checkpoint = families[family]
    module.main(["--config_file", str(_write_gui_config(family, checkpoint, tmp_path)), "--mixed_precision", "no"])
    tensors = lora_tensors(tmp_path / "out" / "last.safetensors")
    assert any(key.startswith("lora_unet_") for key in tensors)
    assert any(key.startswith("lora_te") for key in tensors) == trains_text_encoder


def test_sd_scripts_output_config_of_off_values_starts(tmp_path):
    """sd-scripts' --output_config writes every flag that differs from its default, unsectioned; a user who gave
    the off value of features we lack (``--noise_offset 0``, ``--v_pred_like_loss 0``) gets them in the file."""
    config = tmp_path / "saved.toml"
    config.write_text(toml.dumps({
        "noise_offset": 0.0, "v_pred_like_loss": 0.0, "huggingface_repo_visibility": "private", "zero_stage": 3,
        "face_crop_aug_range": "", "min_snr_gamma": 0.0, "network_dim": 16, "sample_every_n_steps": 0}))
    for script in ("train_network.py", "sd3_train_network.py"):
        args = parse_args(SCRIPTS[script].setup_parser(), ["--config_file", str(config)])
        assert args.network_dim == 16
