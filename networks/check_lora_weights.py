"""List a LoRA file's modules with their ranks, alphas, shapes and norms, and flag broken ones
(sd-scripts' networks/check_lora_weights.py, with more to see).

    python networks/check_lora_weights.py my_lora.safetensors [--show_all]

One line per module: name, kind (linear / conv KxK), rank, alpha, down and up shapes, ||down||_F,
||up||_F and ||dW||_F of the weight change it applies. A module whose weights contain NaN or inf is
flagged (and the exit status is 1); one whose down or up weights are all zero is flagged too, since it
changes nothing (an untrained LoRA looks like this). --show_all also lists the tensors that belong to
no module. A summary line counts the modules per prefix (lora_unet, lora_te, lora_te1, ...) and the ranks seen.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (sd-scripts' way): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from library.console import exit_on_user_error
from networks.lora_modules import LoRAModuleWeights, read_tensor_file, split_lora_modules


@dataclass(frozen=True)
class ModuleCheck:
    """One module as the file stores it."""

    name: str
    prefix: str  # lora_unet, lora_te, lora_te1, ...
    kind: str  # "linear" or "conv KxK"
    rank: int
    alpha: float | None  # None: not stored (loaders use the rank)
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    down_norm: float
    up_norm: float
    delta_norm: float  # ||up @ down * alpha / rank||_F
    problem: str | None  # "NaN", "inf", "lora_up all zero", ...; None when the module looks sound

    def format(self, width: int) -> str:
        alpha = "-" if self.alpha is None else f"{self.alpha:g}"
        shapes = f"{_shape(self.down_shape)} / {_shape(self.up_shape)}"
        line = (f"{self.name:{width}}  {self.kind:9}  rank {self.rank:>4}  alpha {alpha:>6}  {shapes:28}  "
                f"|down| {self.down_norm:.4g}  |up| {self.up_norm:.4g}  |dW| {self.delta_norm:.4g}")
        return line + (f"  !! {self.problem}" if self.problem else "")


def check_modules(modules: dict[str, LoRAModuleWeights]) -> list[ModuleCheck]:
    """A row per module, in file order."""
    return [_check(module) for module in modules.values()]


def check_lora_file(path: Path) -> tuple[list[ModuleCheck], dict[str, Tensor]]:
    """The rows of a LoRA file's modules, and its tensors that belong to no module."""
    state_dict, _ = read_tensor_file(path, "file")
    modules, others = split_lora_modules(state_dict, str(path))
    return check_modules(modules), others


@torch.no_grad()
def _check(module: LoRAModuleWeights) -> ModuleCheck:
    down, up = module.down.float(), module.up.float()
    alpha = None if module.alpha is None else float(module.alpha.float())
    return ModuleCheck(name=module.name, prefix=_prefix(module.name), kind=module.kind, rank=module.rank, alpha=alpha,
                       down_shape=tuple(down.shape), up_shape=tuple(up.shape), down_norm=float(down.norm()),
                       up_norm=float(up.norm()), delta_norm=float(module.delta_weight().norm()),
                       problem=_problem(module, down, up))


def _problem(module: LoRAModuleWeights, down: Tensor, up: Tensor) -> str | None:
    named = {"lora_down": down, "lora_up": up}
    if module.alpha is not None:
        named["alpha"] = module.alpha.float()
    for label, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
        bad = [name for name, tensor in named.items() if bool(test(tensor).any())]
        if bad:
            return f"{label} in {', '.join(bad)}"
    zero = [name for name in ("lora_down", "lora_up") if not bool(named[name].any())]
    return f"{' and '.join(zero)} all zero (no effect)" if zero else None


def _prefix(name: str) -> str:
    """lora_unet_down_blocks_0_... -> lora_unet; lora_te1_text_model_... -> lora_te1."""
    parts = name.split("_", 2)
    return "_".join(parts[:2]) if len(parts) > 2 else name


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def summary(rows: list[ModuleCheck]) -> str:
    """Modules per prefix, the ranks seen per kind of module, and how many are flagged."""
    per_prefix = Counter(row.prefix for row in rows)
    ranks: dict[str, set[int]] = {}
    for row in rows:
        ranks.setdefault(row.kind, set()).add(row.rank)
    ranks_text = "; ".join(f"{kind}: {', '.join(map(str, sorted(seen)))}" for kind, seen in sorted(ranks.items()))
    flagged = sum(row.problem is not None for row in rows)
    return (f"{len(rows)} modules ({', '.join(f'{prefix} {count}' for prefix, count in per_prefix.items())}); "
            f"ranks {ranks_text}; {flagged} flagged")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="List a LoRA file's modules with ranks, alphas, shapes and norms.")
    parser.add_argument("file", help="LoRA file (.safetensors, .ckpt, .pt)")
    parser.add_argument("-s", "--show_all", "--show_all_keys", dest="show_all", action="store_true",
                        help="also list tensors that belong to no LoRA module")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the report; returns (and exits with) 1 when a module holds NaN or inf."""
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows, others = exit_on_user_error(lambda: check_lora_file(Path(args.file)), (ValueError, OSError))
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(row.format(width))
    if args.show_all:
        for key, tensor in others.items():
            print(f"{key}  (not in a LoRA module)  {_shape(tuple(tensor.shape)) or 'scalar'}  {tensor.dtype}  "
                  f"|x| {float(tensor.float().norm()):.4g}")
    elif others:
        print(f"{len(others)} tensors belong to no LoRA module (--show_all lists them)")
    print(summary(rows))
    broken = any(row.problem and not row.problem.endswith("(no effect)") for row in rows)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
