"""THE pure-PyTorch reference of every fastlm op, forward and backward.

One function per op and direction. Each is the test oracle (called in fp64 on CPU), the benchmark
baseline (eager and torch.compile'd), the "reference" backend and the math's documentation.
`upcast=True` (the default) computes in at least fp32 and casts the outputs back to the input dtype;
`upcast=False` does the same math in the input dtype (how a naive PyTorch implementation errs).
Shapes are the ones the kernels see: rows (M, N) for LayerNorm.
"""
from __future__ import annotations

import math

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
    dweight = (dyc * xhat).sum(0).to(x.dtype) if weight is not None else x.new_empty((0,))
    dbias = dyc.sum(0).to(x.dtype) if has_bias else x.new_empty((0,))
    return dx.to(x.dtype), dweight, dbias


# ---- Decode attention over a KV cache, and linear (issue 5) --------------------------------------

def decode_attention_fwd_ref(query: Tensor, key_cache: Tensor, value_cache: Tensor, cache_seqlens: Tensor,
                             scale: float, upcast: bool = True) -> Tensor:
    """query (B, H, D); key_cache, value_cache (B, Hkv, S_max, D), H % Hkv == 0 (query head h reads
    kv head h // (H // Hkv)); cache_seqlens (B,) int. Row b attends to cache positions
    [0, cache_seqlens[b]): out[b, h] = softmax(scale * q . k[0:len]) @ v[0:len], (B, H, D) in
    query.dtype. A row of length 0 gives zeros."""
    B, H, D = query.shape
    Hkv, S = key_cache.shape[1], key_cache.shape[2]
    G = H // Hkv
    ct = _compute_dtype(query.dtype, upcast)
    q = query.to(ct).reshape(B, Hkv, G, D)
    scores = torch.einsum("bkgd,bksd->bkgs", q, key_cache.to(ct)) * scale            # (B, Hkv, G, S)
    valid = torch.arange(S, device=query.device)[None, :] < cache_seqlens.to(query.device).long()[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    empty = (cache_seqlens.to(query.device) == 0)[:, None, None, None]
    p = torch.where(empty, torch.zeros_like(p), p)                    # empty rows -> 0 (a NaN stays NaN)
    out = torch.einsum("bkgs,bksd->bkgd", p, value_cache.to(ct))
    return out.reshape(B, H, D).to(query.dtype)


def linear_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor | None, upcast: bool = True) -> Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> x @ weight.T + bias (M, N) in x.dtype."""
    ct = _compute_dtype(x.dtype, upcast)
    out = x.to(ct) @ weight.to(ct).t()
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)


def linear_argmax_fwd_ref(x: Tensor, weight: Tensor, upcast: bool = False) -> Tensor:
    """argmax over the N output features of x @ weight.T: x (M, K), weight (N, K) -> (M,) int64 (the
    first largest, a NaN counting as the largest, as torch.argmax). upcast=True: in fp64."""
    ct = torch.float64 if upcast else x.dtype
    return (x.to(ct) @ weight.to(ct).t()).argmax(-1)


# --------------------------------------------------------------------------------------------------
# Scaled dot-product attention (flash attention, issue 3)
# --------------------------------------------------------------------------------------------------
# Kernel-level shapes: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), H % Hkv == 0 (query
# head h reads kv head h // (H // Hkv), as torch's enable_gqa / repeat_interleave); mask: additive, a
# floating tensor broadcastable to (B, H, Sq, Sk) (the functional API turns bool masks into 0/-inf),
# or None; causal: top-left aligned like torch (query i sees keys j <= i). A row that sees no key
# (fully masked) gives zeros and lse = -inf, as torch's SDPA does.
# Dropout: keep[b, h, i, j] comes from a counter-based RNG (Philox-4x32-10, below) keyed by
# rng = (seed, offset), an int64 tensor (2,) drawn from torch's generator; every backend makes the
# same mask from the same rng, and the backward regenerates it (never stored).

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 tensors (no int64 overflow)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    return hi & _U32, lo


def philox_uint32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> Tensor:
    """First output word of Philox-4x32-10 for the counter (c0, c1, c2, c3) and key (k0, k1); int64
    tensors holding uint32 values. The C++ (csrc/cuda/attention_math.h) and Triton versions match it."""
    c0, c1, c2, c3 = (torch.as_tensor(c) & _U32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & _U32, lo1, (hi0 ^ c3 ^ k1) & _U32, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0


def attention_dropout_keep_ref(rng: Tensor, dropout_p: float, B: int, H: int, Sq: int, Sk: int,
                               device=None) -> Tensor:
    """The dropout keep mask (B, H, Sq, Sk) bool that every backend draws for rng = (seed, offset):
    counter (j, i, b * H + h, offset), key (seed & 0xffffffff, seed >> 32); an element is kept when
    the top 24 bits of the Philox word, as a uniform u in [0, 1), satisfy u >= dropout_p."""
    seed, offset = (int(x) for x in rng.tolist())
    dev = device if device is not None else rng.device
    j = torch.arange(Sk, device=dev, dtype=torch.int64).view(1, 1, Sk)
    i = torch.arange(Sq, device=dev, dtype=torch.int64).view(1, Sq, 1)
    bh = torch.arange(B * H, device=dev, dtype=torch.int64).view(B * H, 1, 1)
    u = philox_uint32(j, i, bh, torch.tensor(offset, device=dev), seed & _U32, (seed >> 32) & _U32)
    keep = (u >> 8).to(torch.float64) * (1.0 / (1 << 24)) >= dropout_p
    return keep.view(B, H, Sq, Sk)


def _attention_dtype(q: Tensor, upcast: bool) -> torch.dtype:
    """Attention's compute dtype: upcast on CPU -> fp64 (the scores q k^T reach |s| ~ 1e3 on large
    logits, where fp32 rounding of s alone costs ~1e-4 in p); upcast elsewhere -> at least fp32."""
    if upcast and q.device.type == "cpu":
        return torch.float64
    return _compute_dtype(q.dtype, upcast)


def _attention_probs(s: Tensor) -> tuple[Tensor, Tensor]:
    """Stable softmax of the scores s (..., Sk) -> (p, lse). The row max is subtracted before exp (the
    max element's exp is exactly 1) and p is normalized by its own sum, so lse's rounding at large |s|
    never reaches p. A row with no finite score (fully masked) gives p = 0 and lse = -inf."""
    m = s.amax(dim=-1, keepdim=True)
    dead = torch.isinf(m) & (m < 0)
    e = torch.exp(s - m.masked_fill(dead, 0.0))
    l = e.sum(dim=-1, keepdim=True)
    p = (e / l.masked_fill(dead, 1.0)).masked_fill(dead, 0.0)
    lse = (m + torch.log(l)).masked_fill(dead, float("-inf")).squeeze(-1)
    return p, lse


def _attention_scores(q, k, mask, scale, is_causal, ct):
    """-> scores (B, H, Sq, Sk) in ct, with k expanded over the GQA groups."""
    B, H, Sq, D = q.shape
    group = H // k.shape[1]
    kc = k.to(ct).repeat_interleave(group, dim=1) if group > 1 else k.to(ct)
    s = torch.matmul(q.to(ct), kc.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(ct)
    if is_causal:
        Sk = k.shape[2]
        causal = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    return s


def attention_fwd_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool,
                      dropout_p: float = 0.0, rng: Tensor | None = None, upcast: bool = True,
                      dropout_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """-> out (B, H, Sq, Dv) in q.dtype, lse (B, H, Sq) fp32 (fp64 for fp64 inputs): the logsumexp of
    each row of scores, -inf for a row that sees no key.
       s = scale * q k^T + mask (causal: -inf above the diagonal),  p = exp(s - lse),
       out = (p * keep / (1 - dropout_p)) @ v
    dropout_keep: the keep mask to use instead of drawing one from rng (testing hook)."""
    ct = _attention_dtype(q, upcast)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    s = _attention_scores(q, k, mask, scale, is_causal, ct)
    p, lse = _attention_probs(s)
    if dropout_p > 0.0:
        keep = dropout_keep if dropout_keep is not None else attention_dropout_keep_ref(rng, dropout_p, B, H, Sq, Sk, q.device)
        p = p * keep.to(ct) * (1.0 / (1.0 - dropout_p))
    vc = v.to(ct).repeat_interleave(group, dim=1) if group > 1 else v.to(ct)
    out = torch.matmul(p, vc)
    stat = torch.promote_types(q.dtype, torch.float32)
    return out.to(q.dtype), lse.to(stat)


def attention_bwd_ref(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      mask: Tensor | None, scale: float, is_causal: bool, dropout_p: float = 0.0,
                      rng: Tensor | None = None, upcast: bool = True,
                      dropout_keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of attention_fwd_ref. p is recomputed from the scores (as the kernels do) by the same
    stable softmax as the forward: the saved lse (fp32 for fp32 inputs) is too coarse at large logits to
    rebuild p as exp(s - lse), so it is not used for p; `out` gives delta.
    -> dq (B, H, Sq, D), dk (B, Hkv, Sk, D), dv (B, Hkv, Sk, Dv) in the inputs' dtypes.
       pd = p * keep / (1 - p_drop),  dv = pd^T dout,  dpd = dout v^T,  dp = dpd * keep / (1 - p_drop)
       delta = rowsum(dout * out),  ds = p * (dp - delta),  dq = scale ds k,  dk = scale ds^T q
    with dk, dv summed over each GQA group."""
    ct = _attention_dtype(q, upcast)
    B, H, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = H // Hkv
    s = _attention_scores(q, k, mask, scale, is_causal, ct)
    p, _ = _attention_probs(s)
    doc = dout.to(ct)
    kc = k.to(ct).repeat_interleave(group, dim=1) if group > 1 else k.to(ct)
    vc = v.to(ct).repeat_interleave(group, dim=1) if group > 1 else v.to(ct)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    if dropout_p > 0.0:
        keep = dropout_keep if dropout_keep is not None else attention_dropout_keep_ref(rng, dropout_p, B, H, Sq, Sk, q.device)
        drop = keep.to(ct) * (1.0 / (1.0 - dropout_p))
        pd = p * drop
        dp = dp * drop
    else:
        pd = p
    dv = torch.matmul(pd.transpose(-1, -2), doc)
    delta = (doc * out.to(ct)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    if group > 1:
        dk = dk.view(B, Hkv, group, Sk, -1).sum(2)
        dv = dv.view(B, Hkv, group, Sk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------------
# GELU feed-forward: linear_gelu (Linear + bias + GELU) and gelu_ffn (Linear + GELU + Linear)
# --------------------------------------------------------------------------------------------------

_GELU_APPROX = ("none", "tanh")


def gelu_ref(h: Tensor, approximate: str) -> Tensor:
    """GELU in h's dtype. "none": h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2));
    "tanh": 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))."""
    return torch.nn.functional.gelu(h, approximate=approximate)


def gelu_grad_ref(h: Tensor, approximate: str) -> Tensor:
    """d GELU(h) / dh in h's dtype.
    "none": Phi(h) + h phi(h), phi(h) = exp(-h^2/2) / sqrt(2 pi).
    "tanh": 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2), t = tanh(u)."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (h + 0.044715 * h * h * h))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * k * (1 + 3 * 0.044715 * h * h)
    return 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2.0)))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


def _linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, ct: torch.dtype) -> Tensor:
    h = x.to(ct) @ weight.to(ct).t()
    return h + bias.to(ct) if bias is not None else h


def linear_gelu_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str, save_pre: bool,
                        upcast: bool = True) -> tuple[Tensor, Tensor]:
    """x: (M, K), weight: (N, K), bias: (N,) or None.
    -> out = gelu(x @ weight^T + bias) (M, N) x.dtype, and pre = x @ weight^T + bias (M, N) x.dtype, the
    pre-activation the backward needs ((0, N) when save_pre is False)."""
    h = _linear_ref(x, weight, bias, _compute_dtype(x.dtype, upcast))
    pre = h.to(x.dtype) if save_pre else x.new_empty((0, weight.shape[0]))
    return gelu_ref(h, approximate).to(x.dtype), pre


def linear_gelu_bwd_ref(dy: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str, has_bias: bool,
                        upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of linear_gelu_fwd_ref. dy, pre: (M, N); x: (M, K); weight: (N, K).
       dpre = dy * gelu'(pre),  dx = dpre @ weight,  dweight = dpre^T @ x,  dbias = sum_rows(dpre)
    -> dx (M, K), dweight (N, K), dbias (N,) (empty (0,) when has_bias is False), all in x.dtype."""
    ct = _compute_dtype(x.dtype, upcast)
    dpre = dy.to(ct) * gelu_grad_ref(pre.to(ct), approximate)
    dx = dpre @ weight.to(ct)
    dweight = dpre.t() @ x.to(ct)
    dbias = dpre.sum(0).to(x.dtype) if has_bias else x.new_empty((0,))
    return dx.to(x.dtype), dweight.to(x.dtype), dbias


def gelu_ffn_fwd_ref(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                     fc2_bias: Tensor | None, approximate: str, save_pre: bool,
                     upcast: bool = True) -> tuple[Tensor, Tensor]:
    """x: (M, K), fc1_weight: (F, K), fc1_bias: (F,) or None, fc2_weight: (N, F), fc2_bias: (N,) or None.
    -> out = gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T + fc2_bias (M, N) x.dtype, and the hidden
    pre-activation pre (M, F) x.dtype ((0, F) when save_pre is False). upcast=True keeps the hidden
    activation unrounded; upcast=False computes everything in x.dtype, as eager PyTorch does."""
    ct = _compute_dtype(x.dtype, upcast)
    h = _linear_ref(x, fc1_weight, fc1_bias, ct)
    pre = h.to(x.dtype) if save_pre else x.new_empty((0, fc1_weight.shape[0]))
    out = _linear_ref(gelu_ref(h, approximate), fc2_weight, fc2_bias, ct)
    return out.to(x.dtype), pre


def gelu_ffn_bwd_ref(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, pre: Tensor, approximate: str,
                     has_fc1_bias: bool, has_fc2_bias: bool,
                     upcast: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of gelu_ffn_fwd_ref. dy: (M, N); pre: (M, F), the saved hidden pre-activation.
       act = gelu(pre),  dfc2_weight = dy^T @ act,  dfc2_bias = sum_rows(dy),
       dpre = (dy @ fc2_weight) * gelu'(pre),  dfc1_weight = dpre^T @ x,  dfc1_bias = sum_rows(dpre),
       dx = dpre @ fc1_weight
    -> (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias) in x.dtype; absent biases give empty (0,)."""
    ct = _compute_dtype(x.dtype, upcast)
    p, dyc = pre.to(ct), dy.to(ct)
    act = gelu_ref(p, approximate)
    dw2 = dyc.t() @ act
    db2 = dyc.sum(0).to(x.dtype) if has_fc2_bias else x.new_empty((0,))
    dpre = (dyc @ fc2_weight.to(ct)) * gelu_grad_ref(p, approximate)
    dw1 = dpre.t() @ x.to(ct)
    db1 = dpre.sum(0).to(x.dtype) if has_fc1_bias else x.new_empty((0,))
    dx = dpre @ fc1_weight.to(ct)
    return dx.to(x.dtype), dw1.to(x.dtype), db1, dw2.to(x.dtype), db2


# --------------------------------------------------------------------------------------------------
# W8A8 linear: int8 weights x int8 activations (fastlm.quantize(weights="int8", activations="int8"))
# --------------------------------------------------------------------------------------------------

def quantize_rows_int8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (xq (M, K) int8, a_scale (M,) fp32): symmetric per row, in fp32 (x widened
    first; exact for fp16/bf16).
       a_scale = max|x| / 127 (fp32 division),  xq = clamp(round_half_even(x / a_scale), -127, 127)
    (fp32 division x / a_scale, not x * (127 / max|x|): the C++ kernels divide too, so xq agrees bit
    for bit). A row whose a_scale is 0 (zeros, or max|x| / 127 underflows) gets xq = 0; a row holding
    a NaN / inf gets a_scale = NaN and xq = 0, so its outputs are NaN."""
    xf = x.float()
    M, K = xf.shape
    amax = xf.abs().amax(-1) if K else xf.new_zeros(M)
    finite = torch.isfinite(xf).all(-1)
    a_scale = torch.where(finite, amax / 127, torch.full_like(amax, float("nan")))
    ok = a_scale > 0                                         # False for 0 and NaN
    safe = torch.where(ok, a_scale, torch.ones_like(a_scale))
    xq = torch.round(xf / safe[:, None]).clamp_(-127, 127)
    xq = torch.where(ok[:, None], xq, torch.zeros_like(xq)).to(torch.int8)
    return xq, a_scale


def linear_w8a8_fwd_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                        packed: Tensor | None = None, activation: str = "none") -> Tensor:
    """x (M, K) float, qweight (N, K) int8, scale (N,) fp32 per output channel, bias (N,)? -> (M, N) in
    x's dtype; packed (the C++ kernel's packed weight) is ignored.
       xq, a_scale = quantize_rows_int8_ref(x);  acc = xq @ qweight^T (exact: integers in fp64, |acc| < 2^53)
       y = (float32(acc) * a_scale[m]) * scale[n] + bias[n]   (fp32, each op rounded; then x's dtype)
    The CPU kernel (csrc/cpu/linear_w8a8.cpp) computes acc exactly in int32 and the same epilogue, so
    its outputs are bit-identical to these. activation "tanh" / "erf": then GELU (that form) of y in
    x's dtype, computed in fp32 (the kernel's tanh form is a few ulps from torch's)."""
    xq, a_scale = quantize_rows_int8_ref(x)
    acc = xq.double() @ qweight.double().t()
    y = (acc.float() * a_scale[:, None]) * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if activation != "none":
        y = torch.nn.functional.gelu(y.float(), approximate="tanh" if activation == "tanh" else "none").to(x.dtype)
    return y
