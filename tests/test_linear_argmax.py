"""ops.linear_argmax (the screened greedy pick): the same index as the full fp32 product, row by row,
over odd sizes, near-ties (many candidates), exact ties (the first wins), the candidate cap
(fallback to the full product), non-finite inputs and weights; the reference backend; opcheck;
stale screens and bad inputs."""
import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import reference
from fastlm.ops.linear_argmax import LinearArgmaxScreen, linear_argmax_fwd

needs_cpu_kernel = pytest.mark.skipif("cpu" not in fastlm.available_backends("linear_argmax", "cpu"),
                                      reason="the C++ extension is not built")


def per_row_linear_argmax(x, w):
    """What the screened kernel must return: ops.linear's (C++ kernel's) argmax for each row alone."""
    with fastlm.use_backend("cpu"):
        return torch.stack([ops.linear(x[m:m + 1], w).argmax(-1)[0] for m in range(x.shape[0])])


def check(x, w):
    screen = LinearArgmaxScreen.build(w)
    with fastlm.use_backend("cpu"):
        got = ops.linear_argmax(x, w, screen)
    assert got.dtype == torch.int64 and got.shape == x.shape[:-1]
    want = per_row_linear_argmax(x.reshape(-1, w.shape[1]), w).view(x.shape[:-1])
    assert torch.equal(got, want), (got, want)
    return got


@needs_cpu_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("K,N", [(7, 5), (16, 1), (33, 130), (70, 1001), (768, 4099)])
def test_matches_full_product(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.02
    got = check(x, w)
    # and the fp64 argmax, wherever the top two are apart by more than fp32 rounding
    logits = x.double() @ w.double().t()
    top2 = logits.topk(min(2, N), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-5 if N > 1 else torch.ones(M, dtype=torch.bool)
    assert torch.equal(got[clear], logits.argmax(-1)[clear])


@needs_cpu_kernel
def test_rows_of_very_different_scales():
    # per-row int8 scales: rows 1000x apart in magnitude, a few rows with one outlier element
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 96, generator=g) * torch.logspace(-3, 0, 3000)[:, None]
    w[::97, 5] = 40.0
    check(torch.randn(4, 96, generator=g), w)


@needs_cpu_kernel
def test_near_ties_many_candidates():
    # 500 rows within 1e-6 of each other: all are candidates, recomputed exactly
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 64, generator=g)
    w = torch.cat([base + 1e-6 * torch.randn(500, 64, generator=g), torch.randn(3000, 64, generator=g) * 0.01])
    check(torch.randn(3, 64, generator=g) + base, w)


@needs_cpu_kernel
def test_exact_ties_first_index_wins_and_candidate_cap():
    # every row equal: all N are candidates, past the cap (max(N / 16, 256)): the full-product path;
    # and a few equal rows among others (under the cap): the screened path; the first index wins
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 40, generator=g)
    x = torch.randn(2, 40, generator=g)
    assert torch.equal(check(x, row.repeat(1000, 1)), torch.zeros(2, dtype=torch.long))
    w = torch.randn(2000, 40, generator=g) * 0.01
    w[[300, 700, 1500]] = row * 5
    got = check(row.repeat(2, 1), w)
    assert torch.equal(got, torch.full((2,), 300))


@needs_cpu_kernel
def test_non_finite_values():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 33, generator=g)
    x = torch.randn(3, 33, generator=g)
    x[1, 4] = float("nan")            # row 1: NaN logits everywhere -> index 0, as torch.argmax
    x[2, 0] = float("inf")            # row 2: +-inf / NaN logits
    check(x, w)
    w[123, 7] = float("nan")          # a NaN weight row is always a candidate and wins (NaN is the max)
    got = check(torch.randn(2, 33, generator=g), w)
    assert torch.equal(got, torch.full((2,), 123))
    w[123, 7] = float("inf")
    check(torch.randn(2, 33, generator=g), w)
    # an all-zero input row against an inf weight row: 0 * inf = NaN there, which wins (N under the
    # candidate cap, so the screened path decides)
    w2 = torch.randn(200, 33, generator=g)
    w2[123, 7] = float("inf")
    got = check(torch.cat([torch.zeros(1, 33), torch.randn(1, 33, generator=g)]), w2)
    assert got[0] == 123


@needs_cpu_kernel
def test_many_rows_and_other_dtypes_fall_back():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 24, generator=g)
    screen = LinearArgmaxScreen.build(w)
    x = torch.randn(40, 24, generator=g)       # > 16 rows: the full product
    with pytest.warns(fastlm.FallbackWarning, match="16"):
        assert torch.equal(ops.linear_argmax(x, w, screen), ops.linear(x, w).argmax(-1))
    with pytest.raises(fastlm.BackendUnavailableError, match="16"):
        with fastlm.use_backend("cpu"):
            ops.linear_argmax(x, w, screen)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(ops.linear_argmax(xb, wb), ops.linear(xb, wb).argmax(-1))
    with pytest.raises(ValueError, match="float32"):
        LinearArgmaxScreen.build(wb)


@needs_cpu_kernel
def test_reference_backend_and_no_screen():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(700, 50, generator=g)
    x = torch.randn(2, 3, 50, generator=g)
    screen = LinearArgmaxScreen.build(w)
    want = reference.linear_argmax_fwd_ref(x.reshape(6, 50), w).view(2, 3)
    with fastlm.use_backend("reference"):
        assert torch.equal(ops.linear_argmax(x, w, screen), want)
    assert torch.equal(ops.linear_argmax(x, w), want)
    assert torch.equal(ops.linear_argmax(x, w, screen), want)


@needs_cpu_kernel
def test_opcheck():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(90, 20, generator=g)
    s = LinearArgmaxScreen.build(w)
    torch.library.opcheck(linear_argmax_fwd, (torch.randn(3, 20, generator=g), w, s.qweight, s.scale, s.slack))


@needs_cpu_kernel
def test_stale_screen_and_bad_inputs():
    w = torch.randn(50, 16)
    screen = LinearArgmaxScreen.build(w)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="another weight"):
        ops.linear_argmax(x, torch.randn(50, 16), screen)
    w.mul_(2)                                    # changed in place since the screen was built
    with pytest.raises(ValueError, match="changed in place"):
        ops.linear_argmax(x, w, screen)
    with pytest.raises(ValueError, match="in_features"):
        ops.linear_argmax(torch.randn(2, 15), w)
    with pytest.raises(TypeError, match="LinearArgmaxScreen"):
        ops.linear_argmax(x, w, (screen.qweight, screen.scale, screen.slack))
    with pytest.raises(ValueError, match="2-D"):
        LinearArgmaxScreen.build(torch.randn(16))
    # the C++ op checks its screen (a direct torch.ops call)
    s = LinearArgmaxScreen.build(w)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.fastlm_C.linear_argmax_fwd(x, w, s.qweight[:10], s.scale, s.slack)
    with pytest.raises(RuntimeError, match="slack"):
        torch.ops.fastlm_C.linear_argmax_fwd(x, w, s.qweight, s.scale, s.slack[:3])
    with pytest.raises(RuntimeError, match="at most 16"):
        torch.ops.fastlm_C.linear_argmax_fwd(torch.randn(17, 16), w, s.qweight, s.scale, s.slack)


# ---- linear_topk_logits ----

def _topk_masked(logits, k):
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def check_topk(x, w, k):
    """Keeping the k largest of linear_topk_logits gives, bit for bit, what it gives on each row's
    full product; every finite entry is that exact logit."""
    screen = LinearArgmaxScreen.build(w)
    with fastlm.use_backend("cpu"):
        got = ops.linear_topk_logits(x, w, k, screen)
    with fastlm.use_backend("cpu"):   # the kernel the screen's exact logits are bit for bit
        full = torch.stack([ops.linear(x[m:m + 1], w)[0] for m in range(x.shape[0])])
    assert got.shape == full.shape and got.dtype == torch.float32
    kk = min(k, w.shape[0])
    same = dict(rtol=0, atol=0, equal_nan=True)   # bit for bit, NaN == NaN
    torch.testing.assert_close(_topk_masked(got, kk), _topk_masked(full, kk), **same)
    fin = ~torch.isneginf(got)
    torch.testing.assert_close(got[fin], full[fin], **same)
    return got


def _screens_here() -> bool:
    """The screened kernel runs (x86-64 builds: AVX-512 or AVX2 paths); else linear_fwd per row (all exact)."""
    import platform
    return platform.machine().lower() in ("x86_64", "amd64")


@needs_cpu_kernel
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("K,N,k", [(768, 4099, 50), (70, 1001, 1), (33, 130, 129), (33, 130, 130), (16, 300, 7)])
def test_topk_logits_match_full_product(M, K, N, k):
    g = torch.Generator().manual_seed(M * 100 + K + N + k)
    got = check_topk(torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.02, k)
    if k < N // 4 and _screens_here():   # the screen did screen: most entries -inf
        assert torch.isneginf(got).float().mean() > 0.5


@needs_cpu_kernel
def test_topk_logits_ties_cap_and_non_finite():
    g = torch.Generator().manual_seed(9)
    row = torch.randn(1, 40, generator=g)
    check_topk(torch.randn(2, 40, generator=g), row.repeat(1000, 1), 5)          # all tied: past the cap
    w = torch.randn(2000, 40, generator=g) * 0.01
    w[[10, 500, 1999]] = row * 5
    check_topk(row.repeat(2, 1), w, 2)                                            # ties at the k-th value
    x = torch.randn(3, 40, generator=g)
    x[1, 3] = float("nan")                                                        # full row, NaN logits
    got = check_topk(x, w, 10)
    assert got[1].isnan().all()


@needs_cpu_kernel
def test_topk_logits_fallbacks_and_errors():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(300, 24, generator=g)
    x = torch.randn(2, 24, generator=g)
    screen = LinearArgmaxScreen.build(w)
    assert torch.equal(ops.linear_topk_logits(x, w, 5), ops.linear(x, w))        # no screen: the full product
    with fastlm.use_backend("reference"):
        assert torch.equal(ops.linear_topk_logits(x, w, 5, screen), ops.linear(x, w))
    with pytest.raises(ValueError, match="k must be"):
        ops.linear_topk_logits(x, w, 0, screen)
    with pytest.raises(ValueError, match="another weight"):
        ops.linear_topk_logits(x, torch.randn(300, 24), 5, screen)
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.fastlm_C.linear_topk_logits_fwd(x, w, screen.qweight, screen.scale, screen.slack, 0)
    from fastlm.ops.linear_argmax import linear_topk_logits_fwd
    torch.library.opcheck(linear_topk_logits_fwd, (x, w, screen.qweight, screen.scale, screen.slack, 3))


@needs_cpu_kernel
@pytest.mark.parametrize("vnni", ["1", "0"])
def test_both_int8_screens(monkeypatch, vnni):
    """The integer screens (VNNI: two int8 digits per input, CPUs with avx512_vnni; AVX2: one int16
    digit, vpmaddwd, in CI's FASTLM_CPU_NO_AVX512=1 pass and on AVX2-only CPUs) and the fp32 screens
    (FASTLM_INT8_VNNI=0) give the exact pick and exact top-k logits: odd K (masked / scalar tails, every
    register tile shape), rows of 1..16, inputs with outliers 1e4x the rest (the digit rounding term
    of the bound dominates), tiny and zero rows, near ties."""
    monkeypatch.setenv("FASTLM_INT8_VNNI", vnni)
    g = torch.Generator().manual_seed(11)
    for M, K, N in [(1, 771, 5003), (2, 17, 601), (3, 64, 997), (4, 130, 2001), (5, 33, 700), (7, 96, 801),
                    (16, 200, 1500)]:
        x = torch.randn(M, K, generator=g)
        x[0, K // 2] = 1e4                              # an outlier: 2^e set by it
        if M > 2:
            x[1] *= 1e-30                               # a tiny row (2^e far below 1)
            x[2] = 0.0                                  # a zero row: every logit 0, the first index wins
        w = torch.randn(N, K, generator=g) * 0.05
        w[N // 3] = w[N // 3 + 1] + 1e-7 * torch.randn(K, generator=g)   # a near tie
        check(x, w)
        screen = LinearArgmaxScreen.build(w)
        with fastlm.use_backend("cpu"):
            got = ops.linear_topk_logits(x, w, 7, screen)
            full = torch.stack([ops.linear(x[m:m + 1], w)[0] for m in range(M)])
        top = full.topk(7, dim=-1)
        assert torch.equal(got.gather(1, top.indices), top.values)          # the top-k exact
        assert ((got == full) | torch.isneginf(got)).all()                  # the rest exact or -inf


@needs_cpu_kernel
@pytest.mark.parametrize("vnni", ["1", "0"])
def test_int8_screens_long_flat_and_wide_rows(monkeypatch, vnni):
    """Rows whose int16 digits would overflow int32 sums at the first scale (K = 6000, every |x| equal:
    the AVX2 screen raises 2^e until 127 sum|digit| < 2^31), a row spanning 1e-30..1e30 (the small
    elements all rounding error d), and K past the integer screens' 65536 (the fp32 screen)."""
    monkeypatch.setenv("FASTLM_INT8_VNNI", vnni)
    g = torch.Generator().manual_seed(12)
    K = 6000
    w = torch.randn(900, K, generator=g) * 0.02
    x = torch.sign(torch.randn(3, K, generator=g)) * 3.0
    x[1] = torch.randn(K, generator=g) * torch.logspace(-30, 30, K)[torch.randperm(K, generator=g)]
    check(x, w)
    check_topk(x, w, 5)
    K = 65537
    w = torch.randn(40, K, generator=g) * 0.01
    check(torch.randn(2, K, generator=g), w)


_AVX2_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
import test_linear_argmax as t
from fastlm import _ext
assert _ext.load() is not None, _ext.error()
paths = [p for p in torch.ops.fastlm_C.cpu_isa_paths() if p.startswith(("linear_argmax_fwd:", "linear_topk_logits_fwd:"))]
assert len(paths) == 2 and all(": avx2-int16 (" in p for p in paths), paths
g = torch.Generator().manual_seed(13)
for M in range(1, 17):
    for K, N in [(45, 400), (768, 2051)]:
        x = torch.randn(M, K, generator=g)
        x[0, 3] = 1e4
        w = torch.randn(N, K, generator=g) * 0.05
        w[7] = w[8] + 1e-7 * torch.randn(K, generator=g)
        t.check(x, w)
        t.check_topk(x, w, 3)
os.environ["FASTLM_INT8_VNNI"] = "0"
paths = [p for p in torch.ops.fastlm_C.cpu_isa_paths() if p.startswith("linear_argmax_fwd:")]
assert ": avx2 (" in paths[0], paths
t.check(torch.randn(5, 45, generator=g), torch.randn(400, 45, generator=g))
print("AVX2 INT16 SCREEN OK")
"""


@needs_cpu_kernel
@pytest.mark.skipif(not _screens_here(), reason="x86-64 only (the AVX2 screens)")
def test_avx2_int16_screen_subprocess():
    """FASTLM_CPU_NO_AVX512=1 (read once per process): fastlm info names the AVX2 integer screen, which
    gives the exact pick and top-k at every row count 1..16 (every register tile and block), and
    FASTLM_INT8_VNNI=0 names the fp32 one."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    env = dict(os.environ, FASTLM_CPU_NO_AVX512="1", FASTLM_INT8_VNNI="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT.format(tests=tests)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0 and "AVX2 INT16 SCREEN OK" in r.stdout
