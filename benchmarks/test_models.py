"""pytest-benchmark over the "models" suite (the same cases `fastlm bench --suite models` runs): one test
per (case, contender). GPT-2 small / BERT-base are large on a CPU: use -k to pick shapes, e.g.
pytest benchmarks/test_models.py --benchmark-only -k "bert-inference-8x128"."""
import pytest
import torch

from bench_utils import device_and_dtype, time_callable
from fastlm.bench import registry

LABELS = ("hf eager", "hf sdpa", "fastlm:auto (patched)", "fastlm:auto (native)", "fastlm:reference (patched)",
          "fastlm:reference (native)", "fastlm:torch (patched)", "fastlm:torch (native)")
_current: dict = {}


def _params():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [pytest.param(c, label, id=f"{c.name.replace(' ', '-')}-{label.replace(' ', '_')}")
            for c in registry.cases("models", device) for label in LABELS]


@pytest.mark.parametrize("case,label", _params())
def test_models(benchmark, request, case, label):
    pytest.importorskip("transformers")
    device, dtype = device_and_dtype(request.config)
    key = (case.name, device, dtype)
    if _current.get("key") != key:                 # one case's models in memory at a time
        _current.clear()
        _current.update(key=key, bound=case.make(device, dtype))
        _current["errors"] = _current["bound"].check()
    bound = _current["bound"]
    if label not in bound.impls:
        pytest.skip(f"{label} is not a contender of {case.name}")
    benchmark.extra_info["max_err_vs_hf_eager"] = _current["errors"].get(label, 0.0)
    time_callable(benchmark, bound.impls[label], device, pedantic=True)
