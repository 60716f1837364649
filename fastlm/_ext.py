"""Finds the compiled extension fastlm._C, or JIT-builds it (FASTLM_JIT=1), or records why not.

Nothing here runs at `import fastlm`: the first op that wants the cpu or cuda backend calls `load()`.
Loading the library runs its TORCH_LIBRARY registrations, after which the kernels are reached as
torch.ops.fastlm_C.<name>.

On x86-64 the built extension is compiled for AVX2 + FMA + F16C (setup.py): on a CPU without them
it would die of SIGILL, so `load()` refuses it first, with the reason in `error()`, and every op
falls back to torch. (FASTLM_JIT=1 then builds a portable copy without those flags.)
"""
from __future__ import annotations

import glob
import os
import platform
import threading

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")


# The x86 features setup.py compiles the extension for (-mavx2 -mfma -mf16c).
X86_BUILD_FEATURES = ("avx2", "fma", "f16c")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


def missing_cpu_features() -> list[str]:
    """On x86-64, the features of X86_BUILD_FEATURES this CPU lacks ([] elsewhere or when all present).

    From /proc/cpuinfo's flags where there is one, and torch's cpuid-based capability (which also sees
    what an emulator such as `qemu-x86_64 -cpu <model>` offers; skipped when ATEN_CPU_CAPABILITY
    overrides it): a feature missing in either counts as missing."""
    if not _is_x86():
        return []
    missing: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    missing = [feat for feat in X86_BUILD_FEATURES if feat not in flags]
                    break
    except OSError:
        pass
    if not missing and "ATEN_CPU_CAPABILITY" not in os.environ:
        try:
            import torch

            cap = torch.backends.cpu.get_cpu_capability().upper()
        except Exception:  # noqa: BLE001 - no answer from torch: keep /proc/cpuinfo's
            cap = "AVX2"
        if not (cap.startswith("AVX2") or cap.startswith("AVX512")):
            missing = ["avx2", "fma"]
    return missing


def _jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load (ninja), as setup.py would, into the torch
    extensions cache. Only used from a source checkout with FASTLM_JIT=1."""
    import torch
    from torch.utils import cpp_extension

    if not os.path.isdir(_CSRC):
        raise ImportError(f"FASTLM_JIT=1 but the sources are not at {_CSRC}")
    sources = [os.path.join(_CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    cflags = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-unknown-pragmas", "-fopenmp"]  # see setup.py
    if _is_x86() and not missing_cpu_features():  # as setup.py; otherwise a portable (at::vec generic) build
        cflags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
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

            missing = missing_cpu_features()
            if missing:
                raise ImportError(f"fastlm._C is built for x86-64 with AVX2+FMA+F16C; this CPU lacks "
                                  f"{', '.join(missing)}, so fastlm's CPU kernels are off and every op uses torch")
            from fastlm import _C  # type: ignore[attr-defined]

            _state["module"] = _C
        except ImportError as e:
            if os.environ.get("FASTLM_JIT", "0") == "1":
                try:
                    _state["module"] = _jit_build() or True
                except Exception as jit_error:  # noqa: BLE001 - report any build failure as a reason
                    _state["error"] = f"JIT build failed: {jit_error}"
            else:
                _state["error"] = (f"{e}; FASTLM_JIT=1 builds a portable copy on first use" if missing_cpu_features()
                                   else f"fastlm._C is not built ({e}); run `pip install -e .` "
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
