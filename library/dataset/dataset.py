"""TrainDataset: the images of validated dataset configs, grouped into same-bucket batches.

One item of this dataset is one whole batch (every image in it shares a bucket, so they stack without
padding); load it with ``DataLoader(dataset, batch_size=1, collate_fn=lambda b: b[0])``.

Everything random (batch order, flips, crops, colour jitter, caption shuffling) is drawn from generators
seeded by ``(seed, epoch, batch index, slot)``, never from global state: a resumed run or a DataLoader
worker sees exactly the batches an uninterrupted single-process run sees. The epoch and step live in a
small shared-memory tensor, so ``select_epoch`` / ``set_current_step`` reach worker processes too.

sd-scripts facts kept here: caption files are ``<image stem><caption_extension>`` with ``class_tokens`` as
the fallback; regularisation images are repeated (or cut) until they match the training images with
repeats; a validation split shuffles each non-regularisation subset with ``validation_seed`` and holds
out the tail.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from library.dataset import cache
from library.dataset.buckets import BucketAssignment, BucketManager, fixed_assignment
from library.dataset.captions import process_caption
from library.dataset.config import DatasetConfig, DatasetOptions, SubsetConfig, read_metadata_images
from library.dataset.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    color_augment,
    flip_horizontal,
    image_size,
    load_image,
    resize_and_crop,
    to_tensor,
)

logger = logging.getLogger(__name__)

Size = tuple[int, int]
Part = Literal["train", "validation"]
_EXTENSIONS = frozenset(ext.lower() for ext in IMAGE_EXTENSIONS)
INFO_CACHE_FILE = "metadata_cache.json"  # sd-scripts' --cache_info file name


class DatasetError(ValueError):
    """A problem with the training data itself (captions, metadata, images), named in one line."""


@dataclass
class ImageItem:
    """One image of the dataset, as trained: where it is, its caption, and how it is resized."""

    key: str
    """Unique within the dataset: the image path (suffixed '#<dataset>' if another dataset has it too)."""
    path: Path
    caption: str
    """The raw caption (caption file, metadata or class tokens) before per-step processing."""
    subset: SubsetConfig
    is_reg: bool
    size: Size
    assignment: BucketAssignment
    num_repeats: int
    dataset_index: int
    interpolation: str | None = None
    mask_path: Path | None = None
    latents: cache.CacheEntry | None = None
    latent_file: Path | None = None
    text_outputs: cache.CacheEntry | None = None
    text_file: Path | None = None
    text_caption: str | None = None
    """The processed caption the cached text outputs were computed from."""


@dataclass(frozen=True)
class SubsetRecord:
    """What the LoRA metadata says about one subset as loaded (ss_datasets, ss_dataset_dirs, ss_tag_frequency)."""

    dataset_index: int
    subset: SubsetConfig
    name: str
    """The image folder's name, or the metadata file's for a fine-tuning subset."""
    img_count: int
    """Images found (after the validation split), repeats not counted."""
    tag_counts: dict[str, int]


@dataclass
class _Entry:
    """An image found in a subset, before its size is known."""

    path: Path
    caption: str
    size: Size | None = None
    tags: str | None = None  # what ss_tag_frequency counts for this image


# --------------------------------------------------------------------------- finding images and captions


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (sd-scripts does not recurse either)."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in _EXTENSIONS and path.is_file())


def read_caption_file(image_path: Path, extension: str, *, all_lines: bool) -> str | None:
    """The caption next to an image, or None when there is no caption file.

    Only the first line counts unless wildcards are on, where every non-empty line is an alternative.
    """
    caption_path = Path(str(image_path.with_suffix("")) + extension)
    if not caption_path.is_file():
        return None
    try:
        lines = [line.strip() for line in caption_path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DatasetError(f"caption file {caption_path} is not UTF-8 text; re-save it as UTF-8") from None
    lines = [line for line in lines if line] if all_lines else lines[:1]
    if not lines or not lines[0]:
        raise DatasetError(f"caption file {caption_path} is empty; write a caption, or delete it to use class_tokens")
    return "\n".join(lines)


def _dreambooth_entries(subset: SubsetConfig) -> list[_Entry]:
    paths = list_images(subset.image_dir)
    cached = _read_info_cache(subset, paths) if subset.cache_info else None
    if cached is not None:
        return cached
    entries, missing = [], 0
    for path in paths:
        caption = read_caption_file(path, subset.caption_extension, all_lines=subset.caption.enable_wildcard)
        if caption is None:
            missing += 1
            caption = subset.class_tokens or ""
        entries.append(_Entry(path, caption, tags=caption))
    if missing:
        fallback = f"class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        logger.warning("%s: %d of %d images have no %s caption file; using %s", subset.label, missing, len(paths),
                       subset.caption_extension, fallback)
    return entries


def _read_info_cache(subset: SubsetConfig, paths: list[Path]) -> list[_Entry] | None:
    """Captions and sizes from ``metadata_cache.json`` (--cache_info), if it lists exactly these images."""
    info_file = subset.image_dir / INFO_CACHE_FILE
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or set(info) != {str(path) for path in paths}:
        return None
    entries = []
    for path in paths:
        record = info[str(path)]
        entries.append(_Entry(path, record["caption"], tuple(record["resolution"]), tags=record["caption"]))
    return entries


def _write_info_cache(subset: SubsetConfig, entries: Sequence[_Entry]) -> None:
    info = {str(entry.path): {"caption": entry.caption, "resolution": list(entry.size)} for entry in entries}
    (subset.image_dir / INFO_CACHE_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


def _fine_tuning_entries(subset: SubsetConfig) -> list[_Entry]:
    return [_Entry(image.path, image.caption, image.size, image.tags) for image in read_metadata_images(subset)]


def _mask_path(subset: SubsetConfig, image_path: Path) -> Path:
    for candidate in list_images(subset.conditioning_data_dir):
        if candidate.stem == image_path.stem:
            return candidate
    folder = subset.conditioning_data_dir
    raise DatasetError(f"conditioning_data_dir {folder}: no mask image named '{image_path.stem}.*' for {image_path}")


# --------------------------------------------------------------------------- pure bookkeeping


def split_for_validation(entries: Sequence, fraction: float, seed: int, part: Part) -> list:
    """sd-scripts' split: shuffle with ``seed``, train on the first ceil(n * (1 - fraction)), validate on the rest.

    (sd-scripts sizes the validation part by rounding separately, which can share an image with training.)
    """
    if fraction <= 0:
        return list(entries)
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    cut = math.ceil(len(shuffled) * (1 - fraction))
    return shuffled[:cut] if part == "train" else shuffled[cut:]


def balance_reg_repeats(num_train_images: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats per regularisation image so the regularisation images with repeats match the training ones.

    sd-scripts' rule: take images in order with their own repeats until the count reaches the training
    count (later images get 0 and are unused); if one pass falls short, add one repeat per image, round
    robin, until it is reached.
    """
    result = [0] * len(reg_repeats)
    total = 0
    for index, repeats in enumerate(reg_repeats):
        if total >= num_train_images:
            return result
        result[index] = repeats
        total += repeats
    while reg_repeats and total < num_train_images:
        for index in range(len(result)):
            if total >= num_train_images:
                break
            result[index] += 1
            total += 1
    return result


def _count_tags(counts: dict[str, int], text: str) -> None:
    """ss_tag_frequency counting: comma-separated, stripped, lower-cased."""
    for tag in text.split(","):
        tag = tag.strip().lower()
        if tag:
            counts[tag] = counts.get(tag, 0) + 1


def _pad_and_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample tensors, zero-padding the first axis when sequence lengths differ."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(list(tensors))
    longest = max(t.shape[0] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])) for t in tensors]
    return torch.stack(padded)


# --------------------------------------------------------------------------- the dataset


@dataclass
class _Sample:
    key: str
    caption: str
    image: torch.Tensor | None
    latents: torch.Tensor | None
    text: dict[str, torch.Tensor] | None
    mask: torch.Tensor | None
    loss_weight: float
    original_hw: Size
    crop_top_left: Size
    target_hw: Size
    multiplier: float


@dataclass
class _Bucket:
    dataset_index: int
    reso: Size
    members: list[int] = field(default_factory=list)  # item indices, one per repeat


class TrainDataset(torch.utils.data.Dataset):
    """Per-bucket batches over all datasets; ``dataset[i]`` is batch ``i`` of the current epoch."""

    def __init__(
        self,
        configs: Sequence[DatasetConfig],
        *,
        seed: int,
        max_train_steps: int,
        prior_loss_weight: float,
        skip_corrupt: bool = True,
        part: Part = "train",
    ) -> None:
        self.part = part
        self.configs = [_without_augmentation(config) if part == "validation" else config for config in configs]
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.skip_corrupt = skip_corrupt
        self.items: list[ImageItem] = []
        self.skipped_images: list[Path] = []
        self.num_train_images = 0
        self.num_reg_images = 0
        self.subset_records: list[SubsetRecord] = []
        self.dataset_image_counts: list[tuple[int, int]] = []  # per dataset: (training, regularisation) images × repeats
        # epoch, step and run length in shared memory, so DataLoader workers (even persistent ones) follow the setters.
        self._state = torch.tensor([0, 0, max_train_steps], dtype=torch.long).share_memory_()
        self._layout: tuple[int, list[tuple[int, ...]]] | None = None
        for index, config in enumerate(self.configs):
            self._add_dataset(index, config)
        self._rebuild_buckets()

    # ------------------------------------------------------------------ building
    def _add_dataset(self, dataset_index: int, config: DatasetConfig) -> None:
        manager = None
        if config.enable_bucket:
            manager = BucketManager(
                config.bucket_no_upscale,
                config.resolution,
                config.min_bucket_reso,
                config.max_bucket_reso,
                config.bucket_reso_steps,
            )
        train_items: list[ImageItem] = []
        reg_items: list[ImageItem] = []
        for subset in config.subsets:
            if subset.is_reg and self.part == "validation":
                continue  # regularisation images are never held out
            entries = self._subset_entries(subset)
            if not subset.is_reg:
                split_seed = self.seed if config.validation_seed is None else config.validation_seed
                entries = split_for_validation(entries, config.validation_split, split_seed, self.part)
            repeats = subset.num_repeats if self.part == "train" else 1
            made = (self._make_item(entry, subset, config, dataset_index, repeats, manager) for entry in entries)
            items = [item for item in made if item is not None]
            self._record_subset(dataset_index, subset, entries, items)
            (reg_items if subset.is_reg else train_items).extend(items)

        train_count = sum(item.num_repeats for item in train_items)
        reg_count = sum(item.num_repeats for item in reg_items)
        self.num_train_images += train_count
        self.num_reg_images += reg_count
        self.dataset_image_counts.append((train_count, reg_count))
        for item, repeats in zip(reg_items, balance_reg_repeats(train_count, [item.num_repeats for item in reg_items])):
            item.num_repeats = repeats
        if reg_items and train_count < sum(item.subset.num_repeats for item in reg_items):
            logger.warning("dataset %d: more regularisation images than training images; some go unused", dataset_index + 1)
        self._add_items(train_items + [item for item in reg_items if item.num_repeats > 0])

    def _subset_entries(self, subset: SubsetConfig) -> list[_Entry]:
        if subset.metadata_file is not None:
            return _fine_tuning_entries(subset)
        entries = _dreambooth_entries(subset)
        if subset.cache_info and any(entry.size is None for entry in entries):
            # --cache_info: read every size now (before any validation split) so the cache lists the whole folder.
            entries = [entry for entry in entries if self._read_size(entry)]
            _write_info_cache(subset, entries)
        return entries

    def _read_size(self, entry: _Entry) -> bool:
        try:
            entry.size = image_size(entry.path)
        except CorruptImageError as error:
            self._skip(entry.path, error)
            return False
        return True

    def _make_item(
        self,
        entry: _Entry,
        subset: SubsetConfig,
        config: DatasetConfig,
        dataset_index: int,
        repeats: int,
        manager: BucketManager | None,
    ) -> ImageItem | None:
        if entry.size is None and not self._read_size(entry):
            return None
        size = entry.size
        try:
            assignment = manager.assign(size) if manager is not None else fixed_assignment(size, config.resolution)
        except ValueError as error:
            raise DatasetError(f"{entry.path}: {error}") from None
        return ImageItem(
            key=str(entry.path),
            path=entry.path,
            caption=entry.caption,
            subset=subset,
            is_reg=subset.is_reg,
            size=(int(size[0]), int(size[1])),
            assignment=assignment,
            num_repeats=repeats,
            dataset_index=dataset_index,
            interpolation=subset.resize_interpolation or config.resize_interpolation,
            mask_path=_mask_path(subset, entry.path) if subset.conditioning_data_dir is not None else None,
        )

    def _record_subset(self, dataset_index: int, subset: SubsetConfig, entries: Sequence[_Entry],
                       items: Sequence[ImageItem]) -> None:
        """Tag counts and image counts for the ss_tag_frequency / ss_dataset_dirs / ss_datasets metadata."""
        counts: dict[str, int] = {}
        for entry in entries:
            if entry.tags:
                _count_tags(counts, entry.tags)
        name = (subset.metadata_file or subset.image_dir).name
        self.subset_records.append(SubsetRecord(dataset_index, subset, name, len(items), counts))

    def _add_items(self, items: Iterable[ImageItem]) -> None:
        taken = {item.key for item in self.items}
        for item in items:
            if item.key in taken:
                item.key = f"{item.path}#{item.dataset_index + 1}"
            taken.add(item.key)
            self.items.append(item)

    def _skip(self, path: Path, error: Exception) -> None:
        if not self.skip_corrupt:
            raise error
        logger.warning("skipping unreadable image: %s", error)
        self.skipped_images.append(Path(path))

    def _rebuild_buckets(self) -> None:
        buckets: dict[tuple[int, Size], _Bucket] = {}
        for index, item in enumerate(self.items):
            where = (item.dataset_index, item.assignment.bucket_reso)
            bucket = buckets.setdefault(where, _Bucket(item.dataset_index, item.assignment.bucket_reso))
            bucket.members.extend([index] * item.num_repeats)
        self._buckets = [buckets[where] for where in sorted(buckets)]
        self._bucket_of = {index: bucket for bucket in self._buckets for index in bucket.members}
        self._layout = None

    def _drop_items(self, dropped: set[int]) -> None:
        """Forget images found unreadable after construction (while caching) and re-form the batches."""
        for index in dropped:
            item = self.items[index]
            if item.is_reg:
                self.num_reg_images -= item.subset.num_repeats
            else:
                self.num_train_images -= item.num_repeats
        self.items = [item for index, item in enumerate(self.items) if index not in dropped]
        self._rebuild_buckets()

    # ------------------------------------------------------------------ epochs and batches
    def select_epoch(self, epoch: int) -> None:
        """Not named set_epoch on purpose: accelerate's prepared DataLoader calls dataset.set_epoch with its own
        iteration counter, which restarts at 0 on resume and would replay epoch 0's order.

        Select the batch order and augmentation draws of ``epoch`` (counted from 0, as the trainer's loop does)."""
        self._state[0] = epoch

    def set_current_step(self, step: int) -> None:
        """The global optimisation step, for token warm-up."""
        self._state[1] = step

    def set_max_train_steps(self, steps: int) -> None:
        """The run's real length, once known (--max_train_epochs decides it only after the batches are counted).

        A fractional ``token_warmup_step`` is that fraction of this total.
        """
        if steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {steps}")
        self._state[2] = steps

    @property
    def max_train_steps(self) -> int:
        return int(self._state[2])

    def __len__(self) -> int:
        return sum(math.ceil(len(b.members) / self.configs[b.dataset_index].batch_size) for b in self._buckets)

    def _epoch_batches(self, epoch: int) -> list[tuple[int, ...]]:
        if self._layout is None or self._layout[0] != epoch:
            rng = random.Random(f"batches/{self.seed}/{epoch}")
            batches = []
            for bucket in self._buckets:
                order = list(bucket.members)
                rng.shuffle(order)
                size = self.configs[bucket.dataset_index].batch_size
                batches += [tuple(order[start : start + size]) for start in range(0, len(order), size)]
            rng.shuffle(batches)
            self._layout = (epoch, batches)
        return self._layout[1]

    def batch_keys(self, index: int) -> list[str]:
        """The image keys of batch ``index`` in the current epoch, without loading anything."""
        return [self.items[i].key for i in self._epoch_batches(int(self._state[0]))[index]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, step = int(self._state[0]), int(self._state[1])
        members = self._epoch_batches(epoch)[index]
        use_latents = all(self.items[i].latents is not None or self.items[i].latent_file is not None for i in members)
        use_text = all(self.items[i].text_outputs is not None or self.items[i].text_file is not None for i in members)
        samples = []
        for slot, item_index in enumerate(members):
            rng = random.Random(f"sample/{self.seed}/{epoch}/{index}/{slot}")
            samples.append(self._robust_sample(item_index, rng, epoch, step, use_latents, use_text))
        return _collate(samples)

    def _robust_sample(
        self, item_index: int, rng: random.Random, epoch: int, step: int, use_latents: bool, use_text: bool
    ) -> _Sample:
        """Load one sample; an image that turns out unreadable is replaced by the next readable one of its bucket."""
        members = list(dict.fromkeys(self._bucket_of[item_index].members))
        start = members.index(item_index)
        for candidate in members[start:] + members[:start]:
            if self.items[candidate].path in self.skipped_images:
                continue
            try:
                candidate_rng = random.Random(rng.random())
                return self._sample(self.items[candidate], candidate_rng, epoch, step, use_latents, use_text)
            except CorruptImageError as error:
                self._skip(self.items[candidate].path, error)
        raise DatasetError(f"every image in bucket {self.items[item_index].assignment.bucket_reso} is unreadable")

    def _sample(
        self, item: ImageItem, rng: random.Random, epoch: int, step: int, use_latents: bool, use_text: bool
    ) -> _Sample:
        flip = item.subset.flip_aug and rng.random() < 0.5
        bucket_w, bucket_h = item.assignment.bucket_reso
        image = latents = mask = None
        if use_latents:
            latents, mask = self._cached_latents(item, flip)
            crop = center_crop(item.assignment)
            if item.mask_path is not None:
                mask = torch.from_numpy(_pixels(item, rng, flip=flip, with_image=False).mask)
        else:
            pixels = _pixels(item, rng, flip=flip, random_crop=item.subset.random_crop, color_aug=item.subset.color_aug)
            image = to_tensor(pixels.image)
            mask = None if pixels.mask is None else torch.from_numpy(pixels.mask)
            crop = pixels.crop
        if use_text:
            text, caption = self._cached_text(item), item.text_caption
        else:
            text = None
            caption = process_caption(item.caption, item.subset.caption, epoch=epoch + 1, step=step,
                                      max_train_steps=self.max_train_steps, rng=rng)
        top, left = crop
        if flip:  # the crop's left edge seen in the mirrored image
            left = item.assignment.resized_size[0] - left - bucket_w
        return _Sample(
            key=item.key, caption=caption, image=image, latents=latents, text=text, mask=mask,
            loss_weight=self.prior_loss_weight if item.is_reg else 1.0,
            original_hw=(item.size[1], item.size[0]), crop_top_left=(top, left), target_hw=(bucket_h, bucket_w),
            multiplier=self.configs[item.dataset_index].network_multiplier,
        )

    def _cached_latents(self, item: ImageItem, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensors = item.latents.tensors if item.latents is not None else cache.read_cache_file(item.latent_file)
        latents = tensors["latents_flipped"] if flip else tensors["latents"]
        mask = tensors.get("alpha_mask")
        if mask is not None and flip:
            mask = torch.flip(mask, dims=[1])
        return latents, mask

    def _cached_text(self, item: ImageItem) -> dict[str, torch.Tensor]:
        return item.text_outputs.tensors if item.text_outputs is not None else cache.read_cache_file(item.text_file)

    # ------------------------------------------------------------------ caches
    def cache_latents(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        producer: str,
        *,
        to_disk: bool,
        batch_size: int,
        skip_check: bool = False,
        show_progress: bool = True,
    ) -> None:
        """Encode every image once (and its mirror image with flip_aug) unless a current cache entry exists.

        ``encode`` maps images (B, 3, H, W) in [-1, 1] to latents (B, C, h, w). In memory the latents stay on
        the items; on disk they go next to the images and are read back each step.
        """
        conflicts = cache.latent_cache_conflicts(self.configs)
        if conflicts:
            raise DatasetError(conflicts[0])
        unreadable = cache.fill_latent_cache(
            self.latent_cache_keys(producer), encode, to_disk=to_disk, batch_size=batch_size, skip_check=skip_check, show_progress=show_progress,
            load_pixels=self._plain_pixels, on_unreadable=lambda item, error: self._skip(item.path, error),
        )
        if unreadable:
            bad = {id(item) for item in unreadable}
            self._drop_items({index for index, item in enumerate(self.items) if id(item) in bad})

    def latent_cache_keys(self, producer: str) -> list[tuple[ImageItem, dict[str, Any]]]:
        """Each item with the key its cached latents are made under (what ``cache_latents`` checks and writes)."""
        return [(item, cache.latent_key(
            producer, item.path, bucket_reso=item.assignment.bucket_reso, resized_size=item.assignment.resized_size,
            crop_top_left=center_crop(item.assignment), flip=item.subset.flip_aug, alpha_mask=item.subset.alpha_mask,
            interpolation=item.interpolation)) for item in self.items]

    @staticmethod
    def _plain_pixels(item: ImageItem) -> tuple[np.ndarray, np.ndarray | None]:
        """What a cached latent encodes: centre crop, no flip, no colour jitter."""
        pixels = _pixels(item, random.Random(0), flip=False)
        return pixels.image, pixels.mask

    def cache_text_outputs(
        self,
        encode: Callable[[list[str]], dict[str, torch.Tensor]],
        producer: str,
        *,
        to_disk: bool,
        batch_size: int,
        skip_check: bool = False,
    ) -> None:
        """Encode every image's caption once unless a current cache entry exists.

        ``encode`` maps a list of B captions to named tensors batched along dim 0. The caption is processed
        once (prefix, suffix, fixed-token markers); options that change it per step are refused.
        """
        conflicts = cache.text_cache_conflicts(self.configs)
        if conflicts:
            raise DatasetError(conflicts[0])
        cache.fill_text_cache(
            self.cached_captions(), encode, producer, to_disk=to_disk, batch_size=batch_size, skip_check=skip_check
        )

    def cached_captions(self) -> list[tuple[ImageItem, str]]:
        """Each item with the caption text its cached text-encoder outputs are computed from (processed once)."""
        fixed = dict(epoch=1, step=0, max_train_steps=self.max_train_steps)
        return [(item, process_caption(item.caption, item.subset.caption, rng=random.Random(0), **fixed)) for item in self.items]

    # ------------------------------------------------------------------ reporting
    def bucket_summary(self) -> list[tuple[Size, int]]:
        """(bucket resolution, images including repeats), merged over datasets, sorted by resolution."""
        counts: dict[Size, int] = {}
        for bucket in self._buckets:
            counts[bucket.reso] = counts.get(bucket.reso, 0) + len(bucket.members)
        return sorted(counts.items())

    def bucket_counts(self, dataset_index: int) -> list[tuple[Size, int]]:
        """(bucket resolution, images including repeats) of one dataset, sorted by resolution."""
        return [(bucket.reso, len(bucket.members)) for bucket in self._buckets if bucket.dataset_index == dataset_index]

    def aspect_errors(self, dataset_index: int) -> list[float]:
        """Per image of one dataset (repeats not counted): its bucket's aspect ratio minus its own."""
        return [item.assignment.bucket_reso[0] / item.assignment.bucket_reso[1] - item.size[0] / item.size[1]
                for item in self.items if item.dataset_index == dataset_index]

    def tag_frequency(self, dataset_index: int | None = None) -> dict[str, dict[str, int]]:
        """ss_tag_frequency: tag counts per folder (or metadata file) name. Within one dataset, subsets with the
        same folder name add up; over all datasets (no index), the first dataset with a name gives its counts."""
        if dataset_index is None:
            merged: dict[str, dict[str, int]] = {}
            for index in range(len(self.configs)):
                for name, counts in self.tag_frequency(index).items():
                    merged.setdefault(name, counts)
            return merged
        per_name: dict[str, dict[str, int]] = {}
        for record in self.subset_records:
            if record.dataset_index == dataset_index:
                counts = per_name.setdefault(record.name, {})
                for tag, count in record.tag_counts.items():
                    counts[tag] = counts.get(tag, 0) + count
        return per_name

    def dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """ss_dataset_dirs: {folder name: {"n_repeats", "img_count"}} for training subsets; repeats get ' (2)'..."""
        return self._dirs_info(reg=False)

    def reg_dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """ss_reg_dataset_dirs: the same for regularisation subsets."""
        return self._dirs_info(reg=True)

    def _dirs_info(self, *, reg: bool) -> dict[str, dict[str, int]]:
        info: dict[str, dict[str, int]] = {}
        for record in self.subset_records:
            if record.subset.is_reg != reg:
                continue
            name, number = record.name, 2
            while name in info:
                name, number = f"{record.name} ({number})", number + 1
            info[name] = {"n_repeats": record.subset.num_repeats, "img_count": record.img_count}
        return info


# --------------------------------------------------------------------------- pixels


@dataclass
class _Pixels:
    image: np.ndarray | None
    mask: np.ndarray | None
    crop: Size


def center_crop(assignment: BucketAssignment) -> Size:
    """(top, left) of the centred crop of the resized image to its bucket (what a non-random crop uses)."""
    (resized_w, resized_h), (bucket_w, bucket_h) = assignment.resized_size, assignment.bucket_reso
    return (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2


def _pixels(
    item: ImageItem,
    rng: random.Random,
    *,
    flip: bool,
    random_crop: bool = False,
    color_aug: bool = False,
    with_image: bool = True,
) -> _Pixels:
    """The item's image at its bucket size (uint8 HxWx3) and its mask (HxW float in [0, 1]), cut and flipped alike."""
    crop = None if random_crop else center_crop(item.assignment)
    image = mask = None
    if with_image or item.subset.alpha_mask:
        rgb, alpha = load_image(item.path, with_alpha=item.subset.alpha_mask)
        image, crop = resize_and_crop(
            rgb, item.assignment, random_crop=random_crop, rng=rng, interpolation=item.interpolation, crop=crop
        )
        if alpha is not None:
            mask = _cut_like(alpha, item, crop)
        if color_aug:
            image = color_augment(image, rng)
    if item.mask_path is not None:
        red = load_image(item.mask_path, with_alpha=False)[0][:, :, 0].astype(np.float32) / 255.0
        mask = _cut_like(red, item, crop)
    if flip:
        image = None if image is None else flip_horizontal(image)
        mask = None if mask is None else flip_horizontal(mask)
    return _Pixels(image, None if mask is None else np.ascontiguousarray(mask, dtype=np.float32), crop)


def _cut_like(plane: np.ndarray, item: ImageItem, crop: Size) -> np.ndarray:
    """Resize and crop a mask exactly as the image was."""
    cut, _ = resize_and_crop(
        plane, item.assignment, random_crop=False, rng=random.Random(0), interpolation=item.interpolation, crop=crop
    )
    return cut


def _collate(samples: Sequence[_Sample]) -> dict[str, Any]:
    def longs(values: Iterable[Size]) -> torch.Tensor:
        return torch.tensor([list(value) for value in values], dtype=torch.long)

    masks = None
    if any(sample.mask is not None for sample in samples):
        height, width = samples[0].target_hw
        masks = torch.stack([s.mask if s.mask is not None else torch.ones(height, width) for s in samples]).unsqueeze(1)
    text = None
    if samples[0].text is not None:
        text = {name: _pad_and_stack([s.text[name] for s in samples]) for name in samples[0].text}
    return {
        "keys": [s.key for s in samples],
        "captions": [s.caption for s in samples],
        "images": None if samples[0].image is None else torch.stack([s.image for s in samples]),
        "latents": None if samples[0].latents is None else torch.stack([s.latents for s in samples]),
        "text_outputs": text,
        "loss_weights": torch.tensor([s.loss_weight for s in samples], dtype=torch.float32),
        "alpha_masks": masks,
        "original_sizes_hw": longs(s.original_hw for s in samples),
        "crop_top_lefts": longs(s.crop_top_left for s in samples),
        "target_sizes_hw": longs(s.target_hw for s in samples),
        "network_multipliers": torch.tensor([s.multiplier for s in samples], dtype=torch.float32),
    }


# --------------------------------------------------------------------------- validation split


def _without_augmentation(config: DatasetConfig) -> DatasetConfig:
    """The validation view of a dataset: no flips, crops, colour jitter or caption randomness."""
    subsets = tuple(
        dataclasses.replace(
            subset, flip_aug=False, color_aug=False, random_crop=False,
            caption=dataclasses.replace(
                subset.caption, shuffle_caption=False, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                caption_tag_dropout_rate=0.0, token_warmup_step=0,
            ),
        )
        for subset in config.subsets
    )
    return dataclasses.replace(config, subsets=subsets)


def split_validation(
    configs: Sequence[DatasetConfig], options: DatasetOptions, *, seed: int | None = None, skip_corrupt: bool = True
) -> tuple[TrainDataset, TrainDataset | None]:
    """(training set, validation set or None): each dataset's ``validation_split`` fraction is held out.

    ``seed`` defaults to ``options.seed``; the trainer passes its resolved seed so a random one is shared.
    """
    if seed is None:
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    make = functools.partial(
        TrainDataset, seed=seed, max_train_steps=options.max_train_steps, prior_loss_weight=options.prior_loss_weight,
        skip_corrupt=skip_corrupt,
    )
    train = make(configs)
    if not any(config.validation_split > 0 for config in configs):
        return train, None
    validation = make([config for config in configs if config.validation_split > 0], part="validation")
    return train, (validation if len(validation) > 0 else None)

