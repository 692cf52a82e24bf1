"""Flag values the LoRA tools share (precision names, devices, output files), read the same way by every tool,
and the wording of counts in their messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.saving import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX

# sd-scripts' spellings for --save_precision / --precision / --load_precision.
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sd-scripts' family flags (flag, family, label); the tools read the family from the files instead.
_FAMILY_FLAGS = (("--v2", "sd2", "SD2"), ("--sdxl", "sdxl", "SDXL"))


def parse_device(name: str | None, flag: str = "--device") -> str:
    """A device flag as given ("cpu" when left out), refused in one line when torch does not know it or lacks it."""
    if name is None:
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{flag} {name!r}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available here; leave {flag} out to use the CPU")
    return name


def check_save_to(path: Path | str, flag: str = "--save_to") -> Path:
    """The output file, refused in one line unless it ends in a suffix the savers write."""
    if Path(path).suffix.lower() not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        raise ValueError(f"{flag} {path}: must end in {SAFETENSORS_SUFFIX}, {', '.join(PICKLE_SUFFIXES[:-1])} "
                         f"or {PICKLE_SUFFIXES[-1]}")
    return Path(path)


def plural(count: int, noun: str) -> str:
    """"1 module", "3 modules"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def add_family_flags(parser: argparse.ArgumentParser, read_from: str) -> None:
    """--v2 / --sdxl, accepted so that sd-scripts command lines run; `read_from` names what the family is read from."""
    group = parser.add_argument_group(f"compatibility (the family is read from {read_from})")
    for flag, _, label in _FAMILY_FLAGS:
        group.add_argument(flag, action="store_true", help=f"accepted for sd-scripts command lines; {label} is detected")


def given_family_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, family) of each --v2 / --sdxl flag given: a tool warns when the files say otherwise."""
    return [(flag, family) for flag, family, _ in _FAMILY_FLAGS if getattr(args, flag.removeprefix("--"))]
