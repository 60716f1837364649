"""A short smoke of fastlm's CPU path, for a process run under an emulated AVX2-only CPU
(`qemu-x86_64 -cpu Haswell python scripts/qemu_smoke.py`, scripts/qemu_smoke.sh): a dependence on the
host's ISA -- in fastlm's kernels or in what they call in torch (oneDNN, at::vec) -- raises SIGILL or a
RuntimeError here, whatever the CI host has. Kept tiny (torch's import alone takes ~50 s emulated):

- the ISA path fastlm reports is not AVX-512 (proves the emulation took);
- gelu_ffn and linear_gelu on the cpu backend (forward + backward) against fastlm.ops.reference;
- tiny Hugging Face GPT-2 and BERT: fastlm.patch'ed forward + backward against the unpatched model;
- an 8-token greedy fastlm.generate equal to HF's greedy generate;
- the int8 linear and the paged attention of the serving engine on the cpu backend against the reference.
Exits non-zero on the first failure; prints one line per check.
"""
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
T0 = time.time()

import torch  # noqa: E402

import fastlm  # noqa: E402
from fastlm import backends, ops  # noqa: E402
from fastlm.ops import reference as ref  # noqa: E402


def say(msg: str) -> None:
    print(f"qemu_smoke [{time.time() - T0:6.1f} s] {msg}", flush=True)


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1.0)
    if not err <= tol * scale:           # also catches NaN
        raise AssertionError(f"{name}: max abs error {err:.3g} > {tol * scale:.3g}")
    say(f"ok  {name} (max abs error {err:.2g})")


def check_isa() -> None:
    isa = backends.cpu_isa()
    say(f"fastlm cpu ISA path: {isa}")
    if "avx512" in isa and os.environ.get("FASTLM_SMOKE_ALLOW_AVX512") != "1":
        raise AssertionError(f"expected an AVX2-only CPU (qemu -cpu Haswell), fastlm reports {isa!r}")
    if "cpu" not in fastlm.available_backends("gelu_ffn", "cpu"):
        raise AssertionError("the C++ extension did not load: no cpu backend for gelu_ffn")


def check_gelu_ffn() -> None:
    g = torch.Generator().manual_seed(0)
    M, K, F_, N = 37, 64, 131, 48
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w1 = (torch.randn(F_, K, generator=g) / K ** 0.5).requires_grad_()
    b1 = torch.randn(F_, generator=g).requires_grad_()
    w2 = (torch.randn(N, F_, generator=g) / F_ ** 0.5).requires_grad_()
    b2 = torch.randn(N, generator=g).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    params = (x, w1, b1, w2, b2)
    with fastlm.use_backend("cpu"):
        y = ops.gelu_ffn(x, w1, b1, w2, b2, approximate="tanh")
        grads = torch.autograd.grad(y, params, dy)
    want, _ = ref.gelu_ffn_fwd_ref(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), "tanh", False)
    close("gelu_ffn fwd (cpu vs reference)", y, want)
    xs = [p.detach().double().requires_grad_() for p in params]
    h = torch.nn.functional.gelu(torch.nn.functional.linear(xs[0], xs[1], xs[2]), approximate="tanh")
    wgrads = torch.autograd.grad(torch.nn.functional.linear(h, xs[3], xs[4]), xs, dy.double())
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, wgrads):
        close(f"gelu_ffn bwd {name}", a, b)
    with fastlm.use_backend("cpu"):
        yl = ops.linear_gelu(x.detach(), w1.detach(), b1.detach())
    wl, _ = ref.linear_gelu_fwd_ref(x.detach(), w1.detach(), b1.detach(), "none", False)
    close("linear_gelu fwd (cpu vs reference)", yl, wl)


def check_int8_and_paged() -> None:
    from fastlm.ops import paged_attention as pa
    from fastlm.ops.linear_int8 import linear_int8_fwd_ref

    g = torch.Generator().manual_seed(2)
    qw = torch.randint(-127, 128, (67, 259), generator=g, dtype=torch.int8)
    scale = torch.rand(67, generator=g) * 1e-2
    for rows in (1, 5, 40):
        x = torch.randn(rows, 259, generator=g)
        with fastlm.use_backend("cpu"):
            y = ops.linear_int8(x, qw, scale)
        close(f"linear_int8 {rows}x259->67 (cpu vs reference)", y, linear_int8_fwd_ref(x, qw, scale, None))
    q = torch.randn(5, 4, 32, generator=g)
    kc, vc = torch.randn(6, 2, 16, 32, generator=g), torch.randn(6, 2, 16, 32, generator=g)
    bt = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    si = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)
    kl = torch.tensor([1, 17, 48, 33, 2], dtype=torch.int32)
    with fastlm.use_backend("cpu"):
        y = pa.paged_attention(q, kc, vc, bt, si, kl)
    close("paged_attention (cpu vs reference)", y, pa.paged_attention_fwd_ref(q, kc, vc, bt, si, kl, 32 ** -0.5))


def check_models() -> None:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gcfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64,
                      bos_token_id=0, eos_token_id=0)
    bcfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      vocab_size=97, max_position_embeddings=64)
    for name, cls, cfg in (("gpt2", GPT2LMHeadModel, gcfg), ("bert", BertModel, bcfg)):
        base = cls(cfg).eval()
        mine = cls(cfg).eval()
        mine.load_state_dict(base.state_dict())
        fastlm.patch(mine)
        ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
        outs = []
        for m, backend in ((base, "auto"), (mine, "cpu")):
            m.zero_grad()
            with fastlm.use_backend(backend):   # the patched model on fastlm's C++ kernels (auto may
                o = m(input_ids=ids)            # pick torch at these tiny shapes)
            y = o.logits if name == "gpt2" else o.last_hidden_state
            y.float().square().mean().backward()
            g = next(p for p in m.parameters() if p.grad is not None and p.dim() == 2).grad
            outs.append((y.detach(), g.clone()))
        close(f"{name} patched forward vs unpatched", outs[1][0], outs[0][0], 1e-4)
        close(f"{name} patched backward vs unpatched", outs[1][1], outs[0][1], 1e-3)
        if name == "gpt2":
            prompt = ids[:1, :7]
            want = base.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
            with fastlm.use_backend("cpu"):
                got = fastlm.generate(base, prompt, max_new_tokens=8)
            if not torch.equal(got, want):
                raise AssertionError(f"8-token greedy generate differs from HF: {got.tolist()} vs {want.tolist()}")
            say("ok  8-token greedy fastlm.generate == HF generate")


def main() -> int:
    say(f"torch {torch.__version__}, fastlm {fastlm.__version__}, python {sys.version.split()[0]}")
    check_isa()
    check_gelu_ffn()
    check_int8_and_paged()
    check_models()
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
