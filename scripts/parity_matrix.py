"""A compact parity matrix of every fastlm kernel backend on one device, in one process.

For each op, odd shape, dtype and kernel backend ("cuda", "triton", "cpu"; not "torch"/"reference"),
the op's forward (and, where it has one, backward) is compared with the fp64 reference on the CPU
(`fastlm.use_backend("reference")` on fp64 copies) under the parity rule of tests/helpers.py: max
error <= 2x (outputs) / 3x (gradients) the error of torch's own op in that dtype, plus a floor.
Outputs are NaN-poisoned first. It is the GPU session's first look (scripts/gpu_check.sh quick):
the full test suite does not fit the device time; this does, in about a minute.

A CUDA fault (illegal access) kills the context: the rows after it are reported "not run".
Usage: python scripts/parity_matrix.py [--device cuda|cpu] [--json PATH]
  (on CPU: TRITON_INTERPRET=1 for the Triton rows; bf16 is skipped there, the interpreter's is broken)
Exit status: 0 when every row that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import paged_attention as pa
from fastlm.testing import poison_outputs

ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
KERNEL_BACKENDS = ("cuda", "triton", "cpu")


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# Each case: (op name for available_backends, label, make(g) -> dict of fp64 CPU tensors,
#             fn(**tensors) -> output tensor, names of the inputs to differentiate (empty: forward only))
def _cases():
    out = []

    def ln(t):
        return ops.layer_norm(t["x"], (t["x"].shape[-1],), t["w"], t["b"], eps=1e-5)
    out.append(("layer_norm", "layer_norm 257x771", lambda g: dict(x=_rand(g, 257, 771), w=_rand(g, 771),
                                                                     b=_rand(g, 771)), ln, ("x", "w", "b")))

    def aln(t):
        return ops.add_layer_norm(t["x"], t["r"], (t["x"].shape[-1],), t["w"], t["b"])[0]
    out.append(("add_layer_norm", "add_layer_norm 131x768", lambda g: dict(
        x=_rand(g, 131, 768), r=_rand(g, 131, 768), w=_rand(g, 768), b=_rand(g, 768)), aln, ("x", "r", "w")))

    for causal in (False, True):
        def sdpa(t, causal=causal):
            return ops.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)
        out.append(("scaled_dot_product_attention", f"attention 2x3x129x80{' causal' if causal else ''}",
                    lambda g: dict(q=_rand(g, 2, 3, 129, 80), k=_rand(g, 2, 3, 129, 80), v=_rand(g, 2, 3, 129, 80)),
                    sdpa, ("q", "k", "v")))

    def sdpa_mask(t):
        return ops.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["m"])
    out.append(("scaled_dot_product_attention", "attention 2x4x37x70x64 additive mask", lambda g: dict(
        q=_rand(g, 2, 4, 37, 64), k=_rand(g, 2, 4, 70, 64), v=_rand(g, 2, 4, 70, 64), m=_rand(g, 2, 1, 37, 70)),
        sdpa_mask, ("q", "k", "v")))

    def lg(t):
        return ops.linear_gelu(t["x"], t["w"], t["b"], approximate="tanh")
    out.append(("linear_gelu", "linear_gelu 67x200->333 tanh", lambda g: dict(
        x=_rand(g, 67, 200), w=_rand(g, 333, 200, scale=200 ** -0.5), b=_rand(g, 333)), lg, ("x", "w", "b")))

    def ffn(t):
        return ops.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"])
    out.append(("gelu_ffn", "gelu_ffn 67x200->333->129", lambda g: dict(
        x=_rand(g, 67, 200), w1=_rand(g, 333, 200, scale=200 ** -0.5), b1=_rand(g, 333),
        w2=_rand(g, 129, 333, scale=333 ** -0.5), b2=_rand(g, 129)), ffn, ("x", "w1", "b2")))

    def dec(t):
        return ops.decode_attention(t["q"], t["k"], t["v"], t["lens"])
    out.append(("decode_attention", "decode_attention 3x8(kv2)x300x64 ragged", lambda g: dict(
        q=_rand(g, 3, 8, 64), k=_rand(g, 3, 2, 300, 64), v=_rand(g, 3, 2, 300, 64),
        lens=torch.tensor([1, 157, 300])), dec, ()))

    def i8(t):
        return ops.linear_int8(t["x"], t["qw"], t["s"], t["b"])
    out.append(("linear_int8", "linear_int8 5x259->131", lambda g: dict(
        x=_rand(g, 5, 259), qw=torch.randint(-127, 128, (131, 259), generator=g, dtype=torch.int8),
        s=(_rand(g, 131).abs() * 1e-2).float(), b=_rand(g, 131)), i8, ()))
    out.append(("linear_int8", "linear_int8 300x259->131", lambda g: dict(
        x=_rand(g, 300, 259), qw=torch.randint(-127, 128, (131, 259), generator=g, dtype=torch.int8),
        s=(_rand(g, 131).abs() * 1e-2).float(), b=_rand(g, 131)), i8, ()))

    def paged(t):
        return pa.paged_attention(t["q"], t["kc"], t["vc"], t["bt"], t["si"], t["kl"])
    out.append(("paged_attention", "paged_attention 7 tokens, 12 blocks of 16, H8/Hkv2 D64", lambda g: dict(
        q=_rand(g, 7, 8, 64), kc=_rand(g, 12, 2, 16, 64), vc=_rand(g, 12, 2, 16, 64),
        bt=torch.tensor([[3, 0, 7, 1], [5, 11, 2, 9]], dtype=torch.int32),
        si=torch.tensor([0, 1, 1, 1, 0, 1, 0], dtype=torch.int32),
        kl=torch.tensor([1, 17, 33, 64, 50, 5, 0], dtype=torch.int32)), paged, ()))
    # few tokens, one long context: the cuda backend's key split (chunks of >= 128 keys) and merge
    out.append(("paged_attention", "paged_attention 3 tokens x 1000 keys (split) D80",
                lambda g: dict(q=_rand(g, 3, 8, 80), kc=_rand(g, 70, 2, 16, 80), vc=_rand(g, 70, 2, 16, 80),
                               bt=torch.randperm(70, generator=g)[:64].to(torch.int32).reshape(1, 64),
                               si=torch.zeros(3, dtype=torch.int32),
                               kl=torch.tensor([1000, 1, 0], dtype=torch.int32)), paged, ()))
    return out


def _to(t: dict, device, dtype) -> dict:
    # fp64 tensors take the run's dtype; others (int ids, the int8 linear's fp32 scales) keep theirs
    return {k: (v.to(device, dtype) if v.dtype == torch.float64 else v.to(device)) for k, v in t.items()}


def _run(fn, t: dict, grad_names, backend: str, dy=None):
    t = {k: (v.detach().requires_grad_(k in grad_names) if v.is_floating_point() else v) for k, v in t.items()}
    with fastlm.use_backend(backend), poison_outputs(backend not in ("reference", "torch")):
        y = fn(t)
        grads = []
        if grad_names:
            grads = torch.autograd.grad(y, [t[n] for n in grad_names], dy.to(y.device, y.dtype))
    return y.detach(), [g.detach() for g in grads]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if bool((torch.isnan(a) & ~torch.isnan(b)).any()):
        return math.inf
    return (a - b).abs().max().item() if a.numel() else 0.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    interp = dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    rows, dead = [], None
    t0 = time.time()
    for op, label, make, fn, grad_names in _cases():
        g = torch.Generator().manual_seed(0)
        base = make(g)
        kernel_backends = [b for b in fastlm.available_backends(op, dev.type) if b in KERNEL_BACKENDS]
        if not kernel_backends:
            continue
        y64, _ = _run(fn, base, (), "reference")
        dy = _rand(g, *y64.shape)
        y64, g64 = _run(fn, base, grad_names, "reference", dy) if grad_names else (y64, [])
        baseline = "torch" if "torch" in fastlm.available_backends(op, dev.type) else "reference"
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if dead is None:
                try:
                    yb, gb = _run(fn, _to(base, dev, dtype), grad_names, baseline, dy)
                except Exception:  # noqa: BLE001
                    yb, gb = None, []
            for backend in kernel_backends:
                row = dict(op=op, case=label, dtype=str(dtype)[6:], backend=backend)
                rows.append(row)
                if backend == "triton" and interp and dtype == torch.bfloat16:
                    row.update(status="skip", why="bf16 under the Triton interpreter")
                    continue
                if dead is not None:
                    row.update(status="not run", why=f"CUDA context lost at {dead}")
                    continue
                try:
                    y, gs = _run(fn, _to(base, dev, dtype), grad_names, backend, dy)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    row.update(status="FAIL", why=msg)
                    if dev.type == "cuda" and ("illegal" in msg or "CUDA error" in msg):
                        dead = f"{label} {backend} {dtype}"
                    continue
                checks = [("out", y, y64, yb, 2.0)] + [
                    (f"d{n}", a, r, (gb[i] if i < len(gb) else None), 3.0)
                    for i, (n, a, r) in enumerate(zip(grad_names, gs, g64))]
                worst, parts = "pass", []
                for name, got, want, tb, factor in checks:
                    err = _err(got, want)
                    tol = factor * (_err(tb, want) if tb is not None else 0.0) + ATOL[dtype] * max(
                        1.0, want.abs().max().item())
                    parts.append(f"{name} {err:.2e}/{tol:.2e}")
                    if not err <= tol:
                        worst = "FAIL"
                row.update(status=worst, why="; ".join(parts))
    ran = [r for r in rows if r["status"] in ("pass", "FAIL")]
    for r in rows:
        print(f"{r['status']:7s} {r['backend']:6s} {r['dtype']:8s} {r['case']:48s} {r.get('why', '')}")
    bad = [r for r in rows if r["status"] in ("FAIL", "not run")]
    print(f"parity_matrix: {len(ran) - sum(r['status'] == 'FAIL' for r in ran)}/{len(ran)} passed, "
          f"{len(bad)} failed or not run, on {dev} in {time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(dev), rows=rows), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
