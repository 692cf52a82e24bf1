"""Extract a LoRA from the difference of two checkpoints (sd-scripts' networks/extract_lora_from_models.py flags).

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors
        --save_to extracted.safetensors --dim 16 [--conv_dim 8]

Every family (SD1, SD2, SDXL, SD3/3.5) is read from the files; both must be of one family and layout. For each
layer a LoRA of that family trains by default (plus the 3x3 convs of the ResNet blocks with --conv_dim), the
change tuned - original is taken from the two checkpoint tensors the layer loads from (for the fused OpenCLIP
q/k/v of SD2 and SDXL: its rows), found by the same map the merge tool uses (networks/lora_checkpoint_map.py),
and factored by truncated SVD at rank --dim (--conv_dim for 3x3 convs), alpha = rank. The factors' entries are
clamped at the --clamp_quantile quantile of their magnitudes (1 keeps the exact truncation). Module names are
the ones training writes, so the file loads wherever our LoRAs do.

Which parts are extracted, as sd-scripts: a text encoder only when one of its layers differs by more than
--min_diff (fine-tunes often leave them as they were, up to rounding), decided here per encoder; the denoiser
always, except layers that do not differ at all. Two checkpoints without any such difference are an error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from library.console import exit_on_user_error
from library.metadata import base_model_facts, modelspec_metadata
from library.models.checkpoint import load_state_dict
from library.saving import save_lora_file
from networks.lora_checkpoint_map import FAMILY_LABELS, LoRACheckpointMap, map_checkpoint
from networks.lora_modules import FactoredModule, lora_state_dict, network_rank_metadata
from networks.lora_svd import factorize
from networks.tool_flags import PRECISIONS, add_family_flags, check_save_to, given_family_flags, parse_device, plural

logger = logging.getLogger(__name__)

DENOISER_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class ExtractConfig:
    """What the flags ask for, checked before any file is read."""

    model_org: Path
    model_tuned: Path
    save_to: Path
    dim: int = 4
    conv_dim: int | None = None
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    load_dtype: torch.dtype | None = None
    save_dtype: torch.dtype | None = None
    device: str = "cpu"
    org_device: str = "cpu"
    tuned_device: str = "cpu"
    v_parameterization: bool | None = None  # None: as sd-scripts, on exactly for SD2
    write_metadata: bool = True

    def __post_init__(self) -> None:
        if self.dim < 1 or (self.conv_dim is not None and self.conv_dim < 1):
            raise ValueError("--dim / --conv_dim: a rank is at least 1")
        if not 0 < self.clamp_quantile <= 1:
            raise ValueError(f"--clamp_quantile {self.clamp_quantile}: a quantile in (0, 1]; 1 turns clamping off")
        if self.min_diff < 0:
            raise ValueError(f"--min_diff {self.min_diff}: a difference is at least 0")
        check_save_to(self.save_to)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExtractConfig:
        return cls(
            model_org=Path(args.model_org), model_tuned=Path(args.model_tuned), save_to=Path(args.save_to),
            dim=args.dim, conv_dim=args.conv_dim, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
            load_dtype=PRECISIONS[args.load_precision] if args.load_precision else None,
            save_dtype=PRECISIONS[args.save_precision] if args.save_precision else None,
            device=parse_device(args.device),
            org_device=parse_device(args.load_original_model_to, "--load_original_model_to"),
            tuned_device=parse_device(args.load_tuned_model_to, "--load_tuned_model_to"),
            v_parameterization=args.v_parameterization, write_metadata=not args.no_metadata)


# ----------------------------------------------------------------------------- the two checkpoints
@dataclass
class CheckpointPair:
    org: dict[str, Tensor]
    tuned: dict[str, Tensor]
    lora_map: LoRACheckpointMap  # of the original; the tuned one's agrees on every shared name
    shared_names: frozenset[str]


def load_pair(config: ExtractConfig) -> CheckpointPair:
    """Both state dicts and their map; a different family or layer shapes is an error naming both files."""
    org = load_state_dict(config.model_org, device=config.org_device)
    tuned = load_state_dict(config.model_tuned, device=config.tuned_device)
    org_map = map_checkpoint({key: tuple(value.shape) for key, value in org.items()}, str(config.model_org))
    tuned_map = map_checkpoint({key: tuple(value.shape) for key, value in tuned.items()}, str(config.model_tuned))
    both = f"--model_org {config.model_org} and --model_tuned {config.model_tuned}"
    if (org_map.family, org_map.variant) != (tuned_map.family, tuned_map.variant):
        raise ValueError(f"{both} are different models ({org_map.family_label} and {tuned_map.family_label}); "
                         "a LoRA can only be extracted between two checkpoints of one model")
    shared = org_map.slots.keys() & tuned_map.slots.keys()
    for name in sorted(shared):
        if org_map.slots[name].shape != tuned_map.slots[name].shape:
            raise ValueError(f"{both} have different layer shapes ({name}: {org_map.slots[name].shape} and "
                             f"{tuned_map.slots[name].shape}); they are not the same model")
    only_one = sorted({org_map.slots[name].model_label for name in org_map.slots.keys() - shared}
                      | {tuned_map.slots[name].model_label for name in tuned_map.slots.keys() - shared})
    if only_one:
        logger.warning("%s: the %s is in only one of the files; not extracted", both, " and ".join(only_one))
    return CheckpointPair(org, tuned, org_map, frozenset(shared))


def _difference(pair: CheckpointPair, name: str, load_dtype: torch.dtype | None, device: str) -> Tensor:
    """tuned - org of one layer in float32 (each side first rounded to --load_precision, as sd-scripts loads it)."""
    slot = pair.lora_map.slots[name]
    sides = []
    for state_dict in (pair.org, pair.tuned):
        weight = slot.view(state_dict[slot.key])
        if load_dtype is not None:
            weight = weight.to(load_dtype)
        sides.append(weight.to(device, torch.float32))
    return sides[1] - sides[0]


# ----------------------------------------------------------------------------- which layers, then SVD
def layer_differences(pair: CheckpointPair, names: Sequence[str], config: ExtractConfig) -> Iterator[tuple[str, Tensor]]:
    """(name, tuned - org) of each layer to extract, each difference computed once: the denoiser's layers that
    differ at all, and every layer of each text encoder one of whose layers differs by more than --min_diff (an
    encoder's differences are held until all of them are computed, so at most one encoder's at a time)."""
    parts: dict[str, list[str]] = {}
    for name in names:
        parts.setdefault(pair.lora_map.slots[name].model_label, []).append(name)
    for label, part_names in parts.items():
        if part_names[0].startswith(DENOISER_PREFIX):
            for name in part_names:
                difference = _difference(pair, name, config.load_dtype, config.device)
                if float(difference.abs().max()) > 0:
                    yield name, difference
            continue
        differences = {name: _difference(pair, name, config.load_dtype, config.device) for name in part_names}
        largest = max(float(difference.abs().max()) for difference in differences.values())
        if largest <= config.min_diff:
            logger.info("%s is unchanged (largest change %.3g <= --min_diff %g): not extracted", label, largest,
                        config.min_diff)
            continue
        logger.info("%s differs (largest change %.3g > --min_diff %g): extracted", label, largest, config.min_diff)
        for name in part_names:
            yield name, differences.pop(name)


def _denoiser_label(pair: CheckpointPair) -> str:
    return next(slot.model_label for name, slot in pair.lora_map.slots.items() if name.startswith(DENOISER_PREFIX))


@torch.no_grad()
def extract_modules(pair: CheckpointPair, config: ExtractConfig) -> list[FactoredModule]:
    """The LoRA modules of `config` for the difference between the two checkpoints (text encoders first, as
    training writes them). `retained_fro` is the share of ||tuned - org||_F the factors keep before clamping."""
    ranks = {name: rank for name, rank in pair.lora_map.default_ranks(config.dim, config.conv_dim).items()
             if name in pair.shared_names}
    clamp = config.clamp_quantile if config.clamp_quantile < 1 else None
    modules = []
    for name, difference in layer_differences(pair, list(ranks), config):
        low = factorize(difference, ranks[name], clamp_quantile=clamp)
        modules.append(FactoredModule(name, low.down.cpu(), low.up.cpu(), low.alpha, low.retained_fro))
    if not modules:
        raise ValueError(
            f"--model_org {config.model_org} and --model_tuned {config.model_tuned}: no differences to extract (the "
            f"{_denoiser_label(pair)} is identical in every LoRA target layer and no text encoder differs by more than "
            f"--min_diff {config.min_diff}); are they the same model?")
    return modules


def extracted_metadata(modules: list[FactoredModule], lora_map: LoRACheckpointMap, config: ExtractConfig) -> dict[str, str]:
    """sd-scripts' extraction metadata: the network's ranks and base model always, modelspec unless --no_metadata."""
    v_parameterization = config.v_parameterization if config.v_parameterization is not None else lora_map.family == "sd2"
    facts = base_model_facts(lora_map.family, lora_map.variant, v_parameterization)
    metadata = network_rank_metadata(modules)
    metadata.update(ss_v2=str(facts.v2), ss_base_model_version=facts.base_model_version)
    if config.write_metadata:
        metadata.update(modelspec_metadata(
            architecture=f"{facts.architecture}/lora", implementation=facts.implementation, title=config.save_to.stem,
            resolution=facts.resolution, prediction_type=facts.prediction_type, timestamp=time.time()))
    return metadata


def extract(config: ExtractConfig, family_hints: Sequence[tuple[str, str]] = ()) -> list[FactoredModule]:
    """Read both checkpoints, extract, and write `config.save_to` atomically; returns the modules written.
    `family_hints`: (flag, family) of the --v2 / --sdxl flags given, which only draw a warning when wrong."""
    pair = load_pair(config)
    for flag, family in family_hints:
        if family != pair.lora_map.family:
            logger.warning("%s: ignored; the checkpoints are %s", flag, FAMILY_LABELS[pair.lora_map.family])
    logger.info("%s checkpoints; extracting rank %d%s", pair.lora_map.family_label, config.dim,
                f", 3x3 conv rank {config.conv_dim}" if config.conv_dim else "")
    modules = extract_modules(pair, config)
    text_encoder_modules = sum(not module.name.startswith(DENOISER_PREFIX) for module in modules)
    least = min(modules, key=lambda module: module.retained_fro)
    logger.info("extracted %s, %s; Frobenius norm of the difference kept before clamping: mean %.2f%%, min %.2f%% "
                "(%s)", plural(text_encoder_modules, "text-encoder module"),
                plural(len(modules) - text_encoder_modules, f"{_denoiser_label(pair)} module"),
                100 * sum(m.retained_fro for m in modules) / len(modules), 100 * least.retained_fro, least.name)
    logger.info("saving %s", config.save_to)
    save_lora_file(config.save_to, lora_state_dict(modules), extracted_metadata(modules, pair.lora_map, config),
                   dtype=config.save_dtype)
    return modules


# ----------------------------------------------------------------------------- command line
def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Extract a LoRA from the difference of two checkpoints of one model (SD1, SD2, SDXL, SD3/3.5) by "
                    "truncated SVD.")
    files = parser.add_argument_group("files")
    files.add_argument("--model_org", required=True, help="the original checkpoint (.safetensors/.ckpt)")
    files.add_argument("--model_tuned", required=True,
                       help="the tuned checkpoint; the LoRA is the change from --model_org to it")
    files.add_argument("--save_to", required=True, help="LoRA file to write (.safetensors, .ckpt or .pt)")
    ranks = parser.add_argument_group("ranks")
    ranks.add_argument("--dim", type=int, default=4, help="rank of Linear and 1x1 conv modules (default 4)")
    ranks.add_argument("--conv_dim", type=int, default=None,
                       help="rank of the 3x3 convs in ResNet blocks (SD1/2, SDXL); default: no conv modules")
    ranks.add_argument("--clamp_quantile", type=float, default=0.99,
                       help="clamp the factors' entries at this quantile of their magnitudes (default 0.99; 1: off)")
    ranks.add_argument("--min_diff", type=float, default=0.01,
                       help="a text encoder is extracted only if a layer changed by more than this (default 0.01)")
    precision = parser.add_argument_group("precision and devices")
    precision.add_argument("--load_precision", choices=list(PRECISIONS), default=None,
                           help="round both models' weights to this dtype first (default: as stored)")
    precision.add_argument("--save_precision", choices=list(PRECISIONS), default=None,
                           help="dtype of the saved LoRA (default float)")
    precision.add_argument("--device", default=None, help="where to compute the SVDs, e.g. cuda (default: cpu)")
    precision.add_argument("--load_original_model_to", default=None, help="device for --model_org's weights (default cpu)")
    precision.add_argument("--load_tuned_model_to", default=None, help="device for --model_tuned's weights (default cpu)")
    meta = parser.add_argument_group("metadata")
    meta.add_argument("--no_metadata", action="store_true",
                      help="write no modelspec metadata (sd-scripts' minimum ss_* keys are kept)")
    meta.add_argument("--v_parameterization", action="store_true", default=None,
                      help="the models predict v: recorded in the metadata (default: on for SD2, as sd-scripts)")
    add_family_flags(parser, "the checkpoints")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_user_error(lambda: extract(ExtractConfig.from_args(args), given_family_flags(args)), (ValueError, OSError))


if __name__ == "__main__":
    main()
