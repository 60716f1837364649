"""The benchmark harness (fastlm/bench): case discovery, the "fastlm:auto" row of every case, the record
of what auto picked, error rows and the reports. Timings are never asserted (speed is measured in
benchmarks, not tests); cases are built but only the cheap ones are run."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import fastlm
from fastlm import backends
from fastlm.bench import common, registry, report, runner
from fastlm.bench.registry import Bound, Case

PEAKS = {"copy_gbs": 10.0, "matmul_tflops": 0.1, "matmul_dtype": "float32"}


@pytest.fixture
def clean_registry(monkeypatch):
    """Register test cases (or reload the case modules) without leaking into other tests."""
    registry._load()
    monkeypatch.setattr(registry, "_CASES", list(registry._CASES))
    monkeypatch.setattr(registry, "load_errors", dict(registry.load_errors))
    return registry


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    monkeypatch.setenv("FASTLM_BENCH_COMPILE", "0")          # inductor's compile: seconds per case


def _run(impls, baseline="torch", check=None, family="fake"):
    case = Case("kernels", family, f"fake {family}", lambda d, t: Bound(impls, bytes=1e3, check=check,
                                                                       baseline=baseline))
    return runner.run_case(case, torch.device("cpu"), torch.float32, PEAKS, quick=True)


def test_suites_include_serve():
    assert registry.SUITES == ("kernels", "models", "generate", "serve", "quant")


def test_every_case_module_is_discovered_and_a_broken_one_reported(clean_registry, monkeypatch, tmp_path):
    """cases_*.py files other parts add (cases_serve.py, cases_quant.py, ...) are found without an edit."""
    (tmp_path / "cases_zz_extra.py").write_text(
        "from fastlm.bench.registry import Bound, Case, register\n"
        "register(Case('serve', 'fake', 'zz extra serve case', lambda d, t: Bound({'x': lambda: 1}), quick=True))\n")
    (tmp_path / "cases_zz_broken.py").write_text("raise ImportError('needs a package this machine lacks')\n")
    import fastlm.bench as pkg

    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__) + [str(tmp_path)])
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        names = [c.name for c in registry.cases("serve", "cpu", quick=True)]
        assert "zz extra serve case" in names
        assert "needs a package" in registry.load_errors["fastlm.bench.cases_zz_broken"]
        assert registry.cases("kernels", "cpu", quick=True)            # the real modules still load
        run = runner.run_suite("serve", "cpu", torch.float32, quick=True, names="zz extra")
        assert any(r["name"] == "import fastlm.bench.cases_zz_broken" for r in run["cases"])
        assert any("cases_zz_broken" in f for f in runner.failures(run))
    finally:
        import sys
        sys.modules.pop("fastlm.bench.cases_zz_extra", None)
        sys.modules.pop("fastlm.bench.cases_zz_broken", None)


def test_bench_backends_start_with_auto():
    bes = common.bench_backends("layer_norm", torch.device("cpu"))
    assert bes[0] == "auto" and "reference" not in bes
    assert set(bes[1:]) <= set(fastlm.available_backends("layer_norm", "cpu"))


@pytest.mark.parametrize("case", [c for c in registry.cases("kernels", "cpu", quick=True)], ids=lambda c: c.name)
def test_every_quick_kernel_case_has_an_auto_row(case):
    bound = case.make(torch.device("cpu"), torch.float32)
    assert common.AUTO in bound.impls, sorted(bound.impls)
    assert bound.auto_labels and bound.baseline in bound.impls
    forced = {k for k in bound.impls if k.startswith("fastlm:") and not k.startswith("fastlm:auto")}
    assert forced, "the forced backends sit beside auto"
    if case.family == "dispatch":
        out = bound.impls[common.AUTO]()                         # cheap: run it
        assert torch.is_tensor(out)


def test_model_and_generate_cases_have_auto_rows():
    pytest.importorskip("transformers")
    models = [c for c in registry.cases("models", "cpu", quick=True)]
    assert models
    bound = models[0].make(torch.device("cpu"), torch.float32)      # models are built lazily: cheap
    assert "fastlm:auto (patched)" in bound.impls and "fastlm:reference (patched)" in bound.impls
    dec = next(c for c in registry.cases("generate", "cpu", quick=True) if c.family == "decode_attention")
    assert common.AUTO in dec.make(torch.device("cpu"), torch.float32).impls


def test_runner_records_what_auto_picked(monkeypatch):
    """The auto row runs once more in a fresh thread; last_choice (per thread) names each op it called."""
    seen = threading.local()

    def last_choice(op):
        return "cpu" if op == "layer_norm" and getattr(seen, "ran", False) else None

    monkeypatch.setattr(backends, "last_choice", last_choice, raising=False)

    def auto():
        seen.ran = True
        return torch.ones(3)

    row = _run({"torch": lambda: torch.ones(3), "fastlm:auto": auto, "fastlm:cpu": lambda: torch.ones(3)})
    assert row["auto"] == {"fastlm:auto": {"layer_norm": "cpu"}}
    assert "speedup" in row["results"]["fastlm:auto"]
    run = {"environment": runner.environment(torch.device("cpu")), "suite": "kernels", "quick": True,
           "dtype": "float32", "weights": "fp32", "peaks": PEAKS, "cases": [row]}
    md = report.to_markdown(run)
    print(md)
    assert "fastlm:auto -> cpu" in md and "layer_norm=cpu" in md and "## fastlm:auto vs torch" in md
    json.dumps(run)                                                  # the JSON report serializes it


def test_runner_without_last_choice_says_unknown(monkeypatch):
    monkeypatch.delattr(backends, "last_choice", raising=False)
    row = _run({"torch": lambda: 1, "fastlm:auto": lambda: 1})
    assert "auto" not in row
    run = {"environment": runner.environment(torch.device("cpu")), "suite": "kernels", "quick": True,
           "dtype": "float32", "peaks": PEAKS, "cases": [row]}
    assert "unknown" in report.to_markdown(run)


def test_error_rows_are_failures(tmp_path):
    def boom():
        raise RuntimeError("kernel exploded")

    row = _run({"torch": lambda: 1, "fastlm:auto": boom})
    assert "kernel exploded" in row["results"]["fastlm:auto"]["error"]
    assert runner.failures({"cases": [row]}) == ["fake fake: fastlm:auto: RuntimeError: kernel exploded"]
    bad_check = _run({"torch": lambda: 1}, check=boom)
    assert runner.failures({"cases": [bad_check]}) and "parity check failed" in bad_check["error"]
    assert runner.failures({"cases": [_run({"torch": lambda: 1, "fastlm:auto": lambda: 1})]}) == []
    run = {"environment": runner.environment(torch.device("cpu")), "suite": "kernels", "quick": True,
           "dtype": "float32", "peaks": PEAKS, "cases": [row, bad_check]}
    paths = report.write_outputs(run, str(tmp_path), "x")
    assert os.path.exists(paths[0]) and "error" in open(paths[1]).read()


def test_dispatch_summary_gives_overhead_per_call():
    row = _run({"torch": lambda: 1, "kernel direct (fastlm_C)": lambda: 1, "fastlm:auto": lambda: 1},
               family="dispatch")
    (name, label, ms, text, below, picks), = report.auto_summary({"cases": [row]})
    assert "us/call over the kernel" in text and not below


def test_weights_setting_and_quantize_error(monkeypatch):
    with pytest.raises(ValueError, match="weights must be one of"):
        common.set_weights("int4")
    model = torch.nn.Linear(2, 2)
    common.set_weights("fp32")
    assert common.apply_weights(model) is model
    monkeypatch.delattr(fastlm, "quantize", raising=False)
    common.set_weights("int8")
    try:
        with pytest.raises(RuntimeError, match="no fastlm.quantize"):
            common.apply_weights(model)
        calls = []
        monkeypatch.setattr(fastlm, "quantize", lambda m, weights: calls.append(weights) or m, raising=False)
        assert common.apply_weights(model) is model and calls == ["int8"]
    finally:
        common.set_weights("fp32")


def test_inductor_cache_kept_apart_under_aten_cpu_capability(monkeypatch):
    """Emulated-AVX2 runs (ATEN_CPU_CAPABILITY) compile into an inductor cache of their own: inductor
    does not key its cache on the capability, and an AVX2-compiled kernel loaded natively corrupted the
    heap; a TORCHINDUCTOR_CACHE_DIR the user set is kept; without the variable nothing changes."""
    from fastlm.bench.common import inductor_cache_for_capability

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    inductor_cache_for_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("_cap_avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/some/where")
    inductor_cache_for_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/some/where"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    inductor_cache_for_capability()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_cpu_contenders_are_timed_interleaved():
    """time_cpu_interleaved: after each contender's warm-up and timed call, every round runs each
    contender's block once in a rotated order; a contender that raises gets its exception, the others
    still get timings; the slower contender's median is the larger."""
    from fastlm.bench.timer import Timing, time_cpu_interleaved
    log = []

    def make(name, sleep):
        def fn():
            log.append(name)
            time.sleep(sleep)
        return fn

    def broken():
        raise RuntimeError("no kernel")
    res = time_cpu_interleaved({"a": make("a", 0.002), "b": make("b", 0.006), "c": broken}, quick=True,
                               min_rounds=3, max_rounds=3)
    assert isinstance(res["c"], RuntimeError) and list(res) == ["a", "b", "c"]
    assert isinstance(res["a"], Timing) and isinstance(res["b"], Timing)
    assert res["b"].median_ms > res["a"].median_ms >= 2.0
    na, nb = res["a"].runs // 3, res["b"].runs // 3             # calls per block
    rounds = log[4:]                                            # after warm-up + timed call of a and b
    blocks = [rounds[:na], rounds[na:na + nb]]                  # round 0: a then b
    assert blocks == [["a"] * na, ["b"] * nb]
    assert rounds[na + nb:na + nb + nb] == ["b"] * nb           # round 1 starts with b (rotated)
    assert len(rounds) == 3 * (na + nb)
