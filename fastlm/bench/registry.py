"""The benchmark case registry, shared by `fastlm bench` and benchmarks/ (pytest-benchmark).

A Case is one benchmarked shape of one op family. `make(device, dtype)` builds the inputs once and
returns a Bound: the callables to time (each contender under its own label, fastlm's backends as
"fastlm:<backend>"), the work per call (bytes moved, flops, tokens) from which the report derives
GB/s, TFLOP/s and tokens/s, and a parity check that returns the max error of each contender against
the reference. Case modules are the files fastlm/bench/cases_*.py (all of them, found at run time:
cases_serve.py, cases_quant.py, ... from other parts of fastlm join without an edit here); each calls
`register(...)` at import. A module that fails to import is reported (`load_errors`) as an error row
of every run, so `fastlm bench` exits non-zero, instead of silently dropping its cases.

Rows labelled "fastlm:auto" (common.AUTO; `Bound.auto_labels`) run under fastlm's default backend
choice: the report names the backend auto picked for each op they ran.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SUITES = ("kernels", "models", "generate", "serve", "quant")


@dataclass
class Bound:
    impls: dict[str, Callable[[], Any]]              # label -> zero-argument callable to time
    bytes: float = 0.0                               # bytes moved per call (memory-bound ops): GB/s
    flops: float = 0.0                               # flops per call (matmul, attention): TFLOP/s
    tokens: float = 0.0                              # tokens per call (end to end): tokens/s
    check: Callable[[], dict[str, float]] | None = None  # label -> max abs error vs the reference
    baseline: str | None = None                      # label the speedups are relative to (torch's own path)
    interleave: bool = True                          # CPU: time the contenders round by round (False:
                                                     # one after another, e.g. when only one fits in memory)

    @property
    def auto_labels(self) -> list[str]:
        """The contenders that run under fastlm's default ("auto") backend choice."""
        return [k for k in self.impls if k.startswith("fastlm:auto")]


@dataclass
class Case:
    suite: str                                       # one of SUITES
    family: str                                      # "layer_norm", "attention", ...
    name: str                                        # unique, human readable: "layer_norm fwd 4096x768"
    make: Callable[[torch.device, torch.dtype], Bound]
    params: dict = field(default_factory=dict)       # shape parameters, for the JSON output
    quick: bool = False                              # part of `--quick`
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] | None = None    # None: any dtype the run asks for


_CASES: list[Case] = []
_loaded = False
load_errors: dict[str, str] = {}                     # case module -> why it could not be imported


def register(case: Case) -> Case:
    if any(c.name == case.name and c.suite == case.suite for c in _CASES):
        raise ValueError(f"duplicate benchmark case {case.suite}/{case.name}")
    _CASES.append(case)
    return case


def _load() -> None:
    global _loaded
    if _loaded:
        return
    import fastlm.bench as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            try:
                importlib.import_module(f"fastlm.bench.{info.name}")
            except Exception as e:  # noqa: BLE001 - one broken case module must not hide the others
                load_errors[f"fastlm.bench.{info.name}"] = f"{type(e).__name__}: {e}"
    _loaded = True


def cases(suite: str = "all", device: str = "cpu", quick: bool = False, dtype: torch.dtype | None = None) -> list[Case]:
    _load()
    out = []
    for c in _CASES:
        if suite != "all" and c.suite != suite:
            continue
        if device not in c.devices or (quick and not c.quick):
            continue
        if dtype is not None and c.dtypes is not None and dtype not in c.dtypes:
            continue
        out.append(c)
    return out
