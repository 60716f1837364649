"""Decode attention over a KV cache in Triton: flash-decoding (split-K) with a logsumexp merge.

Pass 1: grid (B * H, SPLITS). Program (b*H + h, s) takes query head h of row b and the s-th chunk of
its kv head's cache (kv head h // (H // Hkv): GQA), bounded by the row's length cache_seqlens[b]. It
streams the chunk in [BLOCK_N, BLOCK_D] tiles with an online softmax (running max, running sum, fp32
accumulator) and writes its normalized partial output and its logsumexp (-inf for an empty chunk).
Pass 2: grid (B * H,): out = sum_s exp(lse_s - lse) * o_s with lse = logsumexp_s(lse_s); a row of
length 0 gives zeros.
The split count comes from B*H and S_max only (no read of the lengths on the host: the step can be
captured in a CUDA graph), enough to fill the GPU at batch 1.
Reference: Dao et al., "Flash-Decoding for long-context inference" (2023); math in
fastlm/ops/reference.py (decode_attention_fwd_ref).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import INTERPRET, new_output, next_pow2


@triton.jit
def _decode_attention_split_kernel(
    Q, K, V, Lens,                          # q (B, H, D), k/v caches (B, Hkv, S_max, D), lens (B,)
    O_part, Lse_part,                       # partial out (B*H, SPLITS, D) fp32, lse (B*H, SPLITS) fp32
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, GROUP, D, CHUNK, scale,              # GROUP = H // Hkv; CHUNK = positions per split (multiple of BLOCK_N)
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    length = tl.load(Lens + b).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    # scale folded into q once; fp32 everywhere (upcast right after every load)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32) * scale
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    # loop-carried state as fp32 tensors from the start (the GPU compiler requires stable types)
    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_ok = pos < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)                    # (BLOCK_N,)
        s = tl.where(n_ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_base + pos.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), -float("inf"))
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(O_part + part * D + offs_d, out, mask=d_ok)
    tl.store(Lse_part + part, lse)


@triton.jit
def _decode_attention_merge_kernel(
    O_part, Lse_part, Out,                  # partial out (B*H, SPLITS, D) fp32, lse (B*H, SPLITS) fp32, out (B, H, D)
    D,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    lse = tl.load(Lse_part + bh * SPLITS + offs_s, mask=s_ok, other=-float("inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)                              # all chunks empty -> zeros
    w = tl.where(lse == -float("inf"), 0.0, tl.exp(lse - m_safe))              # (BLOCK_S,)
    o = tl.load(O_part + (bh * SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + bh * D + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)


def _num_splits(items: int, s_max: int, device: torch.device) -> int:
    """Chunks per (row, head): enough programs to fill the GPU (~4 per SM) at batch 1, chunks >= 128
    positions; mirrors fastlm::decode_num_splits (csrc/decode_math.h)."""
    if INTERPRET or device.type != "cuda":
        units, min_chunk = 4, 16
    else:
        units, min_chunk = 4 * torch.cuda.get_device_properties(device).multi_processor_count, 128
    want = -(-units // max(items, 1))
    cap = -(-max(s_max, 1) // min_chunk)
    return max(1, min(want, cap, 128))


def decode_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q (B, H, D) contiguous; caches (B, Hkv, S_max, D), last dim contiguous; cache_seqlens (B,) int.
    -> (B, H, D) in q's dtype."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    out = new_output((B, H, D), like=q)
    if out.numel() == 0:
        return out
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_N = 16 if INTERPRET else max(16, min(64, 8192 // BLOCK_D))
    splits = _num_splits(B * H, S, q.device)
    chunk = -(-S // splits)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    splits = -(-S // chunk)
    o_part = torch.empty((B * H, splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * H, splits), dtype=torch.float32, device=q.device)
    num_warps = 1 if INTERPRET else (4 if BLOCK_D >= 128 else 2)
    _decode_attention_split_kernel[(B * H, splits)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, H // Hkv, D, chunk, float(scale),
        SPLITS=splits, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    _decode_attention_merge_kernel[(B * H,)](
        o_part, lse_part, out, D,
        SPLITS=splits, BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=BLOCK_D, num_warps=1 if INTERPRET else 2,
    )
    return out
