"""Optimizers and learning-rate schedulers built from sd-scripts' flags.

Schedules are checked step by step against the closed-form formulas (written out here independently
of transformers); optimizers by their classes, the arguments they received and, where cheap, one step
of their update rule.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import types

import pytest
import schedulefree
import torch
import transformers

from library.lr_schedulers import SchedulerConfig, build_lr_scheduler
from library.optim import OptimizerConfig, build_optimizer, is_schedule_free, parse_optimizer_args, set_train_mode

BNB_NAMES = ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit"]
DADAPT_NAMES = {  # name -> (module, class) as sd-scripts maps them
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP"),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam"),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan"),
    "DAdaptLion": ("dadaptation", "DAdaptLion"),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD"),
}


def _config(name: str = "", *args: str, lr: float = 1e-3) -> OptimizerConfig:
    return OptimizerConfig(optimizer_type=name, learning_rate=lr, optimizer_args=args, max_grad_norm=1.0)


def _params(value: float = 1.0) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.full((4,), value))]


# ----------------------------------------------------------------------------- --optimizer_args
def test_optimizer_args_are_python_literals_with_text_fallback():
    parsed = parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.999", "foreach=False", "d_coef=2",
                                   "decay_type=cosine", "eps=(1e-30, 1e-3)"])
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.999), "foreach": False, "d_coef": 2,
                      "decay_type": "cosine", "eps": (1e-30, 1e-3)}
    assert isinstance(parsed["d_coef"], int) and isinstance(parsed["foreach"], bool)


@pytest.mark.parametrize("item", ["weight_decay", "=0.1", "weight decay=0.1"])
def test_bad_optimizer_arg_names_the_item(item):
    with pytest.raises(ValueError, match="--optimizer_args") as error:
        parse_optimizer_args([item])
    assert repr(item) in str(error.value)


def test_repeated_optimizer_arg_is_rejected():
    with pytest.raises(ValueError, match="'eps' is given twice"):
        parse_optimizer_args(["eps=1", "eps=2"])


def test_config_from_args_reads_sd_scripts_defaults():
    args = argparse.Namespace(optimizer_type="", learning_rate=2e-6, optimizer_args=None, max_grad_norm=1.0)
    assert OptimizerConfig.from_args(args) == OptimizerConfig("", 2e-6, (), 1.0)


# ----------------------------------------------------------------------------- names that build here
def test_default_is_adamw_with_args_and_sd_scripts_description():
    description, optimizer = build_optimizer(_config("", "weight_decay=0.01", "betas=0.8,0.9"), _params())
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-3, 0.01, (0.8, 0.9))
    assert description == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.8, 0.9))"


def test_names_are_case_insensitive():
    assert type(build_optimizer(_config("adamw"), _params())[1]) is torch.optim.AdamW
    assert type(build_optimizer(_config("ADAFACTOR", "relative_step=False"), _params())[1]) is transformers.optimization.Adafactor


def test_sgd_nesterov_defaults_momentum_and_takes_one_nesterov_step():
    description, optimizer = build_optimizer(_config("SGDNesterov", lr=0.1), params := _params(1.0))
    assert description == "torch.optim.sgd.SGD(momentum=0.9)"
    params[0].grad = torch.full((4,), 2.0)
    optimizer.step()
    # Nesterov, first step: buffer = g, update = g + momentum * buffer = 1.9 g.
    torch.testing.assert_close(params[0].detach(), torch.full((4,), 1.0 - 0.1 * 1.9 * 2.0))
    _, custom = build_optimizer(_config("SGDNesterov", "momentum=0.5"), _params())
    assert custom.param_groups[0]["momentum"] == 0.5 and custom.param_groups[0]["nesterov"] is True


def test_adafactor_relative_step_drops_lr_everywhere_without_touching_caller_groups():
    groups = [{"params": _params(), "lr": 1e-4}, {"params": _params(), "lr": 2e-4}]
    description, optimizer = build_optimizer(_config("Adafactor", lr=1e-3), groups)
    assert description == "transformers.optimization.Adafactor(relative_step=True)"
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert all(group["lr"] is None for group in optimizer.param_groups)
    assert [group["lr"] for group in groups] == [1e-4, 2e-4]


def test_adafactor_warmup_init_forces_relative_step():
    _, optimizer = build_optimizer(_config("Adafactor", "relative_step=False", "warmup_init=True"), _params())
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["warmup_init"] is True


def test_adafactor_with_fixed_lr():
    _, optimizer = build_optimizer(_config("Adafactor", "relative_step=False", "scale_parameter=False", lr=0.5), _params())
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.defaults["relative_step"] is False


def test_prodigy_builds_with_args():
    import prodigyopt

    description, optimizer = build_optimizer(_config("Prodigy", "d_coef=2", "use_bias_correction=True", lr=1.0), _params())
    assert type(optimizer) is prodigyopt.Prodigy
    assert optimizer.param_groups[0]["d_coef"] == 2 and optimizer.param_groups[0]["use_bias_correction"] is True
    assert description == "prodigyopt.prodigy.Prodigy(d_coef=2,use_bias_correction=True)"


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"])
def test_schedule_free_optimizers_build_in_train_mode(name):
    _, optimizer = build_optimizer(_config(name), _params())
    assert type(optimizer) is getattr(schedulefree, name)
    assert is_schedule_free(optimizer)
    assert optimizer.param_groups[0]["train_mode"] is True


def test_set_train_mode_swaps_schedule_free_weights_and_ignores_others():
    params = _params(1.0)
    _, optimizer = build_optimizer(_config("AdamWScheduleFree", lr=0.1), params)
    for _ in range(3):
        params[0].grad = torch.ones(4)
        optimizer.step()
    train_weights = params[0].detach().clone()
    set_train_mode(optimizer, False)
    assert optimizer.param_groups[0]["train_mode"] is False
    assert not torch.equal(params[0].detach(), train_weights)  # eval mode shows the averaged weights
    set_train_mode(optimizer, True)
    torch.testing.assert_close(params[0].detach(), train_weights)

    _, adamw = build_optimizer(_config("AdamW"), _params())
    assert not is_schedule_free(adamw)
    set_train_mode(adamw, False)  # no modes: nothing to do, nothing raised


@pytest.mark.parametrize("name", ["RMSprop", "torch.optim.RMSprop"])
def test_torch_optim_names_and_module_paths(name):
    description, optimizer = build_optimizer(_config(name, "alpha=0.9"), _params())
    assert type(optimizer) is torch.optim.RMSprop
    assert optimizer.param_groups[0]["alpha"] == 0.9
    assert description == "torch.optim.rmsprop.RMSprop(alpha=0.9)"


# ----------------------------------------------------------------------------- names that need other packages
@pytest.mark.parametrize("name", BNB_NAMES)
def test_old_bitsandbytes_without_cuda_says_why(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_module(monkeypatch, "bitsandbytes")
    _fake_module(monkeypatch, "bitsandbytes.optim")
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "0.49.2")
    with pytest.raises(ValueError, match=rf"--optimizer_type {name}: bitsandbytes 0.49.2 runs only on a CUDA GPU.*>=0.50"):
        build_optimizer(_config(name), _params())


def test_adamw8bit_trains_on_the_cpu():
    """bitsandbytes >= 0.50 (a requirement) runs its 8-bit optimizers on the CPU: the sd-scripts guides'
    AdamW8bit command lines work unchanged on a machine without a GPU."""
    pytest.importorskip("bitsandbytes", minversion="0.50")
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 4096).reshape(64, 64))]
    description, optimizer = build_optimizer(_config("AdamW8bit", lr=0.01), params)
    before = params[0].detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        params[0].square().sum().backward()
        optimizer.step()
    assert description == "bitsandbytes.optim.adamw.AdamW8bit"
    assert optimizer.state[params[0]]["state1"].dtype == torch.uint8  # 8-bit moments, not a silent fp32 fallback
    assert params[0].abs().sum() < before.abs().sum()  # moved towards the minimum of sum(p²)


def test_bitsandbytes_missing_names_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails even where it is installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        build_optimizer(_config("AdamW8bit"), _params())


def _fake_module(monkeypatch, name: str, **classes: type) -> None:
    module = types.ModuleType(name)
    for class_name, base in classes.items():
        setattr(module, class_name, type(class_name, (base,), {"__module__": name}))
    monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("name", BNB_NAMES)
def test_bitsandbytes_names_map_to_their_classes(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    classes = {"AdamW8bit": torch.optim.AdamW, "PagedAdamW8bit": torch.optim.AdamW, "PagedAdamW": torch.optim.AdamW,
               "PagedAdamW32bit": torch.optim.AdamW, "Lion8bit": torch.optim.AdamW, "PagedLion8bit": torch.optim.AdamW,
               "SGD8bit": torch.optim.SGD}
    _fake_module(monkeypatch, "bitsandbytes")
    _fake_module(monkeypatch, "bitsandbytes.optim", **classes)
    description, optimizer = build_optimizer(_config(name, lr=0.01), _params())
    expected = "SGD8bit" if name == "SGDNesterov8bit" else name
    assert type(optimizer).__name__ == expected and optimizer.param_groups[0]["lr"] == 0.01
    if name == "SGDNesterov8bit":
        assert optimizer.param_groups[0]["nesterov"] is True and optimizer.param_groups[0]["momentum"] == 0.9
        assert description == "bitsandbytes.optim.SGD8bit(momentum=0.9)"


def test_lion_missing_and_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(ValueError, match="pip install lion-pytorch"):
        build_optimizer(_config("Lion"), _params())
    _fake_module(monkeypatch, "lion_pytorch", Lion=torch.optim.AdamW)
    _, optimizer = build_optimizer(_config("Lion", "weight_decay=0.1", lr=3e-5), _params())
    assert type(optimizer).__name__ == "Lion" and optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("name", sorted(DADAPT_NAMES))
def test_dadaptation_missing_and_present(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    with pytest.raises(ValueError, match="pip install dadaptation"):
        build_optimizer(_config(name), _params())
    _fake_module(monkeypatch, "dadaptation", **{c: torch.optim.SGD for m, c in DADAPT_NAMES.values() if m == "dadaptation"})
    _fake_module(monkeypatch, "dadaptation.experimental",
                 **{c: torch.optim.SGD for m, c in DADAPT_NAMES.values() if m == "dadaptation.experimental"})
    _, optimizer = build_optimizer(_config(name, lr=1.0), _params())
    module, class_name = DADAPT_NAMES[name]
    assert (type(optimizer).__module__, type(optimizer).__name__) == (module, class_name)


# ----------------------------------------------------------------------------- errors
def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'AdamW9bit' is unknown.*AdamW8bit.*Prodigy.*SGDScheduleFree"):
        build_optimizer(_config("AdamW9bit"), _params())


def test_module_path_errors_name_the_module_and_class():
    with pytest.raises(ValueError, match="cannot import module 'no_such_package'"):
        build_optimizer(_config("no_such_package.Opt"), _params())
    with pytest.raises(ValueError, match="module 'torch.optim' has no class 'Adamm'"):
        build_optimizer(_config("torch.optim.Adamm"), _params())


def test_arguments_the_optimizer_does_not_take_are_reported():
    with pytest.raises(ValueError, match="--optimizer_args .*'momentumm'.* do not fit AdamW"):
        build_optimizer(_config("AdamW", "momentumm=0.9"), _params())


# ----------------------------------------------------------------------------- schedulers
BASE_LR = 0.1
TOTAL = 100


def _scheduler_config(name: str = "constant", *, warmup: int | float = 0, decay: int | float = 0, cycles: int = 1,
                      power: float = 1.0, timescale: int | None = None, min_ratio: float | None = None,
                      kind: str = "", args: tuple[str, ...] = (), lr: float = BASE_LR) -> SchedulerConfig:
    return SchedulerConfig(lr_scheduler=name, lr_scheduler_type=kind, lr_scheduler_args=args, lr_warmup_steps=warmup,
                           lr_decay_steps=decay, lr_scheduler_num_cycles=cycles, lr_scheduler_power=power,
                           lr_scheduler_timescale=timescale, lr_scheduler_min_lr_ratio=min_ratio, learning_rate=lr)


def _lrs(config: SchedulerConfig, *, steps: int = TOTAL, processes: int = 1, optimizer=None) -> list[float]:
    """The lr in effect at scheduler steps 0..steps+4 (a few past the end, where schedules must stay put)."""
    optimizer = optimizer or torch.optim.SGD(_params(), lr=BASE_LR)
    scheduler = build_lr_scheduler(config, optimizer, num_training_steps=steps, num_processes=processes)
    trace = []
    for _ in range(steps * processes + 5):
        trace.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return trace


def _expect(trace: list[float], factor) -> None:
    expected = [BASE_LR * factor(step) for step in range(len(trace))]
    assert trace == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _warm(step: int, warmup: int) -> float | None:
    return step / warmup if step < warmup else None


def test_constant_and_constant_with_warmup():
    _expect(_lrs(_scheduler_config("constant")), lambda s: 1.0)
    _expect(_lrs(_scheduler_config("constant_with_warmup", warmup=10)), lambda s: min(1.0, s / 10))


@pytest.mark.parametrize("warmup", [10, 0.1])  # steps, or a ratio of the 100 steps
def test_linear_with_warmup_as_steps_and_as_ratio(warmup):
    _expect(_lrs(_scheduler_config("linear", warmup=warmup)),
            lambda s: _warm(s, 10) if s < 10 else max(0.0, (TOTAL - s) / (TOTAL - 10)))


def test_cosine():
    _expect(_lrs(_scheduler_config("cosine", warmup=10)),
            lambda s: _warm(s, 10) if s < 10 else max(0.0, 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))))


def test_cosine_with_restarts():
    def factor(s):
        if s < 10:
            return s / 10
        progress = (s - 10) / 90
        return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * progress) % 1.0)))

    trace = _lrs(_scheduler_config("cosine_with_restarts", warmup=10, cycles=3))
    _expect(trace, factor)
    assert trace[40] == pytest.approx(BASE_LR) and trace[70] == pytest.approx(BASE_LR)  # the two restarts


def test_polynomial_power():
    lr_end = 1e-7  # transformers' default end lr

    def factor(s):
        if s < 10:
            return s / 10
        if s > TOTAL:
            return lr_end / BASE_LR
        return ((BASE_LR - lr_end) * (1 - (s - 10) / 90) ** 2 + lr_end) / BASE_LR

    _expect(_lrs(_scheduler_config("polynomial", warmup=10, power=2.0)), factor)


def test_polynomial_lr_end_from_scheduler_args():
    trace = _lrs(_scheduler_config("polynomial", power=1.0, args=("lr_end=0.01",)))
    assert trace[50] == pytest.approx((BASE_LR - 0.01) * 0.5 + 0.01)
    assert trace[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("timescale", [None, 30])
def test_inverse_sqrt(timescale):
    scale = timescale or 10  # defaults to the warmup length

    _expect(_lrs(_scheduler_config("inverse_sqrt", warmup=10, timescale=timescale)),
            lambda s: _warm(s, 10) if s < 10 else 1 / math.sqrt((s + scale - 10) / scale))


def test_cosine_with_min_lr():
    # sd-scripts passes num_cycles / 2, so the default single cycle is a half cosine down to the floor.
    _expect(_lrs(_scheduler_config("cosine_with_min_lr", warmup=10, min_ratio=0.1)),
            lambda s: _warm(s, 10) if s < 10 else 0.1 + 0.9 * max(0.0, 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))))


@pytest.mark.parametrize("warmup, decay", [(10, 20), (0.1, 0.2)])
def test_warmup_stable_decay(warmup, decay):
    floor = 0.05

    def factor(s):
        if s < 10:
            return s / 10 * (1 - floor) + floor
        if s < 80:
            return 1.0
        if s < 100:
            return 0.5 * (1 + math.cos(math.pi * (s - 80) / 20)) * (1 - floor) + floor
        return floor

    _expect(_lrs(_scheduler_config("warmup_stable_decay", warmup=warmup, decay=decay, min_ratio=floor)), factor)


def test_schedule_length_counts_every_process():
    """accelerate steps a prepared scheduler once per process: 50 steps on 2 processes is a 100-step schedule,
    and a 0.1 warmup ratio is 10 of those; a warmup in steps is not scaled (sd-scripts)."""
    _expect(_lrs(_scheduler_config("linear", warmup=0.1), steps=50, processes=2),
            lambda s: _warm(s, 10) if s < 10 else max(0.0, (TOTAL - s) / 90))
    _expect(_lrs(_scheduler_config("linear", warmup=5), steps=50, processes=2),
            lambda s: _warm(s, 5) if s < 5 else max(0.0, (TOTAL - s) / 95))


def test_piecewise_constant():
    _expect(_lrs(_scheduler_config("piecewise_constant", args=('step_rules="1:10,0.1:20,0.01"',))),
            lambda s: 1.0 if s < 10 else 0.1 if s < 20 else 0.01)


@pytest.mark.parametrize("kind", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_custom_scheduler_class_with_args(kind):
    _expect(_lrs(_scheduler_config(kind=kind, args=("step_size=7", "gamma=0.5")), steps=20), lambda s: 0.5 ** (s // 7))


def test_adafactor_relative_step_gets_the_proxy_schedule():
    params = [torch.nn.Parameter(torch.full((4,), 2.0))]
    _, optimizer = build_optimizer(_config("Adafactor", lr=3e-4), params)
    scheduler = build_lr_scheduler(_scheduler_config("constant", lr=3e-4), optimizer, num_training_steps=10)
    assert isinstance(scheduler, transformers.optimization.AdafactorSchedule)
    assert scheduler.get_last_lr() == [3e-4]  # --learning_rate is reported until the first step
    params[0].grad = torch.ones(4)
    optimizer.step()
    scheduler.step()
    # Adafactor's own relative step at step 1: min(1e-2, 1/sqrt(1)) scaled by max(eps2=1e-3, RMS(param) = 2).
    assert scheduler.get_last_lr() == [pytest.approx(1e-2 * 2.0)]


def test_adafactor_schedule_initial_lr_spelling_and_no_warmup():
    _, optimizer = build_optimizer(_config("Adafactor"), _params())
    scheduler = build_lr_scheduler(_scheduler_config("adafactor:0.02"), optimizer, num_training_steps=10)
    assert scheduler.get_last_lr() == [0.02]
    with pytest.raises(ValueError, match="the adafactor schedule has no warmup"):
        build_lr_scheduler(_scheduler_config("adafactor", warmup=5), optimizer, num_training_steps=10)
    with pytest.raises(ValueError, match="part after 'adafactor:' must be a learning rate"):
        build_lr_scheduler(_scheduler_config("adafactor:fast"), optimizer, num_training_steps=10)


def test_adafactor_schedule_needs_relative_step_adafactor():
    with pytest.raises(ValueError, match="--lr_scheduler adafactor needs --optimizer_type Adafactor"):
        _lrs(_scheduler_config("adafactor"))


def test_schedule_free_allows_only_constant():
    _, optimizer = build_optimizer(_config("AdamWScheduleFree", lr=BASE_LR), _params())
    _expect(_lrs(_scheduler_config("constant"), steps=5, optimizer=optimizer), lambda s: 1.0)
    _, optimizer = build_optimizer(_config("AdamWScheduleFree", lr=BASE_LR), _params())
    with pytest.raises(ValueError, match="schedule-free optimizers need --lr_scheduler constant.*warmup_steps"):
        _lrs(_scheduler_config("cosine"), optimizer=optimizer)


@pytest.mark.parametrize("config, message", [
    (_scheduler_config("cosine_annealing"), "--lr_scheduler 'cosine_annealing' is unknown; use one of constant, "),
    (_scheduler_config("constant", warmup=10), "--lr_scheduler constant has no warmup"),
    (_scheduler_config(kind="StepLR", warmup=10, args=("step_size=2",)), "--lr_scheduler_type StepLR has no warmup"),
    (_scheduler_config(kind="torch.optim.lr_scheduler.NoSuchLR"), "has no class 'NoSuchLR'"),
    (_scheduler_config("cosine_with_min_lr"), "needs --lr_scheduler_min_lr_ratio"),
    (_scheduler_config("warmup_stable_decay", warmup=60, decay=50), r"\+ --lr_decay_steps \(50\) exceed the 100"),
    (_scheduler_config("linear", warmup=-1), "--lr_warmup_steps must be >= 0"),
    (_scheduler_config("cosine", args=("num_cyclez=2",)), "--lr_scheduler_args .* do not fit --lr_scheduler cosine"),
    (_scheduler_config("piecewise_constant", args=("step_rules='1:x,0.1'",)), "step_rules='1:x,0.1' is not of the form"),
])
def test_scheduler_errors_name_the_flag(config, message):
    with pytest.raises(ValueError, match=message):
        _lrs(config)


def test_scheduler_config_from_args():
    args = argparse.Namespace(lr_scheduler="cosine", lr_scheduler_type="", lr_scheduler_args=None, lr_warmup_steps=0.05,
                              lr_decay_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                              lr_scheduler_timescale=None, lr_scheduler_min_lr_ratio=None, learning_rate=1e-4)
    assert SchedulerConfig.from_args(args) == _scheduler_config("cosine", warmup=0.05, lr=1e-4)
