"""decode_attention: parity of every backend this machine has against the fp64 reference, with ragged
lengths (1, S_max, odd, 0), GQA/MQA, strided caches, int32/int64 lengths and NaN-poisoned outputs;
gradient (through the reference), opcheck, torch.compile, and bad inputs. FASTLM_TEST_FULL=1 (the GPU
run) adds long and wide shapes."""
import math

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import reference
from helpers import FULL, assert_close, backend_params, poison_outputs

# (B, H, Hkv, S_max, D, lengths)
CASES = [
    (3, 4, 2, 37, 40, [1, 37, 20]),          # GQA, lengths 1 / S_max / odd
    (2, 6, 1, 65, 64, [65, 33]),             # MQA
    (1, 2, 2, 130, 16, [129]),               # longer than a block, odd
    (4, 8, 8, 17, 128, [17, 1, 5, 16]),      # MHA, D = 128
    (2, 3, 3, 9, 80, [0, 9]),                # an empty row gives zeros
    (1, 4, 2, 23, 256, [23]),                # the largest head dim
]
if FULL:
    CASES += [(1, 32, 8, 4096, 128, [4001]), (64, 12, 12, 1024, 64, None), (8, 16, 2, 2048, 96, None)]


def _inputs(B, H, Hkv, S, D, lens, dtype, device, strided=False):
    q = torch.randn(B, H, D, dtype=dtype, device=device)
    extra = 5 if strided else 0   # a cache view inside a longer buffer: strided in S_max
    k = torch.randn(B, Hkv, S + extra, D, dtype=dtype, device=device)[:, :, :S]
    v = torch.randn(B, Hkv, S + extra, D, dtype=dtype, device=device)[:, :, :S]
    if lens is None:
        lens = torch.randint(1, S + 1, (B,)).tolist()
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device,backend,dtype", backend_params("decode_attention"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_decode_attention_matches_ref(device, backend, dtype, case):
    B, H, Hkv, S, D, lens = case
    q, k, v, L = _inputs(B, H, Hkv, S, D, lens, dtype, device, strided=(B % 2 == 0))
    with fastlm.use_backend(backend), poison_outputs():
        out = ops.decode_attention(q, k, v, L)
    scale = 1 / math.sqrt(D)
    oracle = reference.decode_attention_fwd_ref(q.double(), k.double(), v.double(), L, scale)
    torch_in_dtype = reference.decode_attention_fwd_ref(q, k, v, L, scale, upcast=False)
    assert out.dtype == dtype and out.shape == (B, H, D)
    assert_close("out", out, oracle, torch_in_dtype, factor=2.0)
    if 0 in L.tolist():
        assert (out[L == 0] == 0).all()


@pytest.mark.parametrize("device,backend,dtype", backend_params("decode_attention", dtypes=[torch.float32]))
def test_decode_attention_int64_lengths_and_scale(device, backend, dtype):
    q, k, v, L = _inputs(2, 4, 2, 21, 32, [7, 21], dtype, device)
    with fastlm.use_backend(backend):
        out = ops.decode_attention(q, k, v, L.long(), scale=0.3)
    oracle = reference.decode_attention_fwd_ref(q.double(), k.double(), v.double(), L, 0.3)
    assert_close("out", out, oracle, None, atol=2e-5)


@pytest.mark.parametrize("device,backend,dtype", backend_params("decode_attention", dtypes=[torch.float32]))
@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the Triton interpreter runs NaN through numpy
def test_decode_attention_nan_propagates(device, backend, dtype, D):
    """A NaN in a row's query or cache makes that row's output NaN (as torch's attention), never a
    silent finite value; other rows are unaffected."""
    q, k, v, L = _inputs(3, 4, 2, 40, D, [40, 33, 17], dtype, device)
    q[0, 1, 3] = float("nan")          # row 0, head 1
    k[1, 0, 20, 5] = float("nan")      # row 1, kv head 0 (heads 0, 1), inside its length
    k[2, 0, 30, 5] = float("nan")      # row 2: past its length (17): never read
    with fastlm.use_backend(backend):
        out = ops.decode_attention(q, k, v, L)
    assert out[0, 1].isnan().all() and out[1, :2].isnan().all()
    assert torch.isfinite(out[0, [0, 2, 3]]).all() and torch.isfinite(out[1, 2:]).all() and torch.isfinite(out[2]).all()


def test_decode_attention_matches_sdpa_on_prefix():
    """Against torch's own attention on each row's valid prefix (independent of the reference)."""
    q, k, v, L = _inputs(3, 6, 2, 19, 24, [4, 19, 11], torch.float64, "cpu")
    with fastlm.use_backend("reference"):  # fp64: the reference backend
        out = ops.decode_attention(q, k, v, L)
    for b, n in enumerate(L.tolist()):
        kk = k[b, :, :n].repeat_interleave(3, dim=0)
        vv = v[b, :, :n].repeat_interleave(3, dim=0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kk, vv)[:, 0]
        torch.testing.assert_close(out[b], ref)


def test_decode_attention_grad():
    q, k, v, L = _inputs(2, 4, 2, 11, 16, [3, 11], torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.decode_attention(*leaves, L)
    dy = torch.randn_like(out)
    out.backward(dy)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.decode_attention_fwd_ref(*l64, L, 0.25).backward(dy.double())
    for mine, orc in zip(leaves, l64):
        assert_close("grad", mine.grad, orc.grad, None, atol=1e-5)


@pytest.mark.parametrize("backend", fastlm.available_backends("decode_attention", "cpu"))
def test_opcheck(backend):
    q, k, v, L = _inputs(2, 4, 2, 9, 16, [3, 9], torch.float32, "cpu")
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.decode_attention_fwd.default, (q, k, v, L, 0.25))


def test_compile_fullgraph():
    q, k, v, L = _inputs(2, 4, 2, 9, 16, [3, 9], torch.float32, "cpu")

    def step(q, k, v, L):
        return ops.decode_attention(q * 2, k, v, L) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, L), step(q, k, v, L))


def test_bad_inputs():
    q, k, v, L = _inputs(2, 4, 2, 9, 16, [3, 9], torch.float32, "cpu")
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode_attention(q, k, v, torch.tensor([3, 10], dtype=torch.int32))      # beyond S_max
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode_attention(q, k, v, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="batch"):
        ops.decode_attention(q[:1], k, v, L[:1])
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode_attention(q, k, v, L[:1])
    with pytest.raises(ValueError, match="multiple"):
        ops.decode_attention(torch.randn(2, 3, 16), k, v, L)
    with pytest.raises(ValueError, match="head dim"):
        ops.decode_attention(torch.randn(2, 4, 8), k, v, L)
    with pytest.raises(ValueError, match="query"):
        ops.decode_attention(q[0], k, v, L)
    with pytest.raises(ValueError, match="value_cache"):
        ops.decode_attention(q, k, v[:, :, :5], L)
    with pytest.raises(TypeError, match="key_cache"):
        ops.decode_attention(q, k.half(), v.half(), L)
    with pytest.raises(TypeError, match="cache_seqlens"):
        ops.decode_attention(q, k, v, L.float())
    with pytest.raises(TypeError, match="query"):
        ops.decode_attention(q.long(), k, v, L)
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        ops.decode_attention(q, k, v, L.to("meta"))
