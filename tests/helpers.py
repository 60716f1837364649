"""Shared test helpers: the devices and backends to test, the parity rule, poisoned outputs.

The parity rule (DESIGN.md): against the fp64 reference oracle, a kernel's max error is at most
`factor` (2 for outputs, 3 for gradients) times the error of the same math done by PyTorch in the
low dtype, plus a small per-dtype floor. Errors are printed before asserting (pytest -s shows them).
"""
from __future__ import annotations

import os

import pytest
import torch

import fastlm
from fastlm.testing import poison_outputs  # noqa: F401  (re-exported for the tests)

FULL = os.environ.get("FASTLM_TEST_FULL", "0") == "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Absolute floors, for values of order 1 (errors below these are rounding noise at that dtype).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


def backend_params(op: str, dtypes=FLOAT_DTYPES):
    """pytest params (device, backend, dtype) for every backend this machine has for `op`.
    Under the Triton interpreter bf16 is broken, so triton is tested in fp32/fp16 there."""
    out = []
    for device in DEVICES:
        for backend in fastlm.available_backends(op, device):
            for dtype in dtypes:
                if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                    continue
                out.append(pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}"))
    return out


def assert_close(name: str, out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor | None,
                 factor: float = 2.0, atol: float | None = None) -> None:
    """max|out - oracle| <= factor * max|baseline - oracle| + atol, compared in fp64.
    baseline: the same math by PyTorch at out's dtype (None: use atol alone)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    o, r = out.detach().double().cpu(), oracle.detach().double().cpu()
    nan = torch.isnan(o) & ~torch.isnan(r)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN elements (unwritten output?)"
    if atol is None:
        atol = ATOL[out.dtype]
    diff = (o - r).abs()
    err, mean_err = (diff.max().item(), diff.mean().item()) if diff.numel() else (0.0, 0.0)
    base = 0.0
    if baseline is not None and baseline.numel():
        base = (baseline.detach().double().cpu() - r).abs().max().item()
    bound = factor * base + atol
    print(f"{name}: max err {err:.3e} mean {mean_err:.3e} | torch {out.dtype} err {base:.3e} | bound {bound:.3e}")
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch's {base:.3e} + {atol:.1e}"
