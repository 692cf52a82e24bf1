"""Dataset TOML parsing, inheritance, command-line fallback, validation errors and the folder convention."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from library.dataset.captions import CaptionOptions
from library.dataset.config import DatasetConfigError, DatasetOptions, load_dataset_configs
from library.fixtures.images import write_fixture_images


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _toml_path(path: Path) -> str:
    return path.as_posix()


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, Path]:
    names = ("hoge", "fuga", "reg", "piyo")
    for name in names:
        write_fixture_images(tmp_path / name, 2)
    metadata = tmp_path / "piyo_md.json"
    metadata.write_text(json.dumps({"img_000": {"caption": "a"}, "img_001": {"caption": "b"}}), encoding="utf-8")
    return {name: tmp_path / name for name in names} | {"metadata": metadata, "root": tmp_path}


def _load(config_file: Path, **flags) -> list:
    return load_dataset_configs(DatasetOptions(dataset_config=config_file, **flags))


def test_inheritance_general_dataset_subset_like_config_readme(folders):
    # The example of sd-scripts' config_README: keep_tokens comes from the nearest level that sets it.
    config_file = _write(folders["root"] / "my.toml", f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["hoge"])}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["fuga"])}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{_toml_path(folders["reg"])}'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 640]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["piyo"])}'
  metadata_file = '{_toml_path(folders["metadata"])}'
""")
    dreambooth, fine_tuning = _load(config_file)

    assert dreambooth.resolution == (512, 512) and dreambooth.batch_size == 4
    assert [s.caption.keep_tokens for s in dreambooth.subsets] == [2, 3, 1]
    assert [s.class_tokens for s in dreambooth.subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.is_reg for s in dreambooth.subsets] == [False, False, True]
    assert all(s.caption.shuffle_caption and s.caption_extension == ".txt" for s in dreambooth.subsets)
    assert dreambooth.subsets[0].image_dir == folders["hoge"]

    assert fine_tuning.resolution == (768, 640) and fine_tuning.batch_size == 2
    (piyo,) = fine_tuning.subsets
    assert piyo.caption.keep_tokens == 1 and piyo.caption.shuffle_caption
    assert piyo.metadata_file == folders["metadata"] and piyo.label == str(folders["metadata"])


def test_command_line_is_the_lowest_priority_fallback(folders):
    config_file = _write(folders["root"] / "flags.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["hoge"])}'

  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["fuga"])}'
  flip_aug = false
  num_repeats = 2
  keep_tokens = 0
""")
    (config,) = _load(
        config_file, resolution=(64, 96), train_batch_size=3, dataset_repeats=5, flip_aug=True, caption_extension=".txt",
        enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, alpha_mask=True,
        caption=CaptionOptions(caption_dropout_rate=0.25, keep_tokens=2), validation_split=0.5, validation_seed=7,
    )
    # train_batch_size -> batch_size and dataset_repeats -> num_repeats, as sd-scripts maps them.
    assert config.batch_size == 3 and config.resolution == (64, 96)
    assert (config.enable_bucket, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps) == (True, 32, 128, 32)
    assert (config.validation_split, config.validation_seed) == (0.5, 7)
    first, second = config.subsets
    assert (first.num_repeats, first.flip_aug, first.alpha_mask, first.caption_extension) == (5, True, True, ".txt")
    assert (first.caption.caption_dropout_rate, first.caption.keep_tokens) == (0.25, 2)
    # A value written in the file beats the flag, even when it is false.
    assert (second.num_repeats, second.flip_aug, second.caption.keep_tokens) == (2, False, 0)
    assert second.caption.caption_dropout_rate == 0.25


def test_options_from_args_parses_flags():
    args = argparse.Namespace(
        resolution="768,512", caption_extension=".txt", train_data_dir="data", face_crop_aug_range=None,
        train_batch_size=2, unrelated_flag=1, shuffle_caption=True, keep_tokens=1, secondary_separator=None,
        token_warmup_step=0.5,
    )
    options = DatasetOptions.from_args(args)
    assert options.resolution == (768, 512)
    assert options.caption_extension == ".txt"
    # Caption flags are nested; a missing or None flag keeps the built-in default.
    assert options.caption == CaptionOptions(shuffle_caption=True, keep_tokens=1, token_warmup_step=0.5)
    assert options.train_data_dir == Path("data")
    assert options.train_batch_size == 2
    assert options.min_bucket_reso == 256 and options.max_train_steps == 1600  # flags this Namespace lacks
    assert DatasetOptions.from_args(argparse.Namespace(resolution="512")).resolution == (512, 512)
    with pytest.raises(DatasetConfigError, match="--resolution"):
        DatasetOptions.from_args(argparse.Namespace(resolution="512x512"))
    with pytest.raises(DatasetConfigError, match="--caption_separator must not be empty"):
        DatasetOptions.from_args(argparse.Namespace(caption_separator=""))


def _one_subset_toml(folder: Path, extra_subset: str = "", extra_dataset: str = "resolution = 64") -> str:
    return f"""
[[datasets]]
{extra_dataset}
  [[datasets.subsets]]
  image_dir = '{_toml_path(folder)}'
{extra_subset}
"""


def test_unknown_key_names_file_table_and_suggestion(folders):
    config_file = _write(folders["root"] / "my.toml", _one_subset_toml(folders["hoge"], "  num_repeat = 10"))
    with pytest.raises(DatasetConfigError) as error:
        _load(config_file)
    message = str(error.value)
    assert message.startswith(f"{config_file}: [[datasets]] #1 [[datasets.subsets]] #1 ")
    assert "unknown key 'num_repeat' (did you mean 'num_repeats'?)" in message
    assert "\n" not in message


def test_key_on_the_wrong_level_says_where_it_belongs(folders):
    config_file = _write(folders["root"] / "level.toml", _one_subset_toml(folders["hoge"], "  batch_size = 2"))
    with pytest.raises(DatasetConfigError, match=r"key 'batch_size' belongs in \[general\] or \[\[datasets\]\]"):
        _load(config_file)
    general = _write(folders["root"] / "general.toml", "[general]\nimage_dir = 'x'\n" + _one_subset_toml(folders["hoge"]))
    with pytest.raises(DatasetConfigError, match=r"\[general\] key 'image_dir' belongs in \[\[datasets.subsets\]\]"):
        _load(general)
    flag_only = _write(folders["root"] / "flag.toml", "[general]\nprior_loss_weight = 1.0\n" + _one_subset_toml(folders["hoge"]))
    with pytest.raises(DatasetConfigError, match="pass --prior_loss_weight"):
        _load(flag_only)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("  num_repeats = '10'", "key 'num_repeats' must be an integer, got '10'"),
        ("  shuffle_caption = 1", "key 'shuffle_caption' must be true or false, got 1"),
        ("  num_repeats = true", "key 'num_repeats' must be an integer, got True"),
        ("  resize_interpolation = 'fancy'", "key 'resize_interpolation' must be one of lanczos"),
    ],
)
def test_wrong_types_are_named(folders, line, expected):
    config_file = _write(folders["root"] / "types.toml", _one_subset_toml(folders["hoge"], line))
    with pytest.raises(DatasetConfigError) as error:
        _load(config_file)
    assert str(config_file) in str(error.value) and expected in str(error.value)


def test_wrong_resolution_type_on_dataset(folders):
    config_file = _write(folders["root"] / "reso.toml", _one_subset_toml(folders["hoge"], extra_dataset="resolution = [512, 384, 256]"))
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\] #1 key 'resolution' must be a positive integer or \[width, height\]"):
        _load(config_file)


def test_image_dir_missing_nonexistent_or_empty(folders, tmp_path):
    no_dir = _write(tmp_path / "nodir.toml", "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  num_repeats = 2\n")
    with pytest.raises(DatasetConfigError, match="needs 'image_dir'"):
        _load(no_dir)

    missing = tmp_path / "does_not_exist"
    absent = _write(tmp_path / "absent.toml", _one_subset_toml(missing))
    with pytest.raises(DatasetConfigError, match=f"image_dir '{missing}' is not a folder"):
        _load(absent)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    empty_file = _write(tmp_path / "empty.toml", _one_subset_toml(empty))
    with pytest.raises(DatasetConfigError, match=f"image_dir '{empty}' holds no images"):
        _load(empty_file)


def test_other_invalid_configs(folders, tmp_path):
    no_resolution = _write(tmp_path / "nores.toml", _one_subset_toml(folders["hoge"], extra_dataset=""))
    with pytest.raises(DatasetConfigError, match="has no resolution"):
        _load(no_resolution)

    mixed = _write(tmp_path / "mixed.toml", f"""
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["hoge"])}'
  [[datasets.subsets]]
  metadata_file = '{_toml_path(folders["metadata"])}'
  image_dir = '{_toml_path(folders["piyo"])}'
""")
    with pytest.raises(DatasetConfigError, match="mixes subsets with and without metadata_file"):
        _load(mixed)

    masks = _write(tmp_path / "mask.toml", _one_subset_toml(folders["hoge"], f"  conditioning_data_dir = '{_toml_path(folders['fuga'])}'"))
    with pytest.raises(DatasetConfigError, match="which only --masked_loss reads"):
        _load(masks)
    (config,) = _load(masks, masked_loss=True)
    assert config.subsets[0].conditioning_data_dir == folders["fuga"]

    out_of_range = _write(tmp_path / "range.toml", _one_subset_toml(folders["hoge"], extra_dataset="resolution = 2048\nenable_bucket = true"))
    with pytest.raises(DatasetConfigError, match=r"resolution 2048x2048 lies outside the bucket range \[256, 1024\]"):
        _load(out_of_range)

    face = _write(tmp_path / "face.toml", _one_subset_toml(folders["hoge"], "  face_crop_aug_range = [2.0, 4.0]"))
    with pytest.raises(DatasetConfigError, match="face_crop_aug_range .* is not supported"):
        _load(face)

    bad_toml = _write(tmp_path / "bad.toml", "[[datasets]\n")
    with pytest.raises(DatasetConfigError, match="bad.toml: not valid TOML"):
        _load(bad_toml)
    with pytest.raises(DatasetConfigError, match="file not found"):
        _load(tmp_path / "nothing.toml")


def test_bucket_sizes_snap_to_steps(folders):
    config_file = _write(
        folders["root"] / "snap.toml",
        _one_subset_toml(folders["hoge"], extra_dataset="resolution = 512\nenable_bucket = true\nmin_bucket_reso = 300\nmax_bucket_reso = 1000"),
    )
    (config,) = _load(config_file)
    assert (config.min_bucket_reso, config.max_bucket_reso) == (256, 1024)


def test_duplicate_subset_and_zero_repeats_are_skipped(folders, caplog):
    config_file = _write(folders["root"] / "dup.toml", f"""
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["hoge"])}'
  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["hoge"])}'
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = '{_toml_path(folders["fuga"])}'
  num_repeats = 0
""")
    with caplog.at_level(logging.WARNING):
        (config,) = _load(config_file)
    assert [(s.image_dir, s.num_repeats) for s in config.subsets] == [(folders["hoge"], 1)]
    assert "repeats" in caplog.text and "num_repeats 0" in caplog.text


def test_json_dataset_config(folders):
    config_file = folders["root"] / "config.json"
    config_file.write_text(json.dumps({"datasets": [{"resolution": [64, 32], "subsets": [{"image_dir": str(folders["hoge"]), "num_repeats": 3}]}]}))
    (config,) = _load(config_file)
    assert config.resolution == (64, 32) and config.subsets[0].num_repeats == 3


def test_folder_convention(tmp_path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    write_fixture_images(train / "10_sks dog", 1)
    write_fixture_images(train / "2_cat_toy", 1)
    write_fixture_images(train / "junk", 1)
    write_fixture_images(train / "0_disabled", 1)
    write_fixture_images(reg / "1_dog", 1)
    options = DatasetOptions(train_data_dir=train, reg_data_dir=reg, resolution=(64, 64), caption_extension=".txt", flip_aug=True)
    with caplog.at_level(logging.WARNING):
        (config,) = load_dataset_configs(options)
    summary = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg, s.flip_aug) for s in config.subsets]
    assert summary == [
        ("10_sks dog", 10, "sks dog", False, True),
        ("2_cat_toy", 2, "cat_toy", False, True),
        ("1_dog", 1, "dog", True, True),
    ]
    assert "junk" in caplog.text and "0_disabled" in caplog.text


def test_folder_convention_errors(tmp_path):
    flat = tmp_path / "flat"
    write_fixture_images(flat, 1)
    with pytest.raises(DatasetConfigError, match=r"--train_data_dir .*flat: no sub-folders named '<repeats>_<class tokens>' \(it holds images itself\)"):
        load_dataset_configs(DatasetOptions(train_data_dir=flat, resolution=(64, 64)))
    with pytest.raises(DatasetConfigError, match="--train_data_dir .*: folder not found"):
        load_dataset_configs(DatasetOptions(train_data_dir=tmp_path / "missing", resolution=(64, 64)))
    (tmp_path / "data" / "5_empty").mkdir(parents=True)
    with pytest.raises(DatasetConfigError, match="--train_data_dir: image_dir '.*5_empty' holds no images"):
        load_dataset_configs(DatasetOptions(train_data_dir=tmp_path / "data", resolution=(64, 64)))
    with pytest.raises(DatasetConfigError, match="no training data"):
        load_dataset_configs(DatasetOptions(resolution=(64, 64)))


def test_in_json_makes_a_fine_tuning_subset(folders):
    options = DatasetOptions(train_data_dir=folders["piyo"], in_json=folders["metadata"], resolution=(64, 64), dataset_repeats=3)
    (config,) = load_dataset_configs(options)
    (subset,) = config.subsets
    assert (subset.image_dir, subset.metadata_file, subset.num_repeats) == (folders["piyo"], folders["metadata"], 3)
    missing = DatasetOptions(train_data_dir=folders["piyo"], in_json=folders["root"] / "none.json", resolution=(64, 64))
    with pytest.raises(DatasetConfigError, match="--in_json: metadata_file '.*none.json' not found"):
        load_dataset_configs(missing)
