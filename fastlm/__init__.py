"""fastlm: fused kernels (Triton, CUDA, C++ CPU) for transformer language models.

    import fastlm
    from fastlm import ops, nn
    y = ops.layer_norm(x, (768,), w, b)          # == F.layer_norm, on the fastest backend present
    with fastlm.use_backend("triton"): ...        # force one backend
    fastlm.available_backends("layer_norm", "cuda")

Importing fastlm never compiles anything and imports neither triton nor the C++ extension: both
are resolved by the first call that needs them (fastlm info says what is available and why not).
"""
from fastlm import nn, ops
from fastlm.backends import BackendUnavailableError, FallbackWarning, available_backends, use_backend
from fastlm import models  # noqa: E402
from fastlm.integrations.hf import patch, unpatch  # noqa: E402
from fastlm.generation import generate  # noqa: E402
from fastlm.integrations import hf as _hf  # noqa: E402

_hf.install_import_hook()  # registers attn_implementation="fastlm" once transformers is imported

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "patch", "unpatch", "generate", "available_backends", "use_backend", "BackendUnavailableError", "FallbackWarning",
           "__version__"]
