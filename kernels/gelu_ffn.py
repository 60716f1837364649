"""The GELU feed-forward in Triton: linear_gelu and gelu_ffn, forward and backward.

One tiled GEMM kernel, C[M, N] = A[M, K] @ B[K, N] (any strides, so transposed operands cost
nothing), one program per BLOCK_M x BLOCK_N tile of C in grouped order (GROUP_M row tiles share
their B column tiles while those are hot in L2; Triton tutorial 03), fp32 accumulation, with fused
epilogues:
  EPI_BIAS_GELU  C = gelu(acc + bias); the pre-activation acc + bias is stored too when the backward
                 needs it (storing spares the backward a GEMM; store vs recompute is not yet measured on
                 a GPU)
  EPI_DGELU      C = acc * gelu'(P) with P the saved pre-activation (the backward's dact = dy @ W2 turns
                 into dpre in the GEMM epilogue); gelu(P), the activation dW2 needs, is stored alongside
  EPI_NONE       C = acc (+ bias)
and, with ROWSUM_A, the row sums of A accumulated along K by the programs of the first column tile:
the bias gradient db = sum_rows(dpre) reduced alongside dW = dpre^T @ x, whose A is dpre^T.

forward  linear_gelu: act = EPI_BIAS_GELU(x @ W^T)
         gelu_ffn:    act = EPI_BIAS_GELU(x @ W1^T), out = act @ W2^T + b2
backward gelu_ffn:    dpre = EPI_DGELU(dy @ W2) (+ act = gelu(pre)), dW2 = dy^T @ act (+ db2),
                      dW1 = dpre^T @ x (+ db1), dx = dpre @ W1
         linear_gelu: dpre = dy * gelu'(pre) (elementwise kernel), dW = dpre^T @ x (+ db), dx = dpre @ W
The math is fastlm/ops/reference.py's (and csrc/fastlm_math.h's). Under TRITON_INTERPRET=1 operands
are upcast to fp32 before tl.dot (bf16/fp16 dots are broken there) and one config is used; on a GPU
the kernel is autotuned over a few tile shapes, and fp32 operands use IEEE fp32 dots (no TF32), as
torch's matmul does by default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import INTERPRET, new_output, next_pow2

EPI_NONE, EPI_BIAS_GELU, EPI_DGELU = 0, 1, 2


@triton.jit
def _tanh(u):
    # tanh from exp (no libdevice): 1 - 2 / (exp(2u) + 1) saturates correctly at both ends.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_and_grad(x, TANH: tl.constexpr):
    """gelu(x) and gelu'(x) in fp32 (formulas of csrc/fastlm_math.h)."""
    if TANH:
        x2 = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
        g = 0.5 * x * (1.0 + t)
        dg = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        g = x * cdf
        dg = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    return g, dg


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=5),
    ]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "FP32_DOT"])
@triton.jit
def gemm_epilogue_kernel(
    A, B, C,                  # A (M, K), B (K, N), C (M, N) out; any strides
    Bias,                     # (N,) bias added to acc (HAS_BIAS)
    P,                        # (M, N) pre-activation: stored (EPI_BIAS_GELU + STORE_P) or read (EPI_DGELU)
    Act,                      # (M, N) gelu(P) out (EPI_DGELU + STORE_ACT)
    RowSum,                   # (M,) out: sum over K of A's rows (ROWSUM_A), fp32
    M, N, K, M_BUCKET,        # M_BUCKET = next_pow2(M): the autotune key (M itself would retune per length)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_pm, stride_actm,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_P: tl.constexpr, STORE_ACT: tl.constexpr,
    ROWSUM_A: tl.constexpr, TANH: tl.constexpr,
    FP32_DOT: tl.constexpr,   # fp32 operands: IEEE dot (no TF32); under the interpreter every dot is fp32
    UPCAST: tl.constexpr,     # upcast operands to fp32 before tl.dot (the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program pid computes the C tile (pid_m, pid_n), walking the tiles in groups of GROUP_M rows."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)  # M * stride can exceed 2^31
    cols = offs_n.to(tl.int64)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if ROWSUM_A:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROWSUM_A:
        tl.store(RowSum + offs_m, rowsum, mask=m_ok & (pid_n == 0))
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_P:
            tl.store(P + rows[:, None] * stride_pm + cols[None, :], acc.to(P.dtype.element_ty), mask=mask)
        out = _gelu(acc, TANH)
    elif EPILOGUE == 2:
        p = tl.load(P + rows[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g, dg = _gelu_and_grad(p, TANH)
        out = acc * dg
        if STORE_ACT:
            tl.store(Act + rows[:, None] * stride_actm + cols[None, :], g.to(Act.dtype.element_ty), mask=mask)
    else:
        out = acc
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def dgelu_kernel(
    DY, P, D,                 # dy (M, N), pre (M, N), dpre (M, N) out; rows contiguous in their last dim
    M, N, stride_dy, stride_p, stride_d,
    TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dpre = dy * gelu'(pre); program (i, j) covers one BLOCK_M x BLOCK_N tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_m.to(tl.int64)
    dy = tl.load(DY + rows[:, None] * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + rows[:, None] * stride_p + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    _, dg = _gelu_and_grad(p, TANH)
    tl.store(D + rows[:, None] * stride_d + offs_n[None, :], (dy * dg).to(D.dtype.element_ty), mask=mask)


# ---- launchers: tensors in, tensors out ----

def _tanh_flag(approximate: str) -> bool:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def _gemm(a, b, c, *, bias=None, epilogue=EPI_NONE, p=None, store_p=False, act=None, rowsum=None,
          tanh=False) -> None:
    """c = epilogue(a @ b): a (M, K), b (K, N), c (M, N) preallocated; see the kernel for the rest."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    dummy = c
    p_arg = p if p is not None else dummy
    act_arg = act if act is not None else dummy
    fp32_dot = a.dtype == torch.float32 and b.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    gemm_epilogue_kernel[grid](
        a, b, c, bias if bias is not None else dummy, p_arg, act_arg, rowsum if rowsum is not None else dummy,
        M, N, K, next_pow2(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        p_arg.stride(0) if p is not None else 0, act_arg.stride(0) if act is not None else 0,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_P=store_p, STORE_ACT=act is not None,
        ROWSUM_A=rowsum is not None, TANH=tanh, FP32_DOT=fp32_dot or INTERPRET, UPCAST=INTERPRET,
    )


def _weight_grad(w):
    """The gradient of weight w in w's layout, row- or column-major (the GEMM writes C with any strides)."""
    if w.is_contiguous():
        return new_output(tuple(w.shape), like=w)
    return new_output((w.shape[1], w.shape[0]), like=w).t()


def _bias_grad(rowsum, n: int, has_bias: bool, like):
    if not has_bias:
        return like.new_empty((0,))
    return rowsum.to(like.dtype) if rowsum is not None else like.new_zeros((n,))


def linear_gelu_fwd(x, weight, bias, approximate: str, save_pre: bool):
    """x (M, K), weight (N, K), bias (N,)? -> (out (M, N), pre (M, N) or (0, N)); see reference."""
    tanh = _tanh_flag(approximate)
    M, N = x.shape[0], weight.shape[0]
    out = new_output((M, N), like=x)
    pre = new_output((M if save_pre else 0, N), like=x)
    _gemm(x, weight.t(), out, bias=bias, epilogue=EPI_BIAS_GELU, p=pre if save_pre else None, store_p=save_pre,
          tanh=tanh)
    return out, pre


def linear_gelu_bwd(dy, x, weight, pre, approximate: str, has_bias: bool):
    """-> (dx (M, K), dweight (N, K), dbias (N,) or (0,))."""
    tanh = _tanh_flag(approximate)
    M, K = x.shape
    N = weight.shape[0]
    dpre = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0:
        grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
        dgelu_kernel[grid](dy, pre, dpre, M, N, dy.stride(0), pre.stride(0), dpre.stride(0),
                           TANH=tanh, BLOCK_M=32, BLOCK_N=64)
    dx = new_output((M, K), like=x)
    dweight = _weight_grad(weight)
    rowsum = new_output((N,), like=x, dtype=torch.float32) if has_bias and M > 0 else None
    _gemm(dpre, weight, dx)
    if M > 0:
        _gemm(dpre.t(), x, dweight, rowsum=rowsum)
    else:
        dweight.zero_()
    return dx, dweight, _bias_grad(rowsum, N, has_bias, x)


def gelu_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str, save_pre: bool):
    """x (M, K), fc1_weight (F, K), fc2_weight (N, F) -> (out (M, N), pre (M, F) or (0, F))."""
    tanh = _tanh_flag(approximate)
    M, F, N = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    act = torch.empty((M, F), dtype=x.dtype, device=x.device)
    pre = new_output((M if save_pre else 0, F), like=x)
    out = new_output((M, N), like=x)
    _gemm(x, fc1_weight.t(), act, bias=fc1_bias, epilogue=EPI_BIAS_GELU, p=pre if save_pre else None,
          store_p=save_pre, tanh=tanh)
    _gemm(act, fc2_weight.t(), out, bias=fc2_bias)
    return out, pre


def gelu_ffn_bwd(dy, x, fc1_weight, fc2_weight, pre, approximate: str, has_fc1_bias: bool, has_fc2_bias: bool):
    """-> (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias); absent biases give (0,) tensors."""
    tanh = _tanh_flag(approximate)
    M, K = x.shape
    F, N = fc1_weight.shape[0], fc2_weight.shape[0]
    dpre = torch.empty((M, F), dtype=x.dtype, device=x.device)
    act = torch.empty((M, F), dtype=x.dtype, device=x.device)
    dx = new_output((M, K), like=x)
    dw1 = _weight_grad(fc1_weight)
    dw2 = _weight_grad(fc2_weight)
    if M == 0:
        dw1.zero_()
        dw2.zero_()
        return (dx, dw1, _bias_grad(None, F, has_fc1_bias, x), dw2, _bias_grad(None, N, has_fc2_bias, x))
    rs1 = new_output((F,), like=x, dtype=torch.float32) if has_fc1_bias else None
    rs2 = new_output((N,), like=x, dtype=torch.float32) if has_fc2_bias else None
    _gemm(dy, fc2_weight, dpre, epilogue=EPI_DGELU, p=pre, act=act, tanh=tanh)   # dpre, act = gelu(pre)
    _gemm(dy.t(), act, dw2, rowsum=rs2)                                           # dW2 = dy^T act, db2
    _gemm(dpre.t(), x, dw1, rowsum=rs1)                                           # dW1 = dpre^T x, db1
    _gemm(dpre, fc1_weight, dx)                                                   # dx = dpre W1
    return dx, dw1, _bias_grad(rs1, F, has_fc1_bias, x), dw2, _bias_grad(rs2, N, has_fc2_bias, x)
