"""LayerNorm benchmark cases: forward, backward and forward+backward, against F.layer_norm (the
baseline) and torch.compile(reference), in GB/s and % of the measured copy bandwidth.
Bytes counted: forward reads x and writes y (2 M N); backward reads x, dy and writes dx (3 M N);
parameters and statistics are O(M + N) and ignored."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench.common import bench_backends, compile_or_none, max_err
from fastlm.bench.registry import Bound, Case, register
from fastlm.ops import reference


def _inputs(M, N, device, dtype, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, N, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    w = torch.randn(N, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    return x, w, b


def _ref_fwd(x, w, b):
    return reference.layer_norm_fwd_ref(x, None, w, b, 1e-5)[0]


def _make_fwd(M, N, device, dtype):
    x, w, b = _inputs(M, N, device, dtype)
    impls = {"torch (F.layer_norm)": lambda: F.layer_norm(x, (N,), w, b),
             # the bandwidth a LayerNorm can hope for: read x, write a new tensor of the same size
             "copy of x (same bytes)": lambda: torch.empty_like(x).copy_(x)}
    compiled = compile_or_none(_ref_fwd)
    if compiled is not None:
        impls["torch.compile(reference)"] = lambda: compiled(x, w, b)
    backends = bench_backends("layer_norm", device)
    for be in backends:
        impls[f"fastlm:{be}"] = functools.partial(_with_backend, be, lambda: ops.layer_norm(x, (N,), w, b))

    def check():
        oracle = F.layer_norm(x.double(), (N,), w.double(), b.double())
        errs = {"torch (F.layer_norm)": max_err(F.layer_norm(x, (N,), w, b), oracle)}
        for be in backends:
            errs[f"fastlm:{be}"] = max_err(_with_backend(be, lambda: ops.layer_norm(x, (N,), w, b)), oracle)
        return errs

    return Bound(impls, bytes=2 * M * N * x.element_size(), check=check, baseline="torch (F.layer_norm)")


def _with_backend(backend, fn):
    with fastlm.use_backend(backend):
        return fn()


def _make_bwd(M, N, device, dtype, include_forward):
    x, w, b = _inputs(M, N, device, dtype, grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)

    def step(fwd):
        if include_forward:
            y = fwd()
            return torch.autograd.grad(y, (x, w, b), dy)
        y = fwd()
        return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)

    contenders = {"torch (F.layer_norm)": lambda: F.layer_norm(x, (N,), w, b)}
    compiled = compile_or_none(_ref_fwd)
    if compiled is not None:
        contenders["torch.compile(reference)"] = lambda: compiled(x, w, b)
    for be in bench_backends("layer_norm", device):
        contenders[f"fastlm:{be}"] = functools.partial(_with_backend, be, lambda: ops.layer_norm(x, (N,), w, b))
    impls = {}
    for label, fwd in contenders.items():
        if include_forward:
            impls[label] = functools.partial(step, fwd)
        else:
            be = label.split(":", 1)[1] if label.startswith("fastlm:") else "auto"
            with fastlm.use_backend(be):
                grad_fn = step(fwd)
            impls[label] = functools.partial(_with_backend, be, grad_fn)

    def check():
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        oracle = torch.autograd.grad(F.layer_norm(x64, (N,), w64, b64), (x64, w64, b64), dy.double())
        errs = {}
        for label, fwd in contenders.items():
            if "compile" in label:
                continue
            be = label.split(":", 1)[1] if label.startswith("fastlm:") else "auto"
            with fastlm.use_backend(be):
                got = torch.autograd.grad(fwd(), (x, w, b), dy)
            errs[label] = max(max_err(g, o) for g, o in zip(got, oracle))
        return errs

    per_call = (5 if include_forward else 3) * M * N * x.element_size()
    return Bound(impls, bytes=per_call, check=check, baseline="torch (F.layer_norm)")


CPU_SHAPES = [(4096, 768), (4096, 1024)]
GPU_SHAPES = [(32768, 4096), (32768, 768), (4096, 1024), (16384, 8192)]

for devices, shapes in ((("cpu",), CPU_SHAPES), (("cuda",), GPU_SHAPES)):
    for M, N in shapes:
        quick = (M, N) in ((4096, 768), (32768, 4096), (32768, 768))
        tag = "" if devices == ("cpu",) else " [gpu]"
        params = {"M": M, "N": N}
        register(Case("kernels", "layer_norm", f"layer_norm fwd {M}x{N}{tag}",
                      functools.partial(lambda M, N, d, t: _make_fwd(M, N, d, t), M, N), params, quick, devices))
        register(Case("kernels", "layer_norm", f"layer_norm bwd {M}x{N}{tag}",
                      functools.partial(lambda M, N, d, t: _make_bwd(M, N, d, t, False), M, N), params, quick, devices))
        register(Case("kernels", "layer_norm", f"layer_norm fwd+bwd {M}x{N}{tag}",
                      functools.partial(lambda M, N, d, t: _make_bwd(M, N, d, t, True), M, N), params, quick, devices))
