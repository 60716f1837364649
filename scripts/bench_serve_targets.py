"""Measure issue 13's serving targets once, on CPU with GPT-2 small fp32 (random weights):

  python scripts/bench_serve_targets.py [--only throughput|overhead|prefix] [--requests 64] [--threads N] [--skip-hf]
                                       [--weights fp32|int8|bf16] [--activations int8]

- throughput: the all-at-once trace of 64 requests (prompts 32-512, outputs 16-128, seed 0): output
  tokens/s of fastlm.Engine vs static batching with fastlm.generate (batches of 8 in arrival order) vs
  HF generate per request (targets: >= 2x and >= 5x);
- overhead: 16 running requests decoding: the engine's share of step time outside the model's forward
  (target <= 10%), and its step time vs GPT2.decode_step on the same batch (target within 10%),
  interleaved, min and median of several steps;
- prefix: a 256-token prefix, two requests in turn: TTFT of the second vs the first (target >= 3x).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastlm
from fastlm.bench import cases_serve as cs
from fastlm.serving import Engine, SamplingParams


def throughput(hf, native, n, skip_hf=False):
    trace = cs.make_trace(n, None)
    eng = Engine(native, max_model_len=1024)
    cs.run_engine(eng, cs.make_trace(4, None, seed=9, prompt=(32, 64), output=(4, 8)))      # warm-up
    res = {}
    runs = [("engine", lambda: cs.run_engine(eng, trace)), ("static generate b8", lambda: cs.run_static(native, trace))]
    if not skip_hf:
        runs.append(("hf generate per request", lambda: cs.run_hf(hf, trace)))
    for name, fn in runs:
        toks, times, wall = fn()
        s = cs.latency_stats([0.0] * n, times, wall)
        res[name] = (toks, s)
        print(f"{name:26s} wall {wall:7.1f} s  {s['out_tok_per_s']:7.1f} out tok/s  {cs.summary(s)}", flush=True)
    e = res["engine"][1]["out_tok_per_s"]
    print(f"engine / static: {e / res['static generate b8'][1]['out_tok_per_s']:.2f}x (target >= 2)")
    if skip_hf:
        res["hf generate per request"] = ([], {"out_tok_per_s": float("nan")})
    print(f"engine / hf:     {e / res['hf generate per request'][1]['out_tok_per_s']:.2f}x (target >= 5)")
    for name in ("static generate b8", "hf generate per request")[:1 if skip_hf else 2]:
        diff = sum(a != b for a, b in zip(res[name][0], res["engine"][0]))
        print(f"requests whose tokens differ from the engine's: {name}: {diff}/{n}")


def overhead(native, B=16, steps=12):
    g = torch.Generator().manual_seed(0)
    eng = Engine(native, max_num_seqs=B, max_model_len=1024)
    for _ in range(B):
        eng.add_request(torch.randint(0, 50257, (128,), generator=g).tolist(), SamplingParams(max_tokens=500))
    eng.step()                                                   # prefill
    cache = native.new_cache(B, 128 + 2 * steps + 8)
    native.prefill(torch.randint(0, 50257, (B, 128), generator=g), cache)
    tok = torch.zeros(B, dtype=torch.long)
    for _ in range(2):
        eng.step()
        native.decode_step(tok, cache, greedy=True)
    E, F, D = [], [], []
    for _ in range(steps):
        s0 = eng.stats()
        t = time.perf_counter()
        eng.step()
        E.append(time.perf_counter() - t)
        F.append(eng.stats()["time_forward_s"] - s0["time_forward_s"])
        t = time.perf_counter()
        native.decode_step(tok, cache, greedy=True)          # greedy, as the engine's requests
        D.append(time.perf_counter() - t)
    over = [(e - f) / e for e, f in zip(E, F)]
    med = statistics.median
    print(f"16 running requests, context ~{128 + steps}: engine step min {min(E) * 1e3:.1f} / median {med(E) * 1e3:.1f} ms "
          f"(forward {med(F) * 1e3:.1f} ms); GPT2.decode_step (greedy) min {min(D) * 1e3:.1f} / median {med(D) * 1e3:.1f} ms")
    print(f"engine overhead (step - forward) / step: median {100 * med(over):.1f}% (target <= 10%)")
    print(f"engine step / decode_step: min {min(E) / min(D):.3f}, median {med(E) / med(D):.3f} (target <= 1.10)")


def prefix(native, reps=3):
    g = torch.Generator().manual_seed(1)
    eng = Engine(native, max_model_len=1024)
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=2))     # warm-up
    while eng.has_unfinished():
        eng.step()

    def ttft(prompt):
        t = time.perf_counter()
        eng.add_request(prompt, SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        return time.perf_counter() - t
    ratios = []
    for _ in range(reps):
        pre = torch.randint(0, 50257, (256,), generator=g).tolist()
        first = ttft(pre + torch.randint(0, 50257, (8,), generator=g).tolist())
        second = ttft(pre + torch.randint(0, 50257, (8,), generator=g).tolist())
        ratios.append(first / second)
        print(f"256-token prefix: TTFT first {first * 1e3:.1f} ms, second {second * 1e3:.1f} ms, {first / second:.1f}x")
    print(f"prefix TTFT ratio median {statistics.median(ratios):.1f}x (target >= 3); "
          f"hits {eng.stats()['prefix_cache_hits']} blocks of {eng.stats()['prefix_cache_queries']} looked up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["throughput", "overhead", "prefix"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true", help="throughput: no HF generate per request (the slow one)")
    ap.add_argument("--weights", choices=["fp32", "int8", "bf16"], default="fp32",
                    help="fastlm.quantize the native model (engine and static generate) first")
    ap.add_argument("--activations", choices=["int8"], default=None, help="with --weights int8: W8A8")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastlm {fastlm.__version__}", flush=True)
    hf, native = cs.models(cs.SMALL, torch.device("cpu"), torch.float32)
    if a.weights != "fp32":
        native = fastlm.quantize(copy.deepcopy(native), weights=a.weights, activations=a.activations)
        print(f"native model: weights {a.weights}, activations {a.activations or 'fp32'}", flush=True)
    if a.only in (None, "overhead"):
        overhead(native)
    if a.only in (None, "prefix"):
        prefix(native)
    if a.only in (None, "throughput"):
        throughput(hf, native, a.requests, a.skip_hf)


if __name__ == "__main__":
    main()
