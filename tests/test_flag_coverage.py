"""The command-line surface against sd-scripts' own: every flag of train_network.py exists here with the same
type, default, choices and nargs, and is either rejected with a reason or accepted and read by the trainer.

The reference is the extracted flag list (shared/reference/sd-scripts-flags.txt), one line per flag:
``  --name  type=int; default=1; choices=[...]; nargs='*'`` under ``## <declaring function>`` headings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from library.args import (
    HANDLED_HERE,
    INERT_UNLESS,
    LEGACY_ALIASES,
    OFF_SPELLINGS,
    OUR_ADDITIONS,
    TRAINING_FLAGS,
    UNSUPPORTED,
    parse_args,
    setup_parser_for,
)

REPO = Path(__file__).resolve().parents[1]
_REFERENCE_CANDIDATES = (
    REPO / "docs" / "reference" / "sd-scripts-flags.txt",
    REPO / "shared" / "reference" / "sd-scripts-flags.txt",
    REPO.parent / "shared" / "reference" / "sd-scripts-flags.txt",
)
# The functions whose flags make up train_network.py (the reference's header says so).
_TRAIN_NETWORK_SECTIONS = (
    "add_logging_arguments", "add_sd_models_arguments", "add_model_spec_arguments", "add_dataset_arguments",
    "add_training_arguments", "add_masked_loss_arguments", "add_deepspeed_arguments", "add_optimizer_arguments",
    "add_config_arguments", "add_custom_train_arguments", "setup_parser",
)
_SAMPLE_TEXT = {"int": "7", "float": "0.25", "str": "some text", "Path": "data/set.toml", "int_or_float": "0.25"}


def _reference_path() -> Path:
    for candidate in _REFERENCE_CANDIDATES:
        if candidate.is_file():
            return candidate
    pytest.fail("sd-scripts flag reference not found: docs/reference/sd-scripts-flags.txt belongs in the repository")


def _parse_reference(text: str) -> dict[str, dict[str, dict[str, Any]]]:
    """{section: {flag name: {"type": "int", "default": ..., "choices": [...], "nargs": ..., "action": ...}}}"""
    sections: dict[str, dict[str, dict[str, Any]]] = {}
    current: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line.split()[1], {})
        elif line.startswith("  --"):
            name, _, spec = line.strip()[2:].partition("  ")
            fields = dict(item.strip().split("=", 1) for item in spec.split(";") if item.strip())
            current[name] = {key: value if key == "type" else ast.literal_eval(value) for key, value in fields.items()}
    return sections


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """train_network.py's flags; a later declaration of a name replaces an earlier one, as in argparse."""
    sections = _parse_reference(_reference_path().read_text(encoding="utf-8"))
    flags: dict[str, dict[str, Any]] = {}
    for section in _TRAIN_NETWORK_SECTIONS:
        flags.update(sections[section])
    return flags


@pytest.fixture(scope="module")
def parser():
    return setup_parser_for(TRAINING_FLAGS, prog="train_network.py")


def test_reference_parses_to_the_whole_train_network_surface(reference):
    assert len(reference) == 193
    assert reference["save_model_as"] == {"type": "str", "default": "safetensors",
                                          "choices": [None, "ckpt", "pt", "safetensors"]}
    assert reference["lr_warmup_steps"] == {"type": "int_or_float", "default": 0}


def test_surface_is_sd_scripts_plus_our_documented_additions(parser, reference):
    ours = set(parser.flag_actions)
    assert ours - set(reference) == OUR_ADDITIONS
    assert set(reference) - ours == set()


def test_every_flag_has_sd_scripts_default_choices_and_nargs(parser, reference):
    mismatches = []
    for name, spec in reference.items():
        action = parser.flag_actions[name]
        switch = spec.get("action") == "store_true"  # argparse gives store_true nargs=0 and const=True
        expected_default = spec.get("default", False if switch else None)
        # Our choices add sd-scripts' spelling of "off" where front ends write one outside its choices.
        choices = spec.get("choices")
        if name in OFF_SPELLINGS:
            assert OFF_SPELLINGS[name] in action.choices, name
            choices = sorted(choices + [OFF_SPELLINGS[name]], key=action.choices.index)
        ours = (parser.get_default(name), type(parser.get_default(name)), action.choices, action.nargs, action.const)
        theirs = (expected_default, type(expected_default), choices, 0 if switch else spec.get("nargs"),
                  True if switch else None)
        if ours != theirs:
            mismatches.append(f"--{name}: ours {ours}, sd-scripts {theirs}")
    assert not mismatches, "\n".join(mismatches)


def _expected_value(type_name: str, text: str) -> Any:
    return {"int": int, "float": float, "str": str, "Path": Path}.get(type_name, float)(text)


def test_every_flag_converts_values_like_sd_scripts(parser, reference):
    """Parse sample values through argparse alone (before any of our checks) and compare with sd-scripts'
    conversion of the same text."""
    for name, spec in reference.items():
        if spec.get("action") == "store_true":
            assert parser.parse_args([f"--{name}"]).__dict__[name] is True, name
            continue
        samples = [c for c in spec["choices"] if c is not None] if "choices" in spec else [_SAMPLE_TEXT[spec["type"]]]
        for sample in samples:
            value = getattr(parser.parse_args([f"--{name}", str(sample)]), name)
            expected = sample if "choices" in spec else _expected_value(spec["type"], sample)
            if spec.get("nargs") == "*":
                expected = [expected]
                assert getattr(parser.parse_args([f"--{name}"]), name) == [], name
            assert value == expected and type(value) is type(expected), f"--{name} {sample!r} gave {value!r}"


@pytest.mark.parametrize("type_name, bad", [("int", "7.5"), ("float", "fast"), ("int_or_float", "1.5")])
def test_malformed_values_are_refused_by_type(parser, reference, type_name, bad):
    names = [name for name, spec in reference.items() if spec.get("type") == type_name and "choices" not in spec]
    assert names
    for name in names:
        with pytest.raises(SystemExit):
            parser.parse_args([f"--{name}", bad])


def test_choices_refuse_other_values(parser, reference):
    for name, spec in reference.items():
        if "choices" in spec:
            with pytest.raises(SystemExit):
                parser.parse_args([f"--{name}", "not-a-choice"])


def _non_default_argv(name: str, spec: dict[str, Any]) -> list[str]:
    if spec.get("action") == "store_true":
        return [f"--{name}"]
    if "choices" in spec:
        choice = next(c for c in spec["choices"] if c is not None and c != spec.get("default"))
        return [f"--{name}", str(choice)]
    return [f"--{name}", _SAMPLE_TEXT[spec["type"]]]


def test_every_unsupported_flag_is_rejected_with_its_reason(parser, reference, capsys):
    """A value that asks for the feature is refused; a setting of a feature that is off (zero_stage without
    --deepspeed) does nothing and passes, and is refused once the feature is asked for."""
    assert set(UNSUPPORTED) <= set(reference)
    for name in UNSUPPORTED:
        argv = _non_default_argv(name, reference[name])
        master = INERT_UNLESS.get(name)
        if master:
            parse_args(parser, argv)
            argv += _non_default_argv(master, reference[master])
        with pytest.raises(SystemExit) as exit_info:
            parse_args(parser, argv)
        assert exit_info.value.code == 2
        refused = name if master is None or master not in UNSUPPORTED else master
        assert f"--{refused} is not supported: {UNSUPPORTED[refused]}" in capsys.readouterr().err


# Flags that only parse together with another one (their conflicts are tested in test_args.py).
_COMPANIONS = {
    "full_fp16": ["--mixed_precision", "fp16"], "full_bf16": ["--mixed_precision", "bf16"],
    "save_last_n_epochs": ["--save_every_n_epochs", "1"], "save_last_n_steps": ["--save_every_n_steps", "10"],
    "save_last_n_epochs_state": ["--save_every_n_epochs", "1", "--save_state"],
    "save_last_n_steps_state": ["--save_every_n_steps", "10", "--save_state"],
    "adaptive_noise_scale": ["--noise_offset", "0.1"], "scale_v_pred_loss_like_noise_pred": ["--v_parameterization"],
    "dim_from_weights": ["--network_weights", "old.safetensors"],
    "cpu_offload_checkpointing": ["--gradient_checkpointing"],
}
_SAMPLE_OVERRIDES = {"resolution": "512,768", "min_timestep": "100", "max_timestep": "900"}


def test_every_accepted_flag_reaches_the_namespace(parser, reference, tmp_path):
    empty_config = tmp_path / "empty.toml"
    empty_config.write_text("", encoding="utf-8")
    for name, spec in reference.items():
        if name in UNSUPPORTED or name == "output_config":
            continue
        argv = _non_default_argv(name, spec)
        if name in _SAMPLE_OVERRIDES:
            argv[1] = _SAMPLE_OVERRIDES[name]
        if name == "config_file":
            argv[1] = str(empty_config)
        args = vars(parse_args(parser, argv + _COMPANIONS.get(name, [])))
        expected = vars(parser.parse_args(argv))[name]
        if name in LEGACY_ALIASES:
            assert name not in args and args[LEGACY_ALIASES[name]] != parser.get_default(LEGACY_ALIASES[name])
        else:
            assert args[name] == expected, name


def _project_sources() -> str:
    folders = [REPO / "library", REPO / "networks", REPO / "tools"]
    files = [*REPO.glob("*.py"), *(path for folder in folders for path in folder.rglob("*.py"))]
    own = {REPO / "library" / "args.py", REPO / "library" / "args_groups.py"}
    return "\n".join(path.read_text(encoding="utf-8") for path in files if path not in own)


def test_every_accepted_flag_is_read_by_the_project(reference):
    """An accepted flag nobody reads would be silently ignored, which the design forbids."""
    sources = _project_sources()
    unread = sorted(
        name for name in reference
        if name not in UNSUPPORTED and name not in HANDLED_HERE
        and not re.search(rf"\.{name}\b|[\"']{name}[\"']", sources)
    )
    assert not unread, f"{len(unread)} accepted flags are never read: " + ", ".join(f"--{n}" for n in unread)


# ----------------------------------------------------------------------------- sd3_train_network.py
_SD3_SECTIONS = ("add_dit_training_arguments", "add_sd3_training_arguments")


def test_every_sd3_flag_is_declared_with_sd_scripts_defaults_and_accepted_or_rejected(capsys):
    """sd3_train_network.py = train_network.py's flags + the DiT and SD3 groups; each is read or rejected."""
    from sd3_train_network import SD3_UNSUPPORTED, setup_parser

    sections = _parse_reference(_reference_path().read_text(encoding="utf-8"))
    sd3_flags = {name: spec for section in _SD3_SECTIONS for name, spec in sections[section].items()}
    parser = setup_parser()
    sources = _project_sources()
    unread = []
    for name, spec in sd3_flags.items():
        assert parser.get_default(name) == spec.get("default", False if spec.get("action") == "store_true" else None), name
        if name in SD3_UNSUPPORTED:
            value = [f"--{name}"] if spec.get("action") == "store_true" else [f"--{name}", "1"]
            with pytest.raises(SystemExit):
                parse_args(parser, value)
            assert "is not supported" in capsys.readouterr().err
        elif not re.search(rf"\.{name}\b|[\"']{name}[\"']", sources):
            unread.append(name)
    assert unread == []


def test_every_sdxl_flag_is_declared_and_accepted_or_rejected(capsys):
    """sdxl_train_network.py = train_network.py's flags + add_sdxl_training_arguments; each is read or rejected."""
    from sdxl_train_network import SDXL_UNSUPPORTED, setup_parser

    sections = _parse_reference(_reference_path().read_text(encoding="utf-8"))
    parser = setup_parser()
    sources = _project_sources()
    for name, spec in sections["add_sdxl_training_arguments"].items():
        assert parser.get_default(name) == spec.get("default", False if spec.get("action") == "store_true" else None), name
        assert name not in SDXL_UNSUPPORTED and re.search(rf"\.{name}\b|[\"']{name}[\"']", sources), name
    for name in ("v2", "clip_skip"):  # accepted by train_network.py, meaningless for SDXL
        with pytest.raises(SystemExit):
            parse_args(parser, [f"--{name}"] if name == "v2" else [f"--{name}", "3"])
        assert "is not supported" in capsys.readouterr().err
