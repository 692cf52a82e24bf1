"""Dataset configuration: the TOML file (or the folder convention) turned into validated, frozen configs.

Three sources feed one path. ``--dataset_config my.toml`` is read as written; ``--train_data_dir`` /
``--reg_data_dir`` folders named ``"<repeats>_<class tokens>"`` and ``--in_json`` fine-tuning metadata are
first rewritten into the same TOML-shaped dict, exactly as sd-scripts does, so every source gets the same
checks and the same inheritance.

Inheritance follows sd-scripts' ``BlueprintGenerator``: a setting is looked up in the subset, then its
``[[datasets]]`` table, then ``[general]``, then the command-line flags, and only then the built-in default;
the first value that is not None wins. Keys a level does not accept are errors, where sd-scripts' schema
library printed an opaque ``extra keys not allowed @ data[...]``: ours name the file, the table, the key and
a likely intended spelling.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

from library.dataset.captions import CaptionOptions
from library.dataset.images import IMAGE_EXTENSIONS, INTERPOLATIONS

logger = logging.getLogger(__name__)

Size = tuple[int, int]
_CAPTION_FIELDS = tuple(f.name for f in dataclasses.fields(CaptionOptions))


class DatasetConfigError(ValueError):
    """A dataset configuration problem, described in one line naming the file, table and key."""


# --------------------------------------------------------------------------- the validated configs


@dataclass(frozen=True)
class SubsetConfig:
    """One image folder (DreamBooth style), metadata file (fine-tuning style) or image + mask folder pair."""

    image_dir: Path | None
    caption: CaptionOptions
    num_repeats: int = 1
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    is_reg: bool = False
    alpha_mask: bool = False
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    """Folder of mask images (same stems as the images) for --masked_loss; the red channel is the mask."""
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    cache_info: bool = False
    resize_interpolation: str | None = None
    custom_attributes: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        """How messages and metadata name this subset: its folder, or its metadata file."""
        if self.metadata_file is not None:
            return str(self.metadata_file)
        return str(self.image_dir)


@dataclass(frozen=True)
class DatasetConfig:
    """One ``[[datasets]]`` table: images that share a resolution, batch size and bucketing."""

    resolution: Size
    subsets: tuple[SubsetConfig, ...]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None


@dataclass(frozen=True)
class DatasetOptions:
    """The dataset flags of sd-scripts' ``add_dataset_arguments`` (and a few training flags the dataset needs).

    Built once from the parsed command line; field names and defaults are the flags'.
    """

    dataset_config: Path | None = None
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None
    resolution: Size | None = None
    train_batch_size: int = 1
    caption_extension: str = ".caption"
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    """The caption flags (--shuffle_caption, --keep_tokens, --caption_dropout_rate, ...), one per field."""
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    debug_dataset: bool = False
    cache_info: bool = False
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    resize_interpolation: str | None = None
    alpha_mask: bool = False
    dataset_repeats: int = 1
    prior_loss_weight: float = 1.0
    max_token_length: int | None = None
    validation_split: float = 0.0
    validation_seed: int | None = None
    seed: int | None = None
    max_train_steps: int = 1600
    masked_loss: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DatasetOptions":
        """Read the dataset flags; flags a script does not define keep their sd-scripts defaults."""
        values = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls) if f.name != "caption"}
        if values["max_train_steps"] is None:  # set later from --max_train_epochs; warm-up fractions need a number
            values["max_train_steps"] = cls.max_train_steps
        given = {name: getattr(args, name, None) for name in _CAPTION_FIELDS}
        try:  # a flag left at None falls through to the built-in default, as an unset TOML key does
            values["caption"] = CaptionOptions(**{name: value for name, value in given.items() if value is not None})
        except ValueError as error:
            raise DatasetConfigError(f"--{error}") from None
        for name in ("dataset_config", "train_data_dir", "reg_data_dir", "in_json"):
            if values[name] is not None:
                values[name] = Path(values[name])
        values["resolution"] = _parse_resolution_flag(values["resolution"])
        values["face_crop_aug_range"] = _parse_face_crop_flag(values["face_crop_aug_range"])
        return cls(**values)


def _parse_resolution_flag(value: Any) -> Size | None:
    """``--resolution 512`` or ``512,768`` (width,height), as sd-scripts' prepare_dataset_args reads it."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [int(str(part).strip()) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise DatasetConfigError(f"--resolution {value!r}: give 'size' or 'width,height', e.g. 512 or 768,512")
    return numbers[0], numbers[1]


def _parse_face_crop_flag(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(str(part).strip()) for part in parts)
    except ValueError:
        raise DatasetConfigError(f"--face_crop_aug_range {value!r}: give 'low,high', e.g. 2.0,4.0") from None
    if low > high:
        raise DatasetConfigError(f"--face_crop_aug_range {value!r}: the lower bound is above the upper bound")
    return low, high


# --------------------------------------------------------------------------- key schema


class _WrongType(Exception):
    """Raised by a value checker with the expected type in words."""


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _WrongType("true or false")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _WrongType("an integer")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _WrongType("a number")
    return float(value)


def _warmup_step(value: Any) -> float | int:
    # sd-scripts reads values below 1 as a fraction of max_train_steps, so keep ints as ints.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _WrongType("a number")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _WrongType("a string")
    return value


def _table(value: Any) -> dict:
    if not isinstance(value, dict):
        raise _WrongType("a table")
    return dict(value)


def _resolution(value: Any) -> Size:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_positive_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise _WrongType("a positive integer or [width, height]")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _float_pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return _number(value[0]), _number(value[1])
        except _WrongType:
            pass
    raise _WrongType("[low, high] numbers")


def _interpolation(value: Any) -> str:
    if not isinstance(value, str) or value not in INTERPOLATIONS:
        raise _WrongType(f"one of {', '.join(INTERPOLATIONS)}")
    return value


Checker = Callable[[Any], Any]

# Subset settings that may also be written on [[datasets]] or [general] and are inherited downward.
_SUBSET_ASCENDABLE: dict[str, Checker] = {
    "color_aug": _bool, "face_crop_aug_range": _float_pair, "flip_aug": _bool, "num_repeats": _int,
    "random_crop": _bool, "shuffle_caption": _bool, "keep_tokens": _int, "keep_tokens_separator": _str,
    "secondary_separator": _str, "caption_separator": _str, "enable_wildcard": _bool, "token_warmup_min": _int,
    "token_warmup_step": _warmup_step, "caption_prefix": _str, "caption_suffix": _str, "custom_attributes": _table,
    "resize_interpolation": _interpolation,
    "caption_dropout_every_n_epochs": _int, "caption_dropout_rate": _number, "caption_tag_dropout_rate": _number,
}
_DATASET_ASCENDABLE: dict[str, Checker] = {
    "batch_size": _int, "bucket_no_upscale": _bool, "bucket_reso_steps": _int, "enable_bucket": _bool,
    "max_bucket_reso": _int, "min_bucket_reso": _int, "validation_seed": _int, "validation_split": _number,
    "resolution": _resolution, "network_multiplier": _number, "resize_interpolation": _interpolation,
}


@dataclass(frozen=True)
class _Style:
    """A kind of subset (sd-scripts: DreamBooth, fine-tuning, ControlNet-as-mask) and the keys it takes."""

    name: str
    ascendable: Mapping[str, Checker]  # may also sit on [[datasets]] / [general]
    distinct: Mapping[str, Checker]  # subset only
    required: tuple[str, ...]


_DREAMBOOTH = _Style(
    "DreamBooth-style",
    {**_SUBSET_ASCENDABLE, "caption_extension": _str, "class_tokens": _str, "cache_info": _bool},
    {"image_dir": _str, "is_reg": _bool, "alpha_mask": _bool},
    ("image_dir",),
)
_FINE_TUNING = _Style(
    "fine-tuning",
    dict(_SUBSET_ASCENDABLE),
    {"metadata_file": _str, "image_dir": _str, "alpha_mask": _bool},
    ("metadata_file",),
)
_MASKED = _Style(
    "conditioning (mask)",
    {**_SUBSET_ASCENDABLE, "caption_extension": _str, "cache_info": _bool},
    {"image_dir": _str, "conditioning_data_dir": _str},
    ("image_dir", "conditioning_data_dir"),
)
_GENERAL_KEYS: dict[str, Checker] = {**_DATASET_ASCENDABLE, **_DREAMBOOTH.ascendable, **_MASKED.ascendable}
_ALL_SUBSET_KEYS = {**_DREAMBOOTH.ascendable, **_DREAMBOOTH.distinct, **_FINE_TUNING.distinct, **_MASKED.distinct}

# Command-line flags whose TOML key has another name.
_FLAG_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


# --------------------------------------------------------------------------- loading


def load_dataset_configs(options: DatasetOptions) -> list[DatasetConfig]:
    """The datasets to train on, from --dataset_config or else the folder convention / --in_json."""
    if options.dataset_config is not None:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(options, name)]
        if ignored:
            logger.warning("--dataset_config is given, so %s will be ignored", ", ".join(ignored))
        raw = read_config_file(options.dataset_config)
        source = str(options.dataset_config)
    elif options.train_data_dir is not None and options.in_json is not None:
        subset = {"image_dir": str(options.train_data_dir), "metadata_file": str(options.in_json)}
        raw = {"datasets": [{"subsets": [subset]}]}
        source = "--in_json"
    elif options.train_data_dir is not None:
        raw = {"datasets": [{"subsets": folder_convention_subsets(options.train_data_dir, options.reg_data_dir)}]}
        source = "--train_data_dir"
    elif options.in_json is not None:
        raw = {"datasets": [{"subsets": [{"metadata_file": str(options.in_json)}]}]}
        source = "--in_json"
    else:
        raise DatasetConfigError("no training data: pass --dataset_config, --train_data_dir or --in_json")
    return build_dataset_configs(raw, options, source=source)


def read_config_file(path: Path) -> dict:
    """Parse a dataset config (.toml, or .json as sd-scripts also accepts)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetConfigError(f"--dataset_config {path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return toml.load(path)
        if suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetConfigError(f"{path}: not valid {suffix[1:].upper()}: {_one_line(error)}") from None
    raise DatasetConfigError(f"{path}: dataset configs must be .toml or .json files")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def folder_convention_subsets(train_data_dir: Path, reg_data_dir: Path | None) -> list[dict]:
    """Subset tables for sub-folders named ``"<repeats>_<class tokens>"`` (sd-scripts' DreamBooth layout)."""
    subsets = _subsets_from_folders(Path(train_data_dir), "--train_data_dir", is_reg=False)
    if reg_data_dir is not None:
        subsets += _subsets_from_folders(Path(reg_data_dir), "--reg_data_dir", is_reg=True)
    return subsets


def _subsets_from_folders(base: Path, flag: str, *, is_reg: bool) -> list[dict]:
    if not base.is_dir():
        raise DatasetConfigError(f"{flag} {base}: folder not found")
    subsets = []
    for folder in sorted(path for path in base.iterdir() if path.is_dir()):
        repeats_text, _, class_tokens = folder.name.partition("_")
        try:
            repeats = int(repeats_text)
        except ValueError:
            logger.warning("%s: skipping folder '%s': its name does not start with '<repeats>_'", flag, folder.name)
            continue
        if repeats < 1:
            logger.warning("%s: skipping folder '%s': %d repeats", flag, folder.name, repeats)
            continue
        subset = {"image_dir": str(folder), "num_repeats": repeats, "is_reg": is_reg}
        if class_tokens:
            subset["class_tokens"] = class_tokens
        subsets.append(subset)
    if not subsets:
        hint = " (it holds images itself)" if _has_images(base) else ""
        example = base / "10_sks dog"
        raise DatasetConfigError(
            f"{flag} {base}: no sub-folders named '<repeats>_<class tokens>'{hint}; put the images in e.g. '{example}'"
        )
    return subsets


def _has_images(folder: Path) -> bool:
    extensions = {ext.lower() for ext in IMAGE_EXTENSIONS}
    return any(path.suffix.lower() in extensions and path.is_file() for path in folder.iterdir())


# --------------------------------------------------------------------------- validation and inheritance


def build_dataset_configs(raw: Mapping[str, Any], options: DatasetOptions, *, source: str) -> list[DatasetConfig]:
    """Validate a TOML-shaped dict and resolve inheritance; ``source`` names it in error messages."""
    _check_keys(raw, {"general": _table, "datasets": _list_of_tables}, source, "top level")
    general = raw.get("general", {})
    _check_keys(general, _GENERAL_KEYS, source, "[general]")
    datasets_raw = raw.get("datasets", [])
    if not datasets_raw:
        raise DatasetConfigError(f"{source}: no [[datasets]] table; add one with at least one [[datasets.subsets]]")
    flags = _flag_values(options)
    from_file = not source.startswith("--")  # tables written by the folder convention have no place to point at
    configs = []
    for number, dataset in enumerate(datasets_raw, start=1):
        where = f"[[datasets]] #{number}" if from_file else ""
        config = _build_dataset(dataset, general, flags, options, source, where)
        if config.subsets:
            configs.append(config)
        else:
            logger.warning("%s: [[datasets]] #%d has no usable subsets and is skipped", source, number)
    if not configs:
        raise DatasetConfigError(f"{source}: no usable subsets (all have num_repeats < 1 or are duplicates)")
    return configs


def _list_of_tables(value: Any) -> list:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _WrongType("an array of tables ([[...]])")
    return value


def _flag_values(options: DatasetOptions) -> dict[str, Any]:
    """The command-line values as TOML keys: the lowest-priority fallback before built-in defaults."""
    values = {_FLAG_TO_KEY.get(f.name, f.name): getattr(options, f.name) for f in dataclasses.fields(options)}
    del values["caption"]
    return values | {name: getattr(options.caption, name) for name in _CAPTION_FIELDS}


def _place(source: str, where: str) -> str:
    """The start of an error message: the file (or flag) and, for files, the table."""
    return f"{source}: {where} " if where else f"{source}: "


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, Checker], source: str, where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise DatasetConfigError(f"{_place(source, where)}{_unknown_key_reason(key, allowed)}")
        try:
            allowed[key](value)
        except _WrongType as expected:
            raise DatasetConfigError(f"{_place(source, where)}key '{key}' must be {expected}, got {value!r}") from None


def _unknown_key_reason(key: str, allowed: Mapping[str, Checker]) -> str:
    if key in _DATASET_ASCENDABLE:
        return f"key '{key}' belongs in [general] or [[datasets]], not here"
    if key in ("image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"):
        return f"key '{key}' belongs in [[datasets.subsets]]"
    if key in _ALL_SUBSET_KEYS:
        return f"key '{key}' does not apply here (it is for another kind of subset)"
    if key in ("prior_loss_weight", "max_token_length", "debug_dataset"):
        return f"key '{key}' is a command-line flag only; pass --{key}"
    close = difflib.get_close_matches(key, list(allowed), n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{suggestion}"


def _style_of(subsets: list[dict], source: str, where: str) -> _Style:
    if subsets and all("conditioning_data_dir" in subset for subset in subsets):
        return _MASKED
    with_metadata = sum("metadata_file" in subset for subset in subsets)
    if with_metadata == 0:
        return _DREAMBOOTH
    if with_metadata == len(subsets):
        return _FINE_TUNING
    raise DatasetConfigError(
        f"{_place(source, where)}mixes subsets with and without metadata_file;"
        " put fine-tuning subsets in their own [[datasets]]"
    )


def _build_dataset(
    dataset: Mapping[str, Any],
    general: Mapping[str, Any],
    flags: Mapping[str, Any],
    options: DatasetOptions,
    source: str,
    where: str,
) -> DatasetConfig:
    subsets_raw = dataset.get("subsets", [])
    _check_keys({"subsets": subsets_raw}, {"subsets": _list_of_tables}, source, where)
    if not subsets_raw:
        raise DatasetConfigError(f"{_place(source, where)}has no [[datasets.subsets]]; add one with image_dir")
    style = _style_of(subsets_raw, source, where)
    if style is _MASKED and not options.masked_loss:
        raise DatasetConfigError(f"{_place(source, where)}uses conditioning_data_dir, which only --masked_loss reads")
    own_keys = {key: value for key, value in dataset.items() if key != "subsets"}
    _check_keys(own_keys, {**_DATASET_ASCENDABLE, **style.ascendable}, source, where)
    layers = [dataset, general, flags]
    config = _dataset_settings(layers, source, where)

    subsets: list[SubsetConfig] = []
    for number, subset_raw in enumerate(subsets_raw, start=1):
        subset_where = f"{where} [[datasets.subsets]] #{number}" if where else ""
        _check_keys(subset_raw, {**style.ascendable, **style.distinct}, source, subset_where)
        missing = [key for key in style.required if key not in subset_raw]
        if missing:
            raise DatasetConfigError(f"{_place(source, subset_where)}needs '{missing[0]}' ({style.name} subset)")
        subset = _subset_settings(subset_raw, layers, style, source, subset_where)
        if subset.num_repeats < 1:
            logger.warning("%s: %s has num_repeats %d and is skipped", source, subset.label, subset.num_repeats)
        elif any(_same_source(subset, other) for other in subsets):
            logger.warning("%s: %s repeats a subset of the same dataset and is skipped", source, subset.label)
        else:
            subsets.append(subset)
    return dataclasses.replace(config, subsets=tuple(subsets))


def _same_source(a: SubsetConfig, b: SubsetConfig) -> bool:
    """sd-scripts' duplicate-subset rule: same folder (or metadata file, or folder + mask folder)."""
    def source(subset: SubsetConfig) -> tuple:
        return subset.image_dir, subset.metadata_file, subset.conditioning_data_dir

    return source(a) == source(b)


def _lookup(layers: list[Mapping[str, Any]], key: str, default: Any) -> Any:
    for layer in layers:
        value = layer.get(key)
        if value is not None:
            return value
    return default


def _dataset_settings(layers: list[Mapping[str, Any]], source: str, where: str) -> DatasetConfig:
    """The dataset-level settings (subsets are filled in by the caller)."""
    values = {name: _lookup(layers, name, default) for name, default in _dataset_defaults().items()}
    if values["resolution"] is None:
        raise DatasetConfigError(f"{_place(source, where)}has no resolution; set resolution = 512 or pass --resolution")
    values["resolution"] = _resolution(values["resolution"])
    values["validation_split"] = float(values["validation_split"])
    values["network_multiplier"] = float(values["network_multiplier"])
    if values["batch_size"] < 1:
        raise DatasetConfigError(f"{_place(source, where)}batch_size must be at least 1, got {values['batch_size']}")
    if not 0.0 <= values["validation_split"] < 1.0:
        split = values["validation_split"]
        raise DatasetConfigError(f"{_place(source, where)}validation_split must be in [0, 1), got {split}")
    config = DatasetConfig(subsets=(), **values)
    if config.enable_bucket:
        config = _checked_bucket_range(config, source, where)
    return config


def _dataset_defaults() -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(DatasetConfig) if f.name != "subsets"}
    return defaults | {"resolution": None}


def _checked_bucket_range(config: DatasetConfig, source: str, where: str) -> DatasetConfig:
    """Snap min/max bucket sizes outward to bucket_reso_steps (as sd-scripts does) and check the resolution fits."""
    steps = config.bucket_reso_steps
    if steps < 1:
        raise DatasetConfigError(f"{_place(source, where)}bucket_reso_steps must be at least 1, got {steps}")
    low = config.min_bucket_reso - config.min_bucket_reso % steps
    high = config.max_bucket_reso + (-config.max_bucket_reso) % steps
    if (low, high) != (config.min_bucket_reso, config.max_bucket_reso):
        logger.warning("%s: %s bucket sizes snapped to multiples of %d: min %d, max %d", source, where, steps, low, high)
    if min(config.resolution) < low or max(config.resolution) > high:
        raise DatasetConfigError(
            f"{_place(source, where)}resolution {config.resolution[0]}x{config.resolution[1]} lies outside the bucket range "
            f"[{low}, {high}]; adjust min_bucket_reso / max_bucket_reso"
        )
    return dataclasses.replace(config, min_bucket_reso=low, max_bucket_reso=high)



def _subset_settings(
    subset: Mapping[str, Any], layers: list[Mapping[str, Any]], style: _Style, source: str, where: str
) -> SubsetConfig:
    chain = [subset, *layers]
    caption_defaults = CaptionOptions()
    try:
        caption = CaptionOptions(**{name: _lookup(chain, name, getattr(caption_defaults, name)) for name in _CAPTION_FIELDS})
    except ValueError as error:
        raise DatasetConfigError(f"{_place(source, where)}{error}") from None

    def pick(name: str, default: Any) -> Any:
        # Distinct keys come from the subset itself (or a flag, like --alpha_mask), never from a parent table.
        if name in style.distinct:
            return _lookup([subset, layers[-1]], name, default)
        if name in style.ascendable:
            return _lookup(chain, name, default)
        return default

    def path(name: str) -> Path | None:
        value = subset.get(name)
        return None if value is None else Path(value)

    if pick("face_crop_aug_range", None) is not None:
        raise DatasetConfigError(
            f"{_place(source, where)}face_crop_aug_range (--face_crop_aug_range) is not supported: it needs the"
            " face positions that sd-scripts' detect_face_rotate.py writes into file names; remove it"
        )
    config = SubsetConfig(
        image_dir=path("image_dir"),
        caption=caption,
        num_repeats=pick("num_repeats", 1),
        caption_extension=pick("caption_extension", ".caption"),
        class_tokens=pick("class_tokens", None) or None,
        is_reg=pick("is_reg", False),
        alpha_mask=pick("alpha_mask", False),
        metadata_file=path("metadata_file"),
        conditioning_data_dir=path("conditioning_data_dir"),
        flip_aug=pick("flip_aug", False),
        color_aug=pick("color_aug", False),
        random_crop=pick("random_crop", False),
        cache_info=pick("cache_info", False),
        resize_interpolation=pick("resize_interpolation", None),
        custom_attributes=dict(pick("custom_attributes", None) or {}),
    )
    _check_paths(config, source, where)
    return config


def _check_paths(subset: SubsetConfig, source: str, where: str) -> None:
    if subset.metadata_file is not None and not subset.metadata_file.is_file():
        raise DatasetConfigError(f"{_place(source, where)}metadata_file '{subset.metadata_file}' not found")
    if subset.image_dir is not None and not subset.image_dir.is_dir():
        raise DatasetConfigError(f"{_place(source, where)}image_dir '{subset.image_dir}' is not a folder")
    if subset.metadata_file is None and subset.image_dir is not None and not _has_images(subset.image_dir):
        extensions = ", ".join(sorted({ext.lower() for ext in IMAGE_EXTENSIONS}))
        raise DatasetConfigError(f"{_place(source, where)}image_dir '{subset.image_dir}' holds no images ({extensions})")
    if subset.conditioning_data_dir is not None and not subset.conditioning_data_dir.is_dir():
        folder = subset.conditioning_data_dir
        raise DatasetConfigError(f"{_place(source, where)}conditioning_data_dir '{folder}' is not a folder")


# --------------------------------------------------------------------------- fine-tuning metadata (--in_json)


@dataclass(frozen=True)
class MetadataImage:
    """One image of a fine-tuning metadata file, with its training caption (caption + tags)."""

    path: Path
    caption: str
    size: Size | None
    tags: str | None


def read_metadata_images(subset: SubsetConfig) -> list[MetadataImage]:
    """The images of a fine-tuning subset: JSON ``{image: {caption, tags, image_size}}`` or JSONL lines.

    Tags are appended to the caption with the caption separator, to every line when wildcards are on,
    as sd-scripts' FineTuningDataset does.
    """
    separator = subset.caption.caption_separator
    images = []
    for image_key, record in _read_metadata(subset.metadata_file).items():
        caption, tags = record.get("caption") or "", record.get("tags") or None
        if tags and subset.caption.enable_wildcard:
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = f"{caption}{separator}{tags}" if caption else tags
        size = tuple(record["image_size"]) if record.get("image_size") else None
        images.append(MetadataImage(_resolve_metadata_image(subset, image_key), caption, size, tags))
    return images


def _read_metadata(metadata_file: Path) -> dict[str, dict]:
    try:
        text = metadata_file.read_text(encoding="utf-8")
        if metadata_file.suffix.lower() == ".jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            records = {line["image_path"]: line for line in lines}
        else:
            records = json.loads(text)
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetConfigError(f"metadata_file {metadata_file}: not valid metadata JSON ({_one_line(error)})") from None
    if not isinstance(records, dict) or not all(isinstance(record, dict) for record in records.values()):
        raise DatasetConfigError(f'metadata_file {metadata_file}: expected {{"<image>": {{"caption": ..., "tags": ...}}}}')
    return records


def _resolve_metadata_image(subset: SubsetConfig, image_key: str) -> Path:
    """Keys are absolute paths, or paths relative to image_dir (sd-scripts' finetune tools write bare stems)."""
    key_path = Path(image_key)
    if not key_path.is_absolute():
        if subset.image_dir is None:
            raise DatasetConfigError(f"metadata_file {subset.metadata_file}: image '{image_key}' is relative; set image_dir")
        key_path = subset.image_dir / key_path
    if key_path.is_file():
        return key_path
    for extension in sorted({ext.lower() for ext in IMAGE_EXTENSIONS}):
        candidate = Path(str(key_path) + extension)
        if candidate.is_file():
            return candidate
    raise DatasetConfigError(f"metadata_file {subset.metadata_file}: image '{image_key}' not found (looked for {key_path})")
