"""library.args: config files, --output_config, legacy spellings, rejected flags and flag conflicts."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import toml

from library.args import (
    LEGACY_ALIASES,
    TRAINING_FLAGS,
    TrainingParser,
    add_training_flags,
    merge_flag_groups,
    parse_args,
    parse_resolution,
    setup_parser_for,
)
from library.args_groups import FlagGroup, flag, int_or_float, switch


@pytest.fixture(scope="module")
def parser() -> TrainingParser:
    return setup_parser_for(TRAINING_FLAGS, prog="train_network.py")


def _error(parser: TrainingParser, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of a parse that must fail with argparse's usage-error status."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(parser, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message, "errors are one line, without the usage dump of every flag"
    return message


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and types ---------------------------------------------------------------------------------------


def test_defaults_match_sd_scripts_and_legacy_names_are_gone(parser):
    args = parse_args(parser, [])
    assert args.learning_rate == 2e-06
    assert args.save_model_as == "safetensors"
    assert args.max_train_steps == 1600
    assert args.caption_extension == ".caption"
    assert args.optimizer_type == ""
    assert args.lr_warmup_steps == 0
    for old in LEGACY_ALIASES:
        assert not hasattr(args, old)


@pytest.mark.parametrize("text, expected", [
    ("10", 10), ("0", 0), ("0.25", 0.25), ("50%", 0.5), ("2.5%", 0.025), ("1.0", 1), ("100%", 1.0),
])
def test_int_or_float_reads_steps_ratios_and_percentages(text, expected):
    value = int_or_float(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["1.5", "-1", "-10%", "ten", "", "%"])
def test_int_or_float_rejects_what_is_neither(text):
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_float(text)


def test_lr_warmup_steps_takes_a_ratio_on_the_command_line(parser, capsys):
    assert parse_args(parser, ["--lr_warmup_steps", "0.1", "--lr_decay_steps", "200"]).lr_warmup_steps == 0.1
    assert parse_args(parser, ["--lr_decay_steps", "200"]).lr_decay_steps == 200
    assert "--lr_warmup_steps" in _error(parser, ["--lr_warmup_steps", "2.5"], capsys)


@pytest.mark.parametrize("text, expected", [("512", (512, 512)), ("512,768", (512, 768)), (" 640 , 448 ", (640, 448))])
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["0", "512x768", "512,768,1024", "", "-512", "512.5"])
def test_parse_resolution_rejects_malformed(text):
    with pytest.raises(ValueError, match="--resolution"):
        parse_resolution(text)


# --- config files ---------------------------------------------------------------------------------------------


def test_config_file_values_apply_and_command_line_overrides_them(parser, tmp_path):
    config = _write(tmp_path / "run.toml", """
learning_rate = 1e-4
[network]
network_dim = 8
network_args = ["conv_dim=4", "conv_alpha=1"]
[captions.more]
shuffle_caption = true
[optimizer]
lr_warmup_steps = 0.05
text_encoder_lr = [1e-5, 2]
""")
    args = parse_args(parser, ["--config_file", str(config), "--learning_rate", "5e-5", "--network_dim", "16"])
    assert args.learning_rate == 5e-5
    assert args.network_dim == 16
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.shuffle_caption is True
    assert args.lr_warmup_steps == 0.05
    assert args.text_encoder_lr == [1e-5, 2.0] and all(type(lr) is float for lr in args.text_encoder_lr)


def test_config_file_without_toml_suffix_is_found(parser, tmp_path):
    _write(tmp_path / "run.toml", "network_dim = 4\n")
    assert parse_args(parser, ["--config_file", str(tmp_path / "run")]).network_dim == 4


def test_config_file_strings_convert_as_on_the_command_line(parser, tmp_path):
    config = _write(tmp_path / "run.toml",
                    'learning_rate = "1e-4"\nlr_warmup_steps = "10%"\ndataset_config = "data/set.toml"\n')
    args = parse_args(parser, ["--config_file", str(config)])
    assert args.learning_rate == 1e-4
    assert args.lr_warmup_steps == 0.1
    assert args.dataset_config == Path("data/set.toml")


@pytest.mark.parametrize("text, words", [
    ("network_dim = true\n", ["'network_dim' must be a whole number"]),
    ("network_dim = 1.5\n", ["'network_dim' must be a whole number"]),
    ("shuffle_caption = 2\n", ["'shuffle_caption' is an on/off flag"]),
    ("shuffle_caption = \"yes\"\n", ["'shuffle_caption' is an on/off flag"]),
    ("output_name = 3\n", ["'output_name' must be a string"]),
    ("network_args = \"conv_dim=4\"\n", ["'network_args' takes several values"]),
    ("mixed_precision = \"fp32\"\n", ["'mixed_precision' must be one of 'no', 'fp16', 'bf16'"]),
    ("lr_warmup_steps = 1.5\n", ["'lr_warmup_steps' must be a step count or a ratio"]),
    ("network_dim = 4\n[network]\nnetwork_dim = 8\n", ["'network_dim' is set twice", "[network]"]),
    ("config_file = \"other.toml\"\n", ["'config_file' cannot be set inside a config file"]),
    ("network_dim = \n", ["is not valid TOML"]),
])
def test_bad_config_file_is_one_line_naming_key_and_file(parser, tmp_path, capsys, text, words):
    config = _write(tmp_path / "bad.toml", text)
    message = _error(parser, ["--config_file", str(config)], capsys)
    assert str(config) in message
    for word in words:
        assert word in message


def test_missing_config_file_names_the_path(parser, tmp_path, capsys):
    message = _error(parser, ["--config_file", str(tmp_path / "nowhere")], capsys)
    assert f"{tmp_path / 'nowhere.toml'}: no such file" in message


def test_unsupported_flag_in_config_file_is_rejected(parser, tmp_path, capsys):
    config = _write(tmp_path / "run.toml", "[hub]\nhuggingface_repo_id = \"me/lora\"\n")
    assert "--huggingface_repo_id is not supported" in _error(parser, ["--config_file", str(config)], capsys)


# --- --output_config ------------------------------------------------------------------------------------------

_ROUND_TRIP_ARGV = [
    "--pretrained_model_name_or_path", "C:\\models\\sd \"v1\".safetensors", "--v2", "--resolution", "512,768",
    "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8.5",
    "--network_args", "conv_dim=4", "conv_alpha=1", "--text_encoder_lr", "1e-5", "2e-5",
    "--lr_warmup_steps", "0.1", "--lr_decay_steps", "300", "--use_8bit_adam", "--caption_extention", ".txt",
    "--dataset_config", "data/set.toml", "--mixed_precision", "bf16", "--full_bf16", "--seed", "42",
    "--wandb_api_key", "secret-key", "--output_name", "ünïcode\ttab",
]


def test_output_config_round_trip(parser, tmp_path, capsys):
    out = tmp_path / "saved.toml"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(parser, [*_ROUND_TRIP_ARGV, "--config_file", str(out), "--output_config"])
    assert exit_info.value.code == 0
    assert str(out) in capsys.readouterr().out

    written = toml.loads(out.read_text(encoding="utf-8"))
    assert written["network"]["network_args"] == ["conv_dim=4", "conv_alpha=1"]
    assert written["optimizer"]["use_8bit_adam"] is True
    flat = {key for section in written.values() for key in section}
    assert "wandb_api_key" not in flat, "the API key must not land in a shareable file"
    assert "learning_rate" not in flat, "defaults are left out"

    expected = vars(parse_args(parser, _ROUND_TRIP_ARGV))
    expected["wandb_api_key"] = None
    reread = vars(parse_args(parser, ["--config_file", str(out)]))
    assert reread.pop("config_file") == str(out)
    expected.pop("config_file")
    assert reread == expected


def test_output_config_never_overwrites(parser, tmp_path, capsys):
    out = _write(tmp_path / "saved.toml", "network_dim = 4\n")
    message = _error(parser, ["--config_file", str(out), "--output_config", "--network_dim", "8"], capsys)
    assert "already exists" in message and str(out) in message
    assert out.read_text(encoding="utf-8") == "network_dim = 4\n"


def test_output_config_needs_config_file(parser, capsys):
    assert "add --config_file" in _error(parser, ["--output_config"], capsys)


# --- legacy spellings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, name, expected", [
    (["--caption_extention", ".txt"], "caption_extension", ".txt"),
    (["--caption_extention", ".txt", "--caption_extension", ".txt"], "caption_extension", ".txt"),
    (["--use_8bit_adam"], "optimizer_type", "AdamW8bit"),
    (["--use_lion_optimizer"], "optimizer_type", "Lion"),
    (["--cache_latents_to_disk"], "cache_latents", True),
    (["--sample_every_n_steps", "0"], "sample_every_n_steps", None),
    (["--sample_every_n_epochs", "-1"], "sample_every_n_epochs", None),
])
def test_legacy_and_implied_settings_are_normalised(parser, argv, name, expected):
    args = parse_args(parser, argv)
    assert getattr(args, name) == expected
    assert not any(hasattr(args, old) for old in LEGACY_ALIASES)


def test_epochs_override_steps_with_a_warning(parser, caplog):
    with caplog.at_level(logging.WARNING, logger="library.args"):
        args = parse_args(parser, ["--max_train_epochs", "3", "--max_train_steps", "500"])
    assert (args.max_train_epochs, args.max_train_steps) == (3, 500)
    assert "--max_train_epochs 3 overrides --max_train_steps 500" in caplog.text


# --- rejected flags and conflicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, name", [
    (["--deepspeed"], "deepspeed"),
    (["--zero_stage", "3", "--deepspeed"], "deepspeed"),
    (["--huggingface_repo_id", "me/lora"], "huggingface_repo_id"),
    (["--dataset_class", "my.Dataset"], "dataset_class"),
])
def test_unsupported_flags_exit_with_their_reason(parser, capsys, argv, name):
    message = _error(parser, argv, capsys)
    assert f"--{name} is not supported: " in message
    assert message.startswith("train_network.py: error:")


def test_unsupported_flag_at_its_default_is_harmless(parser):
    assert parse_args(parser, ["--zero_stage", "2"]).zero_stage == 2


@pytest.mark.parametrize("argv, expected", [
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "leave nothing to train"),
    (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 needs --mixed_precision fp16 (got 'bf16')"),
    (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 needs --mixed_precision bf16"),
    (["--resolution", "512x512"], "--resolution '512x512' must be one size or 'width,height'"),
    (["--save_last_n_epochs", "2"], "--save_last_n_epochs only prunes periodic saves"),
    (["--save_last_n_steps", "100"], "add --save_every_n_steps"),
    (["--save_last_n_epochs_state", "2", "--save_every_n_epochs", "1"], "add --save_state"),
    (["--save_last_n_steps_state", "2", "--save_state"], "add --save_every_n_steps"),
    (["--use_8bit_adam", "--use_lion_optimizer"], "pick different optimizers"),
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], "drop --use_8bit_adam (it means AdamW8bit)"),
    (["--use_lion_optimizer", "--optimizer_type", "Lion"], "drop --use_lion_optimizer"),
    (["--caption_extention", ".txt", "--caption_extension", ".cap"], "keep only --caption_extension"),
    (["--adaptive_noise_scale", "0.1"], "give --noise_offset too"),
    (["--scale_v_pred_loss_like_noise_pred"], "only applies with --v_parameterization"),
    (["--dim_from_weights"], "give --network_weights FILE"),
    (["--min_timestep", "500", "--max_timestep", "500"], "0 <= --min_timestep < --max_timestep <= 1000"),
    (["--min_timestep", "1000"], "(got 1000 and 1000)"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1, not 0"),
    (["--save_every_n_epochs", "0"], "--save_every_n_epochs must be at least 1"),
    (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate is a fraction between 0 and 1"),
])
def test_conflicting_flags_are_one_line_errors(parser, capsys, argv, expected):
    assert expected in _error(parser, argv, capsys)


@pytest.mark.parametrize("argv", [
    ["--full_fp16", "--mixed_precision", "fp16"],
    ["--save_last_n_epochs", "2", "--save_n_epoch_ratio", "5"],
    ["--save_last_n_steps_state", "2", "--save_every_n_steps", "100", "--save_state"],
    ["--adaptive_noise_scale", "0.1", "--noise_offset", "0.05"],
    ["--min_timestep", "100", "--max_timestep", "900"],
    ["--dim_from_weights", "--network_weights", "old.safetensors"],
])
def test_the_fixed_combinations_parse(parser, argv):
    parse_args(parser, argv)


def test_unknown_flag_is_a_short_error(parser, capsys):
    assert "unrecognized arguments: --no_such_flag" in _error(parser, ["--no_such_flag"], capsys)


# --- help and parser construction -----------------------------------------------------------------------------


def test_help_lists_groups_and_the_rejected_flags_with_reasons(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(parser, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for title in ("model:", "dataset:", "captions:", "caching:", "network (LoRA):", "optimizer and schedule:",
                  "training:", "noise and loss:", "saving:", "sample images:", "logging:", "validation:"):
        assert f"\n{title}\n" in text
    accepted, rejected = (" ".join(part.split()) for part in text.split("not supported (rejected if given):"))
    assert "--deepspeed DeepSpeed is not supported yet; use plain DDP via accelerate launch" in rejected
    assert "--deepspeed" not in accepted
    assert "--learning_rate X learning rate (default: 2e-06)" in accepted


def test_unsupported_table_must_name_real_flags():
    with pytest.raises(ValueError, match="no_such_flag"):
        setup_parser_for(TRAINING_FLAGS, unsupported={"no_such_flag": "reason"})


def test_parse_args_needs_a_parser_with_the_training_flags():
    with pytest.raises(TypeError, match="setup_parser_for"):
        parse_args(argparse.ArgumentParser(), [])


def test_a_plain_parser_with_add_training_flags_gets_the_same_checks(tmp_path, capsys):
    plain = argparse.ArgumentParser(prog="train_network.py")
    add_training_flags(plain)
    config = _write(tmp_path / "run.toml", "[network]\nnetwork_dim = 8\n")
    args = parse_args(plain, ["--config_file", str(config), "--use_lion_optimizer"])
    assert (args.network_dim, args.optimizer_type) == (8, "Lion")
    with pytest.raises(SystemExit):
        parse_args(plain, ["--deepspeed"])
    assert "--deepspeed is not supported: DeepSpeed" in capsys.readouterr().err


def test_a_family_adds_its_flags_as_one_more_group_set(capsys):
    sdxl = (FlagGroup("sdxl", "SDXL", "SDXL-only flags.", (switch("disable_mmap_load_safetensors", "read whole"),)),
            FlagGroup("caching", "caching", "", (switch("cache_latents", "encode all images with the VAE before "
                                                        "training and keep the latents in RAM"),)))
    parser = setup_parser_for(TRAINING_FLAGS, sdxl, prog="sdxl_train_network.py")
    assert parse_args(parser, ["--disable_mmap_load_safetensors"]).disable_mmap_load_safetensors is True
    caching = next(g for g in parser.flag_groups if g.key == "caching")
    assert [f.name for f in caching.flags].count("cache_latents") == 1


def test_merge_refuses_two_different_declarations_of_one_flag():
    first = (FlagGroup("a", "a", "", (flag("x", "x", type=int, default=1),)),)
    second = (FlagGroup("b", "b", "", (flag("x", "x", type=int, default=2),)),)
    with pytest.raises(ValueError, match="--x is declared twice"):
        merge_flag_groups(first, second)


def test_output_config_into_a_missing_folder_is_a_clear_error(parser, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "saved.toml"
    assert f"--output_config: cannot write {out}" in _error(parser, ["--config_file", str(out), "--output_config"],
                                                            capsys)
