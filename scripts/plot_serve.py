"""Throughput vs latency of the serving engine against static batching, over request rates (issue 13's
plot): GPT-2 small fp32 (random weights) on the CPU, one seeded trace per rate (prompts 32-512,
outputs 16-128, Poisson arrivals, and all at once), each served by fastlm.Engine and by fastlm.generate
on batches of 8 in arrival order (cases_serve's contenders).

  python scripts/plot_serve.py [--requests 24] [--rates 0.5,1,2,4,inf] [--threads 1] [--out PREFIX]

Writes PREFIX.csv (one row per contender and rate: output tok/s, req/s, TTFT / TPOT p50 and p90 ms)
and, with matplotlib installed, PREFIX.svg: output tokens/s against TTFT p50 and TPOT p50, a point per
rate, a line per contender.
"""
from __future__ import annotations

import argparse
import csv
import math

import torch

import fastlm
from fastlm.bench import cases_serve as cs

FIELDS = ("contender", "rate", "out_tok_per_s", "req_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms",
          "tpot_p90_ms", "wall_s")


def sweep(n: int, rates: list, model: dict) -> list:
    _, native = cs.models(model, torch.device("cpu"), torch.float32)
    engine = fastlm.Engine(native, max_model_len=1024)
    cs.run_engine(engine, cs.make_trace(4, None, seed=9, prompt=(32, 64), output=(4, 8)))      # warm-up
    rows = []
    for rate in rates:
        trace = cs.make_trace(n, None if math.isinf(rate) else rate)
        arrivals = [a for a, _, _ in trace]
        for name, run in (("fastlm.Engine", lambda: cs.run_engine(engine, trace)),
                          ("static generate b8", lambda: cs.run_static(native, trace))):
            _, times, wall = run()
            s = cs.latency_stats(arrivals, times, wall)
            row = {"contender": name, "rate": rate, "wall_s": wall}
            row.update({k: s[k] for k in FIELDS if k in s})
            rows.append(row)
            print(f"rate {rate:>4} {name:20s} {s['out_tok_per_s']:7.1f} out tok/s  {cs.summary(s)}", flush=True)
    return rows


def plot(rows: list, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ttft_p50_ms", "TTFT p50 (ms)"), (axes[1], "tpot_p50_ms", "TPOT p50 (ms)")):
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = [r for r in rows if r["contender"] == name]
            ax.plot([r["out_tok_per_s"] for r in pts], [r[key] for r in pts], marker="o", label=name)
            for r in pts:
                ax.annotate("all" if math.isinf(r["rate"]) else f"{r['rate']:g}/s", (r["out_tok_per_s"], r[key]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"GPT-2 small fp32, CPU, {torch.get_num_threads()} thread(s): throughput vs latency by request rate")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rates", default="0.5,1,2,4,inf", help="requests/s, comma-separated; inf: all at once")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model (a quick check of the script)")
    ap.add_argument("--out", default="serve-throughput-latency")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = sweep(a.requests, [float(r) for r in a.rates.split(",")], cs.TINY if a.tiny else cs.SMALL)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out}.csv" + (f" and {a.out}.svg" if plot(rows, a.out + ".svg") else ""))


if __name__ == "__main__":
    main()
