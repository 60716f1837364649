"""Timers. CUDA: CUDA events around each call, L2 flushed before each (a 256 MB write), warm-up,
median and [0.2, 0.8] quantiles. CPU: torch.utils.benchmark (blocked autorange), same statistics
over its blocks."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    runs: int


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_flush_buffer: dict = {}


def time_cuda(fn: Callable[[], object], quick: bool = False) -> Timing:
    dev = torch.cuda.current_device()
    if dev not in _flush_buffer:
        _flush_buffer[dev] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    flush = _flush_buffer[dev]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # calibrate: how many reps fit in the time budget
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    budget_ms = 100.0 if quick else 400.0
    reps = int(min(1000, max(10, budget_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps)


def time_cpu(fn: Callable[[], object], quick: bool = False) -> Timing:
    from torch.utils import benchmark

    fn()
    # Timer defaults to num_threads=1: measure with the threads the process really uses.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.3 if quick else 1.0)
    times = [t * 1e3 for t in m.times]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), m.number_per_run * len(times))


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool = False) -> Timing:
    return time_cuda(fn, quick) if device.type == "cuda" else time_cpu(fn, quick)
