"""fastlm.nn.MultiheadAttention: torch.nn.MultiheadAttention (same constructor, parameters and
state_dict) whose forward runs fastlm.ops.scaled_dot_product_attention when no attention weights are
asked for (need_weights=False), and defers to torch otherwise (or for options the fused path does not
cover: add_bias_kv, add_zero_attn, unbatched inputs)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import ops


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention masks -> additive: bool True means "do not attend" (-inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if (need_weights or query.dim() != 3 or self.bias_k is not None or self.bias_v is not None
                or self.add_zero_attn):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("fastlm.nn.MultiheadAttention: need attn_mask if specifying the is_causal hint "
                               "(as torch.nn.MultiheadAttention)")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(N, L, H, hd).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(N, S, H, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(N, S, H, hd).transpose(1, 2)

        causal = bool(is_causal) and key_padding_mask is None  # torch: the hint replaces attn_mask
        mask = None
        if not causal:
            kpm = _additive(key_padding_mask, q.dtype)
            am = _additive(attn_mask, q.dtype)
            if kpm is not None:
                mask = kpm.view(N, 1, 1, S)  # key-padding fast path
            if am is not None:
                am = am.view(1, 1, L, S) if am.dim() == 2 else am.view(N, H, L, S)
                mask = am if mask is None else mask + am
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=causal)
        out = out.transpose(1, 2).reshape(N, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """A fastlm MultiheadAttention sharing `module`'s parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new
