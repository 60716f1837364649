"""pytest-benchmark over the attention cases (the same list `fastlm bench` runs)."""
import pytest

from bench_utils import case_params, run_case


@pytest.mark.parametrize("case", case_params("kernels", "attention"))
def test_attention(benchmark, request, case):
    run_case(benchmark, request, case)
