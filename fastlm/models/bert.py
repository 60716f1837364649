"""A native BERT encoder for inference, built from fastlm ops, loading Hugging Face weights.

    bert = fastlm.models.Bert.from_hf("path/to/bert-or-minilm", dtype=torch.float16, device="cuda")
    out = bert(input_ids, attention_mask)          # out.last_hidden_state (B, S, H), out.pooler_output (B, H)

Same outputs as transformers' `BertModel` (encoder-only, absolute positions). Per layer: one fused QKV
projection (the three HF weights concatenated once, at load), `ops.scaled_dot_product_attention` with
the padding mask as a boolean key mask (no mask at all when nothing is padded), the output projection,
`ops.add_layer_norm` (residual add fused), `ops.gelu_ffn` (fc1 + GELU + fc2), `ops.add_layer_norm`.
The projections (QKV, output, pooler) go through `fastlm.ops.linear.dense_linear`: oneDNN's GEMM on the
CPU in fp32 (~2x the MKL sgemm behind F.linear on the 2-core CI machine), F.linear elsewhere.
`forward` runs under `torch.inference_mode()`: this model is for inference (patch a `BertModel` with
`fastlm.patch` to train).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastlm import ops
from fastlm.nn import LayerNorm
from fastlm.ops.linear import dense_linear as linear   # F.linear; oneDNN's GEMM on CPU fp32
from fastlm.nn.quant_linear import QUANT_LINEARS, Int8Linear
from fastlm.ops._impl import eager_inference


def _proj(mod: torch.nn.Module, x: Tensor) -> Tensor:
    """A projection: a quantized module (fastlm.quantize) runs itself, a Linear the GEMM."""
    if isinstance(mod, QUANT_LINEARS):
        return mod(x)
    return linear(x, mod.weight, mod.bias)

_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh"}


@dataclass
class BertOutput:
    last_hidden_state: Tensor                    # (B, S, H)
    pooler_output: Optional[Tensor] = None       # (B, H): tanh(dense(hidden[:, 0])); None without a pooler

    def __getitem__(self, i):                    # out[0], out[1] like HF's ModelOutput tuples
        return (self.last_hidden_state, self.pooler_output)[i]


@dataclass
class BertSettings:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    approximate: str = "none"                    # the GELU: "none" (BERT's "gelu") or "tanh"
    pad_token_id: int = 0
    pooler: bool = True


def _w8a8_cpu_kernels(layer: "BertLayer", x2: Tensor):
    """(w8a8, ln) raw C++ kernels for a W8A8 layer's eager inference call on rows x2 (M, H), or None
    where the ops would choose otherwise (BertLayer._forward_w8a8_cpu): w8a8 = fastlm_C.linear_w8a8_fwd when
    the linear_w8a8 op picks "cpu" for these rows; ln = fastlm_C.layer_norm_fwd when add_layer_norm's
    kernel() picks it. Memoized per (dtype, rows, forced backend, choice epoch)."""
    from fastlm import backends
    from fastlm.ops.linear_w8a8 import OP as W8A8_OP, _supports as w8a8_supports
    from fastlm.ops.layer_norm import kernel as layer_norm_kernel

    key = (x2.dtype, x2.shape[0], backends.current_backend(), backends.choice_epoch())
    memo = layer.__dict__.setdefault("_fast_memo", {})
    if key in memo:
        return memo[key]
    out = None
    mods = (layer.qkv, layer.proj, layer.fc1, layer.fc2)
    if (all(type(m) is Int8Linear and getattr(m, "activations", None) == "int8" and m.scale.dim() == 1
            and (m.bias is None or m.bias.dtype == x2.dtype) and m.w8a8_packed() is not None for m in mods)
            and backends.select(W8A8_OP, x2.device, w8a8_supports(x2, layer.qkv.bias)) == "cpu"):
        _, ln = layer_norm_kernel(x2, x2, layer.ln_attn.weight, layer.ln_attn.bias)
        if ln is torch.ops.fastlm_C.layer_norm_fwd:
            out = (torch.ops.fastlm_C.linear_w8a8_fwd, ln)
    memo.clear()
    memo[key] = out
    return out


class BertLayer(torch.nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        h = s.hidden_size
        self.num_heads, self.head_dim, self.approximate = s.num_heads, h // s.num_heads, s.approximate
        self.qkv = torch.nn.Linear(h, 3 * h)                 # rows: [query; key; value]
        self.proj = torch.nn.Linear(h, h)
        self.ln_attn = LayerNorm(h, eps=s.layer_norm_eps)
        self.fc1 = torch.nn.Linear(h, s.intermediate_size)
        self.fc2 = torch.nn.Linear(s.intermediate_size, h)
        self.ln_ffn = LayerNorm(h, eps=s.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        B, S, H = x.shape
        if (isinstance(self.fc1, Int8Linear) and B * S >= 2 and x.device.type == "cpu" and x.is_contiguous()
                and eager_inference(x, key_mask)):
            kernels = _w8a8_cpu_kernels(self, x.view(B * S, H))
            if kernels is not None:
                return self._forward_w8a8_cpu(x, key_mask, *kernels)
        qkv = _proj(self.qkv, x).view(B, S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)       # each (B, nh, S, hd), views
        a = ops.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        a = _proj(self.proj, a.transpose(1, 2).reshape(B, S, H))
        x, _ = ops.add_layer_norm(a, x, (H,), self.ln_attn.weight, self.ln_attn.bias, self.ln_attn.eps)
        if isinstance(self.fc1, Int8Linear):        # int8 (fastlm.quantize): fc1 + GELU (fused under W8A8) -> fc2
            y = self.fc2(self.fc1.forward_gelu(x, self.approximate))
        elif isinstance(self.fc1, QUANT_LINEARS):   # bf16 weights: fc1 -> GELU -> fc2
            y = self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate=self.approximate))
        else:
            y = ops.gelu_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                             approximate=self.approximate)
        x, _ = ops.add_layer_norm(y, x, (H,), self.ln_ffn.weight, self.ln_ffn.bias, self.ln_ffn.eps)
        return x


    def _forward_w8a8_cpu(self, x: Tensor, key_mask: Optional[Tensor], w8a8, ln) -> Tensor:
        """forward() for W8A8 projections on the CPU kernels, called directly (the ops' own choice for
        these rows, resolved once in _w8a8_cpu_kernels): the same kernels and results as the module
        path, without its ~25 us of checks and dispatch per call (4 projections and 2 LayerNorms a
        layer: ~1 ms of a MiniLM (1, 128) forward)."""
        B, S, H = x.shape
        M = B * S
        x2 = x.view(M, H)

        def proj(mod, t, activation="none"):
            return w8a8(t, mod.qweight, mod.scale, mod.bias, mod.w8a8_packed(), activation)

        qkv = proj(self.qkv, x2).view(B, S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = ops.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        a = proj(self.proj, a.transpose(1, 2).reshape(M, H))
        x2 = ln(a, x2, self.ln_attn.weight, self.ln_attn.bias, self.ln_attn.eps)[0]
        h = proj(self.fc1, x2, "tanh" if self.approximate == "tanh" else "erf")
        y = proj(self.fc2, h)
        x2 = ln(y, x2, self.ln_ffn.weight, self.ln_ffn.bias, self.ln_ffn.eps)[0]
        return x2.view(B, S, H)


class Bert(torch.nn.Module):
    """BERT encoder (+ pooler). Build it with `Bert.from_hf(...)`; `Bert(settings)` gives random weights."""

    def __init__(self, settings: BertSettings):
        super().__init__()
        s = self.settings = settings
        if s.hidden_size % s.num_heads:
            raise ValueError(f"Bert: hidden_size {s.hidden_size} is not a multiple of num_heads {s.num_heads}")
        self.word_embeddings = torch.nn.Embedding(s.vocab_size, s.hidden_size, padding_idx=s.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(s.max_position_embeddings, s.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(s.type_vocab_size, s.hidden_size)
        self.ln_emb = LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.layers = torch.nn.ModuleList(BertLayer(s) for _ in range(s.num_layers))
        self.pooler = torch.nn.Linear(s.hidden_size, s.hidden_size) if s.pooler else None

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> BertOutput:
        """input_ids (B, S) int; attention_mask (B, S), 1/True = a real token, 0 = padding (None: all real);
        token_type_ids (B, S) (None: zeros); position_ids (B, S) or (S,) (None: 0..S-1)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"Bert: input_ids must be a (batch, seq) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        B, S = input_ids.shape
        if S > self.settings.max_position_embeddings:
            raise ValueError(f"Bert: sequence length {S} > max_position_embeddings "
                             f"{self.settings.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = ops.layer_norm(x, (x.shape[-1],), self.ln_emb.weight, self.ln_emb.bias, self.ln_emb.eps)

        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"Bert: attention_mask shape {list(attention_mask.shape)} != input_ids shape "
                                 f"{list(input_ids.shape)}")
            keep = attention_mask.to(device=x.device, dtype=torch.bool)
            if not bool(keep.all()):
                key_mask = keep[:, None, None, :]            # (B, 1, 1, S): broadcast over heads and queries
        for layer in self.layers:
            x = layer(x, key_mask)
        pooled = torch.tanh(linear(x[:, 0], self.pooler.weight, self.pooler.bias)) if self.pooler is not None else None
        return BertOutput(x, pooled)

    @classmethod
    def from_hf(cls, model_or_path, dtype: Optional[torch.dtype] = None, device=None, weights: Optional[str] = None,
                group_size: Optional[int] = None) -> "Bert":
        """A native Bert from a transformers `BertModel` / `BertFor*` (its `.bert`) or a local folder or hub
        name loadable by `BertModel.from_pretrained`. Weights are copied (QKV concatenated) into the new
        model, converted to `dtype` (default: the source's) and moved to `device` (default: the source's).
        weights="int8"|"bf16": then fastlm.quantize the projections (group_size: int8 scales per group).
        The source must hold plain (unquantized) weights."""
        hf = model_or_path
        if not isinstance(hf, torch.nn.Module):
            from transformers import BertModel
            hf = BertModel.from_pretrained(model_or_path)
        if type(hf).__name__ != "BertModel" and isinstance(getattr(hf, "bert", None), torch.nn.Module):
            hf = hf.bert
        if type(hf).__name__ != "BertModel":
            raise TypeError(f"Bert.from_hf: expected a transformers BertModel/BertFor* or a path, got "
                            f"{type(model_or_path).__name__}")
        c = hf.config
        act = c.hidden_act if isinstance(c.hidden_act, str) else None
        if act not in _ACTIVATIONS:
            raise ValueError(f"Bert.from_hf: hidden_act {c.hidden_act!r} is not supported (one of {list(_ACTIVATIONS)})")
        if getattr(c, "is_decoder", False):
            raise ValueError("Bert.from_hf: decoder BERTs (config.is_decoder) are not supported; use fastlm.patch")
        pet = getattr(c, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"Bert.from_hf: position_embedding_type {pet!r} is not supported (only 'absolute')")
        s = BertSettings(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                         num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                         max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                         layer_norm_eps=c.layer_norm_eps, approximate=_ACTIVATIONS[act],
                         pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
                         pooler=hf.pooler is not None)
        src = next(hf.parameters())
        dtype = dtype or src.dtype
        device = torch.device(device) if device is not None else src.device
        with torch.device("meta"):
            model = cls(s)
        e = hf.embeddings
        sd = {"word_embeddings.weight": e.word_embeddings.weight, "position_embeddings.weight": e.position_embeddings.weight,
              "token_type_embeddings.weight": e.token_type_embeddings.weight,
              "ln_emb.weight": e.LayerNorm.weight, "ln_emb.bias": e.LayerNorm.bias}
        for i, L in enumerate(hf.encoder.layer):
            att, p = L.attention, f"layers.{i}."
            sd[p + "qkv.weight"] = torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight])
            sd[p + "qkv.bias"] = torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias])
            sd[p + "proj.weight"], sd[p + "proj.bias"] = att.output.dense.weight, att.output.dense.bias
            sd[p + "ln_attn.weight"], sd[p + "ln_attn.bias"] = att.output.LayerNorm.weight, att.output.LayerNorm.bias
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = L.intermediate.dense.weight, L.intermediate.dense.bias
            sd[p + "fc2.weight"], sd[p + "fc2.bias"] = L.output.dense.weight, L.output.dense.bias
            sd[p + "ln_ffn.weight"], sd[p + "ln_ffn.bias"] = L.output.LayerNorm.weight, L.output.LayerNorm.bias
        if hf.pooler is not None:
            sd["pooler.weight"], sd["pooler.bias"] = hf.pooler.dense.weight, hf.pooler.dense.bias
        sd = {k: v.detach().to(device=device, dtype=dtype).clone() for k, v in sd.items()}
        model.load_state_dict(sd, assign=True, strict=True)
        model = model.eval().requires_grad_(False)
        if weights is not None:
            from fastlm.quant import quantize

            quantize(model, weights=weights, group_size=group_size)
        return model
