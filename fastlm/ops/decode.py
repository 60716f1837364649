"""Decode attention over a KV cache as a torch.library op: fastlm::decode_attention_fwd.

One query token per row against a preallocated cache (B, Hkv, S_max, D) of which row b uses the
first cache_seqlens[b] positions (ragged batches, GQA/MQA). The kernels split the cache into chunks
processed in parallel and merge them by logsumexp (flash-decoding). Inference op: autograd
recomputes through the reference (correct, not fast), so a stray requires_grad never crashes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks, reference
from fastlm.ops._impl import kernel_impl

OP = "decode_attention"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
backends.register_op(OP, ("reference", "cpu", "cuda", "triton"), cpp_ops=("decode_attention_fwd",))


def _supports(q: Tensor, k: Tensor):
    def check(backend: str) -> str | None:
        if backend == "reference":
            return None
        if q.dtype not in _KERNEL_DTYPES:
            return f"dtype {q.dtype} (kernels take float32, float16, bfloat16)"
        if q.shape[-1] > MAX_HEAD_DIM:
            return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
        if q.shape[-1] == 0:
            return "empty head dim"
        return None
    return check


def _impl(backend: str):
    return kernel_impl(backend, "decode_attention_fwd", "decode")


def _run(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    backend = backends.select(OP, q.device, _supports(q, k_cache))
    return _impl(backend)(q, k_cache, v_cache, cache_seqlens, scale)


@torch.library.custom_op("fastlm::decode_attention_fwd", mutates_args=())
def decode_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    """q (B, H, D) contiguous; caches (B, Hkv, S_max, D), last dim contiguous; -> (B, H, D)."""
    return _run(q, k_cache, v_cache, cache_seqlens, scale)


@decode_attention_fwd.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lens, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, lens)


def _backward(ctx, dout):
    q, k, v, lens = ctx.saved_tensors
    with torch.enable_grad():
        qi, ki, vi = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = reference.decode_attention_fwd_ref(qi, ki, vi, lens, ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, (qi, ki, vi), dout)
    return dq, dk, dv, None, None


decode_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _fast_path_ok() -> bool:
    return not torch.compiler.is_compiling()


def decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, cache_seqlens: Tensor,
                     scale: Optional[float] = None) -> Tensor:
    """Attention of one new token per row over a KV cache (the decode step of generation).

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G, :L]) @ V[b, h // G, :L],  L = cache_seqlens[b],
    G = H // Hkv. query: (B, H, D); key_cache, value_cache: (B, Hkv, S_max, D), H a multiple of Hkv;
    cache_seqlens: (B,) int32/int64 with 0 <= L <= S_max (a row with L = 0 gives zeros); scale defaults
    to 1/sqrt(D). fp32/fp16/bf16 (fp64 on the reference backend); head dims up to 256 on the kernels.
    Returns (B, H, D) in query's dtype."""
    op = OP
    _checks.tensor(op, "query", query)
    _checks.tensor(op, "key_cache", key_cache)
    _checks.tensor(op, "value_cache", value_cache)
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"fastlm.ops.{op}: cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastlm.ops.{op}: cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if query.dim() != 3:
        raise ValueError(f"fastlm.ops.{op}: query must be (B, H, D), got shape {tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(f"fastlm.ops.{op}: key_cache must be (B, Hkv, S_max, D), got shape {tuple(key_cache.shape)}")
    _checks.shape(op, "value_cache", value_cache, tuple(key_cache.shape))
    B, H, D = query.shape
    Bk, Hkv, S, Dk = key_cache.shape
    if Bk != B:
        raise ValueError(f"fastlm.ops.{op}: key_cache has batch {Bk} but query has batch {B}")
    if Dk != D:
        raise ValueError(f"fastlm.ops.{op}: key_cache has head dim {Dk} but query has {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"fastlm.ops.{op}: query heads ({H}) must be a multiple of key_cache heads ({Hkv})")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"fastlm.ops.{op}: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        _checks.same_device(op, name, t, query, "query")
        _checks.same_dtype(op, name, t, query, "query")
    _checks.same_device(op, "cache_seqlens", cache_seqlens, query, "query")
    capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and B > 0:
        # one host read for both bounds (on CUDA each read is a device sync: two cost ~2x the kernel)
        lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()
        if lo < 0 or hi > S:
            bad = lo if lo < 0 else hi
            raise ValueError(f"fastlm.ops.{op}: cache_seqlens holds {bad}, outside [0, S_max={S}] "
                             f"(the caches hold {S} positions)")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    q = query if query.is_contiguous() else query.contiguous()
    k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (key_cache, value_cache))
    if _fast_path_ok() and not _needs_grad(q, k, v):
        # Inference: call the chosen backend directly; the custom-op wrapper (needed for autograd and
        # tracing) costs tens of microseconds per call, a visible share of a CPU decode step.
        return _run(q, k, v, cache_seqlens, float(scale))
    return decode_attention_fwd(q, k, v, cache_seqlens, float(scale))


def decode_attention_unchecked(query: Tensor, key_cache: Tensor, value_cache: Tensor, cache_seqlens: Tensor,
                               scale: float) -> Tensor:
    """decode_attention for a caller that owns the cache and its lengths (the native GPT-2's decode
    step: lengths bounded by construction, shapes fixed): no argument checks and no host read of the
    lengths. query contiguous (B, H, D), caches with a contiguous last dim. Not part of fastlm.ops."""
    if _fast_path_ok() and not _needs_grad(query, key_cache, value_cache):
        return _run(query, key_cache, value_cache, cache_seqlens, float(scale))
    return decode_attention_fwd(query, key_cache, value_cache, cache_seqlens, float(scale))
