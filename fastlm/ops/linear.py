"""Linear as a torch.library op: fastlm::linear_fwd, == F.linear, with a CPU kernel for few rows.

A decode step multiplies one to a few rows by every weight matrix of the model: the time is reading
the weights, and the C++ CPU kernel streams each weight once at close to the memory's read bandwidth
(csrc/cpu/linear.cpp). Many rows go to BLAS (inside the same kernel); CUDA runs F.linear (cuBLAS)
through the reference backend. Autograd: dx = dy W, dW = dy^T x, db = sum(dy).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks

OP = "linear"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register_op(OP, ("reference", "cpu"), cpp_ops=("linear_fwd",))


def _supports(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    def check(backend: str) -> str | None:
        if backend == "reference":
            return None
        if x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return "weight/bias dtype differs from the input's"
        return None
    return check


def _impl(backend: str):
    if backend == "cpu":
        return torch.ops.fastlm_C.linear_fwd
    # The reference backend is F.linear itself (BLAS / cuBLAS): same math as
    # reference.linear_fwd_ref(upcast=False), which the tests use as PyTorch's own low-precision result.
    return F.linear


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    backend = backends.select(OP, x.device, _supports(x, weight, bias))
    return _impl(backend)(x, weight, bias)


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
    input's dtype. On CPU, up to 16 rows run fastlm's weight-streaming kernel (fp32 accumulation)."""
    op = OP
    _checks.tensor(op, "input", input)
    _checks.tensor(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastlm.ops.{op}: input's last dim must be weight's in_features {weight.shape[1]}, "
                         f"got input of shape {tuple(input.shape)}")
    _checks.same_device(op, "weight", weight, input)
    _checks.same_dtype(op, "weight", weight, input)
    if bias is not None:
        _checks.tensor(op, "bias", bias)
        _checks.shape(op, "bias", bias, (weight.shape[0],))
        _checks.same_device(op, "bias", bias, input)
        _checks.same_dtype(op, "bias", bias, input)
    K, N = weight.shape[1], weight.shape[0]
    x2 = _checks.rows(input, K)
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if not grad and not torch.compiler.is_compiling():
        # Inference: call the chosen backend directly, skipping the custom-op wrapper (tens of
        # microseconds a call: a visible share of a CPU decode step of ~50 linears).
        y = _run(x2, w, b)
    else:
        y = linear_fwd(x2, w, b)
    return y.view(*input.shape[:-1], N)
