"""ops.linear_int8 (== F.linear(input, qweight.float() * scale[:, None], bias)): parity of every backend
against the fp64 reference on odd shapes (rows 1..17 and 300, K off every block, N odd), per-channel
and per-group scales, NaN-poisoned outputs, both CPU ISA paths (AVX2 in a subprocess with
FASTLM_CPU_NO_AVX512=1), gradients w.r.t. input and bias, opcheck, torch.compile, bad inputs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.nn.quant_linear import quantize_int8
from fastlm.ops.linear_int8 import linear_int8_fwd_ref
from helpers import FULL, INTERPRET, assert_close, backend_params, poison_outputs

# (rows, K, N): every row block of the CPU kernel (4/2/1 and their sums up to 16), 17, 64, 65 (the first
# many-row shape) and 300; K below one vector, off 8/16/32-multiples, long; N odd, below one tile
SHAPES = [(1, 7, 5), (1, 768, 131), (2, 33, 65), (3, 100, 129), (4, 16, 9), (5, 1, 3), (7, 35, 4),
          (8, 64, 50), (11, 19, 301), (13, 129, 7), (15, 48, 33), (16, 40, 17), (17, 33, 9), (64, 70, 13),
          (65, 33, 9), (300, 96, 37)]
TRITON_SHAPES = [(1, 7, 5), (3, 100, 129), (16, 40, 17), (17, 33, 9), (40, 70, 33)]
if FULL:
    SHAPES += [(1, 3072, 768), (8, 768, 50257), (512, 1024, 4096)]


def _inputs(M, K, N, dtype, device, bias=True, group=None):
    w = torch.randn(N, K, device=device) / max(K, 1) ** 0.5
    q, s = quantize_int8(w, group)
    x = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    return x, q, s, b


def _check(y, x, q, s, b, name="out"):
    y64 = linear_int8_fwd_ref(x.double(), q, s, None if b is None else b.double())
    yt = linear_int8_fwd_ref(x, q, s, b, upcast=False)         # PyTorch in x's dtype
    assert y.dtype == x.dtype
    assert_close(name, y, y64, yt, factor=2.0)


def _parity_params():
    """(device, backend, dtype, M, K, N): every shape for the compiled backends, the small subset under
    the Triton interpreter (it runs programs one by one in numpy)."""
    out = []
    for p in backend_params("linear_int8"):
        device, backend, dtype = p.values
        interp = backend == "triton" and device == "cpu"
        for M, K, N in (TRITON_SHAPES if interp else SHAPES):
            out.append(pytest.param(device, backend, dtype, M, K, N, id=f"{p.id}-{M}x{K}->{N}"))
    return out


@pytest.mark.parametrize("device,backend,dtype,M,K,N", _parity_params())
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_int8_matches_ref(device, backend, dtype, M, K, N, has_bias):
    x, q, s, b = _inputs(M, K, N, dtype, device, has_bias)
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.linear_int8(x, q, s, b)
    assert y.shape == (M, N)
    _check(y, x, q, s, b)


@pytest.mark.parametrize("backend", [b for b in fastlm.available_backends("linear_int8", "cpu") if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,group", [(1, 64, 9, 16), (5, 96, 33, 32), (9, 40, 7, 8), (20, 64, 11, 16)])
def test_linear_int8_group_scales(backend, dtype, M, K, N, group):
    x, q, s, b = _inputs(M, K, N, dtype, "cpu", True, group)
    assert s.shape == (N, K // group)
    with fastlm.use_backend(backend), poison_outputs():
        y = ops.linear_int8(x, q, s, b)
    _check(y, x, q, s, b)


def test_linear_int8_leading_dims_and_strided_input():
    x = torch.randn(2, 3, 40)[:, :, 5:37]           # (2, 3, 32), strided rows
    w = torch.randn(9, 32)
    q, s = quantize_int8(w)
    y = ops.linear_int8(x, q, s)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y, linear_int8_fwd_ref(x.reshape(-1, 32), q, s, None).view(2, 3, 9),
                               rtol=1e-5, atol=1e-5)


_AVX2_SCRIPT = textwrap.dedent("""
    import torch, fastlm
    from fastlm import _ext, ops
    assert _ext.load() is not None, _ext.error()
    from fastlm.nn.quant_linear import quantize_int8
    from fastlm.ops.linear_int8 import linear_int8_fwd_ref
    torch.manual_seed(0)
    torch.ops.fastlm_C.set_poison_outputs(True)
    worst = 0.0
    for M, K, N, g in [(1, 7, 5, None), (1, 768, 131, None), (2, 33, 65, None), (3, 100, 129, None),
                       (7, 35, 4, None), (11, 19, 301, None), (16, 40, 17, None), (5, 96, 33, 32)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w = torch.randn(N, K) / K ** 0.5
            q, s = quantize_int8(w, g)
            x, b = torch.randn(M, K, dtype=dt), torch.randn(N, dtype=dt)
            with fastlm.use_backend("cpu"):
                y = ops.linear_int8(x, q, s, b)
            r = linear_int8_fwd_ref(x.double(), q, s, b.double())
            t = linear_int8_fwd_ref(x, q, s, b, upcast=False).double()
            err, base = (y.double() - r).abs().max().item(), (t - r).abs().max().item()
            tol = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dt]
            assert not torch.isnan(y).any(), (M, K, N, dt)
            assert err <= 2 * base + tol, (M, K, N, dt, err, base)
            worst = max(worst, err)
    print("AVX2 OK", worst)
""")


@pytest.mark.skipif(not fastlm.available_backends("linear_int8", "cpu").count("cpu"), reason="no C++ extension")
def test_linear_int8_avx2_path_subprocess():
    """The AVX2 kernels on this (possibly AVX-512) machine: FASTLM_CPU_NO_AVX512=1 is read once per process."""
    env = dict(os.environ, FASTLM_CPU_NO_AVX512="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and "AVX2 OK" in r.stdout


@pytest.mark.parametrize("device,backend,dtype", backend_params("linear_int8"))
def test_linear_int8_grad(device, backend, dtype):
    M, K, N = (3, 40, 17)
    x, q, s, b = _inputs(M, K, N, dtype, device)
    x.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(M, N, dtype=dtype, device=device)
    with fastlm.use_backend(backend):
        ops.linear_int8(x, q, s, b).backward(dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    linear_int8_fwd_ref(x64, q, s, b64).backward(dy.double())
    xt, bt = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    linear_int8_fwd_ref(xt, q, s, bt, upcast=False).backward(dy)
    assert_close("dx", x.grad, x64.grad, xt.grad, factor=3.0, atol=None if dtype == torch.float32 else 2e-2)
    assert_close("dbias", b.grad, b64.grad, bt.grad, factor=3.0, atol=None if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", [b for b in fastlm.available_backends("linear_int8", "cpu")])
def test_linear_int8_opcheck(backend):
    x, q, s, b = _inputs(3, 20, 7, torch.float32, "cpu")
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.linear_int8_fwd.default, (x, q, s, b))
        torch.library.opcheck(torch.ops.fastlm.linear_int8_fwd.default, (x, q, s, None))
        torch.library.opcheck(torch.ops.fastlm.linear_int8_fwd.default, (x.requires_grad_(), q, s, b))


def test_linear_int8_compile_fullgraph():
    x, q, s, b = _inputs(2, 20, 7, torch.float32, "cpu")
    f = lambda x: ops.linear_int8(torch.relu(x), q, s, b) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_linear_int8_bad_inputs():
    x, q, s, b = _inputs(2, 20, 7, torch.float32, "cpu")
    with pytest.raises(TypeError, match="qweight must be an int8"):
        ops.linear_int8(x, q.float(), s, b)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.linear_int8(x, q, s[:6], b)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.linear_int8(x, q, s[:, None].expand(7, 3).contiguous(), b)    # 3 groups do not divide K = 20
    with pytest.raises(TypeError, match="scale must be a float32"):
        ops.linear_int8(x, q, s.double(), b)
    with pytest.raises(ValueError, match="in_features 20"):
        ops.linear_int8(torch.randn(2, 19), q, s, b)
    with pytest.raises(ValueError, match="bias"):
        ops.linear_int8(x, q, s, b[:6])
    with pytest.raises(TypeError, match="bias"):
        ops.linear_int8(x, q, s, b.double())
    with pytest.raises(TypeError, match="input"):
        ops.linear_int8(x.long(), q, s, b)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        ops.linear_int8(x, q[0], s, b)
    # the C++ op's own checks (direct torch.ops calls): errors, never a crash
    if "cpu" in fastlm.available_backends("linear_int8", "cpu"):
        with pytest.raises(RuntimeError, match="qweight must be int8"):
            torch.ops.fastlm_C.linear_int8_fwd(x, q.float(), s, b)
        with pytest.raises(RuntimeError, match="scale must be"):
            torch.ops.fastlm_C.linear_int8_fwd(x, q, s[:5], b)
        with pytest.raises(RuntimeError, match="input features"):
            torch.ops.fastlm_C.linear_int8_fwd(torch.randn(2, 21), q, s, b)


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs triton (GPU or interpreter)")
def test_linear_int8_triton_rejects_group_scales():
    if "triton" not in fastlm.available_backends("linear_int8", "cpu"):
        pytest.skip("triton backend unavailable")
    x, q, s, b = _inputs(2, 32, 5, torch.float32, "cpu", True, 8)
    with fastlm.use_backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="per-group"):
        ops.linear_int8(x, q, s, b)


@pytest.mark.skipif(not fastlm.available_backends("linear_int8", "cpu").count("cpu"), reason="no C++ extension")
@pytest.mark.parametrize("kind", ["randn", "range", "zeros", "tiny", "big", "zero_row", "flat"])
@pytest.mark.parametrize("K,N", [(1, 3), (7, 5), (63, 9), (64, 4), (65, 7), (200, 33), (768, 131), (4100, 6),
                                 (8209, 5)])
def test_linear_int8_one_row_digits(monkeypatch, kind, K, N):
    """One row goes through an integer path where the CPU has one (AVX-512 VNNI: x split into four
    int8 digits; AVX2, e.g. CI's FASTLM_CPU_NO_AVX512=1 pass: two int16 digits, vpmaddwd; exact int32
    dots): the parity rule on rows of huge dynamic range, zeros, tiny and huge values, rows of equal
    magnitudes (every int16 digit at full scale: the int32 lanes at their bound, K past 4096 adds
    them into int64 twice), masked / scalar K tails; FASTLM_INT8_VNNI=0 (read per call) gives the
    widening kernel, held to the same rule except on "range" rows (fp32 accumulation in its own order:
    up to ~2.7x torch's error there, as before)."""
    g = torch.Generator().manual_seed(K * 1000 + N)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    q, s = quantize_int8(w)
    b = torch.randn(N, generator=g)
    x = torch.randn(1, K, generator=g)
    if kind == "range":
        x = x * torch.exp(torch.randn(1, K, generator=g) * 6)
    elif kind == "zeros":
        x[:, ::3] = 0
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "big":
        x = x * 1e30
    elif kind == "zero_row":
        x.zero_()
    elif kind == "flat":
        x = torch.where(x >= 0, 3.0, -3.0)
    for flag in ("1", "0") if kind != "range" else ("1",):
        monkeypatch.setenv("FASTLM_INT8_VNNI", flag)
        with fastlm.use_backend("cpu"), poison_outputs():
            y = ops.linear_int8(x, q, s, b)
        _check(y, x, q, s, b, f"VNNI={flag}")
        if kind == "zero_row":
            assert torch.equal(y, b[None])


@pytest.mark.skipif(not fastlm.available_backends("linear_int8", "cpu").count("cpu"), reason="no C++ extension")
def test_linear_int8_one_row_nonfinite_matches_widening(monkeypatch):
    """NaN / inf in the row: the VNNI path steps aside, so the result is the widening kernel's."""
    q, s = quantize_int8(torch.randn(9, 100))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 100)
        x[0, 37] = bad
        ys = []
        for flag in ("1", "0"):
            monkeypatch.setenv("FASTLM_INT8_VNNI", flag)
            with fastlm.use_backend("cpu"):
                ys.append(ops.linear_int8(x, q, s))
        torch.testing.assert_close(ys[0], ys[1], equal_nan=True, rtol=0, atol=0)


_INT16_SCRIPT = textwrap.dedent("""
    import os, torch, fastlm
    from fastlm import _ext, ops
    assert _ext.load() is not None, _ext.error()
    from fastlm.nn.quant_linear import quantize_int8
    from fastlm.ops.linear_int8 import linear_int8_fwd_ref
    line = [p for p in torch.ops.fastlm_C.cpu_isa_paths() if p.startswith("linear_int8_fwd:")]
    assert len(line) == 1 and "one row: int16 digits" in line[0], line
    g = torch.Generator().manual_seed(0)
    for K, N in [(17, 5), (768, 131), (3000, 9), (12345, 4)]:
        q, s = quantize_int8(torch.randn(N, K, generator=g) / K ** 0.5)
        b = torch.randn(N, generator=g)
        x = torch.randn(1, K, generator=g) * torch.exp(torch.randn(1, K, generator=g) * 3)
        r = linear_int8_fwd_ref(x.double(), q, s, b.double())
        errs = {}
        for flag in ("1", "0"):
            os.environ["FASTLM_INT8_VNNI"] = flag
            with fastlm.use_backend("cpu"):
                errs[flag] = (ops.linear_int8(x, q, s, b).double() - r).abs().max().item()
        # the int16 digits carry ~2^-31 max|x| per element: the fp32 result's own rounding only,
        # where fp32 accumulation (the widening kernel) errs by ~K u max|x w|
        scale = (x.double().abs() @ (q.double() * s[:, None].double()).abs().t()).max().item()
        assert errs["1"] <= 2 ** -23 * (r.abs().max().item() + 1) + 2 ** -28 * scale, (K, errs, scale)
    print("INT16 ONE ROW OK", errs)
""")


@pytest.mark.skipif(not fastlm.available_backends("linear_int8", "cpu").count("cpu"), reason="no C++ extension")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 only")
def test_linear_int8_one_row_int16_subprocess():
    """FASTLM_CPU_NO_AVX512=1 (read once per process): fastlm info names the AVX2 int16 one-row path, whose
    error on rows of wide dynamic range (K from one 16-step to 3 int64 chunks) is the fp32 output's
    rounding only, as the digits are exact to ~2^-31 max|x|."""
    env = dict(os.environ, FASTLM_CPU_NO_AVX512="1", FASTLM_INT8_VNNI="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _INT16_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and "INT16 ONE ROW OK" in r.stdout
