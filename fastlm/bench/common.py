"""Helpers shared by the case modules: which fastlm backends to benchmark, element sizes, and
parity against the fp64 reference.

Every case times "fastlm:auto" (the default choice: what users get) beside each forced backend
("fastlm:cpu", "fastlm:cuda", "fastlm:triton", "fastlm:torch", ...); the runner records which backend
auto picked for each op the auto row ran (fastlm.backends.last_choice)."""
from __future__ import annotations

import os

import torch

import fastlm


AUTO = "fastlm:auto"          # the label of the default-choice row in every case


def bench_backends(op: str, device: torch.device) -> list[str]:
    """"auto" (the default choice), then fastlm's backends for `op` on `device` (its kernels and, where
    fastlm has it, the "torch" backend: torch's own op through fastlm's dispatch), minus the reference
    (a baseline of its own) and minus Triton under the CPU interpreter (correct but not a speed
    contender). Label each as f"fastlm:{backend}" and run it under fastlm.use_backend(backend)."""
    return ["auto"] + [b for b in fastlm.available_backends(op, device.type)
                       if b != "reference" and not (b == "triton" and device.type == "cpu")]


# The weights the fastlm models of the models/generate suites run with (`fastlm bench --weights`).
WEIGHTS_CHOICES = ("fp32", "bf16", "int8")
_weights = ["fp32", None]            # weights, activations (None, or "int8" with int8 weights: W8A8)


def set_weights(weights: str, activations: str | None = None) -> None:
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    if activations not in (None, "int8") or (activations is not None and weights != "int8"):
        raise ValueError(f"activations must be None, or 'int8' with int8 weights; got {activations!r} "
                         f"with weights {weights!r}")
    _weights[:] = [weights, activations]


def weights() -> str:
    return _weights[0]


def activations() -> str | None:
    return _weights[1]


def quantize_or_error(model, weights: str, activations: str | None = None):
    """fastlm.quantize(model, weights=..., activations=...) in place; a clear error where this build has
    no fastlm.quantize."""
    quantize = getattr(fastlm, "quantize", None)
    if quantize is None:
        raise RuntimeError(f"--weights {weights}: this fastlm build has no fastlm.quantize (int8/bf16 weights)")
    return quantize(model, weights=weights) if activations is None else \
        quantize(model, weights=weights, activations=activations)


def apply_weights(model):
    """The fastlm model with the run's weights: unchanged for fp32, else fastlm.quantize'd."""
    w = weights()
    return model if w == "fp32" else quantize_or_error(model, w, activations())


def max_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return (out.detach().double() - oracle.detach().double()).abs().max().item()


def inductor_cache_for_capability() -> None:
    """Under ATEN_CPU_CAPABILITY (the emulated-AVX2 benchmark runs) with no TORCHINDUCTOR_CACHE_DIR of
    the user's: point inductor at a cache of its own for that capability. Inductor's cache does not key
    on ATEN_CPU_CAPABILITY: a CPU kernel compiled under ATEN_CPU_CAPABILITY=avx2 and then loaded by a
    native AVX-512 process corrupted the heap here (torch 2.14.1: "double free or corruption" in a
    torch.compile'd LayerNorm, reproduced without fastlm)."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        import getpass
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_cap_{cap.lower()}")


def compile_or_none(fn):
    """torch.compile(fn), or None where inductor cannot run here (reported as a missing contender) or
    FASTLM_BENCH_COMPILE=0 (inductor's compile costs ~10-30 s a case: skipped when device time is short).
    Under ATEN_CPU_CAPABILITY, inductor's cache is kept apart (inductor_cache_for_capability)."""
    if os.environ.get("FASTLM_BENCH_COMPILE", "1") == "0":
        return None
    inductor_cache_for_capability()
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001
        return None
