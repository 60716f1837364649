"""Which backends exist, per op and device, and which one runs a given call.

Backends: "reference" (PyTorch, fp32 math), "cpu" (C++), "cuda" (C++/CUDA), "triton". Each op family
in fastlm/ops registers the backends that implement it (`register_op`) and, per call, a `supports`
check. The policy:

- `with fastlm.use_backend(name)` (or FASTLM_BACKEND=name process-wide) forces one backend; a call it
  cannot run raises `BackendUnavailableError` (a ValueError) saying why.
- "auto" (the default) tries `available_backends(op, device)` in order -- the fastest first -- and
  takes the first that supports the call; skipping a backend that exists but cannot run this call
  (an fp64 input, mixed dtypes, ...) warns once per (op, backend, reason).

Nothing is decided at import: every call chooses (cheaply), so tests and contexts never leak.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from typing import Callable, Iterator

import torch

from fastlm import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "triton", "reference")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastlm_backend", default=None)
_OPS: dict[str, dict] = {}
_warned: set = set()


class BackendUnavailableError(ValueError):
    """A forced backend cannot run the call (unavailable on this machine or unsupported inputs)."""


class FallbackWarning(UserWarning):
    """"auto" skipped a backend that cannot run a call and used the next one."""


def register_op(op: str, backends: tuple[str, ...], cpp_ops: tuple[str, ...] = (),
                order: dict[str, tuple[str, ...]] | None = None) -> None:
    """Declare the functional op `op` (a name in fastlm.ops), the backends that implement it, the
    fastlm_C operators its cpu/cuda backends need, and optionally its own "auto" order per device."""
    _OPS[op] = {"backends": tuple(backends), "cpp_ops": tuple(cpp_ops), "order": order or {}}


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` ("reference", "cpu", "cuda", "triton" or "auto") for the calls inside the block."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str:
    """The forced backend in effect ("auto" when none): use_backend() wins over FASTLM_BACKEND."""
    name = _forced.get() or os.environ.get("FASTLM_BACKEND", "auto") or "auto"
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
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(dev)
    if backend != dev:
        return f"the {backend} backend takes {backend} tensors, got {dev} tensors"
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
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
    """The backends that can run `op` (a name in fastlm.ops; None: any op) on `device`, in the order
    "auto" tries them."""
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


def _cached_reason(backend: str, dev: str, op: str) -> str | None:
    key = (backend, dev, op, os.environ.get("TRITON_INTERPRET"))
    if key not in _reason_cache:
        _reason_cache[key] = unavailable_reason(backend, dev, op)
    return _reason_cache[key]


def select(op: str, device, supports: Callable[[str], str | None]) -> str:
    """The backend that runs this call. `supports(backend)` returns None or why the inputs are not
    supported by that backend (dtype, shape...)."""
    dev = device.type if isinstance(device, torch.device) else _device_type(device)
    forced = current_backend()
    if forced != "auto":
        reason = _cached_reason(forced, dev, op) or supports(forced)
        if reason is not None:
            raise BackendUnavailableError(f"fastlm.ops.{op}: backend {forced!r} cannot run this call: {reason}")
        return forced
    skipped = []
    for name in _available(op, dev):
        reason = supports(name)
        if reason is None:
            for s_name, s_reason in skipped:
                key = (op, s_name, s_reason)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"fastlm.ops.{op}: the {s_name} backend cannot run this call ({s_reason}); "
                                  f"using {name}", FallbackWarning, stacklevel=4)
            return name
        skipped.append((name, reason))
    raise BackendUnavailableError(f"fastlm.ops.{op}: no backend can run this call on {dev}: {skipped}")
