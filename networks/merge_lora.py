"""Merge LoRAs into a checkpoint, or several LoRAs into one (sd-scripts' networks/merge_lora.py flags).

Into a checkpoint (`--sd_model`): every family (SD1, SD2, SDXL, SD3/3.5) is recognised from the file's keys.
Each module's change ratio * up @ down * alpha / rank is added, in float32 by default, to the checkpoint tensor
the module's layer loads from: for the OpenCLIP text encoders of SD2 and SDXL (bigG) a q/k/v module goes into
its rows of the fused `in_proj_weight`. The output has the input's layout and keys; tensors no LoRA touches are
written bit for bit, touched ones in their own dtype (or `--save_precision`). No model is built, so memory is the
checkpoint plus one tensor.

SD3.5 files hold no text encoders; `--clip_l` / `--clip_g` / `--t5xxl` name the separate files (any layout the SD3
loader takes). The LoRA's lora_te1/2/3 modules are merged into them, and each one a module changes is written
next to --save_to as `<save_to stem>_<name>.safetensors`, in its input's keys and layout.

    python networks/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors
        --ratios 0.8 0.5 --save_to merged.safetensors

LoRA + LoRA (no `--sd_model`), two exact ways:
* default, and `--concat`: the modules' ranks are stacked, so the merged module's change is exactly
  sum(ratio_i * dW_i) at rank sum(rank_i). sd-scripts' default instead adds up and down weights of same-rank
  modules separately, which is not that sum ((u1 + u2)(d1 + d2) != u1 d1 + u2 d2); it is not offered.
* `--new_rank R [--new_conv_rank C]` (sd-scripts' svd_merge_lora.py): the summed change is factored by truncated
  SVD to rank R (C for 3x3 convs; default R), alpha = rank. sd-scripts also clamps the factors at their 0.99
  quantile; here the factors are the exact truncation, so a rank >= the stacked rank is lossless.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors import safe_open
from torch import Tensor

from library.console import exit_on_user_error
from library.metadata import (
    IMPLEMENTATION_DIFFUSERS,
    BaseModelFacts,
    base_model_facts,
    facts_for_base_version,
    modelspec_metadata,
)
from library.models.checkpoint import load_state_dict
from library.models.loading_common import errors_naming
from library.models.sd3_loading import ENCODERS as SD3_TEXT_ENCODERS
from library.saving import SAFETENSORS_SUFFIX, save_lora_file, save_tensors
from networks.lora import lora_delta_weight
from networks.lora_checkpoint_map import (
    FAMILY_LABELS,
    LoRACheckpointMap,
    SeparateTextEncoder,
    WeightSlot,
    map_with_text_encoder_files,
    read_separate_text_encoder,
)
from networks.lora_family import guess_lora_family, lora_families_differ
from networks.lora_modules import (
    FactoredModule,
    LoRAModuleWeights,
    lora_state_dict,
    network_rank_metadata,
    rank_span,
    read_tensor_file,
    split_lora_modules,
)
from networks.lora_svd import factorize_lora
from networks.tool_flags import PRECISIONS, add_family_flags, check_save_to, given_family_flags, parse_device, plural

logger = logging.getLogger(__name__)

_SHOWN_NAMES = 3


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class WeightedLoRA:
    """One --models file with its --ratios value."""

    path: Path
    ratio: float
    modules: dict[str, LoRAModuleWeights]
    metadata: dict[str, str]

    @property
    def title(self) -> str:
        """What modelspec.merged_from calls this file: its modelspec title, else its name (as sd-scripts)."""
        return self.metadata.get("modelspec.title") or self.path.stem


def read_loras(paths: Sequence[Path], ratios: Sequence[float]) -> list[WeightedLoRA]:
    """Read every LoRA file; a file without LoRA modules or with a broken module is an error naming it."""
    loras = []
    for path, ratio in zip(paths, ratios, strict=True):
        tensors, metadata = read_tensor_file(Path(path), "--models")
        modules, others = split_lora_modules(tensors, f"--models {path}")
        if others:
            logger.warning("%s: %s outside the LoRA modules ignored (first: %s)", path,
                           plural(len(others), "tensor"), next(iter(others)))
        loras.append(WeightedLoRA(Path(path), float(ratio), modules, dict(metadata or {})))
    return loras


def _header_metadata(path: Path) -> dict[str, str]:
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {}
    with safe_open(str(path), framework="pt") as file:
        return dict(file.metadata() or {})


# ----------------------------------------------------------------------------- into a checkpoint
@dataclass(frozen=True)
class Placement:
    """One module of one LoRA, and the checkpoint rows it changes."""

    slot: WeightSlot
    module: LoRAModuleWeights
    ratio: float


def place_modules(lora_map: LoRACheckpointMap, loras: Sequence[WeightedLoRA]) -> dict[str, list[Placement]]:
    """Checkpoint key -> the modules that change it. Raises before any arithmetic when a module names no layer
    of this checkpoint or its change has another shape than the layer (a LoRA for another family)."""
    placements: dict[str, list[Placement]] = {}
    for lora in loras:
        unmatched = lora_map.unmatched(lora.modules)
        if unmatched:
            raise ValueError(_unmatched_message(lora, unmatched, lora_map))
        for name, module in lora.modules.items():
            slot = lora_map.slots[name]
            delta_shape = (module.up.shape[0], *module.down.shape[1:])
            if math.prod(delta_shape) != math.prod(slot.shape) or delta_shape[0] != slot.shape[0]:
                raise ValueError(
                    f"--models {lora.path}: module {name} changes a {_shape(delta_shape)} weight, but its layer "
                    f"({slot.key}) in the {lora_map.family_label} checkpoint {lora_map.source} is {_shape(slot.shape)}; "
                    "is the LoRA for another model family?")
            placements.setdefault(slot.key, []).append(Placement(slot, module, lora.ratio))
    return placements


def _unmatched_message(lora: WeightedLoRA, unmatched: list[str], lora_map: LoRACheckpointMap) -> str:
    missing_encoders = _absent_encoder_message(lora, unmatched, lora_map)
    if missing_encoders:
        return missing_encoders
    shown = ", ".join(unmatched[:_SHOWN_NAMES]) + (f" (+{len(unmatched) - _SHOWN_NAMES} more)"
                                                   if len(unmatched) > _SHOWN_NAMES else "")
    guess = guess_lora_family(unmatched)
    hint = f"; the names look like a {guess} LoRA" if guess else ""
    return (f"--models {lora.path}: {len(unmatched)} of {plural(len(lora.modules), 'LoRA module')} match no layer of the "
            f"{lora_map.family_label} checkpoint {lora_map.source} (which holds {', '.join(lora_map.models_present)}): "
            f"{shown}{hint}")


def _absent_encoder_message(lora: WeightedLoRA, unmatched: list[str], lora_map: LoRACheckpointMap) -> str | None:
    """When every unmatched module is of SD3 text encoders the checkpoint lacks: the flags that supply them."""
    missing = [(encoder, sum(name.startswith(encoder.lora_prefix) for name in unmatched))
               for encoder in lora_map.absent_text_encoders if encoder.separate_file]
    missing = [(encoder, count) for encoder, count in missing if count]
    if not missing or sum(count for _, count in missing) != len(unmatched):
        return None
    flags = " ".join(f"--{encoder.separate_file} FILE" for encoder, _ in missing)
    counts = " and ".join(plural(count, f"{encoder.lora_prefix}* module") for encoder, count in missing)
    labels = " or ".join(encoder.label for encoder, _ in missing)
    return f"--models {lora.path}: add {flags} (the LoRA has {counts}, and {lora_map.source} holds no {labels})"


def _shape(shape: Iterable[int]) -> str:
    return "x".join(str(size) for size in shape)


@torch.no_grad()
def add_deltas(tensor: Tensor, placements: Sequence[Placement], compute_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", out_dtype: torch.dtype | None = None) -> Tensor:
    """`tensor` plus every placed module's ratio * dW (in its rows), computed in `compute_dtype` on `device` and
    returned on the CPU in `out_dtype` (default: the tensor's own dtype), rounded once."""
    work = tensor.to(device=device, dtype=compute_dtype, copy=True)
    for placement in placements:
        module = placement.module
        delta = lora_delta_weight(module.down.to(device, compute_dtype), module.up.to(device, compute_dtype),
                                  module.scale)
        target = placement.slot.view(work)
        target += (delta * placement.ratio).reshape(target.shape)  # a Linear LoRA on a 1x1 conv: same numbers
    return work.to("cpu", out_dtype or tensor.dtype)


def merge_into_checkpoint(sd_model: Path, loras: Sequence[WeightedLoRA], save_to: Path, *,
                          text_encoder_files: Mapping[str, Path] | None = None,
                          compute_dtype: torch.dtype = torch.float32, save_dtype: torch.dtype | None = None,
                          device: str = "cpu", write_metadata: bool = True) -> LoRACheckpointMap:
    """Write `save_to`: the checkpoint `sd_model` with every LoRA merged at its ratio (see the module doc), and
    next to it each of the SD3 `text_encoder_files` (name -> file, e.g. "clip_l") that a module changes."""
    sd_model = Path(sd_model)
    state_dict = load_state_dict(sd_model)
    encoders = _read_text_encoder_files(text_encoder_files or {})
    lora_map = map_with_text_encoder_files({key: tuple(value.shape) for key, value in state_dict.items()},
                                           str(sd_model), [encoder for encoder, _ in encoders])
    logger.info("%s: %s checkpoint (%s)", sd_model, lora_map.family_label, ", ".join(lora_map.models_present))
    placements = place_modules(lora_map, loras)
    # a placement's key is a single-file key; those of a separate encoder are written back under its own keys
    owners = {key: (encoder.name, file_key, tensors) for encoder, tensors in encoders
              for key, file_key in encoder.file_keys.items()}
    touched: set[str] = set()  # names of the separate encoders a module changed ("" for the checkpoint)
    rounded_to_fp8 = 0
    for key, placed in placements.items():
        owner, target_key, tensors = owners.get(key, ("", key, state_dict))
        rounded_to_fp8 += save_dtype is None and tensors[target_key].element_size() == 1
        tensors[target_key] = add_deltas(tensors[target_key], placed, compute_dtype, device, save_dtype)
        touched.add(owner)
    if rounded_to_fp8:
        # float8 keeps 3 mantissa bits: a LoRA's small change mostly rounds away
        logger.warning("%s stored in float8, so rounded back to it, which loses most of a LoRA's change; "
                       "add --save_precision fp16/bf16/float to keep it", plural(rounded_to_fp8, "merged tensor"))
    logger.info("merged %s into %s", plural(sum(map(len, placements.values())), "LoRA module"),
                plural(len(placements), "tensor"))
    metadata = _checkpoint_metadata(sd_model, lora_map, loras, save_to) if write_metadata else None
    logger.info("saving %s", save_to)
    save_tensors(save_to, state_dict, metadata, dtype=save_dtype)
    _save_text_encoder_files(encoders, touched, save_to, save_dtype, write_metadata)
    return lora_map


def text_encoder_output(save_to: Path, name: str) -> Path:
    """Where the merged copy of the separate text encoder `name` ("clip_l", ...) is written."""
    return Path(save_to).with_name(f"{Path(save_to).stem}_{name}{SAFETENSORS_SUFFIX}")


def _read_text_encoder_files(files: Mapping[str, Path]) -> list[tuple[SeparateTextEncoder, dict[str, Tensor]]]:
    """Each file's map view and its tensors as stored (what is written back)."""
    read = []
    for name, path in files.items():
        with errors_naming(path, f"--{name} "):
            tensors = load_state_dict(path)
            shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
            read.append((read_separate_text_encoder(name, Path(path), shapes), tensors))
    return read


def _save_text_encoder_files(encoders: Sequence[tuple[SeparateTextEncoder, dict[str, Tensor]]], touched: set[str],
                             save_to: Path, save_dtype: torch.dtype | None, write_metadata: bool) -> None:
    """Write the encoders a module changed; an unchanged one is not copied (its input file serves as it is)."""
    for encoder, tensors in encoders:
        if encoder.name not in touched:
            logger.info("%s %s: no LoRA module changes it; not written, use the file as it is", encoder.flag,
                        encoder.path)
            continue
        output = text_encoder_output(save_to, encoder.name)
        metadata = _kept_header(encoder.path) if write_metadata else None
        logger.info("saving %s (%s %s with the LoRAs merged)", output, encoder.flag, encoder.path)
        save_tensors(output, tensors, metadata, dtype=save_dtype)


def _kept_header(path: Path) -> dict[str, str]:
    # modelspec.hash_sha256 hashed the input's weights, which the merge changed
    return {key: value for key, value in _header_metadata(path).items() if key != "modelspec.hash_sha256"}


def _checkpoint_metadata(sd_model: Path, lora_map: LoRACheckpointMap, loras: Sequence[WeightedLoRA],
                         save_to: Path) -> dict[str, str]:
    """The input's header metadata with a fresh modelspec: the model's own spec values where it has them,
    title = the output's name, merged_from = the checkpoint and the LoRAs."""
    header = _header_metadata(sd_model)
    prediction = header.get("modelspec.prediction_type")
    if lora_map.family == "sd2" and prediction is None:
        logger.warning("%s: whether this SD2 model predicts v cannot be told from its weights; its metadata says "
                       "v-prediction (768-v), as sd-scripts assumes", sd_model)
    facts = base_model_facts(lora_map.family, lora_map.variant,
                             v_parameterization=prediction == "v" or (lora_map.family == "sd2" and prediction is None))
    titles = [header.get("modelspec.title") or sd_model.stem] + [lora.title for lora in loras]
    return {**_kept_header(sd_model), **_modelspec(facts, "", save_to, titles, header)}


_SPEC_FIELDS = ("architecture", "implementation", "resolution", "prediction_type")


def _modelspec(facts: BaseModelFacts | None, architecture_suffix: str, save_to: Path, merged_from: Sequence[str],
               spec: dict[str, str]) -> dict[str, str]:
    """modelspec.* with an existing spec's values where it has them, else the family's facts; {} when neither
    says what the model is."""
    values: dict[str, object] = {}
    if facts is not None:
        values = {"architecture": facts.architecture + architecture_suffix, "implementation": facts.implementation,
                  "resolution": facts.resolution, "prediction_type": facts.prediction_type}
    values.update({name: spec[f"modelspec.{name}"] for name in _SPEC_FIELDS if f"modelspec.{name}" in spec})
    if "architecture" not in values:
        return {}
    return modelspec_metadata(
        architecture=values["architecture"], implementation=values.get("implementation", IMPLEMENTATION_DIFFUSERS),
        title=Path(save_to).stem, resolution=values.get("resolution", 512),
        prediction_type=values.get("prediction_type"), timestamp=time.time(), merged_from=", ".join(merged_from))


# ----------------------------------------------------------------------------- LoRA + LoRA
def check_one_model(loras: Sequence[WeightedLoRA]) -> None:
    """Refuse LoRAs for different models, which would merge into a file of mixed modules: their module names
    point to different families, or both files' ss_base_model_version name different networks."""
    families = [guess_lora_family(lora.modules) for lora in loras]
    for (first, first_family), (second, second_family) in combinations(zip(loras, families), 2):
        if lora_families_differ(first_family, second_family):
            raise ValueError(f"--models {first.path} ({first_family} LoRA) and {second.path} ({second_family} LoRA), "
                             "by their module names: LoRAs of different model families cannot be merged into one")
        versions = [lora.metadata.get("ss_base_model_version") for lora in (first, second)]
        # "sd_v2_v" is SD2 trained for v-prediction: the same network as "sd_v2", so its LoRAs combine.
        if None not in versions and versions[0].removesuffix("_v") != versions[1].removesuffix("_v"):
            raise ValueError(f"--models {first.path} (ss_base_model_version {versions[0]}) and {second.path} "
                             f"({versions[1]}): LoRAs of different base models cannot be merged into one")


def stack_modules(name: str, contributions: Sequence[tuple[LoRAModuleWeights, float, Path]],
                  compute_dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(down, up) of rank sum(rank_i) with up @ down = sum(ratio_i * dW_i) exactly: each module's ratio * alpha / rank
    is split as its square root over its down and up rows, so neither factor dwarfs the other."""
    reference = contributions[0][0]
    downs, ups = [], []
    for module, ratio, path in contributions:
        down = module.down.to(device, compute_dtype)
        if down.shape[1:] != reference.down.shape[1:] or module.up.shape[0] != reference.up.shape[0]:
            if down[0].numel() != reference.down[0].numel() or module.up.shape[0] != reference.up.shape[0]:
                raise ValueError(f"--models {path}: module {name} has lora_down {_shape(module.down.shape)} and lora_up "
                                 f"{_shape(module.up.shape)}, which do not fit the same module of {contributions[0][2]} "
                                 f"({_shape(reference.down.shape)}, {_shape(reference.up.shape)}); LoRAs for different "
                                 "models cannot be merged")
            down = down.reshape(down.shape[0], *reference.down.shape[1:])  # a Linear LoRA for a 1x1 conv layer
        factor = ratio * module.scale
        root = math.sqrt(abs(factor))
        up = module.up.to(device, compute_dtype).reshape(module.up.shape[0], module.rank, *reference.up.shape[2:])
        downs.append(down * root)
        ups.append(up * (math.copysign(root, factor)))
    return torch.cat(downs, dim=0), torch.cat(ups, dim=1)


@torch.no_grad()
def merge_lora_modules(loras: Sequence[WeightedLoRA], *, new_rank: int | None = None, new_conv_rank: int | None = None,
                       shuffle: bool = False, compute_dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> list[FactoredModule]:
    """One module per name found in any input (in first-seen order), stacked or, with `new_rank`, re-factored."""
    by_name: dict[str, list[tuple[LoRAModuleWeights, float, Path]]] = {}
    for lora in loras:
        for name, module in lora.modules.items():
            by_name.setdefault(name, [])
            if lora.ratio != 0:
                by_name[name].append((module, lora.ratio, lora.path))
    merged = []
    for name, contributions in by_name.items():
        if not contributions:
            logger.info("%s: every LoRA holding it has ratio 0; left out", name)
            continue
        down, up = stack_modules(name, contributions, compute_dtype, device)
        if new_rank is not None:
            rank = (new_conv_rank or new_rank) if contributions[0][0].is_spatial_conv else new_rank
            low = factorize_lora(down, up, 1.0, min(rank, down.shape[0]))
            merged.append(FactoredModule(name, low.down.cpu(), low.up.cpu(), low.alpha, low.retained_fro))
            continue
        if shuffle:  # a permutation of the ranks; the change is the same
            order = torch.randperm(down.shape[0], device=down.device)
            down, up = down[order], up[:, order]
        merged.append(FactoredModule(name, down.cpu(), up.cpu(), float(down.shape[0])))
    return merged


def merge_lora_files(loras: Sequence[WeightedLoRA], save_to: Path, *, new_rank: int | None = None,
                     new_conv_rank: int | None = None, shuffle: bool = False,
                     compute_dtype: torch.dtype = torch.float32, save_dtype: torch.dtype | None = None,
                     device: str = "cpu", write_metadata: bool = True) -> list[FactoredModule]:
    """Write `save_to`: the LoRAs merged into one (see the module doc). `save_dtype` defaults to the dtype the
    first input stores its weights in. LoRAs for different models are refused (`check_one_model`)."""
    check_one_model(loras)
    modules = merge_lora_modules(loras, new_rank=new_rank, new_conv_rank=new_conv_rank, shuffle=shuffle,
                                 compute_dtype=compute_dtype, device=device)
    if not modules:
        raise ValueError("--ratios: every ratio is 0, so the merged LoRA would be empty")
    _report(modules, new_rank is not None)
    metadata = _lora_metadata(loras, modules, save_to, write_metadata)
    dtype = save_dtype or next(iter(loras[0].modules.values())).up.dtype
    logger.info("saving %s (%s)", save_to, str(dtype).removeprefix("torch."))
    save_lora_file(save_to, lora_state_dict(modules), metadata, dtype=dtype)
    return modules


def _report(modules: Sequence[FactoredModule], factored: bool) -> None:
    span = rank_span(module.rank for module in modules)
    if not factored:
        logger.info("merged %s by stacking their ranks (rank %s); the merge is exact", plural(len(modules), "module"),
                    span)
        return
    least = min(modules, key=lambda module: module.retained_fro)
    mean = sum(module.retained_fro for module in modules) / len(modules)
    logger.info("merged %s at rank %s; Frobenius norm of the summed change kept: mean %.2f%%, min %.2f%% (%s)",
                plural(len(modules), "module"), span, 100 * mean, 100 * least.retained_fro, least.name)


def _lora_metadata(loras: Sequence[WeightedLoRA], modules: Sequence[FactoredModule], save_to: Path,
                   write_modelspec: bool) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata (kept with --no_metadata) and, unless --no_metadata, a modelspec whose
    merged_from lists the inputs; the base model is the first input's that names one."""
    metadata = network_rank_metadata(modules)
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((lora.metadata[key] for lora in loras if key in lora.metadata), None)
        if value is not None:
            metadata[key] = value
    if not write_modelspec:
        return metadata
    spec = next((lora.metadata for lora in loras if "modelspec.architecture" in lora.metadata), {})
    facts = facts_for_base_version(metadata.get("ss_base_model_version", ""))
    modelspec = _modelspec(facts, "/lora", save_to, [lora.title for lora in loras], spec)
    if not modelspec:
        logger.info("no input says which base model it is for; the merged file gets no modelspec")
    return {**metadata, **modelspec}


# ----------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class MergeConfig:
    """The merge the flags ask for, checked before any file is read."""

    models: tuple[Path, ...]
    ratios: tuple[float, ...]
    save_to: Path
    sd_model: Path | None = None
    text_encoders: tuple[tuple[str, Path], ...] = ()  # SD3's separate files: ("clip_l", path), ...
    new_rank: int | None = None
    new_conv_rank: int | None = None
    shuffle: bool = False
    compute_dtype: torch.dtype = torch.float32
    save_dtype: torch.dtype | None = None
    device: str = "cpu"
    write_metadata: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MergeConfig:
        if not args.models:
            raise ValueError("--models: give one or more LoRA files to merge")
        if args.save_to is None:
            raise ValueError("--save_to: give the file to write (.safetensors, .ckpt or .pt)")
        save_to = check_save_to(args.save_to)
        ratios = args.ratios if args.ratios else [1.0] * len(args.models)
        if len(ratios) != len(args.models):
            raise ValueError(f"--ratios: {plural(len(ratios), 'value')} for {len(args.models)} --models; give one "
                             "per model")
        if args.lbws:
            raise ValueError("--lbws (per-block ratios) is not supported; merge with one --ratios value per model")
        _check_lora_flags(args)
        text_encoders = tuple((name, Path(getattr(args, name))) for name in SD3_TEXT_ENCODERS if getattr(args, name))
        if text_encoders and not args.sd_model:
            raise ValueError(f"--{text_encoders[0][0]}: only with --sd_model, to merge into an SD3/SD3.5 checkpoint")
        return cls(models=tuple(Path(model) for model in args.models), ratios=tuple(ratios), save_to=save_to,
                   sd_model=Path(args.sd_model) if args.sd_model else None, text_encoders=text_encoders,
                   new_rank=args.new_rank,
                   new_conv_rank=args.new_conv_rank, shuffle=args.shuffle, compute_dtype=PRECISIONS[args.precision],
                   save_dtype=PRECISIONS[args.save_precision] if args.save_precision else None,
                   device=parse_device(args.device), write_metadata=not args.no_metadata)


def _check_lora_flags(args: argparse.Namespace) -> None:
    if args.sd_model:
        used = [flag for flag, value in (("--concat", args.concat), ("--shuffle", args.shuffle),
                                         ("--new_rank", args.new_rank), ("--new_conv_rank", args.new_conv_rank))
                if value]
        if used:
            raise ValueError(f"{', '.join(used)}: only for merging LoRAs into one LoRA; drop it or --sd_model")
        return
    if args.new_rank is not None and args.new_rank < 1 or args.new_conv_rank is not None and args.new_conv_rank < 1:
        raise ValueError("--new_rank / --new_conv_rank: a rank is at least 1")
    if args.new_conv_rank is not None and args.new_rank is None:
        raise ValueError("--new_conv_rank needs --new_rank (the rank of the other modules)")
    if args.new_rank is not None and (args.concat or args.shuffle):
        raise ValueError("--concat / --shuffle stack the ranks; --new_rank re-factors them; choose one")


def run(config: MergeConfig, family_hints: Sequence[tuple[str, str]] = ()) -> None:
    """Do the merge `config` describes; `family_hints` are (flag, family) of the --v2 / --sdxl flags given."""
    loras = read_loras(config.models, config.ratios)
    if config.sd_model is None:
        for flag, _ in family_hints:
            logger.warning("%s: ignored; it only names a checkpoint's family, and there is no --sd_model", flag)
        merge_lora_files(loras, config.save_to, new_rank=config.new_rank, new_conv_rank=config.new_conv_rank,
                         shuffle=config.shuffle, compute_dtype=config.compute_dtype, save_dtype=config.save_dtype,
                         device=config.device, write_metadata=config.write_metadata)
        return
    lora_map = merge_into_checkpoint(config.sd_model, loras, config.save_to,
                                     text_encoder_files=dict(config.text_encoders), compute_dtype=config.compute_dtype,
                                     save_dtype=config.save_dtype, device=config.device,
                                     write_metadata=config.write_metadata)
    for flag, family in family_hints:
        if family != lora_map.family:
            logger.warning("%s: ignored; %s is %s (the family is read from the file)", flag, config.sd_model,
                           FAMILY_LABELS[lora_map.family])


def setup_parser(prog: str | None = None, default_new_rank: int | None = None) -> argparse.ArgumentParser:
    """The flags of merge_lora.py (and, with `default_new_rank`, of svd_merge_lora.py)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Merge LoRAs into a Stable Diffusion checkpoint (SD1, SD2, SDXL, SD3/3.5), or several "
                               "LoRAs into one.")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--sd_model", default=None,
                        help="checkpoint to merge into (.safetensors/.ckpt, any family); leave out to merge the LoRAs "
                             "into one LoRA")
    for name, label in (("clip_l", "CLIP-L"), ("clip_g", "CLIP-G"), ("t5xxl", "T5-XXL")):
        inputs.add_argument(f"--{name}", default=None,
                            help=f"SD3/SD3.5: the separate {label} file, for a LoRA with {label} modules; written "
                                 f"merged as <save_to stem>_{name}.safetensors")
    inputs.add_argument("--models", nargs="*", help="LoRA files to merge (.safetensors, .ckpt, .pt)")
    inputs.add_argument("--ratios", type=float, nargs="*",
                        help="one multiplier per --models file (default 1.0 each; negative subtracts)")
    output = parser.add_argument_group("output")
    output.add_argument("--save_to", default=None, help="file to write (.safetensors, .ckpt or .pt); written atomically")
    output.add_argument("--save_precision", choices=list(PRECISIONS), default=None,
                        help="dtype of the saved weights (default: a checkpoint keeps each tensor's dtype; a merged "
                             "LoRA takes the first input's)")
    output.add_argument("--no_metadata", action="store_true",
                        help="write no modelspec metadata (a LoRA keeps sd-scripts' minimum ss_* keys; a checkpoint "
                             "gets no metadata)")
    lora = parser.add_argument_group("LoRA + LoRA (without --sd_model)")
    lora.add_argument("--concat", action="store_true",
                      help="stack the modules' ranks (rank = sum of the input ranks): the exact merge, and the default "
                           "here")
    lora.add_argument("--shuffle", action="store_true", help="permute each stacked module's ranks (same change)")
    lora.add_argument("--new_rank", type=int, default=default_new_rank,
                      help="re-factor each summed change to this rank by truncated SVD (svd_merge_lora.py; default "
                           f"{default_new_rank if default_new_rank else 'off: stack the ranks'})")
    lora.add_argument("--new_conv_rank", type=int, default=None,
                      help="rank of 3x3 conv modules with --new_rank (default: --new_rank)")
    lora.add_argument("--lbws", nargs="*", default=None, help="not supported (sd-scripts' per-block ratios); rejected")
    compute = parser.add_argument_group("computation")
    compute.add_argument("--precision", choices=list(PRECISIONS), default="float",
                         help="dtype of the merge arithmetic (default float; SVD is always float)")
    compute.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: cpu)")
    add_family_flags(parser, "the checkpoint")
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> None:
    args = (parser or setup_parser()).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_user_error(lambda: run(MergeConfig.from_args(args), given_family_flags(args)), (ValueError, OSError))


if __name__ == "__main__":
    main()
