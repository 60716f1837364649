"""Attention benchmark cases: forward, backward and forward+backward of
fastlm.ops.scaled_dot_product_attention against torch's SDPA with each of its backends forced
(flash, efficient, cudnn, math; on CPU: its flash CPU kernel and math) and torch.compile(reference),
in TFLOP/s and % of the measured matmul peak. The baseline is torch's default SDPA.
FLOPs: forward 4 B H Sq Sk D (halved when causal), backward 2.5x that, forward+backward 3.5x.
On CUDA in fp16/bf16, "fastlm:cuda (mma)" is the CUDA backend with its tensor-core forward turned on
(FASTLM_CUDA_ATTENTION_MMA=1 around the call; csrc/cuda/attention_mma.cu, off by default)."""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench.common import bench_backends, compile_or_none, max_err
from fastlm.bench.registry import Bound, Case, register
from fastlm.ops import reference

OP = "scaled_dot_product_attention"


def _sdpa_backends(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend
    if device.type == "cuda":
        return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def _torch_sdpa(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _ref(q, k, v, causal):
    return reference.attention_fwd_ref(q, k, v, None, 1.0 / math.sqrt(q.shape[-1]), causal)[0]


def _with_backend(backend, fn):
    with fastlm.use_backend(backend):
        return fn()


def _with_mma(fn):
    """fn() with the CUDA backend's tensor-core attention forward on (the extension reads the variable at
    every call)."""
    old = os.environ.get("FASTLM_CUDA_ATTENTION_MMA")
    os.environ["FASTLM_CUDA_ATTENTION_MMA"] = "1"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("FASTLM_CUDA_ATTENTION_MMA", None)
        else:
            os.environ["FASTLM_CUDA_ATTENTION_MMA"] = old


def _backend_of(label: str) -> str:
    """'fastlm:cuda (mma)' -> 'cuda'; torch contenders -> 'auto'."""
    return label.split(":", 1)[1].split(" ")[0] if label.startswith("fastlm:") else "auto"


def _add_fastlm(contenders: dict, device, dtype, call) -> None:
    """One contender per fastlm backend, plus the CUDA backend with its tensor-core forward (fp16/bf16)."""
    for be in bench_backends(OP, device):
        contenders[f"fastlm:{be}"] = functools.partial(_with_backend, be, call)
        if be == "cuda" and dtype in (torch.float16, torch.bfloat16):
            contenders["fastlm:cuda (mma)"] = functools.partial(_with_mma, functools.partial(_with_backend, be, call))


def _make(B, H, S, D, causal, mode, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = mode != "fwd"
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    do = torch.randn(B, H, S, D, generator=g).to(device=device, dtype=dtype)
    contenders = {"torch (sdpa default)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for name, be in _sdpa_backends(device).items():
        contenders[f"torch sdpa:{name}"] = functools.partial(_torch_sdpa, be, q, k, v, causal)
    compiled = compile_or_none(_ref)
    if compiled is not None:
        contenders["torch.compile(reference)"] = lambda: compiled(q, k, v, causal)
    _add_fastlm(contenders, device, dtype, lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=causal))

    impls = {}
    for label, fwd in contenders.items():
        be = _backend_of(label)
        if mode == "fwd":
            impls[label] = fwd
        elif mode == "fwd+bwd":
            impls[label] = functools.partial(lambda f, be: _with_backend(be, lambda: torch.autograd.grad(
                f(), (q, k, v), do)), fwd, be)
        else:  # bwd only: the graph is built once, outside the timed call
            def make_bwd(f, be):
                try:
                    out = _with_backend(be, f)
                except RuntimeError:  # a forced torch backend that cannot run this shape
                    return None
                return lambda: _with_backend(be, lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            fn = make_bwd(fwd, be)
            if fn is not None:
                impls[label] = fn

    def check():
        oracle = _ref(q.detach().double(), k.detach().double(), v.detach().double(), causal)
        errs = {}
        for label, fwd in contenders.items():
            if "compile" in label:
                continue
            be = _backend_of(label)
            try:
                errs[label] = max_err(_with_backend(be, fwd), oracle)
            except RuntimeError:
                pass
        return errs

    flops = 4 * B * H * S * S * D / (2 if causal else 1) * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return Bound(impls, flops=flops, check=check, baseline="torch (sdpa default)")


# CPU: the targets. GPU: S from 128 to 16k at ~32k tokens per call, d 64 and 128.
CPU_SHAPES = [(4, 12, 512, 64, False), (4, 12, 512, 64, True), (1, 16, 2048, 128, True)]
GPU_SHAPES = [(max(1, 32768 // S), 2048 // D, S, D, c) for S in (128, 512, 1024, 2048, 4096, 8192, 16384)
              for D in (64, 128) for c in (False, True)]

for devices, shapes in ((("cpu",), CPU_SHAPES), (("cuda",), GPU_SHAPES)):
    for B, H, S, D, causal in shapes:
        tag = "" if devices == ("cpu",) else " [gpu]"
        name = f"({B},{H},{S},{D}){' causal' if causal else ''}{tag}"
        quick = (S, D) in ((512, 64), (4096, 128))
        params = {"B": B, "H": H, "S": S, "D": D, "causal": causal}
        for mode in ("fwd", "bwd", "fwd+bwd"):
            register(Case("kernels", "attention", f"attention {mode} {name}",
                          functools.partial(_make, B, H, S, D, causal, mode), params, quick, devices))


def _make_key_padding(B, H, S, D, device, dtype):
    """Forward with a (B, 1, 1, S) bool key-padding mask (sequence lengths S, 3S/4, S/2, S/4, ...): the
    fastlm kernels skip the fully padded key blocks. FLOPs counted for the unpadded keys only."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    lens = torch.tensor([S - (b % 4) * S // 4 for b in range(B)])
    mask = (torch.arange(S)[None, :] < lens[:, None]).view(B, 1, 1, S).to(device)
    contenders = {"torch (sdpa default)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    _add_fastlm(contenders, device, dtype, lambda: ops.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def check():
        additive = torch.zeros(mask.shape, dtype=torch.float64, device=device).masked_fill(~mask, float("-inf"))
        oracle = reference.attention_fwd_ref(q.double(), k.double(), v.double(), additive, 1.0 / math.sqrt(D),
                                             False)[0]
        errs = {}
        for label, fwd in contenders.items():
            errs[label] = max_err(_with_backend(_backend_of(label), fwd), oracle)
        return errs

    flops = 4 * H * S * D * float(lens.sum())
    return Bound(contenders, flops=flops, check=check, baseline="torch (sdpa default)")


for devices, (B, H, S, D) in ((("cpu",), (4, 12, 512, 64)), (("cuda",), (16, 16, 4096, 128))):
    tag = "" if devices == ("cpu",) else " [gpu]"
    register(Case("kernels", "attention", f"attention fwd ({B},{H},{S},{D}) key-padding{tag}",
                  functools.partial(_make_key_padding, B, H, S, D), {"B": B, "H": H, "S": S, "D": D, "mask": "pad"},
                  False, devices))
