"""pytest-benchmark over the GELU feed-forward cases (the same list `fastlm bench` runs)."""
import pytest

from bench_utils import case_params, run_case


@pytest.mark.parametrize("case", case_params("kernels", "gelu_ffn"))
def test_gelu_ffn(benchmark, request, case):
    run_case(benchmark, request, case)
