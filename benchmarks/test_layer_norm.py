"""pytest-benchmark over the LayerNorm cases (the same list `fastlm bench` runs)."""
import pytest

from bench_utils import case_params, run_case


@pytest.mark.parametrize("case", case_params("kernels", "layer_norm"))
def test_layer_norm(benchmark, request, case):
    run_case(benchmark, request, case)
