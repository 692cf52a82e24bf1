"""Every training command the docs show runs with --dry_run against the tiny fixtures.

The docs test (test_docs.py) checks that the commands parse; this one runs them through the trainers'
real flow up to the point where models would load: dataset TOML, flag conflicts, model-file checks,
buckets, steps and the memory estimate. Only what names a file on the writer's disk is replaced by a
fixture (model files, dataset TOML, output folders, prompt files), and --blocks_to_swap is capped to
the tiny models' block count (on a machine without CUDA, where the flag is refused, it is left out). A
command naming a file this test has no fixture for fails, so a new example cannot slip through unrun.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from doc_commands import Command, collect, markdown_files
from train_helpers import make_dataset

import sd3_train_network
import sdxl_train_network
import train_network

TRAINERS = {"train_network.py": train_network, "sdxl_train_network.py": sdxl_train_network,
            "sd3_train_network.py": sd3_train_network}
TINY_SD3_BLOCKS = 2


def _training_commands() -> list[Command]:
    commands = [command for path in markdown_files() for command in collect(path).commands() if command.script in TRAINERS]
    # Commands that read or write a --config_file are about that file, not about a run.
    return [c for c in commands if not any(word.split("=")[0] in ("--config_file", "--output_config") for word in c.argv)]


COMMANDS = _training_commands()


def _sd3_checkpoint(request, value: str) -> Path:
    checkpoints = request.getfixturevalue("tiny_sd3_checkpoints")
    name = Path(value).name.lower()
    variant = "sd3.5-large" if "large" in name else "sd3.5-medium" if "3.5" in name or "35" in name else "sd3-medium"
    return checkpoints[variant]


def _checkpoint(script: str) -> Callable:
    def fixture(request, value: str, tmp_path: Path) -> Path:
        if script == "sd3_train_network.py":
            return _sd3_checkpoint(request, value)
        return request.getfixturevalue("tiny_sdxl_checkpoint" if script == "sdxl_train_network.py" else "tiny_sd1_checkpoint")
    return fixture


def _sd3_encoder(name: str) -> Callable:
    return lambda request, value, tmp_path: request.getfixturevalue("tiny_sd3_text_encoder_files")[name]


def _prompts(request, value: str, tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red square --w 64 --h 64 --s 2\n")
    return path


# flag -> (request, documented value, tmp_path) -> the fixture that stands in for it
REPLACEMENTS: dict[str, Callable] = {
    "--clip_l": _sd3_encoder("clip_l"), "--clip_g": _sd3_encoder("clip_g"), "--t5xxl": _sd3_encoder("t5xxl"),
    "--dataset_config": lambda request, value, tmp_path: make_dataset(tmp_path / "data"),
    "--output_dir": lambda request, value, tmp_path: tmp_path / "out",
    "--logging_dir": lambda request, value, tmp_path: tmp_path / "logs",
    "--sample_prompts": _prompts,
    "--blocks_to_swap": lambda request, value, tmp_path: min(int(value), TINY_SD3_BLOCKS - 1),
}
GPU_ONLY = ("--blocks_to_swap",)
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".toml", ".json", ".txt")


def _tokenizers(request, script: str) -> Path:
    return request.getfixturevalue({"train_network.py": "tokenizer_cache_dir", "sdxl_train_network.py": "sdxl_tokenizer_cache_dir",
                                    "sd3_train_network.py": "sd3_tokenizer_cache_dir"}[script])


def fixture_argv(command: Command, request, tmp_path: Path) -> list[str]:
    """The documented argv with files replaced by fixtures; only `--flag=value` and `--flag value` forms occur."""
    replacements = {**REPLACEMENTS, "--pretrained_model_name_or_path": _checkpoint(command.script)}
    words, argv = list(command.argv), []
    while words:
        word = words.pop(0)
        flag, has_value, value = word.partition("=")
        if not has_value and flag in replacements and words and not words[0].startswith("--"):
            value, has_value = words.pop(0), True
        if flag in GPU_ONLY and not torch.cuda.is_available():
            continue
        if flag in replacements:
            argv.append(f"{flag}={replacements[flag](request, value, tmp_path)}")
        elif has_value and value.lower().endswith(FILE_SUFFIXES):
            raise AssertionError(f"{command.doc}:{command.line}: {flag}={value} names a file; add a fixture for {flag} "
                                 "to REPLACEMENTS in tests/test_docs_dry_run.py")
        else:
            argv.append(word)
    return argv + [f"--tokenizer_cache_dir={_tokenizers(request, command.script)}", "--max_data_loader_n_workers=0",
                   "--dry_run"]


def test_the_guides_full_examples_are_among_the_commands():
    shown = {(c.doc, c.script) for c in COMMANDS}
    assert {("docs/train_network.md", "train_network.py"), ("docs/sdxl_train_network.md", "sdxl_train_network.py"),
            ("docs/sd3_train_network.md", "sd3_train_network.py")} <= shown


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_documented_training_command_dry_runs(command, request, tmp_path, capsys, no_model_loading):
    TRAINERS[command.script].main(fixture_argv(command, request, tmp_path))
    out = capsys.readouterr().out
    assert "dry run: what training would do" in out, f"{command.doc}:{command.line}: no dry-run report"
    assert "64x64: 4" in out and "peak allocated" in out  # the fixture dataset's bucket, and an estimate was made
