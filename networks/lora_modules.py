"""A LoRA file as modules, for the tools that work on saved LoRAs (merging, extracting, resizing, checking).

Read: each `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` group checked and gathered.
Written: the modules a tool computed, as a state dict, and the ss_network_* metadata that describes their ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from library.saving import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX
from networks.lora import lora_delta_weight

DOWN_KEY = "lora_down.weight"
UP_KEY = "lora_up.weight"
ALPHA_KEY = "alpha"
NETWORK_MODULE = "networks.lora"  # ss_network_module of the files the tools write
_PICKLE_READ_SUFFIXES = (*PICKLE_SUFFIXES, ".pth")


class LoRAFileError(ValueError):
    """A file that cannot be used as a LoRA: unreadable, no LoRA tensors, or broken module groups."""


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One module's tensors as stored (any dtype); dW = up @ down * alpha / rank."""

    name: str
    down: Tensor
    up: Tensor
    alpha: Tensor | None  # absent in some files: loaders then use alpha = rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha_value(self) -> float:
        """The alpha a loader applies. A missing or zero alpha means alpha = rank, as the trainer reads it."""
        if self.alpha is None or float(self.alpha) == 0.0:
            return float(self.rank)
        return float(self.alpha.float())

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """() for a Linear module, (kh, kw) for a conv module."""
        return tuple(self.down.shape[2:])

    @property
    def kind(self) -> str:
        """"linear" or "conv KxK"."""
        if not self.kernel_size:
            return "linear"
        return "conv " + "x".join(str(k) for k in self.kernel_size)

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1 (conv_dim's modules); 1x1 convs are ranked like Linear layers."""
        return _is_spatial_conv(self.down)

    def delta_weight(self, device: torch.device | str | None = None) -> Tensor:
        """dW in float32, shaped like the base layer's weight."""
        return lora_delta_weight(self.down.to(device, torch.float32), self.up.to(device, torch.float32), self.scale)


def _is_spatial_conv(down: Tensor) -> bool:
    return any(k > 1 for k in down.shape[2:])


def read_tensor_file(path: Path, flag: str) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """A .safetensors file's tensors and metadata, or a torch state dict (.ckpt/.pt/.pth; no metadata).

    `flag` names where the path came from (e.g. "--model") so errors point the user at it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as file:
                return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise LoRAFileError(f"{flag} {path}: not a readable safetensors file ({error})") from error
    if suffix in _PICKLE_READ_SUFFIXES:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise LoRAFileError(f"{flag} {path}: not a readable torch state dict ({error})") from error
        if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise LoRAFileError(f"{flag} {path}: expected a dict of tensors, found {type(state_dict).__name__}")
        return state_dict, None
    raise LoRAFileError(f"{flag} {path}: unknown suffix {path.suffix!r}; expected .safetensors, .ckpt, .pt or .pth")


def split_lora_modules(state_dict: dict[str, Tensor], source: str) -> tuple[dict[str, LoRAModuleWeights], dict[str, Tensor]]:
    """The LoRA modules of a state dict (in file order) and every tensor that belongs to none.

    Raises LoRAFileError naming `source` when there are no LoRA tensors at all, when a module lacks one
    of its down/up pair (an alpha alone counts as a broken module), or when the pair's ranks disagree.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        for leaf in (DOWN_KEY, UP_KEY, ALPHA_KEY):
            if key.endswith("." + leaf):
                groups.setdefault(key[: -len(leaf) - 1], {})[leaf] = tensor
                break
        else:
            others[key] = tensor
    if not any(DOWN_KEY in group or UP_KEY in group for group in groups.values()):
        raise LoRAFileError(f"{source}: no '<name>.lora_down.weight' / '.lora_up.weight' tensors; not a LoRA file")
    modules = {}
    for name, group in groups.items():
        modules[name] = _module(name, group, source)
    return modules, others


def _module(name: str, group: dict[str, Tensor], source: str) -> LoRAModuleWeights:
    missing = [leaf for leaf in (DOWN_KEY, UP_KEY) if leaf not in group]
    if missing:
        present = ", ".join(sorted(group))
        raise LoRAFileError(f"{source}: module {name} has {present} but no {' / '.join(missing)}; the file is incomplete")
    down, up = group[DOWN_KEY], group[UP_KEY]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
        raise LoRAFileError(f"{source}: module {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}, "
                            "which do not form a LoRA pair (down rank x in[ x k x k], up out x rank[ x 1 x 1])")
    alpha = group.get(ALPHA_KEY)
    if alpha is not None and alpha.numel() != 1:
        raise LoRAFileError(f"{source}: module {name} has an alpha of shape {tuple(alpha.shape)}; expected a scalar")
    return LoRAModuleWeights(name=name, down=down, up=up, alpha=alpha)


# ----------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class FactoredModule:
    """One module a tool computed (merged, extracted, resized): dW = up @ down * alpha / rank, float32 on the CPU."""

    name: str
    down: Tensor
    up: Tensor
    alpha: float
    retained_fro: float = 1.0  # share of the target change's Frobenius norm the factors keep

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_spatial_conv(self) -> bool:
        """A 3x3 (or larger) conv module, ranked by conv_dim."""
        return _is_spatial_conv(self.down)


def lora_state_dict(modules: Iterable[FactoredModule]) -> dict[str, Tensor]:
    """The tensors a LoRA file stores for `modules`: down, up and alpha of each, in order."""
    tensors = {}
    for module in modules:
        tensors[f"{module.name}.{DOWN_KEY}"] = module.down
        tensors[f"{module.name}.{UP_KEY}"] = module.up
        tensors[f"{module.name}.{ALPHA_KEY}"] = torch.tensor(module.alpha)
    return tensors


def network_rank_metadata(modules: Sequence[FactoredModule], *, dynamic: bool = False,
                          previous: Mapping[str, str] | None = None) -> dict[str, str]:
    """ss_network_dim / _alpha / _args for `modules`, as sd-scripts writes them: dim and alpha describe the Linear
    and 1x1 modules, ss_network_args' conv_dim / conv_alpha the 3x3 ones; a value that differs between modules,
    or any value when `dynamic` (a rule chose each module's rank), is "Dynamic".

    `previous` is the metadata of the file the modules were made from (resizing): its other network args are kept,
    and its dim and alpha when there are no Linear modules. Without it the file is new: ss_network_module is
    networks.lora, and ss_network_args is written even when empty.
    """
    old = previous or {}
    linear = [module for module in modules if not module.is_spatial_conv]
    conv = [module for module in modules if module.is_spatial_conv]
    metadata = {} if previous is not None else {"ss_network_module": NETWORK_MODULE}
    for key, values in (("ss_network_dim", [str(module.rank) for module in linear]),
                        ("ss_network_alpha", [str(float(module.alpha)) for module in linear])):
        metadata[key] = _common(values, dynamic) if values else old.get(key, "None")
    if conv or previous is None:
        network_args = _json_object(old.get("ss_network_args"))
        if conv:
            network_args["conv_dim"] = _common([str(module.rank) for module in conv], dynamic)
            network_args["conv_alpha"] = _common([str(float(module.alpha)) for module in conv], dynamic)
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def _common(values: list[str], dynamic: bool) -> str:
    return values[0] if len(set(values)) == 1 and not dynamic else "Dynamic"


def _json_object(text: str | None) -> dict[str, object]:
    """ss_network_args as a dict; {} when absent or not a JSON object."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def rank_span(ranks: Iterable[int]) -> str:
    """"4" when every rank is 4, "2-8" for ranks from 2 to 8."""
    ordered = sorted(set(ranks))
    return str(ordered[0]) if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"
