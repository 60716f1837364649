"""Paged attention (fastlm/ops/paged_attention.py): parity of every backend against the fp64 reference
on odd shapes, ragged lengths (0, 1, 15, 16, 17, 100), GQA, shuffled block tables, NaN-poisoned
outputs; the decode and prefill wrappers; the cache write; the batch-invariant linear; bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import fastlm
from fastlm.ops import paged_attention as pa
from tests.helpers import assert_close, backend_params, poison_outputs

LENS = [0, 1, 15, 16, 17, 100]


def _paged_case(lens, H, Hkv, D, bs, dtype, seed=0):
    """Random caches with each request's blocks at shuffled block ids; returns q, caches, tables."""
    g = torch.Generator().manual_seed(seed)
    need = [(L + bs - 1) // bs for L in lens]
    max_blocks = max(max(need), 1)
    nb = sum(need) + 3                                   # spare blocks that nobody reads
    perm = torch.randperm(nb, generator=g)
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)   # -1: unused entries
    i = 0
    for r, n in enumerate(need):
        tables[r, :n] = perm[i:i + n].to(torch.int32)
        i += n
    k = torch.randn(nb, Hkv, bs, D, generator=g).to(dtype)
    v = torch.randn(nb, Hkv, bs, D, generator=g).to(dtype)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, k, v, tables


def _on(device, *ts):
    """The tensors on `device` (the parametrized tests build them on CPU, then move them)."""
    return [t.to(device) for t in ts]


def _torch_baseline(q, k, v, tables, seq, lens, scale):
    """The same math by PyTorch in q's dtype (the error bound's baseline)."""
    return pa.paged_attention_fwd_ref(q, k, v, tables, seq, lens, scale) if q.dtype == torch.float32 else \
        _low(q, k, v, tables, seq, lens, scale)


def _low(q, k, v, tables, seq, lens, scale):
    T, H, D = q.shape
    _, Hkv, bs, _ = k.shape
    out = torch.zeros_like(q)
    for t in range(T):
        L = int(lens[t])
        if L == 0:
            continue
        blocks = tables[int(seq[t]), : (L + bs - 1) // bs].long()
        kk = k[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L].repeat_interleave(H // Hkv, 0)
        vv = v[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L].repeat_interleave(H // Hkv, 0)
        out[t] = torch.nn.functional.scaled_dot_product_attention(q[t][:, None], kk, vv, scale=scale)[:, 0]
    return out


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention"))
@pytest.mark.parametrize("H,Hkv,D,bs", [(4, 4, 64, 16), (6, 2, 40, 16), (3, 1, 17, 5), (2, 2, 128, 8), (8, 2, 64, 5)])
def test_paged_decode_matches_ref(device, backend, dtype, H, Hkv, D, bs):
    lens = LENS if backend != "triton" else [0, 1, 15, 17, 40]
    q, k, v, tables = _paged_case(lens, H, Hkv, D, bs, dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    with fastlm.use_backend(backend), poison_outputs():
        out = pa.paged_decode_attention(*_on(device, q, k, v, tables, cl)).cpu()
    seq = torch.arange(len(lens), dtype=torch.int32)
    oracle = pa.paged_attention_fwd_ref(q.double(), k.double(), v.double(), tables, seq, cl, scale)
    base = None if dtype == torch.float32 else _low(q, k, v, tables, seq, cl, scale)
    assert_close(f"paged decode {backend} {dtype}", out, oracle, base)
    assert torch.all(out[0] == 0)  # length 0: zeros


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention"))
@pytest.mark.parametrize("D", [32, 64])
def test_paged_prefill_matches_dense_causal(device, backend, dtype, D):
    """A chunk of new tokens per request over its cached prefix == dense causal attention over the whole
    sequence, restricted to the chunk's rows. (D 64 fp32 on AVX-512: the query-block kernel, chunks
    longer than its 12-token blocks.)"""
    H, Hkv, bs = 4, 2, 16
    totals, chunks = [17, 40, 5, 33, 70], [17, 7, 1, 16, 30]   # request r: chunk = the last chunks[r] tokens
    g = torch.Generator().manual_seed(1)
    q, k, v, tables = _paged_case(totals, H, Hkv, D, bs, dtype, seed=1)
    qs = [torch.randn(c, H, D, generator=g).to(dtype) for c in chunks]
    qcat = torch.cat(qs)
    qsl = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32)
    with fastlm.use_backend(backend), poison_outputs():
        out = pa.paged_prefill_attention(*_on(device, qcat, k, v, tables, qsl, torch.tensor(totals, dtype=torch.int32)))
    out = out.cpu()
    for r, (L, c) in enumerate(zip(totals, chunks)):
        blocks = tables[r, : (L + bs - 1) // bs].long()
        kk = k[blocks].double().permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L].repeat_interleave(H // Hkv, 0)
        vv = v[blocks].double().permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :L].repeat_interleave(H // Hkv, 0)
        qq = qs[r].double().permute(1, 0, 2)                                     # (H, c, D)
        mask = torch.arange(L)[None, :] <= torch.arange(L - c, L)[:, None]     # (c, L) causal at the tail
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).permute(1, 0, 2)
        assert_close(f"prefill r{r} {backend} {dtype}", out[qsl[r]:qsl[r + 1]], ref, None,
                     atol={torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype])


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention", [torch.float32]))
def test_paged_attention_token_invariance(device, backend, dtype):
    """A token's output does not depend on the other tokens in the call (bit for bit on cpu)."""
    q, k, v, tables = _paged_case([1, 15, 16, 17, 100, 33], 4, 2, 64, 16, dtype)
    lens = torch.tensor([1, 15, 16, 17, 100, 33], dtype=torch.int32)
    seq = torch.arange(6, dtype=torch.int32)
    q, k, v, tables, seq, lens = _on(device, q, k, v, tables, seq, lens)
    with fastlm.use_backend(backend):
        full = pa.paged_attention(q, k, v, tables, seq, lens)
        for idx in ([4], [1, 4], [5, 4, 0]):
            part = pa.paged_attention(q[idx], k, v, tables, seq[idx], lens[idx])
            if backend == "cpu":
                assert torch.equal(part, full[idx])
            else:
                torch.testing.assert_close(part, full[idx])


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention", [torch.float32]))
@pytest.mark.parametrize("H,Hkv,D,bs", [(4, 2, 64, 16), (2, 2, 128, 5), (3, 3, 40, 16)])
def test_paged_prefill_token_invariance(device, backend, dtype, H, Hkv, D, bs):
    """A prefill chunk's token == the same token computed alone (as a decode step would), bit for bit
    on cpu, whatever query block the chunk's tokens fall into."""
    q, k, v, tables = _paged_case([45, 45], H, Hkv, D, bs, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    qc = torch.randn(45, H, D, generator=g)
    seq = torch.tensor([0] * 30 + [1] * 15, dtype=torch.int32)
    lens = torch.tensor(list(range(16, 46)) + list(range(31, 46)), dtype=torch.int32)
    qc, k, v, tables, seq, lens = _on(device, qc, k, v, tables, seq, lens)
    with fastlm.use_backend(backend):
        full = pa.paged_attention(qc, k, v, tables, seq, lens)
        for t in (0, 11, 12, 13, 29, 30, 44):
            one = pa.paged_attention(qc[t:t + 1], k, v, tables, seq[t:t + 1], lens[t:t + 1])
            if backend == "cpu":
                assert torch.equal(one, full[t:t + 1]), t
            else:
                torch.testing.assert_close(one, full[t:t + 1])
        part = pa.paged_attention(qc[5:40], k, v, tables, seq[5:40], lens[5:40])   # other block boundaries
        if backend == "cpu":
            assert torch.equal(part, full[5:40])


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention", [torch.float32]))
def test_paged_attention_nan(device, backend, dtype):
    q, k, v, tables = _paged_case([5, 9], 2, 2, 16, 4, dtype)
    blk = int(tables[1, 1])
    k[blk, 0, 0, 3] = float("nan")                        # request 1's position 4, kv head 0
    with fastlm.use_backend(backend):
        out = pa.paged_decode_attention(*_on(device, q, k, v, tables, torch.tensor([5, 9], dtype=torch.int32))).cpu()
    assert torch.isnan(out[1, 0]).all()
    assert not torch.isnan(out[1, 1]).any() and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("device,backend,dtype", backend_params("paged_attention"))
def test_paged_kv_write(device, backend, dtype):
    nb, Hkv, bs, D = 5, 3, 4, 7
    kc, vc = torch.zeros(nb, Hkv, bs, D, dtype=dtype), torch.zeros(nb, Hkv, bs, D, dtype=dtype)
    key, val = torch.randn(6, Hkv, D).to(dtype), torch.randn(6, Hkv, D).to(dtype)
    slots = torch.tensor([0, 3, 4, -1, 19, 9])
    dkc, dvc = _on(device, kc, vc)
    with fastlm.use_backend(backend):
        pa.paged_kv_write(*_on(device, key, val), dkc, dvc, slots.to(device))
    kc, vc = dkc.cpu(), dvc.cpu()
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    pa.paged_kv_write_ref(key, val, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert kc[4 // bs, :, 4 % bs].equal(key[2]) and kc[19 // bs, :, 19 % bs].equal(key[4])
    assert int((kc != 0).any(-1).sum()) == 5 * Hkv       # the -1 row is skipped


@pytest.mark.parametrize("device,backend,dtype", backend_params("linear_rowwise"))
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (37, 129, 31), (70, 64, 5), (3, 17, 100), (23, 48, 17),
                                   (67, 100, 13), (9, 768, 769), (70, 2100, 13), (6, 2080, 7), (530, 77, 65)])
@pytest.mark.parametrize("act", ["none", "tanh", "erf"])
def test_linear_rowwise(device, backend, dtype, M, K, N, act):
    x, w, b = torch.randn(M, K).to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype), torch.randn(N).to(dtype)
    with fastlm.use_backend(backend), poison_outputs():
        y = pa.linear_rowwise(*_on(device, x, w, b), act).cpu()
    oracle = pa.linear_rowwise_fwd_ref(x.double(), w.double(), b.double(), act)
    base = pa.linear_rowwise_fwd_ref(x, w, b, act) if dtype != torch.float32 else None
    assert_close(f"linear_rowwise {backend} {dtype}", y, oracle, base,
                 atol={torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])
    if backend == "cpu":
        # batch invariance: every row == the row alone, bit for bit; fp32 == fastlm's C++ linear on one
        # row (forced: auto may pick torch's BLAS for ops.linear, whose sums are ordered differently)
        with fastlm.use_backend("cpu"):
            _check_rowwise_invariance(x, w, b, act, dtype, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 15, 16, 31, 33, 48, 64, 95, 768])
def test_linear_rowwise_packed(dtype, K):
    # the many-row kernel (AVX-512; packed per call from 512 rows, or given linear_rowwise_pack's
    # copy at any row count): every row bit for bit the one-row value; K tails past 32 and 16 steps,
    # N past the 64-column panels, M past the 6-row tiles and 96-row chunks
    if "cpu" not in fastlm.available_backends("linear_rowwise"):
        pytest.skip("needs fastlm's C++ CPU ops")
    torch.manual_seed(K)
    N = 130
    x, w, b = torch.randn(200, K).to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype), torch.randn(N).to(dtype)
    packed = pa.linear_rowwise_pack(w)
    with fastlm.use_backend("cpu"):
        for M in (1, 5, 13, 200):
            with poison_outputs():
                y = pa.linear_rowwise(x[:M], w, b, "none", packed)
            assert not y.isnan().any()
            for i in range(M):
                assert torch.equal(pa.linear_rowwise(x[i:i + 1], w, b, "none"), y[i:i + 1]), (M, i)
    oracle = pa.linear_rowwise_fwd_ref(x.double(), w.double(), b.double(), "none")
    assert_close(f"linear_rowwise packed {dtype}", y, oracle, None if dtype == torch.float32 else
                 pa.linear_rowwise_fwd_ref(x, w, b, "none"),
                 atol={torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])
    if packed is not None:   # a packed copy of another shape is refused
        with pytest.raises(RuntimeError, match="packed"):
            torch.ops.fastlm_C.linear_rowwise_fwd(x, w[:64], b[:64], "none", packed)


def _check_rowwise_invariance(x, w, b, act, dtype, y):
    # every row: M spans several register tiles and row chunks with remainders (AVX-512: tiles of
    # 4 rows x 3 W rows, or of 4 x 6 as two accumulator chains at K >= 2048), K tails of 1..31 past
    # a multiple of 32 (the masked tail), N not a multiple of 3 or 6
    M = x.shape[0]
    for i in range(M):
        assert torch.equal(pa.linear_rowwise(x[i:i + 1], w, b, act), y[i:i + 1]), i
    if act == "none" and dtype == torch.float32:
        for i in (0, M - 1):
            assert torch.equal(fastlm.ops.linear(x[i:i + 1], w, b), y[i:i + 1])


def test_bad_inputs():
    q, k, v, tables = _paged_case([5, 9], 2, 2, 16, 4, torch.float32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    seq = torch.arange(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="query"):
        pa.paged_attention(q[0], k, v, tables, seq, lens)
    with pytest.raises(TypeError, match="key_lens"):
        pa.paged_attention(q, k, v, tables, seq, lens.float())
    with pytest.raises(ValueError, match="key_lens"):
        pa.paged_attention(q, k, v, tables, seq, torch.tensor([5, 99], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_index"):
        pa.paged_attention(q, k, v, tables, torch.tensor([0, 2], dtype=torch.int32), lens)
    bad = tables.clone()
    bad[1, 0] = 1000
    with pytest.raises(ValueError, match="block ids"):
        pa.paged_attention(q, k, v, bad, seq, lens)
    with pytest.raises(TypeError, match="value_cache"):
        pa.paged_attention(q, k, v.half(), tables, seq, lens)
    with pytest.raises(ValueError, match="multiple"):
        pa.paged_attention(torch.randn(2, 3, 16), k, v, tables, seq, lens)
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.paged_kv_write(torch.randn(2, 2, 16), torch.randn(2, 2, 16), k, v, torch.tensor([0, 10 ** 6]))
    with pytest.raises(ValueError, match="query_start_loc"):
        pa.paged_prefill_attention(q, k, v, tables, torch.tensor([0, 1, 3]), lens)
    with pytest.raises(ValueError, match="activation"):
        pa.linear_rowwise(torch.randn(2, 4), torch.randn(3, 4), None, "relu")
    # the C++ op itself refuses a block id out of range (a direct torch.ops call)
    if "cpu" in fastlm.available_backends("paged_attention"):
        with pytest.raises(RuntimeError, match="block_tables"):
            torch.ops.fastlm_C.paged_attention_fwd(q, k, v, bad, seq, lens, 0.25)


# ---------------------------------------------------------------- the cuda backend (csrc/cuda/paged_attention.cu)
# Inputs are made on the CPU (the fp64 oracle's copies stay there) and moved to the GPU. The grid covers
# both kernel paths: few tokens with a long context (the key split + merge kernel) and many tokens (no
# split); 16-byte loads (D 64/80/128/256) and scalar loads (D 17); heads per CTA 1, 2, 4, 8 and two head
# chunks (G 12); block sizes 16 and 5; key_lens 0, 1, block edges and > 1 split.

_CUDA_REASON = "needs a CUDA device and fastlm's CUDA kernels (scripts/gpu_check.sh)"
requires_cuda_paged = pytest.mark.skipif(not torch.cuda.is_available(), reason=_CUDA_REASON)
CUDA_LENS = [0, 1, 15, 16, 17, 100, 1500]          # 1500: 12 splits of 128 keys when the grid is small


def _need_cuda_backend():
    if "cuda" not in fastlm.available_backends("paged_attention", "cuda"):
        pytest.skip(_CUDA_REASON)


def _check_cuda_paged(q, k, v, tables, seq, lens, dtype, label):
    """The cuda backend on GPU copies (outputs and split buffers NaN-poisoned) against the fp64 oracle,
    under the parity rule (baseline: the same math by PyTorch in the low dtype)."""
    scale = 1 / math.sqrt(q.shape[-1])
    dev = torch.device("cuda")
    with fastlm.use_backend("cuda"), poison_outputs():
        out = pa.paged_attention(q.to(dev), k.to(dev), v.to(dev), tables.to(dev), seq.to(dev), lens.to(dev), scale)
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and out.dtype == dtype
    oracle = pa.paged_attention_fwd_ref(q.double(), k.double(), v.double(), tables, seq, lens, scale)
    base = None if dtype == torch.float32 else _low(q, k, v, tables, seq, lens, scale)
    assert_close(label, out.cpu(), oracle, base)
    zero = lens == 0
    if bool(zero.any()):
        assert torch.all(out.cpu()[zero] == 0), f"{label}: key_lens 0 must give zeros"
    return out


@requires_cuda_paged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D,bs", [(4, 4, 64, 16), (8, 2, 64, 5), (4, 1, 80, 16), (8, 8, 128, 5), (6, 3, 128, 5),
                                        (8, 2, 128, 16), (6, 1, 17, 5), (12, 1, 96, 16), (16, 2, 256, 16)])
def test_paged_attention_cuda_decode_matches_ref(dtype, H, Hkv, D, bs):
    """Few tokens, ragged lengths up to 1500: the split-K path (and its merge) on any GPU with >= 2 SMs."""
    _need_cuda_backend()
    q, k, v, tables = _paged_case(CUDA_LENS, H, Hkv, D, bs, dtype, seed=H * 1000 + D + bs)
    lens = torch.tensor(CUDA_LENS, dtype=torch.int32)
    seq = torch.arange(len(CUDA_LENS), dtype=torch.int32)
    _check_cuda_paged(q, k, v, tables, seq, lens, dtype, f"cuda decode H{H}/{Hkv} D{D} bs{bs} {dtype}")


@requires_cuda_paged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D,bs", [(4, 4, 64, 16), (8, 2, 80, 5), (4, 1, 128, 16)])
def test_paged_attention_cuda_prefill_matches_ref(dtype, H, Hkv, D, bs):
    """A prefill chunk of 1200 tokens (positions 100..1299 of one request, key_lens = position + 1)
    beside decode tokens of other requests (lengths 0, 1, 333): with T x Hkv CTAs filling the GPU, the
    path without a split. Each token's result matches the oracle and the same token computed alone
    (which takes the split path)."""
    _need_cuda_backend()
    totals = [1300, 0, 1, 333]
    q, k, v, tables = _paged_case(totals, H, Hkv, D, bs, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    n = 1200
    seq = torch.tensor([0] * n + [1, 2, 3], dtype=torch.int32)
    lens = torch.tensor(list(range(101, 101 + n)) + [0, 1, 333], dtype=torch.int32)
    qs = torch.randn(n + 3, H, D, generator=g).to(dtype)
    pick = torch.tensor([0, 1, 517, n - 1, n, n + 1, n + 2])       # the oracle's loop is slow: a sample
    full = _check_cuda_paged(qs[pick], k, v, tables, seq[pick], lens[pick], dtype, f"cuda sample {dtype}")
    dev = torch.device("cuda")
    with fastlm.use_backend("cuda"), poison_outputs():
        out = pa.paged_attention(qs.to(dev), k.to(dev), v.to(dev), tables.to(dev), seq.to(dev), lens.to(dev))
    torch.cuda.synchronize()
    out = out.cpu()
    assert not out.isnan().any()
    scale = 1 / math.sqrt(D)
    oracle = pa.paged_attention_fwd_ref(qs[pick].double(), k.double(), v.double(), tables, seq[pick], lens[pick],
                                        scale)
    base = None if dtype == torch.float32 else _low(qs[pick], k, v, tables, seq[pick], lens[pick], scale)
    assert_close(f"cuda prefill H{H}/{Hkv} D{D} bs{bs} {dtype}", out[pick], oracle, base)
    # alone (split) vs in the big batch (no split): the same up to the output's rounding
    tol = {torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}[dtype]
    torch.testing.assert_close(out[pick], full.cpu(), rtol=tol, atol=tol)
    assert torch.all(out[n] == 0)


@requires_cuda_paged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_kv_write_cuda(dtype):
    """The cuda cache write == the reference scatter: int64 and int32 slots, -1 skipped, a strided key."""
    _need_cuda_backend()
    dev = torch.device("cuda")
    nb, Hkv, bs, D = 7, 3, 5, 7
    g = torch.Generator().manual_seed(3)
    key_wide = torch.randn(6, Hkv, D + 4, generator=g).to(dtype)
    key = key_wide[:, :, :D]
    key_dev = key_wide.to(dev)[:, :, :D]                                       # not contiguous
    val = torch.randn(6, Hkv, D, generator=g).to(dtype)
    slots = torch.tensor([0, 3, 4, -1, 34, 9])
    kr, vr = torch.zeros(nb, Hkv, bs, D, dtype=dtype), torch.zeros(nb, Hkv, bs, D, dtype=dtype)
    pa.paged_kv_write_ref(key, val, kr, vr, slots)
    for sl in (slots, slots.to(torch.int32)):
        kc, vc = torch.zeros_like(kr, device=dev), torch.zeros_like(vr, device=dev)
        torch.ops.fastlm_C.paged_kv_write(key_dev, val.to(dev), kc, vc, sl.to(dev))
        assert torch.equal(kc.cpu(), kr) and torch.equal(vc.cpu(), vr)
    kc, vc = torch.zeros_like(kr, device=dev), torch.zeros_like(vr, device=dev)
    with fastlm.use_backend("cuda"):
        pa.paged_kv_write(key_dev, val.to(dev), kc, vc, slots.to(dev))
    assert torch.equal(kc.cpu(), kr) and torch.equal(vc.cpu(), vr)


@requires_cuda_paged
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_cuda_strided_query(dtype):
    """A query whose token/head strides are not 16-byte multiples (a slice of a wider tensor): the
    kernel's scalar-load path for a head dim that would otherwise take 16-byte loads."""
    _need_cuda_backend()
    lens_list = [3, 0, 260]
    q, k, v, tables = _paged_case(lens_list, 4, 2, 64, 16, dtype, seed=11)
    q_wide = torch.randn(3, 4, 67, generator=torch.Generator().manual_seed(12)).to(dtype)
    q = q_wide[:, :, :64]
    scale = 0.125
    dev = torch.device("cuda")
    lens = torch.tensor(lens_list, dtype=torch.int32)
    seq = torch.arange(3, dtype=torch.int32)
    with fastlm.use_backend("cuda"), poison_outputs():
        out = pa.paged_attention(q_wide.to(dev)[:, :, :64], k.to(dev), v.to(dev), tables.to(dev), seq.to(dev),
                                 lens.to(dev), scale)
    oracle = pa.paged_attention_fwd_ref(q.double(), k.double(), v.double(), tables, seq, lens, scale)
    base = None if dtype == torch.float32 else _low(q.contiguous(), k, v, tables, seq, lens, scale)
    assert_close(f"cuda strided query {dtype}", out.cpu(), oracle, base)


@requires_cuda_paged
def test_paged_attention_cuda_nan_and_bad_values():
    """NaN in a key poisons only its head; bad values (never validated on the host by the op itself, so
    it stays graph-capturable) give NaN instead of an out-of-bounds read."""
    _need_cuda_backend()
    dev = torch.device("cuda")
    q, k, v, tables = _paged_case([5, 9, 300], 2, 2, 16, 4, torch.float32)
    k[int(tables[1, 1]), 0, 0, 3] = float("nan")                 # request 1's position 4, kv head 0
    seq = torch.arange(3, dtype=torch.int32)
    lens = torch.tensor([5, 9, 300], dtype=torch.int32)
    args = [t.to(dev) for t in (q, k, v, tables, seq, lens)]
    out = torch.ops.fastlm_C.paged_attention_fwd(*args, 0.25).cpu()
    assert torch.isnan(out[1, 0]).all()
    assert not torch.isnan(out[1, 1]).any() and not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()
    bad = tables.clone()
    bad[0, 1] = 10 ** 6                                          # a block id past num_blocks
    out = torch.ops.fastlm_C.paged_attention_fwd(args[0], args[1], args[2], bad.to(dev), args[4], args[5], 0.25).cpu()
    assert torch.isnan(out[0]).all() and not torch.isnan(out[2]).any()
    for seq_bad, lens_bad in (([0, 7, 2], [5, 9, 300]), ([0, 1, 2], [5, -1, 10 ** 6])):
        out = torch.ops.fastlm_C.paged_attention_fwd(
            args[0], args[1], args[2], args[3], torch.tensor(seq_bad, dtype=torch.int32, device=dev),
            torch.tensor(lens_bad, dtype=torch.int32, device=dev), 0.25).cpu()
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="block_tables"):
        torch.ops.fastlm_C.paged_attention_fwd(args[0], args[1], args[2], args[3].long(), args[4], args[5], 0.25)
    with pytest.raises(RuntimeError, match="v_cache"):
        torch.ops.fastlm_C.paged_attention_fwd(args[0], args[1], args[2].half(), args[3], args[4], args[5], 0.25)


@requires_cuda_paged
def test_paged_attention_cuda_graph_capture():
    """The op reads no device value on the host: it is captured in a CUDA graph, and a replay after the
    lengths change in place gives the eager result for the new lengths (split path: 2 tokens)."""
    _need_cuda_backend()
    dev = torch.device("cuda")
    q, k, v, tables = _paged_case([700, 40], 8, 2, 64, 16, torch.float16, seed=5)
    q, k, v, tables = (t.to(dev) for t in (q, k, v, tables))
    seq = torch.arange(2, dtype=torch.int32, device=dev)
    lens = torch.tensor([700, 40], dtype=torch.int32, device=dev)
    op = torch.ops.fastlm_C.paged_attention_fwd
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(q, k, v, tables, seq, lens, 0.125)                    # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, tables, seq, lens, 0.125)
    lens.copy_(torch.tensor([311, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, op(q, k, v, tables, seq, lens, 0.125))
