"""Runs a benchmark suite: measures the device peaks, then every case (with a progress bar), checks
each contender's parity, times it, and derives GB/s, TFLOP/s, tokens/s, % of peak and the speedup
over the case's baseline (torch's own path). The "fastlm:auto" rows (fastlm's default choice) are run
once more, untimed, in a fresh thread, to read which backend auto picked for each op they called
(`fastlm.backends.last_choice`, per thread); the row's "auto" field and the report show it.
Used by `fastlm bench` and scripts/gpu_check.sh."""
from __future__ import annotations

import datetime
import platform
import threading
import traceback

import torch

from fastlm.bench import registry
from fastlm.bench.peaks import measure_peaks
from fastlm.bench.timer import time_cpu_interleaved, time_fn


def environment(device: torch.device) -> dict:
    import fastlm

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "fastlm": fastlm.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "device": device.type, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    from fastlm import backends

    cpu_isa = getattr(backends, "cpu_isa", None)
    try:
        env["cpu_isa"] = cpu_isa() if cpu_isa is not None else torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        env["cpu_isa"] = None
    return env


def _op_names() -> list[str]:
    from fastlm import backends

    try:
        backends._import_ops()
    except Exception:  # noqa: BLE001
        pass
    return sorted(getattr(backends, "_OPS", {}))


def auto_picks(fn) -> dict[str, str] | None:
    """{op: backend} that fastlm's "auto" ran for each op `fn` called, or None where this build has no
    `backends.last_choice`. fn runs once in a new thread: last_choice is per thread, so exactly the
    ops fn called are set there (and a forced backend of the caller's context does not leak in)."""
    from fastlm import backends

    last_choice = getattr(backends, "last_choice", None)
    if last_choice is None:
        return None
    ops, picks, failed = _op_names(), {}, []

    def target():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the timed run reports the error
            failed.append(e)
            return
        for op in ops:
            choice = last_choice(op)
            if choice is not None:
                picks[op] = choice

    t = threading.Thread(target=target, name="fastlm-bench-auto")
    t.start()
    t.join()
    return None if failed else picks


def run_case(case: registry.Case, device: torch.device, dtype: torch.dtype, peaks: dict, quick: bool) -> dict:
    row = {"suite": case.suite, "family": case.family, "name": case.name, "params": case.params,
           "dtype": str(dtype).replace("torch.", ""), "results": {}, "errors": {}}
    try:
        bound = case.make(device, dtype)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        row["error"] = f"setup failed: {e!r}"
        return row
    if bound.check is not None:
        try:
            row["errors"] = {k: float(v) for k, v in bound.check().items()}
        except Exception as e:  # noqa: BLE001
            row["error"] = f"parity check failed: {e!r}"
    base_ms = None
    auto_labels = set(bound.auto_labels)
    # CPU: the contenders interleaved round by round (one process, one drift); CUDA: one after another
    timings = time_cpu_interleaved(bound.impls, quick) if device.type == "cpu" and bound.interleave else None
    for label, fn in bound.impls.items():
        try:
            if timings is not None:
                t = timings[label]
                if isinstance(t, Exception):
                    raise t
            else:
                t = time_fn(fn, device, quick)
        except Exception as e:  # noqa: BLE001
            row["results"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exception(e)
            continue
        r = {"ms": t.median_ms, "q20_ms": t.q20_ms, "q80_ms": t.q80_ms}
        sec = t.median_ms * 1e-3
        if bound.bytes:
            r["gbs"] = bound.bytes / sec / 1e9
            r["pct_peak"] = 100 * r["gbs"] / peaks["copy_gbs"]
        if bound.flops:
            r["tflops"] = bound.flops / sec / 1e12
            r["pct_peak"] = 100 * r["tflops"] / peaks["matmul_tflops"]
        if bound.tokens:
            r["tokens_per_s"] = bound.tokens / sec
        row["results"][label] = r
        if label == bound.baseline:
            base_ms = t.median_ms
        if label in auto_labels:
            picks = auto_picks(fn)
            if picks is not None:
                row.setdefault("auto", {})[label] = picks
    if base_ms is not None:
        for r in row["results"].values():
            if "ms" in r:
                r["speedup"] = base_ms / r["ms"]
    row["baseline"] = bound.baseline
    return row


def row_failed(row: dict) -> list[str]:
    """The errors of one case row: its setup/parity error and every contender that raised."""
    errs = [row["error"]] if "error" in row else []
    errs += [f"{label}: {r['error']}" for label, r in row.get("results", {}).items() if "error" in r]
    return errs


def failures(run: dict) -> list[str]:
    """'case: error' for every errored row of a run (empty: the run is clean)."""
    return [f"{row['name']}: {e}" for row in run["cases"] for e in row_failed(row)]


def run_suite(suite: str, device: str, dtype: torch.dtype, quick: bool = False, names: str | None = None,
              console=None, weights: str = "fp32", activations: str | None = None) -> dict:
    from fastlm.bench import common

    common.set_weights(weights, activations)
    dev = torch.device(device)
    selected = registry.cases(suite, dev.type, quick, dtype)
    if names:
        selected = [c for c in selected if names in c.name]
    peaks = measure_peaks(dev, dtype, quick)
    # a case module that failed to import: an error row in every run (its cases are missing)
    rows = [{"suite": suite, "family": "?", "name": f"import {mod}", "params": {}, "dtype": str(dtype)[6:],
             "results": {}, "errors": {}, "error": f"case module failed to import: {err}"}
            for mod, err in sorted(registry.load_errors.items())]
    try:
        from rich.progress import Progress

        progress = Progress(console=console, transient=True)
    except ImportError:
        progress = None
    if progress is not None:
        with progress:
            task = progress.add_task(f"{suite} on {device}", total=len(selected))
            for case in selected:
                progress.update(task, description=case.name)
                rows.append(run_case(case, dev, dtype, peaks, quick))
                progress.advance(task)
    else:
        for case in selected:
            print(f"... {case.name}", flush=True)
            rows.append(run_case(case, dev, dtype, peaks, quick))
    return {"environment": environment(dev), "suite": suite, "quick": quick, "dtype": str(dtype).replace("torch.", ""),
            "weights": weights if activations is None else f"{weights} (activations {activations})", "peaks": peaks,
            "cases": rows}
