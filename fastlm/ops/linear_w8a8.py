"""W8A8 linear as a torch.library op: fastlm::linear_w8a8_fwd, int8 weights x int8 activations with
int32 accumulation (fastlm.quantize(weights="int8", activations="int8"): prefill and BERT GEMMs).

    a_scale[m] = max|x[m, :]| / 127,  xq = clamp(round_half_even(x / a_scale), -127, 127)   (fp32)
    y[m, n] = (float32(sum_k xq[m, k] * qweight[n, k]) * a_scale[m]) * scale[n] + bias[n]

Activations are quantized dynamically per row (symmetric); qweight (N, K) int8 with fp32 scales per
output channel (N,) only (per-group scales are rejected: one int32 dot per output needs one weight
scale). Output in the input's dtype (fp32, fp16, bf16; the quantization is computed in fp32). A zero row
gives the bias; a row holding NaN / inf gives NaN. The oracle is fastlm.ops.reference.linear_w8a8_fwd_ref
(exact in integers); the kernels match it bit for bit.

- "cpu" (csrc/cpu/linear_w8a8.cpp): AVX-512 VNNI (vpdpbusd on a packed weight) / AVX2 (vpmaddwd) /
  portable scalar, chosen at run time. The weight is packed once (`linear_w8a8_pack`, Int8Linear
  caches it); without `packed` every call packs it again (O(N K) work, a few % at 128 rows).
- "reference": the math above in PyTorch (any device).

Autograd (straight-through, as linear_int8): dx = dy @ (qweight * scale) in fp32, as if the activations
were not quantized; db = the sum of dy's rows; no gradient for qweight, scale or packed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import _ext, backends
from fastlm.ops._impl import eager_inference
from fastlm.ops.linear_int8 import dequantize_int8_ref, kernel_reason, quantized_call
from fastlm.ops.reference import linear_w8a8_fwd_ref

OP = "linear_w8a8"
# "torch": the same integer math in torch ops (reference.linear_w8a8_fwd_ref; torch has no W8A8 op) --
# what forced torch / fastlm:torch runs, and where no fastlm kernel takes the call.
backends.register_op(OP, ("torch", "reference", "cpu"), cpp_ops=("linear_w8a8_fwd", "linear_w8a8_pack"))


def _supports(x: Tensor, bias: Optional[Tensor]):
    return lambda backend: kernel_reason(backend, x, bias)


def _impl(backend: str):
    if backend == "cpu":
        return torch.ops.fastlm_C.linear_w8a8_fwd
    return linear_w8a8_fwd_ref


def _run(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor], packed: Optional[Tensor],
         activation: str = "none") -> Tensor:
    backend = backends.select(OP, x.device, _supports(x, bias))
    return _impl(backend)(x, qweight, scale, bias, packed if backend == "cpu" else None, activation)


@torch.library.custom_op("fastlm::linear_w8a8_fwd", mutates_args=())
def linear_w8a8_fwd(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor],
                    packed: Optional[Tensor]) -> Tensor:
    """x (M, K) with a contiguous last dim, qweight (N, K) int8, scale (N,) fp32, bias (N,)?, packed
    (linear_w8a8_pack(qweight))? -> (M, N) in x's dtype."""
    return _run(x, qweight, scale, bias, packed)


@linear_w8a8_fwd.register_fake
def _(x, qweight, scale, bias, packed):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scale, bias, packed = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(qweight, scale)


def _backward(ctx, dy):
    qweight, scale = ctx.saved_tensors
    dx = db = None
    if ctx.needs_input_grad[0]:                      # straight-through the activation quantization
        w = dequantize_int8_ref(qweight, scale, torch.float32)
        dx = (dy.float() @ w).to(dy.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, None, None, db, None


linear_w8a8_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_w8a8_pack(qweight: Tensor) -> Optional[Tensor]:
    """qweight (N, K) int8 -> the CPU kernel's packed weight (uint8, about N * K bytes: 16 output
    channels x 4 k blocks, then int32 column sums), to pass as `packed=` to every call with this
    qweight; None where the CPU kernel is not available (not a CPU tensor, no extension), where the
    calls pack nothing. It is a copy: re-pack after changing qweight."""
    if not isinstance(qweight, Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError("fastlm.ops.linear_w8a8_pack: qweight must be a 2-D int8 tensor")
    if qweight.device.type != "cpu" or not _ext.has_kernel("linear_w8a8_pack", "CPU"):
        return None
    return torch.ops.fastlm_C.linear_w8a8_pack(qweight.contiguous())


_ACTIVATIONS = {"none": None, "tanh": "tanh", "erf": "none"}   # activation -> F.gelu's approximate


def linear_w8a8(input: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                packed: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    """y = quant(input) @ qweight^T, dequantized: the W8A8 linear (see the module docstring for the
    exact math). ~= F.linear(input, qweight.float() * scale[:, None], bias), with each input row also
    rounded to 255 levels (per-row scale max|x| / 127).

    input: (*, K) float32/float16/bfloat16; qweight: (N, K) int8; scale: (N,) float32 per output channel
    (per-group (N, G) scales raise ValueError); bias: (N,) in input's dtype or None; packed:
    linear_w8a8_pack(qweight) or None (then each call packs the weight itself); activation: "none", or
    GELU of the output, "tanh" or "erf" form (in eager inference fused into the kernel's call, else
    F.gelu on the op's output). Returns (*, N) in input's dtype."""
    op = OP
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fastlm.ops.{op}: activation must be 'none', 'tanh' or 'erf', got {activation!r}")
    x2, q, s, b = quantized_call(op, input, qweight, scale, bias)
    if scale.dim() != 1:
        raise ValueError(f"fastlm.ops.{op}: scale must have shape ({qweight.shape[0]},) (per output channel): "
                         f"W8A8 takes no per-group scales, got {tuple(scale.shape)}; quantize with group_size=None")
    if packed is not None and (not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1):
        raise TypeError(f"fastlm.ops.{op}: packed must be linear_w8a8_pack(qweight) (a 1-D uint8 tensor) or None")
    N = qweight.shape[0]
    if eager_inference(x2, b):
        y = _run(x2, q, s, b, packed, activation)  # inference: the chosen backend directly (no custom op)
    else:
        y = linear_w8a8_fwd(x2, q, s, b, packed)
        if activation != "none":
            y = F.gelu(y, approximate=_ACTIVATIONS[activation])
    return y.view(*input.shape[:-1], N)
