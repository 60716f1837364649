"""Dispatch overhead: what one call of an op costs above its kernel, at shapes so small that the kernel
itself takes a few microseconds (a decode step calls dozens of such ops per layer).

Per op: "kernel direct" (torch.ops.fastlm_C.<kernel> called with prepared arguments: no checks, no
backend choice), "fastlm:auto" (the public op: argument checks + the auto choice, a cache hit after
the first call) and each forced backend (use_backend: the forced path), against torch's own op (the
baseline). The row's ms minus "kernel direct" is fastlm's per-call cost; the markdown/JSON keep
the raw medians. Inference only (no grad), the path a decode step takes."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench.common import bench_backends, max_err
from fastlm.bench.registry import Bound, Case, register


def _with_backend(backend, fn):
    with fastlm.use_backend(backend):
        return fn()


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _direct(name: str):
    """torch.ops.fastlm_C.<name>, or None when the extension lacks it."""
    try:
        from fastlm import _ext

        if _ext.load() is None:
            return None
        return getattr(torch.ops.fastlm_C, name)
    except (AttributeError, RuntimeError):
        return None


def _bound(op: str, torch_fn, op_fn, direct_fn, device) -> Bound:
    impls = {"torch": torch_fn}
    if direct_fn is not None and device.type == "cpu":
        impls["kernel direct (fastlm_C)"] = direct_fn
    for be in bench_backends(op, device):
        impls[f"fastlm:{be}"] = functools.partial(_with_backend, be, op_fn)
    impls = {k: functools.partial(_no_grad, f) for k, f in impls.items()}

    def check():
        ref = impls["torch"]()
        out = {}
        for k, f in impls.items():
            if k != "torch":
                got = f()
                out[k] = max_err(got[0] if isinstance(got, tuple) else got, ref)
        return out

    return Bound(impls, check=check, baseline="torch")


def _layer_norm(N, device, dtype) -> Bound:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in ((1, N), (N,), (N,)))
    kernel = _direct("layer_norm_fwd")
    return _bound("layer_norm", lambda: F.layer_norm(x, (N,), w, b), lambda: ops.layer_norm(x, (N,), w, b),
                  None if kernel is None else (lambda: kernel(x, None, w, b, 1e-5)), device)


def _linear(K, N, device, dtype) -> Bound:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in ((1, K), (N, K), (N,)))
    kernel = _direct("linear_fwd")
    return _bound("linear", lambda: F.linear(x, w, b), lambda: ops.linear(x, w, b),
                  None if kernel is None else (lambda: kernel(x, w, b)), device)


for _name, _make, _params in (("layer_norm 1x64", functools.partial(_layer_norm, 64), {"M": 1, "N": 64}),
                              ("linear 1x64->64", functools.partial(_linear, 64, 64), {"M": 1, "K": 64, "N": 64})):
    register(Case("kernels", "dispatch", f"dispatch overhead {_name}", _make, _params, quick=True))
