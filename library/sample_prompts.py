"""Sample prompts for preview images: sd-scripts' .txt syntax, or .toml / .json lists.

A .txt line reads `a photo of a dog --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a`
(`--n` negative prompt, `--w/--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler). Lines
starting with `#` and empty lines are skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import toml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    cfg_scale: float = 7.5
    steps: int = 30
    sampler: str | None = None  # None: --sample_sampler


_TXT_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                "l": ("cfg_scale", float), "s": ("steps", int), "ss": ("sampler", str)}
_TABLE_KEYS = {"prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "width": ("width", int),
               "height": ("height", int), "seed": ("seed", int), "scale": ("cfg_scale", float),
               "sample_steps": ("steps", int), "sample_sampler": ("sampler", str)}


def parse_prompt_line(line: str, *, source: str = "prompt") -> SamplePrompt:
    head, *options = line.split(" --")
    sample = SamplePrompt(prompt=head.strip())
    for option in options:
        name, _, value = option.strip().partition(" ")
        if name not in _TXT_OPTIONS:
            logger.warning("%s: unknown sample option --%s ignored (known: %s)", source, name, ", ".join(_TXT_OPTIONS))
            continue
        field, cast = _TXT_OPTIONS[name]
        try:
            sample = replace(sample, **{field: cast(value.strip())})
        except ValueError:
            raise ValueError(f"{source}: --{name} needs a {cast.__name__}, got '{value.strip()}'") from None
    return sample


def _from_table(entry: dict, source: str) -> SamplePrompt:
    unknown = set(entry) - set(_TABLE_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown sample prompt keys {sorted(unknown)} (known: {sorted(_TABLE_KEYS)})")
    if "prompt" not in entry:
        raise ValueError(f"{source}: every sample prompt needs a 'prompt'")
    return SamplePrompt(**{_TABLE_KEYS[k][0]: _TABLE_KEYS[k][1](v) for k, v in entry.items()})


def load_sample_prompts(path: Path) -> list[SamplePrompt]:
    """Read a prompt file by its suffix (.txt, .toml with [[prompt]] tables, .json list of objects)."""
    path = Path(path)
    if path.suffix == ".toml":
        entries = toml.load(path).get("prompt", [])
        return [_from_table(e, f"{path}[{i}]") for i, e in enumerate(entries)]
    if path.suffix == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [_from_table(e, f"{path}[{i}]") for i, e in enumerate(entries)]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_prompt_line(line, source=f"{path}:{n}") for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]
