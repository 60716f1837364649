"""The measured "auto" (fastlm/backends.py) and the torch backend.

A toy op registered here (backends "torch" and "cpu", no kernels) drives select() with hand-made
measure functions: a cached choice is reused without timing, the disk cache round-trips, a backend
whose result disagrees with torch's is excluded with a warning, FASTLM_AUTOTUNE=0 keeps the static
order, torch.compile never times. Then the real ops: use_backend("torch") gives torch's own result
everywhere, and inputs fastlm's kernels do not take get torch's answer forward and backward.
"""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backends, ops

TOY = "_toy_op"
HAS_CPU = "cpu" in fastlm.available_backends("layer_norm", "cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built (no cpu backend)")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTLM_AUTOTUNE", raising=False)
    backends.register_op(TOY, ("torch", "cpu"))
    backends._avail_cache.clear()
    backends._warned.clear()
    backends.clear_choice_cache()
    yield tmp_path
    backends._OPS.pop(TOY, None)
    backends._avail_cache.clear()
    backends.clear_choice_cache()


def _measure(x, wrong=(), slow=(), calls=None):
    def measure(backend, upcast=False):
        if calls is not None:
            calls.append((backend, upcast))
        if backend in slow:
            time.sleep(0.003)
        y = x.double() * 2 if upcast else x * 2
        return y * 3 if backend in wrong else y
    return measure


def _select(x, measure, key=("k",)):
    return backends.select(TOY, x.device, lambda b: None, measure=measure, key=key)


@needs_cpu
def test_measured_choice_is_the_fastest_and_is_reused(toy):
    x = torch.randn(64)
    calls = []
    assert _select(x, _measure(x, slow=("torch",), calls=calls)) == "cpu"
    timed = [c for c in calls if not c[1]]
    assert {b for b, _ in timed} == {"torch", "cpu"} and len(timed) >= 4     # warm-up + reps each
    assert ("torch", True) in calls                                           # the upcast oracle
    rec = [r for r in backends.cached_choices() if r["op"] == TOY]
    assert len(rec) == 1 and rec[0]["backend"] == "cpu" and rec[0]["times_ms"]["torch"] > rec[0]["times_ms"]["cpu"]
    assert rec[0]["excluded"] == {}

    def boom(backend, upcast=False):
        raise AssertionError("a cached key must not be timed again")
    assert _select(x, boom) == "cpu"
    assert _select(x, _measure(x, slow=("cpu",)), key=("other",)) == "torch"   # another key: measured anew


@needs_cpu
def test_disk_cache_round_trip(toy):
    x = torch.randn(16)
    assert _select(x, _measure(x, slow=("torch",))) == "cpu"
    path = backends._disk_path()
    assert path.startswith(str(toy)) and os.path.exists(path)
    data = json.load(open(path))
    assert data["torch"] == torch.__version__ and data["fastlm"] == fastlm.__version__
    (entry,) = [v for k, v in data["entries"].items() if k.startswith(TOY + "|cpu|" + backends.platform("cpu"))]
    assert entry["backend"] == "cpu" and set(entry["times_ms"]) == {"torch", "cpu"}
    backends.clear_choice_cache()                     # memory only: the next process would see this

    def boom(backend, upcast=False):
        raise AssertionError("the disk cache must answer")
    assert _select(x, boom) == "cpu"
    assert not [f for f in os.listdir(toy) if f.startswith(".auto-")]   # no temp file left behind
    backends.clear_choice_cache(disk=True)
    assert not os.path.exists(path)


@needs_cpu
def test_a_wrong_backend_is_excluded_with_a_warning(toy):
    x = torch.randn(32)
    with pytest.warns(backends.AutotuneWarning, match="cpu backend"):
        assert _select(x, _measure(x, wrong=("cpu",), slow=("torch",))) == "torch"
    (rec,) = [r for r in backends.cached_choices() if r["op"] == TOY]
    assert "cpu" in rec["excluded"] and "max error" in rec["excluded"]["cpu"]
    assert rec["backend"] == "torch"


@needs_cpu
def test_a_raising_backend_is_excluded(toy):
    x = torch.randn(8)
    ok = _measure(x)

    def measure(backend, upcast=False):
        if backend == "cpu":
            raise RuntimeError("kernel failed")
        return ok(backend, upcast)
    with pytest.warns(backends.AutotuneWarning, match="RuntimeError"):
        assert _select(x, measure) == "torch"


@needs_cpu
def test_a_backend_raising_in_the_timed_rounds_is_excluded(toy):
    """A kernel that fails only after its warm-up (its third call: the first timed round) is excluded
    as one failing on the first call is; the call gets torch."""
    x = torch.randn(8)
    ok = _measure(x)
    n = {"cpu": 0}

    def measure(backend, upcast=False):
        if backend == "cpu":
            n["cpu"] += 1
            if n["cpu"] >= 3:
                raise RuntimeError("fails later")
        return ok(backend, upcast)
    with pytest.warns(backends.AutotuneWarning, match="fails later"):
        assert _select(x, measure) == "torch"
    (rec,) = [r for r in backends.cached_choices() if r["op"] == TOY]
    assert "cpu" in rec["excluded"] and set(rec["times_ms"]) == {"torch"}


@needs_cpu
def test_timed_rounds_interleave_the_backends(toy):
    """After one warm-up each, every round times every backend once (the order rotated), so a host
    whose speed drifts moves all backends alike: the timed calls alternate between the backends."""
    x = torch.randn(8)
    calls = []
    _select(x, _measure(x, slow=("torch", "cpu"), calls=calls))   # ~3 ms a call: one call a sample
    timed = [b for b, up in calls if not up][4:]                   # after the warm-ups (2 calls each)
    assert len(timed) >= 4
    pairs = [set(timed[i:i + 2]) for i in range(0, len(timed) - 1, 2)]
    assert all(p == {"torch", "cpu"} for p in pairs), timed


@needs_cpu
def test_one_stalled_sample_does_not_decide_the_pick(toy):
    """A stall (another process, a page fault) during one of the faster backend's samples: the median
    over the interleaved rounds still picks it."""
    x = torch.randn(8)
    n = {"cpu": 0}

    def measure(backend, upcast=False):
        if backend == "torch" and not upcast:
            time.sleep(0.004)
        if backend == "cpu":
            n["cpu"] += 1
            if n["cpu"] == 4:                     # the second timed round's sample
                time.sleep(0.05)
            time.sleep(0.001)
        return x.double() * 2 if upcast else x * 2
    assert _select(x, measure) == "cpu"
    (rec,) = [r for r in backends.cached_choices() if r["op"] == TOY]
    assert rec["times_ms"]["cpu"] < rec["times_ms"]["torch"]


@needs_cpu
def test_direct_layer_norm_kernel_is_measured_as_called(toy):
    """layer_norm.kernel() (the decode step's LayerNorm) is chosen under its own key, timing the raw
    kernel against torch's add + F.layer_norm, and what it returns computes the LayerNorm."""
    from fastlm.ops.layer_norm import kernel
    x, r = torch.randn(1, 96), torch.randn(1, 96)
    w, b = torch.randn(96), torch.randn(96)
    backend, fn = kernel(x, r, w, b)
    (rec,) = [c for c in backends.cached_choices() if c["op"] == "add_layer_norm"]
    assert rec["key"].endswith("direct") and set(rec["times_ms"]) == {"cpu", "torch"} and not rec["excluded"]
    assert backend == rec["backend"] and (fn is None) == (backend == "torch")
    if fn is not None:
        out, summed, _, _ = fn(x, r, w, b, 1e-5)
        torch.testing.assert_close(summed, x + r)
        torch.testing.assert_close(out, F.layer_norm(x + r, (96,), w, b), atol=1e-5, rtol=1e-5)
    ops.add_layer_norm(x, r, (96,), w, b)         # the public op: its own key, measured through the op
    assert len([c for c in backends.cached_choices() if c["op"] == "add_layer_norm"]) == 2


@needs_cpu
def test_autotune_off_keeps_the_static_order(toy, monkeypatch):
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")
    x = torch.randn(8)
    calls = []
    assert _select(x, _measure(x, slow=("cpu",), calls=calls)) == fastlm.available_backends(TOY, "cpu")[0] == "cpu"
    assert calls == [] and backends.cached_choices() == []
    # the static order also skips a backend that cannot run the call, and ends with torch
    assert backends.select(TOY, "cpu", lambda b: None if b == "torch" else "nope", key=("x",)) == "torch"


@needs_cpu
def test_torch_compile_never_times(toy, monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("measured under torch.compile")
    monkeypatch.setattr(backends, "_measure", no_timing)
    x = torch.randn(5, 24)
    w, b = torch.randn(24), torch.randn(24)
    f = torch.compile(lambda x: ops.layer_norm(x, (24,), w, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), F.layer_norm(x, (24,), w, b) * 2, atol=1e-5, rtol=1e-5)
    assert backends.cached_choices() == []


def test_meta_and_fake_tensors_never_time(toy, monkeypatch):
    monkeypatch.setattr(backends, "_measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    y = ops.layer_norm(torch.randn(3, 8, device="meta"), (8,))
    assert y.device.type == "meta" and y.shape == (3, 8)


@needs_cpu
def test_real_op_measures_once_per_key(toy):
    x = torch.randn(37, 48)
    w, b = torch.randn(48), torch.randn(48)
    y = ops.layer_norm(x, (48,), w, b)
    torch.testing.assert_close(y, F.layer_norm(x, (48,), w, b), atol=1e-5, rtol=1e-5)
    recs = [r for r in backends.cached_choices() if r["op"] == "layer_norm"]
    assert len(recs) == 1 and set(recs[0]["times_ms"]) >= {"cpu", "torch"}
    assert backends.last_choice("layer_norm") == recs[0]["backend"]
    ops.layer_norm(torch.randn(40, 48), (48,), w, b)          # same bucket (64 rows): no new key
    assert len([r for r in backends.cached_choices() if r["op"] == "layer_norm"]) == 1
    xg = x.clone().requires_grad_()
    ops.layer_norm(xg, (48,), w, b).sum().backward()         # grad needed: another key, timed fwd+bwd
    recs = [r for r in backends.cached_choices() if r["op"] == "layer_norm"]
    assert len(recs) == 2 and any(r["key"].endswith("True") for r in recs)
    torch.testing.assert_close(xg.grad, torch.autograd.grad(F.layer_norm(x.requires_grad_(), (48,), w, b).sum(), x)[0],
                               atol=1e-4, rtol=1e-4)


@needs_cpu
def test_multi_output_op_with_constant_inputs_keeps_every_backend(toy):
    """add_layer_norm where only weight/bias need gradients: torch's `summed` (x + r of constants) does
    not require grad while the custom op's does; the timed fwd+bwd must still compare the backends
    (it once raised "got 2 tensors and 1 gradients" and excluded cpu)."""
    import warnings
    x, r = torch.randn(5, 24), torch.randn(5, 24)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.AutotuneWarning)
        out, summed = ops.add_layer_norm(x, r, (24,), w, b)
    recs = [rec for rec in backends.cached_choices() if rec["op"] == "add_layer_norm"]
    assert len(recs) == 1 and not recs[0]["excluded"] and set(recs[0]["times_ms"]) >= {"cpu", "torch"}
    (out.sum() + summed.sum()).backward()
    wr, br = w.detach().requires_grad_(), b.detach().requires_grad_()
    F.layer_norm(x + r, (24,), wr, br).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, br.grad, atol=1e-5, rtol=1e-5)


def test_hot_path_is_cheap(toy):
    """Print the per-call cost of a cache hit (measured in the bench; never asserted as a speed)."""
    x = torch.randn(4, 16)
    sup = lambda b: None  # noqa: E731
    backends.select("layer_norm", x.device, sup, key=("hot",))
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        backends.select("layer_norm", x.device, sup, key=("hot",))
    print(f"select cache hit: {(time.perf_counter() - t0) / n * 1e6:.2f} us/call (noisy host)")
    assert backends.select("layer_norm", x.device, sup, key=("hot",)) in fastlm.available_backends("layer_norm")


# ---- use_backend("torch"): torch's own op, bit for bit ----

def _torch_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w1, b1, w2, b2 = r(6, 16), r(24, 16), r(24), r(16, 24), r(16)
    q, k, v = r(2, 3, 9, 8), r(2, 3, 11, 8), r(2, 3, 11, 8)
    kc, vc, lens = r(2, 3, 20, 8), r(2, 3, 20, 8), torch.tensor([20, 5])
    wl = r(100, 16)
    return [
        ("layer_norm", lambda: ops.layer_norm(x, (16,), b2, b2), lambda: F.layer_norm(x, (16,), b2, b2)),
        ("add_layer_norm", lambda: ops.add_layer_norm(x, x.flip(0), (16,))[0], lambda: F.layer_norm(x + x.flip(0), (16,))),
        ("linear", lambda: ops.linear(x, w1, b1), lambda: F.linear(x, w1, b1)),
        ("linear_gelu", lambda: ops.linear_gelu(x, w1, b1, "tanh"), lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh")),
        ("gelu_ffn", lambda: ops.gelu_ffn(x, w1, b1, w2, b2), lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        ("scaled_dot_product_attention", lambda: ops.scaled_dot_product_attention(q, k, v),
         lambda: F.scaled_dot_product_attention(q, k, v)),
        ("decode_attention", lambda: ops.decode_attention(q[:, :, 0], kc, vc, lens),
         lambda: torch.stack([F.scaled_dot_product_attention(q[b, :, :1], kc[b, :, :n], vc[b, :, :n])[:, 0]
                              for b, n in enumerate(lens.tolist())])),
        ("linear_argmax", lambda: ops.linear_argmax(x, wl), lambda: F.linear(x, wl).argmax(-1)),
    ]


@pytest.mark.parametrize("op,ours,theirs", _torch_cases(), ids=[c[0] for c in _torch_cases()])
def test_use_backend_torch_everywhere(op, ours, theirs):
    assert "torch" in fastlm.available_backends(op, "cpu")
    with fastlm.use_backend("torch"):
        got = ours()
    assert backends.last_choice(op) == "torch"
    if op == "decode_attention":
        torch.testing.assert_close(got, theirs(), atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(got, theirs()), op


# ---- inputs torch accepts that no fastlm kernel serves: torch's answer, forward and backward ----

def _fwd_bwd(fn, *args):
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
    return (out,) + grads


def _fallback_cases():
    g = torch.Generator().manual_seed(3)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    sdpa = F.scaled_dot_product_attention
    return [
        ("sdpa_ranks", ops.scaled_dot_product_attention, sdpa, (r(2, 2, 4, 8), r(2, 5, 8), r(2, 5, 8))),
        ("sdpa_batch_broadcast", ops.scaled_dot_product_attention, sdpa, (r(3, 2, 4, 8), r(1, 2, 5, 8), r(1, 2, 5, 8))),
        ("sdpa_heads_broadcast", ops.scaled_dot_product_attention, sdpa, (r(1, 4, 4, 8), r(1, 1, 5, 8), r(1, 1, 5, 8))),
        ("sdpa_mask_requires_grad", lambda q, k, v, m: ops.scaled_dot_product_attention(q, k, v, attn_mask=m),
         lambda q, k, v, m: sdpa(q, k, v, attn_mask=m), (r(1, 2, 4, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), r(4, 5))),
        ("sdpa_fp64", ops.scaled_dot_product_attention, sdpa, tuple(r(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))),
        ("linear_gelu_K0", ops.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)), (r(3, 0), r(5, 0), r(5))),
        ("gelu_ffn_fp64", lambda x, w1, b1, w2, b2: ops.gelu_ffn(x, w1, b1, w2, b2),
         lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
         tuple(r(*s, dtype=torch.float64) for s in ((3, 4), (6, 4), (6,), (4, 6), (4,)))),
        ("linear_bias_broadcast", ops.linear, F.linear, (r(3, 4), r(5, 4), r(1))),
        ("linear_1d_weight", ops.linear, F.linear, (r(3, 4), r(4))),
        ("layer_norm_fp64", lambda x, w: ops.layer_norm(x, (6,), w), lambda x, w: F.layer_norm(x, (6,), w),
         (r(3, 6, dtype=torch.float64), r(6, dtype=torch.float64))),
        ("layer_norm_strided", lambda x, w: ops.layer_norm(x, (5,), w), lambda x, w: F.layer_norm(x, (5,), w),
         (r(5, 7).t()[:, :5], r(5))),
    ]


@pytest.mark.parametrize("name,ours,theirs,args", _fallback_cases(), ids=[c[0] for c in _fallback_cases()])
def test_inputs_torch_accepts_get_torchs_answer(name, ours, theirs, args):
    got, want = _fwd_bwd(ours, *args), _fwd_bwd(theirs, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_inputs_torch_rejects_keep_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="key head dim"):
        ops.scaled_dot_product_attention(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="approximate"):
        ops.linear_gelu(torch.randn(3, 4), torch.randn(5, 4), approximate="erf")
