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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json_out", default=None)
