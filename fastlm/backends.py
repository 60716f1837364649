"""Which backends exist, per op and device, and which one runs a given call.

Backends: "torch" (torch's own op: F.layer_norm, F.scaled_dot_product_attention, F.linear, ...),
"reference" (PyTorch math in fp32, the oracle), "cpu" (C++), "cuda" (C++/CUDA), "triton". Each op
family in fastlm/ops registers the backends that implement it (`register_op`) and, per call, a
`supports` check. The policy:

- `with fastlm.use_backend(name)` (or FASTLM_BACKEND=name process-wide) forces one backend; a call it
  cannot run raises `BackendUnavailableError` (a ValueError) saying why.
- "auto" (the default) is measured: per key -- (op, device type, platform (the CPU's ISA path or the
  GPU's name), the op's own part: dtype, a shape bucket, whether gradients are needed, ...) -- the
  first eager call times every available backend that supports it on the call's own inputs (a
  warm-up each, then up to `_REPS` interleaved rounds within a time budget, each round timing every
  backend once in a rotated order, the median over rounds), checks each result against
  torch's with the parity rule (`_parity`: at most 2x torch's own error against an upcast oracle,
  3x for gradients, plus an atol floor), excludes a backend that disagrees (one warning naming it)
  and keeps the fastest. "torch" is always a contender and the final fallback. The choice is cached
  in memory (a dict lookup on the hot path) and on disk (`_disk_path()`: JSON under
  FASTLM_CACHE_DIR, default ~/.cache/fastlm, one file per fastlm and torch version, entries keyed
  by platform; atomic writes).
- Under torch.compile, fake/meta tensors and CUDA-graph capture nothing is timed: the cached choice,
  else the static one. FASTLM_AUTOTUNE=0: always the static choice, the first backend of the op's
  fixed order (`available_backends`) that supports the call; skipping one that exists but cannot run
  the call warns once per (op, backend, reason).
- `select(op, device, supports)` without `measure`/`key` (the form ops added before the measured
  auto use) is the static choice.

Nothing is decided at import.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from fastlm import _ext

BACKENDS = ("torch", "reference", "cpu", "cuda", "triton")
# The static ("fixed") order per device: the fastest kernels first, torch's own op before the
# interpreted Triton on CPU (tests only) and before the reference, which "auto" never picks when
# torch can run the call.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch", "reference"), "cpu": ("cpu", "torch", "triton", "reference")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastlm_backend", default=None)
# (op, backend) a functional op chose for the call in progress: the selects of its inner kernels
# (the custom op's forward) take it without a second lookup.
_pinned: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("fastlm_pinned", default=None)
_OPS: dict[str, dict] = {}
_warned: set = set()
_last = threading.local()


class BackendUnavailableError(ValueError):
    """A forced backend cannot run the call (unavailable on this machine or unsupported inputs)."""


class FallbackWarning(UserWarning):
    """"auto" skipped a backend that cannot run a call and used another one."""


class AutotuneWarning(FallbackWarning):
    """The measured "auto" excluded a backend whose result disagrees with torch's for a key."""


def register_op(op: str, backends: tuple[str, ...], cpp_ops: tuple[str, ...] = (),
                order: dict[str, tuple[str, ...]] | None = None) -> None:
    """Declare the functional op `op` (a name in fastlm.ops), the backends that implement it, the
    fastlm_C operators its cpu/cuda backends need, and optionally its own static order per device."""
    _OPS[op] = {"backends": tuple(backends), "cpp_ops": tuple(cpp_ops), "order": order or {}}


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` (one of BACKENDS, or "auto") for the calls inside the block."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


# os.environ.get costs ~1 us (key encoding, a Mapping method); its underlying dict read ~0.05 us.
# Every op reads FASTLM_BACKEND on every call, so read the dict where this Python has one.
_ENV_DATA = getattr(os.environ, "_data", None)


def _environ_get(name: str) -> str | None:
    if isinstance(_ENV_DATA, dict) and hasattr(os.environ, "encodekey"):
        v = _ENV_DATA.get(os.environ.encodekey(name))
        return None if v is None else os.environ.decodevalue(v)
    return os.environ.get(name)


def current_backend() -> str:
    """The forced backend in effect ("auto" when none): use_backend() wins over FASTLM_BACKEND."""
    name = _forced.get() or _environ_get("FASTLM_BACKEND") or "auto"
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"FASTLM_BACKEND={name!r} is not one of {BACKENDS + ('auto',)}")
    return name


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"triton does not run on {device_type} tensors"


def unavailable_reason(backend: str, device="cpu", op: str | None = None) -> str | None:
    """None if `backend` can run `op` on `device` on this machine, else a sentence saying why not."""
    dev = _device_type(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}"
    if op is not None:
        if op not in _OPS:
            _import_ops()
        if op not in _OPS:
            return f"unknown op {op!r}"
        if backend not in _OPS[op]["backends"]:
            return f"{op} has no {backend} implementation"
    if dev not in ("cpu", "cuda"):
        return f"fastlm runs on cpu and cuda tensors, not {dev}"
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        return _triton_reason(dev)
    if backend != dev:
        return f"the {backend} backend takes {backend} tensors, got {dev} tensors"
    if _ext.load() is None:
        return _ext.error()
    key = "CPU" if dev == "cpu" else "CUDA"
    cpp_ops = _OPS[op]["cpp_ops"] if op is not None else ("layer_norm_fwd",)
    missing = [name for name in cpp_ops if not _ext.has_kernel(name, key)]
    if missing:
        return f"fastlm._C was built without {key} kernels for {', '.join(missing)}"
    return None


def _import_ops() -> None:
    import fastlm.ops  # noqa: F401  (registers every op family)


# What a machine has does not change while a process runs (the extension, triton and the devices are
# probed once); only TRITON_INTERPRET is read again, as it is part of the key.
_avail_cache: dict[tuple, tuple[str, ...]] = {}
_reason_cache: dict[tuple, str | None] = {}


def available_backends(op: str | None = None, device="cpu") -> list[str]:
    """The backends that can run `op` (a name in fastlm.ops; None: any op) on `device`, in the static
    order (the one FASTLM_AUTOTUNE=0 and torch.compile without a cached choice use)."""
    return list(_available(op, _device_type(device)))


def _available(op: str | None, dev: str) -> tuple[str, ...]:
    key = (op, dev, os.environ.get("TRITON_INTERPRET"))
    hit = _avail_cache.get(key)
    if hit is not None:
        return hit
    _import_ops()
    if op is not None and op not in _OPS:
        raise ValueError(f"available_backends: unknown op {op!r}; known: {sorted(_OPS)}")
    order = (_OPS[op]["order"].get(dev) if op is not None else None) or _AUTO_ORDER.get(dev, ("reference",))
    result = tuple(b for b in order if unavailable_reason(b, dev, op) is None)
    _avail_cache[key] = result
    return result


# torch.compile takes what a machine has as a constant of the trace (probing the extension is not traceable)
_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _cached_reason(backend: str, dev: str, op: str) -> str | None:
    key = (backend, dev, op, os.environ.get("TRITON_INTERPRET"))
    if key not in _reason_cache:
        _reason_cache[key] = unavailable_reason(backend, dev, op)
    return _reason_cache[key]


# ---- platform: the part of a key that names the hardware path ----

_platforms: dict = {}


def cpu_isa() -> str:
    """The ISA path fastlm's CPU kernels take: the extension's own answer when it has one
    (fastlm_C::cpu_isa), else "avx512" / "avx2" from /proc/cpuinfo and FASTLM_CPU_NO_AVX512, else
    torch's CPU capability."""
    if _ext.load() is not None and hasattr(torch.ops.fastlm_C, "cpu_isa"):
        try:
            return str(torch.ops.fastlm_C.cpu_isa())
        except Exception:  # noqa: BLE001  (an older build: derive it below)
            pass
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags:
        return str(torch.backends.cpu.get_cpu_capability()).lower()
    if "avx512f" in flags and os.environ.get("FASTLM_CPU_NO_AVX512", "0") != "1":
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "generic"


def platform(device) -> str:
    """The hardware part of a choice key: the CPU ISA path ("cpu:avx512") or the GPU's name."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    hit = _platforms.get(dev)
    if hit is None:
        if dev.type == "cuda":
            hit = "cuda:" + torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
        elif dev.type == "cpu":
            hit = "cpu:" + cpu_isa()
        else:
            hit = dev.type
        _platforms[dev] = hit
    return hit


# torch.compile calls platform() at trace time and takes its result as a constant (what
# torch.compiler.assume_constant_result sets, without importing torch._dynamo at import)
platform._dynamo_marked_constant = True  # type: ignore[attr-defined]


# ---- the choice ----

_choices: dict[tuple, str] = {}        # full key -> measured (or disk-cached) backend
_static_choices: dict[tuple, str] = {}  # full key -> static backend (no timing)
_records: dict[tuple, dict] = {}       # full key -> cached_choices() entry
_disk: dict | None = None              # entries loaded from _disk_path(), by key string
_lock = threading.RLock()
_epoch = [0]                           # bumped when the choices are cleared or re-tuned


def choice_epoch() -> int:
    """A counter that changes whenever cached choices may have changed (clear_choice_cache,
    tune_mode): callers that memoize kernels chosen through select key them on it."""
    return _epoch[0]


def _static(op: str, dev: str, supports: Callable[[str], str | None], warn: bool = True) -> str:
    skipped = []
    for name in _available(op, dev):
        reason = supports(name)
        if reason is None:
            if warn:
                _warn_skipped(op, name, skipped)
            return name
        skipped.append((name, reason))
    raise BackendUnavailableError(f"fastlm.ops.{op}: no backend can run this call on {dev}: {skipped}")


def _warn_skipped(op: str, chosen: str, skipped: list) -> None:
    for s_name, s_reason in skipped:
        key = (op, s_name, s_reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fastlm.ops.{op}: the {s_name} backend cannot run this call ({s_reason}); "
                          f"using {chosen}", FallbackWarning, stacklevel=5)


def _record_last(op: str, backend: str) -> None:
    if not torch.compiler.is_compiling():
        _last.__dict__[op] = backend


def last_choice(op: str) -> str | None:
    """The backend the last call of `op` ran on in this thread (None before any call)."""
    return _last.__dict__.get(op)


def _autotune_enabled() -> bool:
    return os.environ.get("FASTLM_AUTOTUNE", "1") != "0"


def _can_measure(device) -> bool:
    if torch.compiler.is_compiling():
        return False
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return dev.type in ("cpu", "cuda")


def select(op: str, device, supports: Callable[[str], str | None], measure: Optional[Callable] = None,
           key: Optional[tuple] = None, check: Optional[Callable] = None) -> str:
    """The backend that runs this call.

    supports(backend) returns None or why the inputs are not supported by that backend (dtype,
    shape...). Without `key`: the forced backend, else the static choice. With `key` (a tuple of
    hashables that, with op, device type and platform, determines what `supports` answers -- dtype,
    shape bucket, grad needed, ...): the cached measured choice, measured now with `measure` if the
    call allows it. measure(backend, upcast=False) runs the call on that backend and returns its
    outputs (a tensor or a tuple of tensors; with upcast=True: the torch backend on the inputs in a
    wider dtype, the oracle). check(outputs, oracle, torch_outputs) -> None or why `outputs`
    disagree (default: `_parity`)."""
    pin = _pinned.get()
    if pin is not None and pin[0] == op:
        return pin[1]
    dev = device.type if isinstance(device, torch.device) else _device_type(device)
    forced = current_backend()
    if forced != "auto":
        if dev == "meta":
            return forced   # shapes only: the op's fake implementation
        reason = _cached_reason(forced, dev, op) or supports(forced)
        if reason is not None:
            raise BackendUnavailableError(f"fastlm.ops.{op}: backend {forced!r} cannot run this call: {reason}")
        return forced
    if key is None:
        return _static(op, dev, supports)
    full = (op, dev, platform(device), key)
    hit = _choices.get(full)
    if hit is not None:
        return hit
    return _choose(op, dev, device, supports, measure, full, check)


def _choose(op, dev, device, supports, measure, full, check) -> str:
    if dev not in ("cpu", "cuda") and "torch" in _OPS.get(op, {}).get("backends", ()):
        return "torch"   # meta tensors (shape propagation): torch's own meta kernels
    if torch.compiler.is_compiling():
        # traced once: the static choice (no lock, no file, no warning inside the trace)
        hit = _static_choices.get(full)
        return hit if hit is not None else _static(op, dev, supports, warn=False)
    if not _autotune_enabled():
        hit = _static_choices.get(full)
        if hit is None:
            hit = _static_choices[full] = _static(op, dev, supports)
        return hit
    with _lock:
        hit = _from_disk(full, dev, op, supports)
        if hit is not None:
            _warn_skipped(op, hit, _candidates(op, dev, supports)[1])
            _choices[full] = hit
            return hit
        if measure is None or not getattr(measure, "measurable", True) or not _can_measure(device):
            hit = _static_choices.get(full)
            if hit is None:
                hit = _static_choices[full] = _static(op, dev, supports)
            return hit
        chosen = _measure(op, dev, supports, measure, full, check)
        _choices[full] = chosen
        _save(full)
        return chosen


@contextlib.contextmanager
def pinned(op: str, backend: str) -> Iterator[None]:
    """Inside the block, select(op, ...) answers `backend` (a functional op's chosen backend, seen by
    the selects of its own kernels)."""
    token = _pinned.set((op, backend))
    try:
        yield
    finally:
        _pinned.reset(token)


def run_on(op: str, backend: str, fn: Callable, *args):
    """fn(*args) with select(op, ...) pinned to `backend`; records it as the op's last choice. (Under
    torch.compile: fn(*args); its kernels' selects answer from the same key.)"""
    if torch.compiler.is_compiling():
        return fn(*args)
    _record_last(op, backend)
    token = _pinned.set((op, backend))
    try:
        return fn(*args)
    finally:
        _pinned.reset(token)


# ---- measuring ----

_REPS = 7             # interleaved rounds (fewer where the budget runs out; at least one)
_MIN_SAMPLE_S = 2e-4  # a sample times enough calls to last this long (timer resolution, call jitter) ...
_MAX_INNER = 64       # ... up to this many
_BUDGET_S = float(os.environ.get("FASTLM_AUTOTUNE_BUDGET_MS", "1500")) / 1000.0   # per key, all backends


def _sync(device) -> None:
    if _device_type(device) == "cuda":
        torch.cuda.synchronize(device)


def _as_tuple(out) -> tuple:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


def _candidates(op: str, dev: str, supports) -> tuple[list[str], list]:
    cands, skipped = [], []
    for name in _available(op, dev):
        if name == "reference" or (name == "triton" and dev == "cpu"):
            continue   # the oracle, and the Triton interpreter (tests only): never the fastest
        reason = supports(name)
        if reason is None:
            cands.append(name)
        else:
            skipped.append((name, reason))
    if "torch" in _OPS[op]["backends"] and "torch" not in cands:
        cands.append("torch")
    return cands, skipped


def _measure(op, dev, supports, measure, full, check) -> str:
    cands, skipped = _candidates(op, dev, supports)
    rec = {"op": op, "key": _key_str(full), "backend": None, "times_ms": {}, "excluded": {}}
    _records[full] = rec
    if not cands:
        chosen = _static(op, dev, supports)
        rec["backend"] = chosen
        return chosen
    _warn_skipped(op, cands[0], skipped)
    if len(cands) == 1:
        rec["backend"] = cands[0]
        return cands[0]
    device = full[1]
    deadline = time.perf_counter() + _BUDGET_S
    results: dict[str, tuple] = {}
    inner: dict[str, int] = {}
    # torch first: its result is the comparison, and its time the bar
    order = ["torch"] + [c for c in cands if c != "torch"] if "torch" in cands else cands
    for name in order:   # warm-up: each backend's result (for the parity check) and its cost per call
        try:
            _sync(device)
            out = _as_tuple(measure(name))
            _sync(device)
            t0 = time.perf_counter()
            measure(name)
            _sync(device)
            est = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (a backend that fails on this call is excluded, not fatal)
            if name == "torch":
                raise
            rec["excluded"][name] = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _warn_excluded(op, name, rec)
            continue
        results[name] = out
        inner[name] = max(1, min(_MAX_INNER, int(_MIN_SAMPLE_S / max(est, 1e-7))))
    # Interleaved rounds: each round times every backend once (`inner` calls, a sample >= ~0.2 ms), the
    # order rotated from round to round; the median over rounds. A host whose speed drifts, or a stall
    # during one sample, then moves every backend alike instead of deciding the pick.
    samples: dict[str, list] = {name: [] for name in results}
    names = list(results)
    for r in range(_REPS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            try:
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    measure(name)
                _sync(device)
            except Exception as e:  # noqa: BLE001  (as in the warm-up: excluded, not fatal)
                if name == "torch":
                    raise
                rec["excluded"][name] = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                _warn_excluded(op, name, rec)
                continue
            samples[name].append((time.perf_counter() - t0) / inner[name])
        names = [n for n in names if n not in rec["excluded"]]
        if time.perf_counter() > deadline or not names:
            break
    for name in list(results):
        if name in rec["excluded"]:
            del results[name], samples[name]
    times = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    rec["times_ms"] = dict(times)
    if "torch" in results and len(results) > 1:
        try:
            oracle = _as_tuple(measure("torch", upcast=True))
        except Exception:  # noqa: BLE001  (no wider dtype for this call: compare with torch's result)
            oracle = results["torch"]
        for name in list(results):
            if name == "torch":
                continue
            reason = (check or _parity)(results[name], oracle, results["torch"])
            if reason is not None:
                rec["excluded"][name] = reason
                del times[name]
                _warn_excluded(op, name, rec)
    chosen = min(times, key=times.get) if times else "torch"
    rec["backend"] = chosen
    return chosen


def _warn_excluded(op: str, name: str, rec: dict) -> None:
    k = (op, name, rec["key"])
    if k not in _warned:
        _warned.add(k)
        warnings.warn(f"fastlm.ops.{op}: auto excluded the {name} backend for {rec['key']}: "
                      f"{rec['excluded'][name]}", AutotuneWarning, stacklevel=6)


# Absolute floors of the parity rule, for values of order 1 (tests/helpers.py uses the same).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _parity(outputs: Sequence, oracle: Sequence, torch_outputs: Sequence) -> str | None:
    """None if every output is within 2x (the first output) or 3x (the others: gradients) of torch's
    own error against the oracle, plus the dtype's floor scaled by the oracle's magnitude; else why."""
    if len(outputs) != len(oracle):
        return f"{len(outputs)} outputs, torch gives {len(oracle)}"
    for i, (o, r, t) in enumerate(zip(outputs, oracle, torch_outputs)):
        if o is None or r is None:
            if (o is None) != (r is None):
                return f"output {i} is {'missing' if o is None else 'extra'}"
            continue
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i} has shape {tuple(o.shape)}, torch's {tuple(r.shape)}"
        if not o.is_floating_point():
            if not torch.equal(o.to(r.device), r.to(o.dtype)):
                return f"output {i} differs from torch's"
            continue
        if o.numel() == 0:
            continue
        od, rd, td = o.detach().double(), r.detach().double().to(o.device), t.detach().double().to(o.device)
        rnan, onan = torch.isnan(rd), torch.isnan(od)
        if bool((onan & ~rnan).any()):
            return f"output {i} has NaN where torch has none"
        fin = torch.isfinite(rd)
        if bool((od[~fin] != rd[~fin]).logical_and(~rnan[~fin]).any()):
            return f"output {i} differs from torch's at infinite values"
        err = (od - rd).abs()[fin].max().item() if bool(fin.any()) else 0.0
        base = (td - rd).abs()[fin].max().item() if bool(fin.any()) else 0.0
        scale = max(1.0, rd.abs()[fin].max().item()) if bool(fin.any()) else 1.0
        factor = 2.0 if i == 0 else 3.0
        bound = factor * base + ATOL.get(o.dtype, 1e-5) * scale
        if not err <= bound:
            return f"output {i}: max error {err:.3e} > {factor:g} x torch's {base:.3e} + floor"
    return None


# ---- the caches, in memory and on disk ----

def _key_str(full: tuple) -> str:
    op, dev, plat, key = full
    return f"{op}|{dev}|{plat}|" + ",".join(str(k) for k in key)


def cache_dir() -> str:
    return os.environ.get("FASTLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastlm")


def _disk_path() -> str:
    from fastlm import __version__
    tv = torch.__version__.replace("+", "_")
    return os.path.join(cache_dir(), f"auto-fastlm{__version__}-torch{tv}.json")


_disk_loaded_from: str | None = None


def _load_disk() -> dict:
    global _disk, _disk_loaded_from
    path = _disk_path()
    if _disk is None or _disk_loaded_from != path:
        _disk, _disk_loaded_from = _read(path), path
    return _disk


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data.get("entries", {})
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def _from_disk(full: tuple, dev: str, op: str, supports) -> str | None:
    entry = _load_disk().get(_key_str(full))
    if not isinstance(entry, dict):
        return None
    name = entry.get("backend")
    if name not in BACKENDS or _cached_reason(name, dev, op) is not None or supports(name) is not None:
        return None
    _records.setdefault(full, {"op": op, "key": _key_str(full), "backend": name,
                               "times_ms": dict(entry.get("times_ms", {})),
                               "excluded": dict(entry.get("excluded", {}))})
    return name


def _save(full: tuple) -> None:
    """Merge this key's record into the disk cache: read, update, write to a temp file, rename."""
    rec = _records.get(full)
    if rec is None:
        return
    path = _disk_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = _read(path)
        entries[rec["key"]] = {"backend": rec["backend"], "times_ms": rec["times_ms"], "excluded": rec["excluded"]}
        from fastlm import __version__
        data = {"fastlm": __version__, "torch": torch.__version__, "entries": entries}
        fd, tmp = tempfile.mkstemp(prefix=".auto-", suffix=".json", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        if _disk is not None and _disk_loaded_from == path:
            _disk[rec["key"]] = entries[rec["key"]]
    except OSError as e:
        k = ("disk", path)
        if k not in _warned:
            _warned.add(k)
            warnings.warn(f"fastlm: cannot write the auto cache {path}: {e}", RuntimeWarning, stacklevel=2)


def cached_choices() -> list[dict]:
    """The measured choices in this process and in the disk cache: dicts with op, key (str),
    backend, times_ms (backend -> median ms) and excluded (backend -> reason)."""
    out = {rec["key"]: dict(rec) for rec in _records.values() if rec.get("backend")}
    for k, entry in _load_disk().items():
        if k not in out and isinstance(entry, dict):
            out[k] = {"op": k.split("|", 1)[0], "key": k, "backend": entry.get("backend"),
                      "times_ms": dict(entry.get("times_ms", {})), "excluded": dict(entry.get("excluded", {}))}
    return sorted(out.values(), key=lambda r: r["key"])


def clear_choice_cache(disk: bool = False) -> None:
    """Forget the measured choices in memory (and with disk=True delete this version's disk cache)."""
    global _disk, _disk_loaded_from
    with _lock:
        _epoch[0] += 1
        _choices.clear()
        _static_choices.clear()
        _records.clear()
        _platforms.clear()
        _disk, _disk_loaded_from = None, None
        if disk:
            with contextlib.suppress(FileNotFoundError):
                os.remove(_disk_path())


@contextlib.contextmanager
def tune_mode() -> Iterator[None]:
    """Measure again inside the block: the keys met there are re-timed (the in-memory choices are
    dropped on entry, the disk cache is bypassed for reads and updated)."""
    global _disk, _disk_loaded_from
    with _lock:
        _epoch[0] += 1
        _choices.clear()
        _static_choices.clear()
        _records.clear()
        _disk, _disk_loaded_from = {}, _disk_path()
    try:
        yield
    finally:
        with _lock:
            _disk, _disk_loaded_from = None, None
