"""Latent and text-encoder-output caches: reuse, invalidation by key, disk files, conflicts."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.cache_prefill import PrefillConfig, prefill, prefill_latent_cache, prefill_text_cache
from library.dataset import cache
from library.dataset.captions import CaptionOptions
from library.dataset.config import DatasetConfig, DatasetOptions, SubsetConfig, load_dataset_configs
from library.dataset.dataset import DatasetError, TrainDataset, split_validation
from library.fixtures.images import write_fixture_images


def _subset(image_dir: Path, caption: CaptionOptions | None = None, **settings) -> SubsetConfig:
    return SubsetConfig(image_dir=image_dir, caption=caption or CaptionOptions(), caption_extension=".txt", **settings)


def _dataset(image_dir: Path, *, resolution=(64, 64), batch_size: int = 1, **subset_settings) -> TrainDataset:
    config = DatasetConfig(resolution=resolution, subsets=(_subset(image_dir, **subset_settings),), batch_size=batch_size)
    return TrainDataset([config], seed=0, max_train_steps=10, prior_loss_weight=1.0)


class CountingEncoder:
    """A stand-in VAE: 8x8 average pooling, counting the images it sees."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 8)


class CountingTextEncoder:
    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.captions += captions
        lengths = torch.tensor([[float(len(c))] for c in captions])
        return {"hidden": lengths.repeat(1, 4).unsqueeze(1).repeat(1, 3, 1), "pooled": lengths}


def _expected_latents(path: Path, *, flip: bool = False) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if flip:
        pixels = torch.flip(pixels, dims=[2])
    return torch.nn.functional.avg_pool2d(pixels.unsqueeze(0), 8)[0]


def _cache_files(folder: Path, suffix: str = cache.LATENT_SUFFIX) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.name.endswith(suffix))


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    return write_fixture_images(tmp_path / "images", 3)


# --------------------------------------------------------------------------- latents


def test_memory_latents_are_reused_and_recomputed_for_a_new_producer(images):
    dataset = _dataset(images[0].parent)
    encoder = CountingEncoder()
    dataset.cache_latents(encoder, "vae-a", to_disk=False, batch_size=2, show_progress=False)
    assert encoder.images == 3
    dataset.cache_latents(encoder, "vae-a", to_disk=False, batch_size=2, show_progress=False)
    assert encoder.images == 3
    dataset.cache_latents(encoder, "vae-b", to_disk=False, batch_size=2, show_progress=False)
    assert encoder.images == 6

    batch = dataset[0]
    assert batch["images"] is None
    (key,) = batch["keys"]
    torch.testing.assert_close(batch["latents"][0], _expected_latents(Path(key)))
    assert _cache_files(images[0].parent) == []


def test_disk_latents_are_keyed_reused_and_atomic(images):
    folder = images[0].parent
    encoder = CountingEncoder()
    _dataset(folder).cache_latents(encoder, "vae-a:fp32", to_disk=True, batch_size=2, show_progress=False)
    files = _cache_files(folder)
    assert encoder.images == 3 and len(files) == 3
    assert [f.name.split("_")[:2] for f in files] == [["img", "000"], ["img", "001"], ["img", "002"]]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left behind

    with safe_open(str(files[0]), framework="pt") as handle:
        key = json.loads(handle.metadata()["cache_key"])
        assert set(handle.keys()) == {"latents"}
    stat = images[0].stat()
    assert key["producer"] == "vae-a:fp32" and key["image"] == "img_000.png"
    assert key["file"] == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    assert (key["bucket_reso"], key["crop_top_left"], key["flip"], key["alpha_mask"]) == ([64, 64], [0, 0], False, False)

    second = _dataset(folder)  # a new run
    second.cache_latents(encoder, "vae-a:fp32", to_disk=True, batch_size=2, show_progress=False)
    assert encoder.images == 3
    batch = second[0]
    torch.testing.assert_close(batch["latents"][0], _expected_latents(Path(batch["keys"][0])))


def test_changed_image_file_recomputes_only_that_image(images):
    folder = images[0].parent
    encoder = CountingEncoder()
    _dataset(folder).cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    os.utime(images[1], ns=(images[1].stat().st_atime_ns, images[1].stat().st_mtime_ns + 5_000_000_000))
    _dataset(folder).cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    assert encoder.images == 4
    assert len(_cache_files(folder)) == 3  # rewritten in place: same name, new key


def test_changed_producer_or_bucket_recomputes(images):
    folder = images[0].parent
    encoder = CountingEncoder()
    _dataset(folder).cache_latents(encoder, "vae-a", to_disk=True, batch_size=4, show_progress=False)
    _dataset(folder).cache_latents(encoder, "vae-b", to_disk=True, batch_size=4, show_progress=False)
    assert encoder.images == 6
    small = _dataset(folder, resolution=(32, 32))
    small.cache_latents(encoder, "vae-b", to_disk=True, batch_size=4, show_progress=False)
    assert encoder.images == 9
    assert small[0]["latents"].shape == (1, 3, 4, 4)
    assert len(_cache_files(folder)) == 9  # producers and buckets keep separate files


def test_flip_aug_caches_flipped_latents_and_toggling_recomputes(images):
    folder = images[0].parent
    encoder = CountingEncoder()
    _dataset(folder).cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    flipping = _dataset(folder, flip_aug=True)
    flipping.cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    assert encoder.images == 3 + 6  # plain and mirrored encodings

    with safe_open(str(flipping.items[0].latent_file), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("latents_flipped"), _expected_latents(images[0], flip=True))
    seen = set()
    for epoch in range(10):
        flipping.select_epoch(epoch)
        batch = flipping[0]
        path = Path(batch["keys"][0])
        latents = batch["latents"][0]
        flipped = torch.allclose(latents, _expected_latents(path, flip=True))
        assert flipped or torch.allclose(latents, _expected_latents(path))
        seen.add(flipped)
    assert seen == {True, False}


def test_skip_check_trusts_files_without_opening_them(images):
    folder = images[0].parent
    encoder = CountingEncoder()
    dataset = _dataset(folder)
    dataset.cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    target = dataset.items[0].latent_file
    target.write_bytes(b"garbage, not safetensors")

    _dataset(folder).cache_latents(encoder, "vae", to_disk=True, batch_size=4, skip_check=True, show_progress=False)
    assert encoder.images == 3  # trusted by name
    _dataset(folder).cache_latents(encoder, "vae", to_disk=True, batch_size=4, show_progress=False)
    assert encoder.images == 4  # checked: the unreadable file is recomputed
    assert cache.stored_key(target) is not None


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "entry_lat.safetensors"
    cache.write_cache_file(path, {"latents": torch.ones(2)}, {"producer": "old"})

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.write_cache_file(path, {"latents": torch.zeros(2)}, {"producer": "new"})
    assert cache.stored_key(path) == cache.key_json({"producer": "old"})
    torch.testing.assert_close(cache.read_cache_file(path)["latents"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_alpha_mask_is_cached_with_the_latents(tmp_path):
    pixels = np.full((64, 64, 4), 120, dtype=np.uint8)
    pixels[:, :, 3] = 255
    pixels[:, :16, 3] = 0
    (tmp_path / "alpha").mkdir()
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "alpha" / "a.png")
    settings = dict(alpha_mask=True, flip_aug=True)
    _dataset(tmp_path / "alpha", **settings).cache_latents(CountingEncoder(), "vae", to_disk=True, batch_size=1, show_progress=False)
    reused = _dataset(tmp_path / "alpha", **settings)
    encoder = CountingEncoder()
    reused.cache_latents(encoder, "vae", to_disk=True, batch_size=1, show_progress=False)
    assert encoder.images == 0
    transparent_left = torch.ones(64, 64)
    transparent_left[:, :16] = 0
    seen = set()
    for epoch in range(10):
        reused.select_epoch(epoch)
        masks = reused[0]["alpha_masks"]
        assert masks.shape == (1, 1, 64, 64)
        flipped = torch.equal(masks[0, 0], torch.flip(transparent_left, dims=[1]))
        assert flipped or torch.equal(masks[0, 0], transparent_left)
        seen.add(flipped)
    assert seen == {True, False}


def test_unreadable_image_found_while_caching_is_dropped(images):
    data = images[2].read_bytes()
    images[2].write_bytes(data[: len(data) // 2])
    dataset = _dataset(images[0].parent)
    assert len(dataset) == 3
    dataset.cache_latents(CountingEncoder(), "vae", to_disk=False, batch_size=4, show_progress=False)
    assert dataset.skipped_images == [images[2]] and len(dataset) == 2
    assert dataset.num_train_images == 2


def test_nan_latents_are_an_error(images):
    with pytest.raises(cache.CacheError, match="latents contain NaN/inf for .*img_000.png"):
        _dataset(images[0].parent).cache_latents(lambda x: torch.full((x.shape[0], 4, 8, 8), float("nan")), "vae",
                                                 to_disk=False, batch_size=4, show_progress=False)


# --------------------------------------------------------------------------- text-encoder outputs


def test_text_outputs_memory_and_disk(images):
    folder = images[0].parent
    encoder = CountingTextEncoder()
    dataset = _dataset(folder, batch_size=3, caption=CaptionOptions(caption_prefix="pre"))
    dataset.cache_text_outputs(encoder, "clip;clip_skip=1", to_disk=False, batch_size=2)
    captions = ["pre " + p.with_suffix(".txt").read_text() for p in images]
    assert encoder.captions == captions
    dataset.cache_text_outputs(encoder, "clip;clip_skip=1", to_disk=False, batch_size=2)
    assert len(encoder.captions) == 3

    batch = dataset[0]
    assert sorted(batch["captions"]) == sorted(captions)
    lengths = torch.tensor([float(len(c)) for c in batch["captions"]])
    torch.testing.assert_close(batch["text_outputs"]["pooled"], lengths.unsqueeze(1))
    assert batch["text_outputs"]["hidden"].shape == (3, 3, 4)
    torch.testing.assert_close(batch["text_outputs"]["hidden"][:, 0, 0], lengths)

    disk = _dataset(folder, batch_size=3, caption=CaptionOptions(caption_prefix="pre"))
    disk.cache_text_outputs(encoder, "clip;clip_skip=1", to_disk=True, batch_size=2)
    assert len(encoder.captions) == 6 and len(_cache_files(folder, cache.TEXT_SUFFIX)) == 3
    with safe_open(str(disk.items[0].text_file), framework="pt") as handle:
        assert json.loads(handle.metadata()["cache_key"]) == {"producer": "clip;clip_skip=1", "caption": captions[0]}
    again = _dataset(folder, batch_size=3, caption=CaptionOptions(caption_prefix="pre"))
    again.cache_text_outputs(encoder, "clip;clip_skip=1", to_disk=True, batch_size=2)
    assert len(encoder.captions) == 6
    torch.testing.assert_close(again[0]["text_outputs"]["pooled"], lengths.unsqueeze(1))


def test_changed_producer_or_caption_recomputes_text_outputs(images):
    folder = images[0].parent
    encoder = CountingTextEncoder()
    _dataset(folder).cache_text_outputs(encoder, "clip;clip_skip=1", to_disk=True, batch_size=4)
    _dataset(folder).cache_text_outputs(encoder, "clip;clip_skip=2", to_disk=True, batch_size=4)
    assert len(encoder.captions) == 6
    images[1].with_suffix(".txt").write_text("a new caption")
    _dataset(folder).cache_text_outputs(encoder, "clip;clip_skip=2", to_disk=True, batch_size=4)
    assert encoder.captions[6:] == ["a new caption"]


# --------------------------------------------------------------------------- conflicts


def _configs(**subset_settings) -> list[DatasetConfig]:
    caption_fields = {f.name for f in dataclasses.fields(CaptionOptions)}
    caption = CaptionOptions(**{k: subset_settings.pop(k) for k in list(subset_settings) if k in caption_fields})
    subset = _subset(Path("img/10_dog"), caption=caption, **subset_settings)
    return [DatasetConfig(resolution=(64, 64), subsets=(subset,)), DatasetConfig(resolution=(32, 32), subsets=(subset,))]


def test_conflict_lists():
    assert cache.latent_cache_conflicts(_configs(flip_aug=True, shuffle_caption=True)) == []
    assert cache.latent_cache_conflicts(_configs(color_aug=True, random_crop=True)) == [
        "subset 'img/10_dog': color_aug changes images every step; it cannot be used with --cache_latents",
        "subset 'img/10_dog': random_crop picks a new crop every step; it cannot be used with --cache_latents",
    ]
    assert cache.text_cache_conflicts(_configs(color_aug=True, caption_prefix="x", keep_tokens=2)) == []
    reasons = cache.text_cache_conflicts(_configs(shuffle_caption=True, caption_dropout_rate=0.1, caption_dropout_every_n_epochs=2,
                                                  caption_tag_dropout_rate=0.1, token_warmup_step=5, enable_wildcard=True))
    names = [reason.split(": ")[1].split(" ")[0] for reason in reasons]
    assert names == ["shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                     "token_warmup_step", "enable_wildcard"]
    assert all(reason.endswith("it cannot be used with --cache_text_encoder_outputs") for reason in reasons)


def test_caching_refuses_conflicting_subsets(images):
    with pytest.raises(DatasetError, match="color_aug changes images every step"):
        _dataset(images[0].parent, color_aug=True).cache_latents(CountingEncoder(), "vae", to_disk=False, batch_size=1)
    with pytest.raises(DatasetError, match="shuffle_caption changes captions every step"):
        _dataset(images[0].parent, caption=CaptionOptions(shuffle_caption=True)).cache_text_outputs(
            CountingTextEncoder(), "clip", to_disk=False, batch_size=1)


def test_prefill_writes_every_image_of_every_part(tmp_path):
    write_fixture_images(tmp_path / "images", 5)
    subset = _subset(tmp_path / "images", flip_aug=True)
    configs = [DatasetConfig(resolution=(64, 64), subsets=(subset,), validation_split=0.4)]
    options = DatasetOptions(seed=3)
    encoder = CountingEncoder()
    train, validation = prefill_latent_cache(configs, options, encoder, "vae", batch_size=2)
    assert (len(train.items), len(validation.items)) == (3, 2)
    assert encoder.images == 3 * 2 + 2  # training images also mirrored; validation images never flip
    assert len(_cache_files(tmp_path / "images")) == 5

    # The trainer, with the same seed and producer, finds every file current.
    for dataset in split_validation(configs, options):
        dataset.cache_latents(encoder, "vae", to_disk=True, batch_size=2, show_progress=False)
    assert encoder.images == 8

    text_encoder = CountingTextEncoder()
    prefill_text_cache(configs, options, text_encoder, "clip", batch_size=4)
    assert len(text_encoder.captions) == 5 and len(_cache_files(tmp_path / "images", cache.TEXT_SUFFIX)) == 5
    with pytest.raises(DatasetError, match="color_aug"):
        prefill_latent_cache([DatasetConfig(resolution=(64, 64), subsets=(_subset(tmp_path / "images", color_aug=True),))],
                             options, encoder, "vae", batch_size=2)


class _FakeFamily:
    """The two trainer hooks prefill calls, recording the dtypes the models were placed in."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.dtype] = {}

    def encode_images(self, models, images: torch.Tensor) -> torch.Tensor:
        self.seen["images"] = images.dtype
        return models.vae(images)

    def encode_text(self, models, captions: list[str]) -> dict[str, torch.Tensor]:
        self.seen["text_encoder"] = models.text_encoders[0].weight.dtype
        return CountingTextEncoder()(captions)


def test_prefill_uses_the_config_dtypes_and_keys(tmp_path):
    write_fixture_images(tmp_path / "images", 3)
    toml_file = tmp_path / "dataset.toml"
    toml_file.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'images').as_posix()}'\n"
                         "caption_extension = '.txt'\n", encoding="utf-8")
    vae = torch.nn.AvgPool2d(8)
    models = dataclasses.make_dataclass("Models", ["vae", "text_encoders"])(vae, [torch.nn.Linear(2, 2)])
    config = PrefillConfig(dataset=DatasetOptions(dataset_config=toml_file, seed=1), latent_key="vae-key", text_key="te-key",
                           vae_dtype=torch.float64, text_encoder_dtype=torch.bfloat16, vae_batch_size=2,
                           text_encoder_batch_size=2)
    family = _FakeFamily()
    prefill(family, models, config, latents=True, text=True, device=torch.device("cpu"))
    assert family.seen == {"images": torch.float64, "text_encoder": torch.bfloat16}
    assert len(_cache_files(tmp_path / "images")) == 3 and len(_cache_files(tmp_path / "images", cache.TEXT_SUFFIX)) == 3

    # The trainer's keys find the files current; any other key does not.
    trainer_view = split_validation(load_dataset_configs(config.dataset), config.dataset)[0]
    encoder = CountingEncoder()
    trainer_view.cache_latents(encoder, "vae-key", to_disk=True, batch_size=2, show_progress=False)
    assert encoder.images == 0
    trainer_view.cache_latents(encoder, "other-key", to_disk=True, batch_size=2, show_progress=False)
    assert encoder.images == 3


@pytest.mark.parametrize("flags, vae_dtype, text_dtype", [
    (["--mixed_precision=fp16"], torch.float16, torch.float16),
    (["--mixed_precision=bf16", "--no_half_vae"], torch.float32, torch.bfloat16),
    (["--mixed_precision=no"], torch.float32, torch.float32),
])
def test_prefill_config_reads_the_flags_once(flags, vae_dtype, text_dtype):
    from library.args import TRAINING_FLAGS, parse_args, setup_parser_for

    args = parse_args(setup_parser_for(TRAINING_FLAGS, prog="train_network.py"),
                      ["--dataset_config=d.toml", "--vae_batch_size=3", "--seed=9", "--skip_cache_check", *flags])
    config = PrefillConfig.from_args(args, ("vae-key", "te-key"))
    assert (config.vae_dtype, config.text_encoder_dtype) == (vae_dtype, text_dtype)
    assert (config.latent_key, config.text_key, config.seed, config.skip_check) == ("vae-key", "te-key", 9, True)
    assert (config.vae_batch_size, config.text_encoder_batch_size) == (3, 3)  # --text_encoder_batch_size falls back
    assert config.dataset.dataset_config == Path("d.toml")
