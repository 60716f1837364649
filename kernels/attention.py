"""Flash attention in Triton, forward and backward (FlashAttention-2 scheme).

Layout (fastlm.ops.attention): q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with H % Hkv == 0
(query head h reads kv head h // (H // Hkv) through its pointers: no K/V copies), last dims
contiguous; an optional additive mask (B, H, Sq, Sk) with any strides (0 where it broadcasts);
causal top-left aligned; dropout regenerated from (seed, offset) with the same Philox-4x32-10 bits
as the reference and the C++ kernels (csrc/cuda/attention_math.h).

Forward: program (query block, b * H + h) keeps a [BLOCK_M, D] Q tile and streams [BLOCK_N, D] K/V
tiles: S = Q K^T in fp32, online softmax (running max and sum, rescaled accumulator), O += P V; key
tiles past the causal diagonal are never visited. Writes O and lse = m + log(l) (B, H, Sq) fp32.
Backward, two kernels, no atomics: (1) program (key block, b * Hkv + hk) owns dK, dV of its tile and
loops over the query heads of its GQA group and their query blocks: P^T = exp(scale K Q^T + mask - lse),
dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q; (2) program (query block, b * H + h)
recomputes S and dP for its rows and accumulates dQ += dS K. delta = rowsum(dO * O) is precomputed.
Head dims that are not powers of two are padded to the next one with masked loads.
Under TRITON_INTERPRET=1 (CPU tests) tiles are upcast to fp32 after every load and one small
config is used; on GPU the dots take fp16/bf16 operands and block sizes are autotuned.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import INTERPRET, new_output, next_pow2


def _configs(bwd: bool):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if bwd:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 1)]]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 4, 1)]]


@triton.jit
def _philox_word0(c0, c1, c2, c3, k0, k1):
    """First output word of Philox-4x32-10 (uint32 tensors); see csrc/cuda/attention_math.h."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def _dropout_keep(rows, cols, bh, seed_lo, seed_hi, offset, threshold):
    """keep[i, j] for query rows `rows` (as [M, 1] or [1, M]) and key cols (broadcast shapes)."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    c0 = zero + cols.to(tl.uint32)
    c1 = zero + rows.to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    word = _philox_word0(c0, c1, c2, c3, k0, k1)
    return (word >> 8) >= threshold.to(tl.uint32)


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Measured on an H100 (triton 3.6, 2026-11-22, scripts/gpu_diag_attention.py): the 8-warp,
    BLOCK_M=128 forward configs return wrong values (max error 0.72, or NaN) and can fault when the value
    head dim pads to 32 (D=40, Dv=24); 4-warp configs are right on the same inputs. Until that is
    understood, the forward keeps 4-warp configs only when the padded value head dim is under 64 or the
    padded query and value head dims differ (D=40 with Dv=40 pads both to 64 and keeps every config)."""
    bd, bdv = kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64)
    if bdv < 64 or bd != bdv:
        kept = [c for c in configs if c.num_warps <= 4]
        return kept or configs[-1:]
    return configs


@triton.autotune(configs=_configs(False), key=["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_MASK", "KEY_PAD", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse,                     # q (B,H,Sq,D), k (B,Hkv,Sk,D), v (B,Hkv,Sk,Dv), mask (B,H,Sq,Sk), out (B,H,Sq,Dv), lse (B,H,Sq)
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,  # strides (last dims contiguous)
    smb, smh, smq, smk,                          # mask strides (0 where it broadcasts)
    H, Sq, Sk, D, Dv, GROUP,                     # GROUP = H // Hkv
    scale,                                       # softmax scale (fp32)
    seed_lo, seed_hi, rng_offset, threshold, inv_keep,  # dropout (uint32 words as ints, 24-bit threshold, 1/(1-p))
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Sq
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m_base = Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        live = True
        if KEY_PAD:  # a row-independent mask: skip key blocks it masks fully (no loads of K/V, no dots)
            kp = tl.load(m_base + offs_n.to(tl.int64) * smk, mask=n_ok, other=float("-inf")).to(tl.float32)
            live = tl.max(kp, 0) > float("-inf")
        if live:
            kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * sks + offs_d[:, None],
                         mask=n_ok[None, :] & (offs_d < D)[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # log2 domain
            if HAS_MASK:
                am = tl.load(m_base + offs_m[:, None].to(tl.int64) * smq + offs_n[None, :].to(tl.int64) * smk,
                             mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                s = s + am * 1.4426950408889634
            valid = n_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _dropout_keep(offs_m[:, None], offs_n[None, :], bh, seed_lo, seed_hi, rng_offset, threshold)
                p = tl.where(keep, p * inv_keep, 0.0)
            vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svs + offs_dv[None, :],
                         mask=n_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(p, vt.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc += tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptrs = Out + bh.to(tl.int64) * Sq * Dv + offs_m[:, None].to(tl.int64) * Dv + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & (offs_dv < Dv)[None, :])
    tl.store(Lse + bh.to(tl.int64) * Sq + offs_m, lse, mask=m_ok)


@triton.autotune(configs=_configs(True), key=["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_MASK", "KEY_PAD", "DROPOUT"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV,       # dO (B,H,Sq,Dv); lse, delta (B,H,Sq) fp32; dk, dv like k, v (contiguous)
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    smb, smh, smq, smk,
    H, Hkv, Sq, Sk, D, Dv, GROUP,
    scale,
    seed_lo, seed_hi, rng_offset, threshold, inv_keep,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Sk
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None].to(tl.int64) * svs + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = scale * 1.4426950408889634
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # rows i >= first key of the tile
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        m_base = Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh
        hi_m = Sq
        if KEY_PAD:  # key block fully masked for this head: dK = dV = 0 from it, no query loop
            kp = tl.load(m_base + offs_n.to(tl.int64) * smk, mask=n_ok, other=float("-inf")).to(tl.float32)
            hi_m = Sq * (tl.max(kp, 0) > float("-inf")).to(tl.int32)
        for start_m in range(lo, hi_m, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Sq
            qt = tl.load(q_base + offs_m[None, :].to(tl.int64) * sqs + offs_d[:, None],
                         mask=m_ok[None, :] & (offs_d < D)[:, None], other=0.0)       # [BLOCK_D, BLOCK_M]
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sds + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)     # [BLOCK_M, BLOCK_DV]
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("-inf"))
            delta = tl.load(Delta + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M], log2 domain
            if HAS_MASK:
                am = tl.load(m_base + offs_m[None, :].to(tl.int64) * smq + offs_n[:, None].to(tl.int64) * smk,
                             mask=m_ok[None, :] & n_ok[:, None], other=0.0).to(tl.float32)
                st = st + am * 1.4426950408889634
            valid = n_ok[:, None] & m_ok[None, :] & (lse != float("-inf"))[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            pt = tl.where(valid, tl.math.exp2(st - lse2[None, :]), 0.0)
            if UPCAST:
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            else:
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC).to(tl.float32)
            if DROPOUT:
                keep = _dropout_keep(offs_m[None, :], offs_n[:, None], bh, seed_lo, seed_hi, rng_offset, threshold)
                pdt = tl.where(keep, pt * inv_keep, 0.0)
                dpt = tl.where(keep, dpt * inv_keep, 0.0)
            else:
                pdt = pt
            dst = pt * (dpt - delta[None, :])
            if UPCAST:
                dv += tl.dot(pdt, do, input_precision=DOT_PREC)
                dk += tl.dot(dst, tl.trans(qt), input_precision=DOT_PREC)
            else:
                dv += tl.dot(pdt.to(do.dtype), do, input_precision=DOT_PREC)
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    dk = dk * scale
    out_k = DK + bhk.to(tl.int64) * Sk * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    out_v = DV + bhk.to(tl.int64) * Sk * Dv + offs_n[:, None].to(tl.int64) * Dv + offs_dv[None, :]
    tl.store(out_k, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d < D)[None, :])
    tl.store(out_v, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv < Dv)[None, :])


@triton.autotune(configs=_configs(True), key=["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_MASK", "KEY_PAD", "DROPOUT"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    smb, smh, smq, smk,
    H, Sq, Sk, D, Dv, GROUP,
    scale,
    seed_lo, seed_hi, rng_offset, threshold, inv_keep,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Sq
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqs + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None].to(tl.int64) * sds + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("-inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    row_live = lse != float("-inf")
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m_base = Mask + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        live = True
        if KEY_PAD:
            kp = tl.load(m_base + offs_n.to(tl.int64) * smk, mask=n_ok, other=float("-inf")).to(tl.float32)
            live = tl.max(kp, 0) > float("-inf")
        if live:
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)           # [BLOCK_N, BLOCK_D]
            vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * svs + offs_dv[:, None],
                         mask=n_ok[None, :] & (offs_dv < Dv)[:, None], other=0.0)        # [BLOCK_DV, BLOCK_N]
            if UPCAST:
                k = k.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if HAS_MASK:
                am = tl.load(m_base + offs_m[:, None].to(tl.int64) * smq + offs_n[None, :].to(tl.int64) * smk,
                             mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                s = s + am * 1.4426950408889634
            valid = n_ok[None, :] & row_live[:, None]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PREC).to(tl.float32)
            if DROPOUT:
                keep = _dropout_keep(offs_m[:, None], offs_n[None, :], bh, seed_lo, seed_hi, rng_offset, threshold)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            if UPCAST:
                dq += tl.dot(ds, k, input_precision=DOT_PREC)
            else:
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + bh.to(tl.int64) * Sq * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < D)[None, :])


def _dropout_args(dropout_p: float, rng):
    if dropout_p <= 0.0:
        return (0, 0, 0, 0, 1.0), False
    seed, offset = (int(x) for x in rng.tolist())
    threshold = math.ceil(dropout_p * (1 << 24))
    return (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset & 0xFFFFFFFF, threshold, 1.0 / (1.0 - dropout_p)), True


def _mask_args(mask, like):
    """-> (pointer tensor, strides, HAS_MASK, KEY_PAD). KEY_PAD: the mask is the same for every query row
    (a (B, 1, 1, Sk) key-padding mask or any mask broadcast over Sq), so the kernels test each key block
    once and skip the blocks it masks fully."""
    if mask is None:
        return like, (0, 0, 0, 0), False, False
    smb, smh, smq, smk = mask.stride()
    if mask.shape[2] <= 1:
        smq = 0
    return mask, (smb, smh, smq, smk), True, smq == 0


def _dot_precision(q) -> str:
    """fp32 inputs get IEEE fp32 dots (Triton's default for fp32 on a GPU is TF32: ~1e-3 error, 5000x
    torch's fp32 SDPA); fp16/bf16 operands ignore it."""
    return "ieee" if q.dtype == torch.float32 or INTERPRET else "tf32"


def _blocks(D: int, Dv: int):
    return max(16, next_pow2(D)), max(16, next_pow2(Dv))


def attention_fwd(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float = 0.0, rng=None):
    """-> out (B, H, Sq, Dv) in q.dtype, lse (B, H, Sq) fp32; see fastlm.ops.reference.attention_fwd_ref."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = new_output((B, H, Sq, Dv), like=q)
    lse = new_output((B, H, Sq), like=q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    m, (smb, smh, smq, smk), has_mask, key_pad = _mask_args(mask, q)
    drop, has_drop = _dropout_args(dropout_p, rng)
    BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, m, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        smb, smh, smq, smk, H, Sq, Sk, D, Dv, H // Hkv, float(scale), *drop,
        IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask, KEY_PAD=key_pad, DROPOUT=has_drop, UPCAST=INTERPRET,
        DOT_PREC=_dot_precision(q), BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, mask, scale: float, is_causal: bool, dropout_p: float = 0.0, rng=None):
    """-> dq, dk, dv (contiguous, the inputs' shapes and dtypes); see reference.attention_bwd_ref."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = new_output((B, H, Sq, D), like=q)
    dk = new_output((B, Hkv, Sk, D), like=k)
    dv = new_output((B, Hkv, Sk, Dv), like=v)
    if B * H == 0 or (Sq == 0 and Sk == 0):
        return dq, dk, dv
    if Sq == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    m, (smb, smh, smq, smk), has_mask, key_pad = _mask_args(mask, q)
    drop, has_drop = _dropout_args(dropout_p, rng)
    BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask, KEY_PAD=key_pad, DROPOUT=has_drop, UPCAST=INTERPRET,
                 DOT_PREC=_dot_precision(q), BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    grid_kv = lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, m, dout, lse, delta, dk, dv, *strides, smb, smh, smq, smk,
                                   H, Hkv, Sq, Sk, D, Dv, H // Hkv, float(scale), *drop, **flags)
    grid_q = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, m, dout, lse, delta, dq, *strides, smb, smh, smq, smk,
                                H, Sq, Sk, D, Dv, H // Hkv, float(scale), *drop, **flags)
    return dq, dk, dv
