"""Latent and text-encoder-output caches, keyed by everything that produced them.

A cache entry is only reused when its key equals the key the current run would write: the producer
string the trainer passes (model file, dtype, clip skip, ...), the image file's size and modification
time, and how the image was turned into pixels (bucket, resize, crop, flip, alpha). sd-scripts checks only
the latent shape, so a changed VAE, a retouched image or a new ``--clip_skip`` silently reused stale
caches; here any difference recomputes.

On disk an entry is a safetensors file next to its image, ``<stem>_<hash>_lat.safetensors`` (latents) or
``<stem>_<hash>_te.safetensors`` (text-encoder outputs), whose header metadata holds the key as JSON. The
hash in the name covers the key without the image file's size and time, so different producers or bucket
sizes keep separate files side by side; ``--skip_cache_check`` trusts a file by its name alone, without
opening it. Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written cache that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from library.dataset.config import DatasetConfig, SubsetConfig
from library.dataset.images import CorruptImageError, to_tensor

if TYPE_CHECKING:
    from library.dataset.dataset import ImageItem

_KEY_METADATA = "cache_key"
LATENT_SUFFIX = "_lat.safetensors"
TEXT_SUFFIX = "_te.safetensors"
_HASH_LENGTH = 10  # hex digits of the key hash in cache file names


class CacheError(ValueError):
    """An encoder returned something that cannot be cached (wrong batch size, NaN)."""


@dataclass(frozen=True)
class CacheEntry:
    """Cached tensors held in memory, with the key they were made under."""

    key: str
    tensors: dict[str, torch.Tensor]


def file_stat(path: Path) -> dict[str, int]:
    """The image file's identity for cache keys: size and modification time (ns)."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def latent_key(
    producer: str,
    image_path: Path,
    *,
    bucket_reso: tuple[int, int],
    resized_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    flip: bool,
    alpha_mask: bool,
    interpolation: str | None,
) -> dict[str, Any]:
    """Everything that decides an image's cached latents. ``flip`` means flipped latents are stored too."""
    return {
        "producer": producer,
        "image": Path(image_path).name,
        "file": file_stat(image_path),
        "bucket_reso": list(bucket_reso),
        "resized_size": list(resized_size),
        "crop_top_left": list(crop_top_left),
        "flip": flip,
        "alpha_mask": alpha_mask,
        "interpolation": interpolation,
    }


def text_key(producer: str, caption: str) -> dict[str, Any]:
    """Everything that decides a caption's cached text-encoder outputs."""
    return {"producer": producer, "caption": caption}


def key_json(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, ensure_ascii=False)


def cache_path(image_path: Path, key: Mapping[str, Any], suffix: str) -> Path:
    """Where the entry for ``key`` lives: next to the image, named by a hash of the key minus file stat."""
    image_path = Path(image_path)
    named_part = {name: value for name, value in key.items() if name != "file"}
    digest = hashlib.sha256(key_json(named_part).encode("utf-8")).hexdigest()[:_HASH_LENGTH]
    return image_path.with_name(f"{image_path.stem}_{digest}{suffix}")


def stored_key(path: Path) -> str | None:
    """The key JSON in a cache file's header, or None if the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(_KEY_METADATA)
    except Exception:  # missing, truncated or not safetensors at all (safetensors has its own error type)
        return None


def is_current(path: Path, key: Mapping[str, Any], *, skip_check: bool) -> bool:
    """Whether the file at ``path`` holds the entry for ``key`` (or, with ``skip_check``, merely exists)."""
    if skip_check:
        return Path(path).is_file()
    return stored_key(path) == key_json(key)


def entry_status(image_path: Path, key: Mapping[str, Any], suffix: str, *, skip_check: bool) -> str:
    """What a run would find on disk for ``key``: "valid" (reused as is), "stale" (a cache file of this image made
    by something else, or by this producer before the image changed: recomputed) or "missing"."""
    path = cache_path(image_path, key, suffix)
    if is_current(path, key, skip_check=skip_check):
        return "valid"
    image_path = Path(image_path)
    others = image_path.parent.glob(f"{glob_escape(image_path.stem)}_{'?' * _HASH_LENGTH}{suffix}")
    return "stale" if path.is_file() or any(others) else "missing"


def write_cache_file(path: Path, tensors: Mapping[str, torch.Tensor], key: Mapping[str, Any]) -> None:
    """Atomically write ``tensors`` with ``key`` in the header: a temp file in the same folder, then rename."""
    path = Path(path)
    contiguous = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(contiguous, temp_name, metadata={_KEY_METADATA: key_json(key)})
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_cache_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a cache file (validity was settled when the cache was filled)."""
    return load_file(str(path))


# --------------------------------------------------------------------------- filling the caches

Keyed = Sequence[tuple["ImageItem", dict[str, Any]]]


def fill_latent_cache(
    keyed: Keyed,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    to_disk: bool,
    batch_size: int,
    skip_check: bool,
    show_progress: bool,
    load_pixels: Callable[["ImageItem"], tuple[np.ndarray, np.ndarray | None]],
    on_unreadable: Callable[["ImageItem", Exception], None],
) -> list["ImageItem"]:
    """Give every item a current latent entry (``item.latents`` in memory or ``item.latent_file``).

    Items needing work are encoded in batches of one bucket size; with ``flip`` in the key the mirrored
    image is encoded too. Returns the items whose image turned out unreadable.
    """
    pending: dict[tuple[tuple[int, ...], bool], list] = {}
    for item, key in keyed:
        path = cache_path(item.path, key, LATENT_SUFFIX) if to_disk else None
        if path is not None and is_current(path, key, skip_check=skip_check):
            item.latent_file, item.latents = path, None
        elif path is not None or item.latents is None or item.latents.key != key_json(key):
            pending.setdefault((tuple(key["bucket_reso"]), key["flip"]), []).append((item, key, path))
    chunks = [
        (flip, jobs[start : start + batch_size])
        for (_, flip), jobs in pending.items()
        for start in range(0, len(jobs), batch_size)
    ]
    unreadable = []
    for flip, chunk in tqdm(chunks, desc="caching latents", disable=not show_progress or not chunks):
        loaded = []
        for item, key, path in chunk:
            try:
                loaded.append((item, key, path, *load_pixels(item)))
            except CorruptImageError as error:
                on_unreadable(item, error)
                unreadable.append(item)
        if loaded:
            _encode_latents(loaded, flip, encode)
    return unreadable


def _encode_latents(loaded: list, flip: bool, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
    paths = [item.path for item, *_ in loaded]
    images = torch.stack([to_tensor(image) for *_, image, _ in loaded])
    latents = _checked(encode(images), paths, "latents")
    flipped = _checked(encode(torch.flip(images, dims=[3])), paths, "latents") if flip else None
    for row, (item, key, path, _, mask) in enumerate(loaded):
        tensors = {"latents": latents[row].clone()}
        if flipped is not None:
            tensors["latents_flipped"] = flipped[row].clone()
        if mask is not None:
            tensors["alpha_mask"] = torch.from_numpy(mask)
        if path is not None:
            write_cache_file(path, tensors, key)
            item.latent_file, item.latents = path, None
        else:
            item.latents, item.latent_file = CacheEntry(key_json(key), tensors), None


def fill_text_cache(
    captioned: Sequence[tuple["ImageItem", str]],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    producer: str,
    *,
    to_disk: bool,
    batch_size: int,
    skip_check: bool,
) -> None:
    """Give every item a current text-output entry for its caption (``item.text_outputs`` or ``item.text_file``)."""
    pending = []
    for item, caption in captioned:
        key = text_key(producer, caption)
        path = cache_path(item.path, key, TEXT_SUFFIX) if to_disk else None
        item.text_caption = caption
        if path is not None and is_current(path, key, skip_check=skip_check):
            item.text_file, item.text_outputs = path, None
        elif path is not None or item.text_outputs is None or item.text_outputs.key != key_json(key):
            pending.append((item, caption, key, path))
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        outputs = encode([caption for _, caption, _, _ in chunk])
        for name, tensor in outputs.items():
            _checked(tensor, [item.path for item, *_ in chunk], f"text output '{name}'")
        for row, (item, _, key, path) in enumerate(chunk):
            tensors = {name: tensor[row].clone() for name, tensor in outputs.items()}
            if path is not None:
                write_cache_file(path, tensors, key)
                item.text_file, item.text_outputs = path, None
            else:
                item.text_outputs, item.text_file = CacheEntry(key_json(key), tensors), None


def _checked(tensor: torch.Tensor, paths: Sequence[Path], what: str) -> torch.Tensor:
    """Refuse an encoding with the wrong batch size or NaN/inf, naming the images concerned."""
    if tensor.shape[0] != len(paths):
        raise CacheError(f"the encoder returned {tensor.shape[0]} {what} for a batch of {len(paths)}")
    finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if not finite.all():
        bad = ", ".join(str(path) for path, ok in zip(paths, finite.tolist()) if not ok)
        raise CacheError(f"{what} contain NaN/inf for {bad}; try --no_half_vae or check the images")
    return tensor


# --------------------------------------------------------------------------- what cannot be cached

_NO_LATENT_CACHE = "it cannot be used with --cache_latents"
_NO_TEXT_CACHE = "it cannot be used with --cache_text_encoder_outputs"


def latent_cache_conflicts(configs: Iterable[DatasetConfig]) -> list[str]:
    """Why latents cannot be cached for these datasets (empty when they can).

    A cached latent is one fixed encoding of one fixed crop; augmentations that change the pixels every
    step would silently stop happening.
    """
    reasons = []
    for subset in _all_subsets(configs):
        if subset.color_aug:
            reasons.append(f"subset '{subset.label}': color_aug changes images every step; {_NO_LATENT_CACHE}")
        if subset.random_crop:
            reasons.append(f"subset '{subset.label}': random_crop picks a new crop every step; {_NO_LATENT_CACHE}")
    return _unique(reasons)


def text_cache_conflicts(configs: Iterable[DatasetConfig]) -> list[str]:
    """Why text-encoder outputs cannot be cached for these datasets (empty when they can).

    Stricter than sd-scripts, which let wildcards and epoch-wise dropout through and then trained on the
    unprocessed caption text.
    """
    reasons = []
    for subset in _all_subsets(configs):
        options = subset.caption
        changing = [
            ("shuffle_caption", options.shuffle_caption),
            ("caption_dropout_rate", options.caption_dropout_rate > 0),
            ("caption_dropout_every_n_epochs", options.caption_dropout_every_n_epochs > 0),
            ("caption_tag_dropout_rate", options.caption_tag_dropout_rate > 0),
            ("token_warmup_step", options.token_warmup_step > 0),
            ("enable_wildcard", options.enable_wildcard),
        ]
        for name, active in changing:
            if active:
                reasons.append(f"subset '{subset.label}': {name} changes captions every step; {_NO_TEXT_CACHE}")
    return _unique(reasons)


def _all_subsets(configs: Iterable[DatasetConfig]) -> list[SubsetConfig]:
    return [subset for config in configs for subset in config.subsets]


def _unique(reasons: list[str]) -> list[str]:
    """Drop repeats (the same folder may sit in several datasets), keeping the order."""
    return list(dict.fromkeys(reasons))
