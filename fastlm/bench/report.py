"""Reports of a benchmark run: a terminal table (rich), JSON, markdown and PNG plots (matplotlib).

Each "fastlm:auto" row is labelled with the backend auto picked ("fastlm:auto -> cpu"; "mixed" when its
ops went to different backends), and a second table gives, per case, auto's ratio to torch (the case's
baseline: torch's own op, or HF eager / HF generate for the model suites) and each op's pick."""
from __future__ import annotations

import json
import os

AUTO_TARGET = 0.97          # the target: fastlm:auto >= 0.97x torch in every case


def picked(case: dict, label: str) -> str | None:
    """'cpu', 'mixed' or None (unknown) for an auto row."""
    picks = case.get("auto", {}).get(label)
    if not picks:
        return None
    chosen = set(picks.values())
    return chosen.pop() if len(chosen) == 1 else "mixed"


def picks_text(case: dict, label: str) -> str:
    picks = case.get("auto", {}).get(label)
    if picks is None:
        return "unknown (this build has no backends.last_choice)"
    return ", ".join(f"{op}={be}" for op, be in sorted(picks.items())) or "no fastlm op ran"


DIRECT = "kernel direct (fastlm_C)"     # the dispatch-overhead cases' reference row


def auto_summary(run: dict):
    """(case, auto label, ms, vs-torch text, below target, picks) for every auto row that ran. The
    dispatch-overhead cases (family "dispatch") give auto's cost per call over the kernel called directly
    instead of a ratio: at their tiny shapes the ratio measures the overhead, not the target."""
    for case in run["cases"]:
        results = case.get("results", {})
        for label, r in results.items():
            if not (label.startswith("fastlm:auto") and "ms" in r):
                continue
            ratio = r.get("speedup")
            if case.get("family") == "dispatch" and "ms" in results.get(DIRECT, {}):
                text, below = f"+{(r['ms'] - results[DIRECT]['ms']) * 1e3:.1f} us/call over the kernel", False
            elif ratio is None:
                text, below = "", False
            else:
                text, below = f"{ratio:.2f}x", ratio < AUTO_TARGET
            yield case["name"], label, r["ms"], text, below, picks_text(case, label)


def _fmt(r: dict) -> dict:
    if "error" in r:
        return {"ms": "error", "rate": r["error"][:40], "pct": "", "speedup": ""}
    rate = ""
    if "tflops" in r:
        rate = f"{r['tflops']:.2f} TFLOP/s"
    elif "gbs" in r:
        rate = f"{r['gbs']:.1f} GB/s"
    if "tokens_per_s" in r:
        rate = (rate + " " if rate else "") + f"{r['tokens_per_s']:.1f} tok/s"
    return {"ms": f"{r['ms']:.4f}", "rate": rate, "pct": f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "",
            "speedup": f"{r['speedup']:.2f}x" if "speedup" in r else ""}


def rows_for_table(run: dict):
    for case in run["cases"]:
        if "error" in case and not case["results"]:
            yield case["name"], "-", {"ms": "error", "rate": case["error"][:60], "pct": "", "speedup": ""}, ""
            continue
        if "error" in case:                    # a parity check that failed: say so above the timings
            yield case["name"], "-", {"ms": "error", "rate": case["error"][:60], "pct": "", "speedup": ""}, ""
        for label, r in case["results"].items():
            err = case["errors"].get(label)
            p = picked(case, label)
            shown = f"{label} -> {p}" if p else label
            f = _fmt(r)
            note = case.get("params", {}).get("latency", {}).get(label, {}).get("summary")   # suite "serve"
            if note and "error" not in r:
                f["rate"] += f" ({note})"
            yield case["name"], shown, f, "" if err is None else f"{err:.1e}"


def print_table(run: dict, console=None) -> None:
    env, peaks = run["environment"], run["peaks"]
    header = (f"fastlm bench --suite {run['suite']} on {env.get('gpu', env['cpu'])} ({env['device']}, {run['dtype']}"
              f"{', weights ' + run['weights'] if run.get('weights', 'fp32') != 'fp32' else ''}"
              f"{', CPU ISA ' + str(env['cpu_isa']) if env.get('cpu_isa') else ''}), "
              f"torch {env['torch']}, triton {env['triton']}; peaks: copy {peaks['copy_gbs']:.1f} GB/s, "
              f"matmul {peaks['matmul_tflops']:.2f} TFLOP/s ({peaks['matmul_dtype']})")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for name, label, f, err in rows_for_table(run):
            print(f"{name:40s} {label:28s} {f['ms']:>10s} ms {f['rate']:>20s} {f['pct']:>5s} {f['speedup']:>7s} {err}")
        for name, label, ms, text, below, picks in auto_summary(run):
            print(f"auto vs torch: {name:40s} {label:24s} {ms:10.4f} ms {text}{' (below)' if below else ''}  "
                  f"picked: {picks}")
        return
    table = Table(title=header, title_justify="left")
    for col in ("case", "impl", "ms (median)", "rate", "% peak", "speedup", "max err"):
        table.add_column(col, justify="left" if col in ("case", "impl") else "right")
    last = None
    for name, label, f, err in rows_for_table(run):
        table.add_row(name if name != last else "", label, f["ms"], f["rate"], f["pct"], f["speedup"], err)
        last = name
    console = console or Console()
    console.print(table)
    summary = list(auto_summary(run))
    if summary:
        t2 = Table(title="fastlm:auto (the default choice) vs torch, and what auto picked", title_justify="left")
        for col in ("case", "auto row", "ms", "vs torch", "picked per op"):
            t2.add_column(col, justify="right" if col in ("ms", "vs torch") else "left")
        for name, label, ms, text, below, picks in summary:
            t2.add_row(name, label, f"{ms:.4f}", text + (f" (below {AUTO_TARGET})" if below else ""), picks)
        console.print(t2)


def to_markdown(run: dict) -> str:
    env, peaks = run["environment"], run["peaks"]
    lines = [f"# fastlm bench: suite `{run['suite']}`{' (quick)' if run['quick'] else ''}", "",
             f"- device: {env.get('gpu', env['cpu'])} ({env['device']}, CPU ISA {env.get('cpu_isa')}), dtype {run['dtype']}, "
             f"weights {run.get('weights', 'fp32')}, date {env['date']}",
             f"- versions: fastlm {env['fastlm']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"python {env['python']}, {env['threads']} CPU threads",
             f"- measured peaks: copy {peaks['copy_gbs']:.1f} GB/s, matmul {peaks['matmul_tflops']:.2f} TFLOP/s "
             f"({peaks['matmul_dtype']})", "",
             "| case | impl | ms (median) | rate | % of peak | speedup | max err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, label, f, err in rows_for_table(run):
        lines.append(f"| {name} | {label} | {f['ms']} | {f['rate']} | {f['pct']} | {f['speedup']} | {err} |")
    summary = list(auto_summary(run))
    if summary:
        lines += ["", "## fastlm:auto vs torch", "",
                  f"The default choice against the case's torch baseline (target >= {AUTO_TARGET}x), and the backend "
                  "auto picked for each op.", "",
                  "| case | auto row | ms | vs torch | picked per op |", "|---|---|---:|---:|---|"]
        for name, label, ms, text, below, picks in summary:
            lines.append(f"| {name} | {label} | {ms:.4f} | {text}{' **(below)**' if below else ''} | {picks} |")
    return "\n".join(lines) + "\n"


def plot(run: dict, path: str) -> str | None:
    """One horizontal bar per (case, impl): speedup over the case's baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, values = [], []
    for case in run["cases"]:
        for label, r in case["results"].items():
            if "speedup" in r:
                labels.append(f"{case['name']} | {label}")
                values.append(r["speedup"])
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.28 * len(values))))
    ax.barh(range(len(values)), values, color=["tab:blue" if "fastlm" in lbl else "tab:gray" for lbl in labels])
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over baseline (higher is better)")
    env = run["environment"]
    ax.set_title(f"fastlm {run['suite']} on {env.get('gpu', env['cpu'])} ({run['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(run: dict, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, f"{stem}.json")
    with open(p, "w") as f:
        json.dump(run, f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, f"{stem}.md")
    with open(p, "w") as f:
        f.write(to_markdown(run))
    paths.append(p)
    png = plot(run, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths.append(png)
    return paths
