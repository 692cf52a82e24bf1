"""Learning-rate schedulers from sd-scripts' flags (--lr_scheduler, --lr_warmup_steps, ...).

The schedule shapes are transformers' (`transformers.optimization`), called with the arguments
sd-scripts passes; what this module adds is the flag semantics: warmup/decay given as a ratio of the
run, the step count multiplied by the number of processes (accelerate steps a prepared scheduler once
per process), Adafactor's proxy schedule, schedule-free optimizers, and --lr_scheduler_type classes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import optimization as hf

from library.optim import is_schedule_free, parse_optimizer_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler flags ask for. Warmup and decay are steps (int) or a ratio of the run (float < 1)."""

    lr_scheduler: str
    lr_scheduler_type: str
    lr_scheduler_args: tuple[str, ...]
    lr_warmup_steps: int | float
    lr_decay_steps: int | float
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_timescale: int | None
    lr_scheduler_min_lr_ratio: float | None
    learning_rate: float = 0.0  # only reported by Adafactor's proxy schedule before its first step

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SchedulerConfig":
        return cls(
            lr_scheduler=args.lr_scheduler,
            lr_scheduler_type=args.lr_scheduler_type or "",
            lr_scheduler_args=tuple(args.lr_scheduler_args or ()),
            lr_warmup_steps=args.lr_warmup_steps,
            lr_decay_steps=args.lr_decay_steps,
            lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
            lr_scheduler_power=args.lr_scheduler_power,
            lr_scheduler_timescale=args.lr_scheduler_timescale,
            lr_scheduler_min_lr_ratio=args.lr_scheduler_min_lr_ratio,
            learning_rate=args.learning_rate or 0.0,
        )


@dataclass(frozen=True)
class _Steps:
    """Scheduler steps of the whole run (optimizer steps × processes), and warmup/decay resolved to steps."""

    total: int
    warmup: int
    decay: int


def resolve_steps(value: int | float, total: int, flag: str) -> int:
    """sd-scripts' int_or_float: a float below 1 is a fraction of `total` (rounded down), otherwise a step count."""
    if value < 0:
        raise ValueError(f"{flag} must be >= 0 (steps, or a ratio below 1 of the training steps), got {value}")
    if isinstance(value, float) and value < 1:
        return int(value * total)
    return int(value)


def build_lr_scheduler(config: SchedulerConfig, optimizer: torch.optim.Optimizer, *, num_training_steps: int,
                       num_processes: int = 1) -> Any:
    """The scheduler for `optimizer` over `num_training_steps` optimizer steps.

    As in sd-scripts, the schedule length is num_training_steps × num_processes, because accelerate
    advances a prepared scheduler once per process on every optimizer step; a warmup given as a ratio
    scales with it, a warmup given in steps does not.
    """
    total = num_training_steps * num_processes
    steps = _Steps(total, resolve_steps(config.lr_warmup_steps, total, "--lr_warmup_steps"),
                   resolve_steps(config.lr_decay_steps, total, "--lr_decay_steps"))
    kwargs = parse_optimizer_args(config.lr_scheduler_args, flag="--lr_scheduler_args")
    name = config.lr_scheduler

    if is_schedule_free(optimizer):
        return _schedule_free(config, optimizer, steps)
    if _is_relative_step_adafactor(optimizer) or name.split(":")[0] == "adafactor":
        return _adafactor(config, optimizer, steps)
    if config.lr_scheduler_type:
        return _custom(config.lr_scheduler_type, optimizer, steps, kwargs)

    builder = _SCHEDULERS.get(name)
    if builder is None:
        raise ValueError(f"--lr_scheduler {name!r} is unknown; use one of {', '.join(KNOWN_SCHEDULERS)}, "
                         "or give a class with --lr_scheduler_type")
    try:
        return builder(optimizer, steps, config, kwargs)
    except TypeError as error:
        raise ValueError(f"--lr_scheduler_args {kwargs} do not fit --lr_scheduler {name}: {error}") from error


def _require_no_warmup(steps: _Steps, what: str) -> None:
    if steps.warmup:
        raise ValueError(f"{what} has no warmup; set --lr_warmup_steps 0 (or use constant_with_warmup)")


def _schedule_free(config: SchedulerConfig, optimizer: torch.optim.Optimizer, steps: _Steps) -> LambdaLR:
    """Schedule-free optimizers replace the schedule; only `constant` (lr unchanged) is accepted, and
    their own warmup is an optimizer argument (--optimizer_args warmup_steps=N)."""
    if config.lr_scheduler != "constant" or config.lr_scheduler_type:
        raise ValueError(f"schedule-free optimizers need --lr_scheduler constant (got {config.lr_scheduler_type or config.lr_scheduler}); "
                         "set their warmup with --optimizer_args warmup_steps=N")
    _require_no_warmup(steps, "a schedule-free optimizer")
    return hf.get_constant_schedule(optimizer)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, hf.Adafactor) and bool(optimizer.defaults.get("relative_step"))


def _adafactor(config: SchedulerConfig, optimizer: torch.optim.Optimizer, steps: _Steps) -> LambdaLR:
    """Adafactor with relative_step sets its own lr each step; transformers' proxy schedule only reports
    it. `--lr_scheduler adafactor:<lr>` (sd-scripts' internal spelling) sets the reported initial lr."""
    if not _is_relative_step_adafactor(optimizer):
        raise ValueError("--lr_scheduler adafactor needs --optimizer_type Adafactor with relative_step=True; "
                         "choose another --lr_scheduler (constant_with_warmup suits relative_step=False)")
    if config.lr_scheduler.split(":")[0] != "adafactor" or config.lr_scheduler_type:
        logger.info("Adafactor relative_step schedules itself: using the adafactor schedule instead of %s",
                    config.lr_scheduler_type or config.lr_scheduler)
    _require_no_warmup(steps, "the adafactor schedule")
    return hf.AdafactorSchedule(optimizer, _adafactor_initial_lr(config))


def _adafactor_initial_lr(config: SchedulerConfig) -> float:
    name, _, given = config.lr_scheduler.partition(":")
    if name != "adafactor" or not given:
        return config.learning_rate
    try:
        return float(given)
    except ValueError as error:
        raise ValueError(f"--lr_scheduler {config.lr_scheduler}: the part after 'adafactor:' must be a learning rate") from error


def _custom(path: str, optimizer: torch.optim.Optimizer, steps: _Steps, kwargs: dict[str, Any]) -> Any:
    """--lr_scheduler_type: a torch.optim.lr_scheduler class name or "package.module.Class", built with
    --lr_scheduler_args as keyword arguments (it has no warmup of ours, as in sd-scripts)."""
    _require_no_warmup(steps, f"--lr_scheduler_type {path}")
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as error:
        raise ValueError(f"--lr_scheduler_type {path}: cannot import module {module_name!r} ({error})") from error
    scheduler_class = getattr(module, class_name, None)
    if scheduler_class is None:
        raise ValueError(f"--lr_scheduler_type {path}: {module.__name__} has no class {class_name!r}")
    try:
        return scheduler_class(optimizer, **kwargs)
    except TypeError as error:
        raise ValueError(f"--lr_scheduler_args {kwargs} do not fit --lr_scheduler_type {path}: {error}") from error


# ----------------------------------------------------------------------------- built-in schedules
_Builder = Callable[[torch.optim.Optimizer, _Steps, SchedulerConfig, dict], LambdaLR]


def _constant(optimizer, steps: _Steps, config: SchedulerConfig, kwargs: dict) -> LambdaLR:
    _require_no_warmup(steps, "--lr_scheduler constant")
    return hf.get_constant_schedule(optimizer, **kwargs)


def _cosine_with_min_lr(optimizer, steps: _Steps, config: SchedulerConfig, kwargs: dict) -> LambdaLR:
    if config.lr_scheduler_min_lr_ratio is None and "min_lr" not in kwargs:
        raise ValueError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    return hf.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=steps.warmup, num_training_steps=steps.total,
        num_cycles=config.lr_scheduler_num_cycles / 2, min_lr_rate=config.lr_scheduler_min_lr_ratio, **kwargs)


def _warmup_stable_decay(optimizer, steps: _Steps, config: SchedulerConfig, kwargs: dict) -> LambdaLR:
    stable = steps.total - steps.warmup - steps.decay
    if stable < 0:
        raise ValueError(f"--lr_warmup_steps ({steps.warmup}) + --lr_decay_steps ({steps.decay}) exceed the "
                         f"{steps.total} training steps of warmup_stable_decay; shorten them")
    return hf.get_wsd_schedule(
        optimizer, num_warmup_steps=steps.warmup, num_stable_steps=stable, num_decay_steps=steps.decay,
        num_cycles=config.lr_scheduler_num_cycles / 2, min_lr_ratio=config.lr_scheduler_min_lr_ratio or 0.0, **kwargs)


def _piecewise_constant(optimizer, steps: _Steps, config: SchedulerConfig, kwargs: dict) -> LambdaLR:
    """diffusers' piecewise_constant: step_rules="1:10,0.1:20,0.01" multiplies the lr by 1 before step 10,
    by 0.1 before step 20 and by 0.01 after (the step numbers are absolute, not lengths)."""
    rules = kwargs.pop("step_rules", None)
    if not isinstance(rules, str) or kwargs:
        raise ValueError('--lr_scheduler piecewise_constant takes exactly --lr_scheduler_args step_rules="1:10,0.1:20,0.01"')
    return LambdaLR(optimizer, piecewise_constant_factor(rules))


def piecewise_constant_factor(step_rules: str) -> Callable[[int], float]:
    """The lr multiplier of a step_rules string as a function of the step."""
    *pairs, last = step_rules.split(",")
    try:
        bounds = sorted((int(step), float(factor)) for factor, step in (pair.split(":") for pair in pairs))
        final = float(last)
    except ValueError as error:
        raise ValueError(f"--lr_scheduler_args step_rules={step_rules!r} is not of the form "
                         "'factor:until_step,...,final_factor' (e.g. 1:10,0.1:20,0.01)") from error

    def factor(step: int) -> float:
        return next((value for bound, value in bounds if step < bound), final)

    return factor


_SCHEDULERS: dict[str, _Builder] = {
    "constant": _constant,
    "constant_with_warmup": lambda opt, s, c, kw: hf.get_constant_schedule_with_warmup(opt, num_warmup_steps=s.warmup, **kw),
    "linear": lambda opt, s, c, kw: hf.get_linear_schedule_with_warmup(opt, s.warmup, s.total, **kw),
    "cosine": lambda opt, s, c, kw: hf.get_cosine_schedule_with_warmup(opt, s.warmup, s.total, **kw),
    "cosine_with_restarts": lambda opt, s, c, kw: hf.get_cosine_with_hard_restarts_schedule_with_warmup(
        opt, s.warmup, s.total, num_cycles=c.lr_scheduler_num_cycles, **kw),
    "polynomial": lambda opt, s, c, kw: hf.get_polynomial_decay_schedule_with_warmup(
        opt, s.warmup, s.total, power=c.lr_scheduler_power, **kw),
    "inverse_sqrt": lambda opt, s, c, kw: hf.get_inverse_sqrt_schedule(
        opt, num_warmup_steps=s.warmup, timescale=c.lr_scheduler_timescale, **kw),
    "cosine_with_min_lr": _cosine_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
    "piecewise_constant": _piecewise_constant,
}

KNOWN_SCHEDULERS: tuple[str, ...] = (*_SCHEDULERS, "adafactor")

