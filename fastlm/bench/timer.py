"""Timers. CUDA: CUDA events around each call, L2 flushed before each (a 256 MB write), warm-up,
median and [0.2, 0.8] quantiles. CPU: torch.utils.benchmark (blocked autorange), same statistics
over its blocks. Several contenders on the CPU: `time_cpu_interleaved`, rounds that time each once in
a rotated order (the host's speed drifts over minutes; back-to-back timings turned that drift into
ratios)."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

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


def time_cpu_interleaved(fns: Dict[str, Callable[[], object]], quick: bool = False,
                         min_rounds: Optional[int] = None, max_rounds: int = 15) -> Dict[str, Union[Timing, Exception]]:
    """Time several CPU callables against each other: a warm-up call and a timed call each (the block
    size: enough calls for ~0.05 s, 0.1 s without quick), then rounds -- each times every callable's
    block once, the order rotated round to round -- until every callable has had its share of the
    time budget (0.3 s each with quick, 1 s without) and at least `min_rounds` rounds. Statistics per
    call over the rounds. A callable that raises gets its exception instead of a Timing.
    min_rounds: default 3, or FASTLM_BENCH_MIN_ROUNDS (more rounds for noisy hosts or close calls)."""
    if min_rounds is None:
        min_rounds = int(os.environ.get("FASTLM_BENCH_MIN_ROUNDS", "3"))
    max_rounds = max(max_rounds, min_rounds)
    block_s = 0.05 if quick else 0.1
    budget_s = (0.3 if quick else 1.0) * len(fns)
    number: Dict[str, int] = {}
    out: Dict[str, Union[Timing, Exception]] = {}
    for name, fn in fns.items():
        try:
            fn()
            t0 = time.perf_counter()
            fn()
            est = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported per contender
            out[name] = e
            continue
        number[name] = max(1, int(block_s / max(est, 1e-7)))
    names = list(number)
    samples: Dict[str, list] = {n: [] for n in names}
    spent, rounds = 0.0, 0
    while names and (rounds < min_rounds or (spent < budget_s and rounds < max_rounds)):
        r0 = time.perf_counter()
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            fn, k = fns[name], number[name]
            try:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) / k * 1e3)
            except Exception as e:  # noqa: BLE001
                out[name] = e
        names = [n for n in names if n not in out]
        spent += time.perf_counter() - r0
        rounds += 1
    for name in names:
        xs = samples[name]
        out[name] = Timing(statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), number[name] * len(xs))
    return {n: out[n] for n in fns}
