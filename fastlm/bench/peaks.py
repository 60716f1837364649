"""Device peaks measured at the start of a run: copy bandwidth (GB/s, counting read + write) and
dense matmul throughput (TFLOP/s), the denominators of the "% of peak" columns."""
from __future__ import annotations

import torch

from fastlm.bench.timer import time_fn


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    if device.type == "cuda":
        n_copy, n_mm = 256 * 1024 * 1024, 8192
    else:
        n_copy, n_mm = 256 * 1024 * 1024, 2048  # 256 MB: DRAM, not cache; dst allocated once
    src = torch.randn(n_copy // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    copy_gbs = 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    t = time_fn(lambda: a @ b, device, quick)
    mm_tflops = 2 * n_mm**3 / (t.median_ms * 1e-3) / 1e12
    return {"copy_gbs": copy_gbs, "matmul_tflops": mm_tflops, "matmul_dtype": str(mm_dtype).replace("torch.", ""),
            "copy_bytes": 2 * src.numel() * 4, "matmul_n": n_mm}
