"""Measuring tools the step benchmarks share: step timing, FLOP counting, memory, the GPU's matmul rate, profiling.

Each benchmark script owns its model and its training step (a `step(after_forward)` callable that runs one
optimizer step and returns the loss); everything here only calls that step and reads clocks and counters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GIB = 1024**3

# One training step; `after_forward`, when given, runs between the loss and backward (to read memory held for backward).
Step = Callable[[Callable[[], None] | None], float]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Wall seconds of each timed step, the device synchronised around every one."""
    for _ in range(warmup):
        step(None)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step(None)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def timing_fields(times: list[float]) -> dict[str, float | int]:
    return {"s_per_step_median": statistics.median(times), "s_per_step_min": min(times), "s_per_step_max": max(times),
            "s_per_step_p90": sorted(times)[int(0.9 * (len(times) - 1))], "steps_timed": len(times)}


def count_flops(run: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of everything `run` executes (forward, backward, checkpoint recompute), total and per aten op."""
    with FlopCounterMode(display=False) as counter:
        run()
    per_op = {str(op).split(".")[-1] if "." in str(op) else str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def memory_split(step: Step, device: torch.device) -> dict[str, float]:
    """GiB held after the forward pass (what backward keeps) and the step's peak, earlier steps excluded."""
    held: dict[str, float] = {}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(lambda: held.setdefault("after_forward_gib", torch.cuda.memory_allocated(device) / GIB))
    held["step_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return held


def host_launch_us(device: torch.device, launches: int = 20000) -> float:
    """Host time per launch of a trivial kernel: the floor on the cost of every op a step dispatches."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    synchronize(device)
    return (time.perf_counter() - start) / launches * 1e6


def bf16_matmul_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    """Measured bf16 matmul rate (median of `repeats` products on random data, events around each)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(samples) / 1e12


def utilisation(executed_flops: int, model_flops: int, seconds: float, peak_tflops: float) -> dict[str, float]:
    """MFU counts the model's forward + backward only; HFU also the checkpoint recompute the step really ran."""
    executed = executed_flops / seconds / 1e12
    return {"bf16_matmul_tflops": peak_tflops, "executed_tflops": executed, "hfu": executed / peak_tflops,
            "mfu": model_flops / seconds / 1e12 / peak_tflops}


def cuda_memory_fields(device: torch.device) -> dict[str, Any]:
    return {"gpu": torch.cuda.get_device_name(device), "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def profile_steps(step: Step, device: torch.device, steps: int = 3) -> dict:
    """Sum of GPU kernel time and kernel launches per step, against wall time, plus the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(None)
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    # gpu_user_annotation rows (e.g. the optimizer's range) sit on the CUDA timeline too but are spans, not kernels.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    kernel_time = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    except (KeyError, AttributeError, ValueError):
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    return {"profiled_wall_s": wall, "kernel_s_per_step": kernel_time, "kernels_per_step": len(kernels) // steps,
            "gpu_busy_fraction": kernel_time / wall if kernels else None, "table": table}


# aten ops that launch no GPU work: views and aliases of existing memory, allocation, autograd bookkeeping.
_NO_LAUNCH = frozenset({"detach", "alias", "lift_fresh", "_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty",
                        "new_empty_strided", "set_", "resize_", "_has_compatible_shallow_copy_type", "is_same_size"})
_KINDS = (("matmul", ("mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward")),
          ("attention", ("_scaled_dot_product", "_efficient_attention", "_flash_attention")),
          ("norm", ("native_layer_norm", "native_group_norm", "_fused_rms_norm", "rms_norm", "layer_norm", "group_norm")),
          ("copy/cast", ("_to_copy", "copy_", "clone", "cat", "stack", "_unsafe_index", "constant_pad_nd")),
          ("optimizer", ("_foreach_", "_fused_")))


def launch_kind(name: str) -> str:
    """The group an aten op's kernel belongs to, for the per-kind counts ("elementwise/other" by default)."""
    for kind, prefixes in _KINDS:
        if any(name == prefix or name.startswith(prefix) for prefix in prefixes):
            return kind
    return "elementwise/other"


class _LaunchCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches that would each launch GPU work, per phase and kind."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_LAUNCH:
            # The autograd engine runs backward (and the checkpoint recompute inside it) under a graph task.
            phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase
            kinds = self.counts.setdefault(phase, {})
            kind = launch_kind(name)
            kinds[kind] = kinds.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


def count_launches(step: Step) -> dict[str, Any]:
    """Kernel-launching aten ops of one step by phase (forward, backward incl. checkpoint recompute, then the
    optimizer: clipping, step, zero_grad) and kind. The count depends on the model's depth and structure, not
    its width, so a narrow stand-in on the CPU gives the GPU step's count; an op can launch more than one
    kernel (or, fused by a library, fewer), so this is the host-side work the step asks for, not a profile."""
    counter = _LaunchCounter()

    def after_forward() -> None:
        counter.phase = "optimizer"  # what runs after the loss and outside backward

    with counter:
        step(after_forward)
    phases = {phase: sum(kinds.values()) for phase, kinds in counter.counts.items()}
    return {"launches_per_step": sum(phases.values()), "launches_by_phase": phases, "launches_by_kind": counter.counts}


def launch_summary(r: dict[str, Any]) -> str:
    """One line for a --count_launches result."""
    phases = ", ".join(f"{phase} {count}" for phase, count in r["launches_by_phase"].items())
    kinds: dict[str, int] = {}
    for counts in r["launches_by_kind"].values():
        for kind, count in counts.items():
            kinds[kind] = kinds.get(kind, 0) + count
    by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items(), key=lambda item: -item[1]))
    return (f"{r['model']} (depth as released, narrow widths, CPU) gc={'on' if r['gradient_checkpointing'] else 'off'} "
            f"{r['optimizer']} LoRA {r['network_dim']}: {r['launches_per_step']} kernel-launching ops per step "
            f"({phases}; {by_kind})")


def emit(result: dict, summary: str, json_out: str | None, report: Callable[[str], None]) -> None:
    """The human line, then the machine line ("RESULT {json}"), also appended to `json_out` if given."""
    report(summary)
    report("RESULT " + json.dumps(result))
    if json_out:
        with open(json_out, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every bench script takes: LoRA and optimizer settings, measurement options, output."""
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--network_alpha", type=float, default=16.0)
    parser.add_argument("--optimizer_type", default="AdamW")
    parser.add_argument("--full_bf16", action="store_true", help="LoRA weights in bf16 too (the trainer's --full_bf16)")
    parser.add_argument("--matmul_size", type=int, default=8192, help="side of the bf16 matmul that measures the peak rate; 0 skips it")
    parser.add_argument("--profile", action="store_true", help="also profile 3 steps: kernel time, launches, top kernels")
    parser.add_argument("--flops_only", action="store_true", help="only count the FLOPs of one step on the meta device")
    parser.add_argument("--count_launches", action="store_true",
                        help="only count the kernel-launching ops of one step, on the CPU, with a narrow stand-in of the "
                             "model at full depth (the count does not depend on width)")
    parser.add_argument("--torch_compile", action="store_true",
                        help="compile the denoiser block by block, as the trainer's --torch_compile (first steps compile)")
    parser.add_argument("--dynamo_backend", default="inductor", help="torch.compile backend for --torch_compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json_out", default=None)
