"""Paged attention for the serving engine: attention over a block-paged KV cache, its cache write,
and the batch-invariant linear the engine's projections run through.

Cache layout, per layer: key_cache, value_cache (num_blocks, Hkv, block_size, D). A request owns a
row of `block_tables` (int32 block ids); its token at position j sits in block
block_tables[r, j // block_size], row j % block_size. One op covers decode and chunked prefill:
query token t uses block-table row seq_index[t] and attends to positions [0, key_lens[t]). A decode
token has key_lens = its context length; a prefill chunk's token at position p has key_lens = p + 1
(causal inside the chunk, full over the request's cached prefix). The chunk's keys and values are
written to the cache first (paged_kv_write), so every key is read through the block table.

Backends ("paged_attention"): reference (the PyTorch math below), cpu (csrc/cpu/paged_attention.cpp),
cuda (csrc/cuda/paged_attention.cu: batch-invariant only up to rounding, its key split depends on the
batch shape), triton (kernels/paged_attention.py). "linear_rowwise": reference (F.linear: NOT batch
invariant) and cpu (csrc/cpu/linear_rowwise.cpp: every row with linear_fwd's one-row arithmetic). Inference ops:
no autograd. The *_ref functions belong in fastlm/ops/reference.py (owned by another helper; they
live here until moved).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._impl import kernel_impl as _kernel_impl

# ---------------------------------------------------------------- references (move to reference.py)


def paged_attention_fwd_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_index: Tensor,
                            key_lens: Tensor, scale: float) -> Tensor:
    """out[t, h] = softmax(scale * q[t, h] . K_t^T) V_t with K_t, V_t the first key_lens[t] positions of
    request seq_index[t]'s blocks, kv head h // (H // Hkv); zeros where key_lens[t] = 0. fp32 math
    (fp64 for fp64 inputs); returns q's dtype."""
    T, H, D = q.shape
    nb, Hkv, bs, _ = k_cache.shape
    G = H // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(T, H, D, dtype=acc_dtype, device=q.device)
    for t in range(T):
        L = int(key_lens[t])
        if L == 0:
            continue
        blocks = block_tables[int(seq_index[t]), : (L + bs - 1) // bs].long()
        k = k_cache[blocks].to(acc_dtype).permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L]   # (Hkv, L, D)
        v = v_cache[blocks].to(acc_dtype).permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L]
        k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)                          # (H, L, D)
        s = torch.einsum("hd,hld->hl", q[t].to(acc_dtype), k) * scale
        out[t] = torch.einsum("hl,hld->hd", s.softmax(-1), v)
    return out.to(q.dtype)


def paged_kv_write_ref(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    """k_cache[s // bs, :, s % bs] = key[t] for every slot s = slots[t] >= 0 (in place)."""
    bs = k_cache.shape[2]
    keep = slots >= 0
    s = slots[keep]
    k_cache[s // bs, :, s % bs] = key[keep].to(k_cache.dtype)
    v_cache[s // bs, :, s % bs] = value[keep].to(v_cache.dtype)


def linear_rowwise_fwd_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    y = F.linear(x, weight, bias)
    return y if activation == "none" else F.gelu(y, approximate="tanh" if activation == "tanh" else "none")


# ---------------------------------------------------------------- backend choice

OP = "paged_attention"
LINEAR_OP = "linear_rowwise"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
backends.register_op(OP, ("reference", "cpu", "cuda", "triton"), cpp_ops=("paged_attention_fwd", "paged_kv_write"))
backends.register_op(LINEAR_OP, ("reference", "cpu"), cpp_ops=("linear_rowwise_fwd",))


def kernel_impl(backend: str, name: str, triton_module: str):
    """_impl.kernel_impl, with this file's references (not yet in reference.py)."""
    if backend == "reference":
        return globals()[name + "_ref"]
    return _kernel_impl(backend, name, triton_module)


def _supports(q: Tensor):
    def check(backend: str) -> str | None:
        if backend == "reference":
            return None
        if q.dtype not in _KERNEL_DTYPES:
            return f"dtype {q.dtype} (kernels take float32, float16, bfloat16)"
        if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] == 0:
            return f"head dim {q.shape[-1]} (kernels take 1..{MAX_HEAD_DIM})"
        return None
    return check


def _int_tensor(op: str, name: str, t, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastlm.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastlm.ops.{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"fastlm.ops.{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_caches(op: str, like: Tensor, like_name: str, key_cache: Tensor, value_cache: Tensor) -> None:
    _checks.tensor(op, "key_cache", key_cache)
    _checks.tensor(op, "value_cache", value_cache)
    if key_cache.dim() != 4:
        raise ValueError(f"fastlm.ops.{op}: key_cache must be (num_blocks, Hkv, block_size, D), "
                         f"got shape {tuple(key_cache.shape)}")
    _checks.shape(op, "value_cache", value_cache, tuple(key_cache.shape))
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        _checks.same_device(op, name, t, like, like_name)
        _checks.same_dtype(op, name, t, like, like_name)
        if not t.is_contiguous():
            raise ValueError(f"fastlm.ops.{op}: {name} must be contiguous")
    if key_cache.shape[1] == 0 or key_cache.shape[2] == 0:
        raise ValueError(f"fastlm.ops.{op}: key_cache needs Hkv > 0 and block_size > 0, got {tuple(key_cache.shape)}")


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor, seq_index: Tensor,
                    key_lens: Tensor, scale: Optional[float] = None) -> Tensor:
    """Attention of T query tokens over a block-paged KV cache (decode and chunked prefill in one call).

    out[t, h] = softmax(scale * q[t, h] . K[:L]^T) V[:L], L = key_lens[t], K/V the positions of request
    seq_index[t] read through block_tables[seq_index[t]], kv head h // (H // Hkv).
    query (T, H, D); key_cache, value_cache (num_blocks, Hkv, block_size, D), H % Hkv == 0;
    block_tables (R, max_blocks) int32/int64; seq_index (T,) in [0, R); key_lens (T,) in
    [0, max_blocks * block_size] (0 gives zeros); every block a token reads must be in [0, num_blocks).
    scale defaults to 1/sqrt(D). Returns (T, H, D) in query's dtype. The per-token arithmetic does not
    depend on the other tokens of the call (cpu backend: bit for bit)."""
    op = OP
    _checks.tensor(op, "query", query)
    if query.dim() != 3:
        raise ValueError(f"fastlm.ops.{op}: query must be (T, H, D), got shape {tuple(query.shape)}")
    _check_caches(op, query, "query", key_cache, value_cache)
    _int_tensor(op, "block_tables", block_tables, 2)
    _int_tensor(op, "seq_index", seq_index, 1)
    _int_tensor(op, "key_lens", key_lens, 1)
    T, H, D = query.shape
    nb, Hkv, bs, Dk = key_cache.shape
    if Dk != D:
        raise ValueError(f"fastlm.ops.{op}: key_cache has head dim {Dk} but query has {D}")
    if H % Hkv != 0:
        raise ValueError(f"fastlm.ops.{op}: query heads ({H}) must be a multiple of key_cache heads ({Hkv})")
    for name, t in (("seq_index", seq_index), ("key_lens", key_lens)):
        if t.shape[0] != T:
            raise ValueError(f"fastlm.ops.{op}: {name} must have shape ({T},), got {tuple(t.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_index", seq_index), ("key_lens", key_lens)):
        _checks.same_device(op, name, t, query, "query")
    R, max_blocks = block_tables.shape
    if T > 0:
        if int(seq_index.min()) < 0 or int(seq_index.max()) >= R:
            raise ValueError(f"fastlm.ops.{op}: seq_index holds values outside [0, {R})")
        lo, hi = int(key_lens.min()), int(key_lens.max())
        if lo < 0 or hi > max_blocks * bs:
            raise ValueError(f"fastlm.ops.{op}: key_lens holds {lo if lo < 0 else hi}, outside "
                             f"[0, {max_blocks * bs}] (block_tables holds {max_blocks} blocks of {bs})")
        used = torch.arange(max_blocks, device=query.device)[None, :] * bs < key_lens.long()[:, None]
        ids = block_tables.long()[seq_index.long()][used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= nb):
            raise ValueError(f"fastlm.ops.{op}: block_tables holds block ids outside [0, {nb}) "
                             f"in the blocks the queries read")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    return paged_attention_unchecked(query, key_cache, value_cache, block_tables, seq_index, key_lens, float(scale))


def paged_attention_unchecked(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                              seq_index: Tensor, key_lens: Tensor, scale: float) -> Tensor:
    """paged_attention for a caller that built its block tables itself (the engine): no host-side
    value checks (the cpu kernel still checks every block it reads; the cuda kernel never reads a bad
    one and gives NaN instead)."""
    backend = backends.select(OP, query.device, _supports(query))
    q = query if query.stride(-1) == 1 or query.shape[-1] <= 1 else query.contiguous()
    if backend != "reference":
        block_tables, seq_index, key_lens = (t.to(torch.int32).contiguous() for t in (block_tables, seq_index, key_lens))
    return kernel_impl(backend, "paged_attention_fwd", "paged_attention")(
        q, key_cache, value_cache, block_tables, seq_index, key_lens, float(scale))


def paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: Optional[float] = None) -> Tensor:
    """One query token per request: query (B, H, D) attends to the first context_lens[b] positions of
    block_tables[b] (B, max_blocks). Returns (B, H, D)."""
    _int_tensor("paged_decode_attention", "context_lens", context_lens, 1)
    B = query.shape[0] if isinstance(query, Tensor) and query.dim() > 0 else 0
    seq = torch.arange(B, dtype=torch.int32, device=context_lens.device)
    return paged_attention(query, key_cache, value_cache, block_tables, seq, context_lens, scale)


def paged_prefill_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                            query_start_loc: Tensor, context_lens: Tensor, scale: Optional[float] = None) -> Tensor:
    """A chunk of new tokens per request against its cached blocks (already holding the chunk):
    request r's queries are rows [query_start_loc[r], query_start_loc[r+1]) of query (T, H, D), the
    last n_r of its context_lens[r] positions; each attends causally (to positions <= its own).
    query_start_loc (R + 1,) nondecreasing from 0 to T; context_lens (R,) >= n_r. Returns (T, H, D)."""
    op = "paged_prefill_attention"
    _int_tensor(op, "query_start_loc", query_start_loc, 1)
    _int_tensor(op, "context_lens", context_lens, 1)
    R = context_lens.shape[0]
    if query_start_loc.shape[0] != R + 1:
        raise ValueError(f"fastlm.ops.{op}: query_start_loc must have shape ({R + 1},), got "
                         f"{tuple(query_start_loc.shape)}")
    qsl = query_start_loc.long().cpu()
    n = qsl[1:] - qsl[:-1]
    T = query.shape[0] if isinstance(query, Tensor) and query.dim() > 0 else 0
    if R and (int(qsl[0]) != 0 or int(qsl[-1]) != T or bool((n < 0).any())):
        raise ValueError(f"fastlm.ops.{op}: query_start_loc must rise from 0 to {T} (the query rows)")
    lens = context_lens.long().cpu()
    if bool((lens < n).any()):
        raise ValueError(f"fastlm.ops.{op}: context_lens must be >= each request's query count")
    seq = torch.repeat_interleave(torch.arange(R), n)
    # token i of request r (0-based in its chunk) sits at position lens[r] - n[r] + i: keys up to it
    within = torch.arange(T) - torch.repeat_interleave(qsl[:-1], n)
    key_lens = torch.repeat_interleave(lens - n, n) + within + 1
    dev = query.device if isinstance(query, Tensor) else "cpu"
    return paged_attention(query, key_cache, value_cache, block_tables, seq.to(dev, torch.int32),
                           key_lens.to(dev, torch.int32), scale)


def paged_kv_write(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    """The cache write, in place: key_cache[s // bs, :, s % bs] = key[t] (and value) for s = slot_mapping[t];
    s = -1 skips a row. key, value (T, Hkv, D) in the caches' dtype; slot_mapping (T,) int64 in
    [-1, num_blocks * block_size)."""
    op = "paged_kv_write"
    _checks.tensor(op, "key", key)
    _checks.tensor(op, "value", value)
    if key.dim() != 3:
        raise ValueError(f"fastlm.ops.{op}: key must be (T, Hkv, D), got shape {tuple(key.shape)}")
    _checks.shape(op, "value", value, tuple(key.shape))
    _checks.same_dtype(op, "value", value, key, "key")
    _check_caches(op, key, "key", key_cache, value_cache)
    _int_tensor(op, "slot_mapping", slot_mapping, 1)
    T, Hkv, D = key.shape
    if slot_mapping.shape[0] != T:
        raise ValueError(f"fastlm.ops.{op}: slot_mapping must have shape ({T},), got {tuple(slot_mapping.shape)}")
    if (key_cache.shape[1], key_cache.shape[3]) != (Hkv, D):
        raise ValueError(f"fastlm.ops.{op}: key_cache {tuple(key_cache.shape)} does not hold keys of "
                         f"(Hkv, D) = ({Hkv}, {D})")
    cap = key_cache.shape[0] * key_cache.shape[2]
    if T and (int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= cap):
        raise ValueError(f"fastlm.ops.{op}: slot_mapping holds slots outside [-1, {cap})")
    paged_kv_write_unchecked(key, value, key_cache, value_cache, slot_mapping)


def paged_kv_write_unchecked(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                             slot_mapping: Tensor) -> None:
    backend = backends.select(OP, key.device, _supports(key))
    if backend in ("cpu", "cuda"):
        torch.ops.fastlm_C.paged_kv_write(key, value, key_cache, value_cache, slot_mapping.long().contiguous())
    else:  # reference; triton: the write is a plain scatter
        paged_kv_write_ref(key, value, key_cache, value_cache, slot_mapping.long())


def _linear_supports(x: Tensor):
    def check(backend: str) -> str | None:
        if backend != "reference" and x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype}"
        return None
    return check


def linear_rowwise_pack(weight: Tensor) -> Optional[Tensor]:
    """weight (N, K) -> its copy in the layout of the cpu backend's many-row kernel (fp32 panels of
    64 columns; about weight's size in fp32), for linear_rowwise(..., packed=): a caller that keeps
    it skips the per-call packing and gets the kernel's GEMM speed at any row count. None where the
    cpu backend has no such kernel (not a CPU tensor, no C++ ops, or a CPU without AVX-512)."""
    _checks.tensor(LINEAR_OP, "weight", weight)
    if weight.device.type != "cpu" or weight.dtype not in _KERNEL_DTYPES or weight.dim() != 2:
        return None
    if "cpu" not in backends.available_backends(LINEAR_OP):
        return None
    packed = torch.ops.fastlm_C.linear_rowwise_pack(weight)
    return packed if packed.numel() else None


def linear_rowwise(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
                   packed: Optional[Tensor] = None) -> Tensor:
    """Batch-invariant act(input @ weight^T + bias): on the cpu backend every row is computed with the
    arithmetic ops.linear uses for a single row, so a row's result does not depend on the other rows.
    input (M, K) (last dim contiguous), weight (N, K), bias (N,) or None; activation "none", or GELU
    "tanh" / "erf"; packed: linear_rowwise_pack(weight) or None (the same values, faster: see there).
    Returns (M, N). (Belongs in fastlm/ops/linear.py; here until moved.)"""
    op = LINEAR_OP
    _checks.input_and_weight(op, input, weight)
    if activation not in ("none", "tanh", "erf"):
        raise ValueError(f"fastlm.ops.{op}: activation must be 'none', 'tanh' or 'erf', got {activation!r}")
    if input.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: input must be 2-D (rows, in_features), got {tuple(input.shape)}")
    if bias is not None:
        _checks.shape(op, "bias", bias, (weight.shape[0],))
        _checks.same_dtype(op, "bias", bias, input)
    backend = backends.select(op, input.device, _linear_supports(input))
    x = input if input.stride(-1) == 1 else input.contiguous()
    if backend == "cpu":
        return kernel_impl(backend, "linear_rowwise_fwd", "")(x, weight, bias, activation, packed)
    return kernel_impl(backend, "linear_rowwise_fwd", "")(x, weight, bias, activation)
