"""fastlm: fused kernels (Triton, CUDA, C++ CPU) for transformer language models.

    import fastlm
    from fastlm import ops, nn
    y = ops.layer_norm(x, (768,), w, b)          # == F.layer_norm, on the fastest backend present
    with fastlm.use_backend("triton"): ...        # force one backend
    fastlm.available_backends("layer_norm", "cuda")
    model = fastlm.patch(hf_model)                # Hugging Face GPT-2 / BERT, in place
    tokens = fastlm.generate(fastlm.models.GPT2.from_hf(hf_model), input_ids)

Importing fastlm never compiles anything and imports neither triton, transformers nor the C++
extension: each is resolved by the first call that needs it (`fastlm info` says what is available
and why not).
"""
from fastlm import models, nn, ops
from fastlm.backends import BackendUnavailableError, FallbackWarning, available_backends, use_backend
from fastlm.generation import generate
from fastlm.integrations import hf as _hf
from fastlm.integrations.hf import patch, unpatch

_hf.install_import_hook()  # registers attn_implementation="fastlm" once transformers is imported

__version__ = "0.1.0"


def quantize(model, weights: str = "int8", group_size=None, activations=None):
    """fastlm.quantize(model, weights="int8"|"bf16", group_size=None, activations=None|"int8") -> model, in
    place: int8 (per-output-channel fp32 scales, or per group of inputs) or bf16 weights for every
    projection of a fastlm GPT2/Bert or a transformers GPT-2/BERT model; activations="int8" adds W8A8
    (int8 activations, int32 GEMM) for calls of 2+ rows (see fastlm.quant)."""
    from fastlm.quant import quantize as _quantize

    return _quantize(model, weights=weights, group_size=group_size, activations=activations)


def __getattr__(name: str):
    # fastlm.Engine, fastlm.SamplingParams: imported on first use (import fastlm stays cheap)
    if name in ("Engine", "SamplingParams"):
        from fastlm import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


__all__ = ["ops", "nn", "models", "patch", "unpatch", "generate", "available_backends", "use_backend",
           "BackendUnavailableError", "FallbackWarning", "quantize", "Engine", "SamplingParams",
           "__version__"]
