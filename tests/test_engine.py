"""fastlm.Engine: batch invariance against fastlm.generate (32 concurrent mixed-length requests), bit-identical
logits alone vs batched, chunked prefill, preemption under a tiny KV pool, prefix caching, abort, n > 1
with seeds, finish reasons, bad inputs, the asyncio stream (concurrent consumers, a cancelled one),
add_request from another thread, drain. A tiny random GPT-2 keeps it fast."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import fastlm
from fastlm.models.gpt2 import GPT2
from fastlm.serving import engine as engine_mod
from fastlm.serving import Engine, SamplingParams

VOCAB = 512
_SAMPLE_ROWS = engine_mod.sample_rows


@pytest.fixture(scope="module")
def model():
    """A tiny GPT-2 whose greedy continuations vary (GPT-2's own init with a tied head mostly repeats one
    token, which would hide wrong keys or positions): larger weights, an untied head."""
    m = GPT2.random("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15, generator=g)
        m.lm_head = torch.nn.Parameter(torch.randn(VOCAB, 64, generator=g) * 0.3, requires_grad=False)
    return m


def _prompts(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _reference(model, prompt, max_new):
    return fastlm.generate(model, torch.tensor(prompt)[None], max_new_tokens=max_new)[0, len(prompt):].tolist()


def _run_all(eng, max_steps=10_000):
    """Step until done; {(request_id, index): tokens}, {(request_id, index): finish_reason}."""
    toks, reasons = {}, {}
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            toks.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
            if o.finished:
                assert (o.request_id, o.index) not in reasons, "finished twice"
                reasons[(o.request_id, o.index)] = o.finish_reason
    assert not eng.has_unfinished(), "engine did not finish"
    return toks, reasons


def _no_blocks_in_use(eng):
    s = eng.stats()
    assert s["kv_blocks_used"] == 0, s
    assert s["kv_blocks_free"] == s["kv_blocks_total"]
    assert s["num_running"] == 0 and s["num_waiting"] == 0


def test_batch_invariance_matches_generate(model):
    """32 concurrent greedy requests of mixed lengths: each one's tokens == fastlm.generate on it alone."""
    prompts = _prompts(32, 1, 120)
    news = [8 + (i * 7) % 25 for i in range(32)]
    eng = Engine(model, max_num_seqs=32, max_num_batched_tokens=512)
    ids = [eng.add_request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, news)]
    toks, reasons = _run_all(eng)
    for rid, p, n in zip(ids, prompts, news):
        assert toks[(rid, 0)] == _reference(model, p, n), f"request {rid} (prompt {len(p)}) differs from generate"
        assert reasons[(rid, 0)] == "length"
    _no_blocks_in_use(eng)
    s = eng.stats()
    assert s["generation_tokens_total"] == sum(news) and s["prompt_tokens_total"] == sum(map(len, prompts))


def _logits_by_request(eng, monkeypatch):
    """Record the logits row each sequence sampled from: {(request_id, index): [row, ...]}."""
    eng.runner.use_head_screen = False                     # greedy rows through their full logits too
    seen = {}
    real = _SAMPLE_ROWS

    def spy(logits, seqs):
        for row, s in zip(logits, seqs):
            seen.setdefault((s.request_id, s.index), []).append(row.clone())
        return real(logits, seqs)
    monkeypatch.setattr(engine_mod, "sample_rows", spy)
    return seen


def test_logits_bit_identical_alone_and_batched(model, monkeypatch):
    """The strongest form: a request's logits at every step are bit for bit the same alone as among 15
    others (other lengths, prefill chunks in the same steps, a small token budget)."""
    prompts = _prompts(16, 1, 100, seed=3)
    target = prompts[5]
    alone = Engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    seen_alone = _logits_by_request(alone, monkeypatch)
    alone.add_request(target, SamplingParams(max_tokens=12), request_id="t")
    _run_all(alone)
    batched = Engine(model, max_num_seqs=16, max_num_batched_tokens=40)
    seen = _logits_by_request(batched, monkeypatch)
    for i, p in enumerate(prompts):
        batched.add_request(p, SamplingParams(max_tokens=12), request_id="t" if i == 5 else f"o{i}")
    _run_all(batched)
    a, b = seen_alone[("t", 0)], seen[("t", 0)]
    assert len(a) == len(b) == 12
    for k, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {k}: max diff {(x - y).abs().max().item()}"


def test_greedy_screen_matches_logits_argmax(model):
    """The greedy pick through the head's int8 screen == argmax of the full logits, row for row."""
    eng = Engine(model)
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * 3
    assert eng.runner.greedy(x) == eng.runner.logits(x).argmax(-1).tolist()


def test_chunked_prefill(model):
    """A prompt longer than max_num_batched_tokens is prefilled in chunks; same tokens as generate."""
    prompts = [_prompts(1, 150, 150, seed=4)[0], _prompts(1, 37, 37, seed=5)[0]]
    eng = Engine(model, max_num_seqs=4, max_num_batched_tokens=24)
    ids = [eng.add_request(p, SamplingParams(max_tokens=10)) for p in prompts]
    toks, _ = _run_all(eng)
    assert eng.stats()["steps_total"] >= 150 // 24 + 9
    for rid, p in zip(ids, prompts):
        assert toks[(rid, 0)] == _reference(model, p, 10)
    _no_blocks_in_use(eng)


def test_preemption_tiny_pool(model):
    """A pool too small for every request at once: sequences are preempted and recomputed, the tokens are
    those without preemption, and every block is free at the end."""
    prompts = _prompts(8, 20, 40, seed=6)
    per_block = 2 * 2 * 4 * 16 * 16 * 4                     # layers * k/v * heads * block * head_dim * fp32
    eng = Engine(model, max_num_seqs=8, max_num_batched_tokens=128, kv_cache_mb=8 * per_block / 2**20)
    assert eng.num_blocks == 8
    ids = [eng.add_request(p, SamplingParams(max_tokens=40)) for p in prompts]
    toks, reasons = _run_all(eng)
    assert eng.stats()["num_preempted_total"] > 0
    for rid, p in zip(ids, prompts):
        assert toks[(rid, 0)] == _reference(model, p, 40), rid
        assert reasons[(rid, 0)] == "length"
    _no_blocks_in_use(eng)


def test_prefix_cache_hit(model):
    """A second request with the first one's 64-token prefix takes its 4 full blocks from the cache."""
    prefix = _prompts(1, 64, 64, seed=7)[0]
    p1, p2 = prefix + [1, 2, 3], prefix + [4, 5]
    eng = Engine(model, max_num_seqs=4, max_num_batched_tokens=256)
    r1 = eng.add_request(p1, SamplingParams(max_tokens=6))
    t1, _ = _run_all(eng)
    assert eng.stats()["prefix_cache_hits"] == 0
    r2 = eng.add_request(p2, SamplingParams(max_tokens=6))
    t2, _ = _run_all(eng)
    assert eng.stats()["prefix_cache_hits"] >= 4
    assert t1[(r1, 0)] == _reference(model, p1, 6)
    assert t2[(r2, 0)] == _reference(model, p2, 6)
    # the same prompt again: all its full blocks but the one holding the last token are hits
    hits = eng.stats()["prefix_cache_hits"]
    r3 = eng.add_request(p1, SamplingParams(max_tokens=6))
    t3, _ = _run_all(eng)
    assert eng.stats()["prefix_cache_hits"] - hits == 4
    assert t3[(r3, 0)] == t1[(r1, 0)]
    _no_blocks_in_use(eng)


def test_prefix_caching_off(model):
    eng = Engine(model, max_num_seqs=4, enable_prefix_caching=False)
    p = _prompts(1, 40, 40, seed=8)[0]
    for _ in range(2):
        eng.add_request(p, SamplingParams(max_tokens=3))
        _run_all(eng)
    assert eng.stats()["prefix_cache_hits"] == 0 and eng.stats()["prefix_cache_queries"] == 0


def test_abort_frees_blocks(model):
    eng = Engine(model, max_num_seqs=4)
    a = eng.add_request(_prompts(1, 50, 50, seed=9)[0], SamplingParams(max_tokens=100))
    b = eng.add_request(_prompts(1, 30, 30, seed=10)[0], SamplingParams(max_tokens=5))
    for _ in range(3):
        eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    eng.abort(a)
    eng.abort("no-such-request")                           # unknown id: no-op
    outs = eng.step()
    ab = [o for o in outs if o.request_id == a]
    assert len(ab) == 1 and ab[0].finished and ab[0].finish_reason == "abort" and ab[0].new_token_ids == []
    toks, reasons = _run_all(eng)
    assert (a, 0) not in reasons and reasons[(b, 0)] == "length"
    eng.abort(a)                                           # finished id: no-op
    assert eng.step() == []
    _no_blocks_in_use(eng)


def test_abort_before_first_step(model):
    eng = Engine(model)
    a = eng.add_request([1, 2, 3], SamplingParams(max_tokens=4, n=3))
    eng.abort(a)
    outs = eng.step()
    assert sorted((o.index, o.finish_reason) for o in outs) == [(0, "abort"), (1, "abort"), (2, "abort")]
    assert not eng.has_unfinished()
    _no_blocks_in_use(eng)


@pytest.mark.parametrize("prompt_len", [40, 48])          # a partial last prompt block (copied) / none
def test_n2_seeded_reproducible(model, prompt_len):
    p = _prompts(1, prompt_len, prompt_len, seed=11)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=123, n=2)

    def run():
        eng = Engine(model, max_num_seqs=8)
        rid = eng.add_request(p, params)
        eng.add_request(_prompts(1, 20, 20, seed=12)[0], SamplingParams(max_tokens=8, temperature=0.8, seed=5))
        toks, reasons = _run_all(eng)
        _no_blocks_in_use(eng)
        return toks[(rid, 0)], toks[(rid, 1)], reasons[(rid, 0)], reasons[(rid, 1)]
    a, b = run(), run()
    assert a == b
    assert a[2] == a[3] == "length" and len(a[0]) == len(a[1]) == 12
    assert a[0] != a[1], "sequences with seeds 123 and 124 drew the same tokens"
    # sequence 0 draws as fastlm.generate does with a generator seeded `seed`
    ref = fastlm.generate(model, torch.tensor(p)[None], max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50,
                          generator=torch.Generator().manual_seed(123))[0, len(p):].tolist()
    assert a[0] == ref
    # sequence 1 == a request with seed 124
    eng = Engine(model)
    rid = eng.add_request(p, SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=124))
    assert _run_all(eng)[0][(rid, 0)] == a[1]


def test_n_shares_prompt_blocks(model):
    """n = 4 sequences fork from sequence 0 after its prefill: the prompt's full blocks are shared."""
    p = _prompts(1, 64, 64, seed=13)[0]                    # 4 full blocks
    eng = Engine(model, max_num_seqs=8)
    eng.add_request(p, SamplingParams(max_tokens=3, temperature=1.0, seed=1, n=4))
    eng.step()                                             # prefill + the first token of every sequence
    assert eng.stats()["num_running"] == 4
    assert eng.stats()["kv_blocks_used"] == 4              # shared, not 16
    _run_all(eng)
    _no_blocks_in_use(eng)


def test_n2_fork_without_a_free_block(model):
    """The prompt fills the pool: sequence 1 cannot get a block for its copy of the partial last block, so
    it waits and prefills on its own (its full prompt blocks from the prefix cache) once sequence 0 is done;
    it draws what a request seeded seed + 1 draws alone."""
    per_block = 2 * 2 * 4 * 16 * 16 * 4
    p = _prompts(1, 56, 56, seed=17)[0]                    # 3 full blocks + a partial one: the whole pool
    eng = Engine(model, kv_cache_mb=4 * per_block / 2**20)
    rid = eng.add_request(p, SamplingParams(max_tokens=8, temperature=1.0, seed=40, n=2))
    first = eng.step()
    assert [(o.index, len(o.new_token_ids)) for o in first] == [(0, 1)]
    assert eng.stats()["num_running"] == 1 and eng.stats()["num_waiting"] == 1
    toks, reasons = _run_all(eng)
    toks[(rid, 0)] = first[0].new_token_ids + toks[(rid, 0)]
    assert reasons[(rid, 0)] == reasons[(rid, 1)] == "length"
    assert eng.stats()["prefix_cache_hits"] >= 3
    _no_blocks_in_use(eng)
    for i in range(2):
        alone = Engine(model)
        r = alone.add_request(p, SamplingParams(max_tokens=8, temperature=1.0, seed=40 + i))
        assert _run_all(alone)[0][(r, 0)] == toks[(rid, i)]


def test_finish_reasons(model):
    p = _prompts(1, 10, 10, seed=14)[0]
    greedy = _reference(model, p, 12)
    decode = lambda ids: "".join(chr(65 + t % 26) for t in ids)   # noqa: E731
    eng = Engine(model, eos_token_id=greedy[4], decode=decode)
    k = greedy.index(greedy[4])                             # the eos token's first appearance
    r_eos = eng.add_request(p, SamplingParams(max_tokens=12))
    r_ign = eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True))
    r_stop_id = eng.add_request(p, SamplingParams(max_tokens=12, stop_token_ids=[greedy[2]], ignore_eos=True))
    stop = decode(greedy[6:8])
    r_stop_str = eng.add_request(p, SamplingParams(max_tokens=12, stop=[stop, "never!"], ignore_eos=True))
    r_len = eng.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True))
    toks, reasons = _run_all(eng)
    assert len(set(greedy)) > 6, greedy
    assert toks[(r_eos, 0)] == greedy[:k + 1] and reasons[(r_eos, 0)] == "stop"
    assert toks[(r_ign, 0)] == greedy and reasons[(r_ign, 0)] == "length"
    j = greedy.index(greedy[2])
    assert toks[(r_stop_id, 0)] == greedy[:j + 1] and reasons[(r_stop_id, 0)] == "stop"
    out = toks[(r_stop_str, 0)]
    assert reasons[(r_stop_str, 0)] == "stop" and stop in decode(out) and stop not in decode(out[:-1])
    assert out == greedy[:len(out)] and len(out) <= 8
    assert toks[(r_len, 0)] == greedy[:3] and reasons[(r_len, 0)] == "length"
    _no_blocks_in_use(eng)


def test_outputs_count_tokens(model):
    eng = Engine(model)
    rid = eng.add_request([5, 6, 7], SamplingParams(max_tokens=3))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [(o.num_prompt_tokens, o.num_output_tokens, o.finished) for o in outs] == [
        (3, 1, False), (3, 2, False), (3, 3, True)]
    assert all(o.request_id == rid and o.index == 0 and len(o.new_token_ids) == 1 for o in outs)


@pytest.mark.parametrize("prompt,kw,msg", [
    ([], {}, "empty"),
    ([1, 2.0], {}, "ints"),
    ([1, True], {}, "ints"),
    ([1, VOCAB], {}, "vocabulary"),
    ([-1], {}, "vocabulary"),
    ([1] * 250, {"params": SamplingParams(max_tokens=7)}, "max_model_len"),
    ([1, 2], {"params": SamplingParams(stop="x")}, "decode"),
    ("hello", {}, "list"),
])
def test_bad_requests(model, prompt, kw, msg):
    eng = Engine(model)
    with pytest.raises(ValueError, match=msg):
        eng.add_request(prompt, **kw)
    assert not eng.has_unfinished()


def test_bad_requests_pool_and_duplicate(model):
    per_block = 2 * 2 * 4 * 16 * 16 * 4
    eng = Engine(model, kv_cache_mb=4 * per_block / 2**20)
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request([1] * 60, SamplingParams(max_tokens=10))   # needs 5 blocks of 4
    eng.add_request([1] * 60, SamplingParams(max_tokens=5), request_id="x")   # 64 tokens: 4 blocks
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2], request_id="x")
    with pytest.raises(ValueError, match="kv_cache_mb"):
        Engine(model, kv_cache_mb=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Engine(model, max_num_seqs=2).add_request([1], SamplingParams(n=3))
    _run_all(eng)
    eng.add_request([1, 2], request_id="x")                 # finished ids can be reused


def test_stream_concurrent_and_cancelled(model):
    prompts = _prompts(5, 5, 60, seed=15)

    async def consume(eng, p, n):
        got = []
        async for out in eng.stream(p, SamplingParams(max_tokens=n)):
            got += out.new_token_ids
            last = out
        assert last.finished and last.finish_reason == "length"
        return got

    async def cancelled(eng, p):
        got = []
        agen = eng.stream(p, SamplingParams(max_tokens=200))
        async for out in agen:
            got += out.new_token_ids
            if len(got) == 3:
                break
        await agen.aclose()
        return got

    async def bad(eng):
        with pytest.raises(ValueError, match="empty"):
            async for _ in eng.stream([]):
                pass

    async def main():
        eng = Engine(model, max_num_seqs=8)
        task = asyncio.ensure_future(cancelled(eng, prompts[4]))
        res = await asyncio.gather(*(consume(eng, p, 10) for p in prompts[:4]), task, bad(eng))
        await eng.drain()
        with pytest.raises(RuntimeError, match="shutting down"):
            eng.add_request([1, 2])
        return eng, res

    eng, res = asyncio.run(main())
    for p, got in zip(prompts[:4], res[:4]):
        assert got == _reference(model, p, 10)
    assert len(res[4]) == 3
    _no_blocks_in_use(eng)


def test_stream_task_cancel_aborts(model):
    async def main():
        eng = Engine(model)
        started = asyncio.Event()

        async def consumer():
            async for _ in eng.stream([1, 2, 3], SamplingParams(max_tokens=200)):
                started.set()
        t = asyncio.ensure_future(consumer())
        await started.wait()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await eng.drain()
        return eng
    eng = asyncio.run(main())
    assert eng.stats()["generation_tokens_total"] < 200
    _no_blocks_in_use(eng)


def test_add_request_from_another_thread(model):
    eng = Engine(model, max_num_seqs=16)
    prompts = _prompts(12, 3, 30, seed=16)
    ids = []

    def producer():
        for p in prompts:
            ids.append(eng.add_request(p, SamplingParams(max_tokens=5)))

    th = threading.Thread(target=producer)
    th.start()
    toks = {}
    while th.is_alive() or eng.has_unfinished():
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
    th.join()
    assert len(ids) == 12 and len(set(ids)) == 12
    for rid, p in zip(ids, prompts):
        assert toks[rid] == _reference(model, p, 5)
    _no_blocks_in_use(eng)


def test_hf_model_and_lazy_exports(model):
    transformers = pytest.importorskip("transformers")
    assert fastlm.Engine is Engine and fastlm.SamplingParams is SamplingParams
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    eng = Engine(hf)
    assert eng.vocab_size == VOCAB and eng.max_model_len == 64 and eng.block_size == 16
    rid = eng.add_request([3, 4, 5], SamplingParams(max_tokens=4))
    toks, _ = _run_all(eng)
    assert toks[(rid, 0)] == _reference(hf, [3, 4, 5], 4)
