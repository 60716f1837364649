"""pytest-benchmark over the "serve" suite (fastlm/bench/cases_serve.py, where this build has it): one test
per case, timing its fastlm:auto row (else its first fastlm row)."""
import pytest
import torch

from bench_utils import auto_label, device_and_dtype, record_auto, time_callable
from fastlm.bench import registry


def _params():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = registry.cases("serve", device)
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no serve cases in this build "
                                                                   "(fastlm/bench/cases_serve.py)"))]
    return [pytest.param(c, id=c.name.replace(" ", "-")) for c in cases]


@pytest.mark.parametrize("case", _params())
def test_serve(benchmark, request, case):
    device, dtype = device_and_dtype(request.config)
    bound = case.make(device, dtype)
    if bound.check is not None:
        benchmark.extra_info["errors"] = bound.check()
    label = auto_label(bound)
    time_callable(benchmark, bound.impls[label], device, pedantic=True)
    record_auto(benchmark, bound, label)
