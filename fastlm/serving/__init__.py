"""The serving layer: fastlm.Engine (continuous batching over a paged KV cache) and its request types."""
from fastlm.serving.engine import Engine
from fastlm.serving.params import RequestOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput"]
