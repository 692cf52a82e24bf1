"""Command-line parsing for the training scripts: sd-scripts' flags, --config_file / --output_config, and the
checks that need no model.

``setup_parser_for(TRAINING_FLAGS)`` builds the parser from the flag table in ``library.args_groups`` (or
``add_training_flags(parser)`` adds the same flags to a parser of your own); ``parse_args(parser)`` returns the
one Namespace the rest of the program sees. It

1. fills flags from ``--config_file`` (a flat TOML; command-line flags override it, as in sd-scripts; a key
   that is no flag, as front ends such as the kohya_ss GUI write, is a warning, not an error),
2. reads sd-scripts' spellings of "off" (``dynamo_backend = "no"``, ``max_token_length = 75``) as the default,
3. rejects flags listed in ``UNSUPPORTED`` only when their value asks for the missing behaviour: the values
   that mean "off" (unset, 0, "", false, the default, a family's ignored values) and settings of a feature that
   is itself off (``zero_stage`` without ``--deepspeed``) pass with a debug note, so configs that write every key
   still run,
4. rejects combinations that cannot work (``parser.error``: one line, exit status 2),
5. folds sd-scripts' legacy spellings into their modern flags in a new Namespace (the legacy names are gone
   from it, so nothing downstream can read them), and
6. with ``--output_config``, writes the given flags to the ``--config_file`` path and exits 0.

``parse_flags`` returns the notes of steps 1-3 for the caller to log once logging is set up; ``parse_args``
logs them at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, NoReturn, Sequence

from library.args_groups import TRAINING_FLAGS, Flag, FlagGroup, int_or_float

try:
    from tomllib import loads as _toml_loads  # Python 3.11+: the standard library's TOML 1.0 reader
except ImportError:  # Python 3.10
    from toml import loads as _toml_loads

__all__ = [
    "CLIP_SKIP_IGNORED", "HANDLED_HERE", "INERT_UNLESS", "LEGACY_ALIASES", "OFF_SPELLINGS", "OUR_ADDITIONS", "TRAINING_FLAGS",
    "UNSUPPORTED", "ConfigFile", "ConfigFileError", "FlagNote", "TrainingParser", "add_flag_groups",
    "add_training_flags", "config_path", "int_or_float", "log_notes", "merge_flag_groups", "parse_args",
    "parse_flags", "parse_resolution", "read_config_file", "setup_parser_for", "write_config_file",
]

logger = logging.getLogger(__name__)

_HUB = "uploading to the Hugging Face Hub is not built in; upload the saved files with huggingface-cli"
_DEEPSPEED = "DeepSpeed is not supported yet; use plain DDP via accelerate launch"

UNSUPPORTED: Mapping[str, str] = MappingProxyType({
    "huggingface_repo_id": _HUB,
    "huggingface_repo_type": _HUB,
    "huggingface_path_in_repo": _HUB,
    "huggingface_token": _HUB,
    "huggingface_repo_visibility": _HUB,
    "save_state_to_huggingface": _HUB,
    "resume_from_huggingface": _HUB,
    "async_upload": _HUB,
    "deepspeed": _DEEPSPEED,
    "zero_stage": _DEEPSPEED,
    "offload_optimizer_device": _DEEPSPEED,
    "offload_optimizer_nvme_path": _DEEPSPEED,
    "offload_param_device": _DEEPSPEED,
    "offload_param_nvme_path": _DEEPSPEED,
    "zero3_init_flag": _DEEPSPEED,
    "zero3_save_16bit_model": _DEEPSPEED,
    "fp16_master_weights_and_gradients": _DEEPSPEED,
    "face_crop_aug_range": "face-centred crop augmentation is not implemented yet",
    "dataset_class": "custom dataset classes are not supported; describe the data with --dataset_config",
    "conditioning_data_dir": "ControlNet-style conditioning data is not used for LoRA training",
    "v_pred_like_loss": "the v-prediction-like loss is not implemented yet",
    "fused_backward_pass": "the fused backward pass is for full fine-tuning; LoRA training does not use it",
})
"""Flags of train_network.py that this trainer rejects, each with the one-line reason the user sees.
Delete an entry to accept the flag once the trainer implements it. Only a value that asks for the behaviour is
rejected: see ``_asks_for`` (off values pass) and ``INERT_UNLESS``."""

_HUB_SETTINGS = ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                 "huggingface_repo_visibility", "async_upload")
_DEEPSPEED_SETTINGS = ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                       "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                       "fp16_master_weights_and_gradients")
INERT_UNLESS: Mapping[str, str] = MappingProxyType({
    **{name: "huggingface_repo_id" for name in _HUB_SETTINGS},
    **{name: "deepspeed" for name in _DEEPSPEED_SETTINGS},
    "noise_offset_random_strength": "noise_offset",
    "adaptive_noise_scale": "noise_offset",
    "ip_noise_gamma_random_strength": "ip_noise_gamma",
    "multires_noise_discount": "multires_noise_iterations",
})
"""Settings of a feature that do nothing unless the flag on the right turns the feature on (as in sd-scripts).
A rejected setting is only refused when its feature is on, so configs that write every key at its default pass."""

OFF_SPELLINGS: Mapping[str, Any] = MappingProxyType({"dynamo_backend": "no", "max_token_length": 75})
"""Values sd-scripts and its front ends write for "off" / "the default", read as the flag's default here:
accelerate's ``dynamo_backend = "no"`` (nothing is compiled without --torch_compile) and the kohya_ss GUI's
``max_token_length = 75`` (sd-scripts' default caption length). Both are among the flags' choices."""

CLIP_SKIP_IGNORED: Mapping[str, tuple[Any, ...]] = MappingProxyType({"clip_skip": (1, 2)})
"""For families that always condition on fixed layers (SDXL, SD3), where sd-scripts ignores --clip_skip: the values
front ends write by default (1, or 2 for "penultimate") are noted, any other value is refused."""

_CLOSEST_FLAG = MappingProxyType({"epoch": "max_train_epochs", "max_resolution": "resolution",
                                  "lr_warmup": "lr_warmup_steps", "optimizer": "optimizer_type"})
"""Keys that front ends write which are no flag, and the flag that does what the key's name says (difflib finds
no close spelling for these)."""

LEGACY_ALIASES: Mapping[str, str] = MappingProxyType({
    "caption_extention": "caption_extension",
    "use_8bit_adam": "optimizer_type",
    "use_lion_optimizer": "optimizer_type",
})
"""Old spellings parse_args folds into the flag on the right; they are absent from its result."""

_COMMAND_LINE_ONLY = frozenset({"config_file", "output_config"})

HANDLED_HERE = frozenset({*_COMMAND_LINE_ONLY, *LEGACY_ALIASES})
"""Flags whose whole meaning is implemented in this module, so no other code needs to read them."""

OUR_ADDITIONS: frozenset[str] = frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                                            "text_encoder_batch_size", "dry_run"})
"""Flags we define beyond sd-scripts' train_network.py: sd-scripts offers text-encoder output caching only for
SDXL and SD3 (same names there); we offer it for SD1.x/2.x too. --dry_run is ours alone."""

_REJECTED_TITLE = "not supported (rejected if given)"
_REJECTED_DESCRIPTION = ("sd-scripts has these flags but this trainer does not implement them; rather than "
                         "ignore one silently, training stops with the reason when a value asks for the missing "
                         "behaviour (an off value such as 0, \"\" or false is accepted).")


_METAVARS: Mapping[Any, str] = MappingProxyType(
    {int: "N", float: "X", int_or_float: "N|RATIO", str: "TEXT", Path: "PATH"})


class ConfigFileError(ValueError):
    """A --config_file that cannot be read, or holds a value no flag accepts."""


@dataclass(frozen=True)
class FlagNote:
    """Something parsing decided that the user should hear about once logging is set up."""

    level: int  # a logging level
    message: str


def log_notes(notes: Iterable[FlagNote]) -> None:
    for note in notes:
        logger.log(note.level, "%s", note.message)


@dataclass(frozen=True)
class ConfigFile:
    """The flag values of a --config_file, typed, and one message per key that names no flag (ignored)."""

    values: dict[str, Any]
    ignored: tuple[str, ...]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default after its help unless the default says nothing (unset, off or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default in ("", argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class TrainingParser(argparse.ArgumentParser):
    """An ArgumentParser built from a flag table; it keeps the table, so parse_args knows which flags it
    rejects and why, how to type --config_file values and where --output_config puts each flag."""

    def __init__(self, groups: Sequence[FlagGroup], unsupported: Mapping[str, str],
                 ignored_values: Mapping[str, tuple[Any, ...]] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("usage", "%(prog)s [--flag value ...]  (or --config_file FILE.toml)")
        super().__init__(formatter_class=_HelpFormatter, **kwargs)
        self.flag_groups = tuple(groups)
        self.unsupported: Mapping[str, str] = MappingProxyType(dict(unsupported))
        # Values of rejected flags that this family ignores, as sd-scripts does (SDXL's clip_skip 1 or 2).
        self.ignored_values: Mapping[str, tuple[Any, ...]] = MappingProxyType(dict(ignored_values or {}))
        if set(self.ignored_values) - set(self.unsupported):
            raise ValueError(f"ignored values are for rejected flags only: {sorted(set(self.ignored_values) - set(self.unsupported))}")
        self.flag_actions = add_flag_groups(self, self.flag_groups, self.unsupported)

    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2; argparse's default would print the usage of ~190 flags first.
        A misspelt flag gets the closest real one."""
        if message.startswith("unrecognized arguments:"):
            message += "".join(_spelling_hints(self, message.split(":", 1)[1].split()))
        self.exit(2, f"{self.prog}: error: {message}\n")


def _spelling_hints(parser: argparse.ArgumentParser, words: list[str]) -> Iterator[str]:
    for word in words:
        if word.startswith("--"):
            close = difflib.get_close_matches(word[2:].split("=", 1)[0], _flags(parser), n=1)
            if close:
                yield f" (did you mean --{close[0]}?)"


def add_flag_groups(parser: argparse.ArgumentParser, groups: Sequence[FlagGroup],
                    unsupported: Mapping[str, str]) -> dict[str, argparse.Action]:
    """Declare the flags, one --help section per group, the unsupported ones last in a section of their own
    whose help is the reason. Returns each flag's argparse action by name."""
    unknown = set(unsupported) - {f.name for group in groups for f in group.flags}
    if unknown:
        raise ValueError(f"the unsupported-flag table names flags this parser lacks: {sorted(unknown)}")
    actions: dict[str, argparse.Action] = {}
    for group in groups:
        accepted = [f for f in group.flags if f.name not in unsupported]
        if accepted:
            section = parser.add_argument_group(group.title, group.description)
            actions.update((f.name, _add_flag(section, f, f.help)) for f in accepted)
    rejected = [f for group in groups for f in group.flags if f.name in unsupported]
    if rejected:
        section = parser.add_argument_group(_REJECTED_TITLE, _REJECTED_DESCRIPTION)
        actions.update((f.name, _add_flag(section, f, unsupported[f.name])) for f in rejected)
    return actions


def _add_flag(section: argparse._ArgumentGroup, f: Flag, help: str) -> argparse.Action:
    options = dict(f.options)
    if "metavar" not in options and "choices" not in options and options.get("type") in _METAVARS:
        options["metavar"] = _METAVARS[options["type"]]
    return section.add_argument(f"--{f.name}", dest=f.name, help=help, **options)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of train_network.py on a parser of your own. parse_args reads such a parser with this
    module's TRAINING_FLAGS and UNSUPPORTED; setup_parser_for also gives one-line errors and family flags."""
    add_flag_groups(parser, TRAINING_FLAGS, UNSUPPORTED)


def merge_flag_groups(*flag_sets: Iterable[FlagGroup]) -> tuple[FlagGroup, ...]:
    """One table from several: groups with the same key are joined, a flag declared twice identically is kept
    once (sd-scripts declares some flags in two places), and two different declarations are an error."""
    merged: dict[str, FlagGroup] = {}
    seen: dict[str, Flag] = {}
    for group in chain.from_iterable(flag_sets):
        fresh = []
        for f in group.flags:
            if f.name in seen and seen[f.name] != f:
                raise ValueError(f"--{f.name} is declared twice with different options")
            if f.name not in seen:
                seen[f.name] = f
                fresh.append(f)
        earlier = merged.get(group.key)
        merged[group.key] = replace(earlier or group, flags=(earlier.flags if earlier else ()) + tuple(fresh))
    return tuple(merged.values())


def setup_parser_for(*flag_sets: Iterable[FlagGroup], unsupported: Mapping[str, str] = UNSUPPORTED,
                     ignored_values: Mapping[str, tuple[Any, ...]] | None = None, prog: str | None = None,
                     description: str | None = None) -> TrainingParser:
    """The parser of an entry script: ``setup_parser_for(TRAINING_FLAGS)`` for train_network.py; a family
    passes its own groups too, e.g. ``setup_parser_for(TRAINING_FLAGS, SDXL_FLAGS)``. ``ignored_values`` names,
    per rejected flag, values the family accepts because it ignores the flag (noted, not refused)."""
    return TrainingParser(merge_flag_groups(*flag_sets), unsupported, ignored_values, prog=prog,
                          description=description)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """parse_flags, logging its notes at once (entry scripts log them after setting up logging)."""
    args, notes = parse_flags(parser, argv)
    log_notes(notes)
    return args


def parse_flags(parser: argparse.ArgumentParser,
                argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[FlagNote]]:
    """The validated flags of one run and the notes parsing made (see the module docstring for the steps).
    Exits on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = parser.parse_args(argv)
    missing = {f.name for f in _flags(parser).values()} - set(vars(given))
    if missing:
        raise TypeError(f"parse_args needs a parser from setup_parser_for() or add_training_flags(); this one "
                        f"lacks {len(missing)} of their flags, e.g. --{sorted(missing)[0]}")
    notes: list[FlagNote] = []
    try:
        raw = _with_config_file(parser, given, argv, notes)
    except ConfigFileError as error:
        parser.error(str(error))
    read = _read_off_spellings(parser, raw, notes)
    problem = next(_unsupported_flags(parser, read, notes), None)
    if problem:
        parser.error(problem)
    # A rejected flag that got here does nothing: the rest of the program sees its default.
    read = argparse.Namespace(**{**vars(read), **{name: parser.get_default(name) for name in _unsupported(parser)}})
    problem = next(_conflicts(read), None)
    if problem:
        parser.error(problem)
    args = _normalised(parser, read, notes)
    if raw.output_config:
        _output_config(parser, raw)
    return args, notes


def _with_config_file(parser: argparse.ArgumentParser, given: argparse.Namespace, argv: list[str],
                      notes: list[FlagNote]) -> argparse.Namespace:
    """Parse again on top of the file's values: argparse only fills in defaults for flags the namespace lacks,
    so the file's values act as defaults and the command line still overrides them."""
    if not given.config_file or given.output_config:
        return given
    config = read_config_file(parser, config_path(given.config_file))
    notes += [FlagNote(logging.WARNING, message) for message in config.ignored]
    return parser.parse_args(argv, namespace=argparse.Namespace(**config.values))


def _output_config(parser: argparse.ArgumentParser, raw: argparse.Namespace) -> NoReturn:
    if not raw.config_file:
        parser.error("--output_config writes to the path given with --config_file; add --config_file FILE.toml")
    path = config_path(raw.config_file)
    try:
        write_config_file(parser, raw, path)
    except ConfigFileError as error:
        parser.error(str(error))
    print(f"wrote the flags to {path}")
    parser.exit(0)


def _flag_groups(parser: argparse.ArgumentParser) -> tuple[FlagGroup, ...]:
    """The table a parser was built from: its own, or train_network.py's for a parser of add_training_flags."""
    return parser.flag_groups if isinstance(parser, TrainingParser) else TRAINING_FLAGS


def _flags(parser: argparse.ArgumentParser) -> dict[str, Flag]:
    return {f.name: f for group in _flag_groups(parser) for f in group.flags}


def _unsupported(parser: argparse.ArgumentParser) -> Mapping[str, str]:
    return parser.unsupported if isinstance(parser, TrainingParser) else UNSUPPORTED


def _unsupported_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       notes: list[FlagNote]) -> Iterator[str]:
    """A rejected flag fails only when its value asks for what is missing; any other value it holds is noted
    (and then replaced by the default)."""
    unsupported = _unsupported(parser)
    ignored = parser.ignored_values if isinstance(parser, TrainingParser) else {}
    for name, reason in unsupported.items():
        value = getattr(args, name)
        if value == parser.get_default(name):
            continue
        master = INERT_UNLESS.get(name)
        if value in ignored.get(name, ()):
            notes.append(FlagNote(logging.INFO, f"--{name} {value} has no effect here: {reason}"))
        elif not _asks_for(value):
            notes.append(FlagNote(logging.DEBUG, f"--{name} {value!r} is off, as its default; accepted ({reason})"))
        elif master and not _asks_for(getattr(args, master)):
            notes.append(FlagNote(logging.DEBUG, f"--{name} {value!r} does nothing without --{master}; accepted"))
        else:
            yield f"--{name} is not supported: {reason}"


def _asks_for(value: Any) -> bool:
    """Whether a flag value turns something on: unset, false, zero, "" and an empty list are off."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    return len(value) > 0 if isinstance(value, (str, list, tuple)) else True


def _read_off_spellings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        notes: list[FlagNote]) -> argparse.Namespace:
    """sd-scripts' and accelerate's spellings of "off" become the flag's default (see OFF_SPELLINGS)."""
    off = {name: spelling for name, spelling in OFF_SPELLINGS.items() if getattr(args, name) == spelling}
    if not off:
        return args
    if "dynamo_backend" in off and args.torch_compile:
        parser.error("--torch_compile with --dynamo_backend no compiles nothing; pick a backend (e.g. inductor) or "
                     "drop --torch_compile")
    for name, spelling in off.items():
        notes.append(FlagNote(logging.DEBUG, f"--{name} {spelling!r} means the default here "
                                             f"({parser.get_default(name)!r})"))
    return argparse.Namespace(**{**vars(args), **{name: parser.get_default(name) for name in off}})


# --- config files -------------------------------------------------------------------------------------------


def config_path(config_file: str) -> Path:
    """The TOML path of --config_file; like sd-scripts, ".toml" may be left off."""
    return Path(config_file if config_file.endswith(".toml") else config_file + ".toml")


def read_config_file(parser: argparse.ArgumentParser, path: Path) -> ConfigFile:
    """Flag values from a TOML file, typed as the command line would type them.

    Tables are only for people: every key at any depth names a flag. A key that names no flag is ignored with a
    message naming the closest flag (sd-scripts ignores such keys, and front ends write some); a key set twice
    and values of the wrong type are errors naming the key and the file.
    """
    if not path.is_file():
        raise ConfigFileError(f"--config_file {path}: no such file")
    try:
        document = _toml_loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"--config_file {path} is not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    ignored: list[str] = []
    sections: dict[str, str] = {}
    for key, value, section in _flat_items(document, ""):
        if key in sections:
            raise ConfigFileError(f"{path}: '{key}' is set twice (in {sections[key] or 'the top level'} and "
                                  f"{section or 'the top level'}); keep one")
        sections[key] = section
        if key in _COMMAND_LINE_ONLY:
            raise ConfigFileError(f"{path}: '{key}' cannot be set inside a config file; give it on the command line")
        if key in _flags(parser):
            values[key] = _typed_value(parser, path, key, value)
        else:
            ignored.append(_unknown_key_message(parser, path, key))
    return ConfigFile(values, tuple(ignored))


def _flat_items(table: Mapping[str, Any], section: str) -> Iterator[tuple[str, Any, str]]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _flat_items(value, f"{section}.{key}" if section else f"[{key}]")
        else:
            yield key, value, section


_TOML_TYPES: Mapping[Any, tuple[tuple[type, ...], str]] = MappingProxyType({
    int: ((int, float), "a whole number"),
    float: ((int, float), "a number"),
    int_or_float: ((int, float), "a step count or a ratio"),
    str: ((str,), "a string"),
    Path: ((str,), "a path string"),
})


def _typed_value(parser: argparse.ArgumentParser, path: Path, key: str, value: Any) -> Any:
    f = _flags(parser)[key]
    if f.options.get("action") == "store_true":
        # Front ends write some switches as 0/1 (the kohya_ss GUI: persistent_data_loader_workers = 0).
        if not isinstance(value, bool) and value not in (0, 1):
            raise ConfigFileError(f"{path}: '{key}' is an on/off flag; write {key} = true or false")
        return bool(value)
    if f.options.get("nargs") in ("*", "+"):
        if not isinstance(value, list):
            raise ConfigFileError(f"{path}: '{key}' takes several values; write {key} = [{_toml_value(value)}]")
        return [_typed_scalar(f, path, item, key in _unsupported(parser)) for item in value]
    return _typed_scalar(f, path, value, key in _unsupported(parser))


def _typed_scalar(f: Flag, path: Path, value: Any, rejected: bool) -> Any:
    convert = f.options["type"]
    accepted, expected = _TOML_TYPES[convert]
    wrong = ConfigFileError(f"{path}: '{f.name}' must be {expected}, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (str, *accepted)):
        raise wrong
    if convert is int and isinstance(value, float):
        if not value.is_integer():  # front ends write whole numbers as 64.0
            raise wrong
        value = int(value)
    # Text converts exactly as it would on the command line; int_or_float reads numbers as text too.
    as_text = isinstance(value, str) or convert is int_or_float
    try:
        typed = convert(str(value) if as_text else value)
    except (ValueError, argparse.ArgumentTypeError):
        raise wrong from None
    choices = f.options.get("choices")
    # An off value of a rejected flag need not be one of its choices: it asks for nothing (offload_param_device = "").
    if choices is not None and typed not in choices and not (rejected and not _asks_for(typed)):
        listed = ", ".join(repr(c) for c in choices if c is not None)
        raise ConfigFileError(f"{path}: '{f.name}' must be one of {listed}, not {value!r}")
    return typed


def _unknown_key_message(parser: argparse.ArgumentParser, path: Path, key: str) -> str:
    close = _CLOSEST_FLAG.get(key) or next(iter(difflib.get_close_matches(key, _flags(parser), n=1)), None)
    hint = f" (the closest flag is '{close}')" if close else ""
    return f"{path}: '{key}' is not a flag of {parser.prog}; ignored{hint}"


def write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path) -> None:
    """Write the flags that differ from their defaults as TOML, one table per --help group, like sd-scripts'
    --output_config. The W&B API key is left out so the file can be shared. Never overwrites a file."""
    left_out = {"config_file", "output_config", "wandb_api_key"}
    lines: list[str] = []
    for group in _flag_groups(parser):
        entries = [(f.name, getattr(args, f.name)) for f in group.flags if f.name not in left_out]
        changed = [(name, value) for name, value in entries
                   if value is not None and value != parser.get_default(name)]
        if changed:
            lines += [f"[{group.key}]", *(f"{name} = {_toml_value(value)}" for name, value in changed), ""]
    try:
        with path.open("x", encoding="utf-8") as file:  # "x": fails instead of replacing an existing file
            file.write("\n".join(lines))
    except FileExistsError:
        raise ConfigFileError(f"--output_config: {path} already exists; remove it or choose another --config_file") \
            from None
    except OSError as error:
        raise ConfigFileError(f"--output_config: cannot write {path}: {error.strerror}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr gives TOML's spelling, including inf and nan
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


# --- checks and normalisation ---------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) from --resolution's "size" or "width,height"."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, 2) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--resolution '{text}' must be one size or 'width,height' in pixels, e.g. 512 or 512,768")
    width, height = (int(parts[0]), int(parts[-1]))
    return width, height


_AT_LEAST_ONE = (
    "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "network_dim",
    "vae_batch_size", "dataset_repeats", "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio",
    "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state",
    "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "lr_scheduler_num_cycles",
)
_PROBABILITIES = ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout", "validation_split")


def _conflicts(args: argparse.Namespace) -> Iterator[str]:
    """Every reason these flags cannot train, as one-line messages that say what to change."""
    yield from _range_problems(args)
    yield from _alias_conflicts(args)
    yield from _precision_conflicts(args)
    yield from _network_conflicts(args)
    yield from _saving_conflicts(args)
    yield from _noise_conflicts(args)
    yield from _memory_conflicts(args)
    if args.resolution is not None:
        try:
            parse_resolution(args.resolution)
        except ValueError as error:
            yield str(error)


def _memory_conflicts(args: argparse.Namespace) -> Iterator[str]:
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        yield "--cpu_offload_checkpointing offloads what gradient checkpointing keeps; add --gradient_checkpointing"
    if args.cpu_offload_checkpointing and getattr(args, "blocks_to_swap", None):
        yield "--blocks_to_swap and --cpu_offload_checkpointing both move data over the same bus; use one of them"


def _range_problems(args: argparse.Namespace) -> Iterator[str]:
    for name in _AT_LEAST_ONE:
        value = getattr(args, name)
        if value is not None and value < 1:
            yield f"--{name} must be at least 1, not {value}"
    for name in _PROBABILITIES:
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            yield f"--{name} is a fraction between 0 and 1, not {value}"


def _alias_conflicts(args: argparse.Namespace) -> Iterator[str]:
    if args.use_8bit_adam and args.use_lion_optimizer:
        yield "--use_8bit_adam and --use_lion_optimizer pick different optimizers; use --optimizer_type instead"
    for old, new in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, old) and args.optimizer_type:
            yield f"--{old} and --optimizer_type both pick the optimizer; drop --{old} (it means {new})"
    if args.caption_extention is not None and args.caption_extension not in (".caption", args.caption_extention):
        yield "--caption_extention and --caption_extension differ; keep only --caption_extension"


def _precision_conflicts(args: argparse.Namespace) -> Iterator[str]:
    for flag_name, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(args, flag_name) and args.mixed_precision != precision:
            yield f"--{flag_name} needs --mixed_precision {precision} (got '{args.mixed_precision}')"


def _network_conflicts(args: argparse.Namespace) -> Iterator[str]:
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        yield ("--network_train_unet_only and --network_train_text_encoder_only together leave nothing to "
               "train; keep one")
    if args.dim_from_weights and not args.network_weights:
        yield "--dim_from_weights reads the rank from --network_weights; give --network_weights FILE"


def _saving_conflicts(args: argparse.Namespace) -> Iterator[str]:
    epoch_saves = args.save_every_n_epochs is not None or args.save_n_epoch_ratio is not None
    step_saves = args.save_every_n_steps is not None
    keep_rules = (("save_last_n_epochs", epoch_saves, "--save_every_n_epochs (or --save_n_epoch_ratio)"),
                  ("save_last_n_epochs_state", epoch_saves, "--save_every_n_epochs (or --save_n_epoch_ratio)"),
                  ("save_last_n_steps", step_saves, "--save_every_n_steps"),
                  ("save_last_n_steps_state", step_saves, "--save_every_n_steps"))
    for name, saving, needed in keep_rules:
        if getattr(args, name) is not None and not saving:
            yield f"--{name} only prunes periodic saves; add {needed}"
        if name.endswith("_state") and getattr(args, name) is not None and not args.save_state:
            yield f"--{name} prunes saved training states; add --save_state"


def _noise_conflicts(args: argparse.Namespace) -> Iterator[str]:
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        yield "--adaptive_noise_scale adds to --noise_offset; give --noise_offset too"
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        yield "--scale_v_pred_loss_like_noise_pred only applies with --v_parameterization"
    if args.min_timestep is not None or args.max_timestep is not None:
        low = 0 if args.min_timestep is None else args.min_timestep
        high = 1000 if args.max_timestep is None else args.max_timestep
        if not 0 <= low < high <= 1000:
            yield f"timesteps must satisfy 0 <= --min_timestep < --max_timestep <= 1000 (got {low} and {high})"


def _normalised(parser: argparse.ArgumentParser, raw: argparse.Namespace,
                notes: list[FlagNote]) -> argparse.Namespace:
    """A new Namespace with the legacy spellings folded in and sd-scripts' implied settings applied."""
    values = {name: value for name, value in vars(raw).items() if name not in LEGACY_ALIASES}
    if raw.caption_extention is not None:
        values["caption_extension"] = raw.caption_extention
    if raw.use_8bit_adam:
        values["optimizer_type"] = "AdamW8bit"
    elif raw.use_lion_optimizer:
        values["optimizer_type"] = "Lion"
    if raw.cache_latents_to_disk:
        values["cache_latents"] = True  # the disk cache is filled through the in-memory one
    if raw.cache_text_encoder_outputs_to_disk:
        values["cache_text_encoder_outputs"] = True
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if values[name] is not None and values[name] <= 0:
            notes.append(FlagNote(logging.WARNING, f"--{name} {values[name]} turns preview images off, as in sd-scripts"))
            values[name] = None
    if raw.max_train_epochs is not None and raw.max_train_steps != parser.get_default("max_train_steps"):
        notes.append(FlagNote(logging.WARNING, f"--max_train_epochs {raw.max_train_epochs} overrides "
                                               f"--max_train_steps {raw.max_train_steps}"))
    return argparse.Namespace(**values)
