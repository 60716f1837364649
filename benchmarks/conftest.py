"""pytest-benchmark entry points over fastlm's benchmark cases (fastlm/bench/cases_*.py).
Run: pytest benchmarks/ --benchmark-only [--device cuda] [-k layer_norm]."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.addoption("--dtype", default=None, help="float32, float16 or bfloat16")
