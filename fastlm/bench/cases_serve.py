"""Suite "serve": a seeded request trace served three ways, in real time.

The trace: n requests, prompt lengths uniform in [32, 512], output lengths uniform in [16, 128] (every
request makes exactly its output length: no eos), random token ids; arrivals all at once or Poisson
at `rate` requests/s. Contenders, each fed the requests as they arrive:
- "fastlm:auto" -- fastlm.Engine (continuous batching, paged KV cache, chunked prefill; default
  max_num_seqs=64, max_num_batched_tokens=2048), `--weights` int8/bf16 quantizes its model;
- "static generate b8" -- fastlm.generate on batches of 8 in arrival order (left-padded; a batch starts
  when its requests have arrived and the previous batch is done, and runs to its longest output);
- "hf generate per request" -- transformers' generate on one request at a time (the baseline).
Timed: the whole trace (first arrival to last token); tokens = output tokens, so the report's tok/s is
output-token throughput. Per contender, the run with the median wall time (of the runs the runner
makes) records into the case's params["latency"] (the JSON's params; its "summary" string is appended
to the table's rate column): request throughput, TTFT / TPOT / ITL p50, p90, p99 in ms, and how many
requests' tokens differ from the engine's (greedy; 0 expected against static generate, near 0 against
HF, whose GEMMs round differently).
"""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, List

import torch

import fastlm
from fastlm.bench.common import AUTO, apply_weights
from fastlm.bench.registry import Bound, Case, register

SMALL = dict(n_layer=12, n_embd=768, n_head=12)           # GPT-2 small
TINY = dict(n_layer=4, n_embd=256, n_head=4)              # --quick
_models: dict = {}


def make_trace(n: int, rate: float | None, seed: int = 0, prompt=(32, 512), output=(16, 128), vocab: int = 50257):
    """[(arrival s, prompt ids, output length)], sorted by arrival; rate None: all at t=0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
        P, N = rng.randint(*prompt), rng.randint(*output)
        out.append((0.0 if rate is None else t, [rng.randrange(vocab) for _ in range(P)], N))
    return out


def _q(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(arrivals: List[float], token_times: List[List[float]], wall: float) -> dict:
    """TTFT (first token - arrival), TPOT (per request: (last - first) / (n - 1)), ITL (every gap between
    consecutive tokens of a request): p50/p90/p99 in ms; requests/s and output tokens/s over `wall` s."""
    ttft = [ts[0] - a for a, ts in zip(arrivals, token_times) if ts]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in token_times if len(ts) > 1]
    itl = [b - a for ts in token_times for a, b in zip(ts, ts[1:])]
    out = {"req_per_s": len(arrivals) / wall, "out_tok_per_s": sum(map(len, token_times)) / wall}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = 1e3 * _q(xs, q / 100)
    return out


def summary(s: dict) -> str:
    """One line for the report's rate column."""
    return (f"{s['req_per_s']:.2f} req/s; TTFT p50/p90/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p90_ms']:.0f}/"
            f"{s['ttft_p99_ms']:.0f} ms; TPOT {s['tpot_p50_ms']:.0f}/{s['tpot_p90_ms']:.0f}/{s['tpot_p99_ms']:.0f}; "
            f"ITL {s['itl_p50_ms']:.0f}/{s['itl_p90_ms']:.0f}/{s['itl_p99_ms']:.0f}"
            + (f"; {s['mismatch']} req differ" if s.get("mismatch") else ""))


def _sleep_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        time.sleep(d)


# ---- the three ways to serve a trace: each returns (tokens per request, token times, wall seconds) ----

def run_engine(engine, trace):
    """Feed `trace` to a fastlm.Engine in real time; step until done."""
    from fastlm.serving import SamplingParams

    engine.pool.reset_prefix_cache()                   # every run starts cold
    t0 = time.perf_counter()
    toks: Dict[str, List[int]] = {}
    times: Dict[str, List[float]] = {}
    ids, i = [], 0
    while i < len(trace) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(trace) and trace[i][0] <= now:
            rid = engine.add_request(trace[i][1], SamplingParams(max_tokens=trace[i][2], ignore_eos=True))
            ids.append(rid)
            toks[rid], times[rid] = [], []
            i += 1
        if not engine.has_unfinished():
            _sleep_until(t0 + trace[i][0])
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            toks[o.request_id] += o.new_token_ids
            times[o.request_id] += [now] * len(o.new_token_ids)
    return [toks[r] for r in ids], [times[r] for r in ids], time.perf_counter() - t0


class _Stamps:
    """A generate streamer: the time of every step after the prompt."""

    def __init__(self, t0: float):
        self.t0, self.times, self.first = t0, [], True

    def put(self, _):
        if self.first:
            self.first = False
            return
        self.times.append(time.perf_counter() - self.t0)

    def end(self):
        pass


def run_static(native, trace, batch: int = 8):
    """fastlm.generate on batches of `batch` requests in arrival order, left-padded."""
    t0 = time.perf_counter()
    toks, times = [], []
    for b in range(0, len(trace), batch):
        reqs = trace[b:b + batch]
        _sleep_until(t0 + reqs[-1][0])
        S = max(len(p) for _, p, _ in reqs)
        ids = torch.tensor([[0] * (S - len(p)) + p for _, p, _ in reqs])
        mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for _, p, _ in reqs])
        stamps = _Stamps(t0)
        out = fastlm.generate(native, ids, attention_mask=mask, max_new_tokens=max(n for *_, n in reqs),
                              streamer=stamps)
        for r, (_, _, n) in enumerate(reqs):
            toks.append(out[r, S:S + n].tolist())
            times.append(stamps.times[:n])
    return toks, times, time.perf_counter() - t0


def run_hf(hf, trace):
    """transformers' generate, one request at a time in arrival order."""
    t0 = time.perf_counter()
    toks, times = [], []
    for arrival, p, n in trace:
        _sleep_until(t0 + arrival)
        stamps = _Stamps(t0)
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, streamer=stamps)
        toks.append(out[0, len(p):].tolist())
        times.append(stamps.times)
    return toks, times, time.perf_counter() - t0


def models(shape: dict, device, dtype):
    """(HF GPT2LMHeadModel with random weights, seed 0; the native GPT-2 of the same weights with the run's
    --weights), cached per (shape, device, dtype)."""
    key = (tuple(sorted(shape.items())), str(device), dtype)
    if key not in _models:
        from transformers import GPT2Config, GPT2LMHeadModel

        _models.clear()
        cfg = GPT2Config(n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256, **shape)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 50256
        _models[key] = (hf, fastlm.models.GPT2.from_hf(hf))
    hf, native = _models[key]
    return hf, apply_weights(native)


def _make(shape: dict, n: int, rate: float | None, params: dict, trace_kw: dict):
    def make(device, dtype) -> Bound:
        hf, native = models(shape, device, dtype)
        trace = make_trace(n, rate, **trace_kw)
        engine = fastlm.Engine(native, max_model_len=1024)
        lat = params.setdefault("latency", {})
        ref: dict = {}
        runs: dict = {}

        def contender(label: str, run: Callable):
            def fn():
                toks, times, wall = run()
                s = latency_stats([a for a, _, _ in trace], times, wall)
                s["wall_s"] = wall
                if label == AUTO:
                    ref["tokens"] = toks
                elif "tokens" in ref:
                    s["mismatch"] = sum(a != b for a, b in zip(toks, ref["tokens"]))
                s["summary"] = summary(s)
                # the runner times several runs and reports the median: so do the latencies
                done = sorted(runs.setdefault(label, []) + [s], key=lambda r: r["wall_s"])
                runs[label] = done
                lat[label] = done[(len(done) - 1) // 2]
            return fn

        impls = {AUTO: contender(AUTO, lambda: run_engine(engine, trace)),
                 "static generate b8": contender("static generate b8", lambda: run_static(native, trace)),
                 "hf generate per request": contender("hf generate per request", lambda: run_hf(hf, trace))}
        # each call replays the trace in real time (minutes for HF): one contender after another
        return Bound(impls, tokens=sum(N for *_, N in trace), baseline="hf generate per request", interleave=False)
    return make


def _register(tag: str, shape: dict, n: int, rate: float | None, quick: bool, **trace_kw) -> None:
    arrivals = "all at once" if rate is None else f"poisson {rate:g} req/s"
    params = {"model": tag, "requests": n, "rate": rate, **trace_kw}
    register(Case("serve", "serve", f"serve {tag} {n} req {arrivals}", _make(shape, n, rate, params, trace_kw),
                  params=params, quick=quick, devices=("cpu", "cuda")))


_register("gpt2", SMALL, 64, None, False)
_register("gpt2", SMALL, 32, 0.5, False)
_register("gpt2", SMALL, 32, 2.0, False)
_register("gpt2-tiny", TINY, 8, None, True, prompt=(32, 128), output=(8, 32))
_register("gpt2-tiny", TINY, 8, 8.0, True, prompt=(32, 128), output=(8, 32))
