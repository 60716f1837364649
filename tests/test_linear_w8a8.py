"""ops.linear_w8a8 (int8 weights x int8 activations, int32 accumulation): every CPU path (AVX-512 VNNI,
AVX2, scalar; FASTLM_W8A8_ISA narrows the choice per call, FASTLM_CPU_NO_AVX512=1 in a subprocess)
bit-identical to reference.linear_w8a8_fwd_ref on odd shapes, fp32/bf16/fp16, NaN-poisoned outputs;
exact int32 accumulators; zero, tiny, huge, non-finite and wide-range rows; the packed weight;
gradients (straight-through), opcheck, torch.compile, bad inputs; Int8Linear(activations="int8") and
fastlm.quantize(..., activations="int8") on native and Hugging Face GPT-2 / BERT: equal to the same
models on the reference W8A8, close to fp32, and generating."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.models import bert as bert_module
from fastlm.models import Bert, GPT2
from fastlm.nn.quant_linear import Int8Linear, quantize_int8
from fastlm.ops.linear_int8 import dequantize_int8_ref
from fastlm.ops.reference import linear_w8a8_fwd_ref, quantize_rows_int8_ref
from helpers import poison_outputs

HAS_CPU = "cpu" in fastlm.available_backends("linear_w8a8", "cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="no C++ extension")
PATHS = ["auto", "avx2", "scalar"]          # auto: AVX-512 VNNI where the CPU has it
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = list(range(1, 18)) + [300]
KS = [1, 3, 5, 63, 67, 768 + 3]
NS = [1, 17, 33, 129]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("FASTLM_W8A8_ISA", raising=False)
    else:
        monkeypatch.setenv("FASTLM_W8A8_ISA", request.param)
    return request.param


def _weights(N, K, g):
    q, s = quantize_int8(torch.randn(N, K, generator=g) / max(K, 1) ** 0.5)
    return q, s


def _cpu(x, q, s, b, packed=None):
    with fastlm.use_backend("cpu"), poison_outputs():
        return ops.linear_w8a8(x, q, s, b, packed=packed)


def _assert_exact(name, y, r):
    assert y.dtype == r.dtype and y.shape == r.shape, name
    same = (y == r) | (torch.isnan(y) & torch.isnan(r))
    if not bool(same.all()):
        d = (y.double() - r.double()).abs()
        raise AssertionError(f"{name}: {int((~same).sum())} elements differ from the reference, max {d.max():.3e}")


# ---------------------------------------------------------------- parity


@needs_cpu
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_linear_w8a8_matches_ref(path, dtype):
    """Every rows in 1..17 and 300, with every K (off 4, 16, 64) and an N (odd, off 16 and 32), bias or
    not: the kernel's output equals the reference bit for bit (exact int32 dots, the same fp32
    epilogue)."""
    g = torch.Generator().manual_seed(7)
    n = 0
    for M in ROWS:
        for i, K in enumerate(KS):
            N = NS[(M + i) % len(NS)]
            q, s = _weights(N, K, g)
            x = torch.randn(M, K, generator=g).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            for bias in (b, None):
                y = _cpu(x, q, s, bias)
                _assert_exact(f"{path} {dtype} {M}x{K}->{N} bias={bias is not None}", y,
                              linear_w8a8_fwd_ref(x, q, s, bias))
                n += 1
    print(f"{path} {dtype}: {n} shapes bit-identical")


@needs_cpu
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("activation", ["tanh", "erf"])
def test_linear_w8a8_fused_gelu(path, dtype, activation):
    """activation="tanh"/"erf": GELU of the W8A8 output fused into the call == the reference (the
    linear bit for bit, then torch's GELU at the output's dtype) within a few fp32 ulps / one rounding
    of fp16 / bf16; large, tiny, zero and NaN values; the autograd path (F.gelu on the op) agrees."""
    g = torch.Generator().manual_seed(3)
    tol = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    for M, K, N in [(1, 67, 129), (5, 768 + 3, 33), (17, 64, 17), (300, 63, 1)]:
        q, s = _weights(N, K, g)
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
        b = (torch.randn(N, generator=g) * 4).to(dtype)
        x[0, :3] = 0.0
        if M > 2:
            x[2] = float("nan")                                   # a NaN row: NaN outputs
        with fastlm.use_backend("cpu"), poison_outputs():
            y = ops.linear_w8a8(x, q, s, b, activation=activation)
        r = linear_w8a8_fwd_ref(x, q, s, b, activation=activation)
        assert y.dtype == dtype and y.shape == r.shape
        assert torch.equal(torch.isnan(y), torch.isnan(r))
        torch.testing.assert_close(y, r, rtol=tol[0], atol=tol[1], equal_nan=True)
    big = torch.tensor([[-30.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 30.0]]).to(dtype).repeat(2, 1)
    eye = torch.eye(7, dtype=torch.int8) * 127
    with fastlm.use_backend("cpu"):
        y = ops.linear_w8a8(big, eye, torch.full((7,), 30.0 / 127 / 127), None, activation=activation)
    r = linear_w8a8_fwd_ref(big, eye, torch.full((7,), 30.0 / 127 / 127), None, activation=activation)
    torch.testing.assert_close(y, r, rtol=tol[0], atol=tol[1])
    xg = torch.randn(4, 40, generator=g, requires_grad=True)
    q, s = _weights(9, 40, g)
    yg = ops.linear_w8a8(xg, q, s, None, activation=activation)
    torch.testing.assert_close(yg, torch.nn.functional.gelu(ops.linear_w8a8(xg, q, s, None),
                                                            approximate="tanh" if activation == "tanh" else "none"))
    yg.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_linear_w8a8_bad_activation():
    q, s = _weights(3, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="activation"):
        ops.linear_w8a8(torch.randn(2, 8), q, s, activation="relu")


@needs_cpu
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_linear_w8a8_exact_accumulators(path):
    """Integer rows with max|x| = 127 and unit scales: a_scale = 1, xq = x, so y is the int32 dot itself
    (|acc| < 2^24, exact in fp32), compared with torch's int64 matmul. Weights span [-128, 127]."""
    g = torch.Generator().manual_seed(1)
    for M, K, N in [(1, 5, 3), (9, 67, 33), (20, 771, 129), (64, 2048, 40)]:
        x = torch.randint(-127, 128, (M, K), generator=g).float()
        x[:, 0] = 127.0
        q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        y = _cpu(x, q, torch.ones(N), None)
        acc = x.long() @ q.long().t()
        assert torch.equal(y, acc.float()), (path, M, K, N)


@needs_cpu
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_linear_w8a8_special_rows(path):
    """Zero rows (-> bias), tiny (1e-30, subnormal 1e-40: a_scale underflows to 0 -> bias) and huge
    (1e30) rows, rows of huge dynamic range (x * e^(6 z)), rows with NaN / +-inf (-> NaN everywhere in
    that row, other rows unaffected): equal to the reference."""
    g = torch.Generator().manual_seed(3)
    K, N = 67, 33
    q, s = _weights(N, K, g)
    b = torch.randn(N, generator=g)
    x = torch.randn(10, K, generator=g)
    x[0] = 0
    x[1] *= 1e-30
    x[2] = 0
    x[2, 5] = 1e-40
    x[3] *= 1e30
    x[4] *= torch.exp(torch.randn(K, generator=g) * 6)
    x[5, 7] = float("nan")
    x[6, 9] = float("inf")
    x[7, 1] = -float("inf")
    x[8, :] = -3.0                               # constant row: every xq = -127
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        bd = b.to(dtype)
        y = _cpu(xd, q, s, bd)
        r = linear_w8a8_fwd_ref(xd, q, s, bd)
        _assert_exact(f"{path} {dtype}", y, r)
        assert torch.equal(y[0], bd) and torch.equal(y[2], bd)
        assert bool(torch.isnan(y[5:8]).all()) and not bool(torch.isnan(y[[0, 1, 2, 3, 4, 8, 9]]).any())
    xq, a = quantize_rows_int8_ref(x)
    assert xq[8].eq(-127).all() and a[0] == 0 and torch.isnan(a[5])


@needs_cpu
def test_linear_w8a8_large_k_scalar():
    """K > 65536: int32 accumulators could overflow on the vector paths, so the kernel takes its
    int64 scalar loop; still equal to the reference."""
    g = torch.Generator().manual_seed(5)
    K = 65536 + 70
    q = torch.full((3, K), -128, dtype=torch.int8)
    x = torch.full((2, K), -1.0)
    x[1] = torch.randn(K, generator=g)
    s = torch.rand(3, generator=g) + 0.5
    _assert_exact("K=65606", _cpu(x, q, s, None), linear_w8a8_fwd_ref(x, q, s, None))


@needs_cpu
def test_linear_w8a8_packed_and_strided_input():
    g = torch.Generator().manual_seed(2)
    q, s = _weights(37, 40, g)
    b = torch.randn(37, generator=g)
    x = torch.randn(2, 3, 50, generator=g)[:, :, 5:45]            # (2, 3, 40), strided rows
    packed = ops.linear_w8a8_pack(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 48 * 40 + 4 * 48
    y = _cpu(x, q, s, b, packed)
    assert y.shape == (2, 3, 37)
    r = linear_w8a8_fwd_ref(x.reshape(-1, 40), q, s, b).view(2, 3, 37)
    _assert_exact("packed", y, r)
    _assert_exact("unpacked", _cpu(x, q, s, b), r)
    with pytest.raises(RuntimeError, match="packed has"):
        torch.ops.fastlm_C.linear_w8a8_fwd(x.reshape(-1, 40), q, s, b, packed[:-4])
    with pytest.raises(TypeError, match="packed"):
        ops.linear_w8a8(x, q, s, b, packed=packed.view(torch.int8))


@needs_cpu
def test_linear_w8a8_close_to_w8a32():
    """What int8 activations cost on Gaussian rows: within a few % of the W8A32 output's scale."""
    g = torch.Generator().manual_seed(4)
    q, s = _weights(64, 256, g)
    x = torch.randn(32, 256, generator=g)
    y8 = ops.linear_w8a8(x, q, s)
    y32 = ops.linear_int8(x, q, s)
    rel = ((y8 - y32).norm() / y32.norm()).item()
    print(f"W8A8 vs W8A32 relative error {rel:.2e}")
    assert rel < 0.02


_AVX2_SCRIPT = textwrap.dedent("""
    import torch, fastlm
    from fastlm import _ext, ops
    assert _ext.load() is not None, _ext.error()
    from fastlm.nn.quant_linear import quantize_int8
    from fastlm.ops.reference import linear_w8a8_fwd_ref
    torch.manual_seed(0)
    torch.ops.fastlm_C.set_poison_outputs(True)
    n = 0
    for M, K, N in [(1, 7, 5), (2, 33, 65), (3, 100, 129), (7, 35, 4), (11, 19, 301), (17, 771, 33), (300, 67, 17)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            q, s = quantize_int8(torch.randn(N, K) / K ** 0.5)
            x, b = torch.randn(M, K, dtype=dt), torch.randn(N, dtype=dt)
            with fastlm.use_backend("cpu"):
                y = ops.linear_w8a8(x, q, s, b)
            assert torch.equal(y, linear_w8a8_fwd_ref(x, q, s, b)), (M, K, N, dt)
            n += 1
    print("AVX2 OK", n)
""")


@needs_cpu
def test_linear_w8a8_avx2_path_subprocess():
    """FASTLM_CPU_NO_AVX512=1 (read once per process) forces the AVX2 kernel on an AVX-512 machine."""
    env = dict(os.environ, FASTLM_CPU_NO_AVX512="1")
    env.pop("FASTLM_W8A8_ISA", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and "AVX2 OK" in r.stdout


@pytest.mark.parametrize("backend", fastlm.available_backends("linear_w8a8", "cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_linear_w8a8_backends_and_grad(backend, dtype):
    """Each backend against the reference; autograd straight-through the activation quantization:
    dx = dy @ (qweight * scale), dbias = sum of dy's rows (as linear_int8)."""
    g = torch.Generator().manual_seed(6)
    q, s = _weights(17, 40, g)
    x = torch.randn(3, 40, generator=g).to(dtype).requires_grad_()
    b = torch.randn(17, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(3, 17, generator=g).to(dtype)
    with fastlm.use_backend(backend):
        y = ops.linear_w8a8(x, q, s, b)
    _assert_exact(backend, y.detach(), linear_w8a8_fwd_ref(x.detach(), q, s, b.detach()))
    y.backward(dy)
    w = dequantize_int8_ref(q, s)
    torch.testing.assert_close(x.grad, (dy.float() @ w).to(dtype))
    torch.testing.assert_close(b.grad, dy.sum(0))


@pytest.mark.parametrize("backend", fastlm.available_backends("linear_w8a8", "cpu"))
def test_linear_w8a8_opcheck(backend):
    g = torch.Generator().manual_seed(8)
    q, s = _weights(7, 20, g)
    x, b = torch.randn(3, 20, generator=g), torch.randn(7, generator=g)
    packed = ops.linear_w8a8_pack(q)
    op = torch.ops.fastlm.linear_w8a8_fwd.default
    with fastlm.use_backend(backend):
        torch.library.opcheck(op, (x, q, s, b, packed))
        torch.library.opcheck(op, (x, q, s, None, None))
        torch.library.opcheck(op, (x.clone().requires_grad_(), q, s, b, None))


def test_linear_w8a8_compile_fullgraph():
    g = torch.Generator().manual_seed(9)
    q, s = _weights(7, 20, g)
    b = torch.randn(7, generator=g)
    x = torch.randn(4, 20, generator=g)
    f = lambda x: ops.linear_w8a8(torch.relu(x), q, s, b) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x), rtol=0, atol=0)


def test_linear_w8a8_bad_inputs():
    g = torch.Generator().manual_seed(10)
    q, s = _weights(7, 20, g)
    x, b = torch.randn(2, 20, generator=g), torch.randn(7, generator=g)
    with pytest.raises(TypeError, match="qweight must be an int8"):
        ops.linear_w8a8(x, q.float(), s, b)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.linear_w8a8(x, q, s[:6], b)
    with pytest.raises(ValueError, match="scale must have shape \\(7,\\).*per-group"):
        ops.linear_w8a8(x, q, s[:, None].expand(7, 4).contiguous(), b)      # 4 groups of 5: a group scale
    with pytest.raises(TypeError, match="scale must be a float32"):
        ops.linear_w8a8(x, q, s.double(), b)
    with pytest.raises(ValueError, match="in_features 20"):
        ops.linear_w8a8(torch.randn(2, 19), q, s, b)
    with pytest.raises(ValueError, match="bias"):
        ops.linear_w8a8(x, q, s, b[:6])
    with pytest.raises(TypeError, match="bias"):
        ops.linear_w8a8(x, q, s, b.double())
    with pytest.raises(TypeError, match="input"):
        ops.linear_w8a8(x.long(), q, s, b)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        ops.linear_w8a8(x, q[0], s, b)
    with pytest.raises(TypeError, match="qweight"):
        ops.linear_w8a8_pack(q.float())
    if HAS_CPU:   # the C++ op's own checks (direct torch.ops calls): errors, never a crash
        with pytest.raises(RuntimeError, match="qweight must be int8"):
            torch.ops.fastlm_C.linear_w8a8_fwd(x, q.float(), s, b, None)
        with pytest.raises(RuntimeError, match="per output channel"):
            torch.ops.fastlm_C.linear_w8a8_fwd(x, q, s[:, None].expand(7, 4).contiguous(), b, None)
        with pytest.raises(RuntimeError, match="input features"):
            torch.ops.fastlm_C.linear_w8a8_fwd(torch.randn(2, 21), q, s, b, None)


# ---------------------------------------------------------------- the module and fastlm.quantize


@needs_cpu
def test_int8linear_activations():
    """activations="int8": 2+ rows -> linear_w8a8 (with the cached packed weight), 1 row -> linear_int8;
    the pack is rebuilt when qweight changes; state_dict unchanged; extra_repr says it."""
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(33, 40, generator=g), torch.randn(33, generator=g)
    m = Int8Linear.from_weight(w, b, activations="int8")
    assert "activations='int8'" in repr(m)
    assert set(m.state_dict()) == {"qweight", "scale", "bias"}
    x = torch.randn(2, 5, 40, generator=g)
    _assert_exact("rows", m(x), linear_w8a8_fwd_ref(x.reshape(-1, 40), m.qweight, m.scale, m.bias).view(2, 5, 33))
    one = x[:1, :1]
    torch.testing.assert_close(m(one), ops.linear_int8(one, m.qweight, m.scale, m.bias), rtol=0, atol=0)
    packed = m.w8a8_packed()
    assert packed is m.w8a8_packed()                       # cached
    with torch.no_grad():
        m.qweight.copy_(torch.flip(m.qweight, (0,)))       # in place: the pack follows
    assert m.w8a8_packed() is not packed
    want = linear_w8a8_fwd_ref(x.reshape(-1, 40), m.qweight, m.scale, m.bias).view(2, 5, 33)
    _assert_exact("after copy_", m(x), want)
    m2 = Int8Linear(40, 33, activations="int8")
    m2.load_state_dict(m.state_dict())
    _assert_exact("loaded", m2(x), m(x))
    with pytest.raises(ValueError, match="activations"):
        Int8Linear(40, 33, activations="fp8")
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(40, 32, group_size=8, activations="int8")


def _reference_w8a8(monkeypatch):
    """ops.linear_w8a8 as Int8Linear calls it, replaced by the PyTorch reference (exact integers).
    Returns the list of the calls' row counts (so a test can see that W8A8 ran at all)."""
    calls = []

    def ref(input, qweight, scale, bias=None, packed=None, activation="none"):
        K = qweight.shape[1]
        calls.append(input.numel() // K)
        return linear_w8a8_fwd_ref(input.reshape(-1, K), qweight, scale, bias,
                                   activation=activation).view(*input.shape[:-1], -1)
    monkeypatch.setattr(ops, "linear_w8a8", ref)
    return calls


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402


def _hf_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=96, vocab_size=211,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _hf_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                                vocab_size=173, max_position_embeddings=64)).eval()


def _ids(B, S, vocab, seed=1):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


@needs_cpu
@pytest.mark.parametrize("kind", ["native", "hf"])
def test_quantize_w8a8_gpt2(kind, monkeypatch):
    """GPT-2 quantized with activations="int8": logits equal to the same model on the reference W8A8,
    close to fp32 (relative error printed), greedy generate runs (1-row decode steps: W8A32)."""
    fp = _hf_gpt2()
    ids = _ids(3, 12, 211)
    with torch.no_grad():
        want = fp(ids).logits
        if kind == "native":
            want = want[:, -1]                   # native GPT2's forward: the last position's logits
    model = GPT2.from_hf(copy.deepcopy(fp)) if kind == "native" else copy.deepcopy(fp)
    fastlm.quantize(model, weights="int8", activations="int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.activations == "int8" for m in layers)
    with torch.no_grad():
        got = model(ids) if kind == "native" else model(ids).logits
        with monkeypatch.context() as mp:
            calls = _reference_w8a8(mp)
            ref = model(ids) if kind == "native" else model(ids).logits
    assert len(calls) == 2 * 4 + 1 and min(calls) >= 2      # every projection and the head ran W8A8
    if kind == "native":   # the fc's GELU fused into the kernel (a few ulps from torch's tanh form)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    else:                  # HF's MLP calls its own activation: bit for bit
        assert torch.equal(got, ref)
    w8a32 = fastlm.quantize(GPT2.from_hf(copy.deepcopy(fp)) if kind == "native" else copy.deepcopy(fp))
    with torch.no_grad():
        e32 = _rel(w8a32(ids) if kind == "native" else w8a32(ids).logits, want)
    err = _rel(got, want)
    print(f"GPT-2 {kind}: W8A8 logits relative error vs fp32 {err:.2e} (W8A32 {e32:.2e})")
    assert err < 0.05
    out = fastlm.generate(model, ids[:, :7], max_new_tokens=6)
    assert out.shape == (3, 13) and torch.equal(out[:, :7], ids[:, :7])
    with monkeypatch.context() as mp:             # batch-3 decode steps take W8A8 too (2+ rows)
        mp.setenv("FASTLM_DECODE_LAYERS", "0")    # the Python layer loop (decode_layers calls the kernel
        calls = _reference_w8a8(mp)               # itself: its equality with this loop is test_generation's)
        assert torch.equal(fastlm.generate(model, ids[:, :7], max_new_tokens=6), out)
    assert calls.count(3) >= 5 * 2 * 4
    out1 = fastlm.generate(model, ids[:1, :7], max_new_tokens=4)
    assert out1.shape == (1, 11)


@needs_cpu
@pytest.mark.parametrize("kind", ["native", "hf"])
def test_quantize_w8a8_bert(kind, monkeypatch):
    fp = _hf_bert()
    ids = _ids(3, 15, 173)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    with torch.no_grad():
        want = fp(ids, attention_mask=mask).last_hidden_state
    model = Bert.from_hf(copy.deepcopy(fp)) if kind == "native" else copy.deepcopy(fp)
    fastlm.quantize(model, weights="int8", activations="int8")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).last_hidden_state
        with monkeypatch.context() as mp:
            calls = _reference_w8a8(mp)
            mp.setattr(bert_module, "_w8a8_cpu_kernels", lambda *a: None)   # the module path (ops.linear_w8a8)
            ref = model(ids, attention_mask=mask).last_hidden_state
    assert len(calls) == 2 * (4 if kind == "native" else 6) and min(calls) == 3 * 15
    if kind == "native":   # fc1's GELU fused into the kernel (gelu_fast.h's erf: ulps from torch's gelu kernel)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    else:                  # HF's intermediate layer calls its own activation: bit for bit
        assert torch.equal(got, ref)
    err = _rel(got, want)
    print(f"BERT {kind}: W8A8 hidden states relative error vs fp32 {err:.2e}")
    assert err < 0.05


@needs_cpu
@pytest.mark.parametrize("padded", [False, True])
def test_native_bert_w8a8_cpu_fast_path(padded, monkeypatch):
    """Native Bert with W8A8 projections, eager inference on the CPU kernels: each layer calls the raw
    C++ kernels directly (_forward_w8a8_cpu) -- bit for bit the module path through ops.linear_w8a8 and
    ops.add_layer_norm; one-row inputs and a forced reference backend take the module path."""
    fp = _hf_bert()
    model = fastlm.quantize(Bert.from_hf(copy.deepcopy(fp)), weights="int8", activations="int8")
    ids = _ids(2, 17, 173)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
    runs = []
    fast = bert_module.BertLayer._forward_w8a8_cpu

    def counted(self, *a):
        runs.append(1)
        return fast(self, *a)
    monkeypatch.setattr(bert_module.BertLayer, "_forward_w8a8_cpu", counted)
    # forced cpu: the measured auto may pick torch's LayerNorm for these small rows (then the module path)
    with fastlm.use_backend("cpu"):
        got = model(ids, attention_mask=mask)
        assert len(runs) == len(model.layers)
        with monkeypatch.context() as mp:
            mp.setattr(bert_module, "_w8a8_cpu_kernels", lambda *a: None)
            want = model(ids, attention_mask=mask)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    runs.clear()
    model(ids[:1, :1])                                   # one row: linear_int8 (W8A32), the module path
    with fastlm.use_backend("reference"):
        model(ids, attention_mask=mask)
    assert runs == []
