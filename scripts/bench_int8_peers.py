"""Issue 12's speed targets, measured in one process with the contenders interleaved (each round runs
every contender of every case once; the table gives the median over the rounds).

- GPT-2 small (random weights, seed 0), greedy, batch 1 prompt 32 / 64 new and batch 8 prompt 64 / 32
  new: fastlm int8 / int8 a8 (W8A8: activations="int8") / bf16 / fp32 (fastlm.generate on the native GPT2) against CTranslate2 int8 / fp32
  (the same weights). tokens/s over the whole call (prefill included), and the decode step alone:
  (time(N new) - time(1 new)) / (N - 1).
- The batch-1 int8 weight-read floor: the bytes a decode step must read (every int8 projection and
  the int8 head, their scales and biases) / the plain read bandwidth measured here in the same rounds
  (a 512 MB fp32 tensor's sum): fastlm's share of that floor.
- MiniLM-L6 (real weights) inference at (1, 128) and (8, 128): fastlm's native Bert int8 / int8 a8 / fp32
  against CTranslate2 int8 / fp32 and ONNX Runtime fp32.
- bf16 weights against fp32 at batch-1 decode.

    .venv/bin/python scripts/bench_int8_peers.py [--rounds 5] [--threads N] [--json out.json]

Needs ctranslate2 and onnxruntime (pip install fastlm[peers]); their rows are skipped when absent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import fastlm
from fastlm.bench import peers, quant_quality

TARGETS = {"int8 vs ctranslate2 int8": 1.3, "floor share": 0.85, "minilm vs ctranslate2 int8": 1.3,
           "bf16 vs fp32 decode": 1.8}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_bandwidth(buf: torch.Tensor) -> float:
    """GB/s of a plain read: the sum of a buffer far larger than the caches."""
    return buf.numel() * buf.element_size() / _timed(lambda: buf.sum()) / 1e9


def step_bytes(model) -> int:
    """Bytes a quantized GPT2 decode step reads at least: every projection's weight (int8 or bf16), its
    scales and bias, and the LayerNorm parameters."""
    n = 0
    for m in model.modules():
        for name in ("qweight", "scale", "bias", "weight"):
            t = getattr(m, "_buffers", {}).get(name)
            if t is None:
                t = getattr(m, "_parameters", {}).get(name)
            if t is not None and not isinstance(m, torch.nn.Embedding):
                n += t.numel() * t.element_size()
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch and peer intra-op threads")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    have = peers.available()
    print(f"fastlm bench_int8_peers: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU ISA {fastlm.backends.cpu_isa()}, peers {have}", flush=True)

    hf = quant_quality.gpt2_random()
    gpt = {"fastlm fp32": fastlm.models.GPT2.from_hf(hf),
           "fastlm int8": fastlm.models.GPT2.from_hf(hf, weights="int8"),
           "fastlm bf16": fastlm.models.GPT2.from_hf(hf, weights="bf16"),
           # W8A8: int8 activations for calls of 2+ rows (prefill, batched decode)
           "fastlm int8 a8": fastlm.quantize(fastlm.models.GPT2.from_hf(hf), weights="int8", activations="int8")}
    cases = {}           # name -> {label: fn}
    meta = {}
    for B, P, N in ((1, 32, 64), (8, 64, 32)):
        ids = quant_quality.prompts(B, P)
        name = f"gpt2 b{B} p{P} n{N}"
        fns = {}
        # every callable binds its own inputs (a closure over the loop's `ids` would see the last case's)
        for label, m in gpt.items():
            fns[label] = (lambda m_, x_, n_: lambda: fastlm.generate(m_, x_, max_new_tokens=n_))(m, ids, N)
            fns[label + " [1 new]"] = (lambda m_, x_: lambda: fastlm.generate(m_, x_, max_new_tokens=1))(m, ids)
        if "ctranslate2" in have:
            for w in ("int8", "fp32"):
                g = peers.Ct2Generator(hf, w)
                fns[f"ctranslate2 {w}"] = (lambda g_, x_, n_: lambda: g_.generate(x_, n_))(g, ids, N)
                fns[f"ctranslate2 {w} [1 new]"] = (lambda g_, x_: lambda: g_.generate(x_, 1))(g, ids)
        cases[name] = fns
        meta[name] = dict(B=B, P=P, N=N)
    if not args.skip_minilm:
        mini, tok = quant_quality.minilm_hf()
        nat = {"fastlm fp32": fastlm.models.Bert.from_hf(mini), "fastlm int8": fastlm.models.Bert.from_hf(mini, weights="int8"),
               "fastlm int8 a8": fastlm.quantize(fastlm.models.Bert.from_hf(mini), weights="int8", activations="int8")}
        for B, S in ((1, 128), (8, 128)):
            ids = torch.randint(1000, mini.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(B))
            mask = torch.ones_like(ids)
            fns = {label: (lambda m_, x_, k_: lambda: m_(x_, attention_mask=k_))(m, ids, mask)
                   for label, m in nat.items()}
            fns.update(peers.bert_contenders(mini, ids, mask))
            cases[f"minilm {B}x{S}"] = fns
            meta[f"minilm {B}x{S}"] = dict(B=B, S=S)
    buf = torch.ones(128 << 20)                       # 512 MB fp32
    times = {c: {k: [] for k in fns} for c, fns in cases.items()}
    bw = []
    for c, fns in cases.items():                       # warm-up: builds, auto choices, first-call costs
        for fn in fns.values():
            fn()
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for c, fns in cases.items():
            for k, fn in fns.items():
                times[c][k].append(_timed(fn))
            bw.append(read_bandwidth(buf))
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.1f} s", flush=True)
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in times.items()}
    agree = {}                                         # token agreement / max error against fastlm fp32
    for c, fns in cases.items():
        outs = {k: fn() for k, fn in fns.items() if not k.endswith("[1 new]")}
        ref = outs["fastlm fp32"]
        ref = getattr(ref, "last_hidden_state", ref)
        for k, o in outs.items():
            o = getattr(o, "last_hidden_state", o)
            if c.startswith("gpt2"):
                n = meta[c]["N"]
                agree[(c, k)] = f"tokens agree {(o[:, -n:] == ref[:, -n:]).float().mean().item() * 100:5.1f}%"
            else:
                agree[(c, k)] = f"max err {(o.float() - ref.float()).abs().max().item():.4f}"
    bw_med = statistics.median(bw)

    res = {"threads": torch.get_num_threads(), "rounds": args.rounds, "read_GBps": bw_med, "cases": {}}
    lines = []
    for c, d in med.items():
        row = {}
        if c.startswith("gpt2"):
            B, N = meta[c]["B"], meta[c]["N"]
            for k in d:
                if k.endswith("[1 new]"):
                    continue
                step = (d[k] - d[k + " [1 new]"]) / (N - 1)
                row[k] = {"tok_s": B * N / d[k], "total_ms": d[k] * 1e3, "prefill_ms": d[k + " [1 new]"] * 1e3,
                          "step_ms": step * 1e3, "vs_fastlm_fp32": agree[(c, k)]}
            lines.append(f"\n{c} (tokens/s whole call; decode step ms)")
            for k, v in row.items():
                lines.append(f"  {k:20s} {v['tok_s']:8.1f} tok/s  step {v['step_ms']:7.2f} ms  "
                             f"[1 new] {v['prefill_ms']:7.1f} ms  {agree[(c, k)]}")
            if "ctranslate2 int8" in row:
                for k in ("fastlm int8", "fastlm int8 a8"):
                    x = row[k]["tok_s"] / row["ctranslate2 int8"]["tok_s"]
                    row[f"{k[7:]} vs ctranslate2 int8"] = x
                    lines.append(f"  {k} / ctranslate2 int8: {x:.2f}x (target >= 1.3x)")
            if B == 1:
                nbytes = step_bytes(gpt["fastlm int8"])
                floor_ms = nbytes / (bw_med * 1e9) * 1e3
                share = floor_ms / row["fastlm int8"]["step_ms"]
                row["floor"] = {"bytes": nbytes, "floor_ms": floor_ms, "share": share}
                lines.append(f"  int8 weight-read floor: {nbytes / 1e6:.1f} MB / {bw_med:.1f} GB/s = {floor_ms:.2f} ms"
                             f" a step; fastlm int8 step at {share * 100:.0f}% of it (target >= 85%)")
                x = row["fastlm fp32"]["step_ms"] / row["fastlm bf16"]["step_ms"]
                row["bf16 vs fp32 decode"] = x
                lines.append(f"  bf16 / fp32 decode step speed: {x:.2f}x (target >= 1.8x)")
        else:
            lines.append(f"\n{c} (ms a forward)")
            for k, v in d.items():
                row[k] = {"ms": v * 1e3, "vs_fastlm_fp32": agree[(c, k)]}
                lines.append(f"  {k:20s} {v * 1e3:8.2f} ms  {agree[(c, k)]}")
            for k in ("fastlm int8", "fastlm int8 a8"):
                if "ctranslate2 int8" in d:
                    x = d["ctranslate2 int8"] / d[k]
                    row[f"{k[7:]} vs ctranslate2 int8"] = x
                    lines.append(f"  {k} / ctranslate2 int8: {x:.2f}x (target >= 1.3x)")
                if "onnxruntime fp32" in d:
                    x = d["onnxruntime fp32"] / d[k]
                    row[f"{k[7:]} vs onnxruntime fp32"] = x
                    lines.append(f"  {k} / onnxruntime fp32: {x:.2f}x (target > 1)")
        res["cases"][c] = row
    print(f"\nplain read bandwidth (median of {len(bw)}): {bw_med:.1f} GB/s; medians of {args.rounds} interleaved rounds")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
