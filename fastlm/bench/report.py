"""Reports of a benchmark run: a terminal table (rich), JSON, markdown and PNG plots (matplotlib)."""
from __future__ import annotations

import json
import os


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
        for label, r in case["results"].items():
            err = case["errors"].get(label)
            yield case["name"], label, _fmt(r), "" if err is None else f"{err:.1e}"


def print_table(run: dict, console=None) -> None:
    env, peaks = run["environment"], run["peaks"]
    header = (f"fastlm bench --suite {run['suite']} on {env.get('gpu', env['cpu'])} ({env['device']}, {run['dtype']}), "
              f"torch {env['torch']}, triton {env['triton']}; peaks: copy {peaks['copy_gbs']:.1f} GB/s, "
              f"matmul {peaks['matmul_tflops']:.2f} TFLOP/s ({peaks['matmul_dtype']})")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for name, label, f, err in rows_for_table(run):
            print(f"{name:40s} {label:28s} {f['ms']:>10s} ms {f['rate']:>20s} {f['pct']:>5s} {f['speedup']:>7s} {err}")
        return
    table = Table(title=header, title_justify="left")
    for col in ("case", "impl", "ms (median)", "rate", "% peak", "speedup", "max err"):
        table.add_column(col, justify="left" if col in ("case", "impl") else "right")
    last = None
    for name, label, f, err in rows_for_table(run):
        table.add_row(name if name != last else "", label, f["ms"], f["rate"], f["pct"], f["speedup"], err)
        last = name
    (console or Console()).print(table)


def to_markdown(run: dict) -> str:
    env, peaks = run["environment"], run["peaks"]
    lines = [f"# fastlm bench: suite `{run['suite']}`{' (quick)' if run['quick'] else ''}", "",
             f"- device: {env.get('gpu', env['cpu'])} ({env['device']}), dtype {run['dtype']}, date {env['date']}",
             f"- versions: fastlm {env['fastlm']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"python {env['python']}, {env['threads']} CPU threads",
             f"- measured peaks: copy {peaks['copy_gbs']:.1f} GB/s, matmul {peaks['matmul_tflops']:.2f} TFLOP/s "
             f"({peaks['matmul_dtype']})", "",
             "| case | impl | ms (median) | rate | % of peak | speedup | max err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, label, f, err in rows_for_table(run):
        lines.append(f"| {name} | {label} | {f['ms']} | {f['rate']} | {f['pct']} | {f['speedup']} | {err} |")
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
