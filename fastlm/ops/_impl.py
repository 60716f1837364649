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
