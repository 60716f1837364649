"""The GELU feed-forward (linear_gelu, gelu_ffn): parity of every backend this machine has against the
fp64 reference (forward and gradients of all inputs, odd shapes, both GELUs, with and without biases,
NaN-poisoned outputs), real GPT-2/BERT sizes on the CPU kernel, opcheck, torch.compile, the module
and bad inputs. On the GPU machine (FASTLM_TEST_FULL=1) the same tests run on CUDA with larger shapes."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import reference
from helpers import FULL, INTERPRET, assert_close, backend_params, poison_outputs, requires_cuda

# (rows M, d_in K, d_ff F): nothing a multiple of a block size except by accident.
SHAPES = [(1, 40, 96), (7, 72, 200), (129, 40, 200), (7, 40, 37)]
FULL_SHAPES = [(1031, 768, 3072), (257, 1024, 4096), (4096, 768, 3072)]  # on CUDA, FASTLM_TEST_FULL=1
INTERPRET_SHAPES = [(1, 40, 96), (7, 72, 37), (33, 40, 200)]  # triton under the interpreter: tiny


def _shapes(device, backend):
    if device == "cpu":
        return INTERPRET_SHAPES if backend == "triton" else SHAPES
    return SHAPES + (FULL_SHAPES if FULL else [])


def _params(K, F_, N, dtype, device, bias):
    """Weights scaled like nn.Linear's init (outputs of order 1), biases of order 1."""
    w1 = torch.randn(F_, K, device=device, dtype=dtype) / K ** 0.5
    w2 = torch.randn(N, F_, device=device, dtype=dtype) / F_ ** 0.5
    b1 = torch.randn(F_, device=device, dtype=dtype) if bias else None
    b2 = torch.randn(N, device=device, dtype=dtype) if bias else None
    return w1, b1, w2, b2


def _eager_ffn(x, w1, b1, w2, b2, approximate):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def _eager_linear_gelu(x, w, b, approximate):
    return F.gelu(F.linear(x, w, b), approximate=approximate)


def _check(fn, eager, tensors, dtype, backend, grad_names):
    """Run fn on leaves of `tensors` under `backend` with poisoned outputs, and compare the output and
    the gradients of every tensor with the fp64 eager oracle, bounded by eager torch at `dtype`."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    with fastlm.use_backend(backend), poison_outputs():
        y = fn(*leaves)
    dy = torch.randn_like(y)
    with fastlm.use_backend(backend), poison_outputs():
        y.backward(dy)
    o64 = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y64 = eager(*o64)
    y64.backward(dy.double())
    base = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    yt = eager(*base)
    yt.backward(dy)
    assert y.dtype == dtype and y.shape == yt.shape
    assert_close("out", y, y64, yt, factor=2.0)
    for name, mine, orc, b in zip(grad_names, leaves, o64, base):
        if mine is None:
            continue
        # weight/bias gradients sum over rows: their fp32 rounding floor grows with M
        atol = None if name == "dx" else (1e-4 if dtype == torch.float32 else 2e-2)
        assert_close(name, mine.grad, orc.grad, b.grad, factor=3.0, atol=atol)


def _grid(op):
    out = []
    for p in backend_params(op):
        device, backend, dtype = p.values
        for shape in _shapes(device, backend):
            out.append(pytest.param(device, backend, dtype, shape, id=f"{p.id}-{'x'.join(map(str, shape))}"))
    return out


@pytest.mark.parametrize("device,backend,dtype,shape", _grid("gelu_ffn"))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_ffn_forward_backward(device, backend, dtype, shape, approximate, bias):
    M, K, F_ = shape
    x = torch.randn(M, K, device=device, dtype=dtype)
    w1, b1, w2, b2 = _params(K, F_, K, dtype, device, bias)
    _check(lambda *t: ops.gelu_ffn(*t, approximate=approximate), lambda *t: _eager_ffn(*t, approximate),
           (x, w1, b1, w2, b2), dtype, backend, ["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"])


@pytest.mark.parametrize("device,backend,dtype,shape", _grid("linear_gelu"))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_forward_backward(device, backend, dtype, shape, approximate, bias):
    M, K, N = shape
    x = torch.randn(M, K, device=device, dtype=dtype)
    w, b, _, _ = _params(K, N, K, dtype, device, bias)
    _check(lambda *t: ops.linear_gelu(*t, approximate=approximate), lambda *t: _eager_linear_gelu(*t, approximate),
           (x, w, b), dtype, backend, ["dx", "dweight", "dbias"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_large_pre_activations_cpu(approximate):
    """Pre-activations across +-60 (exp(-2u) of the tanh form overflows fp32 below x ~ -10; erf
    saturates) and exact zeros, forward and backward, on the cpu kernel (fp32): within the parity rule
    of the fp64 oracle; no inf/NaN where torch gives a finite value."""
    if "cpu" not in fastlm.available_backends("linear_gelu"):
        pytest.skip("the cpu kernel is not built")
    M, K, N = 3, 1, 121
    x = torch.tensor([[1.0], [-1.0], [0.0]])
    w = torch.linspace(-60.0, 60.0, N)[:, None]               # pre-activation = +-w, and 0
    _check(lambda *t: ops.linear_gelu(*t, approximate=approximate), lambda *t: _eager_linear_gelu(*t, approximate),
           (x, w, None), torch.float32, "cpu", ["dx", "dweight"])
    with fastlm.use_backend("cpu"), torch.no_grad():
        y = ops.linear_gelu(x, w, None, approximate=approximate)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("device,backend,dtype", backend_params("gelu_ffn"))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_inference_forward(device, backend, dtype, approximate):
    """Under no_grad the pre-activation is not stored (and CUDA may take cuBLASLt's GELU epilogue)."""
    M, K, F_ = (33, 40, 96) if device == "cpu" else (1031, 768, 3072)
    x = torch.randn(M, K, device=device, dtype=dtype)
    w1, b1, w2, b2 = _params(K, F_, K, dtype, device, True)
    with torch.no_grad(), fastlm.use_backend(backend), poison_outputs():
        y = ops.gelu_ffn(x, w1, b1, w2, b2, approximate)
        z = ops.linear_gelu(x, w1, b1, approximate)
    d = [t.double() for t in (x, w1, b1, w2, b2)]
    assert_close("gelu_ffn", y, _eager_ffn(*d, approximate), _eager_ffn(x, w1, b1, w2, b2, approximate))
    assert_close("linear_gelu", z, _eager_linear_gelu(*d[:3], approximate),
                 _eager_linear_gelu(x, w1, b1, approximate))


@pytest.mark.parametrize("device,backend,dtype", backend_params("gelu_ffn", dtypes=[torch.float32]))
def test_leading_dims_and_strided_rows(device, backend, dtype):
    """Any leading batch dims; rows with a stride (a slice of a wider tensor) and a non-contiguous weight."""
    base = torch.randn(2, 3, 2 * 40, device=device, dtype=dtype)
    x = base[..., :40]
    w1, b1, w2, b2 = _params(40, 37, 24, dtype, device, True)
    w1 = w1.t().contiguous().t()  # same values, column-major
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.gelu_ffn(x, w1, b1, w2, b2, "tanh")
        z = ops.linear_gelu(x, w1, b1)
    assert y.shape == (2, 3, 24) and z.shape == (2, 3, 37)
    assert_close("ffn", y, _eager_ffn(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), "tanh"),
                 None, atol=1e-4)
    assert_close("linear_gelu", z, _eager_linear_gelu(x.double(), w1.double(), b1.double(), "none"), None, atol=1e-4)


def _column_major_grid():
    out = []
    for p in backend_params("gelu_ffn"):
        device, backend, dtype = p.values
        for shape in _shapes(device, backend)[:3]:
            out.append(pytest.param(device, backend, dtype, shape, id=f"{p.id}-{'x'.join(map(str, shape))}"))
    return out


@pytest.mark.parametrize("device,backend,dtype,shape", _column_major_grid())
@pytest.mark.parametrize("approximate,bias", [("tanh", True), ("none", False)])
def test_column_major_weights(device, backend, dtype, shape, approximate, bias):
    """Weights given transposed, as GPT-2's MLP passes its Conv1D weights (stored (in, out), seen through
    .t() views, stride (1, out)): every backend takes them as they are (no copy), with the same parity
    (forward, and gradients of the stored weights), and returns weight gradients in the weight's layout."""
    M, K, F_ = shape
    N = K + 3
    x = torch.randn(M, K, device=device, dtype=dtype)
    w1, b1, w2, b2 = _params(K, F_, N, dtype, device, bias)
    stored = (w1.t().contiguous(), w2.t().contiguous())          # Conv1D layout: (K, F), (F, N)
    assert not stored[0].t().is_contiguous()

    def ffn(x_, c_fc, b1_, c_proj, b2_):
        return ops.gelu_ffn(x_, c_fc.t(), b1_, c_proj.t(), b2_, approximate=approximate)

    def eager(x_, c_fc, b1_, c_proj, b2_):
        return _eager_ffn(x_, c_fc.t(), b1_, c_proj.t(), b2_, approximate)

    _check(ffn, eager, (x, stored[0], b1, stored[1], b2), dtype, backend,
           ["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"])
    _check(lambda x_, c, b: ops.linear_gelu(x_, c.t(), b, approximate=approximate),
           lambda x_, c, b: _eager_linear_gelu(x_, c.t(), b, approximate),
           (x, stored[0], b1), dtype, backend, ["dx", "dweight", "dbias"])
    # the ops themselves: weight gradients come back in the weight's (column-major) layout
    w1c, w2c = stored[0].t(), stored[1].t()
    with fastlm.use_backend(backend), poison_outputs():
        _, pre = torch.ops.fastlm.gelu_ffn_fwd(x, w1c, b1, w2c, b2, approximate, True)
        grads = torch.ops.fastlm.gelu_ffn_bwd(torch.randn(M, N, device=device, dtype=dtype), x, w1c, w2c, pre,
                                              approximate, bias, bias)
        _, dw, _ = torch.ops.fastlm.linear_gelu_bwd(torch.randn(M, F_, device=device, dtype=dtype), x, w1c, pre,
                                                    approximate, bias)
    assert grads[1].stride() == w1c.stride() and grads[3].stride() == w2c.stride() and dw.stride() == w1c.stride()
    assert not any(g.isnan().any() for g in (grads[1], grads[3], dw))


def test_column_major_weights_are_not_copied(monkeypatch):
    """The functional API hands a column-major weight to the op as it is (the same storage), and makes
    contiguous only layouts the kernels do not take (here: a strided slice)."""
    seen = []
    import sys
    mod = sys.modules["fastlm.ops.gelu_ffn"]   # (fastlm.ops.gelu_ffn is the function)
    real = mod._run_gelu_ffn_fwd               # what the op and the eager-inference path both run

    def spy(x, w1, b1, w2, b2, approximate, save_pre):
        seen.append((w1, w2))
        return real(x, w1, b1, w2, b2, approximate, save_pre)

    monkeypatch.setattr(mod, "_run_gelu_ffn_fwd", spy)
    x = torch.randn(3, 16)
    c_fc, c_proj = torch.randn(16, 40), torch.randn(40, 16)
    ops.gelu_ffn(x, c_fc.t(), None, c_proj.t(), None, "tanh")
    assert seen[-1][0].data_ptr() == c_fc.data_ptr() and seen[-1][0].stride() == (1, 40)
    assert seen[-1][1].data_ptr() == c_proj.data_ptr()
    wide = torch.randn(40, 32)
    y = ops.gelu_ffn(x, wide[:, ::2], None, c_proj.t(), None, "tanh")
    assert seen[-1][0].is_contiguous()
    torch.testing.assert_close(y, _eager_ffn(x, wide[:, ::2], None, c_proj.t(), None, "tanh"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("d_model,d_ff", [(768, 3072), (1024, 4096)])
def test_real_sizes_cpu(dtype, approximate, d_model, d_ff):
    """GPT-2 / BERT FFN sizes on the CPU kernel, a few rows (more than one row block for 768->3072)."""
    if "cpu" not in fastlm.available_backends("gelu_ffn", "cpu"):
        pytest.skip("fastlm._C not built with the gelu_ffn CPU kernels")
    M = 5 if d_ff == 4096 else 67
    x = torch.randn(M, d_model, dtype=dtype)
    w1, b1, w2, b2 = _params(d_model, d_ff, d_model, dtype, "cpu", True)
    _check(lambda *t: ops.gelu_ffn(*t, approximate=approximate), lambda *t: _eager_ffn(*t, approximate),
           (x, w1, b1, w2, b2), dtype, "cpu", ["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"])


def test_reference_matches_torch_autograd():
    """The hand-written reference backward (the kernels' oracle) against torch autograd, fp64."""
    x = torch.randn(9, 13, dtype=torch.float64)
    w1, b1, w2, b2 = _params(13, 21, 11, torch.float64, "cpu", True)
    for approximate in ("none", "tanh"):
        out, pre = reference.gelu_ffn_fwd_ref(x, w1, b1, w2, b2, approximate, True)
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        y = _eager_ffn(*leaves, approximate)
        torch.testing.assert_close(out, y.detach())
        torch.testing.assert_close(pre, F.linear(x, w1, b1))
        dy = torch.randn_like(y)
        y.backward(dy)
        grads = reference.gelu_ffn_bwd_ref(dy, x, w1, w2, pre, approximate, True, True)
        for g, leaf in zip(grads, [leaves[0], leaves[1], leaves[2], leaves[3], leaves[4]]):
            torch.testing.assert_close(g, leaf.grad)
        h = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
        F.gelu(h, approximate=approximate).sum().backward()
        torch.testing.assert_close(reference.gelu_grad_ref(h.detach(), approximate), h.grad)


def test_no_grad_skips_the_saved_pre_activation():
    x = torch.randn(5, 16, requires_grad=True)
    w1, b1, w2, b2 = _params(16, 24, 16, torch.float32, "cpu", True)
    with torch.no_grad():
        _, pre = torch.ops.fastlm.gelu_ffn_fwd(x, w1, b1, w2, b2, "none", False)
        y = ops.gelu_ffn(x, w1, b1, w2, b2)
    assert pre.shape == (0, 24) and not y.requires_grad


def test_empty_batch():
    x = torch.randn(0, 16)
    w1, b1, w2, b2 = _params(16, 24, 8, torch.float32, "cpu", True)
    for backend in fastlm.available_backends("gelu_ffn", "cpu"):
        with fastlm.use_backend(backend):
            xl = x.clone().requires_grad_()
            y = ops.gelu_ffn(xl, w1, b1, w2, b2)
            assert y.shape == (0, 8)
            y.sum().backward()
            assert xl.grad.shape == (0, 16)
            assert ops.linear_gelu(x, w1, b1).shape == (0, 24)


def test_fp64_runs_on_the_reference():
    x = torch.randn(4, 10, dtype=torch.float64)
    w1, b1, w2, b2 = _params(10, 12, 10, torch.float64, "cpu", True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastlm.FallbackWarning)
        y = ops.gelu_ffn(x, w1, b1, w2, b2, "tanh")
    torch.testing.assert_close(y, _eager_ffn(x, w1, b1, w2, b2, "tanh"))
    if "cpu" in fastlm.available_backends("gelu_ffn", "cpu"):
        with fastlm.use_backend("cpu"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
            ops.gelu_ffn(x, w1, b1, w2, b2)


def test_bad_inputs():
    x = torch.randn(4, 10)
    w1, b1, w2, b2 = _params(10, 12, 10, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu_ffn(x, w1, b1, w2, b2, approximate="exact")
    with pytest.raises(ValueError, match="approximate"):
        ops.linear_gelu(x, w1, b1, approximate=None)
    with pytest.raises(ValueError, match="fc1_weight"):
        ops.gelu_ffn(x, torch.randn(12, 9), b1, w2, b2)
    with pytest.raises(ValueError, match="fc2_weight"):
        ops.gelu_ffn(x, w1, b1, torch.randn(10, 11), b2)
    with pytest.raises(ValueError, match="fc1_bias"):
        ops.gelu_ffn(x, w1, torch.randn(11), w2, b2)
    with pytest.raises(ValueError, match="fc2_bias"):
        ops.gelu_ffn(x, w1, b1, w2, torch.randn(10, 1))
    with pytest.raises(ValueError, match="weight"):
        ops.linear_gelu(x, torch.randn(12))
    with pytest.raises(ValueError, match="weight"):
        ops.linear_gelu(x, torch.randn(12, 11))
    with pytest.raises(TypeError, match="fc2_weight"):
        ops.gelu_ffn(x, w1, b1, w2.half(), b2)
    with pytest.raises(TypeError, match="bias"):
        ops.linear_gelu(x, w1, b1.double())
    with pytest.raises(ValueError, match="fc1_weight.*meta"):
        ops.gelu_ffn(x, w1.to("meta"), b1, w2, b2)
    with pytest.raises(TypeError, match="input"):
        ops.gelu_ffn(torch.arange(10), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="input"):
        ops.linear_gelu([1.0] * 10, w1)
    with pytest.raises(ValueError, match="input"):
        ops.linear_gelu(torch.tensor(1.0), w1)


def test_cpp_op_checks_its_inputs():
    """Direct torch.ops calls (bypassing Python's checks) fail with a TORCH_CHECK, not a crash."""
    if "cpu" not in fastlm.available_backends("gelu_ffn", "cpu"):
        pytest.skip("fastlm._C not built with the gelu_ffn CPU kernels")
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="approximate"):
        torch.ops.fastlm_C.linear_gelu_fwd(x, torch.randn(6, 10), None, "erf", False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fastlm_C.linear_gelu_fwd(x, torch.randn(6, 9), None, "none", False)
    with pytest.raises(RuntimeError, match="fc2_weight must have shape"):
        torch.ops.fastlm_C.gelu_ffn_fwd(x, torch.randn(6, 10), None, torch.randn(3, 5), None, "none", False)
    with pytest.raises(RuntimeError, match="pre must have shape"):
        torch.ops.fastlm_C.gelu_ffn_bwd(torch.randn(4, 3), x, torch.randn(6, 10), torch.randn(3, 6),
                                        torch.randn(4, 5), "none", True, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastlm_C.linear_gelu_fwd(x.double(), torch.randn(6, 10).double(), None, "none", False)
    with pytest.raises(RuntimeError, match="weight must be contiguous or the transpose"):
        torch.ops.fastlm_C.linear_gelu_fwd(x, torch.randn(6, 20)[:, ::2], None, "none", False)


@requires_cuda
def test_cuda_tensor_to_cpu_backend_raises():
    x = torch.randn(4, 10, device="cuda")
    with fastlm.use_backend("cpu"), pytest.raises(ValueError, match="cpu backend"):
        ops.linear_gelu(x, torch.randn(6, 10, device="cuda"))


def _opcheck_backends():
    return [b for b in fastlm.available_backends("gelu_ffn", "cpu")]


@pytest.mark.parametrize("backend", _opcheck_backends())
def test_opcheck(backend):
    x = torch.randn(6, 19, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in _params(19, 23, 17, torch.float32, "cpu", True))
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.gelu_ffn_fwd.default, (x, w1, b1, w2, b2, "tanh", True))
        torch.library.opcheck(torch.ops.fastlm.gelu_ffn_fwd.default, (x, w1, None, w2, None, "none", False))
        torch.library.opcheck(torch.ops.fastlm.linear_gelu_fwd.default, (x, w1, b1, "none", True))
        _, pre = torch.ops.fastlm.gelu_ffn_fwd(x.detach(), w1.detach(), b1.detach(), w2.detach(), None, "none", True)
        torch.library.opcheck(torch.ops.fastlm.gelu_ffn_bwd.default,
                              (torch.randn(6, 17), x.detach(), w1.detach(), w2.detach(), pre, "none", True, False))
        torch.library.opcheck(torch.ops.fastlm.linear_gelu_bwd.default,
                              (torch.randn(6, 23), x.detach(), w1.detach(), pre, "tanh", True))
        # column-major weights (GPT-2's Conv1D weights through .t() views)
        w1c, w2c = (w.detach().t().contiguous().t().requires_grad_() for w in (w1, w2))
        torch.library.opcheck(torch.ops.fastlm.gelu_ffn_fwd.default, (x, w1c, b1, w2c, b2, "tanh", True))
        torch.library.opcheck(torch.ops.fastlm.gelu_ffn_bwd.default,
                              (torch.randn(6, 17), x.detach(), w1c.detach(), w2c.detach(), pre, "none", True, True))
        torch.library.opcheck(torch.ops.fastlm.linear_gelu_bwd.default,
                              (torch.randn(6, 23), x.detach(), w1c.detach(), pre, "tanh", False))


def test_compile_fullgraph():
    ffn = fastlm.nn.GeluFFN(24, 40, approximate="tanh")

    def block(x):
        return ffn(x) + ops.linear_gelu(x, ffn.fc1.weight).sum(-1, keepdim=True)

    x = torch.randn(5, 24, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, yc = block(x), compiled(x)
    torch.testing.assert_close(yc, y)
    g, = torch.autograd.grad(y.sum(), x)
    gc, = torch.autograd.grad(compiled(x).sum(), x)
    torch.testing.assert_close(gc, g)


@pytest.mark.parametrize("approximate,bias", [("none", True), ("tanh", False)])
def test_module_is_a_drop_in(approximate, bias):
    ffn = fastlm.nn.GeluFFN(16, 48, approximate=approximate, bias=bias)
    assert isinstance(ffn.fc1, torch.nn.Linear) and isinstance(ffn.fc2, torch.nn.Linear)
    assert (ffn.fc1.in_features, ffn.fc1.out_features, ffn.fc2.out_features) == (16, 48, 16)
    expected = {"fc1.weight", "fc2.weight"} | ({"fc1.bias", "fc2.bias"} if bias else set())
    assert set(ffn.state_dict().keys()) == expected
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = ffn(x)
    ref = F.linear(F.gelu(ffn.fc1(x), approximate=approximate), ffn.fc2.weight, ffn.fc2.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert ffn.fc1.weight.grad is not None and x.grad is not None
    other = fastlm.nn.GeluFFN(16, 48, approximate=approximate, bias=bias)
    other.load_state_dict(ffn.state_dict())
    torch.testing.assert_close(other(x), y)
    assert "approximate" in repr(ffn)
    with pytest.raises(ValueError, match="approximate"):
        fastlm.nn.GeluFFN(16, 48, approximate="erf")


def test_available_backends_api():
    cpu = fastlm.available_backends("gelu_ffn", "cpu")
    assert cpu[-1] == "reference" and "cuda" not in cpu
    assert fastlm.available_backends("linear_gelu", "cpu") == cpu
    assert ("triton" in cpu) == INTERPRET
