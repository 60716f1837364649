"""Suite "generate": end-to-end generation, prefill and decode steps, decode_attention and the
few-row linear, for GPT-2 small / medium shapes with random weights.

- "gpt2 generate bB pP nN": greedy generation of N new tokens after a P-token prompt, B rows;
  tokens = B * N new tokens (tokens/s over the whole call, prefill included, as HF's numbers are).
  Contenders: "hf eager" (baseline), "hf sdpa", "hf static+compile" (CUDA only: its static cache
  and torch.compile'd forward), "fastlm:auto" (fastlm.generate on the native GPT-2 of the same weights,
  the default backend choice; `--weights` int8/bf16 quantizes it).
  Peers (fastlm/bench/peers.py, where installed: `pip install fastlm[peers]`): "ctranslate2 fp32" and
  "ctranslate2 int8" on the same weights (CPU). Parity: the number of tokens that differ from "hf sdpa"
  (0 expected in fp32; int8 rows differ where the quantized logits pick another token).
- "gpt2 prefill bB pP" / "gpt2 decode step bB ctxP": the two phases alone (HF: forward with a cache;
  fastlm: GPT2.prefill / GPT2.decode_step under "auto", and with every op forced to "torch" where
  fastlm has that backend); tokens/s.
- "decode_attention bB hH kvK sS dD": GB/s (K and V rows read up to each row's length) against the
  reference and torch's SDPA over a masked cache.
- "linear_argmax MxK->N": the greedy pick over GPT-2's LM head: F.linear + argmax, ops.linear +
  argmax, and "fastlm:auto" = ops.linear_argmax through the int8 screen (CPU fp32); GB/s of the fp32
  weight (what a full product reads, so the screened rate is an effective one); check: index
  mismatches against the fp64 argmax.
- "linear MxK->N": the decode-step GEMM, GB/s of weights read (from memory: calls rotate over copies
  that overflow the cache), against F.linear and a plain read of the same bytes (w.sum(): the
  machine's read bandwidth, so fastlm's share of it reads off the table).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench import peers
from fastlm.bench.common import AUTO, apply_weights, bench_backends, max_err
from fastlm.bench.registry import Bound, Case, register
from fastlm.ops import reference
from fastlm.ops.decode import decode_attention_unchecked

_SIZES = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12), "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16)}
_models: dict = {}


def _hf_model(size: str, device, dtype, attn: str):
    """A transformers GPT2LMHeadModel with random weights (seed 0), cached per (size, device, dtype,
    attention implementation): every contender runs the same weight values."""
    key = (size, str(device), dtype, attn)
    if key not in _models:
        from transformers import GPT2Config, GPT2LMHeadModel

        _models.clear() if len(_models) > 3 else None
        cfg = GPT2Config(n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256,
                         **_SIZES[size])
        cfg._attn_implementation = attn
        torch.manual_seed(0)
        m = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
        m.generation_config.eos_token_id = None          # no early stop: every contender makes N tokens
        m.generation_config.pad_token_id = 50256
        _models[key] = m
    return _models[key]


def _prompt(B, P, device):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50257, (B, P), generator=g).to(device)


def _make_generate(size, B, P, N):
    def make(device, dtype) -> Bound:
        eager = _hf_model(size, device, dtype, "eager")
        sdpa = _hf_model(size, device, dtype, "sdpa")
        sdpa.load_state_dict(eager.state_dict())
        native = apply_weights(fastlm.models.GPT2.from_hf(eager))
        ids = _prompt(B, P, device)
        mask = torch.ones_like(ids)

        def hf(model, **kw):
            def fn():
                with torch.inference_mode():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, **kw)
            return fn

        impls = {"hf eager": hf(eager), "hf sdpa": hf(sdpa)}
        if device.type == "cuda":
            impls["hf static+compile"] = hf(sdpa, cache_implementation="static", compile_config=None)
        impls[AUTO] = lambda: fastlm.generate(native, ids, max_new_tokens=N)
        impls.update(peers.generate_contenders(eager, ids, N))

        def check():
            ref = impls["hf sdpa"]()
            return {k: float((fn() != ref).sum()) for k, fn in impls.items() if k != "hf sdpa"}

        return Bound(impls, tokens=B * N, check=check, baseline="hf eager")
    return make


def _make_phase(size, B, P, phase):
    def make(device, dtype) -> Bound:
        from transformers import DynamicCache

        hf = _hf_model(size, device, dtype, "sdpa")
        native = apply_weights(fastlm.models.GPT2.from_hf(hf))
        ids = _prompt(B, P, device)
        if phase == "prefill":
            def hf_fn():
                with torch.inference_mode():
                    return hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

            def fl_fn():
                return native.prefill(ids, native.new_cache(B, P))
            tokens = B * P
        else:
            with torch.inference_mode():
                hf_cache = DynamicCache(config=hf.config)
                hf(ids, past_key_values=hf_cache, use_cache=True)
            cache = native.new_cache(B, P + 1)
            native.prefill(ids, cache)
            lengths0 = cache.lengths.clone()
            tok = _prompt(B, 1, device)
            pos = torch.full((B, 1), P, device=device)

            def hf_fn():
                with torch.inference_mode():
                    out = hf(tok, past_key_values=hf_cache, position_ids=pos, use_cache=True).logits[:, -1]
                    hf_cache.crop(-1)                  # drop the token just appended
                    return out

            def fl_fn():
                cache.set_lengths(lengths0)
                return native.decode_step(tok[:, 0], cache)
            tokens = B

        impls = {"hf sdpa": hf_fn, AUTO: fl_fn}
        if "torch" in fastlm.available_backends("linear", device.type):
            impls["fastlm:torch"] = functools.partial(_with_backend, "torch", fl_fn)

        def check():
            ref = hf_fn().float()
            return {k: max_err(fn().float(), ref) for k, fn in impls.items() if k != "hf sdpa"}

        return Bound(impls, tokens=tokens, check=check, baseline="hf sdpa")
    return make


def _with_backend(backend, fn):
    with fastlm.use_backend(backend):
        return fn()


def _make_decode_attention(B, H, Hkv, S, D):
    def make(device, dtype) -> Bound:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, D, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
        lens = torch.full((B,), S, dtype=torch.int32) if B == 1 else torch.randint(S // 2, S + 1, (B,), generator=g,
                                                                                  dtype=torch.int32)
        lens = lens.to(device)
        scale = 1 / math.sqrt(D)
        mask = (torch.arange(S, device=device)[None, :] < lens[:, None].long())[:, None, None, :]  # (B, 1, 1, S)
        kr, vr = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))

        impls = {
            "torch sdpa (masked)": lambda: F.scaled_dot_product_attention(q[:, :, None], kr, vr,
                                                                          attn_mask=mask)[:, :, 0],
            "reference": lambda: reference.decode_attention_fwd_ref(q, k, v, lens, scale),
        }
        backends = bench_backends("decode_attention", device)
        for be in backends:
            impls[f"fastlm:{be}"] = functools.partial(_with_backend, be, lambda: ops.decode_attention(q, k, v, lens))
            # what fastlm.generate calls: no argument checks, no host read of the lengths (a device sync)
            impls[f"fastlm:{be} (unchecked)"] = functools.partial(
                _with_backend, be, lambda: decode_attention_unchecked(q, k, v, lens, scale))

        def check():
            oracle = reference.decode_attention_fwd_ref(q.double(), k.double(), v.double(), lens, scale)
            return {label: max_err(fn(), oracle) for label, fn in impls.items()}

        read = int(lens.long().sum()) * Hkv * D * 2 * k.element_size() + 2 * B * H * D * q.element_size()
        return Bound(impls, bytes=read, check=check, baseline="torch sdpa (masked)")
    return make


def _make_linear(M, K, N):
    def make(device, dtype) -> Bound:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
        b = torch.randn(N, generator=g).to(device=device, dtype=dtype)
        # As in a decode step, the weights come from memory, not from cache: each call takes the next
        # of enough copies to overflow the last-level cache (>= 512 MB in all).
        copies = [w] + [w.clone() for _ in range(max(0, -(-(512 << 20) // (w.numel() * w.element_size())) - 1))]
        turn = [0]

        def rotating(fn):
            def run():
                turn[0] = (turn[0] + 1) % len(copies)
                return fn(copies[turn[0]])
            return run

        impls = {"torch (F.linear)": rotating(lambda w_: F.linear(x, w_, b)),
                 "read (w.sum)": rotating(lambda w_: w_.view(-1).sum())}
        backends = bench_backends("linear", device)
        for be in backends:
            impls[f"fastlm:{be}"] = rotating(functools.partial(
                lambda be_, w_: _with_backend(be_, lambda: ops.linear(x, w_, b)), be))

        def check():
            oracle = F.linear(x.double(), w.double(), b.double())
            errs = {"torch (F.linear)": max_err(F.linear(x, w, b), oracle)}
            for be in backends:
                errs[f"fastlm:{be}"] = max_err(_with_backend(be, lambda: ops.linear(x, w, b)), oracle)
            return errs

        return Bound(impls, bytes=N * K * w.element_size(), check=check, baseline="torch (F.linear)")
    return make


def _make_linear_argmax(M, K, N):
    def make(device, dtype) -> Bound:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(N, K, generator=g) * 0.02).to(device=device, dtype=dtype)
        # weights from memory, as in a decode step: rotate over copies that overflow the cache
        copies = [w] + [w.clone() for _ in range(max(0, -(-(512 << 20) // (w.numel() * w.element_size())) - 1))]
        screens = [ops.LinearArgmaxScreen.build(c) for c in copies] if device.type == "cpu" and dtype == torch.float32 \
            else None
        turn = [0]

        def rotating(fn):
            def run():
                turn[0] = (turn[0] + 1) % len(copies)
                return fn(turn[0])
            return run

        impls = {"torch (F.linear + argmax)": rotating(lambda i: F.linear(x, copies[i]).argmax(-1)),
                 "ops.linear + argmax": rotating(lambda i: ops.linear(x, copies[i]).argmax(-1)),
                 # the op under test: through the int8 screen where it applies (CPU fp32)
                 AUTO: rotating(lambda i: ops.linear_argmax(x, copies[i],
                                                                None if screens is None else screens[i]))}

        def check():
            # index mismatches against the fp64 argmax (0 expected: random rows have no near-ties)
            oracle = reference.linear_argmax_fwd_ref(x, w, upcast=True)
            return {label: float((fn() != oracle).sum()) for label, fn in
                    [("torch (F.linear + argmax)", lambda: F.linear(x, w).argmax(-1)),
                     ("ops.linear + argmax", lambda: ops.linear(x, w).argmax(-1)),
                     (AUTO, lambda: ops.linear_argmax(x, w, None if screens is None else screens[0]))]}

        # bytes: the fp32 weight a full product reads (the screened kernel reads ~1/4 of it)
        return Bound(impls, bytes=N * K * w.element_size(), check=check, baseline="torch (F.linear + argmax)")
    return make


# ---- the case list ----
_GENERATE = [("gpt2", 1, 32, 64, True), ("gpt2", 8, 64, 32, True), ("gpt2", 64, 32, 32, False),
             ("gpt2-medium", 1, 32, 64, False), ("gpt2-medium", 8, 64, 32, False)]
for _size, _B, _P, _N, _quick in _GENERATE:
    register(Case(suite="generate", family="generate", name=f"{_size} generate b{_B} p{_P} n{_N}",
                  make=_make_generate(_size, _B, _P, _N),
                  params={"model": _size, "batch": _B, "prompt": _P, "new_tokens": _N}, quick=_quick,
                  devices=("cpu", "cuda") if _B <= 8 else ("cuda",)))
for _size, _B, _P in [("gpt2", 1, 32), ("gpt2", 8, 64), ("gpt2", 64, 128)]:
    for _phase in ("prefill", "decode"):
        register(Case(suite="generate", family="generate",
                      name=f"{_size} {'prefill' if _phase == 'prefill' else 'decode step'} b{_B} "
                           f"{'p' if _phase == 'prefill' else 'ctx'}{_P}",
                      make=_make_phase(_size, _B, _P, _phase), params={"model": _size, "batch": _B, "seq": _P,
                                                                       "phase": _phase},
                      quick=_B == 1, devices=("cpu", "cuda") if _B <= 8 else ("cuda",)))
for _B, _H, _Hkv, _S, _D, _devs, _quick in [
        (1, 12, 12, 1024, 64, ("cpu", "cuda"), True), (8, 12, 12, 256, 64, ("cpu", "cuda"), True),
        (1, 32, 8, 4096, 128, ("cpu", "cuda"), False),
        (1, 12, 12, 65536, 64, ("cuda",), False), (64, 12, 12, 1024, 64, ("cuda",), False),
        (64, 32, 8, 2048, 128, ("cuda",), False)]:
    register(Case(suite="generate", family="decode_attention",
                  name=f"decode_attention b{_B} h{_H} kv{_Hkv} s{_S} d{_D}",
                  make=_make_decode_attention(_B, _H, _Hkv, _S, _D),
                  params={"batch": _B, "heads": _H, "kv_heads": _Hkv, "s_max": _S, "head_dim": _D},
                  quick=_quick, devices=_devs))
for _M, _K, _N, _quick in [(1, 768, 2304, False), (1, 768, 50257, True), (1, 3072, 768, False), (8, 768, 3072, True),
                           (8, 768, 50257, False), (1, 1024, 4096, False)]:
    register(Case(suite="generate", family="linear", name=f"linear {_M}x{_K}->{_N}", make=_make_linear(_M, _K, _N),
                  params={"M": _M, "K": _K, "N": _N}, quick=_quick))
for _M in (1, 8):
    register(Case(suite="generate", family="linear_argmax", name=f"linear_argmax {_M}x768->50257",
                  make=_make_linear_argmax(_M, 768, 50257), params={"M": _M, "K": 768, "N": 50257},
                  quick=_M == 1, devices=("cpu",)))
