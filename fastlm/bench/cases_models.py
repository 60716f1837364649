"""Suite "models": GPT-2 small and BERT-base (random weights), inference and a training step (forward +
backward, no optimizer), per (batch, seq). Contenders, all sharing one set of weights values:

- "hf eager":  transformers, attn_implementation="eager" (the baseline)
- "hf sdpa":   transformers, attn_implementation="sdpa"
- "fastlm:auto (patched)":  fastlm.patch(hf eager model), the default backend choice
- "fastlm:auto (native)":   fastlm.models.Bert / fastlm.models.GPT2 (inference only; GPT2: prefill into a
                            fresh static KV cache, which returns the last position's logits)
- "fastlm:reference (patched)", "fastlm:reference (native)": the same with every fastlm op on its reference
- "fastlm:torch (patched)", "fastlm:torch (native)": every op forced to fastlm's "torch" backend (torch's
  own ops behind fastlm's dispatch: the integration's cost without fastlm's kernels), where it exists
- "ctranslate2 fp32" / "ctranslate2 int8" (GPT-2: logits of every position; BERT: the encoder) and
  "onnxruntime fp32" (BERT), inference on CPU, where installed (fastlm/bench/peers.py, fastlm[peers])
`--weights int8|bf16` quantizes the fastlm models of the inference cases (fastlm.quantize).

Each case checks parity first: the max |difference| of the output (inference: the last hidden state /
logits; training: the loss) of each contender against "hf eager". Work: tokens = batch x seq;
flops ~ 2 x (non-embedding params + LM head) x tokens + attention (x3 for fwd+bwd).
"""
from __future__ import annotations

import copy
import gc
import warnings

import torch

from fastlm.bench import peers
from fastlm.bench.common import apply_weights
from fastlm.bench.registry import Bound, Case, register

PATCHED, NATIVE = "fastlm:auto (patched)", "fastlm:auto (native)"
SHAPES = ((1, 128), (8, 128), (32, 128), (8, 512), (8, 1024))
QUICK = {(1, 128), (8, 128)}


def _configs(arch: str, seq: int):
    if arch == "gpt2":                                   # GPT-2 small
        from transformers import GPT2Config
        return GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(1024, seq), vocab_size=50257,
                          bos_token_id=50256, eos_token_id=50256)
    from transformers import BertConfig                   # BERT-base (positions stretched past 512 for S=1024)
    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=max(512, seq))


def _flops(cfg, arch: str, B: int, S: int, train: bool) -> float:
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", None) or 4 * H
    per_tok = L * (4 * H * H + 2 * H * inter) + (cfg.vocab_size * H if arch == "gpt2" else 0)
    attn = L * 4 * S * H * (0.5 if arch == "gpt2" else 1.0)       # QK^T and PV per token (causal: half)
    return 2 * B * S * (per_tok + attn) * (3 if train else 1)


def _forced(fn, backend: str):
    def run():
        import fastlm
        with fastlm.use_backend(backend):
            return fn()
    return run


class _Models:
    """The contenders' models, built on first use; keep_all=False keeps only the last one used alive."""

    def __init__(self, builders: dict, keep_all: bool):
        self.builders, self.keep_all, self.alive = builders, keep_all, {}

    def get(self, key: str):
        if key not in self.alive:
            if not self.keep_all:
                self.alive.clear()
                gc.collect()
            self.alive[key] = self.builders[key]()
        return self.alive[key]


def _make(arch: str, B: int, S: int, train: bool):
    def make(device: torch.device, dtype: torch.dtype) -> Bound:
        import fastlm
        from fastlm.integrations.hf import PatchWarning

        cfg = _configs(arch, S)
        cfg._attn_implementation = "eager"
        if arch == "gpt2":
            from transformers import GPT2LMHeadModel as Cls
        else:
            from transformers import BertModel as Cls

        def build_eager():
            torch.manual_seed(0)                          # every build: the same weights
            m = Cls(copy.deepcopy(cfg)).to(device=device, dtype=dtype)
            m.train(train)
            if train:                                     # dropout off: comparable, deterministic steps
                for mod in m.modules():
                    if isinstance(mod, torch.nn.Dropout):
                        mod.p = 0.0
            return m

        def build_sdpa():
            m = build_eager()
            m.set_attn_implementation("sdpa")
            return m

        def build_patched():
            m = build_eager()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PatchWarning)
                fastlm.patch(m)
            return m if train else apply_weights(m)

        def build_native():
            native_cls = fastlm.models.Bert if arch == "bert" else fastlm.models.GPT2
            return apply_weights(native_cls.from_hf(build_eager()))

        builders = {"hf eager": build_eager, "hf sdpa": build_sdpa, PATCHED: build_patched}
        if not train:
            builders[NATIVE] = build_native
        # Small shapes keep every model alive; large ones keep one at a time (built again when its turn
        # comes): a GPT-2 training step at 8x1024 needs ~15 GB, and four at once went past 24 GB.
        models = _Models(builders, keep_all=B * S < 4096)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
        mask = torch.ones_like(ids)

        def out_of(model, is_native=False):
            if is_native:                                # GPT2: prefill into a fresh cache -> last logits
                if arch == "bert":
                    return model(ids, attention_mask=mask).last_hidden_state
                return model.prefill(ids, model.new_cache(B, S))
            o = model(ids, attention_mask=mask)
            return o.logits if arch == "gpt2" else o.last_hidden_state

        def infer(key, is_native=False):
            def fn():
                model = models.get(key)
                with torch.inference_mode():
                    return out_of(model, is_native)
            return fn

        def step(key):
            def fn():
                model = models.get(key)
                model.zero_grad(set_to_none=True)
                if arch == "gpt2":
                    loss = model(ids, attention_mask=mask, labels=ids).loss
                else:
                    loss = model(ids, attention_mask=mask).last_hidden_state.float().square().mean()
                loss.backward()
                return loss.detach()
            return fn

        impls = {k: (step(k) if train else infer(k, k == NATIVE)) for k in builders}
        if not train:                                    # peer engines on the same weights (CPU, installed)
            src = build_eager()
            impls.update(peers.bert_contenders(src, ids, mask) if arch == "bert" else
                         peers.logits_contenders(src, ids))
        # the same fastlm models with every op forced onto the reference (and torch) backend: separates
        # the integration (patch / native model) from the speed of the op backends "auto" picks
        forced = ["reference"] + (["torch"] if "torch" in fastlm.available_backends("linear", device.type) else [])
        for k in [k for k in impls if k in (PATCHED, NATIVE)]:
            for be in forced:
                impls[k.replace("fastlm:auto", f"fastlm:{be}")] = _forced(impls[k], be)

        def check():
            ref = impls["hf eager"]()
            errs = {}
            for k, fn in impls.items():
                if k != "hf eager":
                    out = fn()
                    r = ref[:, -1] if (train is False and out.dim() == ref.dim() - 1) else ref   # GPT2 prefill
                    errs[k] = (out.float() - r.float()).abs().max().item()
            return errs

        return Bound(impls=impls, tokens=B * S, flops=_flops(cfg, arch, B, S, train), check=check,
                     baseline="hf eager", interleave=models.keep_all)   # one model alive: one after another
    return make


for _arch in ("gpt2", "bert"):
    for _B, _S in SHAPES:
        if _arch == "gpt2" and (_B, _S) == (8, 128):
            continue                                     # (8, 128) is BERT's target shape
        for _train in (False, True):
            register(Case(suite="models", family=_arch,
                          name=f"{_arch} {'train step' if _train else 'inference'} {_B}x{_S}",
                          make=_make(_arch, _B, _S, _train),
                          params={"model": "gpt2-small" if _arch == "gpt2" else "bert-base", "batch": _B,
                                  "seq": _S, "mode": "train" if _train else "inference"},
                          quick=(_B, _S) in QUICK))
