"""Shared plumbing of the op families.

kernel_impl: which function implements a kernel entry point on a backend, by one naming convention:
reference.<name>_ref (PyTorch; also what a fastlm::* op runs when its call was routed to "torch"),
the C++ op fastlm_C::<name> (cpu and cuda register under one name), or
fastlm.kernels.<triton_module>.<name> (Triton, imported on first use only).

eager_inference / needs_grad / measurable: the predicates every functional op uses to pick its path.
bucket / measurer: the pieces of the measured "auto" (fastlm.backends.select with key= and measure=).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from fastlm.ops import reference


def kernel_impl(backend: str, name: str, triton_module: str):
    if backend in ("reference", "torch"):
        return getattr(reference, name + "_ref")
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.fastlm_C, name)
    return getattr(importlib.import_module(f"fastlm.kernels.{triton_module}"), name)


def eager_inference(*tensors) -> bool:
    """Whether a forward may call its kernel directly instead of through its torch.library op: eager
    (not under torch.compile), plain tensors (no subclasses: fake tensors go through the op; meta
    tensors too, to its fake implementation), and no gradient needed. The custom-op wrapper costs
    tens of microseconds a call, and its first call in a process imports torch._dynamo (0.8-0.9 s
    measured here, torch 2.14)."""
    first = next((t for t in tensors if t is not None), None)
    return (type(first) is torch.Tensor and first.device.type != "meta" and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)))


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def measurable(*tensors) -> bool:
    """Whether a call may be timed by the measured "auto": eager, plain tensors on cpu/cuda (not
    fake, not meta), not inside a CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)):
            return False
    first = next((t for t in tensors if t is not None), None)
    if first is None or first.device.type not in ("cpu", "cuda"):
        return False
    return not (first.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def bucket(n: int) -> int:
    """A size's shape bucket: itself up to 16 (decode rows, small batches), else the next power of 2."""
    return n if n <= 16 else 1 << (n - 1).bit_length()


def _wide(t):
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().to(torch.float64)
    return t


class measurer:
    """A lazy measurer: built on every call (cheap), used only on a cache miss."""

    def __init__(self, fn: Callable, args: tuple, grad: bool):
        self.fn, self.args, self.grad = fn, args, grad
        self._m = None

    @property
    def measurable(self) -> bool:
        return measurable(*[a for a in self.args if isinstance(a, Tensor)])

    def __call__(self, backend: str, upcast: bool = False):
        if self._m is None:
            self._m = _measurer(self.fn, self.args, self.grad)
        return self._m(backend, upcast)


def _measurer(fn: Callable, args: tuple, grad: bool) -> Callable:
    """measure(backend, upcast=False) for fastlm.backends.select: fn(*args) (the public op) forced to
    `backend`. Without grad its output; with grad (the call needs gradients) forward + backward
    with a fixed upstream gradient, returning (output, d arg for each arg that requires grad), so
    the timing and the parity check cover both directions. upcast: torch's op on float64 copies of
    the floating-point arguments (the oracle). Inputs are never modified; the measured runs are
    detached from the caller's graph and draw nothing from torch's global RNG."""
    from fastlm import backends

    upstream: dict = {}

    def measure(backend: str, upcast: bool = False):
        a = tuple(_wide(t) for t in args) if upcast else args
        if upcast:
            backend = "torch"
        with backends.use_backend(backend):
            if not grad:
                with torch.no_grad():
                    return fn(*a)
            leaves = [t.detach().requires_grad_(True) if isinstance(t, Tensor) and src is not None
                      and src.requires_grad else t for t, src in zip(a, [x if isinstance(x, Tensor) else None
                                                                         for x in args])]
            with torch.enable_grad():
                outs = fn(*leaves)
                outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
                # One fixed upstream gradient per output position: backends may differ in which outputs
                # require grad (a custom op marks all of them; torch's `x + r` of two constants does
                # not), and an output that does not depend on the leaves adds nothing.
                diff = [(i, o) for i, o in enumerate(outs) if o.requires_grad]
                for i, o in diff:
                    if i not in upstream:
                        gen = torch.Generator(device=o.device).manual_seed(i)
                        upstream[i] = torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64)
                wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
                grads = torch.autograd.grad([o for _, o in diff], wrt, [upstream[i].to(o.dtype) for i, o in diff],
                                            allow_unused=True)
                grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt))
            return tuple(o.detach() for o in outs) + tuple(grads)

    return measure
