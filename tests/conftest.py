"""Test session set-up. TRITON_INTERPRET must be set before triton is first imported: without a GPU
the Triton kernels run on CPU tensors under the interpreter. HF hub access is off (no network). The
auto-tuning cache lives in a temporary directory for the session."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The measured "auto" caches its choices on disk: the tests use a fresh per-session directory, never
# the user's ~/.cache/fastlm (tests that need a particular kernel force it with fastlm.use_backend).
if "FASTLM_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="fastlm-test-cache-")
    os.environ["FASTLM_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, True)
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda_error() -> str | None:
    """The sticky CUDA error of this process, if a kernel faulted (None when CUDA is unused or healthy)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001  (an illegal address, a device-side assert: the context is dead)
        return str(e).splitlines()[0]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(0)
    yield
    # A device fault kills this process's CUDA context: every later test would error on setup. Fail loudly
    # naming the test that faulted and end the process (under pytest-xdist the worker is replaced and the
    # remaining tests still run; a serial run stops here rather than report hundreds of false errors).
    err = _cuda_error()
    if err is not None:
        sys.stderr.write(f"\nFATAL: CUDA context lost during {request.node.nodeid}: {err}\n")
        sys.stderr.flush()
        os._exit(70)
