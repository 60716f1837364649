"""fastlm.ops.scaled_dot_product_attention and fastlm.nn.MultiheadAttention: parity of every backend
against the fp64 reference (2x torch's own error for outputs, 3x for gradients), masks, causal, GQA,
scale, odd shapes and head dims, dropout (reproducible; the backward uses the forward's mask),
opcheck, torch.compile, and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import attention as attn_ops
from fastlm.ops import reference
from tests.helpers import FULL, INTERPRET, assert_close, backend_params, poison_outputs, requires_cuda

OP = "scaled_dot_product_attention"

# (B, H, Hkv, Sq, Sk, D, Dv, mask kind, causal). mask kinds: None, "pad" (B, 1, 1, Sk) bool key padding,
# "bool" full (B, H, Sq, Sk) bool, "add2d" additive (Sq, Sk), "add_bh" additive (1, H, Sq, Sk),
# "padblk" / "padblk_add" (B, 1, 1, Sk) key padding, bool / additive, with whole key blocks masked (the
# kernels skip them), a batch whose keys are all masked (its rows see no key: zeros) and one with a
# single live key.
CASES_FULL = [
    (2, 3, 3, 1, 1, 16, 16, None, False),
    (2, 3, 3, 7, 7, 40, 40, None, True),
    (1, 4, 2, 17, 129, 64, 64, "pad", False),
    (2, 2, 2, 127, 130, 80, 80, "bool", False),
    (1, 2, 1, 129, 127, 96, 96, None, True),
    (1, 2, 2, 130, 17, 128, 128, "add2d", False),
    (2, 4, 1, 130, 130, 64, 64, "add_bh", False),
    (1, 2, 2, 129, 129, 128, 128, None, True),
    (1, 2, 2, 33, 70, 40, 24, "pad", False),      # value head dim differs from the query's
    (1, 1, 1, 7, 130, 256, 256, None, False),
    (1, 2, 2, 127, 1, 64, 64, None, True),
    (3, 2, 2, 17, 200, 64, 64, "padblk", False),
    (3, 4, 2, 70, 300, 40, 40, "padblk_add", False),
]
# Small ones for the Triton interpreter (serial numpy: keep the grids tiny).
CASES_SMALL = [
    (1, 2, 2, 1, 1, 16, 16, None, False),
    (2, 2, 2, 7, 17, 40, 40, None, True),
    (1, 4, 2, 17, 7, 64, 64, "pad", False),
    (1, 2, 1, 17, 33, 80, 80, "bool", False),
    (1, 2, 2, 33, 17, 96, 96, "add2d", False),
    (1, 1, 1, 20, 20, 128, 128, "add_bh", False),
    (1, 2, 2, 20, 20, 16, 16, None, True),
    (1, 1, 1, 9, 12, 40, 24, "pad", False),
    (3, 2, 1, 9, 70, 16, 16, "padblk", False),
    (3, 2, 2, 5, 50, 16, 16, "padblk_add", False),
]


def _cases(backend: str, device: str):
    if backend == "triton" and device == "cpu":
        return CASES_SMALL
    return CASES_FULL if device == "cpu" or not FULL else CASES_FULL + [
        (2, 8, 2, 1000, 1000, 128, 128, "pad", False), (1, 8, 8, 2048, 2048, 64, 64, None, True)]


def _make_mask(kind, B, H, Sq, Sk, dtype, device):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "pad":
        lens = torch.randint(1, Sk + 1, (B,), generator=g)
        lens[0] = Sk
        return (torch.arange(Sk)[None, :] < lens[:, None]).view(B, 1, 1, Sk).to(device)
    if kind in ("padblk", "padblk_add"):
        return _padblk_mask(B, Sk, dtype if kind == "padblk_add" else None, g).to(device)
    if kind == "bool":
        m = torch.rand(B, H, Sq, Sk, generator=g) > 0.3
        m[..., 0, :] = False  # a fully masked row: zeros, as torch
        return m.to(device)
    if kind == "add2d":
        return (torch.randn(Sq, Sk, generator=g) * 2).to(dtype).to(device)
    if kind == "add_bh":
        m = torch.randn(1, H, Sq, Sk, generator=g)
        return m.masked_fill(torch.rand(1, H, Sq, Sk, generator=g) > 0.8, float("-inf")).to(dtype).to(device)
    raise AssertionError(kind)


def _padblk_mask(B, Sk, dtype, g):
    """(B, 1, 1, Sk) key padding: batch 0 masks keys [Sk/5, 4 Sk/5) (whole key blocks of 16 to 64) and a
    few scattered ones, batch 1 masks every key, batch 2 keeps only its last key; bool, or additive
    (finite random values where kept, -inf where masked) when dtype is given."""
    keep = torch.rand(B, Sk, generator=g) > 0.1
    keep[0, Sk // 5: 4 * Sk // 5] = False
    if B > 1:
        keep[1] = False
    if B > 2:
        keep[2] = False
        keep[2, -1] = True
    keep = keep.view(B, 1, 1, Sk)
    if dtype is None:
        return keep
    return (torch.randn(B, 1, 1, Sk, generator=g) * 2).masked_fill(~keep, float("-inf")).to(dtype)


def _inputs(B, H, Hkv, Sq, Sk, D, Dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(B, H, Sq, Dv, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _check_parity(backend, device, dtype, case, scale=None):
    B, H, Hkv, Sq, Sk, D, Dv, kind, causal = case
    q, k, v, do = _inputs(B, H, Hkv, Sq, Sk, D, Dv, dtype, device)
    mask = _make_mask(kind, B, H, Sq, Sk, dtype, device)
    kw = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=H != Hkv)
    with fastlm.use_backend(backend), poison_outputs():
        got = _fwd_bwd(ops.scaled_dot_product_attention, q, k, v, do, **kw)
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    with fastlm.use_backend("reference"):
        oracle = _fwd_bwd(ops.scaled_dot_product_attention, *(t.double() for t in (q, k, v, do)),
                          **{**kw, "attn_mask": mask64})
    base = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, do, **kw)  # torch in the same dtype
    tag = f"{backend}/{device}/{dtype} {case}"
    for name, g, o, b, factor in zip(("out", "dq", "dk", "dv"), got, oracle, base, (2, 3, 3, 3)):
        scale_ref = max(1.0, o.abs().max().item())  # gradients can be large: floor relative to them
        assert_close(f"{tag} {name}", g, o, b, factor=factor, atol=hf_atol(dtype) * scale_ref)


def hf_atol(dtype):
    return {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.parametrize("device,backend,dtype", backend_params(OP))
def test_parity(device, backend, dtype):
    cases = _cases(backend, device)
    if dtype != torch.float32 and backend in ("reference", "cpu") and not FULL:
        cases = cases[::2]  # low precision: every other case (the kernels are dtype-agnostic past the loads)
    for case in cases:
        _check_parity(backend, device, dtype, case)


@pytest.mark.parametrize("device,backend,dtype", backend_params(OP, dtypes=[torch.float32]))
def test_scale_and_noncontiguous(device, backend, dtype):
    small = backend == "triton" and device == "cpu"
    B, H, S, D = (1, 2, 9, 40) if small else (2, 3, 67, 80)
    _check_parity(backend, device, dtype, (B, H, H, S, S + 3, D, D, None, False), scale=0.37)
    # (B, S, H, D) storage viewed as (B, H, S, D): strided heads, as in a fused QKV projection
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    with fastlm.use_backend(backend), poison_outputs():
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close("noncontiguous", out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_leading_batch_dims_and_3d():
    q, k, v = (torch.randn(2, 3, 4, 5, 16) for _ in range(3))
    mask = torch.rand(3, 1, 5, 5) > 0.2
    out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    q3, k3, v3 = (torch.randn(4, 7, 16) for _ in range(3))
    torch.testing.assert_close(ops.scaled_dot_product_attention(q3, k3, v3, is_causal=True),
                               F.scaled_dot_product_attention(q3, k3, v3, is_causal=True), atol=1e-5, rtol=1e-5)


def test_cpu_avx2_fallback():
    """The CPU kernel picks AVX-512 at run time; its AVX2 path (CPUs without AVX-512) must stay correct:
    rerun the cpu fp32 parity test and the key-padding checks with FASTLM_CPU_NO_AVX512=1."""
    import os
    import subprocess
    import sys
    if "cpu" not in fastlm.available_backends(OP, "cpu"):
        pytest.skip("fastlm._C has no CPU attention kernels")
    env = {**os.environ, "FASTLM_CPU_NO_AVX512": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "(test_parity and cpu-cpu-float32) or test_broadcast_mask_is_not_materialized"
                        " or test_nan_inputs_give_nan_rows_like_torch"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "deselected" in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("shape,qshape", [
    ((2, 1, 1, 40), (2, 3, 9, 16)),          # key padding
    ((40,), (2, 3, 9, 16)),                  # one key vector for everything
    ((1, 3, 1, 40), (2, 3, 9, 16)),          # per head
    ((9, 40), (2, 3, 9, 16)),                # (Sq, Sk)
    ((1, 2, 1, 1, 40), (3, 2, 3, 9, 16)),    # two batch dims, broadcast over the first (not mergeable)
])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_broadcast_mask_is_not_materialized(monkeypatch, shape, qshape, dtype):
    """The kernels get the mask as a stride-0 view of (at most the batch-expanded) mask, never the
    (B, H, Sq, Sk) broadcast, forward and backward; the result still matches torch."""
    g = torch.Generator().manual_seed(5)
    kshape = tuple(qshape[:-2]) + (shape[-1], qshape[-1])
    q, k, v = (torch.randn(sh, generator=g).requires_grad_() for sh in (qshape, kshape, kshape))
    keep = torch.rand(shape, generator=g) > 0.3
    mask = keep if dtype == torch.bool else torch.randn(shape, generator=g).masked_fill(~keep, float("-inf"))
    seen = []
    for name in ("_fwd_impl", "_bwd_impl"):
        orig = getattr(attn_ops, name)

        def spy(backend, orig=orig, name=name):
            f = orig(backend)

            def g(*args):
                m = args[3] if name == "_fwd_impl" else args[6]
                seen.append((name, tuple(m.shape), m.stride(), m.untyped_storage().nbytes() // m.element_size()))
                return f(*args)
            return g
        monkeypatch.setattr(attn_ops, name, spy)
    with fastlm.use_backend("cpu" if "cpu" in fastlm.available_backends(OP, "cpu") else "reference"):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    B = math.prod(qshape[:-3])
    H, Sq, Sk = qshape[-3], qshape[-2], k.shape[-2]
    batch_elems = math.prod(qshape[:-3]) * math.prod(shape[-3:]) if len(shape) == 5 else keep.numel()
    assert [n for n, *_ in seen] == ["_fwd_impl", "_bwd_impl"], seen
    for name, shp, stride, storage in seen:
        assert shp == (B, H, Sq, Sk), (name, shp)
        assert storage <= batch_elems, f"{name}: the mask reached the kernel as {storage} elements (materialized)"
        for d in range(4):
            full = (B, H, Sq, Sk)[d]
            own = ((1,) * (4 - len(shape)) + tuple(shape))[d] if len(shape) <= 4 else (B, 1, 1, Sk)[d]
            if own == 1 and full > 1:
                assert stride[d] == 0, (name, d, stride)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(tuple(qshape[:-1]) + (Sk,)))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, w in zip((dq, dk, dv), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)


def test_fully_masked_rows_are_zero():
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    for backend in fastlm.available_backends(OP, "cpu"):
        if backend == "triton" and not INTERPRET:
            continue
        with fastlm.use_backend(backend):
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])), backend
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the Triton interpreter runs NaN through numpy
@pytest.mark.parametrize("causal", [False, True])
def test_nan_inputs_give_nan_rows_like_torch(causal):
    """A NaN in q (one row) or k (one key) makes exactly the rows torch makes NaN, never a silent finite
    (or zero) output, on every backend here (test_cpu_avx2_fallback reruns it on the AVX2 path)."""
    q, k, v = (torch.randn(1, 2, 70, 64) for _ in range(3))
    q[0, 0, 5, 3] = float("nan")
    k[0, 1, 40, 2] = float("nan")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal).isnan()
    for backend in fastlm.available_backends(OP, "cpu"):
        with fastlm.use_backend(backend):
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(out.isnan(), want), backend


# (B, H, Hkv, Sq, Sk, D, D, mask kind, causal) for the tensor-core CUDA forward (Dv == D, its scope): head
# dims padded to 64/128/256 (16, 20, 40 -> 64; 80, 128 -> 128; 256), Sq/Sk off the 64-row and 64/32-key
# tiles, causal with Sq < Sk and Sq > Sk, masks with fully masked rows, GQA, D % 8 != 0 (element loads).
MMA_CASES = [
    (2, 2, 2, 1, 1, 16, 16, None, False),
    (2, 2, 2, 1, 130, 80, 80, None, True),
    (2, 2, 2, 130, 1, 40, 40, None, True),
    (1, 4, 2, 17, 129, 40, 40, "pad", False),
    (2, 2, 1, 129, 130, 64, 64, None, True),
    (1, 2, 2, 130, 17, 80, 80, "add2d", False),
    (2, 4, 2, 130, 129, 128, 128, None, True),
    (1, 2, 2, 17, 130, 256, 256, "add_bh", False),
    (1, 2, 1, 129, 129, 256, 256, None, True),
    (1, 2, 2, 129, 17, 16, 16, "bool", False),
    (3, 4, 2, 70, 300, 64, 64, "padblk_add", False),
    (3, 2, 2, 129, 200, 128, 128, "padblk", False),
    (1, 2, 2, 17, 17, 20, 20, "bool", False),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mma_forward(monkeypatch, dtype):
    """The tensor-core CUDA forward (csrc/cuda/attention_mma.cu), on with FASTLM_CUDA_ATTENTION_MMA=1: forward
    and backward parity (the backward is the tensor-core one for D <= 128, the simple one above), lse equal to the
    simple kernel's (-inf on the same rows), a custom scale, strided (B, S, H, D) inputs, and a check that the
    kernel really ran (its output is not bit-identical to the simple kernel's)."""
    if "cuda" not in fastlm.available_backends(OP, "cuda"):
        pytest.skip("fastlm._C has no CUDA attention kernels")
    monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "1")
    for case in MMA_CASES:
        _check_parity("cuda", "cuda", dtype, case)
    _check_parity("cuda", "cuda", dtype, (2, 3, 3, 67, 70, 64, 64, None, False), scale=0.37)

    # lse: the raw C++ op with the tensor-core kernel vs the simple one (both fp32 from the same inputs).
    B, H, Hkv, Sq, Sk, D = 3, 4, 2, 70, 300, 64
    q, k, v, _ = _inputs(B, H, Hkv, Sq, Sk, D, D, dtype, "cuda")
    mask = _make_mask("padblk_add", B, H, Sq, Sk, dtype, "cuda").expand(B, H, Sq, Sk)
    k2, v2 = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    for kw in (dict(mask=mask, causal=False), dict(mask=None, causal=True)):
        args = (kw["mask"], 1 / math.sqrt(D), kw["causal"], 0.0, None)
        out_mma, lse_mma = torch.ops.fastlm_C.attention_fwd(q, k, v, *args)
        monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "0")
        out_simple, lse_simple = torch.ops.fastlm_C.attention_fwd(q, k, v, *args)
        monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "1")
        assert not torch.equal(out_mma, out_simple), "the tensor-core kernel did not run (bit-identical output)"
        assert torch.equal(torch.isinf(lse_mma), torch.isinf(lse_simple)), "rows with lse = -inf differ"
        finite = torch.isfinite(lse_simple)
        torch.testing.assert_close(lse_mma[finite], lse_simple[finite], atol=1e-3, rtol=1e-4)
        ref = F.scaled_dot_product_attention(q.double(), k2.double(), v2.double(), attn_mask=(
            None if kw["mask"] is None else kw["mask"].double()), is_causal=kw["causal"]).nan_to_num(0.0)
        base = F.scaled_dot_product_attention(q, k2, v2, attn_mask=kw["mask"], is_causal=kw["causal"]).nan_to_num(0.0)
        assert_close(f"mma raw {dtype} {kw['causal']}", out_mma, ref, base, atol=hf_atol(dtype))

    # (B, S, H, D) storage viewed as (B, H, S, D): strided heads (16-byte chunks for D = 64; element loads
    # for D = 20, whose rows are not 16-byte aligned).
    for D in (64, 20):
        g = torch.Generator().manual_seed(3)
        qkv = torch.randn(2, 67, 3, 3, D, generator=g).to("cuda", dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        with fastlm.use_backend("cuda"), poison_outputs():
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        assert_close(f"mma strided D={D}", out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     atol=hf_atol(dtype))


# (B, H, Hkv, Sq, Sk, D, D, mask kind, causal) for the tensor-core CUDA backward (attention_mma_bwd.cu; Dv == D
# <= 128, larger head dims fall back to the simple kernels): head dims 16, 20, 40 (padded to 64), 64, 80, 128
# (padded to 128), Sq/Sk off the 64-row blocks and 64/32-row streamed tiles, causal with Sq < Sk and Sq > Sk,
# key padding with fully masked rows and batches, GQA (dk/dv summed over groups of 2 and 3).
MMA_BWD_CASES = [
    (2, 2, 2, 1, 1, 16, 16, None, False),
    (1, 4, 2, 67, 130, 16, 16, None, True),
    (2, 4, 1, 129, 65, 40, 40, "pad", False),
    (3, 4, 2, 70, 300, 40, 40, "padblk_add", False),
    (1, 2, 2, 130, 129, 64, 64, "bool", False),
    (2, 6, 2, 129, 130, 64, 64, None, True),
    (1, 2, 1, 33, 200, 80, 80, "add_bh", False),
    (1, 6, 2, 200, 33, 80, 80, None, True),
    (3, 2, 2, 129, 200, 128, 128, "padblk", False),
    (1, 4, 2, 97, 97, 128, 128, None, True),
    (1, 2, 2, 17, 17, 20, 20, "bool", False),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mma_backward(monkeypatch, dtype):
    """The tensor-core CUDA backward (csrc/cuda/attention_mma_bwd.cu), on with FASTLM_CUDA_ATTENTION_MMA=1: dq,
    dk, dv against the fp64 reference (3x torch's own error) through the public op, then the raw C++ op fed the
    same out and lse with the gate on and off: every gradient must differ from the simple kernel's bit for bit
    (else the tensor-core kernel silently did not run) and still pass the 3x rule."""
    if "cuda" not in fastlm.available_backends(OP, "cuda"):
        pytest.skip("fastlm._C has no CUDA attention kernels")
    monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "1")
    for case in MMA_BWD_CASES:
        _check_parity("cuda", "cuda", dtype, case)

    for B, H, Hkv, Sq, Sk, D, kind, causal in ((3, 4, 2, 70, 300, 40, "padblk_add", False),
                                               (2, 6, 2, 130, 129, 80, None, True),
                                               (1, 2, 2, 67, 65, 128, None, False)):
        q, k, v, do = _inputs(B, H, Hkv, Sq, Sk, D, D, dtype, "cuda")
        mask = _make_mask(kind, B, H, Sq, Sk, dtype, "cuda")
        raw_mask = None if mask is None else mask.expand(B, H, Sq, Sk)
        args = (raw_mask, 1 / math.sqrt(D), causal, 0.0, None)
        out, lse = torch.ops.fastlm_C.attention_fwd(q, k, v, *args)
        got = torch.ops.fastlm_C.attention_bwd(do, q, k, v, out, lse, *args)
        monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "0")
        simple = torch.ops.fastlm_C.attention_bwd(do, q, k, v, out, lse, *args)
        monkeypatch.setenv("FASTLM_CUDA_ATTENTION_MMA", "1")
        kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)
        with fastlm.use_backend("reference"):
            oracle = _fwd_bwd(ops.scaled_dot_product_attention, *(t.double() for t in (q, k, v, do)),
                              **{**kw, "attn_mask": None if mask is None else mask.double()})
        base = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, do, **kw)
        for name, g, s_, o, b in zip(("dq", "dk", "dv"), got, simple, oracle[1:], base[1:]):
            tag = f"mma raw bwd {dtype} {(B, H, Hkv, Sq, Sk, D, kind, causal)} {name}"
            assert not torch.equal(g, s_), f"{tag}: the tensor-core backward did not run (bit-identical output)"
            scale_ref = max(1.0, o.abs().max().item())
            assert_close(tag, g, o, b, factor=3, atol=hf_atol(dtype) * scale_ref)


# ---------------------------------------------- dropout ----------------------------------------------

def _dropout_backends():
    from tests.helpers import DEVICES
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fastlm.available_backends(OP, d)
            if b in attn_ops._DROPOUT_BACKENDS]


@pytest.mark.parametrize("device,backend", _dropout_backends())
def test_dropout_matches_reference_mask(device, backend):
    """Same torch seed -> same output; forward and backward equal the fp64 reference fed the very keep
    mask the RNG defines (the backward regenerates the forward's mask)."""
    B, H, Hkv, Sq, Sk, D, p = 2, 2, 1, 19, 37, 16, 0.3
    q, k, v, do = _inputs(B, H, Hkv, Sq, Sk, D, D, torch.float32, device)
    with fastlm.use_backend(backend), poison_outputs():
        torch.manual_seed(123)
        out1, *grads = _fwd_bwd(ops.scaled_dot_product_attention, q, k, v, do, dropout_p=p, is_causal=True,
                                enable_gqa=True)
        torch.manual_seed(123)
        out2 = ops.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        torch.manual_seed(124)
        out3 = ops.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    torch.manual_seed(123)
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # the draw the op makes
    keep = reference.attention_dropout_keep_ref(rng, p, B, H, Sq, Sk)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05, frac
    q64, k64, v64, do64 = (t.double().cpu() for t in (q, k, v, do))
    o_ref, lse = reference.attention_fwd_ref(q64, k64, v64, None, 1 / math.sqrt(D), True, p, dropout_keep=keep)
    g_ref = reference.attention_bwd_ref(do64, q64, k64, v64, o_ref, lse, None, 1 / math.sqrt(D), True, p,
                                        dropout_keep=keep)
    assert_close(f"{backend} dropout out", out1, o_ref, None, atol=2e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, g_ref):
        assert_close(f"{backend} dropout {name}", g, r, None, atol=5e-5)


def test_dropout_never_silently_ignored():
    q = torch.randn(1, 1, 4, 16)
    check = attn_ops._supports(q, q, q, None, 0.5)
    for backend in ("reference", "cpu", "cuda", "triton"):
        reason = check(backend)
        assert (reason is None) == (backend in attn_ops._DROPOUT_BACKENDS), (backend, reason)
    torch.manual_seed(0)
    out = ops.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, q, q))


def test_philox_known_answer():
    # Random123's known-answer vectors for philox4x32_10 (first word).
    assert int(reference.philox_uint32(0, 0, 0, 0, 0, 0)) == 0x6627E8D5
    assert int(reference.philox_uint32(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                                       0xFFFFFFFF)) == 0x408F276D


# ---------------------------------------------- op checks ----------------------------------------------

@pytest.mark.parametrize("backend", [b for b in fastlm.available_backends(OP, "cpu") if b != "triton"])
def test_opcheck(backend):
    q, k, v, do = _inputs(1, 2, 1, 5, 9, 16, 16, torch.float32, "cpu")
    mask = torch.randn(1, 1, 1, 9).expand(1, 2, 5, 9)
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, mask, 0.25, False, 0.0, None))
        torch.library.opcheck(torch.ops.fastlm.attention_fwd.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, 0.25, True, 0.0, None))
        out, lse = torch.ops.fastlm.attention_fwd(q.detach(), k.detach(), v.detach(), None, 0.25, True, 0.0, None)
        torch.library.opcheck(torch.ops.fastlm.attention_bwd.default,
                              (do, q.detach(), k.detach(), v.detach(), out, lse, None, 0.25, True, 0.0, None))


def test_compile_fullgraph():
    q, k, v, do = _inputs(2, 2, 2, 9, 11, 16, 16, torch.float32, "cpu")
    mask = torch.rand(2, 1, 1, 11) > 0.2

    def f(q, k, v):
        return ops.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2

    got = _fwd_bwd(torch.compile(f, fullgraph=True), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2, q, k, v, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(k=torch.randn(1, 2, 5, 8)), ValueError, "key head dim"),
    (dict(attn_mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True), ValueError, "is_causal"),
    (dict(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16), enable_gqa=True), ValueError, "multiple"),
    (dict(v=torch.randn(1, 2, 6, 16)), ValueError, "value"),
    (dict(k=torch.randn(1, 2, 5, 16, dtype=torch.float64)), TypeError, "key"),
    (dict(attn_mask=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "attn_mask"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(q=[1.0]), TypeError, "query"),
    (dict(k=torch.randn(2, 4, 5, 16), v=torch.randn(3, 4, 5, 16)), ValueError, "batch"),
])
def test_bad_inputs(bad, exc, match):
    args = dict(q=torch.randn(1, 4, 4, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16))
    args["k"], args["v"] = torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    args.update({n: bad.pop(n) for n in ("q", "k", "v") if n in bad})
    with pytest.raises(exc, match=match):
        ops.scaled_dot_product_attention(args["q"], args["k"], args["v"], **bad)


# ---------------------------------------------- nn.MultiheadAttention ----------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "kpm", "attn_bool", "both_float", "causal"])
def test_multihead_attention(batch_first, masks):
    torch.manual_seed(0)
    E, H, N, L, S = 32, 4, 2, 7, 9
    if masks == "causal":
        S = L
    ref = torch.nn.MultiheadAttention(E, H, batch_first=batch_first)
    mod = fastlm.nn.MultiheadAttention(E, H, batch_first=batch_first)
    mod.load_state_dict(ref.state_dict())
    assert isinstance(mod, torch.nn.MultiheadAttention)
    shape_q = (N, L, E) if batch_first else (L, N, E)
    shape_k = (N, S, E) if batch_first else (S, N, E)
    x = torch.randn(shape_q, requires_grad=True)
    mem = torch.randn(shape_k, requires_grad=True)
    kw = {}
    if masks in ("kpm", "both_float"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, -3:] = True
        kw["key_padding_mask"] = kpm if masks == "kpm" else torch.zeros(N, S).masked_fill(kpm, float("-inf"))
    if masks == "attn_bool":
        kw["attn_mask"] = torch.rand(L, S) > 0.7
        kw["attn_mask"][:, 0] = False
    if masks == "both_float":
        kw["attn_mask"] = torch.randn(N * H, L, S)
    if masks == "causal":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L)
        kw["is_causal"] = True
    key = x if masks == "causal" else mem
    out, w = mod(x, key, key, need_weights=False, **kw)
    want, _ = ref(x, key, key, need_weights=False, **kw)
    assert w is None
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    params = [x] + list(mod.parameters())
    got_g = torch.autograd.grad(out, params + ([mem] if key is mem else []), g)
    want_g = torch.autograd.grad(want, [x] + list(ref.parameters()) + ([mem] if key is mem else []), g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # need_weights=True defers to torch
    o2, w2 = mod(x, key, key, need_weights=True, **kw)
    o3, w3 = ref(x, key, key, need_weights=True, **kw)
    torch.testing.assert_close(o2, o3)
    torch.testing.assert_close(w2, w3)


# ---------------------------------------------- CPU fused forward ----------------------------------------------

# (B, H, Hkv, Sq, Sk, D, Dv, mask kind, causal) for the CPU forward's AVX-512 path taken without dropout and with no
# mask or a key-padding one (attention.cpp, fused_fwd_worker512; on other CPUs the same cases check the blocked
# kernel): head dims 32/40/64 and value head dims off 16, query blocks of 64 with tails of 1..63 rows, key tiles of
# 6/8/12 with tails, more than 512 keys (chunks of 512, O rescaled between them), causal across chunks, a fully
# masked batch and leading masked keys (padblk), GQA.
FUSED_CASES = [
    (2, 12, 12, 128, 128, 32, 32, "pad", False),       # MiniLM-L6 attention
    (1, 3, 3, 97, 97, 32, 32, None, True),
    (2, 2, 1, 65, 200, 40, 40, "padblk_add", False),
    (3, 2, 2, 50, 77, 64, 24, "padblk", False),
    (1, 2, 2, 129, 700, 32, 32, "pad", False),          # two key chunks
    (1, 2, 1, 600, 1100, 64, 64, None, True),          # three key chunks, causal
    (3, 2, 2, 20, 1030, 40, 72, "padblk_add", False),  # key chunks; value columns in panels of 64 + 8
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_fused_forward(dtype):
    """Forward and backward parity of the CPU kernels on FUSED_CASES (NaN-poisoned outputs: every element and
    lse must be written), fp32 and the half types (their K/V converted per head, output through fp32 rows)."""
    if "cpu" not in fastlm.available_backends(OP, "cpu"):
        pytest.skip("fastlm._C has no CPU attention kernels")
    cases = FUSED_CASES if dtype == torch.float32 else FUSED_CASES[::2]
    for case in cases:
        _check_parity("cpu", "cpu", dtype, case)


@pytest.mark.parametrize("S,D,causal", [(128, 32, False), (77, 32, True), (700, 64, False)])
def test_cpu_fused_forward_strided_qkv(S, D, causal):
    """q, k, v as strided views of one (B, S, 3, H, D) projection (BERT's fused QKV: read in place), with a
    (B, 1, 1, S) key-padding mask (one batch fully masked: zeros, lse -inf) or causal; out and lse of the raw op
    against fp64, and NaN inputs make the NaN rows torch makes."""
    if "cpu" not in fastlm.available_backends(OP, "cpu"):
        pytest.skip("fastlm._C has no CPU attention kernels")
    B, H = 3, 4
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D), views
    assert not q.is_contiguous()
    mask = None
    if not causal:
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[1, S // 3:] = False
        keep[2] = False
        mask = torch.zeros(B, 1, 1, S).masked_fill(~keep.view(B, 1, 1, S), float("-inf"))
    scale = 1 / math.sqrt(D)
    raw_mask = None if mask is None else mask.expand(B, H, S, S)
    with poison_outputs():
        out, lse = torch.ops.fastlm_C.attention_fwd(q, k, v, raw_mask, scale, causal, 0.0, None)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see no key: zeros
    ref = p @ v.double()
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).nan_to_num(0.0)
    assert_close(f"strided S={S} D={D} out", out, ref, base)
    dead = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), dead) and (lse[dead] < 0).all()
    assert_close(f"strided S={S} D={D} lse", lse[~dead], lse_ref[~dead], None, atol=1e-5)
    qn, kn = q.clone(), k.clone()
    qn[0, 0, 5, 3] = float("nan")
    kn[0, 1, S // 2, 2] = float("nan")
    out, _ = torch.ops.fastlm_C.attention_fwd(qn, kn, v, None, scale, causal, 0.0, None)
    want = F.scaled_dot_product_attention(qn, kn, v, is_causal=causal).isnan()
    assert torch.equal(out.isnan(), want)
