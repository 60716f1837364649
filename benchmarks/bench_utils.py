"""Turns registry cases into pytest-benchmark parameters: one test per case, timing its "fastlm:auto"
row (the default backend choice) and recording what auto picked."""
from __future__ import annotations

import pytest
import torch

from fastlm.bench import registry


def device_and_dtype(config):
    device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.getoption("--dtype")
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return torch.device(device), dtype


def case_params(suite: str, family: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [pytest.param(c, id=c.name.replace(" ", "-")) for c in registry.cases(suite, device) if c.family == family]


def time_callable(benchmark, fn, device: torch.device, pedantic: bool = False) -> None:
    """Time fn with pytest-benchmark: CUDA work is synchronized inside the timed call; pedantic=True
    uses a fixed small number of rounds (long end-to-end cases)."""
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    if pedantic:
        benchmark.pedantic(timed, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2 if device.type == "cuda" else 1)
    else:
        benchmark(timed)


def auto_label(bound) -> str:
    """The contender a pytest-benchmark test times: fastlm's default choice ("fastlm:auto", what users
    get), else the first fastlm row, else the baseline."""
    labels = bound.auto_labels or [k for k in bound.impls if k.startswith("fastlm")]
    return labels[0] if labels else bound.baseline


def record_auto(benchmark, bound, label: str) -> None:
    """extra_info: the label timed and, for an auto row, the backend auto picked per op."""
    from fastlm.bench.runner import auto_picks

    benchmark.extra_info["impl"] = label
    if label in bound.auto_labels:
        benchmark.extra_info["auto_picks"] = auto_picks(bound.impls[label])


_bound_cache: dict = {}


def run_case(benchmark, request, case):
    device, dtype = device_and_dtype(request.config)
    key = (case.name, device, dtype)
    if key not in _bound_cache:
        _bound_cache[key] = case.make(device, dtype)
    bound = _bound_cache[key]
    if bound.check is not None:
        errors = bound.check()
        benchmark.extra_info["max_err"] = errors
    label = auto_label(bound)
    time_callable(benchmark, bound.impls[label], device)
    record_auto(benchmark, bound, label)
