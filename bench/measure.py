"""How the suite measures: interleaved timing, allocator peaks, profiles, the machine.

Timing. Compared variants run in the same process, interleaved round by round (A, B, A, B, ...), after
warm-up, and each variant's time is the MEDIAN over rounds. On a shared 2-core machine a background
burst then slows both variants of a round alike instead of one whole series, so ratios of medians are
far steadier than the absolute times (which are reported as context only).

Memory. `peak_bytes(fn)` is the peak of bytes held by PyTorch's allocator during one call of fn ABOVE
the level at its start: on CUDA the caching allocator's max_memory_allocated; on CPU the running sum of
the allocation / free events that torch.profiler(profile_memory=True) records. It counts tensor
storage only (parameters and inputs allocated before the call are the baseline, not the peak), not
Python objects or allocator slack.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Budget:
    """How hard to measure: warm-up calls and interleaved rounds per variant."""

    warmup: int
    rounds: int
    min_round_s: float  # repeat a call within a round until this long, to time short calls


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict[str, Callable[[], object]], budget: Budget,
                     device: torch.device) -> dict[str, dict]:
    """Median seconds per call of each variant, measured round-robin (see module docstring).

    Returns {name: {"median_s", "min_s", "spread": (max - min) / median over rounds, "rounds"}}."""
    for fn in variants.values():
        for _ in range(budget.warmup):
            fn()
    synchronize(device)
    # Calls per round: enough that a round of the fastest call lasts min_round_s (timer granularity
    # and Python overhead stop mattering), measured once from a single call per variant.
    repeats = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        synchronize(device)
        single = max(time.perf_counter() - start, 1e-6)
        repeats[name] = max(1, int(budget.min_round_s / single))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(budget.rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / repeats[name])
    out = {}
    for name, times in samples.items():
        median = statistics.median(times)
        out[name] = {"median_s": median, "min_s": min(times),
                     "spread": (max(times) - min(times)) / median, "rounds": len(times)}
    return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak allocator bytes above the starting level during one call of fn (module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()  # positive: allocation, negative: free
        peak = max(peak, level)
    return peak


def top_ops(fn: Callable[[], object], device: torch.device, n: int | None = 8,
            calls: int = 1) -> list[dict]:
    """The n operators (None: all) with the most self time per call of fn, averaged over `calls`
    profiled calls (after one warm-up); more calls steady the split on a shared machine."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in averages) or 1.0
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3 / calls, "share": getattr(e, key) / total,
             "calls": e.count // calls} for e in averages[:n]]


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int, budget: Budget) -> float:
    """Achieved FLOP/s of one square size x size matmul: the machine's practical matmul peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_interleaved({"mm": lambda: a @ b}, budget, device)["mm"]
    return 2 * size ** 3 / timing["median_s"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
