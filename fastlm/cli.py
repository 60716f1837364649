"""The `fastlm` command: `fastlm info`, `fastlm bench`, `fastlm generate`."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _malloc_state() -> str:
    """Which allocator serves CPU tensors. With glibc's defaults, a tensor over 32 MB is a fresh mmap
    page-faulted on every allocation, and freeing the heap top trims it back to the OS: large CPU
    activations then cost more in page faults than in the kernels (README, "CPU speed")."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = ""
    if "tcmalloc" in preload or "libtcmalloc" in maps:
        return "tcmalloc (preloaded): good"
    if "jemalloc" in preload or "libjemalloc" in maps:
        conf = os.environ.get("MALLOC_CONF", "")
        if "dirty_decay_ms:-1" in conf:
            return "jemalloc (preloaded, decay off): good"
        return ("jemalloc (preloaded) with page decay on: it returns freed pages to the OS and large "
                "tensors page-fault again; set MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") and os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return "glibc malloc with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised: good"
    return ("glibc malloc, default settings: tensors over 32 MB are page-faulted on every allocation; "
            "preload tcmalloc, or see README (CPU speed)")


def cmd_info(args) -> int:
    import torch

    import fastlm
    from fastlm import _ext, backends

    print(f"fastlm {fastlm.__version__}  python {platform.python_version()}  torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as e:
        print(f"triton: not installed ({e})")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed (fastlm.patch and the HF models need it)")
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"allocator: {_malloc_state()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs")
        devices.append("cuda")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    ext = _ext.load()
    print(f"extension fastlm._C: {'loaded from ' + getattr(ext, '__file__', 'JIT build') if ext else _ext.error()}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  FASTLM_BACKEND="
          f"{os.environ.get('FASTLM_BACKEND', 'auto')}")
    backends._import_ops()
    for dev in ("cpu", "cuda"):
        print(f"\nbackends on {dev}:")
        for op in sorted(backends._OPS):
            missing = [be for be in backends._OPS[op]["backends"] if backends.unavailable_reason(be, dev, op)]
            print(f"  {op:30s} auto order {backends.available_backends(op, dev)}"
                  + (f"  (unavailable: {', '.join(missing)})" if missing else ""))
        print("  why a backend is missing on " + dev + ":")
        for be in backends.BACKENDS:
            reason = backends.unavailable_reason(be, dev)
            print(f"    {be:10s} {'available' if reason is None else reason}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from fastlm.bench import report
    from fastlm.bench.runner import run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlm bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    suites = ["kernels", "models", "generate"] if args.suite == "all" else [args.suite]
    try:
        from rich.console import Console

        console = Console()
    except ImportError:
        console = None
    for suite in suites:
        run = run_suite(suite, device, dtype, quick=args.quick, names=args.filter, console=console)
        report.print_table(run, console)
        if args.out:
            env = run["environment"]
            name = (env.get("gpu") or env["cpu"] or "cpu").replace(" ", "-").replace("/", "-")
            stem = f"{name}-{env['date'][:10]}-{suite}-{run['dtype']}{'-quick' if args.quick else ''}"
            for p in report.write_outputs(run, args.out, stem):
                print(f"wrote {p}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description="fused kernels for transformer language models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and each backend's state (and why it is unavailable)")
    b = sub.add_parser("bench", help="benchmark suites against PyTorch eager, SDPA and torch.compile")
    b.add_argument("--suite", default="kernels", choices=["kernels", "models", "generate", "all"])
    b.add_argument("--quick", action="store_true", help="the short case list, shorter timing")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    b.add_argument("--filter", default=None, help="only cases whose name contains this text")
    b.add_argument("--out", default=None, help="write JSON, markdown and PNG here")
    g = sub.add_parser("generate", help="generate text with a GPT-2 (a local HF folder or random weights)")
    try:
        from fastlm import generation
    except ImportError:
        generation = None
    if generation is not None and hasattr(generation, "add_cli_arguments"):
        generation.add_cli_arguments(g)
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    if generation is None or not hasattr(generation, "cli_main"):
        print("fastlm generate: the generation engine is not available in this build", file=sys.stderr)
        return 2
    return generation.cli_main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
