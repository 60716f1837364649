"""The `fastlm` command (fastlm/cli.py): info, tune, bench's exit status, generate --weights, serve.

Parts other branches add (backends.cached_choices / tune_mode / last_choice, fastlm_C.cpu_isa_paths,
fastlm.quantize, fastlm.serving.cli) are used when present; where they are not, the tests stand them in
with monkeypatch, so both states of the build are covered."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import fastlm
from fastlm import backends, cli
from fastlm.bench import registry
from fastlm.bench.registry import Bound, Case

HAS_MEASURED_AUTO = hasattr(backends, "cached_choices") and hasattr(backends, "tune_mode")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))   # never the user's auto cache
    monkeypatch.setenv("FASTLM_BENCH_COMPILE", "0")
    monkeypatch.setenv("COLUMNS", "200")


# ---------------------------------------------------------------- info

def test_info_lists_isa_paths_and_cached_choices(monkeypatch, capsys):
    rec = {"op": "layer_norm", "key": "layer_norm|cpu|test-key", "backend": "cpu",
           "times_ms": {"cpu": 0.1, "torch": 0.2}, "excluded": {"triton": "disagrees with torch"}}
    monkeypatch.setattr(backends, "cached_choices", lambda: [rec], raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "CPU ISA path of each kernel:" in out
    if not hasattr(torch.ops.fastlm_C, "cpu_isa_paths"):
        assert "unknown" in out.split("CPU ISA path of each kernel:")[1].splitlines()[1]
    assert "auto choices cached: 1" in out and "layer_norm: cpu  [layer_norm|cpu|test-key]" in out
    assert "excluded: triton: disagrees with torch" in out
    assert "backends on cpu:" in out


def test_info_prints_kernel_isa_paths_when_the_extension_has_them(monkeypatch, capsys):
    fake_ops = types.SimpleNamespace(cpu_isa_paths=lambda: ["layer_norm: avx2 (FASTLM_CPU_NO_AVX512=1)",
                                                            "gelu_ffn: avx512"])
    monkeypatch.setattr(torch.ops, "fastlm_C", fake_ops)
    monkeypatch.setattr(cli, "_print_isa_paths", cli._print_isa_paths)
    from fastlm import _ext
    cli._print_isa_paths(backends, _ext.load() or object())
    out = capsys.readouterr().out
    assert "layer_norm: avx2 (FASTLM_CPU_NO_AVX512=1)" in out and "gelu_ffn: avx512" in out
    monkeypatch.setattr(torch.ops, "fastlm_C", types.SimpleNamespace(cpu_isa_paths=lambda: {"linear": "avx2"}))
    cli._print_isa_paths(backends, object())
    assert "linear: avx2" in capsys.readouterr().out


def test_info_without_measured_auto(monkeypatch, capsys):
    monkeypatch.delattr(backends, "cached_choices", raising=False)
    assert cli.main(["info"]) == 0
    assert "none cached" in capsys.readouterr().out


# ---------------------------------------------------------------- tune

def _stub_auto(monkeypatch):
    """A stand-in measured auto: every backend choice made inside tune_mode is 'cached'."""
    seen, inside = {}, [False]
    real_select = backends.select

    def select(op, device, supports, *a, **k):
        be = real_select(op, device, supports, *a, **k)
        if inside[0]:
            seen.setdefault(op, {"op": op, "key": f"{op}|stub", "backend": be, "times_ms": {be: 0.01},
                                 "excluded": {}})
        return be

    import contextlib

    @contextlib.contextmanager
    def tune_mode():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(backends, "select", select)
    monkeypatch.setattr(backends, "tune_mode", tune_mode, raising=False)
    monkeypatch.setattr(backends, "cached_choices", lambda: sorted(seen.values(), key=lambda r: r["key"]),
                        raising=False)
    return seen


@pytest.mark.parametrize("train", [False, True])
def test_tune_random_gpt2_tiny(monkeypatch, capsys, train):
    pytest.importorskip("transformers")
    seen = None if HAS_MEASURED_AUTO else _stub_auto(monkeypatch)
    argv = ["tune", "--random", "gpt2", "--layers", "2", "--seq", "8", "--new-tokens", "3"] + (["--train"] if train else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    assert "ran GPT-2 inference: fastlm.generate, prefill 1x8 + 2 decode steps" in out
    assert ("ran patched HF training step" in out) == train
    assert "auto choices cached:" in out
    for op in ("gelu_ffn", "layer_norm"):                 # the model's ops were measured (or their choice recorded)
        assert f"  {op}: " in out or f"  add_{op}: " in out, op
    if seen is not None:
        assert "scaled_dot_product_attention" in seen or "decode_attention" in seen


def test_tune_random_bert_tiny(monkeypatch, capsys):
    pytest.importorskip("transformers")
    if not HAS_MEASURED_AUTO:
        _stub_auto(monkeypatch)
    assert cli.main(["tune", "--random", "minilm", "--layers", "1", "--seq", "16", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "ran BERT inference: native forward 2x16" in out and "auto choices cached:" in out
    assert "  gelu_ffn: " in out


def test_tune_model_folder(monkeypatch, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not HAS_MEASURED_AUTO:
        _stub_auto(monkeypatch)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "m")
    assert cli.main(["tune", "--model", str(tmp_path / "m"), "--seq", "8"]) == 0
    assert "ran BERT inference" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit, match="fastlm tunes gpt2 and bert"):
        cli.main(["tune", "--model", str(tmp_path / "bad")])


def test_tune_needs_a_measured_auto(monkeypatch, capsys):
    monkeypatch.delattr(backends, "cached_choices", raising=False)
    assert cli.main(["tune", "--random", "gpt2", "--layers", "1"]) == 2
    assert "nothing to tune" in capsys.readouterr().err


def test_tune_with_autotune_off(monkeypatch, capsys):
    monkeypatch.setattr(backends, "cached_choices", lambda: [], raising=False)
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")
    assert cli.main(["tune", "--random", "bert", "--layers", "1"]) == 2
    assert "FASTLM_AUTOTUNE=0" in capsys.readouterr().err


# ---------------------------------------------------------------- bench exit status

@pytest.fixture
def fake_cases(monkeypatch):
    registry._load()
    monkeypatch.setattr(registry, "_CASES", list(registry._CASES))
    monkeypatch.setattr(registry, "load_errors", {})

    def boom():
        raise RuntimeError("forced failure for the exit-status test")

    def ok():
        return torch.ones(4)

    registry.register(Case("kernels", "fake", "zz cli failing case",
                           lambda d, t: Bound({"torch": ok, "fastlm:auto": boom}, bytes=16, baseline="torch"),
                           quick=True))
    registry.register(Case("kernels", "fake", "zz cli passing case",
                           lambda d, t: Bound({"torch": ok, "fastlm:auto": ok}, bytes=16, baseline="torch"),
                           quick=True))


def test_bench_exits_nonzero_when_a_row_errors_after_printing(fake_cases, capsys, tmp_path):
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--filter", "zz cli failing", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "zz cli failing case" in cap.out and "error" in cap.out          # the table came first
    assert "1 row(s) errored" in cap.err and "forced failure" in cap.err
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))


def test_bench_exits_zero_when_clean(fake_cases, capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--filter", "zz cli passing"]) == 0
    assert "zz cli passing case" in capsys.readouterr().out


def test_bench_weights_need_quantize(monkeypatch, capsys):
    monkeypatch.delattr(fastlm, "quantize", raising=False)
    assert cli.main(["bench", "--quick", "--suite", "models", "--weights", "int8"]) == 2
    assert "needs fastlm.quantize" in capsys.readouterr().err


def test_bench_suite_choices():
    parser, _, _ = cli.build_parser()
    args = parser.parse_args(["bench", "--suite", "serve", "--weights", "bf16"])
    assert args.suite == "serve" and args.weights == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--weights", "int4"])


def test_bench_activations(monkeypatch, capsys):
    # --activations int8 needs --weights int8; with it, the suites' fastlm models are quantized W8A8
    assert cli.main(["bench", "--quick", "--suite", "models", "--activations", "int8"]) == 2
    assert "--activations int8 needs --weights int8" in capsys.readouterr().err
    from fastlm.bench import common

    calls = []
    monkeypatch.setattr(fastlm, "quantize", lambda m, **kw: calls.append(kw) or m, raising=False)
    common.set_weights("int8", "int8")
    try:
        model = object()
        assert common.apply_weights(model) is model and calls == [{"weights": "int8", "activations": "int8"}]
        with pytest.raises(ValueError, match="activations"):
            common.set_weights("bf16", "int8")
    finally:
        common.set_weights("fp32")
    assert common.activations() is None


# ---------------------------------------------------------------- generate --weights, serve

def test_generate_weights(monkeypatch, capsys):
    from fastlm import generation

    monkeypatch.delattr(fastlm, "quantize", raising=False)
    assert cli.main(["generate", "--random", "gpt2", "--weights", "int8"]) == 2
    assert "needs fastlm.quantize" in capsys.readouterr().err

    calls, built = [], []
    monkeypatch.setattr(fastlm, "quantize", lambda m, weights: calls.append(weights) or m, raising=False)

    def fake_cli_main(args):                  # builds its model the way generation.cli_main does
        built.append(generation.GPT2.random(args.random, n_layer=1, n_embd=32, n_head=2, vocab_size=50))
        return 0

    monkeypatch.setattr(generation, "cli_main", fake_cli_main)
    assert cli.main(["generate", "--random", "gpt2", "--weights", "int8"]) == 0
    assert calls == ["int8"] and isinstance(built[0], fastlm.models.GPT2)
    assert generation.GPT2 is fastlm.models.GPT2                  # restored after the call
    calls.clear()
    assert cli.main(["generate", "--random", "gpt2"]) == 0 and calls == []      # fp32: untouched
    assert cli.main(["generate", "--random", "gpt2", "--activations", "int8"]) == 2    # needs --weights int8
    assert "needs --weights int8" in capsys.readouterr().err
    kws = []
    monkeypatch.setattr(fastlm, "quantize", lambda m, **kw: kws.append(kw) or m, raising=False)
    assert cli.main(["generate", "--random", "gpt2", "--weights", "int8", "--activations", "int8"]) == 0
    assert kws == [{"weights": "int8", "activations": "int8"}]


def test_serve_is_wired_through_serving_cli(monkeypatch):
    ran = []
    fake = types.ModuleType("fastlm.serving.cli")

    def add_parser(sub):
        p = sub.add_parser("serve")
        p.add_argument("--port", type=int, default=8000)

    fake.add_parser, fake.run = add_parser, lambda args: ran.append(args.port) or 0
    pkg = types.ModuleType("fastlm.serving")
    pkg.cli = fake
    monkeypatch.setitem(sys.modules, "fastlm.serving", pkg)
    monkeypatch.setitem(sys.modules, "fastlm.serving.cli", fake)
    assert cli.main(["serve", "--port", "1234"]) == 0 and ran == [1234]


def test_serve_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_serving_cli", lambda: None)
    assert cli.main(["serve"]) == 2
    assert "not available in this build" in capsys.readouterr().err
