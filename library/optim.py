"""Optimizers from sd-scripts' flags (--optimizer_type, --optimizer_args, --learning_rate).

sd-scripts picks an optimizer through a long if-chain; here every accepted name is one row of
`_OPTIMIZERS`: where the class lives, which pip package provides it, and the few per-optimizer rules
(Nesterov SGD's default momentum, Adafactor's relative-step mode). A name that is not in the table is
looked up in `torch.optim`, and a dotted name ("module.Class") is imported, as sd-scripts does.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

_DEFAULT_OPTIMIZER = "AdamW"


@dataclass(frozen=True)
class OptimizerConfig:
    """What the optimizer flags ask for. `optimizer_type` is already normalised by args.py
    (the legacy --use_8bit_adam / --use_lion_optimizer become "AdamW8bit" / "Lion")."""

    optimizer_type: str
    learning_rate: float
    optimizer_args: tuple[str, ...]
    max_grad_norm: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizerConfig":
        return cls(
            optimizer_type=args.optimizer_type or "",
            learning_rate=args.learning_rate,
            optimizer_args=tuple(args.optimizer_args or ()),
            max_grad_norm=args.max_grad_norm,
        )


def parse_optimizer_args(items: Sequence[str], *, flag: str = "--optimizer_args") -> dict[str, Any]:
    """Turn ["weight_decay=0.01", "betas=0.9,0.999", "foreach=False"] into keyword arguments.

    Values are Python literals (so "0.9,0.999" is the tuple (0.9, 0.999) and "False" a bool); a value
    that is not a literal is kept as a string, which is what names like decay_type=cosine need.
    `flag` names the option in errors, because --lr_scheduler_args uses the same syntax.
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag}: {item!r} is not of the form key=value (e.g. weight_decay=0.01)")
        if key in kwargs:
            raise ValueError(f"{flag}: {key!r} is given twice; keep one {key}=... item")
        kwargs[key] = _literal_or_text(text.strip())
    return kwargs


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# ----------------------------------------------------------------------------- the optimizer table
# A `prepare` hook adjusts (lr, kwargs, params) before construction; it returns new objects and never
# mutates its inputs, so the caller's parameter groups stay as they were.
_Prepare = Callable[[float, dict[str, Any], Any], tuple["float | None", dict[str, Any], Any]]


@dataclass(frozen=True)
class _OptimizerSpec:
    module: str
    class_name: str
    package: str  # pip name, for the "not installed" message
    # Releases before this one run only on CUDA; None: any release runs on the CPU too.
    cpu_since: tuple[int, int] | None = None
    fixed_kwargs: dict[str, Any] = field(default_factory=dict)  # always passed, not user-settable, not described
    default_kwargs: dict[str, Any] = field(default_factory=dict)  # used when --optimizer_args leaves them out
    prepare: _Prepare | None = None


def _warn_adaptive_lr(lr: float, kwargs: dict[str, Any], params: Any) -> tuple[float, dict[str, Any], Any]:
    """D-Adaptation and Prodigy estimate the step size themselves; --learning_rate is a multiplier near 1."""
    group_lrs = {group.get("lr", lr) for group in _param_groups(params)}
    first_lr = next(iter(_param_groups(params)), {}).get("lr", lr)
    if first_lr is not None and first_lr <= 0.1:
        logger.warning("learning rate %s is very low for D-Adaptation/Prodigy; they expect about 1.0", first_lr)
    if len(group_lrs) > 1:
        logger.warning("D-Adaptation/Prodigy use only the first parameter group's learning rate (%s)", first_lr)
    return lr, kwargs, params


def _prepare_adafactor(lr: float, kwargs: dict[str, Any], params: Any) -> tuple[float | None, dict[str, Any], Any]:
    """sd-scripts' Adafactor rules: relative_step defaults to True (and warmup_init forces it); in that
    mode Adafactor computes its own step size, so the lr is dropped from the optimizer and from every
    parameter group, and the learning-rate scheduler becomes the adafactor proxy schedule."""
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning relative_step on")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("Adafactor: clip_threshold=1.0 is the usual choice")
        return lr, kwargs, params
    logger.info("Adafactor relative_step: --learning_rate %s is only reported as the initial lr", lr)
    groups = _param_groups(params)
    if groups and isinstance(groups[0], dict):
        if any("lr" in group for group in groups):
            logger.warning("Adafactor relative_step ignores the per-group learning rates (--unet_lr/--text_encoder_lr)")
        params = [{k: v for k, v in group.items() if k != "lr"} for group in groups]
    return None, kwargs, params


def _param_groups(params: Any) -> list:
    """Parameter groups as a list of dicts, or [] when params is a plain list of tensors."""
    if isinstance(params, list) and params and isinstance(params[0], dict):
        return params
    return []


def _bnb(class_name: str, **extra: Any) -> _OptimizerSpec:
    # bitsandbytes 0.50 added CPU kernels for its 8-bit and paged optimizers (paged falls back to plain on CPU).
    return _OptimizerSpec("bitsandbytes.optim", class_name, "bitsandbytes", cpu_since=(0, 50), **extra)


def _dadapt(module: str, class_name: str) -> _OptimizerSpec:
    return _OptimizerSpec(module, class_name, "dadaptation", prepare=_warn_adaptive_lr)


_NESTEROV = dict(fixed_kwargs={"nesterov": True}, default_kwargs={"momentum": 0.9})

_OPTIMIZERS: dict[str, _OptimizerSpec] = {
    "AdamW": _OptimizerSpec("torch.optim", "AdamW", "torch"),
    "SGDNesterov": _OptimizerSpec("torch.optim", "SGD", "torch", **_NESTEROV),
    "AdamW8bit": _bnb("AdamW8bit"),
    "SGDNesterov8bit": _bnb("SGD8bit", **_NESTEROV),
    "Lion8bit": _bnb("Lion8bit"),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "Lion": _OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "DAdaptation": _dadapt("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdamPreprint": _dadapt("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdaGrad": _dadapt("dadaptation", "DAdaptAdaGrad"),
    "DAdaptAdam": _dadapt("dadaptation", "DAdaptAdam"),
    "DAdaptAdan": _dadapt("dadaptation", "DAdaptAdan"),
    "DAdaptAdanIP": _dadapt("dadaptation.experimental", "DAdaptAdanIP"),
    "DAdaptLion": _dadapt("dadaptation", "DAdaptLion"),
    "DAdaptSGD": _dadapt("dadaptation", "DAdaptSGD"),
    "Prodigy": _OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt", prepare=_warn_adaptive_lr),
    "Adafactor": _OptimizerSpec("transformers.optimization", "Adafactor", "transformers", prepare=_prepare_adafactor),
    "AdamWScheduleFree": _OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "RAdamScheduleFree": _OptimizerSpec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "SGDScheduleFree": _OptimizerSpec("schedulefree", "SGDScheduleFree", "schedulefree"),
}

# Names as sd-scripts documents them; matching is case-insensitive.
KNOWN_OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)


def _find_spec(name: str) -> _OptimizerSpec | None:
    return next((spec for known, spec in _OPTIMIZERS.items() if known.lower() == name.lower()), None)


# ----------------------------------------------------------------------------- building
def build_optimizer(config: OptimizerConfig, params: Iterable[Any]) -> tuple[str, torch.optim.Optimizer]:
    """The optimizer the flags ask for, and its description for logs and the ss_optimizer metadata.

    The description follows sd-scripts: "<module>.<Class>" plus "(key=value,...)" when arguments were
    given, e.g. "torch.optim.adamw.AdamW(weight_decay=0.01)". Schedule-free optimizers start in train mode.
    """
    name = config.optimizer_type or _DEFAULT_OPTIMIZER
    spec = _find_spec(name)
    kwargs = parse_optimizer_args(config.optimizer_args)
    lr: float | None = config.learning_rate
    params = list(params)
    if spec is None:
        optimizer_class = _class_from_path(name)
    else:
        optimizer_class = _class_from_spec(name, spec)
        kwargs = {**spec.default_kwargs, **kwargs}
        if spec.prepare is not None:
            lr, kwargs, params = spec.prepare(config.learning_rate, kwargs, params)
    fixed = spec.fixed_kwargs if spec is not None else {}
    try:
        optimizer = optimizer_class(params, lr=lr, **fixed, **kwargs)
    except TypeError as error:
        raise ValueError(f"--optimizer_args {kwargs} do not fit {optimizer_class.__name__}: {error}") from error
    set_train_mode(optimizer, True)
    description = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    if kwargs:
        description += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    logger.info("optimizer: %s", description)
    return description, optimizer


def _class_from_spec(name: str, spec: _OptimizerSpec) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as error:
        raise ValueError(f"--optimizer_type {name} needs the {spec.package!r} package, which is not installed: "
                         f"pip install {spec.package} (or choose another --optimizer_type)") from error
    if spec.cpu_since and not torch.cuda.is_available():
        version = importlib.metadata.version(spec.package)
        if _release(version) < spec.cpu_since:
            since = ".".join(map(str, spec.cpu_since))
            raise ValueError(f"--optimizer_type {name}: {spec.package} {version} runs only on a CUDA GPU and none is "
                             f"available; pip install -U '{spec.package}>={since}' runs it on the CPU too")
    if not hasattr(module, spec.class_name):
        raise ValueError(f"--optimizer_type {name}: the installed {spec.package} has no {spec.class_name}; "
                         f"upgrade it with pip install -U {spec.package}")
    return getattr(module, spec.class_name)


def _class_from_path(name: str) -> type:
    """A name outside the table: "Class" from torch.optim, or "package.module.Class" imported."""
    module_name, _, class_name = name.rpartition(".")
    known = ", ".join(KNOWN_OPTIMIZERS)
    if not module_name:
        if hasattr(torch.optim, name):
            return getattr(torch.optim, name)
        raise ValueError(f"--optimizer_type {name!r} is unknown; use one of {known}, a torch.optim class name "
                         "or a full path such as bitsandbytes.optim.AdEMAMix8bit")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--optimizer_type {name}: cannot import module {module_name!r} ({error}); "
                         "install it or fix the path") from error
    if not hasattr(module, class_name):
        raise ValueError(f"--optimizer_type {name}: module {module_name!r} has no class {class_name!r}")
    return getattr(module, class_name)


# ----------------------------------------------------------------------------- schedule-free mode switching
def is_schedule_free(optimizer: Any) -> bool:
    """True for the schedulefree package's optimizers, which keep separate train and eval weights."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    optimizer_class = type(inner)
    return optimizer_class.__module__.split(".")[0] == "schedulefree" or optimizer_class.__name__.lower().endswith("schedulefree")


def set_train_mode(optimizer: Any, training: bool) -> None:
    """Switch a schedule-free optimizer between its training and its evaluation weights.

    The model must be in eval mode for sampling, validation and saving (the averaged weights) and back
    in train mode before the next step. Other optimizers have no modes, so this is a no-op for them.
    """
    if not is_schedule_free(optimizer):
        return
    switch = getattr(optimizer, "train" if training else "eval", None)
    if callable(switch):
        switch()


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.50.2" or "0.49.0.dev0"."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
