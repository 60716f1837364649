"""LayerNorm (optionally fused with a residual add) in Triton, forward and backward.

Forward, N <= MAX_FUSED_N: one program per ROWS rows (ROWS > 1 only for small N, so each program has
enough work): the [ROWS, BLOCK_N] tile is loaded once, upcast to fp32, and the mean and the variance
are taken two-pass from registers (no E[x^2] - E[x]^2 cancellation). Larger N: one program per row,
three passes over the row in BLOCK_N chunks (sum, squared deviations, normalize), the re-reads coming
from L2.
Backward: a persistent grid of G programs; program p owns rows p, p+G, ... and accumulates its
dweight/dbias in fp32 registers (or, for large N, in its own row of the partial buffer), written to a
(G, N) buffer that is summed in a second pass -- bounded memory, deterministic.
Follows the structure of Triton's tutorial 05 (layer norm), written for fastlm's op contract: see
fastlm/ops/reference.py for the math.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import new_output, next_pow2, num_programs_cap, num_warps_for

MAX_FUSED_N = 16384       # forward: the whole row lives in registers up to this many columns
MAX_FUSED_N_BWD = 8192    # backward holds x, dy, dweight, dbias per column: half as many


@triton.jit
def layer_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,   # x (M, N), residual (M, N), summed out (M, N), y out (M, N), weight (N,), bias (N,), mean (M,), rstd (M,)
    stride_x, stride_r, stride_s, stride_y,   # row strides (last dims are contiguous)
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program p normalizes rows [p*ROWS, p*ROWS + ROWS) in one [ROWS, BLOCK_N] tile."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)  # M * stride can exceed 2^31
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * stride_s + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)  # normalize exactly the rounded sum that is returned
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_fwd_looped_kernel(
    X, R, S, Y, W, B, Mean, Rstd,   # as layer_norm_fwd_kernel
    stride_x, stride_r, stride_s, stride_y,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program p normalizes row p in three passes over BLOCK_N-column chunks (N > MAX_FUSED_N)."""
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
            summed = (x + r).to(S.dtype.element_ty)
            tl.store(S + row * stride_s + cols, summed, mask=m)
            x = summed.to(tl.float32)
        acc += x
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        if HAS_RESIDUAL:
            x = tl.load(S + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean, 0.0)
        acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        if HAS_RESIDUAL:
            x = tl.load(S + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DS, DX, DW_part, DB_part,  # dy, x (normalized input), weight, mean, rstd, dsummed, dx out, (G, N) fp32 partials
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DSUMMED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program p computes dx for rows p, p+G, ... and writes its dweight/dbias partial to row p."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.where(cm, 1.0, 0.0)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, M, G):
        r64 = tl.cast(row, tl.int64)  # M * stride can exceed 2^31
        x = tl.load(X + r64 * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(cm, (x - mean) * rstd, 0.0)
        g = dy * w
        mean_g = tl.sum(g, axis=0) / N
        mean_gx = tl.sum(g * xhat, axis=0) / N
        dx = rstd * (g - mean_g - xhat * mean_gx)
        if HAS_DSUMMED:
            dx += tl.load(DS + r64 * stride_ds + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cm)
        dw += dy * xhat
        db += dy
    if HAS_WEIGHT:
        tl.store(DW_part + pid * N + cols, dw, mask=cm)
    if HAS_BIAS:
        tl.store(DB_part + pid * N + cols, db, mask=cm)


@triton.jit
def layer_norm_bwd_looped_kernel(
    DY, X, W, Mean, Rstd, DS, DX, DW_part, DB_part,  # as layer_norm_bwd_kernel
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DSUMMED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """As layer_norm_bwd_kernel for N > MAX_FUSED_N_BWD: two passes per row over BLOCK_N chunks; the
    program's dweight/dbias partial accumulates in its own row of the (G, N) buffer (zeroed)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_N)
    for row in range(pid, M, G):
        r64 = tl.cast(row, tl.int64)  # M * stride can exceed 2^31
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        sg = tl.zeros([BLOCK_N], dtype=tl.float32)
        sgx = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            cm = cols < N
            x = tl.load(X + r64 * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
            xhat = tl.where(cm, (x - mean) * rstd, 0.0)
            g = dy * w
            sg += g
            sgx += g * xhat
        mean_g = tl.sum(sg, axis=0) / N
        mean_gx = tl.sum(sgx, axis=0) / N
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            cm = cols < N
            x = tl.load(X + r64 * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
            xhat = tl.where(cm, (x - mean) * rstd, 0.0)
            dx = rstd * (dy * w - mean_g - xhat * mean_gx)
            if HAS_DSUMMED:
                dx += tl.load(DS + r64 * stride_ds + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cm)
            if HAS_WEIGHT:
                dwp = DW_part + pid * N + cols
                tl.store(dwp, tl.load(dwp, mask=cm, other=0.0) + dy * xhat, mask=cm)
            if HAS_BIAS:
                dbp = DB_part + pid * N + cols
                tl.store(dbp, tl.load(dbp, mask=cm, other=0.0) + dy, mask=cm)


def _fwd_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for the fused forward."""
    block_n = next_pow2(N)
    rows = max(1, min(16, 2048 // block_n))  # small rows: several per program, ~2K elements each
    return block_n, rows, num_warps_for(block_n * rows)


def layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float):
    """x, residual: (M, N), last dim contiguous -> (out, summed, mean, rstd) as the reference."""
    M, N = x.shape
    out = new_output((M, N), like=x)
    summed = new_output((M if residual is not None else 0, N), like=x)
    mean = new_output((M,), like=x, dtype=torch.float32)
    rstd = new_output((M,), like=x, dtype=torch.float32)
    if M == 0:
        return out, summed, mean, rstd
    r = residual if residual is not None else x
    s = summed if residual is not None else out
    flags = dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    if N <= MAX_FUSED_N:
        block_n, rows, warps = _fwd_config(N)
        layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](
            x, r, s, out, w, b, mean, rstd, x.stride(0), r.stride(0), s.stride(0), out.stride(0),
            M, N, eps, ROWS=rows, BLOCK_N=block_n, num_warps=warps, **flags)
    else:
        layer_norm_fwd_looped_kernel[(M,)](
            x, r, s, out, w, b, mean, rstd, x.stride(0), r.stride(0), s.stride(0), out.stride(0),
            N, eps, BLOCK_N=4096, num_warps=8, **flags)
    return out, summed, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, dsummed: torch.Tensor | None, has_bias: bool):
    """-> (dx, dweight, dbias) as the reference; dweight/dbias empty when not requested."""
    M, N = x.shape
    dx = new_output((M, N), like=x)
    G = max(1, min(M, num_programs_cap(x.device)))
    has_weight = weight is not None
    looped = N > MAX_FUSED_N_BWD
    alloc = torch.zeros if looped else torch.empty  # the looped kernel accumulates into its row
    dw_part = alloc((G, N) if has_weight else (1,), dtype=torch.float32, device=x.device)
    db_part = alloc((G, N) if has_bias else (1,), dtype=torch.float32, device=x.device)
    if M > 0:
        ds = dsummed if dsummed is not None else dy
        args = (dy, x, weight if has_weight else x, mean, rstd, ds, dx, dw_part, db_part,
                dy.stride(0), x.stride(0), ds.stride(0), dx.stride(0), M, N)
        flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_DSUMMED=dsummed is not None)
        if looped:
            layer_norm_bwd_looped_kernel[(G,)](*args, BLOCK_N=2048, num_warps=8, **flags)
        else:
            block_n = next_pow2(N)
            layer_norm_bwd_kernel[(G,)](*args, BLOCK_N=block_n, num_warps=num_warps_for(2 * block_n), **flags)
    elif has_weight or has_bias:
        dw_part.zero_()
        db_part.zero_()
    dweight = dw_part.sum(0).to(x.dtype) if has_weight else x.new_empty((0,))
    dbias = db_part.sum(0).to(x.dtype) if has_bias else x.new_empty((0,))
    return dx, dweight, dbias
