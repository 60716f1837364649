"""The LayerNorm family as torch.library ops: fastlm::layer_norm_fwd / fastlm::layer_norm_bwd.

Both take rows (M, N) (the functional API in fastlm.ops flattens the leading dims), pick a backend per
call (fastlm.backends.select), and have fake impls so torch.compile(fullgraph=True) traces them.
The forward covers `layer_norm` (residual=None) and `add_layer_norm` (summed = x + residual, fused);
autograd is registered on the forward and calls the backward op.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._impl import _wide, bucket, eager_inference, kernel_impl, measurable, measurer, needs_grad

OP_LAYER_NORM, OP_ADD_LAYER_NORM = "layer_norm", "add_layer_norm"
_CPP_OPS = ("layer_norm_fwd", "layer_norm_bwd")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
for _op in (OP_LAYER_NORM, OP_ADD_LAYER_NORM):
    backends.register_op(_op, ("torch", "reference", "cpu", "cuda", "triton"), cpp_ops=_CPP_OPS)


def _supports(x: Tensor, params: tuple[Optional[Tensor], ...]):
    """What the kernels (cpu, cuda, triton) take: fp32/fp16/bf16, parameters of the input's dtype,
    at least one column. The torch and reference backends take anything F.layer_norm takes."""
    def check(backend: str) -> str | None:
        if backend == "reference" or backend == "torch":
            return None
        if x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
        if any(p is not None and p.dtype != x.dtype for p in params):
            return "weight/bias dtype differs from the input's"
        if x.shape[-1] == 0:
            return "empty normalized shape"
        return None
    return check


def _fwd_impl(backend: str):
    return kernel_impl(backend, "layer_norm_fwd", "layer_norm")


def _bwd_impl(backend: str):
    return kernel_impl(backend, "layer_norm_bwd", "layer_norm")


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N) with a contiguous last dim -> (out, summed, mean, rstd); see reference."""
    return _run_fwd(x, residual, weight, bias, eps)


def _key(x: Tensor, weight, bias, grad: bool) -> tuple:
    """The op's part of a choice key: what _supports reads, the shape bucket, grad."""
    return (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype,
            bucket(x.shape[0]), x.shape[-1], grad)


def _run_fwd(x, residual, weight, bias, eps):
    op = OP_ADD_LAYER_NORM if residual is not None else OP_LAYER_NORM
    backend = backends.select(op, x.device, _supports(x, (weight, bias)), key=_key(x, weight, bias, False))
    return tuple(_fwd_impl(backend)(x, residual, weight, bias, eps))


def _forward(x, residual, weight, bias, eps):
    """The forward op, or -- in eager inference on plain tensors -- its implementation called directly:
    the custom-op wrapper costs tens of microseconds a call, a visible share of a small LayerNorm.
    Autograd, torch.compile and tensor subclasses (fake tensors) always go through the op."""
    if eager_inference(x, residual, weight, bias):
        return _run_fwd(x, residual, weight, bias, eps)
    return layer_norm_fwd(x, residual, weight, bias, eps)


def kernel(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]):
    """(backend, fn): the forward kernel for rows like these, called directly; fn(x, residual, weight,
    bias, eps) -> (out, summed, mean, rstd) without checks, or None where the choice is torch's op
    (call the public op then). For callers that make many calls of one shape (the native GPT-2's
    decode step). The choice is measured on what such a caller runs -- the raw kernel against torch's
    add + F.layer_norm -- under its own key: at a few rows the public op's checks and dispatch (~10-20
    us) outweigh the kernel (~1-3 us), so the public op's choice would mostly time its own overhead."""
    op = OP_ADD_LAYER_NORM if residual is not None else OP_LAYER_NORM
    backend = backends.select(op, x.device, _supports(x, (weight, bias)), key=_key(x, weight, bias, False) + ("direct",),
                              measure=_direct_measurer(x, residual, weight, bias))
    return backend, (None if backend == "torch" else _fwd_impl(backend))


def _direct_measurer(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]):
    """measure(backend, upcast=False) for kernel(): the raw kernel, or torch's add + F.layer_norm (with
    upcast: on float64 copies, the oracle); returns (out,) or (out, summed). Parameters detached (no
    graph, no grad-mode switch a call): a call here is a few microseconds, and the timing should be the
    kernels', not the measuring's."""
    n = x.shape[-1]
    w, b = (None if t is None else t.detach() for t in (weight, bias))
    impls: dict = {}

    def measure(backend: str, upcast: bool = False):
        if upcast:
            i, r, w_, b_ = (_wide(t) for t in (x, residual, w, b))
            s = i if r is None else i + r
            out = F.layer_norm(s, (n,), w_, b_)
            return (out,) if r is None else (out, s)
        if backend == "torch":
            if residual is None:
                return (F.layer_norm(x, (n,), w, b),)
            s = x + residual
            return (F.layer_norm(s, (n,), w, b), s)
        fn = impls.get(backend) or impls.setdefault(backend, _fwd_impl(backend))
        out, summed, _, _ = fn(x, residual, w, b, 1e-5)
        return (out,) if residual is None else (out, summed)
    measure.measurable = measurable(x, residual, weight, bias)
    return measure


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    M, N = x.shape
    stat = torch.promote_types(x.dtype, torch.float32)
    return (x.new_empty((M, N)), x.new_empty((M if residual is not None else 0, N)),
            x.new_empty((M,), dtype=stat), x.new_empty((M,), dtype=stat))


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   dsummed: Optional[Tensor], has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias); dweight/dbias are empty (0,) when weight is None / has_bias is False."""
    op = OP_ADD_LAYER_NORM if dsummed is not None else OP_LAYER_NORM
    backend = backends.select(op, x.device, _supports(x, (weight,)), key=_key(x, weight, weight if has_bias else None,
                                                                          True))
    return tuple(_bwd_impl(backend)(dy, x, weight, mean, rstd, dsummed, has_bias))


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dsummed, has_bias):
    N = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((N if weight is not None else 0,)),
            x.new_empty((N if has_bias else 0,)))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    out, summed, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(summed if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dout, dsummed, _dmean, _drstd):
    xn, weight, mean, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(xn)
    dout = dout.contiguous()
    if ctx.has_residual and dsummed is not None:
        dsummed = dsummed.contiguous()
    else:
        dsummed = None
    dx, dw, db = layer_norm_bwd(dout, xn, weight, mean, rstd, dsummed, ctx.has_bias)
    return (dx, dx if ctx.has_residual else None, dw if weight is not None else None,
            db if ctx.has_bias else None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- functional API (re-exported by fastlm.ops) ----

_Shape = Union[int, Sequence[int], torch.Size]


def _ln_args(op: str, input, normalized_shape: _Shape, weight, bias) -> tuple[int, Optional[Tensor], Optional[Tensor]]:
    _checks.tensor(op, "input", input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if (len(normalized_shape) == 1 and input.dim() > 0 and normalized_shape[0] == input.shape[-1]
            and _plain_vector(weight, input) and _plain_vector(bias, input)):
        return input.shape[-1], weight, bias      # the common call: 1-D weight and bias of the last dim
    try:
        normalized_shape = tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"fastlm.ops.{op}: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None
    k = len(normalized_shape)
    if k == 0 or k > input.dim() or tuple(input.shape[-k:]) != normalized_shape:
        raise ValueError(f"fastlm.ops.{op}: normalized_shape {list(normalized_shape)} does not match the "
                         f"trailing dims of input of shape {list(input.shape)}")
    n = 1
    for s in normalized_shape:
        n *= s
    flat = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            flat.append(None)
            continue
        _checks.tensor(op, name, p)
        _checks.shape(op, name, p, normalized_shape)
        _checks.same_device(op, name, p, input)
        flat.append(p.reshape(n) if p.is_contiguous() else p.contiguous().reshape(n))
    return n, flat[0], flat[1]


def _plain_vector(p, input: Tensor) -> bool:
    """p is None, or a 1-D tensor of input's last dim on input's device (checks pass as they are)."""
    return p is None or (isinstance(p, Tensor) and p.dim() == 1 and p.shape[0] == input.shape[-1]
                         and p.is_floating_point() and p.device == input.device)


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """== torch.nn.functional.layer_norm.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the trailing `normalized_shape` dims.
    input: (*, *normalized_shape), fp32/fp16/bf16 (fp64 falls back to the reference);
    weight, bias: normalized_shape or None. Returns input's shape and dtype. Statistics in fp32."""
    n, w, b = _ln_args("layer_norm", input, normalized_shape, weight, bias)
    x = _checks.rows(input, n)
    grad = needs_grad(input, weight, bias)
    backend = backends.select(OP_LAYER_NORM, x.device, _supports(x, (w, b)), key=_key(x, w, b, grad),
                              measure=measurer(lambda i, w_, b_: layer_norm(i, normalized_shape, w_, b_, eps),
                                               (input, weight, bias), grad))
    if backend == "torch":
        backends._record_last(OP_LAYER_NORM, backend)
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    out, _, _, _ = backends.run_on(OP_LAYER_NORM, backend, _forward, x, None, w, b, float(eps))
    return out.view(input.shape)


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Residual add fused with LayerNorm, one pass over memory.

    summed = input + residual (in input's dtype); out = F.layer_norm(summed, normalized_shape, weight,
    bias, eps). input, residual: same shape, dtype and device. Returns (out, summed)."""
    n, w, b = _ln_args("add_layer_norm", input, normalized_shape, weight, bias)
    _checks.tensor("add_layer_norm", "residual", residual)
    _checks.shape("add_layer_norm", "residual", residual, tuple(input.shape))
    _checks.same_device("add_layer_norm", "residual", residual, input)
    _checks.same_dtype("add_layer_norm", "residual", residual, input)
    x = _checks.rows(input, n)
    grad = needs_grad(input, residual, weight, bias)
    backend = backends.select(OP_ADD_LAYER_NORM, x.device, _supports(x, (w, b)), key=_key(x, w, b, grad),
                              measure=measurer(lambda i, r, w_, b_: add_layer_norm(i, r, normalized_shape, w_, b_, eps),
                                               (input, residual, weight, bias), grad))
    if backend == "torch":
        backends._record_last(OP_ADD_LAYER_NORM, backend)
        summed = input + residual
        return F.layer_norm(summed, normalized_shape, weight, bias, eps), summed
    out, summed, _, _ = backends.run_on(OP_ADD_LAYER_NORM, backend, _forward, x, _checks.rows(residual, n), w, b,
                                        float(eps))
    return out.view(input.shape), summed.view(input.shape)
