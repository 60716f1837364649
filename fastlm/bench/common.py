"""Helpers shared by the case modules: which fastlm backends to benchmark, element sizes, and
parity against the fp64 reference."""
from __future__ import annotations

import os

import torch

import fastlm


def bench_backends(op: str, device: torch.device) -> list[str]:
    """fastlm's kernel backends for `op` on `device`, minus the reference (a baseline of its own)
    and minus Triton under the CPU interpreter (correct but not a speed contender)."""
    return [b for b in fastlm.available_backends(op, device.type)
            if b != "reference" and not (b == "triton" and device.type == "cpu")]


def max_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return (out.detach().double() - oracle.detach().double()).abs().max().item()


def compile_or_none(fn):
    """torch.compile(fn), or None where inductor cannot run here (reported as a missing contender) or
    FASTLM_BENCH_COMPILE=0 (inductor's compile costs ~10-30 s a case: skipped when device time is short)."""
    if os.environ.get("FASTLM_BENCH_COMPILE", "1") == "0":
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001
        return None
