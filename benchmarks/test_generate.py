"""pytest-benchmark over the "generate" suite (the same cases `fastlm bench --suite generate` runs):
one test per case, timing fastlm's default choice ("fastlm:auto"). GPT-2 generation is
long on a CPU: pick cases with -k, e.g.
pytest benchmarks/test_generate.py --benchmark-only -k "generate-b1"."""
import pytest
import torch

from bench_utils import auto_label, device_and_dtype, record_auto, time_callable
from fastlm.bench import registry


def _params():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [pytest.param(c, id=c.name.replace(" ", "-")) for c in registry.cases("generate", device)]


@pytest.mark.parametrize("case", _params())
def test_generate(benchmark, request, case):
    if case.family == "generate":
        pytest.importorskip("transformers")
    device, dtype = device_and_dtype(request.config)
    bound = case.make(device, dtype)
    if bound.check is not None:
        benchmark.extra_info["errors"] = bound.check()
    label = auto_label(bound)
    time_callable(benchmark, bound.impls[label], device, pedantic=True)
    record_auto(benchmark, bound, label)
