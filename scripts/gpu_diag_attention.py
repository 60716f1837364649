"""GPU diagnosis of the Triton attention kernels, one autotune config at a time (scripts/gpu_check.sh diag).

Each (kernel, config) runs in its own process with CUDA_LAUNCH_BLOCKING=1, so a faulting config cannot
poison the others; the first faulting one is rerun under compute-sanitizer (memcheck) to name the kernel
and the access. Cases are the parity-test shapes that stress padding (head dims that are not powers of
two, Dv != D, Sq/Sk off the block size).
    python scripts/gpu_diag_attention.py            # driver
    python scripts/gpu_diag_attention.py one fwd 2  # child: forward kernel with config 2 only
"""
import os
import subprocess
import sys

CASES = [  # (B, H, Hkv, Sq, Sk, D, Dv, pad mask, causal)
    (1, 2, 2, 33, 70, 40, 24, True, False),
    (1, 1, 1, 7, 130, 256, 256, False, False),
    (1, 2, 2, 127, 1, 64, 64, False, True),
    (3, 4, 2, 70, 300, 40, 40, True, False),
]


def child(which: str, idx: int) -> None:
    import torch

    import fastlm
    from fastlm import ops
    from fastlm.kernels import attention as ka

    kernels = {"fwd": ka._attn_fwd_kernel, "dkdv": ka._attn_bwd_dkdv_kernel, "dq": ka._attn_bwd_dq_kernel}
    for name, k in kernels.items():  # the kernel under test with config idx, the others with their smallest
        k.configs = [k.configs[idx if name == which else -1]]
    kern = kernels[which]
    for case in CASES:
        B, H, Hkv, Sq, Sk, D, Dv, pad, causal = case
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, Sq, D, generator=g).cuda().half().requires_grad_()
        k = torch.randn(B, Hkv, Sk, D, generator=g).cuda().half().requires_grad_()
        v = torch.randn(B, Hkv, Sk, Dv, generator=g).cuda().half().requires_grad_()
        mask = None
        if pad:
            lens = torch.randint(1, Sk + 1, (B,), generator=g)
            lens[0] = Sk
            mask = (torch.arange(Sk)[None, :] < lens[:, None]).view(B, 1, 1, Sk).cuda()
        with fastlm.use_backend("triton"):
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                               is_causal=causal, enable_gqa=H != Hkv)
        err = (out.float() - ref).abs().max().item()
        print(f"  {which} cfg {idx} {kern.configs[0]} case {case}: out err {err:.2e}", flush=True)


def main() -> int:
    from fastlm.kernels import attention as ka

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    faults = []
    for which, kern in (("fwd", ka._attn_fwd_kernel), ("dkdv", ka._attn_bwd_dkdv_kernel), ("dq", ka._attn_bwd_dq_kernel)):
        for idx in range(len(kern.configs)):
            r = subprocess.run([sys.executable, __file__, "one", which, str(idx)], env=env, capture_output=True,
                               text=True, timeout=120)
            status = "ok" if r.returncode == 0 else "FAULT"
            print(f"{which} config {idx} ({kern.configs[idx]}): {status}", flush=True)
            if r.returncode != 0:
                print(r.stdout[-1500:], r.stderr[-1500:])
                faults.append((which, idx))
    if faults:
        which, idx = faults[0]
        print(f"== compute-sanitizer on {which} config {idx}", flush=True)
        r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5", sys.executable, __file__,
                            "one", which, str(idx)], env=env, capture_output=True, text=True, timeout=240)
        print(r.stdout[-6000:], r.stderr[-2000:])
    print(f"attention diag: {len(faults)} faulting (kernel, config) pairs: {faults}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
