"""Finds the compiled extension fastlm._C, or JIT-builds it (FASTLM_JIT=1), or records why not.

Nothing here runs at `import fastlm`: the first op that wants the cpu or cuda backend calls `load()`.
Loading the library runs its TORCH_LIBRARY registrations, after which the kernels are reached as
torch.ops.fastlm_C.<name>.
"""
from __future__ import annotations

import glob
import os
import threading

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")


def _jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load (ninja), as setup.py would, into the torch
    extensions cache. Only used from a source checkout with FASTLM_JIT=1."""
    import torch
    from torch.utils import cpp_extension

    if not os.path.isdir(_CSRC):
        raise ImportError(f"FASTLM_JIT=1 but the sources are not at {_CSRC}")
    sources = [os.path.join(_CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    cflags = ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas", "-fopenmp"]  # see setup.py
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda:
        sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
        cflags.append("-DFASTLM_WITH_CUDA")
    return cpp_extension.load(
        name="fastlm_C_jit", sources=sources, extra_include_paths=[_CSRC], extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DFASTLM_WITH_CUDA"],
        extra_ldflags=["-fopenmp"], with_cuda=cuda, is_python_module=False, verbose=False,
    )


def load():
    """The loaded extension module, or None (see `error()` for why)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        try:
            import torch  # noqa: F401  (the extension links against libtorch)
            from fastlm import _C  # type: ignore[attr-defined]

            _state["module"] = _C
        except ImportError as e:
            if os.environ.get("FASTLM_JIT", "0") == "1":
                try:
                    _state["module"] = _jit_build() or True
                except Exception as jit_error:  # noqa: BLE001 - report any build failure as a reason
                    _state["error"] = f"JIT build failed: {jit_error}"
            else:
                _state["error"] = (f"fastlm._C is not built ({e}); run `pip install -e .` "
                                   "(or set FASTLM_JIT=1 to build it on first use)")
        _state["tried"] = True
    return _state["module"]


def error() -> str | None:
    load()
    return _state["error"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fastlm_C.<op> has a kernel for "CPU" or "CUDA"."""
    if load() is None:
        return False
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlm_C::{op}", dispatch_key)
    except RuntimeError:
        return False
