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
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks, reference
from fastlm.ops._impl import bucket, kernel_impl, measurer

OP = "decode_attention"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
backends.register_op(OP, ("torch", "reference", "cpu", "cuda", "triton"), cpp_ops=("decode_attention_fwd",))


def _supports(q: Tensor, k: Tensor):
    def check(backend: str) -> str | None:
        if backend == "reference" or backend == "torch":
            return None
        if q.dtype not in _KERNEL_DTYPES:
            return f"dtype {q.dtype} (kernels take float32, float16, bfloat16)"
        if q.shape[-1] > MAX_HEAD_DIM:
            return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
        if q.shape[-1] == 0:
            return "empty head dim"
        return None
    return check


def torch_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                           scale: float) -> Tensor:
    """The "torch" backend: F.scaled_dot_product_attention over the whole cache with a length mask
    (B, 1, 1, S_max); a row with no position gives zeros (as the kernels). Not a kernel: it reads and
    copies the whole cache, so the measured auto picks it only where it is the fastest anyway."""
    B, H, D = q.shape
    S = k_cache.shape[2]
    valid = torch.arange(S, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]     # (B, S)
    # positions past a row's length are never read by the kernels: zero them here too (a NaN left
    # there would poison the row through the masked scores and the zero weights)
    keep = valid[:, None, :, None]
    k_cache, v_cache = k_cache.masked_fill(~keep, 0.0), v_cache.masked_fill(~keep, 0.0)
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=valid[:, None, None],
                                         scale=scale, enable_gqa=k_cache.shape[1] != H)[:, :, 0]
    return torch.where((cache_seqlens > 0).to(q.device)[:, None, None], out, out.new_zeros(()))


def _impl(backend: str):
    if backend == "torch":
        return torch_decode_attention
    return kernel_impl(backend, "decode_attention_fwd", "decode")


def _key(q: Tensor, k: Tensor, grad: bool) -> tuple:
    return (q.dtype, k.dtype, q.shape[0], q.shape[1], k.shape[1], bucket(k.shape[2]), q.shape[2], grad)


def _select(q: Tensor, k: Tensor, v: Tensor, lens: Tensor, scale: float, grad: bool) -> str:
    return backends.select(OP, q.device, _supports(q, k), key=_key(q, k, grad),
                           measure=measurer(lambda q_, k_, v_: decode_attention_unchecked(q_, k_, v_, lens, scale),
                                            (q, k, v), grad))


def kernel(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float):
    """(backend, fn): the kernel decode_attention runs for inference on inputs like these (q (B, H, D)
    contiguous, caches (B, Hkv, S_max, D)); fn(q, k_cache, v_cache, cache_seqlens, scale) takes such
    inputs without checks. For the native GPT-2's decode step."""
    backend = _select(q, k_cache, v_cache, cache_seqlens, scale, False)
    return backend, _impl(backend)


def _run(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    backend = backends.select(OP, q.device, _supports(q, k_cache), key=_key(q, k_cache, False))
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
    return decode_attention_unchecked(q, k, v, cache_seqlens, float(scale))


def decode_attention_unchecked(query: Tensor, key_cache: Tensor, value_cache: Tensor, cache_seqlens: Tensor,
                               scale: float) -> Tensor:
    """decode_attention for a caller that owns the cache and its lengths (the native GPT-2's decode
    step: lengths bounded by construction, shapes fixed): no argument checks and no host read of the
    lengths. query contiguous (B, H, D), caches with a contiguous last dim. Not part of fastlm.ops."""
    grad = _needs_grad(query, key_cache, value_cache)
    backend = _select(query, key_cache, value_cache, cache_seqlens, scale, grad)
    if backend == "torch":
        backends._record_last(OP, backend)
        return torch_decode_attention(query, key_cache, value_cache, cache_seqlens, float(scale))
    if _fast_path_ok() and not grad:
        # Inference: call the chosen backend directly; the custom-op wrapper (needed for autograd and
        # tracing) costs tens of microseconds per call, a visible share of a CPU decode step.
        backends._record_last(OP, backend)
        return _impl(backend)(query, key_cache, value_cache, cache_seqlens, float(scale))
    return backends.run_on(OP, backend, decode_attention_fwd, query, key_cache, value_cache, cache_seqlens,
                           float(scale))
