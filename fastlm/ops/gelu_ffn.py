"""The GELU feed-forward family as torch.library ops: fastlm::linear_gelu_fwd/_bwd (Linear + bias + GELU)
and fastlm::gelu_ffn_fwd/_bwd (Linear + bias + GELU + Linear + bias), then the public functions.

The ops take rows (M, K) (the functional API flattens the leading dims), pick a backend per call
(fastlm.backends.select) and have fake impls so torch.compile(fullgraph=True) traces them. The
forwards return the output and the pre-activation `pre` (x @ W1^T + b1, in the input's dtype), which
the backward needs; it is only stored when autograd will use it (`save_pre`), else it is an empty
(0, F) tensor (a backward through such a call recomputes it). Autograd is registered on the forwards
and calls the backward ops.
"""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._checks import column_major as _column_major
from fastlm.ops._impl import bucket, eager_inference, kernel_impl, measurer

OP_LINEAR_GELU, OP_GELU_FFN = "linear_gelu", "gelu_ffn"
APPROXIMATE = ("none", "tanh")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("torch", "reference", "cpu", "cuda", "triton")
backends.register_op(OP_LINEAR_GELU, _BACKENDS, cpp_ops=("linear_gelu_fwd", "linear_gelu_bwd"))
backends.register_op(OP_GELU_FFN, _BACKENDS, cpp_ops=("gelu_ffn_fwd", "gelu_ffn_bwd"))


def _supports(x: Tensor, params: tuple[Optional[Tensor], ...]):
    """What the kernels (cpu, cuda, triton) take: fp32/fp16/bf16 inputs and parameters of one dtype,
    non-empty inner dims. The torch and reference backends take anything F.linear takes."""
    def check(backend: str) -> str | None:
        if backend == "reference" or backend == "torch":
            return None
        if x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
        if any(p is not None and p.dtype != x.dtype for p in params):
            return "weight/bias dtype differs from the input's"
        if x.shape[-1] == 0 or any(p is not None and p.numel() == 0 for p in params):
            return "an empty inner dimension"
        return None
    return check


def _impl(backend: str, name: str):
    """The function implementing `name` ("linear_gelu_fwd", ...) on `backend`."""
    return kernel_impl(backend, name, "gelu_ffn")


def _key(x: Tensor, params: tuple, approximate: str, grad: bool) -> tuple:
    """The op's part of a choice key: dtypes, layouts and sizes of the parameters, the row bucket."""
    return (x.dtype, bucket(math.prod(x.shape[:-1])), x.shape[-1], approximate, grad) + tuple(
        None if p is None else (p.dtype, tuple(p.shape), p.dim() == 2 and _column_major(p)) for p in params)


# ---- linear_gelu ----

def _run_linear_gelu_fwd(x, weight, bias, approximate, save_pre):
    backend = backends.select(OP_LINEAR_GELU, x.device, _supports(x, (weight, bias)),
                              key=_key(x, (weight, bias), approximate, save_pre))
    return tuple(_impl(backend, "linear_gelu_fwd")(x, weight, bias, approximate, save_pre))


@torch.library.custom_op("fastlm::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
                    save_pre: bool) -> tuple[Tensor, Tensor]:
    """x (M, K), weight (N, K), bias (N,)? -> (out (M, N), pre (M, N) or (0, N)); see reference."""
    return _run_linear_gelu_fwd(x, weight, bias, approximate, save_pre)


@linear_gelu_fwd.register_fake
def _(x, weight, bias, approximate, save_pre):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M if save_pre else 0, N))


@torch.library.custom_op("fastlm::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(dy: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str,
                    has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx (M, K), dweight (N, K), dbias (N,) or (0,) when has_bias is False)."""
    backend = backends.select(OP_LINEAR_GELU, x.device, _supports(x, (weight,)),
                              key=_key(x, (weight, weight if has_bias else None), approximate, True))
    dx, dw, db = _impl(backend, "linear_gelu_bwd")(dy, x, weight, pre, approximate, has_bias)
    return dx, _in_layout_of(dw, weight), db


@linear_gelu_bwd.register_fake
def _(dy, x, weight, pre, approximate, has_bias):
    return x.new_empty(x.shape), _empty_in_layout_of(weight), x.new_empty((weight.shape[0] if has_bias else 0,))


def _empty_in_layout_of(w: Tensor) -> Tensor:
    """An empty tensor shaped and laid out like the weight w (row- or column-major): weight gradients
    come back in their weight's layout, so autograd accumulates them without a copy."""
    return w.new_empty((w.shape[1], w.shape[0])).t() if _column_major(w) else w.new_empty(w.shape)


def _in_layout_of(g: Tensor, w: Tensor) -> Tensor:
    """g (a weight gradient) in w's layout; the kernels already return it so (no copy then), the
    reference backend returns row-major gradients."""
    if _column_major(w) and not _column_major(g):
        return g.t().contiguous().t()
    if not _column_major(w) and not g.is_contiguous():
        return g.contiguous()
    return g


def _dense(t: Tensor) -> Tensor:
    """Gradients can arrive expanded (stride 0, even when empty): give the kernels dense rows."""
    return t.contiguous() if t.numel() else t.new_zeros(t.shape)


def _lg_setup_context(ctx, inputs, output):
    x, weight, bias, approximate, save_pre = inputs
    ctx.approximate, ctx.has_bias = approximate, bias is not None
    ctx.save_for_backward(x, weight, bias, output[1])


def _saved_pre(x: Tensor, weight: Tensor, bias: Optional[Tensor], pre: Tensor) -> Tensor:
    """The pre-activation saved by the forward, or recomputed (x @ W^T + b in x's dtype, as the
    kernels store it) when the forward ran with save_pre=False (a direct call of the op)."""
    if pre.shape[0] == x.shape[0]:
        return pre
    return torch.nn.functional.linear(x, weight, bias)


def _lg_backward(ctx, dout, _dpre):
    x, weight, bias, pre = ctx.saved_tensors
    pre = _saved_pre(x, weight, bias, pre)
    dx, dw, db = linear_gelu_bwd(_dense(dout), x, weight, pre, ctx.approximate, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, None, None


linear_gelu_fwd.register_autograd(_lg_backward, setup_context=_lg_setup_context)


# ---- gelu_ffn ----

@torch.library.custom_op("fastlm::gelu_ffn_fwd", mutates_args=())
def gelu_ffn_fwd(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor], approximate: str, save_pre: bool) -> tuple[Tensor, Tensor]:
    """x (M, K), fc1_weight (F, K), fc1_bias (F,)?, fc2_weight (N, F), fc2_bias (N,)?
    -> (out (M, N), pre (M, F) or (0, F)); see reference."""
    return _run_gelu_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, save_pre)


def _run_gelu_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, save_pre):
    backend = backends.select(OP_GELU_FFN, x.device, _supports(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias)),
                              key=_key(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), approximate, save_pre))
    return tuple(_impl(backend, "gelu_ffn_fwd")(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, save_pre))


@gelu_ffn_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, save_pre):
    M, F, N = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M if save_pre else 0, F))


@torch.library.custom_op("fastlm::gelu_ffn_bwd", mutates_args=())
def gelu_ffn_bwd(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, pre: Tensor, approximate: str,
                 has_fc1_bias: bool, has_fc2_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias); absent biases give (0,) tensors."""
    b1 = fc1_weight[0] if has_fc1_bias else None
    b2 = fc2_weight[0] if has_fc2_bias else None
    backend = backends.select(OP_GELU_FFN, x.device, _supports(x, (fc1_weight, fc2_weight)),
                              key=_key(x, (fc1_weight, b1, fc2_weight, b2), approximate, True))
    dx, dw1, db1, dw2, db2 = _impl(backend, "gelu_ffn_bwd")(dy, x, fc1_weight, fc2_weight, pre, approximate,
                                                            has_fc1_bias, has_fc2_bias)
    return dx, _in_layout_of(dw1, fc1_weight), db1, _in_layout_of(dw2, fc2_weight), db2


@gelu_ffn_bwd.register_fake
def _(dy, x, fc1_weight, fc2_weight, pre, approximate, has_fc1_bias, has_fc2_bias):
    F, N = fc1_weight.shape[0], fc2_weight.shape[0]
    return (x.new_empty(x.shape), _empty_in_layout_of(fc1_weight), x.new_empty((F if has_fc1_bias else 0,)),
            _empty_in_layout_of(fc2_weight), x.new_empty((N if has_fc2_bias else 0,)))


def _ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, save_pre = inputs
    ctx.approximate, ctx.has_b1, ctx.has_b2 = approximate, b1 is not None, b2 is not None
    ctx.save_for_backward(x, w1, b1, w2, output[1])


def _ffn_backward(ctx, dout, _dpre):
    x, w1, b1, w2, pre = ctx.saved_tensors
    pre = _saved_pre(x, w1, b1, pre)
    dx, dw1, db1, dw2, db2 = gelu_ffn_bwd(_dense(dout), x, w1, w2, pre, ctx.approximate, ctx.has_b1, ctx.has_b2)
    return dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, None, None


gelu_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)


# ---- functional API (re-exported by fastlm.ops) ----

def _approximate(op: str, approximate) -> str:
    if not isinstance(approximate, str) or approximate not in APPROXIMATE:
        raise ValueError(f"fastlm.ops.{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate


def _weight(op: str, name: str, w, input: Tensor, in_features: int, in_name: str) -> Tensor:
    """A 2-D (out_features, in_features) weight of input's dtype and device, row-major (contiguous) or
    column-major (a .t() view of a contiguous (in, out) matrix, as GPT-2's Conv1D stores it): every
    backend takes both layouts as they are. Any other layout is made contiguous."""
    _checks.tensor(op, name, w)
    if w.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: {name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.shape[1] != in_features:
        raise ValueError(f"fastlm.ops.{op}: {name} has shape {tuple(w.shape)}, so it takes {w.shape[1]} features, "
                         f"but {in_name} has {in_features}")
    _checks.same_device(op, name, w, input)
    _checks.same_dtype(op, name, w, input)
    return w if (w.is_contiguous() or w.t().is_contiguous()) else w.contiguous()


def _bias(op: str, name: str, b, input: Tensor, n: int) -> Optional[Tensor]:
    if b is None:
        return None
    _checks.tensor(op, name, b)
    _checks.shape(op, name, b, (n,))
    _checks.same_device(op, name, b, input)
    _checks.same_dtype(op, name, b, input)
    return b.contiguous()


def _input(op: str, input) -> Tensor:
    _checks.tensor(op, "input", input)
    if input.dim() == 0:
        raise ValueError(f"fastlm.ops.{op}: input must have at least 1 dimension, got a 0-d tensor")
    return input


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """== F.gelu(F.linear(input, weight, bias), approximate=approximate), fused (bias and GELU applied in
    the GEMM's epilogue).

    input: (*, K); weight: (N, K); bias: (N,) or None; approximate: "none" (erf) or "tanh".
    fp32/fp16/bf16 (fp64 falls back to the reference). Returns (*, N) in input's dtype."""
    op = OP_LINEAR_GELU
    try:
        input = _input(op, input)
        approximate = _approximate(op, approximate)
        w = _weight(op, "weight", weight, input, input.shape[-1], "input")
        b = _bias(op, "bias", bias, input, w.shape[0])
    except (TypeError, ValueError) as e:
        return _checks.torch_or_raise(op, e, _torch_linear_gelu, input, weight, bias, approximate)
    grad = _needs_grad(input, weight, bias)
    backend = backends.select(op, input.device, _supports(input, (w, b)), key=_key(input, (w, b), approximate, grad),
                              measure=measurer(lambda i, w_, b_: linear_gelu(i, w_, b_, approximate),
                                               (input, weight, bias), grad))
    if backend == "torch":
        backends._record_last(op, backend)
        return _torch_linear_gelu(input, weight, bias, approximate)
    x = _checks.rows(input, input.shape[-1])
    if eager_inference(x, w, b):  # the kernel directly (the custom-op wrapper: autograd, torch.compile)
        out, _ = backends.run_on(op, backend, _run_linear_gelu_fwd, x, w, b, approximate, False)
    else:
        out, _ = backends.run_on(op, backend, linear_gelu_fwd, x, w, b, approximate, grad)
    return out.view(*input.shape[:-1], w.shape[0])


def _torch_linear_gelu(input, weight, bias, approximate):
    return F.gelu(F.linear(input, weight, bias), approximate=approximate)


def _torch_gelu_ffn(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate):
    return F.linear(F.gelu(F.linear(input, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)


def gelu_ffn(input: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """== F.linear(F.gelu(F.linear(input, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias):
    the transformer feed-forward block, fused.

    input: (*, K); fc1_weight: (F, K); fc1_bias: (F,) or None; fc2_weight: (N, F); fc2_bias: (N,) or None;
    approximate: "none" (erf, BERT) or "tanh" (GPT-2). fp32/fp16/bf16 (fp64 falls back to the reference).
    Returns (*, N) in input's dtype. Only the hidden pre-activation (M, F) is kept for the backward."""
    op = OP_GELU_FFN
    args = (input, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    try:
        input = _input(op, input)
        approximate = _approximate(op, approximate)
        w1 = _weight(op, "fc1_weight", fc1_weight, input, input.shape[-1], "input")
        b1 = _bias(op, "fc1_bias", fc1_bias, input, w1.shape[0])
        w2 = _weight(op, "fc2_weight", fc2_weight, input, w1.shape[0], "fc1_weight's output")
        b2 = _bias(op, "fc2_bias", fc2_bias, input, w2.shape[0])
    except (TypeError, ValueError) as e:
        return _checks.torch_or_raise(op, e, _torch_gelu_ffn, *args, approximate)
    grad = _needs_grad(*args)
    params = (w1, b1, w2, b2)
    backend = backends.select(op, input.device, _supports(input, params), key=_key(input, params, approximate, grad),
                              measure=measurer(lambda *a: gelu_ffn(*a, approximate), args, grad))
    if backend == "torch":
        backends._record_last(op, backend)
        return _torch_gelu_ffn(*args, approximate)
    x = _checks.rows(input, input.shape[-1])
    if eager_inference(x, w1, b1, w2, b2):  # the kernel directly (the wrapper: autograd, torch.compile)
        out, _ = backends.run_on(op, backend, _run_gelu_ffn_fwd, x, w1, b1, w2, b2, approximate, False)
    else:
        out, _ = backends.run_on(op, backend, gelu_ffn_fwd, x, w1, b1, w2, b2, approximate, grad)
    return out.view(*input.shape[:-1], w2.shape[0])
