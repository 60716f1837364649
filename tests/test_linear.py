"""ops.linear (== F.linear): parity of every backend against the fp64 reference for few rows (the
weight-streaming CPU kernel) and many rows (BLAS), odd sizes, with and without bias, NaN-poisoned
outputs; gradients; opcheck; torch.compile; bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import reference
from helpers import FULL, assert_close, backend_params, poison_outputs

# (leading shape, K, N): 1..16 rows take the streaming kernel, 17+ rows BLAS
SHAPES = [((1,), 7, 5), ((1,), 768, 130), ((2,), 33, 65), ((3,), 100, 129), ((2, 4), 64, 50), ((16,), 40, 17),
          ((5,), 1, 3), ((17,), 33, 9), ((3, 11), 24, 31),
          # every row block of the register-tiled kernel (8+4+2+1 rows), K tails (< 16, 16 + 3), N % 3
          ((15,), 19, 301), ((7,), 35, 4),
          # K up to 4096 unblocked; beyond, several K blocks of 512 (the last one with a masked tail)
          ((9,), 1100, 67), ((9,), 4200, 37)]
if FULL:
    SHAPES += [((1,), 4096, 11008), ((8,), 768, 50257), ((512,), 1024, 4096)]


@pytest.mark.parametrize("device,backend,dtype", backend_params("linear"))
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_forward_backward(device, backend, dtype, lead, K, N, has_bias):
    x = torch.randn(*lead, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) / K ** 0.5
    b = torch.randn(N, dtype=dtype, device=device) if has_bias else None
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.linear(x, w, b)
    y64 = reference.linear_fwd_ref(x.double().reshape(-1, K), w.double(), None if b is None else b.double())
    yt = reference.linear_fwd_ref(x.reshape(-1, K), w, b, upcast=False)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert_close("out", y.reshape(-1, N), y64, yt, factor=2.0)
    # backward
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    dy = torch.randn(*lead, N, dtype=dtype, device=device)
    with fastlm.use_backend(backend):
        ops.linear(*leaves[:2], leaves[2] if has_bias else None).backward(dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    F.linear(*l64[:2], l64[2] if has_bias else None).backward(dy.double())
    lt = [t.detach().clone().requires_grad_() for t in leaves]
    F.linear(*lt[:2], lt[2] if has_bias else None).backward(dy)
    for name, mine, orc, base in zip(["dx", "dweight", "dbias"], leaves, l64, lt):
        assert_close(name, mine.grad, orc.grad, base.grad, factor=3.0,
                     atol=None if dtype == torch.float32 else 2e-2)


def test_linear_noncontiguous_input():
    x = torch.randn(6, 40)[::2, 3:35]   # strided rows and columns
    w = torch.randn(9, 32)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in fastlm.available_backends("linear", "cpu")])
def test_opcheck(backend):
    x, w, b = torch.randn(3, 20), torch.randn(7, 20), torch.randn(7)
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.linear_fwd.default, (x, w, b))
        torch.library.opcheck(torch.ops.fastlm.linear_fwd.default, (x, w, None))


def test_compile_fullgraph():
    x, w, b = torch.randn(2, 20), torch.randn(7, 20), torch.randn(7)
    f = lambda x: ops.linear(torch.relu(x), w, b) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_bad_inputs():
    x, w, b = torch.randn(2, 20), torch.randn(7, 20), torch.randn(7)
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(torch.randn(2, 19), w, b)
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, w[0], b)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, b[:6])
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, w.double(), b)
    with pytest.raises(TypeError, match="bias"):
        ops.linear(x, w, b.half())
    with pytest.raises(TypeError, match="input"):
        ops.linear(x.long(), w, b)
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, "w")


def test_linear_concurrent_callers():
    """The CPU kernel serves several Python threads at once (each gets its own result)."""
    import threading

    ws = [torch.randn(1000 + 7 * i, 96) for i in range(3)]
    x = torch.randn(2, 96)
    errs = []

    def run(w):
        for _ in range(20):
            errs.append((ops.linear(x, w) - F.linear(x, w)).abs().max().item())

    threads = [threading.Thread(target=run, args=(w,)) for w in ws]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errs) == 60 and max(errs) < 1e-4


def test_dense_linear():
    """fastlm.ops.linear.dense_linear (the models' prefill/training projections): == F.linear for row- and column-major weights,
    leading dims, strided rows, with or without bias; oneDNN only without autograd, gradients otherwise."""
    from fastlm.ops.linear import dense_linear as linear

    x = torch.randn(2, 7, 2 * 40)[..., :40]
    w, b = torch.randn(37, 40) / 40 ** 0.5, torch.randn(37)
    for weight in (w, w.t().contiguous().t()):
        for bias in (b, None):
            with torch.inference_mode():
                y = linear(x, weight, bias)
            assert y.shape == (2, 7, 37)
            torch.testing.assert_close(y, F.linear(x.double(), weight.double(), None if bias is None else bias.double())
                                       .float(), rtol=1e-5, atol=1e-5)
    # gradients (the oneDNN autograd path on CPU fp32), the stored weight row-major and (in, out) as Conv1D's
    for stored, view in ((w, lambda t: t), (w.t().contiguous(), lambda t: t.t())):
        leaves = [t.clone().requires_grad_() for t in (x, stored, b)]
        y = linear(leaves[0], view(leaves[1]), leaves[2])
        dy = torch.randn_like(y)
        y.backward(dy)
        o64 = [t.detach().double().requires_grad_() for t in (x, stored, b)]
        F.linear(o64[0], view(o64[1]), o64[2]).backward(dy.double())
        for mine, ref in zip(leaves, o64):
            torch.testing.assert_close(mine.grad, ref.grad.float(), rtol=1e-5, atol=1e-4)
        assert leaves[1].grad.stride() == stored.stride()
        xl = x.clone().requires_grad_()
        linear(xl, view(stored), b).sum().backward()           # an expanded (stride-0) gradient
        torch.testing.assert_close(xl.grad, view(stored).sum(0).expand(2, 7, 40))
    assert linear(x.double(), w.double(), b.double()).dtype == torch.float64
