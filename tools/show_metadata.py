"""Print a safetensors file's metadata readably: training keys (ss_*), ModelSpec (modelspec.*), hashes.

    python tools/show_metadata.py my_lora.safetensors [--json]

A header line gives the tensor count, total parameters and dtypes; JSON-valued keys (ss_tag_frequency,
ss_bucket_info, ss_network_args, ss_datasets, ...) are pretty-printed, and very long plain values (an
embedded thumbnail) are shortened. --json prints the raw metadata as sorted, indented JSON, as sd-scripts'
tools/show_metadata.py does (its --model flag is accepted too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (sd-scripts' way): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors import safe_open

from library.console import exit_on_user_error

_LONG_VALUE = 200  # characters of a plain value shown before it is shortened
_SECTIONS = (("training", "ss_"), ("modelspec", "modelspec."), ("hashes", "sshs_"))


@dataclass(frozen=True)
class FileSummary:
    tensor_count: int
    parameter_count: int
    dtypes: Counter  # dtype name -> number of tensors
    metadata: dict[str, str] | None


def read_summary(path: Path) -> FileSummary:
    """Tensor shapes and metadata from a safetensors header (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as file:
            slices = [file.get_slice(key) for key in file.keys()]
            shapes = [slice_.get_shape() for slice_ in slices]
            dtypes = Counter(slice_.get_dtype() for slice_ in slices)
            metadata = file.metadata()
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a safetensors file ({error})") from error
    return FileSummary(tensor_count=len(shapes), parameter_count=sum(math.prod(shape) for shape in shapes),
                       dtypes=dtypes, metadata=metadata)


def header_line(path: Path, summary: FileSummary) -> str:
    dtypes = ", ".join(f"{name} x{count}" for name, count in summary.dtypes.most_common())
    return f"{Path(path).name}: {summary.tensor_count} tensors, {summary.parameter_count:,} parameters ({dtypes or 'none'})"


def format_metadata(metadata: dict[str, str]) -> str:
    """Keys grouped (training, modelspec, hashes, other), sorted within each group, JSON values indented."""
    groups: dict[str, list[str]] = {}
    for key in sorted(metadata):
        section = next((name for name, prefix in _SECTIONS if key.startswith(prefix)), "other")
        groups.setdefault(section, []).append(key)
    lines = []
    for section in [name for name, _ in _SECTIONS] + ["other"]:
        if section not in groups:
            continue
        lines.append(f"{section}:")
        lines.extend(_format_entry(key, metadata[key]) for key in groups[section])
    return "\n".join(lines)


def _format_entry(key: str, value: str) -> str:
    parsed = _json_container(value)
    if parsed is not None:
        body = json.dumps(parsed, indent=2, ensure_ascii=False).replace("\n", "\n    ")
        return f"  {key}:\n    {body}"
    if len(value) > _LONG_VALUE:
        value = f"{value[:60]}... ({len(value):,} characters)"
    return f"  {key}: {value}"


def _json_container(value: str) -> dict | list | None:
    """The value as a JSON object or array, or None when it is a plain string."""
    if not value.lstrip().startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def show(path: Path, raw_json: bool) -> str:
    """The text to print for `path`; raises ValueError when it has no metadata."""
    summary = read_summary(path)
    if not summary.metadata:
        raise ValueError(f"{path}: no metadata ({header_line(path, summary)}); it was saved without any "
                         "(e.g. --no_metadata, or a .ckpt converted by another tool)")
    if raw_json:
        return json.dumps(summary.metadata, indent=4, sort_keys=True, ensure_ascii=False)
    return f"{header_line(path, summary)}\n{format_metadata(summary.metadata)}"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print a safetensors file's metadata readably.")
    parser.add_argument("file", nargs="?", help="a .safetensors file (a LoRA or any model)")
    parser.add_argument("--model", help="the file, as sd-scripts' show_metadata.py takes it")
    parser.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.model is None):
        parser.error("give the file once: as the positional argument or as --model")
    text = exit_on_user_error(lambda: show(Path(args.file or args.model), args.json), (ValueError, OSError))
    print(text)


if __name__ == "__main__":
    main()
