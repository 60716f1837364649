"""Helpers shared by the Triton launchers: interpreter detection, block sizes and warp counts."""
from __future__ import annotations

import os

import triton

# Under TRITON_INTERPRET=1 (CPU tests) kernels run serially in numpy: bf16 arithmetic and bf16 tl.dot
# are broken there, so kernels upcast right after every load (cheap on GPU too for memory-bound ops).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(elements: int) -> int:
    """Warps for a program holding `elements` values: ~8-16 elements per thread."""
    if elements >= 32768:
        return 16
    if elements >= 8192:
        return 8
    if elements >= 2048:
        return 4
    if elements >= 512:
        return 2
    return 1


def num_programs_cap(device) -> int:
    """How many persistent programs fill the device (a few per SM); small under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 4
    import torch

    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


# Test hook (fastlm.testing.poison_outputs): launchers allocate outputs with `new_output`, which
# NaN-fills them while this is set, so an element a kernel forgets to write fails the parity tests.
POISON_OUTPUTS = False


def new_output(shape, *, like=None, dtype=None, device=None):
    import torch

    dtype = dtype or like.dtype
    device = device or like.device
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
