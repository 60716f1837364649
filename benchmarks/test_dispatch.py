"""pytest-benchmark over the dispatch-overhead cases (an op's auto cache hit vs its kernel called directly)."""
import pytest

from bench_utils import case_params, run_case


@pytest.mark.parametrize("case", case_params("kernels", "dispatch"))
def test_dispatch(benchmark, request, case):
    run_case(benchmark, request, case)
