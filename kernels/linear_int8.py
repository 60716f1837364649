"""Triton kernels for the weight-only int8 linear y = x @ (qweight * scale)^T + bias (fastlm.ops.linear_int8).

qweight (N, K) int8, scale (N,) fp32 per output channel, x (M, K) fp32/fp16/bf16, bias (N,)?; y (M, N)
in x's dtype. The weights are widened to fp32 in registers after the load and every product is
accumulated in fp32; the scale multiplies each finished row dot (exact math of the reference up to
the order of fp32 roundings).

- `_linear_int8_gemv_kernel` (few rows, decode): one program per BLOCK_N output features and one
  input row; it walks K in BLOCK_K steps, each a (BLOCK_N, BLOCK_K) int8 tile of the weight (read from
  memory once per row: the weight-read floor at M = 1; the rows of a small batch find it in L2) times
  the row's BLOCK_K inputs, reduced along K.
- `_linear_int8_gemm_kernel` (many rows, prefill): the tiled GEMM of Triton's matmul tutorial, one
  program per (BLOCK_M, BLOCK_N) output tile; each K step loads an x tile and an int8 weight tile,
  widens the weight to fp32 (tf32/ieee on the GPU) and accumulates with tl.dot in fp32.
Interpreter-checked (TRITON_INTERPRET=1, fp32/fp16); not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import INTERPRET, new_output, next_pow2

_FEW_ROWS = 16


@triton.jit
def _linear_int8_gemv_kernel(
    X, W, S, B, Y,                  # pointers: x (M, K), qweight (N, K) int8, scale (N,) fp32, bias (N,), y (M, N)
    stride_x_row, stride_y_row, N, K,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,          # output features per program
    BLOCK_K: tl.constexpr,          # reduction step
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(X + row * stride_x_row + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(W + cols[:, None] * K + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)       # int8 -> fp32 in registers (exact)
    y = acc * tl.load(S + cols, mask=nmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=nmask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _linear_int8_gemm_kernel(
    X, W, S, B, Y,                  # pointers as above
    stride_x_row, stride_y_row, M, N, K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,             # fp32 tl.dot in ieee precision (the interpreter; GPUs default to tf32)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(X + rows[:, None] * stride_x_row + ks[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + cols[None, :] * K + ks[:, None], mask=nmask[None, :] & kmask[:, None], other=0)
        if IEEE:
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")       # (BLOCK_K, BLOCK_N): W^T tile
        else:
            acc = tl.dot(x, w.to(tl.float32), acc)
    y = acc * tl.load(S + cols, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def linear_int8_fwd(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) with a contiguous last dim, qweight (N, K) int8 contiguous, scale (N,) fp32, bias (N,)?
    -> (M, N) in x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    y = new_output((M, N), like=x)
    if M == 0 or N == 0:
        return y
    b = bias if bias is not None else scale          # a valid pointer, unused without HAS_BIAS
    if M <= _FEW_ROWS:
        BLOCK_N = 64 if INTERPRET else 32
        BLOCK_K = min(next_pow2(K), 64 if INTERPRET else 256)
        grid = (triton.cdiv(N, BLOCK_N), M)
        _linear_int8_gemv_kernel[grid](x, qweight, scale, b, y, x.stride(0), y.stride(0), N, K,
                                       HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                       num_warps=4)
    else:
        BLOCK_M, BLOCK_N, BLOCK_K = (32, 32, 32) if INTERPRET else (64, 128, 64)
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        _linear_int8_gemm_kernel[grid](x, qweight, scale, b, y, x.stride(0), y.stride(0), M, N, K,
                                       HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                       BLOCK_K=BLOCK_K, IEEE=INTERPRET, num_warps=4, num_stages=3)
    return y
