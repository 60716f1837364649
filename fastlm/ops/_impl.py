"""Which function implements a kernel entry point on a backend, by one naming convention:
reference.<name>_ref (PyTorch), the C++ op fastlm_C::<name> (cpu and cuda register under one name),
or fastlm.kernels.<triton_module>.<name> (Triton, imported on first use only)."""
from __future__ import annotations

import importlib

import torch

from fastlm.ops import reference


def kernel_impl(backend: str, name: str, triton_module: str):
    if backend == "reference":
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
