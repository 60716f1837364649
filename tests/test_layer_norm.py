"""LayerNorm and add+LayerNorm: parity of every backend this machine has against the fp64 reference
(forward and backward, odd shapes, NaN-poisoned outputs), opcheck, torch.compile, the module, and
bad inputs. On the GPU machine (FASTLM_TEST_FULL=1) the same tests run on CUDA with larger shapes."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import reference
from helpers import FULL, assert_close, backend_params, poison_outputs, requires_cuda

# (leading shape, normalized shape): rows and columns that are not multiples of any block size.
SHAPES = [((1,), (1,)), ((7,), (33,)), ((3, 43), (100,)), ((129,), (768,)), ((2, 3), (5, 7))]
if FULL:
    SHAPES += [((1031,), (1024,)), ((257,), (4096,)), ((33,), (12289,)), ((5,), (65536,)), ((4096,), (768,))]
LARGE_N = [((3,), (20000,))]  # the looped (N > 16384) kernels


def _inputs(lead, norm, dtype, device, affine=(True, True)):
    x = torch.randn(*lead, *norm, device=device, dtype=dtype) * 2 + 0.5
    w = (torch.randn(norm, device=device, dtype=dtype) if affine[0] else None)
    b = (torch.randn(norm, device=device, dtype=dtype) if affine[1] else None)
    return x, w, b


def _oracle(x, norm, w, b, residual=None, eps=1e-5):
    """fp64 reference: (out, summed)."""
    s = x.double() + residual.double() if residual is not None else x.double()
    n = 1
    for d in norm:
        n *= d
    out, _, _, _ = reference.layer_norm_fwd_ref(s.reshape(-1, n), None, None if w is None else w.double().reshape(n),
                                                None if b is None else b.double().reshape(n), eps)
    return out.reshape(x.shape), s


@pytest.mark.parametrize("device,backend,dtype", backend_params("layer_norm"))
@pytest.mark.parametrize("lead,norm", SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False)])
def test_layer_norm_forward_backward(device, backend, dtype, lead, norm, affine):
    x, w, b = _inputs(lead, norm, dtype, device, affine)
    dy = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    xl, wl, bl = leaves[0], (leaves[1] if w is not None else None), (leaves[-1] if b is not None else None)
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.layer_norm(xl, norm, wl, bl, eps=1e-5)
        y.backward(dy)
    # oracle in fp64 and torch's own error at this dtype
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = F.layer_norm(x64[0], norm, x64[1] if w is not None else None, x64[-1] if b is not None else None, 1e-5)
    y64.backward(dy.double())
    xt = [t.detach().clone().requires_grad_() for t in leaves]
    yt = F.layer_norm(xt[0], norm, xt[1] if w is not None else None, xt[-1] if b is not None else None, 1e-5)
    yt.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close("out", y, y64, yt, factor=2.0)
    for name, mine, orc, base in zip(["dx", "dweight", "dbias"], leaves, x64, xt):
        assert_close(name, mine.grad, orc.grad, base.grad, factor=3.0, atol=None if name == "dx" else 1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("device,backend,dtype", backend_params("add_layer_norm"))
@pytest.mark.parametrize("lead,norm", SHAPES[:4] + LARGE_N)
def test_add_layer_norm_forward_backward(device, backend, dtype, lead, norm):
    x, w, b = _inputs(lead, norm, dtype, device)
    r = torch.randn_like(x)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    with fastlm.use_backend(backend), poison_outputs():
        out, summed = ops.add_layer_norm(*leaves[:2], norm, *leaves[2:])
        torch.autograd.backward([out, summed], [dy, ds])
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    s64 = x64[0] + x64[1]
    o64 = F.layer_norm(s64, norm, x64[2], x64[3])
    torch.autograd.backward([o64, s64], [dy.double(), ds.double()])
    xt = [t.detach().clone().requires_grad_() for t in leaves]
    st = xt[0] + xt[1]
    ot = F.layer_norm(st, norm, xt[2], xt[3])
    torch.autograd.backward([ot, st], [dy, ds])
    assert_close("summed", summed, s64, st, factor=2.0)
    assert_close("out", out, o64, ot, factor=2.0)
    lp_atol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, mine, orc, base in zip(["dx", "dresidual", "dweight", "dbias"], leaves, x64, xt):
        assert_close(name, mine.grad, orc.grad, base.grad, factor=3.0, atol=None if name.startswith("dx") or name == "dresidual" else lp_atol)


@pytest.mark.parametrize("device,backend,dtype", backend_params("layer_norm", dtypes=[torch.float32]))
def test_non_contiguous_inputs(device, backend, dtype):
    base = torch.randn(40, 2 * 37, device=device, dtype=dtype)
    x = base[:, ::2]                     # strided last dim: copied before the kernel
    rows = base[::3, :37]                # strided rows, contiguous last dim: used in place
    xt = torch.randn(37, 11, device=device, dtype=dtype).t()  # transposed
    w = torch.randn(37, device=device, dtype=dtype)
    with fastlm.use_backend(backend):
        for t in (x, rows, xt):
            assert_close("noncontig", ops.layer_norm(t, (37,), w), F.layer_norm(t.double(), (37,), w.double()), None)


@pytest.mark.parametrize("device,backend,dtype", backend_params("layer_norm", dtypes=[torch.float32]))
def test_large_hidden_sizes(device, backend, dtype):
    x, w, b = _inputs((3,), (20000,), dtype, device)
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.layer_norm(x, (20000,), w, b)
    assert_close("out", y, F.layer_norm(x.double(), (20000,), w.double(), b.double()), F.layer_norm(x, (20000,), w, b))


def test_empty_batch():
    x = torch.randn(0, 16)
    for backend in fastlm.available_backends("layer_norm", "cpu"):
        with fastlm.use_backend(backend):
            assert ops.layer_norm(x, (16,)).shape == (0, 16)


def test_fp64_falls_back_to_reference_with_one_warning():
    x = torch.randn(4, 10, dtype=torch.float64)
    if fastlm.available_backends("layer_norm", "cpu")[0] == "reference":
        pytest.skip("no kernel backend built: nothing to fall back from")
    from fastlm import backends
    backends._warned.clear()
    with pytest.warns(fastlm.FallbackWarning, match="float64"):
        y = ops.layer_norm(x, (10,))
    torch.testing.assert_close(y, F.layer_norm(x, (10,)))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.layer_norm(x, (10,))  # second time: silent


def test_forced_backend_that_cannot_run_raises():
    x = torch.randn(4, 10, dtype=torch.float64)
    if "cpu" in fastlm.available_backends("layer_norm", "cpu"):
        with fastlm.use_backend("cpu"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
            ops.layer_norm(x, (10,))
    with fastlm.use_backend("cuda"), pytest.raises(ValueError, match="cuda"):
        ops.layer_norm(torch.randn(4, 10), (10,))


@requires_cuda
def test_cuda_tensor_to_cpu_backend_raises():
    with fastlm.use_backend("cpu"), pytest.raises(ValueError, match="cpu backend"):
        ops.layer_norm(torch.randn(4, 10, device="cuda"), (10,))


def test_bad_inputs():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(x, (10,), torch.randn(9))
    with pytest.raises(ValueError, match="bias"):
        ops.layer_norm(x, (10,), None, torch.randn(10, 1))
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.layer_norm(x, (11,))
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.layer_norm(x, (2, 4, 10))
    with pytest.raises(TypeError, match="input"):
        ops.layer_norm(torch.arange(10), (10,))
    with pytest.raises(TypeError, match="input"):
        ops.layer_norm([1.0, 2.0], (2,))
    with pytest.raises(TypeError, match="weight"):
        ops.layer_norm(x, (10,), torch.ones(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="residual"):
        ops.add_layer_norm(x, torch.randn(4, 11), (10,))
    with pytest.raises(TypeError, match="residual"):
        ops.add_layer_norm(x, torch.randn(4, 10, dtype=torch.float16), (10,))
    with pytest.raises(ValueError, match="unknown backend"):
        with fastlm.use_backend("tpu"):
            pass


def test_cpp_op_checks_its_inputs():
    """Direct torch.ops calls (bypassing Python's checks) fail with a TORCH_CHECK, not a crash."""
    if "cpu" not in fastlm.available_backends("layer_norm", "cpu"):
        pytest.skip("fastlm._C not built")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fastlm_C.layer_norm_fwd(torch.randn(4, 10), None, torch.randn(9), None, 1e-5)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.fastlm_C.layer_norm_fwd(torch.randn(10), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastlm_C.layer_norm_fwd(torch.randn(4, 10, dtype=torch.float64), None, None, None, 1e-5)


@pytest.mark.parametrize("backend", fastlm.available_backends("layer_norm", "cpu"))
def test_opcheck(backend):
    x = torch.randn(6, 19, requires_grad=True)
    w = torch.randn(19, requires_grad=True)
    b = torch.randn(19, requires_grad=True)
    r = torch.randn(6, 19, requires_grad=True)
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd.default, (x, None, w, b, 1e-5))
        torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd.default, (x, r, w, None, 1e-5))
        torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd.default, (x, None, None, None, 1e-5))
        _, _, mean, rstd = torch.ops.fastlm.layer_norm_fwd(x.detach(), None, w.detach(), b.detach(), 1e-5)
        torch.library.opcheck(torch.ops.fastlm.layer_norm_bwd.default,
                              (torch.randn(6, 19), x.detach(), w.detach(), mean, rstd, None, True))


def test_compile_fullgraph():
    ln = fastlm.nn.LayerNorm(24)
    torch.nn.init.normal_(ln.weight)

    def block(x, r):
        out, summed = ops.add_layer_norm(x, r, (24,), ln.weight, ln.bias)
        return ln(out) * 2 + summed

    x, r = torch.randn(5, 24), torch.randn(5, 24)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, r), block(x, r))


def test_module_is_a_drop_in():
    ref = torch.nn.LayerNorm((4, 6), eps=1e-6)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    mine = fastlm.nn.LayerNorm((4, 6), eps=1e-6)
    assert isinstance(mine, torch.nn.LayerNorm)
    mine.load_state_dict(ref.state_dict())
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    shared = fastlm.nn.LayerNorm.from_torch(ref)
    assert shared.weight is ref.weight
    torch.testing.assert_close(shared(x), ref(x), rtol=1e-5, atol=1e-5)
    no_bias = fastlm.nn.LayerNorm(6, bias=False)
    torch.testing.assert_close(no_bias(x), F.layer_norm(x, (6,), no_bias.weight), rtol=1e-5, atol=1e-5)


def test_available_backends_api():
    cpu = fastlm.available_backends("layer_norm", "cpu")
    assert cpu[-1] == "reference"
    assert ("triton" in cpu) == (__import__("os").environ.get("TRITON_INTERPRET") == "1")
    assert "cuda" not in cpu
    with pytest.raises(ValueError, match="unknown op"):
        fastlm.available_backends("no_such_op")
