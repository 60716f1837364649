"""fastlm.generate and the native GPT-2: token-for-token greedy equality with transformers'
GPT2LMHeadModel.generate (fp32, random-weight configs, several prompt lengths, a ragged left-padded
batch), sampling reproducibility, top_k=1 == greedy, eos stop and padding, argument errors raised
before any work, StaticKVCache, from_hf from a folder, the CLI."""
import argparse

import pytest
import torch

import fastlm
from fastlm.generation import add_cli_arguments, cli_main
from fastlm.models import GPT2
from fastlm.nn import StaticKVCache

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

CONFIGS = {
    # initializer_range well above GPT-2's 0.02: logits spread out, argmax is not a near-tie
    "small": dict(n_layer=2, n_embd=64, n_head=4, n_positions=96, vocab_size=1000, initializer_range=0.1),
    "erf-gelu": dict(n_layer=3, n_embd=96, n_head=3, n_positions=96, vocab_size=777, n_inner=200,
                     activation_function="gelu", initializer_range=0.1),
}


def _hf(name: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(bos_token_id=0, eos_token_id=0, **CONFIGS[name])
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_small():
    return _hf("small")


def _hf_greedy(hf, ids, mask=None, n=16, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt_len", [1, 6, 33])
def test_greedy_matches_hf(name, prompt_len):
    hf = _hf(name)
    ids = torch.randint(1, hf.config.vocab_size, (2, prompt_len))
    ref = _hf_greedy(hf, ids, n=20)
    out = fastlm.generate(hf, ids, max_new_tokens=20)
    assert out.dtype == torch.long and out.shape == ref.shape
    assert out.tolist() == ref.tolist()
    # converted once, cached on the HF model
    native = hf.__dict__["_fastlm_gpt2"]
    fastlm.generate(hf, ids, max_new_tokens=2)
    assert hf.__dict__["_fastlm_gpt2"] is native


def test_ragged_left_padded_batch_matches_each_prompt_alone(hf_small):
    lens = [5, 12, 1, 9]
    S = max(lens)
    prompts = [torch.randint(1, 1000, (n,)) for n in lens]
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):] = p
        mask[i, S - len(p):] = 1
    out = fastlm.generate(hf_small, ids, attention_mask=mask, max_new_tokens=15)
    ref_batch = _hf_greedy(hf_small, ids, mask, n=15)
    assert out.tolist() == ref_batch.tolist()
    for i, p in enumerate(prompts):
        alone = fastlm.generate(hf_small, p[None], max_new_tokens=15)
        hf_alone = _hf_greedy(hf_small, p[None], n=15)
        assert out[i, S:].tolist() == alone[0, len(p):].tolist() == hf_alone[0, len(p):].tolist()


def test_native_model_from_folder_and_dtypes(hf_small, tmp_path):
    hf_small.save_pretrained(tmp_path)
    native = GPT2.from_hf(str(tmp_path))
    ids = torch.randint(1, 1000, (1, 7))
    with torch.no_grad():
        ref = hf_small(ids).logits[:, -1]
    torch.testing.assert_close(native(ids), ref, rtol=1e-4, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        low = GPT2.from_hf(hf_small, dtype=dtype)
        assert low.wte.weight.dtype == dtype
        out = fastlm.generate(low, ids, max_new_tokens=4)
        assert out.shape == (1, 11)


def test_sampling_reproducible(hf_small):
    ids = torch.randint(1, 1000, (3, 8))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = fastlm.generate(hf_small, ids, generator=torch.Generator().manual_seed(123), **kw)
    b = fastlm.generate(hf_small, ids, generator=torch.Generator().manual_seed(123), **kw)
    c = fastlm.generate(hf_small, ids, generator=torch.Generator().manual_seed(7), **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a.shape == (3, 20) and int(a.min()) >= 0 and int(a.max()) < 1000


def test_top_k_1_is_greedy(hf_small):
    ids = torch.randint(1, 1000, (2, 5))
    greedy = fastlm.generate(hf_small, ids, max_new_tokens=10)
    sampled = fastlm.generate(hf_small, ids, max_new_tokens=10, do_sample=True, top_k=1, temperature=1.7,
                              generator=torch.Generator().manual_seed(0))
    assert sampled.tolist() == greedy.tolist()


def test_top_p_keeps_only_the_nucleus():
    from fastlm.generation import _process_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_process_logits(logits, 1.0, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_process_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False]]


def test_eos_stops_and_pads(hf_small):
    ids = torch.randint(1, 1000, (2, 6))
    free = fastlm.generate(hf_small, ids, max_new_tokens=12)
    eos = int(free[0, 6 + 3])                      # row 0 produces it at step 4
    if eos in free[1, 6:].tolist():
        pytest.skip("row 1 produces the same token")
    out = fastlm.generate(hf_small, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=999)
    ref = _hf_greedy(hf_small, ids, n=12, eos_token_id=eos)
    row0 = out[0, 6:].tolist()
    first = row0.index(eos)
    assert first <= 3 and all(t == 999 for t in row0[first + 1:])
    assert out[1].tolist() == free[1, :out.shape[1]].tolist()
    hf_row0 = ref[0, 6:].tolist()
    assert hf_row0[:first + 1] == row0[:first + 1] and all(t == 0 for t in hf_row0[first + 1:])
    # every row finished: the loop stops early
    one = fastlm.generate(hf_small, ids[:1], max_new_tokens=12, eos_token_id=eos)
    assert one.shape[1] == 6 + first + 1 and int(one[0, -1]) == eos


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, t):
        self.calls.append(t.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_gets_each_step(hf_small):
    ids = torch.randint(1, 1000, (2, 4))
    rec = _Recorder()
    out = fastlm.generate(hf_small, ids, max_new_tokens=5, streamer=rec)
    assert len(rec.calls) == 1 + 5 + 1 and rec.calls[-1] == "end"
    assert rec.calls[0].tolist() == ids.tolist()
    assert torch.stack(rec.calls[1:6], 1).tolist() == out[:, 4:].tolist()


def test_errors_before_any_work(hf_small):
    rec = _Recorder()
    ids = torch.randint(1, 1000, (1, 90))
    with pytest.raises(ValueError, match="positions"):
        fastlm.generate(hf_small, ids, max_new_tokens=7, streamer=rec)    # 97 > 96 positions
    with pytest.raises(ValueError, match="vocabulary"):
        fastlm.generate(hf_small, torch.tensor([[1, 2, 1000]]), max_new_tokens=2, streamer=rec)
    with pytest.raises(ValueError, match="vocabulary"):
        fastlm.generate(hf_small, torch.tensor([[1, -1]]), max_new_tokens=2, streamer=rec)
    with pytest.raises(ValueError, match="left-padded"):
        fastlm.generate(hf_small, torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]), streamer=rec)
    with pytest.raises(ValueError, match="top_p"):
        fastlm.generate(hf_small, torch.tensor([[1, 2]]), do_sample=True, top_p=0.0, streamer=rec)
    with pytest.raises(ValueError, match="temperature"):
        fastlm.generate(hf_small, torch.tensor([[1, 2]]), do_sample=True, temperature=0.0, streamer=rec)
    with pytest.raises(TypeError, match="model"):
        fastlm.generate(torch.nn.Linear(2, 2), torch.tensor([[1, 2]]))
    assert rec.calls == []
    # exactly at the limit is fine
    assert fastlm.generate(hf_small, ids, max_new_tokens=6).shape == (1, 96)


def test_static_kv_cache():
    c = StaticKVCache(2, 3, 2, 4, 5)
    assert c.k.shape == (2, 3, 2, 4, 5) and c.lengths.tolist() == [0, 0, 0]
    c.set_lengths(torch.tensor([0, 2, 3], dtype=torch.int32))
    k, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    layer0 = c.k[0].clone()                                              # CPU buffers are not zero-filled
    c.append(1, k, v)
    c.advance()
    assert c.lengths.tolist() == [1, 3, 4]
    for b, p in enumerate([0, 2, 3]):
        assert torch.equal(c.keys(1)[b, :, p], k[b]) and torch.equal(c.values(1)[b, :, p], v[b])
    assert torch.equal(c.keys(0).view(torch.int32), layer0.view(torch.int32))   # other layer untouched
    with pytest.raises(ValueError, match="full"):
        c.append(0, k, v)                                                # row 2 is at max_seq
    c.reset()
    assert c.lengths.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        c.append(0, k[:2], v[:2])
    with pytest.raises(ValueError, match="batch"):
        StaticKVCache(2, 0, 2, 4, 5)
    # prefill with left padding: each row stored without its pads
    kk = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).reshape(3, 2, 4, 5)
    c.fill(0, kk, kk, start=torch.tensor([0, 1, 3]))
    assert torch.equal(c.keys(0)[1, :, :3], kk[1, :, 1:]) and torch.equal(c.keys(0)[2, :, :1], kk[2, :, 3:])


def test_cli_generate(hf_small, tmp_path, capsys):
    hf_small.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--tokens", "5,6,7", "--max-new-tokens", "6"])
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    expected = _hf_greedy(hf_small, torch.tensor([[5, 6, 7]]), n=6)[0, 3:].tolist()
    assert " ".join(map(str, expected)) in out
    assert "tokens/s" in out


def test_cpu_decode_thread_count_changes_no_logit(hf_small, monkeypatch):
    """generate() picks the CPU decode steps' thread count by timing them: the logits of a step must
    not depend on it (compared bit for bit through the decode steps), and the caller's count is
    restored afterwards."""
    model = GPT2.from_hf(hf_small)
    ids = torch.randint(1, hf_small.config.vocab_size, (1, 70))   # batch * heads < 2 * threads: split cache
    saved = torch.get_num_threads()
    logits = {}
    # fastlm's C++ kernels are the subject (auto may pick torch's BLAS for this tiny model, whose
    # sums depend on the thread count)
    with fastlm.use_backend("cpu"):
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cache = model.new_cache(1, 72)
            model.prefill(ids, cache)
            logits[n] = model.decode_step(ids[:, -1], cache)
    torch.set_num_threads(saved)
    assert torch.equal(logits[1], logits[2]) and torch.equal(logits[1], logits[3])
    outs = []
    for fixed in ("1", "2", None):
        if fixed is None:
            monkeypatch.delenv("FASTLM_DECODE_THREADS", raising=False)
        else:
            monkeypatch.setenv("FASTLM_DECODE_THREADS", fixed)
        outs.append(fastlm.generate(model, ids, max_new_tokens=20).tolist())
        assert torch.get_num_threads() == saved
    assert outs[0] == outs[1] == outs[2]


def test_cache_positions_past_the_lengths_are_never_read(hf_small):
    """A cache whose unwritten positions hold NaN gives the same logits as a zeroed one (the CPU
    cache is allocated without a fill)."""
    model = GPT2.from_hf(hf_small)
    ids = torch.randint(1, hf_small.config.vocab_size, (3, 7))
    out = []
    for fill in (0.0, float("nan")):
        cache = model.new_cache(3, 30)
        cache.k.fill_(fill), cache.v.fill_(fill)
        logits = [model.prefill(ids, cache)]
        for _ in range(4):
            logits.append(model.decode_step(logits[-1].argmax(-1), cache))
        out.append(torch.stack(logits))
    assert torch.isfinite(out[1]).all() and torch.equal(out[0], out[1])


@pytest.mark.parametrize("B", [1, 3])
def test_cpp_layer_loop_matches_python_loop(hf_small, monkeypatch, B):
    """decode_step's C++ layer loop (fastlm_C::decode_layers) runs the same kernels in the same order
    as the Python loop: logits and cache contents bit for bit."""
    model = GPT2.from_hf(hf_small)
    ids = torch.randint(1, hf_small.config.vocab_size, (B, 11))
    runs = []
    for fused in ("1", "0"):
        monkeypatch.setenv("FASTLM_DECODE_LAYERS", fused)
        cache = model.new_cache(B, 20)
        logits = [model.prefill(ids, cache)]
        for _ in range(5):
            logits.append(model.decode_step(logits[-1].argmax(-1), cache))
        n = int(cache.lengths.max())
        runs.append((torch.stack(logits), cache.k[:, :, :, :n].clone(), cache.v[:, :, :, :n].clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,activations,group_size", [(1, None, None), (3, None, None), (3, None, 16),
                                                       (1, "int8", None), (4, "int8", None)])
def test_cpp_layer_loop_quantized_matches_python_loop(hf_small, monkeypatch, B, activations, group_size):
    """A fastlm.quantize'd model's decode step takes decode_layers with the int8 projections (W8A32
    linear_int8_fwd; W8A8 linear_w8a8_fwd at 2+ rows): logits and cache bit for bit the Python loop's."""
    model = fastlm.quantize(GPT2.from_hf(hf_small), weights="int8", group_size=group_size, activations=activations)
    ids = torch.randint(1, hf_small.config.vocab_size, (B, 11))
    calls = []
    real = torch.ops.fastlm_C.decode_layers
    monkeypatch.setattr(torch.ops.fastlm_C, "decode_layers", lambda *a: calls.append(len(a[2])) or real(*a))
    runs = []
    with fastlm.use_backend("cpu"):        # every op on its C++ kernel (auto may pick torch at these sizes)
        for fused in ("1", "0"):
            monkeypatch.setenv("FASTLM_DECODE_LAYERS", fused)
            cache = model.new_cache(B, 20)
            logits = [model.prefill(ids, cache)]
            for _ in range(5):
                logits.append(model.decode_step(logits[-1].argmax(-1), cache))
            n = int(cache.lengths.max())
            runs.append((torch.stack(logits), cache.k[:, :, :, :n].clone(), cache.v[:, :, :, :n].clone()))
    per_layer = 20 if activations and B > 1 else 16
    assert calls == [per_layer * len(model.blocks)] * 5       # the fused run only, every step
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("B", [1, 3])
def test_cpp_layer_loop_bf16_weights_matches_python_loop(hf_small, monkeypatch, B):
    """bf16 weights (fastlm.quantize(weights="bf16")) under fp32 activations: the decode step loops in
    C++ with linear_w16_fwd (what ops.linear_bf16w calls): logits and cache bit for bit the Python
    loop's, and the Python loop's the modules' (ops.linear_bf16w)."""
    fastlm._ext.load()
    model = fastlm.quantize(GPT2.from_hf(hf_small), weights="bf16")
    ids = torch.randint(1, hf_small.config.vocab_size, (B, 9))
    calls = []
    real = torch.ops.fastlm_C.decode_layers
    monkeypatch.setattr(torch.ops.fastlm_C, "decode_layers", lambda *a: calls.append(len(a[2])) or real(*a))
    runs = []
    with fastlm.use_backend("cpu"):
        for fused in ("1", "0", "modules"):
            monkeypatch.setenv("FASTLM_DECODE_LAYERS", "1" if fused == "1" else "0")
            if fused == "modules":         # the Python loop through the modules themselves
                monkeypatch.setattr(type(model), "_quant_linear", lambda self, x: (lambda mod, x: mod(x)))
            cache = model.new_cache(B, 16)
            logits = [model.prefill(ids, cache)]
            for _ in range(4):
                logits.append(model.decode_step(logits[-1].argmax(-1), cache))
            n = int(cache.lengths.max())
            runs.append((torch.stack(logits), cache.k[:, :, :, :n].clone(), cache.v[:, :, :, :n].clone()))
    assert calls == [12 * len(model.blocks)] * 4
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("quantized", [False, True])
def test_cpp_layer_loop_runs_where_torch_layer_norm_was_picked(hf_small, monkeypatch, quantized):
    """At decode rows the measured auto may pick torch's LayerNorm (the two take a few microseconds
    each); the step still loops in C++ (saving ~100 Python op calls a step) with fastlm's LayerNorm,
    and gives the Python loop's logits."""
    import fastlm.models.gpt2 as gpt2_mod
    model = GPT2.from_hf(hf_small)
    if quantized:
        model = fastlm.quantize(model, weights="int8")
    monkeypatch.setattr(gpt2_mod, "layer_norm_kernel", lambda *a: ("torch", None))
    calls = []
    real = torch.ops.fastlm_C.decode_layers
    monkeypatch.setattr(torch.ops.fastlm_C, "decode_layers", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, hf_small.config.vocab_size, (1, 7))
    runs = []
    with fastlm.use_backend("cpu"):        # linear and attention on their C++ kernels
        for fused in ("1", "0"):
            monkeypatch.setenv("FASTLM_DECODE_LAYERS", fused)
            cache = model.new_cache(1, 12)
            logits = [model.prefill(ids, cache)]
            for _ in range(3):
                logits.append(model.decode_step(logits[-1].argmax(-1), cache))
            runs.append(torch.stack(logits))
    assert len(calls) == 3                 # every step of the fused run
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])


def test_cpp_layer_loop_checks_quantized_inputs(hf_small):
    model = fastlm.quantize(GPT2.from_hf(hf_small), weights="int8")
    cache = model.new_cache(2, 8)
    x = h = torch.randn(2, hf_small.config.n_embd)
    w = model._quant_layer_weights(x, model._quant_linear(x))
    assert w is not None and len(w) == 16 * len(model.blocks)
    idx, lens = cache.step_index(), cache.next_lengths()
    eps = [1e-5] * (2 * len(model.blocks))
    op = torch.ops.fastlm_C.decode_layers
    op(x, h, w, cache.k, cache.v, idx, lens, 0.125, "tanh", eps)          # well-formed: runs
    with pytest.raises(RuntimeError, match="16 tensors per layer"):
        op(x, h, w[:-1], cache.k, cache.v, idx, lens, 0.125, "tanh", eps)
    bad = list(w)
    bad[12] = bad[12].double()                                             # a scale of the wrong dtype
    with pytest.raises(RuntimeError, match=r"weights\[12\] must be a Float"):
        op(x, h, bad, cache.k, cache.v, idx, lens, 0.125, "tanh", eps)
    bad = list(w)
    bad[0] = bad[0].float()                                                # int8 model, one fp32 weight
    with pytest.raises(RuntimeError, match=r"weights\[0\]|tensors per layer"):
        op(x, h, bad, cache.k, cache.v, idx, lens, 0.125, "tanh", eps)


def test_cpp_layer_loop_checks_its_inputs(hf_small):
    model = GPT2.from_hf(hf_small)
    cache = model.new_cache(2, 8)
    C = hf_small.config.n_embd
    x = h = torch.randn(2, C)
    w = model._decode_layer_weights()
    idx, lens = cache.step_index(), cache.next_lengths()
    eps = [1e-5] * (2 * len(model.blocks))
    op = torch.ops.fastlm_C.decode_layers
    op(x, h, w, cache.k, cache.v, idx, lens, 0.125, "tanh", eps)          # well-formed: runs
    with pytest.raises(RuntimeError, match="12 tensors per layer"):
        op(x, h, w[:-1], cache.k, cache.v, idx, lens, 0.125, "tanh", eps)
    with pytest.raises(RuntimeError, match="index holds a row outside"):
        op(x, h, w, cache.k, cache.v, idx + 10_000, lens, 0.125, "tanh", eps)
    with pytest.raises(RuntimeError, match="k_cache"):
        op(x, h, w, cache.k[:1], cache.v[:1], idx, lens, 0.125, "tanh", eps)
    with pytest.raises(RuntimeError, match="eps"):
        op(x, h, w, cache.k, cache.v, idx, lens, 0.125, "tanh", eps[:1])
    with pytest.raises(RuntimeError, match="approximate"):
        op(x, h, w, cache.k, cache.v, idx, lens, 0.125, "fast", eps)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, h, w, cache.k.double(), cache.v.double(), idx, lens, 0.125, "tanh", eps)
    with pytest.raises(RuntimeError, match="weights\\[3\\]"):
        op(x, h, w[:3] + [w[3].double()] + w[4:], cache.k, cache.v, idx, lens, 0.125, "tanh", eps)


@pytest.mark.parametrize("kw", [dict(top_k=20), dict(top_k=50, top_p=0.9, temperature=0.7)])
def test_topk_sampling_through_the_screen_draws_the_same_tokens(hf_small, monkeypatch, kw):
    """CPU top-k sampling reads the head through its int8 screen (ops.linear_topk_logits): at batch 1
    the tokens equal those drawn from the full logits (the screen off), seed for seed."""
    model = GPT2.from_hf(hf_small)
    ids = torch.randint(1, hf_small.config.vocab_size, (1, 7))
    runs = []
    for screened in (True, False):
        if not screened:
            monkeypatch.setattr(GPT2, "head_screen", lambda self: None)
        g = torch.Generator().manual_seed(3)
        runs.append(fastlm.generate(model, ids, max_new_tokens=24, do_sample=True, generator=g, **kw))
    assert runs[0].tolist() == runs[1].tolist()


def test_greedy_decode_step_matches_logits_argmax(hf_small):
    """decode_step(greedy=True) (CPU fp32: the LM head's int8 screen, ops.linear_argmax) returns each
    row's argmax of decode_step's logits, step after step; the screen is built once and rebuilt when
    the head weight changes."""
    model = GPT2.from_hf(hf_small)
    B = 5
    ids = torch.randint(1, hf_small.config.vocab_size, (B, 9))
    caches = [model.new_cache(B, 20), model.new_cache(B, 20)]
    tok = model.prefill(ids, caches[0]).argmax(-1)
    model.prefill(ids, caches[1])
    for _ in range(8):
        logits = model.decode_step(tok, caches[0])
        picked = model.decode_step(tok, caches[1], greedy=True)
        assert picked.dtype == torch.long and torch.equal(picked, logits.argmax(-1))
        tok = picked
    screen = model.head_screen()
    assert screen is not None and model.head_screen() is screen
    with torch.no_grad():
        model.wte.weight.mul_(1.5)
    assert model.head_screen() is not screen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_generate_on_cuda_matches_hf_greedy(dtype):
    """The CUDA path: the decode step captured in a CUDA graph and replayed, the CUDA/Triton kernels.
    fp32: token for token equal to HF's greedy on the same GPU. fp16: rounding differs between the two
    implementations, so argmax near-ties may flip: the first 8 tokens must agree and the rest mostly."""
    hf = _hf("erf-gelu").to("cuda", dtype)
    ids = torch.randint(1, hf.config.vocab_size, (3, 7), device="cuda")
    ref = _hf_greedy(hf, ids, n=24)
    out = fastlm.generate(hf, ids, max_new_tokens=24)
    assert out.device.type == "cuda" and out.shape == ref.shape
    if dtype == torch.float32:
        assert out.tolist() == ref.tolist()
    else:
        assert out[:, : 7 + 8].tolist() == ref[:, : 7 + 8].tolist()
        assert (out == ref).float().mean().item() > 0.9
    again = fastlm.generate(hf, ids, max_new_tokens=24)  # a second call replays a fresh graph: same tokens
    assert again.tolist() == out.tolist()


@pytest.mark.parametrize("enabled", [True, False])
def test_generate_pauses_gc_only_for_its_loop(hf_small, enabled):
    """The decode loop runs with the cyclic GC off and leaves it as it found it, also on an error."""
    import gc

    seen = []

    class Probe:
        def put(self, t):
            seen.append(gc.isenabled())

        def end(self):
            pass

    model = GPT2.from_hf(hf_small)
    ids = torch.randint(1, hf_small.config.vocab_size, (1, 5))
    (gc.enable if enabled else gc.disable)()
    try:
        fastlm.generate(model, ids, max_new_tokens=3, streamer=Probe())
        assert gc.isenabled() == enabled
        assert seen[0] == enabled and seen[1:] == [False] * 3     # put(prompt) before the loop, then 3 steps

        class Boom(Probe):
            def put(self, t):
                if len(seen) > 5:
                    raise RuntimeError("boom")
                seen.append(gc.isenabled())
        with pytest.raises(RuntimeError, match="boom"):
            fastlm.generate(model, ids, max_new_tokens=8, streamer=Boom())
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
