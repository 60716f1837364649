"""The serving engine's model side: the paged KV cache tensors, and GPT-2's forward over one flat batch
of tokens from many sequences (decode tokens and prefill chunks mixed).

A step's batch (StepBatch) is T tokens from R sequences: token t is sequence seq_index[t]'s token at
position positions[t]; its key/value go to cache slot slot_mapping[t] (block * block_size + row) and
it attends to its sequence's positions [0, positions[t] + 1) through block_tables[seq_index[t]].
Logits are computed only for the rows logits_index (each sequence's last scheduled token, when that
token completes what the sequence had to compute).

Batch invariance (fp32 and fp16/bf16 weights on the cpu backend): every op of the forward computes a
token's row with arithmetic that does not depend on the other rows -- the embeddings (a gather), the
LayerNorms (one kernel, chosen once for one-row inputs, not per batch size), the projections and the
LM head (ops' linear_rowwise: each row with ops.linear's one-row arithmetic), the cache write and
paged attention (per query token, its own sequence's keys). So a sequence's logits are bit for bit the
same whatever shares its steps, however its prompt was chunked, and after a preemption's recompute.
Quantized projections (fastlm.quantize: Int8Linear, Bf16Linear) run their module's forward
(ops.linear_int8 / F.linear on the widened weight), whose kernels pick a path by row count: their
results are batch-invariant only up to rounding (tokens may differ where logits nearly tie).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.backends import BackendUnavailableError, use_backend
from fastlm.models.gpt2 import GPT2
from fastlm.nn.quant_linear import QUANT_LINEARS
from fastlm.ops.layer_norm import kernel as layer_norm_kernel
from fastlm.ops.linear_argmax import linear_argmax
from fastlm.ops.paged_attention import (linear_rowwise, linear_rowwise_pack, paged_attention_unchecked,
                                        paged_kv_write_unchecked)


class KVCache:
    """The paged cache of every layer in one tensor data (n_layer, 2, num_blocks, H, block_size, D):
    keys(l) = data[l, 0] and values(l) = data[l, 1] are the (num_blocks, H, block_size, D) caches
    paged attention reads (each a contiguous slice)."""

    def __init__(self, n_layer: int, num_blocks: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(n_layer, 2, num_blocks, n_head, block_size, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(n_layer: int, n_head: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layer * n_head * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    def keys(self, layer: int) -> Tensor:
        return self.data[layer, 0]

    def values(self, layer: int) -> Tensor:
        return self.data[layer, 1]

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst := block src, every layer (a forked sequence's private copy of a partial block)."""
        self.data[:, :, dst].copy_(self.data[:, :, src])


@dataclass
class StepBatch:
    """One step's flat batch (all on the model's device).

    token_ids (T,) int64; positions (T,) int64; slot_mapping (T,) int64 (block * block_size + row);
    seq_index (T,) int32 in [0, R); key_lens (T,) int32 = positions + 1; block_tables (R, max_blocks)
    int32 (unused entries 0); logits_index (L,) int64 rows of the batch whose logits are wanted."""

    token_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    seq_index: Tensor
    key_lens: Tensor
    block_tables: Tensor
    logits_index: Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


class ModelRunner:
    """GPT-2 (fastlm.models.GPT2) over a paged KV cache. forward(batch) -> final hidden rows (L, d) of
    batch.logits_index, after writing every token's keys/values into the cache; logits(rows) -> (L, V);
    greedy(rows) -> argmax tokens."""

    def __init__(self, model: GPT2, num_blocks: int, block_size: int, pack_weights: bool = True):
        self.model = model
        c = model.config
        self.config = c
        self.device = model.wte.weight.device
        self.dtype = model.wte.weight.dtype
        self.block_size = block_size
        self.cache = KVCache(c.n_layer, num_blocks, c.n_head, block_size, c.head_dim, self.dtype, self.device)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self._ln = self._layer_norm_fn()
        self.use_head_screen = True      # greedy(): the int8-screened argmax where it applies
        self._packed = self._pack_weights() if pack_weights else {}

    # ---- kernels, chosen once ----

    def _layer_norm_fn(self):
        """ln(x, residual or None, weight, bias, eps) -> (out, summed or None): the LayerNorm kernel the
        ops pick for ONE row (as the decode step of a single request), used for every row count so a
        row's result never depends on how many rows share the call. Where that choice is torch's
        F.layer_norm, F.layer_norm (a per-row computation too)."""
        c = self.config
        blk = self.model.blocks[0] if len(self.model.blocks) else None
        w = blk.ln_1.weight if blk is not None else self.model.ln_f.weight
        b = blk.ln_1.bias if blk is not None else self.model.ln_f.bias
        x = torch.zeros(1, c.n_embd, dtype=self.dtype, device=self.device)
        _, plain = layer_norm_kernel(x, None, w, b)
        _, fused = layer_norm_kernel(x, x, w, b)
        n = (c.n_embd,)

        def ln(x: Tensor, res: Optional[Tensor], w: Tensor, b: Tensor, eps: float):
            if res is None:
                return (plain(x, None, w, b, eps)[0] if plain is not None else F.layer_norm(x, n, w, b, eps)), None
            if fused is not None:
                out = fused(x, res, w, b, eps)
                return out[0], out[1]
            s = x + res
            return F.layer_norm(s, n, w, b, eps), s
        return ln

    def _pack_weights(self) -> dict:
        """{id(projection module): linear_rowwise_pack(weight)} for the blocks' fp32/fp16/bf16
        projections, where the cpu kernel has a packed layout (AVX-512): their GEMM-speed path at
        every row count, bit for bit the unpacked values. Costs the projections' size again in fp32
        (GPT-2 small: 340 MB); ModelRunner(pack_weights=False) keeps only the model's weights."""
        out = {}
        for blk in self.model.blocks:
            for mod in (blk.c_attn, blk.c_proj, blk.fc, blk.proj):
                if not isinstance(mod, QUANT_LINEARS):
                    p = linear_rowwise_pack(mod.weight.detach())
                    if p is None:
                        return {}
                    out[id(mod)] = p
        return out

    def _proj(self, mod, x: Tensor, activation: str = "none") -> Tensor:
        """A projection: fp32/fp16/bf16 Linear weights through linear_rowwise (batch-invariant; GELU
        fused when asked; with the packed weight where there is one); a quantized module through its
        own forward."""
        if isinstance(mod, QUANT_LINEARS):
            y = mod(x)
            return y if activation == "none" else F.gelu(y, approximate=activation)
        return linear_rowwise(x, mod.weight, mod.bias, activation, self._packed.get(id(mod)))

    def logits(self, x: Tensor) -> Tensor:
        """x (L, d) final hidden rows (forward's output) -> logits (L, V) in the model's dtype."""
        m = self.model
        if x.shape[0] == 0:
            return x.new_zeros((0, self.config.vocab_size))
        if isinstance(m.lm_head, QUANT_LINEARS):
            return m.lm_head(x)
        return linear_rowwise(x, m.head_weight)

    def greedy(self, x: Tensor) -> list:
        """x (L, d) -> the argmax token of each row's logits (the first largest), as ints. With
        use_head_screen on a CPU fp32 head: ops.linear_argmax through the head's int8 screen (the C++
        kernel, forced), 16 rows at a time: the argmax of each row's exact one-row logits -- the
        same token as logits(x).argmax(-1) -- without reading most of the fp32 head."""
        screen = self.model.head_screen() if self.use_head_screen and x.shape[0] else None
        if screen is not None:
            try:
                with use_backend("cpu"):
                    return torch.cat([linear_argmax(x[i:i + 16], self.model.head_weight, screen)
                                      for i in range(0, x.shape[0], 16)]).tolist()
            except BackendUnavailableError:
                self.use_head_screen = False
        return self.logits(x).argmax(-1).tolist()

    # ---- the forward ----

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> Tensor:
        """Writes the batch's keys/values into the cache and returns the final hidden rows (after ln_f)
        (L, d) of the rows batch.logits_index (L may be 0), for logits() / greedy(). The last layer's
        projection and MLP run on those rows only (no other row's output is read)."""
        m, c = self.model, self.config
        T = batch.num_tokens
        H, D, d = c.n_head, c.head_dim, c.n_embd
        act = c.activation
        ln = self._ln
        h = m.wte(batch.token_ids) + m.wpe(batch.positions)                          # (T, d) residual
        blocks = m.blocks
        x, _ = ln(h, None, blocks[0].ln_1.weight, blocks[0].ln_1.bias, blocks[0].ln_1.eps)
        last = len(blocks) - 1
        for layer, blk in enumerate(blocks):
            qkv = self._proj(blk.c_attn, x).view(T, 3, H, D)
            q, k, v = qkv.unbind(1)                                                 # (T, H, D) strided
            kc, vc = self.cache.keys(layer), self.cache.values(layer)
            paged_kv_write_unchecked(k.contiguous(), v.contiguous(), kc, vc, batch.slot_mapping)
            a = paged_attention_unchecked(q, kc, vc, batch.block_tables, batch.seq_index, batch.key_lens, self.scale)
            a = a.reshape(-1, d)
            if layer == last:                       # only the rows whose logits are wanted go on
                a, h = a[batch.logits_index], h[batch.logits_index]
            a = self._proj(blk.c_proj, a)
            x, h = ln(a, h, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            f = self._proj(blk.fc, x, act)
            f = self._proj(blk.proj, f)
            nxt = blocks[layer + 1].ln_1 if layer < last else m.ln_f
            x, h = ln(f, h, nxt.weight, nxt.bias, nxt.eps)
        if len(blocks) == 0:
            x, _ = ln(h[batch.logits_index], None, m.ln_f.weight, m.ln_f.bias, m.ln_f.eps)
        return x

    # ---- building a batch ----

    def make_batch(self, token_ids: list, positions: list, seq_counts: list, tables: list,
                   logits_rows: list) -> StepBatch:
        """A StepBatch from host lists: token_ids / positions (T,) ints; seq_counts (R,) tokens of each
        sequence (its tokens are consecutive in the batch); tables (R,) block-id lists;
        logits_rows (L,) batch rows whose logits are wanted. The slot of each token is computed from
        its sequence's table on the device (no per-token Python)."""
        dev = self.device
        bs = self.block_size
        R = len(tables)
        width = max((len(t) for t in tables), default=1) or 1
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(R, width)
        tok = torch.tensor(token_ids, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        seq = torch.repeat_interleave(torch.arange(R, dtype=torch.int32), torch.tensor(seq_counts, dtype=torch.int64))
        slots = bt[seq.long(), pos // bs].long() * bs + pos % bs
        out = StepBatch(tok, pos, slots, seq, (pos + 1).to(torch.int32), bt,
                        torch.tensor(logits_rows, dtype=torch.int64))
        if dev.type != "cpu":
            out = StepBatch(*(t.to(dev, non_blocking=True) for t in (out.token_ids, out.positions, out.slot_mapping,
                                                                       out.seq_index, out.key_lens, out.block_tables,
                                                                       out.logits_index)))
        return out
