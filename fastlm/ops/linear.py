"""Linear as a torch.library op: fastlm::linear_fwd, == F.linear, with a CPU kernel for few rows.

A decode step multiplies one to a few rows by every weight matrix of the model: the time is reading
the weights, and the C++ CPU kernel streams each weight once at close to the memory's read bandwidth
(csrc/cpu/linear.cpp). Many rows go to BLAS (inside the same kernel); CUDA runs F.linear (cuBLAS)
through the reference backend. Autograd: dx = dy W, dW = dy^T x, db = sum(dy).
"""
from __future__ import annotations

import os

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._impl import bucket, eager_inference, measurer, needs_grad

OP = "linear"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register_op(OP, ("torch", "reference", "cpu"), cpp_ops=("linear_fwd",))


def _supports(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    def check(backend: str) -> str | None:
        if backend == "reference" or backend == "torch":
            return None
        if x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return "weight/bias dtype differs from the input's"
        if x.shape[1] == 0:
            return "no input features"
        return None
    return check


def _impl(backend: str):
    if backend == "cpu":
        return torch.ops.fastlm_C.linear_fwd
    # The reference backend is F.linear itself (BLAS / cuBLAS): same math as
    # reference.linear_fwd_ref(upcast=False), which the tests use as PyTorch's own low-precision result.
    return F.linear


def _key(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: bool) -> tuple:
    return (x.dtype, weight.dtype, None if bias is None else bias.dtype, bucket(x.shape[0]), weight.shape[0],
            weight.shape[1], grad)


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    backend = backends.select(OP, x.device, _supports(x, weight, bias), key=_key(x, weight, bias, False))
    return _impl(backend)(x, weight, bias)


def kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    """(backend, fn): the kernel the public op runs for inference on inputs like these (x (M, K) rows,
    weight (N, K), bias), fn(x, weight, bias) -> (M, N) taking exactly such inputs without checks
    (torch.ops.fastlm_C.linear_fwd, or F.linear). For callers that make many calls of one shape
    (the native GPT-2's decode step)."""
    backend = backends.select(OP, x.device, _supports(x, weight, bias), key=_key(x, weight, bias, False),
                              measure=measurer(linear, (x, weight, bias), False))
    return backend, _impl(backend)


@torch.library.custom_op("fastlm::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) with a contiguous last dim, weight (N, K), bias (N,)? -> (M, N)."""
    return _run(x, weight, bias)


@linear_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """== torch.nn.functional.linear: y = input @ weight^T + bias.

    input: (*, K); weight: (N, K); bias: (N,) or None; same dtype and device. Returns (*, N) in
    input's dtype. On CPU, up to 16 rows run fastlm's weight-streaming kernel (fp32 accumulation).
    Inputs the kernels do not take (1-D weight, mixed dtypes, a broadcast bias, ...) go to F.linear."""
    op = OP
    try:
        _checks.input_and_weight(op, input, weight)
        if bias is not None:
            _checks.tensor(op, "bias", bias)
            _checks.shape(op, "bias", bias, (weight.shape[0],))
            _checks.same_device(op, "bias", bias, input)
            _checks.same_dtype(op, "bias", bias, input)
    except (TypeError, ValueError) as e:
        return _checks.torch_or_raise(op, e, F.linear, input, weight, bias)
    K, N = weight.shape[1], weight.shape[0]
    x2 = _checks.rows(input, K)
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    grad = needs_grad(input, weight, bias)
    backend = backends.select(op, x2.device, _supports(x2, w, b), key=_key(x2, w, b, grad),
                              measure=measurer(linear, (input, weight, bias), grad))
    if backend == "torch":
        backends._record_last(op, backend)
        return F.linear(input, weight, bias)
    if eager_inference(x2, w, b):
        # Inference: call the chosen backend directly, skipping the custom-op wrapper (tens of
        # microseconds a call: a visible share of a CPU decode step of ~50 linears).
        backends._record_last(op, backend)
        y = _impl(backend)(x2, w, b)
    else:
        y = backends.run_on(op, backend, linear_fwd, x2, w, b)
    return y.view(*input.shape[:-1], N)


# ---- dense_linear: F.linear on the fastest GEMM for many rows (not a torch.library op: a dispatch helper for
# the models' prefill and training projections, which keeps column-major weights as they are) ----

_onednn_linear_ok: Optional[bool] = None


def _onednn_linear_available() -> bool:
    global _onednn_linear_ok
    if _onednn_linear_ok is None:
        _onednn_linear_ok = bool(torch.backends.mkldnn.is_available() and os.environ.get("FASTLM_CPU_ONEDNN", "1") != "0"
                                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return _onednn_linear_ok


def _onednn_mm(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


class _OnednnLinear(torch.autograd.Function):
    """F.linear with oneDNN GEMMs forward and backward (dx = dy W, dW = dy^T x in the weight's layout,
    db = sum of dy's rows)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()             # (an expanded gradient, e.g. of a .sum(), has stride 0)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(dy, weight.t())
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            dw = _onednn_mm(x2.t(), dy2.t()).t() if _checks.column_major(weight) else _onednn_mm(dy2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def dense_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """== F.linear(input, weight, bias), weight (out, in) row- or column-major (a Conv1D weight's .t()).

    On the CPU in fp32 it runs oneDNN's matmul (torch's mkldnn linear, the GEMM the gelu_ffn CPU kernel
    uses), forward and backward: on this project's 2-core AMD EPYC it is ~2x MKL's sgemm, which F.linear
    uses (768 -> 2304 over 1024 rows: 20 ms vs 44 ms forward; the backward GEMMs likewise). Everything
    else (other dtypes and devices, CPU autocast, torch.compile, FASTLM_CPU_ONEDNN=0) is F.linear."""
    if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and input.dim() >= 2 and (bias is None or bias.dtype == torch.float32)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") and input.numel() > 0
            and _onednn_linear_available()):
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OnednnLinear.apply(input, weight, bias)
        return _onednn_mm(input, weight, bias)
    return torch.nn.functional.linear(input, weight, bias)
