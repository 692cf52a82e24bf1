"""TrainDataset: items, repeats, regularisation balance, per-bucket batches, augmentation, validation split."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset.captions import CaptionOptions
from library.dataset.config import DatasetConfig, DatasetConfigError, DatasetOptions, SubsetConfig
from library.dataset.dataset import DatasetError, TrainDataset, balance_reg_repeats, split_validation
from library.dataset.images import CorruptImageError
from library.fixtures.images import write_fixture_images

_CAPTION_FIELDS = {f.name for f in dataclasses.fields(CaptionOptions)}
_BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def _subset(image_dir: Path | None, **settings) -> SubsetConfig:
    caption = CaptionOptions(**{k: settings.pop(k) for k in list(settings) if k in _CAPTION_FIELDS})
    settings.setdefault("caption_extension", ".txt")
    return SubsetConfig(image_dir=None if image_dir is None else Path(image_dir), caption=caption, **settings)


def _config(*subsets: SubsetConfig, resolution=(64, 64), **settings) -> DatasetConfig:
    return DatasetConfig(resolution=resolution, subsets=subsets, **settings)


def _dataset(*configs: DatasetConfig, seed: int = 0, prior_loss_weight: float = 1.0, **kwargs) -> TrainDataset:
    return TrainDataset(list(configs), seed=seed, max_train_steps=100, prior_loss_weight=prior_loss_weight, **kwargs)


def _epoch_keys(dataset: TrainDataset, epoch: int) -> list[list[str]]:
    dataset.select_epoch(epoch)
    return [dataset.batch_keys(index) for index in range(len(dataset))]


def _pixels(path: Path, size=None, crop_box=None) -> torch.Tensor:
    """Independent expectation: PIL resize (box filter when shrinking), crop, scale to [-1, 1]."""
    image = Image.open(path).convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BOX)
    if crop_box is not None:
        image = image.crop(crop_box)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# --------------------------------------------------------------------------- repeats and regularisation


def _sd_scripts_reg_balance(num_train: int, repeats: list[int]) -> list[int]:
    """sd-scripts' DreamBoothDataset loop, transcribed literally as the oracle."""
    result, registered, n, first_loop = list(repeats), set(), 0, True
    while n < num_train:
        for index in range(len(repeats)):
            if first_loop:
                registered.add(index)
                n += repeats[index]
            else:
                result[index] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
        if not repeats:
            break
    return [result[i] if i in registered else 0 for i in range(len(repeats))]


def test_reg_balance_matches_sd_scripts_loop():
    assert balance_reg_repeats(6, [1, 1, 1, 1]) == [2, 2, 1, 1]
    assert balance_reg_repeats(3, [2, 2, 2]) == [2, 2, 0]
    assert balance_reg_repeats(0, [1, 1]) == [0, 0]
    rng = random.Random(3)
    for _ in range(200):
        repeats = [rng.randint(1, 4) for _ in range(rng.randint(0, 6))]
        num_train = rng.randint(0, 30)
        assert balance_reg_repeats(num_train, repeats) == _sd_scripts_reg_balance(num_train, repeats)


def test_repeats_and_reg_balancing_counts(tmp_path):
    write_fixture_images(tmp_path / "train", 2)
    write_fixture_images(tmp_path / "reg", 4, caption_extension=None)
    config = _config(_subset(tmp_path / "train", num_repeats=3), _subset(tmp_path / "reg", is_reg=True, class_tokens="dog"))
    dataset = _dataset(config)

    assert (dataset.num_train_images, dataset.num_reg_images) == (6, 4)
    repeats = {Path(item.key).parent.name + "/" + item.path.name: item.num_repeats for item in dataset.items}
    assert repeats == {"train/img_000.png": 3, "train/img_001.png": 3, "reg/img_000.png": 2, "reg/img_001.png": 2,
                       "reg/img_002.png": 1, "reg/img_003.png": 1}
    assert dataset.bucket_summary() == [((64, 64), 12)]
    assert len(dataset) == 12
    all_keys = [key for batch in _epoch_keys(dataset, 0) for key in batch]
    assert sorted(all_keys) == sorted(item.key for item in dataset.items for _ in range(item.num_repeats))
    assert dataset.dataset_dirs_info() == {"train": {"n_repeats": 3, "img_count": 2}}
    assert dataset.reg_dataset_dirs_info() == {"reg": {"n_repeats": 1, "img_count": 4}}


def test_prior_loss_weight_applies_to_reg_items(tmp_path):
    write_fixture_images(tmp_path / "train", 2)
    write_fixture_images(tmp_path / "reg", 2, caption_extension=None)
    config = _config(_subset(tmp_path / "train"), _subset(tmp_path / "reg", is_reg=True, class_tokens="dog"), batch_size=2)
    dataset = _dataset(config, prior_loss_weight=0.25)
    seen = set()
    for index in range(len(dataset)):
        batch = dataset[index]
        for key, weight in zip(batch["keys"], batch["loss_weights"].tolist()):
            expected = 0.25 if "/reg/" in key else 1.0
            assert weight == expected
            seen.add(expected)
    assert seen == {0.25, 1.0}


# --------------------------------------------------------------------------- batches and buckets


def test_batches_share_a_bucket_and_have_the_right_sizes(tmp_path):
    # Images 0, 2, 4 are square (bucket 64x64), 1 and 3 are 96x64 (bucket 80x48).
    write_fixture_images(tmp_path / "mixed", 5, sizes=((64, 64), (96, 64)))
    dataset = _dataset(_config(_subset(tmp_path / "mixed", num_repeats=2), batch_size=4, **_BUCKETS))

    assert dataset.bucket_summary() == [((64, 64), 6), ((80, 48), 4)]
    assert len(dataset) == 3  # ceil(6 / 4) + ceil(4 / 4)
    sizes, keys = [], []
    for index in range(len(dataset)):
        batch = dataset[index]
        (height, width), *others = batch["target_sizes_hw"].tolist()
        assert all(other == [height, width] for other in others)
        assert batch["images"].shape == (len(batch["keys"]), 3, height, width)
        expected_bucket = (48, 80) if any(key.endswith(("img_001.png", "img_003.png")) for key in batch["keys"]) else (64, 64)
        assert (height, width) == expected_bucket
        sizes.append(len(batch["keys"]))
        keys += batch["keys"]
    assert sorted(sizes) == [2, 4, 4]
    assert sorted(keys) == sorted([str(tmp_path / "mixed" / f"img_{i:03d}.png") for i in range(5)] * 2)


def test_batches_never_mix_datasets(tmp_path):
    write_fixture_images(tmp_path / "a", 3)
    write_fixture_images(tmp_path / "b", 3)
    dataset = _dataset(_config(_subset(tmp_path / "a"), batch_size=2), _config(_subset(tmp_path / "b"), batch_size=3, network_multiplier=0.5))
    assert len(dataset) == 2 + 1
    for index in range(len(dataset)):
        batch = dataset[index]
        folders = {Path(key).parent.name for key in batch["keys"]}
        assert len(folders) == 1
        expected = 0.5 if folders == {"b"} else 1.0
        assert batch["network_multipliers"].tolist() == [expected] * len(batch["keys"])


def test_shuffling_is_deterministic_per_seed_and_epoch(tmp_path):
    write_fixture_images(tmp_path / "images", 8)
    config = _config(_subset(tmp_path / "images"), batch_size=2)
    first, second, other_seed = _dataset(config, seed=5), _dataset(config, seed=5), _dataset(config, seed=6)
    for epoch in range(3):
        assert _epoch_keys(first, epoch) == _epoch_keys(second, epoch)
    assert _epoch_keys(first, 0) != _epoch_keys(first, 1)
    assert _epoch_keys(first, 0) != _epoch_keys(other_seed, 0)
    # Every epoch is a permutation of the same multiset of images.
    assert sorted(sum(_epoch_keys(first, 0), [])) == sorted(sum(_epoch_keys(first, 2), []))


def test_shuffled_captions_repeat_with_the_seed(tmp_path):
    captions = ["a, b, c, d, e, f"] * 4
    write_fixture_images(tmp_path / "images", 4, captions=captions)
    config = _config(_subset(tmp_path / "images", shuffle_caption=True, keep_tokens=1))
    runs = []
    for _ in range(2):
        dataset = _dataset(config, seed=11)
        runs.append([dataset[index]["captions"][0] for index in range(len(dataset))])
    assert runs[0] == runs[1]
    assert all(caption.startswith("a, ") and sorted(caption.split(", ")) == list("abcdef") for caption in runs[0])
    assert len(set(runs[0])) > 1  # actually shuffled


def _first(batch: list) -> dict:
    return batch[0]


def test_epoch_reaches_dataloader_workers(tmp_path):
    write_fixture_images(tmp_path / "images", 6)
    dataset = _dataset(_config(_subset(tmp_path / "images"), batch_size=2), seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=_first, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        dataset.select_epoch(epoch)
        got = [batch["keys"] for batch in loader]
        assert got == [dataset.batch_keys(index) for index in range(len(dataset))]
    assert _epoch_keys(dataset, 0) != _epoch_keys(dataset, 1)


def test_fractional_token_warmup_follows_the_total_set_later(tmp_path):
    """--max_train_epochs fixes the run length only after the batches are counted; the warm-up must follow it."""
    write_fixture_images(tmp_path / "images", 1, captions=["a, b, c, d, e, f"])
    dataset = _dataset(_config(_subset(tmp_path / "images", token_warmup_step=0.5)))  # built with 100 steps
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=_first, num_workers=1, persistent_workers=True)

    def tags_at(step: int) -> int:
        dataset.set_current_step(step)
        return len(next(iter(loader))["captions"][0].split(", "))

    # 1 + floor(step * (6 - 1) / warm-up steps) tags, warm-up steps = floor(0.5 * total)
    assert (tags_at(10), tags_at(20)) == (1 + 10 * 5 // 50, 1 + 20 * 5 // 50)
    dataset.set_max_train_steps(40)
    assert dataset.max_train_steps == 40
    assert (tags_at(10), tags_at(20)) == (1 + 10 * 5 // 20, 6)
    with pytest.raises(ValueError, match="max_train_steps must be at least 1"):
        dataset.set_max_train_steps(0)


# --------------------------------------------------------------------------- pixels, captions, masks


def test_pixels_sizes_and_crop_of_a_bucketed_image(tmp_path):
    (path,) = write_fixture_images(tmp_path / "wide", 1, sizes=((96, 64),))
    dataset = _dataset(_config(_subset(tmp_path / "wide"), **_BUCKETS))
    batch = dataset[0]
    # 96x64 goes to the 80x48 bucket: scaled by 80/96 to 80x53, then 2 rows cut from the top (centre crop).
    assert batch["target_sizes_hw"].tolist() == [[48, 80]]
    assert batch["original_sizes_hw"].tolist() == [[64, 96]]
    assert batch["crop_top_lefts"].tolist() == [[2, 0]]
    expected = _pixels(path, size=(80, 53), crop_box=(0, 2, 80, 50))
    torch.testing.assert_close(batch["images"][0], expected, atol=1e-6, rtol=0)
    assert batch["latents"] is None and batch["text_outputs"] is None and batch["alpha_masks"] is None


def test_flip_mirrors_image_and_crop(tmp_path):
    # 129x64 resizes to 97x48 for the 80x48 bucket: 17 columns to cut, 8 on the left (9 once mirrored).
    write_fixture_images(tmp_path / "wide", 1, sizes=((129, 64),))
    plain = _dataset(_config(_subset(tmp_path / "wide"), **_BUCKETS))[0]
    dataset = _dataset(_config(_subset(tmp_path / "wide", flip_aug=True), **_BUCKETS), seed=1)
    outcomes = set()
    for epoch in range(12):
        dataset.select_epoch(epoch)
        batch = dataset[0]
        if batch["crop_top_lefts"].tolist() == [[0, 9]]:
            torch.testing.assert_close(batch["images"], torch.flip(plain["images"], dims=[3]))
            outcomes.add("flipped")
        else:
            assert batch["crop_top_lefts"].tolist() == [[0, 8]]
            torch.testing.assert_close(batch["images"], plain["images"])
            outcomes.add("plain")
    assert outcomes == {"flipped", "plain"}


def test_captions_prefix_and_class_token_fallback(tmp_path):
    paths = write_fixture_images(tmp_path / "images", 2, captions=["a photo", "ignored"])
    paths[1].with_suffix(".txt").unlink()
    dataset = _dataset(_config(_subset(tmp_path / "images", class_tokens="sks dog", caption_prefix="best")))
    captions = {}
    for index in range(len(dataset)):
        batch = dataset[index]
        captions[Path(batch["keys"][0]).name] = batch["captions"][0]
    assert captions == {"img_000.png": "best a photo", "img_001.png": "best sks dog"}
    assert dataset.tag_frequency() == {"images": {"a photo": 1, "sks dog": 1}}


def test_empty_caption_file_is_an_error(tmp_path):
    write_fixture_images(tmp_path / "images", 1, captions=[""])
    with pytest.raises(DatasetError, match="caption file .*img_000.txt is empty"):
        _dataset(_config(_subset(tmp_path / "images")))


def _rgba_half_transparent(path: Path) -> None:
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:, :, 0] = 200
    pixels[:, 32:, 3] = 255  # left half transparent
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGBA").save(path)


def test_alpha_masks_follow_the_alpha_channel(tmp_path):
    _rgba_half_transparent(tmp_path / "alpha" / "a.png")
    write_fixture_images(tmp_path / "plain", 1)
    dataset = _dataset(_config(_subset(tmp_path / "alpha", alpha_mask=True)))
    batch = dataset[0]
    masks = batch["alpha_masks"]
    assert masks.shape == (1, 1, 64, 64)
    assert torch.all(masks[0, 0, :, :32] == 0) and torch.all(masks[0, 0, :, 32:] == 1)
    without = _dataset(_config(_subset(tmp_path / "plain")))
    assert without[0]["alpha_masks"] is None


def test_conditioning_images_become_masks(tmp_path):
    write_fixture_images(tmp_path / "images", 1, caption_extension=None)
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[:16, :, 0] = 255  # the top quarter counts
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "img_000.png")
    dataset = _dataset(_config(_subset(tmp_path / "images", conditioning_data_dir=tmp_path / "masks")))
    masks = dataset[0]["alpha_masks"]
    assert torch.all(masks[0, 0, :16] == 1) and torch.all(masks[0, 0, 16:] == 0)


# --------------------------------------------------------------------------- bad images


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    write_fixture_images(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"this is not a png")
    config = _config(_subset(tmp_path / "images", num_repeats=2))
    dataset = _dataset(config)
    assert dataset.skipped_images == [broken]
    assert [item.path.name for item in dataset.items] == ["img_000.png", "img_001.png"]
    assert dataset.num_train_images == 4 and len(dataset) == 4
    with pytest.raises(CorruptImageError, match="broken.png"):
        _dataset(config, skip_corrupt=False)


def test_truncated_image_is_replaced_by_a_readable_one_of_its_bucket(tmp_path):
    paths = write_fixture_images(tmp_path / "images", 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # the header still reads, the pixels do not
    dataset = _dataset(_config(_subset(tmp_path / "images"), batch_size=3))
    assert len(dataset.items) == 3  # not detectable from the header
    batch = dataset[0]
    assert batch["images"].shape[0] == 3 and paths[1] not in [Path(key) for key in batch["keys"]]
    assert dataset.skipped_images == [paths[1]]


# --------------------------------------------------------------------------- fine-tuning metadata and info cache


def test_fine_tuning_metadata_captions_and_tags(tmp_path):
    paths = write_fixture_images(tmp_path / "ft", 2, caption_extension=None)
    metadata = {"img_000": {"caption": "a cat", "tags": "tag1, tag2"}, str(paths[1]): {"tags": "Tag2"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    subset = _subset(tmp_path / "ft", metadata_file=tmp_path / "meta.json", num_repeats=2)
    dataset = _dataset(_config(subset))
    assert {item.path: item.caption for item in dataset.items} == {paths[0]: "a cat,tag1, tag2", paths[1]: "Tag2"}
    assert dataset.num_train_images == 4
    assert dataset.tag_frequency() == {"meta.json": {"tag1": 1, "tag2": 2}}

    (tmp_path / "meta.jsonl").write_text(json.dumps({"image_path": str(paths[0]), "caption": "one", "image_size": [64, 64]}) + "\n")
    jsonl = _dataset(_config(_subset(None, metadata_file=tmp_path / "meta.jsonl")))
    assert [(item.path, item.caption) for item in jsonl.items] == [(paths[0], "one")]

    (tmp_path / "missing.json").write_text(json.dumps({"nope": {"caption": "x"}}))
    with pytest.raises(DatasetConfigError, match="missing.json: image 'nope' not found"):
        _dataset(_config(_subset(tmp_path / "ft", metadata_file=tmp_path / "missing.json")))


def test_cache_info_writes_and_reuses_metadata_cache(tmp_path):
    paths = write_fixture_images(tmp_path / "images", 2, captions=["first", "second"])
    config = _config(_subset(tmp_path / "images", cache_info=True))
    _dataset(config)
    info = json.loads((tmp_path / "images" / "metadata_cache.json").read_text())
    assert info == {str(paths[0]): {"caption": "first", "resolution": [64, 64]}, str(paths[1]): {"caption": "second", "resolution": [64, 64]}}
    paths[0].with_suffix(".txt").write_text("edited")
    # sd-scripts' --cache_info trusts the cache for the same set of images.
    assert sorted(item.caption for item in _dataset(config).items) == ["first", "second"]
    write_fixture_images(tmp_path / "extra", 1)
    (tmp_path / "extra" / "img_000.png").rename(tmp_path / "images" / "img_009.png")
    assert sorted(item.caption for item in _dataset(config).items) == ["", "edited", "second"]


# --------------------------------------------------------------------------- validation split


def test_validation_split_sizes_and_no_augmentation(tmp_path):
    write_fixture_images(tmp_path / "train", 10)
    write_fixture_images(tmp_path / "reg", 3, caption_extension=None)
    config = _config(
        _subset(tmp_path / "train", num_repeats=3, flip_aug=True, shuffle_caption=True),
        _subset(tmp_path / "reg", is_reg=True, class_tokens="dog"),
        validation_split=0.2, validation_seed=4,
    )
    train, validation = split_validation([config], DatasetOptions(seed=1, prior_loss_weight=0.5))

    train_images = {item.path for item in train.items if not item.is_reg}
    val_images = {item.path for item in validation.items}
    assert (len(train_images), len(val_images)) == (8, 2)
    assert train_images.isdisjoint(val_images)
    assert train_images | val_images == {tmp_path / "train" / f"img_{i:03d}.png" for i in range(10)}
    assert all(not item.is_reg and item.num_repeats == 1 for item in validation.items)
    assert train.num_train_images == 24 and sum(item.is_reg for item in train.items) == 3
    val_subset = validation.configs[0].subsets[0]
    assert not val_subset.flip_aug and not val_subset.caption.shuffle_caption
    assert train.configs[0].subsets[0].flip_aug

    # The validation seed, not the training seed, decides the split.
    _, again = split_validation([config], DatasetOptions(seed=99))
    assert {item.path for item in again.items} == val_images
    assert split_validation([dataclasses.replace(config, validation_split=0.0)], DatasetOptions(seed=1))[1] is None
