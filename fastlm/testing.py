"""Test hooks shared by fastlm's tests and benchmarks."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def poison_outputs(enable: bool = True):
    """NaN-fill every kernel output (C++, CUDA and Triton launchers) before the kernel runs, so an
    element a kernel forgets to write shows up as NaN."""
    from fastlm import _ext

    prev_py = None
    try:
        from fastlm.kernels import utils as kutils

        prev_py, kutils.POISON_OUTPUTS = kutils.POISON_OUTPUTS, enable
    except ImportError:  # triton missing: only the C++ side to poison
        kutils = None
    prev_cpp = torch.ops.fastlm_C.set_poison_outputs(enable) if _ext.load() is not None else None
    try:
        yield
    finally:
        if kutils is not None:
            kutils.POISON_OUTPUTS = prev_py
        if prev_cpp is not None:
            torch.ops.fastlm_C.set_poison_outputs(prev_cpp)
