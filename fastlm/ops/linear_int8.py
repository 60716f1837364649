"""Weight-only int8 linear as a torch.library op: fastlm::linear_int8_fwd,
== F.linear(input, qweight.float() * scale[:, None], bias).

qweight (N, K) int8 holds round(W / scale) per output channel (scale (N,) fp32) or per group of K / G
columns (scale (N, G) fp32, fastlm.quant). The kernels widen the weights to fp32 in registers and
accumulate in fp32; the output is in the input's dtype (activations are never quantized).

- "cpu" (csrc/cpu/linear_int8.cpp): few rows (decode) stream the int8 weight once (N * K bytes, a
  quarter of fp32's), AVX-512 / AVX2 / portable paths chosen at run time (one finite row with
  per-channel scales on an avx512_vnni CPU: the row split exactly into four int8 digits and dotted by
  vpdpbusd, error ~max|x| * 2^-31 per element; FASTLM_INT8_VNNI=0 turns it off); many rows widen the weight
  once into an fp32 panel and multiply on the fastest fp32 GEMM (oneDNN through
  fastlm.ops.linear.dense_linear, else BLAS).
- "triton" (kernels/linear_int8.py): a GEMV for few rows and a tiled GEMM for many, dequantizing in
  registers (interpreter-checked; not yet run on a GPU).
- "cuda" (csrc/cuda/linear_int8.cu): a GEMV for few rows (compile-checked; not yet run on a GPU).
- "reference": the math below in fp32 (fp64 for fp64 inputs).
- "torch": F.linear in the input's dtype on the weight dequantized to it (torch has no int8 linear):
  what forced torch / fastlm:torch runs, and the answer where no fastlm kernel takes the call.

Autograd: w.r.t. input (dx = dy @ W_deq) and bias (db = sum of dy's rows); the quantized weight and
its scale are constants (no gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import _ext, backends
from fastlm.ops import _checks
from fastlm.ops._impl import eager_inference


# ---- reference (to move into fastlm/ops/reference.py) ----

def dequantize_int8_ref(qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """qweight (N, K) int8, scale (N,) or (N, G) -> qweight * scale as (N, K) in `dtype` (the product
    formed in fp32, or fp64 when dtype is fp64)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    N, K = qweight.shape
    q, s = qweight.to(ct), scale.to(ct)
    if s.dim() == 1:
        w = q * s[:, None]
    else:
        G = s.shape[1]
        w = (q.view(N, G, K // G) * s[:, :, None]).view(N, K)
    return w.to(dtype)


def linear_int8_fwd_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor],
                        upcast: bool = True) -> Tensor:
    """x (M, K), qweight (N, K) int8, scale (N,) | (N, G) fp32, bias (N,)? -> (M, N) in x's dtype.
    upcast=True: dequantized weight and products in fp32 (fp64 for fp64 x), as the kernels do;
    upcast=False: F.linear in x's dtype on the weight dequantized to x's dtype (PyTorch's own
    low-precision result: the tests' baseline)."""
    ct = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    w = dequantize_int8_ref(qweight, scale, ct)
    b = None if bias is None else bias.to(ct)
    return F.linear(x.to(ct), w, b).to(x.dtype)


# ---- the op ----

OP = "linear_int8"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FEW_ROWS = 16          # the CUDA GEMV's row bound
_CPU_FEW_ROWS = 64      # the C++ kernel's few-row bound (csrc/cpu/linear_int8.cpp kFewRows)
backends.register_op(OP, ("torch", "reference", "cpu", "cuda", "triton"), cpp_ops=("linear_int8_fwd",))


def kernel_reason(backend: str, x: Tensor, bias: Optional[Tensor]) -> str | None:
    """Why a kernel backend of the int8-weight linears (linear_int8, linear_w8a8) cannot take x / bias
    (None: it can; torch and reference take anything)."""
    if backend in ("reference", "torch"):
        return None
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
    if bias is not None and bias.dtype != x.dtype:
        return "bias dtype differs from the input's"
    return None


def _supports(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]):
    def check(backend: str) -> str | None:
        why = kernel_reason(backend, x, bias)
        if why is not None or backend in ("reference", "torch"):
            return why
        if backend in ("cuda", "triton") and scale.dim() != 1:
            return "per-group scales (the GPU kernels take per-channel scales)"
        if backend == "cuda" and x.shape[0] > _FEW_ROWS:
            return f"more than {_FEW_ROWS} rows (the CUDA kernel is a GEMV)"
        return None
    return check


def _cpu(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.shape[0] > _CPU_FEW_ROWS and x.dtype == torch.float32 and qweight.shape[1] > 0:
        # many rows: widen once, then the fastest fp32 GEMM (oneDNN on CPU fp32; the kernel's own
        # fallback is BLAS)
        from fastlm.ops.linear import dense_linear
        return dense_linear(x, torch.ops.fastlm_C.linear_int8_dequant(qweight, scale), bias)
    return torch.ops.fastlm_C.linear_int8_fwd(x, qweight, scale, bias)


def _impl(backend: str):
    if backend == "cpu":
        return _cpu
    if backend == "cuda":
        return torch.ops.fastlm_C.linear_int8_fwd
    if backend == "triton":
        from fastlm.kernels.linear_int8 import linear_int8_fwd as triton_fwd
        return triton_fwd
    if backend == "torch":
        return _torch
    return linear_int8_fwd_ref


def _torch(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return linear_int8_fwd_ref(x, qweight, scale, bias, upcast=False)


def _run(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    backend = backends.select(OP, x.device, _supports(x, qweight, scale, bias))
    return _impl(backend)(x, qweight, scale, bias)


@torch.library.custom_op("fastlm::linear_int8_fwd", mutates_args=())
def linear_int8_fwd(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) with a contiguous last dim, qweight (N, K) int8, scale (N,) | (N, G) fp32, bias (N,)?
    -> (M, N) in x's dtype."""
    return _run(x, qweight, scale, bias)


@linear_int8_fwd.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scale, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(qweight, scale)


def _backward(ctx, dy):
    qweight, scale = ctx.saved_tensors
    dx = db = None
    if ctx.needs_input_grad[0]:
        w = dequantize_int8_ref(qweight, scale, torch.float32)
        dx = (dy.float() @ w).to(dy.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, None, None, db


linear_int8_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_quantized(op: str, qweight, scale, in_features: Optional[int] = None) -> None:
    """qweight (N, K) int8 and scale (N,) or (N, G) fp32 with G dividing K, on one device."""
    if not isinstance(qweight, Tensor):
        raise TypeError(f"fastlm.ops.{op}: qweight must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"fastlm.ops.{op}: qweight must be an int8 tensor, got {qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: qweight must be 2-D (out_features, in_features), "
                         f"got {tuple(qweight.shape)}")
    if not isinstance(scale, Tensor):
        raise TypeError(f"fastlm.ops.{op}: scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"fastlm.ops.{op}: scale must be a float32 tensor, got {scale.dtype}")
    N, K = qweight.shape
    if scale.dim() not in (1, 2) or scale.shape[0] != N or (scale.dim() == 2 and (scale.shape[1] < 1
                                                                                 or K % scale.shape[1])):
        raise ValueError(f"fastlm.ops.{op}: scale must have shape ({N},) (per output channel) or ({N}, G) "
                         f"with G dividing in_features {K}, got {tuple(scale.shape)}")
    _checks.same_device(op, "scale", scale, qweight, "qweight")
    if in_features is not None and K != in_features:
        raise ValueError(f"fastlm.ops.{op}: input's last dim must be qweight's in_features {K}, "
                         f"got {in_features}")


def linear_int8(input: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = input @ (qweight * scale)^T + bias, == F.linear(input, qweight.float() * scale[:, None], bias)
    with the products in fp32, returned in input's dtype.

    input: (*, K) float; qweight: (N, K) int8; scale: (N,) float32 per output channel, or (N, G)
    float32 per group of K / G consecutive inputs; bias: (N,) in input's dtype or None. Returns (*, N)."""
    x2, q, s, b = quantized_call(OP, input, qweight, scale, bias)
    if eager_inference(x2, b):
        y = _run(x2, q, s, b)          # inference: the chosen backend directly (no custom-op wrapper)
    else:
        y = linear_int8_fwd(x2, q, s, b)
    return y.view(*input.shape[:-1], qweight.shape[0])


def quantized_call(op: str, input: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]):
    """The argument checks of the int8-weight linears (linear_int8, linear_w8a8) -> (input as (M, K)
    rows, qweight, scale, bias), each contiguous."""
    _checks.tensor(op, "input", input)
    check_quantized(op, qweight, scale, input.shape[-1] if input.dim() else None)
    if input.dim() == 0:
        raise ValueError(f"fastlm.ops.{op}: input must have at least one dimension")
    _checks.same_device(op, "qweight", qweight, input)
    if bias is not None:
        _checks.tensor(op, "bias", bias)
        _checks.shape(op, "bias", bias, (qweight.shape[0],))
        _checks.same_device(op, "bias", bias, input)
        _checks.same_dtype(op, "bias", bias, input)
    x2 = _checks.rows(input, qweight.shape[1])
    q = qweight if qweight.is_contiguous() else qweight.contiguous()
    s = scale if scale.is_contiguous() else scale.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    return x2, q, s, b


def linear_bf16w(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = F.linear(input, weight.to(input.dtype), bias) for a bf16 weight and an fp32/fp16 input
    (weight-only bf16, fastlm.quantize(weights="bf16")): on CPU in eager inference the C++ kernel
    (csrc/cpu/linear_int8.cpp linear_w16_fwd: the weight widened to fp32 in registers, exact; fp32
    accumulation; few rows read 2 bytes a weight), else F.linear on the widened weight (autograd,
    torch.compile, other devices). Not a measured-auto op: one kernel, and torch's path for the rest."""
    op = "linear_bf16w"
    _checks.tensor(op, "input", input)
    if not isinstance(weight, Tensor) or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise TypeError(f"fastlm.ops.{op}: weight must be a 2-D bfloat16 tensor")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastlm.ops.{op}: input's last dim must be weight's in_features {weight.shape[1]}, "
                         f"got {tuple(input.shape)}")
    K, N = weight.shape[1], weight.shape[0]
    if (input.device.type == "cpu" and weight.device.type == "cpu" and input.dtype in _KERNEL_DTYPES
            and (bias is None or bias.dtype == input.dtype) and weight.is_contiguous()
            and not torch.compiler.is_compiling() and eager_inference(input, bias)
            and _ext.has_kernel("linear_w16_fwd", "CPU")):
        x2 = _checks.rows(input, K)
        return torch.ops.fastlm_C.linear_w16_fwd(x2, weight, bias).view(*input.shape[:-1], N)
    return F.linear(input, weight.to(input.dtype), bias)
