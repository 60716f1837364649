"""GELU feed-forward benchmark cases: gelu_ffn forward (inference), gelu_ffn forward+backward and
linear_gelu forward, at GPT-2 (768 -> 3072, tanh GELU) and BERT-large (1024 -> 4096, exact GELU) sizes,
in TFLOP/s and % of the measured matmul peak.

Contenders: eager torch (F.linear + F.gelu + F.linear; the baseline), the plain GEMMs of the same shape
with no bias and no GELU (F.linear only: what the fused op must approach), torch.compile(reference)
and fastlm's backends. Flops: 2 M K F per GEMM (two in gelu_ffn's forward, six in forward+backward);
the elementwise work is not counted."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench.common import bench_backends, compile_or_none, max_err
from fastlm.bench.registry import Bound, Case, register
from fastlm.ops import reference

BASELINE = "torch eager"


def _with_backend(backend, fn):
    with fastlm.use_backend(backend):
        return fn()


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _inputs(M, K, F_, device, dtype, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w1 = torch.randn(F_, K, generator=g) / K ** 0.5
    b1 = torch.randn(F_, generator=g) * 0.1
    w2 = torch.randn(K, F_, generator=g) / F_ ** 0.5
    b2 = torch.randn(K, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (x, w1, b1, w2, b2)]


def _eager_ffn(x, w1, b1, w2, b2, approximate):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def _gemms_ffn(x, w1, b1, w2, b2, approximate):
    return F.linear(F.linear(x, w1), w2)


def _ref_ffn(x, w1, b1, w2, b2, approximate):
    return reference.gelu_ffn_fwd_ref(x, w1, b1, w2, b2, approximate, False)[0]


def _make_ffn(M, K, F_, approximate, mode, device, dtype):
    grad = mode == "fwd+bwd"
    args = _inputs(M, K, F_, device, dtype, grad)
    dy = torch.randn(M, K, device=device, dtype=dtype)
    contenders = {
        BASELINE: lambda: _eager_ffn(*args, approximate),
        "torch GEMMs only": lambda: _gemms_ffn(*args, approximate),
    }
    compiled = compile_or_none(_ref_ffn)
    if compiled is not None:
        contenders["torch.compile(reference)"] = lambda: compiled(*args, approximate)
    for be in bench_backends("gelu_ffn", device):
        contenders[f"fastlm:{be}"] = functools.partial(_with_backend, be, lambda: ops.gelu_ffn(*args, approximate))
    if grad:
        impls = {label: functools.partial(lambda f: torch.autograd.grad(f(), args, dy, allow_unused=True), f)
                 for label, f in contenders.items()}
    else:
        impls = {label: functools.partial(_no_grad, f) for label, f in contenders.items()}

    def check():
        oracle = _eager_ffn(*[a.detach().double() for a in args], approximate)
        errs = {}
        for label, f in contenders.items():
            if "compile" in label or "GEMMs" in label:
                continue
            errs[label] = max_err(_no_grad(f), oracle)
        return errs

    flops = 2 * M * K * F_ * (6 if grad else 2)
    return Bound(impls, flops=flops, check=check, baseline=BASELINE)


def _make_linear_gelu(M, K, N, approximate, device, dtype):
    x, w, b, _, _ = _inputs(M, K, N, device, dtype, False)
    contenders = {
        BASELINE: lambda: F.gelu(F.linear(x, w, b), approximate=approximate),
        "torch GEMMs only": lambda: F.linear(x, w),
    }
    compiled = compile_or_none(lambda x, w, b: reference.linear_gelu_fwd_ref(x, w, b, approximate, False)[0])
    if compiled is not None:
        contenders["torch.compile(reference)"] = lambda: compiled(x, w, b)
    for be in bench_backends("linear_gelu", device):
        contenders[f"fastlm:{be}"] = functools.partial(_with_backend, be,
                                                       lambda: ops.linear_gelu(x, w, b, approximate))
    impls = {label: functools.partial(_no_grad, f) for label, f in contenders.items()}

    def check():
        oracle = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate=approximate)
        return {label: max_err(_no_grad(f), oracle) for label, f in contenders.items()
                if "compile" not in label and "GEMMs" not in label}

    return Bound(impls, flops=2 * M * K * N, check=check, baseline=BASELINE)


# CPU: the targets. GPU: GPT-2 and BERT-large FFNs from 1 to 16k tokens.
CPU_SHAPES = [(2048, 768, 3072, "tanh"), (1024, 1024, 4096, "none"), (64, 768, 3072, "tanh")]
GPU_SHAPES = [(M, K, F_, a) for M in (1, 128, 1024, 4096, 16384) for K, F_, a in ((768, 3072, "tanh"),
                                                                                  (1024, 4096, "none"))]

for devices, shapes in ((("cpu",), CPU_SHAPES), (("cuda",), GPU_SHAPES)):
    for M, K, F_, approximate in shapes:
        tag = "" if devices == ("cpu",) else " [gpu]"
        name = f"({M}, {K}->{F_}, {approximate}){tag}"
        quick = (M, K) in ((2048, 768), (4096, 768), (4096, 1024))
        params = {"M": M, "K": K, "F": F_, "approximate": approximate}
        for mode in ("fwd", "fwd+bwd"):
            register(Case("kernels", "gelu_ffn", f"gelu_ffn {mode} {name}",
                          functools.partial(_make_ffn, M, K, F_, approximate, mode), params, quick, devices))
        register(Case("kernels", "gelu_ffn", f"linear_gelu fwd {name}",
                      functools.partial(_make_linear_gelu, M, K, F_, approximate), params, quick, devices))
