"""Builds fastlm and its extension fastlm._C from csrc/.

- The C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built.
- The CUDA kernels (csrc/cuda/*.cu and their registrations csrc/cuda/*.cpp) are added when torch is a
  CUDA build and an nvcc is found (CUDA_HOME, else /usr/local/cuda). No GPU is needed to build.
- FASTLM_BUILD_EXT=0 skips the extension (pure Python + Triton install).
- FASTLM_CUDA_ARCHS picks the targets (default "8.0;9.0"; TORCH_CUDA_ARCH_LIST is honoured when set).
- kernels/ (the Triton kernels) is shipped as the subpackage fastlm.kernels, never as a top-level
  `kernels` module (that name belongs to a PyPI package which transformers probes).

setup.py compiles csrc/ and nothing else: it never fetches or installs other code.
"""
import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _nvidia_wheel_includes():
    """Headers shipped in torch's nvidia-* wheels (cuBLAS, cuSPARSE...), for minimal toolkits."""
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return []
    out = []
    for base in getattr(__import__("nvidia"), "__path__", []):
        for sub in ("cu13/include", "cu12/include"):
            p = os.path.join(base, sub)
            if os.path.isdir(p):
                out.append(p)
    return out


def _extensions():
    if os.environ.get("FASTLM_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-unknown-pragmas"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec picks its AVX2 specialisations from these macros; AVX2+FMA is every x86 server since 2013.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is header code (ATen/ParallelOpenMP.h): without -fopenmp its
        # `#pragma omp parallel` is ignored and every CPU kernel runs on one thread. The soname
        # libgomp.so.1 is the one torch loads, so the process keeps a single OpenMP runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]

    cuda_home = _cuda_home()
    # FASTLM_BUILD_CUDA=0 builds the CPU kernels only (fast iteration on the CPU code).
    with_cuda = (torch.version.cuda is not None and cuda_home is not None
                 and os.environ.get("FASTLM_BUILD_CUDA", "1") != "0")
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        archs = os.environ.get("FASTLM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        macros.append(("FASTLM_WITH_CUDA", None))
        include_dirs += _nvidia_wheel_includes()
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "fastlm._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastlm._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    print(f"fastlm: building fastlm._C with {'CPU + CUDA (' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU only'} kernels")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["fastlm", "fastlm.ops", "fastlm.nn", "fastlm.models", "fastlm.integrations", "fastlm.bench", "fastlm.serving",
              "fastlm.kernels"],
    package_dir={"fastlm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
