"""Writing weight files: atomic replacement, formats by suffix, the hashes LoRA readers expect, rotation.

Every file is written to a temporary sibling and renamed over the target only once it is complete, so
a crash or a full disk mid-save leaves the previous file as it was (DESIGN.md §7).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Mapping

import safetensors.torch
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt")

# sd-webui-additional-networks' legacy hash reads 64 KiB at 1 MiB into the file.
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


class SaveError(OSError):
    """Writing a file failed; the file that was there before (if any) is unchanged."""


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create or replace `path` with what `write(temp_path)` writes, all or nothing.

    The temporary file sits in the same folder (a rename across file systems would not be atomic), is
    flushed to disk before the rename, and is removed if anything fails. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open applies the umask, so the finished file gets the same permissions as a plain open() would give.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temp)
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, SaveError):
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise SaveError(f"could not write {path}: {reason}; the previous file is unchanged "
                            "(free disk space or fix permissions, then save again)") from error
        raise
    _fsync_folder(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable. Folders cannot be opened for fsync on Windows; skip there."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------- tensor files
def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, *,
                 dtype: torch.dtype | None = None) -> None:
    """Write a state dict atomically, in the format its suffix names.

    `.safetensors` keeps `metadata` in the header (values must be strings); `.ckpt`/`.pt` are
    torch.save'd plain dicts, which have no place for metadata. `dtype` converts floating tensors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    prepared = _prepare_tensors(tensors, dtype)
    if suffix == SAFETENSORS_SUFFIX:
        header = _check_metadata(metadata, path)
        atomic_write(path, lambda temp: safetensors.torch.save_file(prepared, str(temp), header))
    elif suffix in PICKLE_SUFFIXES:
        if metadata:
            logger.debug("%s: %s files cannot hold metadata; %d keys not stored", path.name, suffix, len(metadata))
        atomic_write(path, lambda temp: torch.save(prepared, temp))
    else:
        raise ValueError(f"cannot save {path}: unknown suffix {path.suffix!r}; use .safetensors, .ckpt or .pt "
                         "(--save_model_as)")


def save_lora_file(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, *,
                   dtype: torch.dtype | None = None) -> None:
    """Save LoRA weights as sd-scripts does: safetensors files always carry sshs_model_hash and
    sshs_legacy_hash (computed on the converted tensors), so WebUI extensions need not rehash them."""
    path = Path(path)
    prepared = _prepare_tensors(tensors, dtype)
    full_metadata = dict(metadata or {})
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        model_hash, legacy_hash = model_hashes(prepared, full_metadata)
        full_metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    save_tensors(path, prepared, full_metadata or None)


def _prepare_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors (what both writers need), floating ones converted to `dtype`."""
    prepared = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        prepared[key] = tensor.contiguous()
    return prepared


def _check_metadata(metadata: Mapping[str, str] | None, path: Path) -> dict[str, str] | None:
    if not metadata:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"cannot save {path}: metadata {key!r} has a {type(value).__name__} value; "
                             "safetensors metadata values must be strings")
    return dict(metadata)


# ----------------------------------------------------------------------------- hashes
def model_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the safetensors file these tensors make, as sd-scripts
    precomputes them for sd-webui-additional-networks.

    The file is serialised with only the `ss_*` metadata, because user-editable keys (modelspec.*,
    comments) must not change the hash. model hash: SHA-256 of everything after the header (8-byte
    little-endian length + JSON). legacy hash: the first 8 hex digits of the SHA-256 of the 64 KiB at
    offset 1 MiB of the whole file (empty for files under 1 MiB, as in the original).
    """
    training_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), training_metadata)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy = data[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]
    return model_hash, hashlib.sha256(legacy).hexdigest()[:8]


def checkpoint_hashes(path: Path) -> tuple[str, str]:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a base model file as sd-scripts records them: the old
    WebUI hash (8 hex digits of SHA-256 over 64 KiB at 1 MiB) and the SHA-256 of the whole file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: not a file")
    whole = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            whole.update(block)
        file.seek(_LEGACY_HASH_OFFSET)
        legacy = hashlib.sha256(file.read(_LEGACY_HASH_LENGTH)).hexdigest()[:8]
    return legacy, whole.hexdigest()


# ----------------------------------------------------------------------------- names and rotation
def epoch_file_name(output_name: str, epoch: int, ext: str) -> str:
    """sd-scripts' per-epoch file name, e.g. "my_lora-000003.safetensors" (ext includes the dot)."""
    return f"{output_name}-{epoch:06d}{ext}"


def step_file_name(output_name: str, step: int, ext: str) -> str:
    """sd-scripts' per-step file name, e.g. "my_lora-step00000500.safetensors"."""
    return f"{output_name}-step{step:08d}{ext}"


def epoch_state_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}-state"


def step_state_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}-state"


def last_state_name(output_name: str) -> str:
    return f"{output_name}-state"


def epoch_pattern(output_name: str, suffix: str) -> str:
    """Glob for rotate() matching epoch_file_name(name, *, suffix) (suffix "-state" for state folders)."""
    return f"{glob.escape(output_name)}-{'[0-9]' * 6}{glob.escape(suffix)}"


def step_pattern(output_name: str, suffix: str) -> str:
    """Glob for rotate() matching step_file_name(name, *, suffix) (suffix "-state" for state folders)."""
    return f"{glob.escape(output_name)}-step{'[0-9]' * 8}{glob.escape(suffix)}"


def steps_keep_count(last_n_steps: int, every_n_steps: int) -> int:
    """How many step saves sd-scripts' --save_last_n_steps[_state] keeps: the saves made within the last
    `last_n_steps` steps, counting the current one (every=10, last=30 keeps steps 20, 30, 40, 50)."""
    return last_n_steps // every_n_steps + 1


def rotate(output_dir: Path, pattern: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` entries of `output_dir` matching the glob `pattern`.

    Newest means the highest name: epoch and step numbers are zero-padded, so name order is save order
    (file times are not used: copying or resuming changes them). Folders (saved states) are removed
    whole. Returns what was removed, oldest first.
    """
    if keep < 0:
        raise ValueError(f"rotate: keep must be >= 0, got {keep}")
    if "/" in pattern or os.sep in pattern:
        raise ValueError(f"rotate: pattern {pattern!r} must name entries directly inside {output_dir}")
    matches = sorted(Path(output_dir).glob(pattern), key=lambda p: p.name)
    removed = matches[:max(len(matches) - keep, 0)]
    for old in removed:
        logger.info("removing old save %s", old)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    return removed
