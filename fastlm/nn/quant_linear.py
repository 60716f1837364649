"""Linear layers with quantized weights (fastlm.quantize puts them in place of a model's projections).

- `Int8Linear`: buffers `qweight` (out, in) int8 and `scale` (out,) fp32 per output channel, or
  (out, in / group_size) per group, and an optional `bias` in the activations' dtype;
  forward = fastlm.ops.linear_int8 (weights widened to fp32 in registers, fp32 accumulation, output in
  the input's dtype). Symmetric round-to-nearest: scale = max|w| / 127 over the channel (group),
  qweight = round(w / scale) in [-127, 127]. With activations="int8" (per-channel scales only), inputs of
  2+ rows (prefill, BERT) take fastlm.ops.linear_w8a8 instead: each row quantized to int8 too (per-row
  scale max|x| / 127), int32 GEMM (AVX-512 VNNI on CPU); 1-row calls (decode at batch 1) keep the W8A32
  linear_int8 (exact one-row VNNI kernel). The CPU kernel's packed copy of qweight (~N * K bytes) is
  built on the first such call and cached on the module (not in state_dict; rebuilt when qweight changes).
- `Bf16Linear`: weight stored as bf16 (half the bytes), computed as F.linear on the weight widened to
  the input's dtype (fastlm.ops.linear when they match).

`state_dict()` holds exactly those tensors (qweight, scale, bias / weight, bias), so a saved model loads
without re-quantizing: build the module with the same shapes (`Int8Linear(in, out, ...)`) and load.
`model.to(dtype)` casts bias but never the int8 weight or its fp32 scale.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import _ext, ops

QMAX = 127
ACTIVATIONS = (None, "int8")


def _check_group_size(where: str, group_size, in_features: int) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"{where}: group_size must be an int or None, got {type(group_size).__name__}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{where}: group_size {group_size} must be a positive divisor of in_features {in_features}")


# The scale of each row (group) is searched, not just max|w| / 127: a slightly clipped range rounds the
# bulk of the weights on a finer grid. Candidates clip * max|w| / 127, clip in a coarse grid over
# [0.5, 1] then a fine one around the best; the scale of least squared error wins (clip = 1, the
# absmax scale, is a candidate: never worse than it). MiniLM-L6 embeddings of the quality set
# (fastlm/bench/quant_quality.py), per channel: cosine min 0.9946 with absmax, 0.9954 searched.
_CLIP_COARSE = tuple(0.5 + 0.05 * i for i in range(11))          # 0.50 .. 1.00
_CLIP_FINE = tuple(0.01 * i for i in range(-4, 5))               # around the coarse best


def _best_scale(rows: Tensor, amax: Tensor) -> Tensor:
    """rows (R, L) fp32, amax (R,) > 0 -> the scale (R,) of least squared rounding + clipping error."""
    best_err = torch.full_like(amax, float("inf"))
    best_clip = torch.ones_like(amax)

    def try_clips(clips: Tensor) -> None:       # clips (C, R) or (C, 1)
        nonlocal best_err, best_clip
        for c in clips:
            s = (amax * c / QMAX)[:, None]
            e = (torch.round(rows / s).clamp_(-QMAX, QMAX).mul_(s).sub_(rows)).square_().sum(1)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_clip = torch.where(better, c.expand_as(amax), best_clip)

    try_clips(torch.tensor(_CLIP_COARSE, dtype=rows.dtype, device=rows.device)[:, None])
    fine = (best_clip[None, :] + torch.tensor(_CLIP_FINE, dtype=rows.dtype, device=rows.device)[:, None])
    try_clips(fine.clamp_(0.3, 1.0))
    return amax * best_clip / QMAX


def _check_activations(where: str, activations, group_size) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"{where}: activations must be None (W8A32) or 'int8' (W8A8), got {activations!r}")
    if activations == "int8" and group_size is not None:
        raise ValueError(f"{where}: activations='int8' needs per-channel scales (group_size=None), got "
                         f"group_size={group_size}")


def quantize_int8(weight: Tensor, group_size: Optional[int] = None, search: bool = True) -> tuple[Tensor, Tensor]:
    """weight (N, K) float -> (qweight (N, K) int8, scale (N,) fp32, or (N, K // group_size) fp32 with
    group_size). Symmetric, round to nearest even: qweight = clamp(round(w / scale), -127, 127); scale:
    search=True (default) the scale of least squared error among clipped ranges clip * max|w| / 127,
    clip in [0.5, 1] (see _best_scale); search=False max|w| / 127 (every element within scale / 2).
    A zero row (group) gets scale 1 and zeros."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"quantize_int8: weight must be a floating tensor, got {weight.dtype}")
    w = weight.detach().float()
    N, K = w.shape
    if w.device.type != "meta" and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int8: weight holds NaN or infinite values (no finite int8 scale)")
    _check_group_size("quantize_int8", group_size, K)
    if w.device.type == "cpu" and w.numel() and _ext.has_kernel("linear_int8_quantize", "CPU"):
        # the same math in C++ (one pass per candidate over a row in L1; the PyTorch loop below takes
        # ~10 s for GPT-2's head on 2 cores)
        q, scale = torch.ops.fastlm_C.linear_int8_quantize(w.contiguous(), group_size or 0, search)
        return q, scale
    L = group_size if group_size is not None else K
    rows = w.reshape(-1, L) if L else w.new_zeros(N, 0)          # (N * G, L): a row per scale
    amax = rows.abs().amax(-1) if L else w.new_zeros(N)
    scale = torch.ones_like(amax)
    nz = amax > 0
    if search and L and w.device.type != "meta" and bool(nz.any()):
        idx = nz.nonzero()[:, 0]
        chunk = max(1, (1 << 16) // L)                   # ~256 KB of fp32 temporaries: stays in L2
        for i in range(0, idx.numel(), chunk):
            j = idx[i:i + chunk]
            scale[j] = _best_scale(rows[j], amax[j])
    else:
        scale = torch.where(nz, amax / QMAX, scale)
    q = torch.round(rows / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8).view(N, K)
    scale = scale if group_size is None else scale.view(N, K // group_size)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """qweight * scale as (N, K) in dtype (the product in fp32)."""
    from fastlm.ops.linear_int8 import dequantize_int8_ref

    return dequantize_int8_ref(qweight, scale, dtype)


class Int8Linear(torch.nn.Module):
    """y = x @ (qweight * scale)^T + bias. in_features, out_features as torch.nn.Linear; group_size None
    (per output channel scales) or a divisor of in_features (per group). dtype: the bias's (and the
    activations') dtype. activations: None (W8A32: activations stay in their dtype) or "int8" (W8A8 for
    inputs of 2+ rows: fastlm.ops.linear_w8a8, per-row int8 activations, int32 accumulation; 1-row inputs
    stay W8A32; per-channel scales only). `activations` is a setting, not state: state_dict is the same."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: Optional[int] = None,
                 device=None, dtype=None, activations: Optional[str] = None) -> None:
        super().__init__()
        _check_group_size("Int8Linear", group_size, in_features)
        _check_activations("Int8Linear", activations, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = activations
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        sshape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("scale", torch.ones(sshape, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(),
                                                     device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None, group_size: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None, activations: Optional[str] = None) -> "Int8Linear":
        """Quantize weight (out, in) (bias (out,) kept, in `dtype`, default the weight's dtype)."""
        N, K = weight.shape
        dtype = dtype or (bias.dtype if bias is not None else weight.dtype)
        with torch.device("meta"):
            m = cls(K, N, bias=bias is not None, group_size=group_size, dtype=dtype, activations=activations)
        q, s = quantize_int8(weight, group_size)
        m.qweight, m.scale = q.to(weight.device), s.to(weight.device)
        if bias is not None:
            m.bias = bias.detach().to(dtype=dtype).clone()
        return m

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: Optional[int] = None,
                    activations: Optional[str] = None) -> "Int8Linear":
        return cls.from_weight(linear.weight, linear.bias, group_size, activations=activations)

    def forward(self, input: Tensor) -> Tensor:
        b = self.bias
        if b is not None and b.dtype != input.dtype:
            b = b.to(input.dtype)
        if getattr(self, "activations", None) == "int8" and input.dim() and input.numel() >= 2 * input.shape[-1] > 0:
            # 2+ rows (prefill, BERT): W8A8, the int32 GEMM; one row (decode) stays W8A32 below
            return ops.linear_w8a8(input, self.qweight, self.scale, b, packed=self.w8a8_packed())
        return ops.linear_int8(input, self.qweight, self.scale, b)

    def forward_gelu(self, input: Tensor, approximate: str = "none") -> Tensor:
        """F.gelu(self(input), approximate=approximate); with W8A8 activations on 2+ rows the GELU is
        fused into the W8A8 call (ops.linear_w8a8's activation: one call, no separate pass)."""
        if getattr(self, "activations", None) == "int8" and input.dim() and input.numel() >= 2 * input.shape[-1] > 0:
            b = self.bias
            if b is not None and b.dtype != input.dtype:
                b = b.to(input.dtype)
            return ops.linear_w8a8(input, self.qweight, self.scale, b, packed=self.w8a8_packed(),
                                   activation="tanh" if approximate == "tanh" else "erf")
        return F.gelu(self(input), approximate=approximate)

    def w8a8_packed(self) -> Optional[Tensor]:
        """The CPU W8A8 kernel's packed copy of qweight (fastlm.ops.linear_w8a8_pack), built on first use
        and kept in the module's __dict__ (not a buffer: not in state_dict, not moved by .to()); rebuilt
        when qweight is replaced or changed in place (its data pointer, version or device differ). None
        where it does not apply (not on CPU, no extension, under torch.compile: the op packs per call)."""
        q = self.qweight
        if q.device.type != "cpu" or torch.compiler.is_compiling() or type(q) is not torch.Tensor:
            return None
        key = (q.data_ptr(), q._version, tuple(q.shape))
        hit = self.__dict__.get("_w8a8_pack")
        if hit is not None and hit[0] == key:
            return hit[1]
        packed = ops.linear_w8a8_pack(q)
        self.__dict__["_w8a8_pack"] = (key, packed)
        return packed

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer computes with, (out, in) in dtype."""
        return dequantize_int8(self.qweight, self.scale, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in) in fp32 (the bias's dtype when it is floating), built on
        each access: for code that inspects a projection's `.weight` (shapes, kernel choice); the
        forward never reads it. Not a parameter or buffer: state_dict holds qweight and scale."""
        dt = self.bias.dtype if self.bias is not None and self.bias.dtype.is_floating_point else torch.float32
        return self.dequantize(dt)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a float "qweight" would be cast to int8 by copy_ (or kept as float by assign=True) without a word:
        # check the dtypes and the scale's layout first, naming the key
        q, s = state_dict.get(prefix + "qweight"), state_dict.get(prefix + "scale")
        if q is not None and q.dtype != torch.int8:
            raise TypeError(f"Int8Linear.load_state_dict: {prefix}qweight must be int8 (a quantized weight), got "
                            f"{q.dtype}; quantize the source model (fastlm.quantize) before saving it")
        if s is not None:
            if s.dtype != torch.float32:
                raise TypeError(f"Int8Linear.load_state_dict: {prefix}scale must be float32, got {s.dtype}")
            if tuple(s.shape) != tuple(self.scale.shape):
                raise ValueError(f"Int8Linear.load_state_dict: {prefix}scale has shape {tuple(s.shape)}, this layer "
                                 f"expects {tuple(self.scale.shape)} (group_size={self.group_size}): quantize the "
                                 f"model with the group_size the weights were saved with")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast floating buffers: the fp32 scale must stay fp32 (it only moves)
        self.__dict__.pop("_w8a8_pack", None)      # the packed copy follows qweight (rebuilt on use)
        scale = self._buffers.pop("scale")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(torch.empty(0, device=scale.device)) if scale.device.type != "meta" else scale
            self._buffers["scale"] = scale.to(device=moved.device) if moved.device != scale.device else scale
        return self

    def extra_repr(self) -> str:
        g = "" if self.group_size is None else f", group_size={self.group_size}"
        a = "" if getattr(self, "activations", None) is None else f", activations={self.activations!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{g}{a}")


class Bf16Linear(torch.nn.Module):
    """y = x @ weight^T + bias with weight stored in bf16 (widened to the input's dtype to compute)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(),
                                                     device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> "Bf16Linear":
        N, K = weight.shape
        dtype = dtype or (bias.dtype if bias is not None else weight.dtype)
        with torch.device("meta"):
            m = cls(K, N, bias=bias is not None, dtype=dtype)
        m.weight = weight.detach().to(torch.bfloat16).contiguous()
        if bias is not None:
            m.bias = bias.detach().to(dtype=dtype).clone()
        return m

    def forward(self, input: Tensor) -> Tensor:
        b = self.bias
        if b is not None and b.dtype != input.dtype:
            b = b.to(input.dtype)
        if input.dtype == torch.bfloat16:
            return ops.linear(input, self.weight, b)
        return ops.linear_bf16w(input, self.weight, b)

    def _apply(self, fn, recurse=True):
        weight = self._buffers.pop("weight")       # stays bf16 whatever the model's dtype
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(torch.empty(0, device=weight.device)) if weight.device.type != "meta" else weight
            self._buffers["weight"] = weight.to(device=moved.device) if moved.device != weight.device else weight
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANT_LINEARS = (Int8Linear, Bf16Linear)
