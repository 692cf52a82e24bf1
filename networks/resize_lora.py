"""Resize a LoRA to a lower rank (sd-scripts' networks/resize_lora.py flags).

Each module's weight change dW = up @ down * alpha / rank is factored again by truncated SVD, done in
the factors' own rank-sized space (networks/lora_svd.factorize_lora), so even a large LoRA takes
seconds. A module keeps its alpha/rank ratio (new alpha = old alpha / old rank * new rank, as sd-scripts),
so the kept part of dW is applied at the same strength. A module is never given more rank than it had:
its dW has no more, and padding with zero directions would only make the file larger.

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8 [--new_conv_rank 4]
        [--dynamic_method sv_fro --dynamic_param 0.9] [--save_precision fp16] [--device cuda] [--verbose]

--new_rank is the rank (the largest rank with --dynamic_method) of Linear and 1x1 conv modules,
--new_conv_rank of 3x3 conv modules. The dynamic methods keep, per module and at most --new_rank:
sv_ratio, the singular values within a factor --dynamic_param of the largest; sv_cumulative, the fewest
leading values whose sum reaches that share of the total; sv_fro, the fewest that keep that share of
||dW||_F. (sd-scripts keeps one value more than each rule asks for.)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from library.console import exit_on_user_error
from library.saving import save_lora_file
from networks import lora_modules
from networks.lora_modules import FactoredModule, LoRAModuleWeights, network_rank_metadata, rank_span
from networks.lora_svd import DYNAMIC_METHODS, check_dynamic_method, factorize_lora
from networks.tool_flags import PRECISIONS, check_save_to, parse_device, plural

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResizeConfig:
    """What to resize to: fixed ranks, or ranks chosen per module by a dynamic rule capped at the ranks."""

    new_rank: int = 4
    new_conv_rank: int = 4
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.new_rank < 1:
            raise ValueError(f"--new_rank {self.new_rank}: must be at least 1")
        if self.new_conv_rank < 1:
            raise ValueError(f"--new_conv_rank {self.new_conv_rank}: must be at least 1")
        if self.dynamic_method is None and self.dynamic_param is not None:
            raise ValueError(f"--dynamic_param {self.dynamic_param} does nothing without --dynamic_method "
                             f"({', '.join(DYNAMIC_METHODS)})")
        check_dynamic_method(self.dynamic_method, self.dynamic_param)
        parse_device(self.device)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ResizeConfig:
        conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
        return cls(new_rank=args.new_rank, new_conv_rank=conv_rank, dynamic_method=args.dynamic_method,
                   dynamic_param=args.dynamic_param, device=args.device or "cpu")

    def max_rank_for(self, module: LoRAModuleWeights) -> int:
        return self.new_conv_rank if module.is_spatial_conv else self.new_rank


@dataclass(frozen=True)
class ModuleResize:
    """What resizing did to one module."""

    name: str
    kind: str
    is_spatial_conv: bool  # ranked by --new_conv_rank
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    retained_fro: float  # share of ||dW||_F the new factors keep


@dataclass(frozen=True)
class ResizedLoRA:
    factored: list[FactoredModule]  # the new modules, float32 on the CPU; the caller picks the file's dtype
    modules: list[ModuleResize]

    @property
    def tensors(self) -> dict[str, Tensor]:
        return lora_modules.lora_state_dict(self.factored)

    @property
    def mean_retained(self) -> float:
        return statistics.fmean(m.retained_fro for m in self.modules)

    @property
    def least_retained(self) -> ModuleResize:
        return min(self.modules, key=lambda m: m.retained_fro)


@torch.no_grad()
def resize_modules(modules: dict[str, LoRAModuleWeights], config: ResizeConfig) -> ResizedLoRA:
    """Every module factored again, and what each kept."""
    factored = []
    report = []
    for name, module in modules.items():
        max_rank = min(config.max_rank_for(module), module.rank)
        low_rank = factorize_lora(module.down.to(config.device), module.up.to(config.device), module.scale, max_rank,
                                  method=config.dynamic_method, param=config.dynamic_param, scale=module.scale)
        factored.append(FactoredModule(name, low_rank.down.cpu(), low_rank.up.cpu(), low_rank.alpha,
                                       low_rank.retained_fro))
        report.append(ModuleResize(name=name, kind=module.kind, is_spatial_conv=module.is_spatial_conv,
                                   old_rank=module.rank, new_rank=low_rank.rank, old_alpha=module.alpha_value,
                                   new_alpha=low_rank.alpha, retained_fro=low_rank.retained_fro))
    return ResizedLoRA(factored=factored, modules=report)


def resized_metadata(metadata: dict[str, str] | None, resized: ResizedLoRA, config: ResizeConfig) -> dict[str, str]:
    """The input's metadata with the network's dims, alphas and training comment updated as sd-scripts does.

    ss_network_dim / ss_network_alpha describe the Linear modules (3x3 convs live in ss_network_args'
    conv_dim / conv_alpha, written whenever there are such modules): one value when they all share it,
    "Dynamic" when a dynamic method chose the ranks or modules differ. Hashes are left for save_lora_file to
    recompute.
    """
    updated = {key: value for key, value in (metadata or {}).items() if not key.startswith("sshs_")}
    updated.pop("modelspec.hash_sha256", None)  # described the old tensors
    dynamic = config.dynamic_method is not None
    updated.update(network_rank_metadata(resized.factored, dynamic=dynamic, previous=updated))
    old_dim = max(m.old_rank for m in resized.modules)
    comment = updated.get("ss_training_comment", "")
    if dynamic:
        how = f"Dynamic resize with {config.dynamic_method}: {config.dynamic_param} from {old_dim}"
    else:
        conv_note = "" if config.new_conv_rank == config.new_rank else f" (conv: {config.new_conv_rank})"
        how = f"dimension is resized from {old_dim} to {config.new_rank}{conv_note}"
    updated["ss_training_comment"] = f"{how}; {comment}"
    return updated


def resize_file(model: Path, save_to: Path, config: ResizeConfig, save_precision: str | None = None) -> ResizedLoRA:
    """Read a LoRA file, resize every module, and write the result atomically with updated metadata.

    `save_precision` (float / fp16 / bf16) defaults to the dtype the input's LoRA weights are stored in.
    Tensors that belong to no LoRA module are copied unchanged.
    """
    check_save_to(save_to)
    state_dict, metadata = lora_modules.read_tensor_file(model, "--model")
    modules, others = lora_modules.split_lora_modules(state_dict, f"--model {model}")
    if others:
        logger.info("%s: %s outside the LoRA modules copied unchanged (first: %s)", model,
                    plural(len(others), "tensor"), next(iter(others)))
    dtype = PRECISIONS[save_precision] if save_precision else next(iter(modules.values())).down.dtype
    if config.dynamic_method:
        logger.info("choosing ranks by %s %s, at most %d (conv %d)", config.dynamic_method, config.dynamic_param,
                    config.new_rank, config.new_conv_rank)
    resized = resize_modules(modules, config)
    tensors = {**others, **resized.tensors}
    logger.info("saving %s (%s)", save_to, str(dtype).removeprefix("torch."))
    save_lora_file(save_to, tensors, resized_metadata(metadata, resized, config), dtype=dtype)
    return resized


def format_report(resized: ResizedLoRA, verbose: bool) -> str:
    """Per-module lines (verbose) and a summary of ranks and the Frobenius norm kept."""
    lines = []
    if verbose:
        width = max(len(m.name) for m in resized.modules)
        for m in resized.modules:
            lines.append(f"{m.name:{width}}  {m.kind:9}  rank {m.old_rank:>3} -> {m.new_rank:<3}  "
                         f"alpha {m.old_alpha:g} -> {m.new_alpha:g}  fro retained {m.retained_fro:.1%}")
    least = resized.least_retained
    lines.append(f"resized {plural(len(resized.modules), 'module')} to rank "
                 f"{rank_span(m.new_rank for m in resized.modules)}; Frobenius norm retained: "
                 f"mean {resized.mean_retained:.2%}, min {least.retained_fro:.2%} ({least.name})")
    return "\n".join(lines)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize a LoRA to a lower rank by truncated SVD of each module's weight change.")
    parser.add_argument("--model", required=True, help="LoRA to resize (.safetensors, .ckpt, .pt)")
    parser.add_argument("--save_to", required=True, help="file to write (.safetensors, .ckpt or .pt)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of Linear and 1x1 conv modules; the largest rank with --dynamic_method (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    parser.add_argument("--save_precision", choices=sorted(PRECISIONS), default=None,
                        help="dtype of the saved weights (default: the input's)")
    parser.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="print every module's new rank and retained norm")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values, at most --new_rank / --new_conv_rank")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: a factor >= 1 of the largest singular value; sv_fro, sv_cumulative: a share in (0, 1]")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run() -> None:
        config = ResizeConfig.from_args(args)
        resized = resize_file(Path(args.model), Path(args.save_to), config, args.save_precision)
        print(format_report(resized, args.verbose))

    exit_on_user_error(run, (ValueError, OSError))


if __name__ == "__main__":
    main()
