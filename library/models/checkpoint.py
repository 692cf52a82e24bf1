"""Reading single-file checkpoints and telling the model families apart.

Everything here works on plain state dicts (key -> tensor); building models from them is the job of
the per-family loaders (``sd_loading.py`` and its SDXL/SD3 siblings).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from torch import Tensor


class CheckpointError(ValueError):
    """A model file that is missing, unreadable or not what the script expects; the message names the file."""


# Checked in order: an SDXL or SD3 file may also carry keys that look like an older family's.
_FAMILY_MARKERS: tuple[tuple[str, str], ...] = (
    ("sd3", "model.diffusion_model.joint_blocks."),
    ("sdxl", "conditioner.embedders."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
)


def checkpoint_keys(path: str | Path) -> list[str] | None:
    """The tensor names of a .safetensors file, read from its header only (cheap, for early checks).

    None for other formats, whose keys cannot be listed without loading the whole file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None


def load_state_dict(path: str | Path, device: str | torch.device = "cpu", mmap: bool = True) -> dict[str, Tensor]:
    """Read every tensor of a ``.safetensors`` file or a ``.ckpt``/``.pt``/``.bin`` torch pickle.

    mmap=False reads the whole file up front, which is faster on network drives and keeps no file mapping
    alive. Torch pickles are opened with ``weights_only=True`` so a checkpoint cannot run code; an ldm-style
    ``{"state_dict": ...}`` wrapper is unwrapped and non-tensor entries (step counters) are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a single checkpoint file (.safetensors/.ckpt/.pt/.bin)")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path, device, mmap)
    return _load_torch_pickle(path, device, mmap)


def _load_safetensors(path: Path, device: str | torch.device, mmap: bool) -> dict[str, Tensor]:
    try:
        if mmap:
            return load_safetensors_file(path, device=str(device))
        state_dict = load_safetensors_bytes(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as error:
        reason = _first_line(error)
        raise CheckpointError(f"cannot read {path} as safetensors ({reason}); is the file complete?") from error
    return {key: tensor.to(device) for key, tensor in state_dict.items()}


def _load_torch_pickle(path: Path, device: str | torch.device, mmap: bool) -> dict[str, Tensor]:
    try:
        # torch can only memory-map the zip container written by torch >= 1.6, not the legacy format.
        loaded = torch.load(path, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"cannot read {path}: not a weights-only torch checkpoint (corrupt, or it pickles Python objects "
            "besides tensors); re-download it or convert it to .safetensors"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint ({_first_line(error)})") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(value, Tensor)}


def _first_line(error: BaseException) -> str:
    """The first line of an error, shortened: library messages run to paragraphs, ours stay one line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def detect_family(keys: Iterable[str], source: str = "checkpoint") -> str:
    """Name the model family of a single-file checkpoint: "sd1", "sd2", "sdxl" or "sd3".

    Decided by the text-encoder / block prefixes each family's original code writes; ``source`` (usually
    the file path) only labels the error message.
    """
    keys = list(keys)
    for family, marker in _FAMILY_MARKERS:
        if any(key.startswith(marker) for key in keys):
            return family
    found = sorted({".".join(key.split(".")[:2]) + "." for key in keys})
    shown = ", ".join(found[:8]) + (f" (+{len(found) - 8} more)" if len(found) > 8 else "")
    raise CheckpointError(
        f"{source} is not a recognised SD1/SD2/SDXL/SD3 checkpoint: found key prefixes [{shown or 'none'}], "
        "expected cond_stage_model.*, conditioner.embedders.* or model.diffusion_model.joint_blocks.*"
    )


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, with the prefix removed; other keys are left out."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
