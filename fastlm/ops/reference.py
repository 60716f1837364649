"""THE pure-PyTorch reference of every fastlm op, forward and backward.

One function per op and direction. Each is the test oracle (called in fp64 on CPU), the benchmark
baseline (eager and torch.compile'd), the "reference" backend and the math's documentation.
`upcast=True` (the default) computes in at least fp32 and casts the outputs back to the input dtype;
`upcast=False` does the same math in the input dtype (how a naive PyTorch implementation errs).
Shapes are the ones the kernels see: rows (M, N) for LayerNorm.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


# --------------------------------------------------------------------------------------------------
# LayerNorm (optionally on summed = x + residual)
# --------------------------------------------------------------------------------------------------

def layer_norm_fwd_ref(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                       eps: float, upcast: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N); weight, bias: (N,) or None.
    -> out (M, N) x.dtype, summed (M, N) x.dtype (x + residual; (0, N) when residual is None),
       mean (M,) fp32, rstd (M,) fp32.
    summed is rounded to x.dtype before it is normalized, as F.layer_norm(x + residual) would."""
    ct = _compute_dtype(x.dtype, upcast)
    if residual is not None:
        summed = (x.to(ct) + residual.to(ct)).to(x.dtype)
        xs = summed.to(ct)
    else:
        summed = x.new_empty((0, x.shape[-1]))
        xs = x.to(ct)
    mean = xs.mean(dim=-1)
    xc = xs - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(dim=-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    stat = torch.promote_types(ct, torch.float32)
    return y.to(x.dtype), summed, mean.to(stat), rstd.to(stat)


def layer_norm_bwd_ref(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                       dsummed: Tensor | None, has_bias: bool, upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of layer_norm_fwd_ref. x: the normalized input (M, N) (summed for add_layer_norm);
    dsummed: gradient reaching summed directly, added to dx. -> dx (M, N), dweight (N,), dbias (N,)
    in x.dtype; dweight/dbias are empty when weight is None / has_bias is False.
       xhat = (x - mean) * rstd,  g = dy * weight
       dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)"""
    ct = _compute_dtype(x.dtype, upcast)
    xhat = (x.to(ct) - mean.to(ct)[:, None]) * rstd.to(ct)[:, None]
    dyc = dy.to(ct)
    g = dyc * weight.to(ct) if weight is not None else dyc
    dx = rstd.to(ct)[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dsummed is not None:
        dx = dx + dsummed.to(ct)
    empty = x.new_empty((0,))
    dweight = (dyc * xhat).sum(0).to(x.dtype) if weight is not None else empty
    dbias = dyc.sum(0).to(x.dtype) if has_bias else empty
    return dx.to(x.dtype), dweight, dbias
