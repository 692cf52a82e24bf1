"""What the documentation claims about our command lines, extracted from Markdown and checked against the code.

``collect(path)`` reads one Markdown file into fenced blocks, the command lines in them that run one of our
scripts, and the flags named inline in prose. The ``check_*`` functions return problems as one-line strings
that start with ``file:line``; an empty list means the document agrees with the code. Nothing here runs a
training: commands are parsed by the parser the script itself builds (``setup_parser()``, or whatever function
of the script returns its ``argparse.ArgumentParser``), with the files they name allowed not to exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import logging
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator
from unittest import mock

REPO = Path(__file__).resolve().parents[1]

TRAINING_SCRIPTS = ("train_network.py", "sdxl_train_network.py", "sd3_train_network.py")
LORA_TOOLS = ("networks/merge_lora.py", "networks/resize_lora.py", "networks/extract_lora_from_models.py",
              "networks/check_lora_weights.py", "networks/svd_merge_lora.py", "tools/show_metadata.py")
"""Scripts the guides document. A missing one is a documentation error, except the LoRA tools listed in
``PENDING`` while they are being written."""

PENDING: frozenset[str] = frozenset()
"""Scripts the docs may describe before they exist (e.g. a tool being written): their commands and flags are
skipped until the file is there. Empty: every documented script must exist."""

DOC_SCOPES: dict[str, tuple[str, ...]] = {
    "docs/train_network.md": ("train_network.py",),
    "docs/sdxl_train_network.md": ("sdxl_train_network.py",),
    "docs/sd3_train_network.md": ("sd3_train_network.py",),
    "docs/zh/sdxl_train_network.md": ("sdxl_train_network.py",),
    "docs/zh/sd3_train_network.md": ("sd3_train_network.py",),
    "docs/config.md": ("train_network.py",),
}
"""Whose flags a guide's prose may name; other documents may name any training script's flags. A heading that
names one of our scripts narrows the scope to it for its section, and a line that names another script lets
that line name its flags too."""

PROMPT_OPTIONS = frozenset({"n", "w", "h", "d", "l", "s", "ss"})
"""The ``--x`` options of a sample-prompt line (library/sample_prompts.py), which prose may also mention."""

_SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh", ""}
_TEXT_LANGS = {"", "text", "txt", "plain"}
_SEPARATORS = {"&&", "||", ";", "|"}
_ELLIPSIS = {"…", "...", "..."}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][A-Za-z0-9_]*)")
_SCRIPT_NAME = re.compile(r"(?<![\w/.-])((?:networks/|tools/)?[A-Za-z_][\w]*\.py)\b")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_ERROR_LINE = re.compile(r"^(?P<prog>[\w./-]+\.py): error: (?P<message>.+)$")
_PROMPT_LINE = re.compile(r" --(?:n|w|h|d|l|s|ss) ")


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, and its lines with their line numbers in the file."""

    doc: str
    lang: str
    start: int
    lines: tuple[tuple[int, str], ...]

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@dataclass(frozen=True)
class Command:
    """One command line in a block that runs one of our scripts (by file or ``python -m`` module)."""

    doc: str
    line: int
    script: str
    """The script as a repository path, e.g. ``train_network.py`` or ``networks/merge_lora.py``."""
    argv: tuple[str, ...]
    lines: tuple[int, ...]
    """The file line of each argv token, for messages."""
    launcher: tuple[str, ...] = ()
    """``accelerate launch`` options before the script, when launched that way."""


@dataclass(frozen=True)
class InlineFlag:
    doc: str
    line: int
    flag: str
    scope: tuple[str, ...]
    launcher: bool = False
    """The flag is an ``accelerate launch`` option (it stands before the script in an inline command)."""


@dataclass
class Document:
    path: str
    blocks: list[Block] = field(default_factory=list)
    inline_flags: list[InlineFlag] = field(default_factory=list)

    def commands(self) -> list[Command]:
        return [command for block in self.blocks if block.lang in _SHELL_LANGS for command in block_commands(block)]


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


def collect(path: Path, doc: str | None = None) -> Document:
    doc = doc or relative(path)
    document = Document(doc)
    default_scope = DOC_SCOPES.get(doc, TRAINING_SCRIPTS)
    headings: list[tuple[int, tuple[str, ...]]] = []  # (level, scope) of the enclosing headings
    fence: tuple[str, str, int] | None = None  # (marker, lang, start line)
    body: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is not None:
            if match and match.group(2).startswith(fence[0][0]) and len(match.group(2)) >= len(fence[0]) \
                    and not line.strip()[len(match.group(2)):].strip():
                document.blocks.append(Block(doc, fence[1], fence[2], tuple(body)))
                fence, body = None, []
            else:
                body.append((number, line))
            continue
        if match:
            fence, body = (match.group(2), match.group(3).lower(), number), []
            continue
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            headings = [(lvl, scope) for lvl, scope in headings if lvl < level]
            named = tuple(name for name in _script_names(heading.group(2)))
            if named:
                headings.append((level, named))
        scope = headings[-1][1] if headings else default_scope
        document.inline_flags += _inline_flags(doc, number, line, scope)
    if fence is not None:
        document.blocks.append(Block(doc, fence[1], fence[2], tuple(body)))
    return document


def _script_names(text: str) -> list[str]:
    known = set(TRAINING_SCRIPTS) | set(LORA_TOOLS)
    names = []
    for name in _SCRIPT_NAME.findall(text):
        full = name if "/" in name else next((k for k in known if k.endswith("/" + name) or k == name), None)
        if full in known:
            names.append(full)
    return names


def _inline_flags(doc: str, number: int, line: str, scope: tuple[str, ...]) -> Iterator[InlineFlag]:
    line_scope = tuple(dict.fromkeys([*scope, *_script_names(line)]))
    for span in _INLINE.findall(line):
        script_at = None
        tokens = span.split()
        for index, token in enumerate(tokens):
            if _script_names(token):
                script_at = index
                break
        launched = span.lstrip().startswith("accelerate launch") and script_at is not None
        for index, token in enumerate(tokens):
            for flag in _FLAG.findall(token):
                if launched and index < script_at:
                    yield InlineFlag(doc, number, flag, (), launcher=True)
                elif script_at is not None and index > script_at:
                    yield InlineFlag(doc, number, flag, tuple(_script_names(tokens[script_at])))
                else:
                    yield InlineFlag(doc, number, flag, line_scope)


def _tokens(block: Block) -> Iterator[list[tuple[str, int]]]:
    """Shell words with their line numbers, one list per command (continuations joined, ``&&``/``;`` split)."""
    current: list[tuple[str, int]] = []
    for number, raw in block.lines:
        text = raw.rstrip()
        continued = text.endswith("\\")
        if continued:
            text = text[:-1]
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            words = text.split()
        for word in words:
            if word in _SEPARATORS:
                if current:
                    yield current
                current = []
            else:
                current.append((word, number))
        if not continued and current:
            yield current
            current = []
    if current:
        yield current


def _strip_notation(words: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Drop the documentation's own notation: ``…`` for omitted flags and ``[--flag=…]`` for optional ones."""
    kept = []
    optional = False
    for word, number in words:
        if word in _ELLIPSIS:
            continue
        if word.startswith("[--"):
            word, optional = word[1:], True
        if optional and word.endswith("]"):
            word, optional = word[:-1], False
        kept.append((word, number))
    return kept


def block_commands(block: Block) -> Iterator[Command]:
    for words in _tokens(block):
        words = _strip_notation(words)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0][0]):
            words = words[1:]  # VAR=value prefixes
        if not words:
            continue
        command = _command(block, words)
        if command is not None:
            yield command


def _command(block: Block, words: list[tuple[str, int]]) -> Command | None:
    program = words[0][0]
    launcher: list[str] = []
    rest = words[1:]
    if Path(program).name == "accelerate" and rest and rest[0][0] == "launch":
        rest = rest[1:]
        while rest and not rest[0][0].endswith(".py"):
            launcher.append(rest[0][0])
            rest = rest[1:]
        if not rest:
            return None
        script, rest = rest[0][0], rest[1:]
    elif re.fullmatch(r"python(3(\.\d+)?)?", Path(program).name):
        if not rest:
            return None
        if rest[0][0] == "-m" and len(rest) > 1:
            module = rest[1][0]
            script = module.replace(".", "/") + ".py"
            if not (REPO / module.split(".")[0]).exists():
                return None  # python -m pytest, pip, ...: not one of ours
            rest = rest[2:]
        else:
            script, rest = rest[0][0], rest[1:]
    elif program.endswith(".py"):
        script = program
    elif program in ("bash", "sh") and rest and rest[0][0].endswith(".sh"):
        script, rest = rest[0][0], rest[1:]  # a shell script of ours: it must exist; its arguments are its own
    else:
        return None
    script = script.removeprefix("./")
    return Command(block.doc, words[0][1], script, tuple(w for w, _ in rest), tuple(n for _, n in rest),
                   tuple(launcher))


# --------------------------------------------------------------------------- parsers


class DocCheckError(Exception):
    """A parser refused a documented command line."""


def module_name(script: str) -> str:
    return script.removesuffix(".py").replace("/", ".")


_BUILDER_NAMES = ("setup_parser", "build_parser", "make_parser", "get_parser", "create_parser", "parser",
                  "arg_parser", "argument_parser", "setup_argparse", "get_args_parser")


def _no_required_arguments(function) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in signature.parameters.values())


def parser_builder(script: str):
    """The function of the script that returns its ArgumentParser (found by name, then by trying functions
    whose name mentions a parser); a module-level parser object is returned as a constant builder."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the scripts import as modules from the repository root
    module = importlib.import_module(module_name(script))
    candidates = [getattr(module, name) for name in _BUILDER_NAMES if callable(getattr(module, name, None))]
    candidates += [value for name, value in vars(module).items()
                   if "parser" in name.lower() and inspect.isfunction(value) and value.__module__ == module.__name__]
    for candidate in candidates:
        if inspect.isfunction(candidate) and _no_required_arguments(candidate):
            try:
                parser = candidate()
            except Exception:  # noqa: BLE001 - a helper that needs arguments after all; try the next one
                continue
            if isinstance(parser, argparse.ArgumentParser):
                return candidate
    for value in vars(module).values():
        if isinstance(value, argparse.ArgumentParser):
            return lambda: value
    raise DocCheckError(f"{script} has no function that builds its argument parser (e.g. setup_parser())")


def build_parser(script: str) -> argparse.ArgumentParser:
    parser = parser_builder(script)()

    def refuse(message: str):
        raise DocCheckError(message)

    parser.error = refuse  # argparse reports through error(); raise instead of printing usage and exiting
    for action in parser._actions:  # the same for sub-command parsers, if any
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                action.choices[sub].error = refuse
    return parser


@lru_cache(maxsize=None)
def option_names(script: str) -> frozenset[str]:
    """Every ``--name`` the script's parser accepts, without the dashes."""
    parser = build_parser(script)
    return frozenset(option[2:] for option in parser._option_string_actions if option.startswith("--"))


@lru_cache(maxsize=None)
def launcher_option_names() -> frozenset[str]:
    from accelerate.commands.launch import launch_command_parser

    return frozenset(option[2:] for option in launch_command_parser()._option_string_actions if option.startswith("--"))


def script_status(script: str) -> str:
    """'ok', 'pending' (a LoRA tool still being written) or 'missing'."""
    if (REPO / script).is_file():
        return "ok"
    return "pending" if script in PENDING else "missing"


def parse_command(script: str, argv: list[str]) -> argparse.Namespace | None:
    """Parse as the script would, raising DocCheckError with the parser's message. Training parsers go through
    library.args.parse_args (unsupported flags and conflicts too) unless the command reads or writes a
    --config_file, which the documentation's example need not have at hand."""
    parser = build_parser(script)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from library.args import TrainingParser, parse_args

            reads_files = any(word.split("=")[0] in ("--config_file", "--output_config") for word in argv)
            if isinstance(parser, TrainingParser) and not reads_files:
                return parse_args(parser, argv)
            return parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None  # --help
            raise DocCheckError(f"the parser exited with status {exit_.code}") from None


# --------------------------------------------------------------------------- checks


def _where(doc: str, line: int) -> str:
    return f"{doc}:{line}"


def check_command(command: Command) -> list[str]:
    status = script_status(command.script)
    where = _where(command.doc, command.line)
    if status == "missing":
        return [f"{where}: {command.script} does not exist"]
    if status == "pending" or command.script.endswith(".sh"):
        return []
    problems = []
    if command.launcher:
        problems += _check_launcher(command)
    known = option_names(command.script)
    for word, number in zip(command.argv, command.lines):
        if word.startswith("--") and len(word) > 2:
            name = word[2:].split("=", 1)[0]
            if name not in known:
                problems.append(f"{_where(command.doc, number)}: --{name} is not a flag of {command.script}")
    if not problems:
        try:
            parse_command(command.script, list(command.argv))
        except DocCheckError as error:
            problems.append(f"{where}: {command.script} refuses this command: {error}")
    return problems


def _check_launcher(command: Command) -> list[str]:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    names = launcher_option_names()
    problems = [f"{_where(command.doc, command.line)}: --{w[2:].split('=')[0]} is not an option of accelerate launch"
                for w in command.launcher if w.startswith("--") and w[2:].split("=")[0] not in names]
    if problems:
        return problems

    def refuse(message: str):
        raise DocCheckError(message)

    parser.error = refuse
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args([*command.launcher, command.script])
    except DocCheckError as error:
        problems.append(f"{_where(command.doc, command.line)}: accelerate launch refuses its options: {error}")
    return problems


def check_inline_flags(document: Document) -> list[str]:
    problems = []
    for item in document.inline_flags:
        if item.launcher:
            if item.flag not in launcher_option_names():
                problems.append(f"{_where(item.doc, item.line)}: --{item.flag} is not an option of accelerate launch")
            continue
        if item.flag in PROMPT_OPTIONS:
            continue
        scripts = [s for s in item.scope if script_status(s) == "ok"]
        if any(item.flag in option_names(s) for s in scripts):
            continue
        if not any(script_status(s) == "pending" for s in item.scope):
            problems.append(f"{_where(item.doc, item.line)}: --{item.flag} is not a flag of {' or '.join(item.scope)}")
    return problems


def _sample_value(action: argparse.Action) -> list[str]:
    """argv that gives a flag a value other than its default."""
    if action.nargs == 0:
        return [action.option_strings[-1]]
    if action.choices:
        value = next(c for c in action.choices if c is not None and c != action.default)
        return [action.option_strings[-1], str(value)]
    kind = action.type
    value = {int: "7", float: "0.5"}.get(kind, "x")  # 7: not a value a family ignores (clip_skip 1/2 on SDXL)
    return [action.option_strings[-1], value]


def check_error_examples(block: Block) -> list[str]:
    """Lines like ``train_network.py: error: --deepspeed is not supported: ...`` are what the script prints when
    given that flag."""
    problems = []
    for number, line in block.lines:
        match = _ERROR_LINE.match(line.strip())
        if not match:
            continue
        prog, message = match.group("prog"), match.group("message")
        where = _where(block.doc, number)
        if script_status(prog) != "ok":
            problems.append(f"{where}: {prog} does not exist")
            continue
        flag = re.match(r"--(\w+) is not supported", message)
        if not flag:
            continue
        parser = build_parser(prog)
        action = parser._option_string_actions.get(f"--{flag.group(1)}")
        if action is None:
            problems.append(f"{where}: --{flag.group(1)} is not a flag of {prog}")
            continue
        try:
            parse_command(prog, _sample_value(action))
            problems.append(f"{where}: {prog} accepts --{flag.group(1)}, but the guide shows it refused")
        except DocCheckError as error:
            if str(error) != message:
                problems.append(f"{where}: {prog} prints '{error}', not the documented '{message}'")
    return problems


def is_prompt_block(block: Block) -> bool:
    return block.lang in _TEXT_LANGS and any(_PROMPT_LINE.search(" " + line + " ") for _, line in block.lines) \
        and not any(_ERROR_LINE.match(line.strip()) for _, line in block.lines)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_prompt_lines(block: Block) -> list[str]:
    from library.sample_prompts import parse_prompt_line

    problems = []
    logger = logging.getLogger("library.sample_prompts")
    for number, line in block.lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        handler = _Warnings()
        logger.addHandler(handler)
        try:
            parse_prompt_line(line, source=_where(block.doc, number))
        except ValueError as error:
            problems.append(str(error))
        finally:
            logger.removeHandler(handler)
        problems += handler.messages  # they start with the source given above
    return problems


def _validate_dataset(raw: dict, source: str) -> list[str]:
    from library.dataset import config as dataset_config

    # The guide's folders are examples: check keys, types and inheritance, not that /data/... exists here.
    with mock.patch.object(dataset_config, "_check_paths", lambda *args, **kwargs: None):
        try:
            dataset_config.build_dataset_configs(raw, dataset_config.DatasetOptions(), source=source)
        except dataset_config.DatasetConfigError as error:
            return [str(error)]
    return []


def _validate_prompts(text: str, suffix: str, source: str) -> list[str]:
    from library.sample_prompts import load_sample_prompts

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            load_sample_prompts(path)
        except (ValueError, TypeError) as error:
            return [f"{source}: {error}"]
    return []


def _validate_flag_file(text: str, scripts: tuple[str, ...], source: str) -> list[str]:
    from library.args import ConfigFileError, read_config_file

    problems = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "args.toml"
        path.write_text(text, encoding="utf-8")
        for script in scripts:
            try:
                ignored = read_config_file(build_parser(script), path).ignored
            except ConfigFileError as error:
                ignored = (str(error),)
            if not ignored:
                return []
            problems.append(f"{source}: {ignored[0].replace(str(path), 'config file')}")
    return problems[:1]


def check_structured_block(block: Block, scope: tuple[str, ...]) -> list[str]:
    """```toml blocks are dataset configs, sample-prompt files or --config_file flag files, and must pass the
    checks that file gets at run time; ```json blocks must be JSON (and the same checks where they apply);
    ```python blocks must compile."""
    source = _where(block.doc, block.start)
    if block.lang == "toml":
        import toml

        try:
            data = toml.loads(block.text)
        except toml.TomlDecodeError as error:
            return [f"{source}: not valid TOML: {' '.join(str(error).split())}"]
        if "datasets" in data or "general" in data:
            return _validate_dataset(data, f"{source} (dataset config)")
        if "prompt" in data:
            return _validate_prompts(block.text, ".toml", source)
        scripts = tuple(s for s in scope if s in TRAINING_SCRIPTS) or TRAINING_SCRIPTS
        return _validate_flag_file(block.text, scripts, source)
    if block.lang in ("python", "py"):
        try:
            compile(block.text, source, "exec")
        except SyntaxError as error:
            return [f"{_where(block.doc, block.start + (error.lineno or 1))}: not valid Python: {error.msg}"]
        return []
    if block.lang == "json":
        try:
            data = json.loads(block.text)
        except json.JSONDecodeError as error:
            return [f"{source}: not valid JSON: {error}"]
        if isinstance(data, dict) and ("datasets" in data or "general" in data):
            return _validate_dataset(data, f"{source} (dataset config)")
        if isinstance(data, list) and data and all(isinstance(e, dict) and "prompt" in e for e in data):
            return _validate_prompts(block.text, ".json", source)
    return []


def check_document(document: Document) -> list[str]:
    """Every problem of one document: commands, inline flags, structured blocks, prompt lines, error examples."""
    problems = []
    for command in document.commands():
        problems += check_command(command)
    problems += check_inline_flags(document)
    scope = DOC_SCOPES.get(document.path, TRAINING_SCRIPTS)
    for block in document.blocks:
        problems += check_structured_block(block, scope)
        if is_prompt_block(block):
            problems += check_prompt_lines(block)
        if block.lang in _TEXT_LANGS:
            problems += check_error_examples(block)
    return problems
