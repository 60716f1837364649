"""Paged attention in Triton: query tokens over a block-paged KV cache (decode and chunked prefill).

Grid (T, H): program (t, h) takes query head h of token t, reads its block-table row seq_index[t] and
walks the key_lens[t] positions one cache block at a time (a [BLOCK_SIZE, BLOCK_D] tile of K and of
V per block (BLOCK_SIZE >= the block size, masked), at block id block_tables[row, j]; kv head h // (H // Hkv): GQA), with an online softmax
(running max, running sum, fp32 accumulator; every load upcast to fp32). A token with key_lens = 0
writes zeros. Caches (num_blocks, Hkv, BLOCK_SIZE, D), contiguous. No split-K: the serving batch
supplies the parallelism (T x H programs). Math: fastlm/ops/paged_attention.py (paged_attention_fwd_ref);
vLLM's paged attention (Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention",
2023) is the design this follows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import new_output, next_pow2


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Tables, Seq, Lens, O,          # q (T, H, D); caches (NB, Hkv, BS, D); tables (R, MAXB) i32
    stride_qt, stride_qh, stride_tab,       # Seq, Lens (T,) i32; out (T, H, D) contiguous
    H, HKV, GROUP, D, BS, scale,           # BS: the cache's block size (<= BLOCK_SIZE, a power of 2)
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    length = tl.load(Lens + t).to(tl.int32)
    row = tl.load(Seq + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_SIZE)
    q = tl.load(Q + t.to(tl.int64) * stride_qt + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_blocks = (length + BS - 1) // BS
    for b in range(0, n_blocks):
        blk = tl.load(Tables + row * stride_tab + b).to(tl.int64)
        pos = b * BS + offs_n
        n_ok = (offs_n < BS) & (pos < length)
        base = ((blk * HKV + kvh) * BS + offs_n.to(tl.int64)) * D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(n_ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(V + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    # l_i == 0: no key (zeros); NaN l_i (a NaN score) propagates
    out = tl.where(l_i == 0.0, 0.0, acc / tl.where(l_i == 0.0, 1.0, l_i))
    tl.store(O + (t.to(tl.int64) * H + h) * D + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


def paged_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_index: torch.Tensor, key_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, H, D) last dim contiguous; caches (NB, Hkv, BS, D) contiguous; int32 tables/seq/lens."""
    T, H, D = q.shape
    _, Hkv, BS, _ = k_cache.shape
    out = new_output((T, H, D), like=q)
    if T == 0 or H == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    _paged_attention_kernel[(T, H)](
        q, k_cache, v_cache, tables, seq_index.to(torch.int32).contiguous(), key_lens.to(torch.int32).contiguous(),
        out, q.stride(0), q.stride(1), tables.stride(0), H, Hkv, H // Hkv, D, BS, float(scale),
        BLOCK_SIZE=next_pow2(BS), BLOCK_D=max(16, next_pow2(D)),
    )
    return out
