"""fastlm.quantize: int8 (or bf16) weights for a model's projections, in place.

    model = fastlm.quantize(fastlm.models.GPT2.from_hf(hf), weights="int8")   # or Bert, or HF GPT-2/BERT
    fastlm.generate(model, ids)                                             # unchanged

Every projection -- attention qkv and output, FFN fc1 and fc2, and GPT-2's LM head (tied to the token
embedding; the embedding itself stays in the model's dtype for the lookups) -- becomes a
fastlm.nn.Int8Linear: int8 weights with fp32 scales per output channel (symmetric, round to nearest),
or per group of `group_size` inputs; activations stay in the model's dtype (W8A32: the kernels widen
the weights to fp32 in registers). weights="bf16" stores the same projections in bf16 instead
(fastlm.nn.Bf16Linear). BERT's pooler stays as it is (one small matrix, run once per sequence).

Hugging Face GPT2LMHeadModel / GPT2Model / BertModel / BertFor* are patched first (fastlm.patch) when
they are not yet; the patched forwards that would read a projection's `.weight` (GPT-2's fused MLP,
BERT's fused FFN and add+LayerNorm) go back to the transformers forward, which calls the quantized
modules. The state_dict then holds `qweight` and `scale` (bf16: `weight`) for each projection: to load
a saved one, quantize a model of the same shapes built on the meta device and `load_state_dict(sd,
assign=True)` (no re-quantization of the real weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastlm.nn.quant_linear import QUANT_LINEARS, Bf16Linear, Int8Linear

WEIGHTS = ("int8", "bf16")


def _convert(weight: torch.Tensor, bias: Optional[torch.Tensor], weights: str, group_size: Optional[int],
             dtype: torch.dtype) -> torch.nn.Module:
    if weights == "int8":
        return Int8Linear.from_weight(weight, bias, group_size, dtype=dtype)
    return Bf16Linear.from_weight(weight, bias, dtype=dtype)


def _from_linear(lin: torch.nn.Module, weights: str, group_size: Optional[int]) -> torch.nn.Module:
    return _convert(lin.weight, lin.bias, weights, group_size, lin.weight.dtype)


def _from_conv1d(conv: torch.nn.Module, weights: str, group_size: Optional[int]) -> torch.nn.Module:
    # transformers' Conv1D stores (in, out): Int8Linear takes F.linear's (out, in), same forward
    return _convert(conv.weight.t(), conv.bias, weights, group_size, conv.weight.dtype)


def _swap(parent: torch.nn.Module, name: str, fn) -> int:
    child = getattr(parent, name)
    if isinstance(child, QUANT_LINEARS):
        return 0
    setattr(parent, name, fn(child))
    return 1


def _quantize_native_gpt2(model, weights, group_size) -> int:
    n = 0
    for blk in model.blocks:
        for name in ("c_attn", "c_proj", "fc", "proj"):
            n += _swap(blk, name, lambda m: _from_linear(m, weights, group_size))
    if not isinstance(model.lm_head, QUANT_LINEARS):
        w = model.head_weight
        model.lm_head = _convert(w, None, weights, group_size, w.dtype)   # the tie to wte ends here
        model.__dict__.pop("_head_screen", None)
        n += 1
    return n


def _quantize_native_bert(model, weights, group_size) -> int:
    n = 0
    for layer in model.layers:
        for name in ("qkv", "proj", "fc1", "fc2"):
            n += _swap(layer, name, lambda m: _from_linear(m, weights, group_size))
    return n


# patched transformers classes whose fastlm forward reads a projection's .weight (fastlm/integrations/hf.py):
# they get their transformers forward back, which calls the (quantized) child modules
_READS_WEIGHTS = {"GPT2MLP", "BertLayer", "BertSelfOutput", "BertOutput", "Conv1D"}


def _unfuse(model: torch.nn.Module) -> None:
    from fastlm.integrations import hf

    for m in model.modules():
        orig = hf._originals.get(type(m))
        if orig is not None and orig.__name__ in _READS_WEIGHTS:
            m.__class__ = orig


def _quantize_hf(model, weights, group_size) -> int:
    import fastlm

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if getattr(model, "_fastlm_patch_state", None) is None:
        fastlm.patch(model)
    _unfuse(model)
    n = 0
    if kind == "gpt2":
        tr = model.transformer if hasattr(model, "transformer") else model
        for h in tr.h:
            n += _swap(h.attn, "c_attn", lambda m: _from_conv1d(m, weights, group_size))
            n += _swap(h.attn, "c_proj", lambda m: _from_conv1d(m, weights, group_size))
            n += _swap(h.mlp, "c_fc", lambda m: _from_conv1d(m, weights, group_size))
            n += _swap(h.mlp, "c_proj", lambda m: _from_conv1d(m, weights, group_size))
        head = getattr(model, "lm_head", None)
        if head is not None and not isinstance(head, QUANT_LINEARS):
            model.lm_head = _from_linear(head, weights, group_size)
            model.config.tie_word_embeddings = False    # the int8 head is its own tensor now
            n += 1
    else:  # bert
        enc = model.encoder if hasattr(model, "encoder") else model.bert.encoder
        for L in enc.layer:
            sa = L.attention.self
            for name in ("query", "key", "value"):
                n += _swap(sa, name, lambda m: _from_linear(m, weights, group_size))
            n += _swap(L.attention.output, "dense", lambda m: _from_linear(m, weights, group_size))
            n += _swap(L.intermediate, "dense", lambda m: _from_linear(m, weights, group_size))
            n += _swap(L.output, "dense", lambda m: _from_linear(m, weights, group_size))
    return n


def quantize(model: torch.nn.Module, weights: str = "int8", group_size: Optional[int] = None) -> torch.nn.Module:
    """Quantize `model`'s projections in place and return it.

    model: fastlm.models.GPT2, fastlm.models.Bert, or a transformers GPT-2 (GPT2LMHeadModel,
    GPT2Model) / BERT (BertModel, BertFor*) model. weights: "int8" (per-output-channel fp32 scales, or
    per group of `group_size` inputs) or "bf16". Projections already quantized are left as they are."""
    from fastlm.models.bert import Bert
    from fastlm.models.gpt2 import GPT2

    if weights not in WEIGHTS:
        raise ValueError(f"fastlm.quantize: weights must be one of {WEIGHTS}, got {weights!r}")
    if group_size is not None:
        if weights != "int8":
            raise ValueError("fastlm.quantize: group_size applies to weights='int8' only")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"fastlm.quantize: group_size must be a positive int, got {group_size!r}")
    if isinstance(model, GPT2):
        n = _quantize_native_gpt2(model, weights, group_size)
    elif isinstance(model, Bert):
        n = _quantize_native_bert(model, weights, group_size)
    elif getattr(getattr(model, "config", None), "model_type", None) in ("gpt2", "bert") and isinstance(
            model, torch.nn.Module):
        n = _quantize_hf(model, weights, group_size)
    else:
        raise TypeError(f"fastlm.quantize: expected a fastlm GPT2/Bert or a transformers GPT-2/BERT model, "
                        f"got {type(model).__name__}")
    model.__dict__["_fastlm_quantized"] = weights
    del n
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QUANT_LINEARS) for m in model.modules())
