"""The `fastlm` command: `fastlm info | bench | tune | generate | serve`.

- info:     versions, devices, the CPU ISA path of each kernel, each backend's state (and why it is
            unavailable), the cached choices of the measured "auto".
- bench:    the benchmark suites (fastlm/bench); exits 1 when any row errored (after the table).
- tune:     pre-tunes "auto" for a model's shapes (inference: GPT-2 prefill + decode steps through
            fastlm.generate, a BERT forward; --train: a patched HF training step), then prints the choices.
- generate: fastlm.generation's CLI (--weights quantizes the model).
- serve:    fastlm.serving.cli (the OpenAI-compatible server), where this build has it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys

WEIGHTS = ("fp32", "bf16", "int8")


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
    _print_isa_paths(backends, ext)
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
    print()
    print_cached_choices(backends)
    return 0


def _print_isa_paths(backends, ext) -> None:
    """The CPU ISA path each kernel takes (fastlm_C.cpu_isa_paths(), where the extension has it)."""
    import torch

    cpu_isa = getattr(backends, "cpu_isa", None)
    try:
        torch_isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        torch_isa = "unknown"
    print(f"\nCPU ISA: fastlm {cpu_isa() if cpu_isa is not None else 'unknown'}, torch {torch_isa}; "
          f"FASTLM_CPU_NO_AVX512={os.environ.get('FASTLM_CPU_NO_AVX512', '0')}")
    paths = None
    if ext is not None and hasattr(torch.ops.fastlm_C, "cpu_isa_paths"):
        try:
            paths = torch.ops.fastlm_C.cpu_isa_paths()
        except Exception as e:  # noqa: BLE001
            paths = [f"error: {e}"]
    print("CPU ISA path of each kernel:")
    if paths is None:
        print("  unknown (this build of fastlm._C has no cpu_isa_paths())")
    elif isinstance(paths, dict):
        for k, v in sorted(paths.items()):
            print(f"  {k}: {v}")
    else:
        for line in paths:
            print(f"  {line}")


def print_cached_choices(backends, only_keys=None) -> int:
    """Print the measured auto choices (memory + disk cache); returns how many were printed."""
    cached = getattr(backends, "cached_choices", None)
    if cached is None:
        print("auto choices: none cached (this build's auto is a fixed order, not measured)")
        return 0
    rows = [r for r in cached() if only_keys is None or r.get("key") in only_keys]
    cache_dir = getattr(backends, "cache_dir", None)
    where = f" (disk cache: {cache_dir()})" if cache_dir is not None else ""
    print(f"auto choices cached: {len(rows)}{where}")
    for r in rows:
        times = ", ".join(f"{be} {ms:.4g} ms" for be, ms in sorted((r.get("times_ms") or {}).items(),
                                                                     key=lambda kv: kv[1]))
        excluded = "; ".join(f"{be}: {why}" for be, why in (r.get("excluded") or {}).items())
        print(f"  {r.get('op')}: {r.get('backend')}  [{r.get('key')}]" + (f"  times: {times}" if times else "")
              + (f"  excluded: {excluded}" if excluded else ""))
    return len(rows)


def _check_weights(weights: str | None, command: str) -> str | None:
    """None if `--weights` can be honoured, else the error to print."""
    if weights in (None, "fp32"):
        return None
    import fastlm

    if not hasattr(fastlm, "quantize"):
        return (f"fastlm {command}: --weights {weights} needs fastlm.quantize (int8/bf16 weights), which this "
                "build does not have")
    return None


def _check_activations(args, command: str) -> str | None:
    """None if `--activations` can be honoured (absent, or int8 with --weights int8), else the error."""
    if getattr(args, "activations", None) is None:
        return None
    if (getattr(args, "weights", None) or "fp32") != "int8":
        return f"fastlm {command}: --activations int8 needs --weights int8"
    return None


def cmd_bench(args) -> int:
    import torch

    from fastlm.bench import registry, report
    from fastlm.bench.runner import failures, run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlm bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    err = _check_weights(args.weights, "bench") or _check_activations(args, "bench")
    if err:
        print(err, file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    suites = list(registry.SUITES) if args.suite == "all" else [args.suite]
    try:
        from rich.console import Console

        console = Console()
    except ImportError:
        console = None
    failed = []
    for suite in suites:
        run = run_suite(suite, device, dtype, quick=args.quick, names=args.filter, console=console,
                        weights=args.weights or "fp32", activations=getattr(args, "activations", None))
        if not run["cases"]:
            print(f"fastlm bench --suite {suite}: no cases on {device}" + (f" matching {args.filter!r}" if args.filter
                                                                           else ""))
            continue
        report.print_table(run, console)
        failed += [f"[{suite}] {f}" for f in failures(run)]
        if args.out:
            env = run["environment"]
            name = (env.get("gpu") or env["cpu"] or "cpu").replace(" ", "-").replace("/", "-")
            w = "" if (args.weights or "fp32") == "fp32" else f"-{args.weights}"
            w += "-a8" if getattr(args, "activations", None) else ""
            stem = f"{name}-{env['date'][:10]}-{suite}-{run['dtype']}{w}{'-quick' if args.quick else ''}"
            for p in report.write_outputs(run, args.out, stem):
                print(f"wrote {p}")
    if failed:
        print(f"fastlm bench: {len(failed)} row(s) errored:", file=sys.stderr)
        for f in failed:
            print(f"  {f[:300]}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- fastlm tune

_GPT2_RANDOM = ("gpt2", "gpt2-medium")
_BERT_RANDOM = {"bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072),
                "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def _model_type(args) -> str:
    if args.random:
        return "gpt2" if args.random in _GPT2_RANDOM else "bert"
    cfg_path = os.path.join(args.model, "config.json")
    try:
        with open(cfg_path) as f:
            mt = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastlm tune: --model {args.model}: cannot read {cfg_path}: {e}")
    if mt not in ("gpt2", "bert"):
        raise SystemExit(f"fastlm tune: --model {args.model}: model_type {mt!r} (fastlm tunes gpt2 and bert models)")
    return mt


def _hf_model(args, arch: str, dtype, device):
    """The transformers model (random weights for --random; --layers overrides the depth)."""
    import torch

    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel as Cls
    else:
        from transformers import BertConfig, BertModel as Cls
    if args.model:
        m = Cls.from_pretrained(args.model)
    else:
        if arch == "gpt2":
            from fastlm.models.gpt2 import SIZES

            size = dict(SIZES[args.random])
            cfg = GPT2Config(n_embd=size["n_embd"], n_layer=args.layers or size["n_layer"], n_head=size["n_head"],
                             n_positions=max(1024, args.seq + args.new_tokens), vocab_size=50257)
        else:
            shape = dict(_BERT_RANDOM[args.random])
            if args.layers:
                shape["num_hidden_layers"] = args.layers
            cfg = BertConfig(vocab_size=30522, max_position_embeddings=max(512, args.seq), **shape)
        torch.manual_seed(0)
        m = Cls(cfg)
    return m.to(device=device, dtype=dtype)


def _tune_runs(args, arch: str, dtype, device) -> list[str]:
    """Run the model's inference forward(s) (and a training step with --train); returns what ran."""
    import warnings

    import torch

    import fastlm
    from fastlm.integrations.hf import PatchWarning

    B, S = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    done = []
    hf = _hf_model(args, arch, dtype, device).eval()
    ids = torch.randint(0, hf.config.vocab_size, (B, S), generator=g).to(device)
    if arch == "gpt2":
        native = fastlm.models.GPT2.from_hf(hf)
        if args.weights not in (None, "fp32"):
            native = fastlm.quantize(native, weights=args.weights)
        fastlm.generate(native, ids, max_new_tokens=args.new_tokens)
        done.append(f"GPT-2 inference: fastlm.generate, prefill {B}x{S} + {args.new_tokens - 1} decode steps")
    else:
        native = fastlm.models.Bert.from_hf(hf)
        if args.weights not in (None, "fp32"):
            native = fastlm.quantize(native, weights=args.weights)
        native(ids, attention_mask=torch.ones_like(ids))
        done.append(f"BERT inference: native forward {B}x{S}")
    del native
    # a patched HF model's inference forward: the same ops with the patched shapes/layouts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchWarning)
        fastlm.patch(hf)
    with torch.inference_mode():
        hf(ids, attention_mask=torch.ones_like(ids))
    done.append(f"patched HF inference forward {B}x{S}")
    if args.train:
        hf.train()
        for mod in hf.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        out = hf(ids, attention_mask=torch.ones_like(ids), **({"labels": ids} if arch == "gpt2" else {}))
        loss = out.loss if arch == "gpt2" else out.last_hidden_state.float().square().mean()
        loss.backward()
        done.append(f"patched HF training step (forward + backward) {B}x{S}")
    return done


def cmd_tune(args) -> int:
    import torch

    from fastlm import backends

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastlm tune: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    err = _check_weights(args.weights, "tune")
    if err:
        print(err, file=sys.stderr)
        return 2
    if not hasattr(backends, "cached_choices"):
        print("fastlm tune: this build's auto is a fixed order, not measured: there is nothing to tune",
              file=sys.stderr)
        return 2
    if os.environ.get("FASTLM_AUTOTUNE", "1") == "0":
        print("fastlm tune: FASTLM_AUTOTUNE=0 turns the measured auto off: nothing would be measured", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fastlm tune: needs transformers (the models are built from Hugging Face configs)", file=sys.stderr)
        return 2
    arch = _model_type(args)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    before = {r.get("key") for r in backends.cached_choices()}
    tune_mode = getattr(backends, "tune_mode", None)
    with (tune_mode() if tune_mode is not None else contextlib.nullcontext()):
        done = _tune_runs(args, arch, dtype, device)
    print(f"fastlm tune ({args.model or 'random ' + args.random}, {args.device}, {args.dtype}):")
    for d in done:
        print(f"  ran {d}")
    new = {r.get("key") for r in backends.cached_choices()}
    measured = print_cached_choices(backends, only_keys=None if tune_mode is not None else new - before)
    if measured == 0:
        print("fastlm tune: no choice was measured (every call took a static path?)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- fastlm generate --weights

@contextlib.contextmanager
def _quantized_models(generation, weights: str, activations: str | None = None):
    """Until fastlm.generation.cli_main takes `weights` itself: the GPT2 it builds (GPT2.from_hf /
    GPT2.random, looked up in its module namespace) comes back fastlm.quantize'd."""
    import fastlm

    orig = generation.GPT2
    kw = {"weights": weights} if activations is None else {"weights": weights, "activations": activations}

    class _Quantized:
        @staticmethod
        def from_hf(*a, **k):
            return fastlm.quantize(orig.from_hf(*a, **k), **kw)

        @staticmethod
        def random(*a, **k):
            return fastlm.quantize(orig.random(*a, **k), **kw)

        def __getattr__(self, name):  # pragma: no cover - anything else: the real class
            return getattr(orig, name)

    generation.GPT2 = _Quantized
    try:
        yield
    finally:
        generation.GPT2 = orig


def cmd_generate(args, generation) -> int:
    if generation is None or not hasattr(generation, "cli_main"):
        print("fastlm generate: the generation engine is not available in this build", file=sys.stderr)
        return 2
    weights = getattr(args, "weights", None) or "fp32"
    err = _check_weights(weights, "generate") or _check_activations(args, "generate")
    if err:
        print(err, file=sys.stderr)
        return 2
    code = getattr(generation.cli_main, "__code__", None)
    if weights == "fp32" or (code is not None and "weights" in code.co_names):   # it reads args.weights itself
        return generation.cli_main(args) or 0
    with _quantized_models(generation, weights, getattr(args, "activations", None)):
        return generation.cli_main(args) or 0


def _serving_cli():
    """fastlm.serving.cli (add_parser(subparsers), run(args) -> int), or None where this build lacks it."""
    try:
        from fastlm.serving import cli as serving_cli
    except ImportError:
        return None
    if not (hasattr(serving_cli, "add_parser") and hasattr(serving_cli, "run")):
        return None
    return serving_cli


def build_parser():
    from fastlm.bench.registry import SUITES

    parser = argparse.ArgumentParser(prog="fastlm", description="fused kernels for transformer language models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, ISA paths, each backend's state, the cached auto choices")
    b = sub.add_parser("bench", help="benchmark suites against PyTorch eager, SDPA and torch.compile")
    b.add_argument("--suite", default="kernels", choices=[*SUITES, "all"])
    b.add_argument("--quick", action="store_true", help="the short case list, shorter timing")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    b.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="weights of the fastlm models in the models/generate suites (fastlm.quantize)")
    b.add_argument("--activations", choices=["int8"], default=None,
                   help="with --weights int8: int8 activations too (W8A8 for calls of 2+ rows)")
    b.add_argument("--filter", default=None, help="only cases whose name contains this text")
    b.add_argument("--out", default=None, help="write JSON, markdown and PNG here")
    t = sub.add_parser("tune", help="pre-tune the measured auto for a model's shapes (a service starts warm)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local Hugging Face GPT-2 or BERT folder")
    src.add_argument("--random", choices=[*_GPT2_RANDOM, *_BERT_RANDOM], help="random weights with this shape")
    t.add_argument("--layers", type=int, default=None, help="override the depth (--random; e.g. 2 for a quick run)")
    t.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    t.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--seq", type=int, default=128, help="prompt length (GPT-2) / sequence length (BERT)")
    t.add_argument("--new-tokens", type=int, default=4, help="GPT-2: tokens generated (prefill + decode steps)")
    t.add_argument("--weights", choices=WEIGHTS, default="fp32", help="tune the quantized model's shapes")
    t.add_argument("--train", action="store_true", help="also a training step (patched HF model, fwd + bwd)")
    g = sub.add_parser("generate", help="generate text with a GPT-2 (a local HF folder or random weights)")
    try:
        from fastlm import generation
    except ImportError:
        generation = None
    if generation is not None and hasattr(generation, "add_cli_arguments"):
        generation.add_cli_arguments(g)
    if not any("--weights" in a.option_strings for a in g._actions):
        g.add_argument("--weights", choices=WEIGHTS, default="fp32", help="int8 / bf16 weights (fastlm.quantize)")
    if not any("--activations" in a.option_strings for a in g._actions):
        g.add_argument("--activations", choices=["int8"], default=None,
                       help="with --weights int8: int8 activations too (W8A8 for prefill and batched decode)")
    serving_cli = _serving_cli()
    if serving_cli is not None:
        serving_cli.add_parser(sub)
    else:
        sub.add_parser("serve", help="OpenAI-compatible HTTP server (not available in this build)")
    return parser, generation, serving_cli


def main(argv=None) -> int:
    parser, generation, serving_cli = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "tune":
        return cmd_tune(args)
    if args.command == "serve":
        if serving_cli is None:
            print("fastlm serve: the serving layer (fastlm.serving.cli) is not available in this build", file=sys.stderr)
            return 2
        return serving_cli.run(args) or 0
    return cmd_generate(args, generation)


if __name__ == "__main__":
    sys.exit(main())
