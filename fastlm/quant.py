"""fastlm.quantize: int8 (or bf16) weights for a model's projections, in place.

    model = fastlm.quantize(fastlm.models.GPT2.from_hf(hf), weights="int8")   # or Bert, or HF GPT-2/BERT
    fastlm.generate(model, ids)                                             # unchanged

Every projection -- attention qkv and output, FFN fc1 and fc2, and GPT-2's LM head (tied to the token
embedding; the embedding itself stays in the model's dtype for the lookups) -- becomes a
fastlm.nn.Int8Linear: int8 weights with fp32 scales per output channel (symmetric, round to nearest),
or per group of `group_size` inputs; activations stay in the model's dtype (W8A32: the kernels widen
the weights to fp32 in registers). activations="int8" (per-channel scales only) adds W8A8: every
projection call of 2+ rows (prefill, BERT) quantizes its input rows to int8 as well (per-row scale
max|x| / 127) and runs an int32 GEMM (fastlm.ops.linear_w8a8; AVX-512 VNNI on CPU, ~5x the fp32 GEMM);
1-row calls (decode at batch 1) stay W8A32. weights="bf16" stores the same projections in bf16 instead
(fastlm.nn.Bf16Linear). BERT's pooler stays as it is (one small matrix, run once per sequence).

Hugging Face GPT2LMHeadModel / GPT2Model / BertModel / BertFor* are patched first (fastlm.patch) when
they are not yet; the patched forwards that would read a projection's `.weight` (GPT-2's fused MLP,
BERT's fused FFN and add+LayerNorm) go back to the transformers forward, which calls the quantized
modules. The state_dict then holds `qweight` and `scale` (bf16: `weight`) for each projection: to load
a saved one, quantize a model of the same shapes built on the meta device and `load_state_dict(sd,
assign=True)` (no re-quantization of the real weights).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from fastlm.nn.quant_linear import QUANT_LINEARS, Bf16Linear, Int8Linear

WEIGHTS = ("int8", "bf16")


ACTIVATIONS = (None, "int8")


def _convert(weight: torch.Tensor, bias: Optional[torch.Tensor], weights: str, group_size: Optional[int],
             dtype: torch.dtype, activations: Optional[str] = None) -> torch.nn.Module:
    if weights == "int8":
        return Int8Linear.from_weight(weight, bias, group_size, dtype=dtype, activations=activations)
    return Bf16Linear.from_weight(weight, bias, dtype=dtype)


def _from_linear(lin: torch.nn.Module, weights: str, group_size: Optional[int],
                 activations: Optional[str] = None) -> torch.nn.Module:
    return _convert(lin.weight, lin.bias, weights, group_size, lin.weight.dtype, activations)


def _from_conv1d(conv: torch.nn.Module, weights: str, group_size: Optional[int],
                 activations: Optional[str] = None) -> torch.nn.Module:
    # transformers' Conv1D stores (in, out): Int8Linear takes F.linear's (out, in), same forward
    return _convert(conv.weight.t(), conv.bias, weights, group_size, conv.weight.dtype, activations)


# A target: (parent module, attribute name, "linear" | "conv1d"). Collected first, so that every check
# (group_size against each in_features, a model quantized before with other weights) runs before any
# swap: a bad argument leaves the model as it was.

def _targets_native_gpt2(model) -> list:
    out = [(blk, name, "linear") for blk in model.blocks for name in ("c_attn", "c_proj", "fc", "proj")]
    return out + [(model, "lm_head", "head")]


def _targets_native_bert(model) -> list:
    return [(layer, name, "linear") for layer in model.layers for name in ("qkv", "proj", "fc1", "fc2")]


def _targets_hf(model, kind: str) -> list:
    out = []
    if kind == "gpt2":
        tr = model.transformer if hasattr(model, "transformer") else model
        for h in tr.h:
            out += [(h.attn, "c_attn", "conv1d"), (h.attn, "c_proj", "conv1d"), (h.mlp, "c_fc", "conv1d"),
                    (h.mlp, "c_proj", "conv1d")]
        if getattr(model, "lm_head", None) is not None:
            out.append((model, "lm_head", "linear"))
    else:  # bert
        enc = model.encoder if hasattr(model, "encoder") else model.bert.encoder
        for L in enc.layer:
            sa = L.attention.self
            out += [(sa, "query", "linear"), (sa, "key", "linear"), (sa, "value", "linear"),
                    (L.attention.output, "dense", "linear"), (L.intermediate, "dense", "linear"),
                    (L.output, "dense", "linear")]
    return out


def _in_features(parent, name: str, how: str, model) -> Optional[int]:
    child = getattr(parent, name)
    if isinstance(child, QUANT_LINEARS):
        return None
    if how == "head":
        return model.head_weight.shape[1]
    return child.weight.shape[0] if how == "conv1d" else child.weight.shape[1]


def _check_targets(model, targets: list, weights: str, group_size: Optional[int],
                   activations: Optional[str] = None) -> None:
    want = Int8Linear if weights == "int8" else Bf16Linear
    for parent, name, how in targets:
        child = getattr(parent, name)
        if isinstance(child, QUANT_LINEARS):
            if not isinstance(child, want):
                have = "int8" if isinstance(child, Int8Linear) else "bf16"
                raise ValueError(f"fastlm.quantize: the model already has {have} weights; weights={weights!r} "
                                 f"cannot re-quantize them (quantize a fresh copy of the original model)")
            if weights == "int8" and child.group_size != group_size:
                raise ValueError(f"fastlm.quantize: the model is already quantized with group_size="
                                 f"{child.group_size}, got group_size={group_size!r}")
            continue
        K = _in_features(parent, name, how, model)
        if group_size is not None and K % group_size:
            raise ValueError(f"fastlm.quantize: group_size {group_size} does not divide the in_features {K} of "
                             f"{type(parent).__name__}.{name}")


def _apply(model, targets: list, weights: str, group_size: Optional[int], activations: Optional[str] = None) -> int:
    n = 0
    for parent, name, how in targets:
        child = getattr(parent, name)
        if isinstance(child, QUANT_LINEARS):
            if isinstance(child, Int8Linear):
                child.activations = activations      # a setting, not the weights: switched in place
            continue
        if how == "head":                            # native GPT2: the head tied to wte
            w = model.head_weight
            if isinstance(model.lm_head, torch.nn.Parameter):
                del model.lm_head                    # an untied head weight: becomes a module here
            model.lm_head = _convert(w, None, weights, group_size, w.dtype, activations)   # the tie to wte ends here
            model.__dict__.pop("_head_screen", None)
        elif how == "conv1d":
            setattr(parent, name, _from_conv1d(child, weights, group_size, activations))
        else:
            setattr(parent, name, _from_linear(child, weights, group_size, activations))
        n += 1
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


def quantize(model: torch.nn.Module, weights: str = "int8", group_size: Optional[int] = None,
             activations: Optional[str] = None) -> torch.nn.Module:
    """Quantize `model`'s projections in place and return it.

    model: fastlm.models.GPT2, fastlm.models.Bert, or a transformers GPT-2 (GPT2LMHeadModel,
    GPT2Model) / BERT (BertModel, BertFor*) model. weights: "int8" (per-output-channel fp32 scales, or
    per group of `group_size` inputs) or "bf16". activations: None (W8A32: activations stay in the
    model's dtype) or "int8" (W8A8 for every projection call of 2+ rows: prefill, BERT; 1-row calls stay
    W8A32; needs weights="int8" without group_size). Projections already quantized the same way are left
    as they are (quantizing twice is a no-op; `activations` is switched on them, the weights stay);
    other weights or another group_size raise ValueError.
    All arguments are checked before the first projection is replaced."""
    from fastlm.models.bert import Bert
    from fastlm.models.gpt2 import GPT2

    if not isinstance(weights, str) or weights not in WEIGHTS:
        raise ValueError(f"fastlm.quantize: weights must be one of {WEIGHTS}, got {weights!r}")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise TypeError(f"fastlm.quantize: group_size must be an int or None, got {type(group_size).__name__}")
        if weights != "int8":
            raise ValueError("fastlm.quantize: group_size applies to weights='int8' only")
        if group_size <= 0:
            raise ValueError(f"fastlm.quantize: group_size must be a positive int, got {group_size!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"fastlm.quantize: activations must be None (W8A32) or 'int8' (W8A8), got {activations!r}")
    if activations == "int8" and weights != "int8":
        raise ValueError(f"fastlm.quantize: activations='int8' needs weights='int8', got weights={weights!r}")
    if activations == "int8" and group_size is not None:
        raise ValueError("fastlm.quantize: activations='int8' needs per-channel scales (group_size=None), got "
                         f"group_size={group_size}")
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model, GPT2):
        targets = _targets_native_gpt2(model)
    elif isinstance(model, Bert):
        targets = _targets_native_bert(model)
    elif kind in ("gpt2", "bert") and isinstance(model, torch.nn.Module):
        targets = _targets_hf(model, kind)
    else:
        raise TypeError(f"fastlm.quantize: model must be a fastlm GPT2/Bert or a transformers GPT-2/BERT model, "
                        f"got {type(model).__name__}")
    _check_targets(model, targets, weights, group_size, activations)
    if not isinstance(model, (GPT2, Bert)):
        import fastlm

        if getattr(model, "_fastlm_patch_state", None) is None:
            fastlm.patch(model)
        _unfuse(model)
        targets = _targets_hf(model, kind)          # patch may have replaced modules: collect again
    n = _apply(model, targets, weights, group_size, activations)
    if n and kind == "gpt2" and not isinstance(model, GPT2) and getattr(model, "lm_head", None) is not None:
        # the quantized head is its own tensor now: HF must not tie it back to wte. The config object is
        # often shared (models built from one GPT2Config): this model gets its own copy first
        old = model.config
        new = copy.deepcopy(old)
        new.tie_word_embeddings = False
        for m in model.modules():
            if getattr(m, "config", None) is old:
                m.config = new
    model.__dict__["_fastlm_quantized"] = weights
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QUANT_LINEARS) for m in model.modules())
