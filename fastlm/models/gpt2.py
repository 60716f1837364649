"""A compact native GPT-2 built from fastlm's ops, for generation (gpt-fast-sized).

prefill: fused add+LayerNorm, ops.scaled_dot_product_attention (causal, key-padding mask for
left-padded rows), the fused Linear+GELU (ops.linear_gelu); keys/values go to a StaticKVCache without their padding.
decode_step: one token per row, ops.linear (few-row weight-streaming kernel on CPU),
ops.decode_attention over the cache, logits from the tied embedding.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import _ext, backends, ops
from fastlm.ops.decode import decode_attention_unchecked
from fastlm.ops.decode import kernel as decode_attention_kernel
from fastlm.ops.layer_norm import _supports as layer_norm_supports
from fastlm.ops.layer_norm import kernel as layer_norm_kernel
from fastlm.ops.linear import kernel as linear_kernel
# Many-row projections (prefill): the GEMM gelu_ffn's CPU path uses (oneDNN; measured here, interleaved,
# 512x768->2304 4.2 ms vs 9.2 ms for ops.linear's BLAS), == F.linear elsewhere.
from fastlm.ops.linear import dense_linear as _dense_linear
from fastlm.nn import LayerNorm, StaticKVCache
from fastlm.nn.quant_linear import QUANT_LINEARS, Bf16Linear, Int8Linear


def _proj(mod: torch.nn.Module, x: Tensor) -> Tensor:
    """A projection on many rows: a quantized module runs itself (fastlm.quantize), a Linear the GEMM."""
    if isinstance(mod, QUANT_LINEARS):
        return mod(x)
    return _dense_linear(x, mod.weight, mod.bias)


def _tensor(mod: torch.nn.Module, name: str):
    """mod.<name> for a parameter or buffer through the module's dicts (a plain attribute otherwise)."""
    d = mod.__dict__
    t = d["_parameters"].get(name)
    if t is None:
        t = d["_buffers"].get(name)
    return t if t is not None or name in d["_parameters"] or name in d["_buffers"] else getattr(mod, name)


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation: str = "tanh"        # GELU approximation: "tanh" (gelu_new, GPT-2) or "none" (erf)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd


SIZES = {  # --random presets (weights are random, shapes are the released models')
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class Block(torch.nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.c_attn = torch.nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = torch.nn.Linear(c.n_embd, c.n_embd)
        self.ln_2 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.fc = torch.nn.Linear(c.n_embd, c.d_ff)
        self.proj = torch.nn.Linear(c.d_ff, c.n_embd)


class GPT2(torch.nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        c = config
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.n_positions, c.n_embd)
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.lm_head = None  # None: tied to wte (GPT-2); else a weight (vocab, n_embd)

    # ---- construction ----

    @classmethod
    def random(cls, name: str = "gpt2", dtype: torch.dtype | None = None, device=None, seed: int = 0,
               **overrides) -> "GPT2":
        """A model with `name`'s shape (see SIZES) and random weights (N(0, 0.02), as GPT-2 inits)."""
        if name not in SIZES:
            raise ValueError(f"GPT2.random: unknown size {name!r}; known: {sorted(SIZES)}")
        model = cls(GPT2Config(**{**SIZES[name], **overrides}))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.zero_()
                elif "ln" in n:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return model.to(dtype=dtype, device=device).eval()

    @classmethod
    def from_hf(cls, model_or_path, dtype: torch.dtype | None = None, device=None, weights: str | None = None,
                group_size: int | None = None) -> "GPT2":
        """From a transformers GPT2LMHeadModel (or a local folder holding one). Conv1D weights
        (in, out) are transposed once into Linear layout (out, in). dtype/device default to the
        source model's. weights="int8"|"bf16": fastlm.quantize the result (group_size: int8 scales
        per group of inputs). A source already quantized by fastlm.quantize keeps its int8 weights."""
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import GPT2LMHeadModel

            hf = GPT2LMHeadModel.from_pretrained(model_or_path)
        else:
            hf = model_or_path
        if not hasattr(hf, "transformer") or not hasattr(hf.transformer, "wte"):
            raise TypeError(f"GPT2.from_hf: expected a transformers GPT2LMHeadModel, got {type(hf).__name__}")
        hc = hf.config
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or getattr(hc, "reorder_and_upcast_attn", False):
            raise ValueError("GPT2.from_hf: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                             "are not supported")
        if not getattr(hc, "scale_attn_weights", True):
            raise ValueError("GPT2.from_hf: scale_attn_weights=False is not supported")
        act = _ACTIVATIONS.get(hc.activation_function)
        if act is None:
            raise ValueError(f"GPT2.from_hf: activation {hc.activation_function!r} is not supported")
        config = GPT2Config(vocab_size=hc.vocab_size, n_positions=hc.n_positions, n_embd=hc.n_embd,
                            n_layer=hc.n_layer, n_head=hc.n_head, n_inner=hc.n_inner,
                            layer_norm_epsilon=hc.layer_norm_epsilon, activation=act)
        src = hf.transformer
        dtype = dtype or src.wte.weight.dtype
        device = device or src.wte.weight.device
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device).to(dtype)

        def cp(dst: torch.nn.Parameter, t: Tensor, transpose: bool = False):
            t = t.detach()
            dst.data.copy_(t.t() if transpose else t)

        def _moved(mod):   # shared when dtype and device match, else a converted copy (the source stays)
            t = mod.bias if mod.bias is not None else mod.scale
            if t.device == torch.device(device) and (mod.bias is None or mod.bias.dtype == dtype):
                return mod
            return copy.deepcopy(mod).to(device=device, dtype=dtype)

        def cp_proj(blk: Block, name: str, src_mod):
            if isinstance(src_mod, QUANT_LINEARS):       # quantized HF model: its quantized module
                setattr(blk, name, _moved(src_mod))
            else:
                cp(getattr(blk, name).weight, src_mod.weight, True)
                cp(getattr(blk, name).bias, src_mod.bias)

        with torch.no_grad():
            cp(model.wte.weight, src.wte.weight)
            cp(model.wpe.weight, src.wpe.weight)
            for blk, h in zip(model.blocks, src.h):
                cp(blk.ln_1.weight, h.ln_1.weight); cp(blk.ln_1.bias, h.ln_1.bias)
                cp_proj(blk, "c_attn", h.attn.c_attn)
                cp_proj(blk, "c_proj", h.attn.c_proj)
                cp(blk.ln_2.weight, h.ln_2.weight); cp(blk.ln_2.bias, h.ln_2.bias)
                cp_proj(blk, "fc", h.mlp.c_fc)
                cp_proj(blk, "proj", h.mlp.c_proj)
            cp(model.ln_f.weight, src.ln_f.weight); cp(model.ln_f.bias, src.ln_f.bias)
            head_mod = hf.get_output_embeddings()
            if isinstance(head_mod, QUANT_LINEARS):
                model.lm_head = _moved(head_mod)
            elif head_mod.weight.data_ptr() != src.wte.weight.data_ptr():
                model.lm_head = torch.nn.Parameter(head_mod.weight.detach().to(dtype=dtype, device=device).clone(),
                                                   requires_grad=False)
        model = model.eval()
        if weights is not None:
            from fastlm.quant import quantize

            quantize(model, weights=weights, group_size=group_size)
        return model

    # ---- generation ----

    @property
    def head_weight(self) -> Tensor:
        """The LM head's weight (vocab, n_embd); for a quantized head (fastlm.quantize) its dequantized
        fp32 weight, built on each access (the decode path never reads it)."""
        if isinstance(self.lm_head, Int8Linear):
            return self.lm_head.dequantize(self.wte.weight.dtype)
        if isinstance(self.lm_head, QUANT_LINEARS):
            return self.lm_head.weight.to(self.wte.weight.dtype)
        return self.wte.weight if self.lm_head is None else self.lm_head

    @property
    def quantized(self) -> bool:
        """Whether fastlm.quantize replaced the projections (int8 or bf16 weights)."""
        return isinstance(self.blocks[0].c_attn, QUANT_LINEARS) if len(self.blocks) else False

    def new_cache(self, batch: int, max_seq: int) -> StaticKVCache:
        c = self.config
        return StaticKVCache(c.n_layer, batch, c.n_head, max_seq, c.head_dim, dtype=self.wte.weight.dtype,
                             device=self.wte.weight.device)

    def _mlp(self, blk: Block, x: Tensor) -> Tensor:
        if isinstance(blk.fc, Int8Linear):        # W8A8 fuses the GELU into the fc call
            return _proj(blk.proj, blk.fc.forward_gelu(x, self.config.activation))
        if isinstance(blk.fc, QUANT_LINEARS):
            return _proj(blk.proj, F.gelu(blk.fc(x), approximate=self.config.activation))
        if x.dim() == 2 and x.shape[0] <= 16:
            # decode: the weight-streaming linear, GELU on the few rows in between
            h = F.gelu(ops.linear(x, blk.fc.weight, blk.fc.bias), approximate=self.config.activation)
            return ops.linear(h, blk.proj.weight, blk.proj.bias)
        # prefill: Linear + bias + GELU fused (ops.linear_gelu), then the projection on BLAS. (The fully
        # fused ops.gelu_ffn is the same math; on CPU its kernel is slower than BLAS for many rows.)
        h = ops.linear_gelu(x, blk.fc.weight, blk.fc.bias, approximate=self.config.activation)
        return _dense_linear(h, blk.proj.weight, blk.proj.bias)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, cache: StaticKVCache, pad_counts: Tensor | None = None,
                greedy: bool = False, topk: int = 0) -> Tensor:
        """input_ids (B, S), left-padded with pad_counts[b] pads (None: none). Fills the cache (row b's
        real tokens at positions [0, S - pad_counts[b])) and returns the last position's logits (B, V),
        or with greedy=True their argmax (B,) int64, or with topk > 0 top-k logits (as decode_step)."""
        c = self.config
        B, S = input_ids.shape
        H, D = c.n_head, c.head_dim
        ar = torch.arange(S, device=input_ids.device)
        if pad_counts is None:
            pos = ar.expand(B, S)
            mask, causal = None, True
        else:
            pc = pad_counts.to(input_ids.device).long()
            pos = (ar[None, :] - pc[:, None]).clamp(min=0)                                   # per-row positions
            real = ar[None, :] >= pc[:, None]                                                # (B, S) keys
            allowed = (ar[None, :, None] >= ar[None, None, :]) & (real[:, None, :] | torch.eye(S, dtype=torch.bool,
                                                                                            device=ar.device)[None])
            mask, causal = allowed[:, None], False   # (B, 1, S, S); a pad query sees itself only (no NaN)
        h = self.wte(input_ids) + self.wpe(pos)                                              # (B, S, d)
        x = None
        for layer, blk in enumerate(self.blocks):
            if x is None:
                x = ops.layer_norm(h, (c.n_embd,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            qkv = _proj(blk.c_attn, x).view(B, S, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # (B, H, S, D)
            cache.fill(layer, k, v, pad_counts)
            a = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            a = _proj(blk.c_proj, a.transpose(1, 2).reshape(B, S, c.n_embd))
            x, h = ops.add_layer_norm(a, h, (c.n_embd,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            m = self._mlp(blk, x)
            nxt = self.blocks[layer + 1].ln_1 if layer + 1 < len(self.blocks) else None
            if nxt is not None:
                x, h = ops.add_layer_norm(m, h, (c.n_embd,), nxt.weight, nxt.bias, nxt.eps)
            else:
                h = m + h
        last = h[:, -1]                                                                       # (B, d)
        x = ops.layer_norm(last, (c.n_embd,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        lengths = torch.full((B,), S, dtype=torch.int32, device=input_ids.device)
        if pad_counts is not None:
            lengths -= pad_counts.to(lengths)
        cache.set_lengths(lengths)
        return self._head(x, ops.linear, greedy, topk)

    def _head(self, x: Tensor, lin, greedy: bool, topk: int = 0) -> Tensor:
        """Logits (B, V) of the final hidden rows x; with greedy their argmax (B,); with topk > 0
        logits that are exact wherever they can be among the row's topk largest and -inf elsewhere
        (so top-k sampling draws the same tokens). On CPU in fp32 both go through the head's int8
        screen (ops.linear_argmax / ops.linear_topk_logits); elsewhere the full logits."""
        if isinstance(self.lm_head, QUANT_LINEARS):
            # A quantized head: its own logits (ops.linear_int8 reads the int8 head once, N * K bytes,
            # what the fp32 head's int8 screen reads). greedy = the exact argmax of these logits (of
            # the dequantized head's product in fp32); top-k: the full logits (exact everywhere).
            logits = self.lm_head(x)
            return logits.argmax(-1) if greedy else logits
        screen = self.head_screen() if (greedy or topk > 0) and x.shape[0] <= 16 else None
        if greedy:
            if screen is not None:
                return ops.linear_argmax(x, self.head_weight, screen)
            return lin(x, self.head_weight, None).argmax(-1)
        if topk > 0 and screen is not None:
            return ops.linear_topk_logits(x, self.head_weight, min(topk, self.head_weight.shape[0]), screen)
        return lin(x, self.head_weight, None)

    def _decode_kernels(self, x: Tensor):
        """(linear, add_layer_norm, decode_attention, linear and LayerNorm are all the C++ kernels)
        for a decode step on `x` (B, d): the kernels the ops choose for these shapes (fastlm.ops'
        `kernel(...)`: the measured auto, or the backend fastlm.use_backend forces).

        A CPU decode step makes ~100 op calls; through the public ops each pays its argument checks,
        backend selection and wrappers (~10-30 us: ~2 ms a step at batch 1, next to ~10 ms of weight
        reads). The step's shapes and dtypes hold by construction, so where every projection's chosen
        backend is one raw kernel, it is called directly; otherwise the public ops (which choose per
        call). Memoized per (device, dtype, batch, forced backend, choice epoch).
        add_layer_norm(x, residual or None, w, b, eps) -> (out, summed). Returns (linear, add_layer_norm,
        decode_attention, all_cpp: linear is the C++ kernel and the C++ LayerNorm can run these rows,
        ln_cpp: the C++ LayerNorm can: the conditions, with C++ attention, for fastlm_C::decode_layers)."""
        if torch.compiler.is_compiling():
            return self._generic_kernels() + (False, False)
        memo_key = (x.device, x.dtype, x.shape[0], backends.current_backend(), backends.choice_epoch())
        memo = self.__dict__.setdefault("_decode_kernel_memo", {})
        hit = memo.get(memo_key)
        if hit is not None:
            return hit
        lin, ln, att = self._generic_kernels()
        blk = self.blocks[0]
        # a quantized model's projections are chosen by _quant_linear (their weights are not Linear's:
        # asking ops.linear about them raised under a forced backend)
        picks = set() if self.quantized else {linear_kernel(inp, w, b)[1] for inp, w, b in (
            (x, blk.c_attn.weight, blk.c_attn.bias), (x, blk.c_proj.weight, blk.c_proj.bias),
            (x, blk.fc.weight, blk.fc.bias),
            (x.new_zeros((x.shape[0], blk.fc.weight.shape[0])), blk.proj.weight, blk.proj.bias))}
        lin_cpp = ln_cpp = False
        if len(picks) == 1:
            lin = picks.pop()
            lin_cpp = _ext.load() is not None and lin is torch.ops.fastlm_C.linear_fwd
        ln_kernels = {layer_norm_kernel(x, res, blk.ln_2.weight, blk.ln_2.bias)[1] for res in (None, x)}
        if len(ln_kernels) == 1 and None not in ln_kernels:
            raw = ln_kernels.pop()
            ln_cpp = _ext.load() is not None and raw is torch.ops.fastlm_C.layer_norm_fwd

            def ln(x, res, w, b, eps):
                out = raw(x, res, w, b, eps)
                return out[0], out[1]
        # The C++ layer loop (decode_layers) runs fastlm's LayerNorm kernel even where the per-call choice
        # above is torch's: at decode rows the two kernels take a few microseconds each (measured within
        # noise of each other), while looping in C++ saves the step's ~100 Python op calls (~2 ms a step
        # at batch 1, measured: GPT-2 int8 11.3 -> 9.3 ms).
        ln_loop = ln_cpp or (_ext.load() is not None and x.device.type == "cpu"
                             and layer_norm_supports(x, (blk.ln_2.weight, blk.ln_2.bias))("cpu") is None)
        out = (lin, ln, att, lin_cpp and ln_loop, ln_loop)
        memo.clear()
        memo[memo_key] = out
        return out

    def _generic_ln(self, x, res, w, b, eps):
        n = self.config.n_embd
        if res is None:
            return ops.layer_norm(x, (n,), w, b, eps), None
        return ops.add_layer_norm(x, res, (n,), w, b, eps)

    def _generic_kernels(self):
        def att(q, k, v, lens, scale):   # the op's choice (a cached lookup per call), unchecked
            return decode_attention_unchecked(q.contiguous(), k, v, lens, scale)

        return ops.linear, self._generic_ln, att

    def _cpp_layer_loop(self, x: Tensor, cache: StaticKVCache, lens: Tensor, scale: float) -> bool:
        """Whether decode attention on this step is the C++ kernel and FASTLM_DECODE_LAYERS is not 0: the
        condition (with C++ projections and LayerNorms) for fastlm_C::decode_layers."""
        c = self.config
        return (os.environ.get("FASTLM_DECODE_LAYERS", "1") != "0"
                and decode_attention_kernel(x.new_zeros((x.shape[0], c.n_head, c.head_dim)), cache.keys(0),
                                            cache.values(0), lens, scale)[1] is torch.ops.fastlm_C.decode_attention_fwd)

    def _layer_modules(self) -> list:
        """Per block (c_attn, c_proj, ln_2, fc, proj, the next LayerNorm: the following block's ln_1, or
        ln_f), read through the modules' own dicts: nn.Module attribute lookups cost ~1 us each and the
        decode step reads ~200 of them (they were ~0.6 ms of a 10 ms int8 step); nothing is cached, so
        a replaced module or tensor is seen on the next step."""
        blocks = [b._modules for b in self._modules["blocks"]._modules.values()]
        nxt = [b["ln_1"] for b in blocks[1:]] + [self._modules["ln_f"]]
        return [(b["c_attn"], b["c_proj"], b["ln_2"], b["fc"], b["proj"], n) for b, n in zip(blocks, nxt)]

    def _decode_layer_eps(self) -> list:
        return [e for _, _, ln_2, _, _, nxt in self._layer_modules() for e in (ln_2.eps, nxt.eps)]

    def _decode_layer_weights(self) -> list:
        """Per block: c_attn, c_proj, ln_2, fc, proj and the next LayerNorm (the following block's
        ln_1, or ln_f), weight then bias: fastlm_C::decode_layers' `weights`."""
        out = []
        for mods in self._layer_modules():
            for m in mods:
                out += [_tensor(m, "weight"), _tensor(m, "bias")]
        return out

    def _quant_layer_weights(self, x: Tensor, proj) -> "list | None":
        """fastlm_C::decode_layers' `weights` for a quantized model's step on x (B, C): per block the
        fp32 list with each projection's qweight for its weight, then the 4 scales (W8A32: what
        _quant_linear's raw linear_int8_fwd computes) and, where the step's projections are W8A8 (2+
        rows), the 4 packed weights; bf16 weights (proj.raw linear_w16_fwd): the fp32 list's 12 with
        the bf16 projection weights. None where the step must go through the modules."""
        layers = self._layer_modules()
        if getattr(proj, "raw", None) is torch.ops.fastlm_C.linear_w16_fwd:   # bf16 weights: 12 a layer
            out = []
            for mods in layers:
                for i, m in enumerate(mods):
                    w, b = _tensor(m, "weight"), _tensor(m, "bias")
                    if i in (0, 1, 3, 4) and (type(m) is not Bf16Linear or b is None or b.dtype != x.dtype
                                              or not w.is_contiguous()):
                        return None
                    out += [w, b]
            return out
        for mods in layers:
            for m in (mods[0], mods[1], mods[3], mods[4]):
                b = _tensor(m, "bias") if type(m) is Int8Linear else None
                if b is None or b.dtype != x.dtype:
                    return None
        w8a8 = getattr(proj, "w8a8", False)
        if not w8a8 and getattr(proj, "raw", None) is not torch.ops.fastlm_C.linear_int8_fwd:
            return None
        out = []
        for c_attn, c_proj, ln_2, fc, pr, ln_next in layers:
            qs = (c_attn, c_proj, fc, pr)
            out += [_tensor(c_attn, "qweight"), _tensor(c_attn, "bias"), _tensor(c_proj, "qweight"),
                    _tensor(c_proj, "bias"), _tensor(ln_2, "weight"), _tensor(ln_2, "bias"), _tensor(fc, "qweight"),
                    _tensor(fc, "bias"), _tensor(pr, "qweight"), _tensor(pr, "bias"), _tensor(ln_next, "weight"),
                    _tensor(ln_next, "bias")] + [_tensor(m, "scale") for m in qs]
            if w8a8:
                packed = [m.w8a8_packed() for m in qs]
                if any(p is None for p in packed):
                    return None
                out += packed
        return out

    def head_screen(self) -> "ops.LinearArgmaxScreen | None":
        """The int8 screen of the LM head (built on first use, ~N*K bytes; rebuilt when the head weight
        changes) for greedy decode steps on CPU in fp32; None where it does not apply."""
        if isinstance(self.lm_head, QUANT_LINEARS):
            return None
        w = self.head_weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return None
        screen = self.__dict__.get("_head_screen")
        if screen is None or not screen.matches(w):
            try:
                screen = ops.LinearArgmaxScreen.build(w)
            except backends.BackendUnavailableError:
                return None
            self.__dict__["_head_screen"] = screen   # not a buffer: stays out of state_dict
        return screen

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: StaticKVCache, greedy: bool = False, topk: int = 0) -> Tensor:
        """tokens (B,) long, one new token per row, at position cache.lengths[b] of its row. Appends
        to the cache, advances it, and returns the logits (B, V), or with greedy=True the argmax token
        of each row (B,) int64 (on CPU in fp32: ops.linear_argmax over the head's int8 screen, the
        same tokens as the logits' argmax without reading the head in fp32), or with topk > 0 logits
        exact wherever they can be among the topk largest and -inf elsewhere (CPU fp32:
        ops.linear_topk_logits; top-k sampling on them draws what it draws on the full logits).
        No host sync (CUDA-graph safe)."""
        c = self.config
        B = tokens.shape[0]
        H, D = c.n_head, c.head_dim
        cache.check_room()                                  # once a step, not per layer
        pos = cache.lengths.long()
        lens = cache.next_lengths()
        idx = cache.step_index()                            # where this step's keys/values go, every layer
        scale = 1.0 / math.sqrt(D)
        h = self.wte(tokens) + self.wpe(pos)                                                  # (B, d)
        if self.quantized:
            return self._decode_step_quantized(h, cache, idx, lens, scale, greedy, topk)
        lin, ln, att, all_cpp, _ = self._decode_kernels(h)
        act = self.config.activation
        gelu = F.gelu
        nb = len(self.blocks)
        x, _ = ln(h, None, self.blocks[0].ln_1.weight, self.blocks[0].ln_1.bias, self.blocks[0].ln_1.eps)
        if all_cpp and self._cpp_layer_loop(x, cache, lens, scale):
            # the same kernels in the same order, looped in C++ (csrc/cpu/decode_layers.cpp): no Python
            # between them. FASTLM_DECODE_LAYERS=0 runs the Python loop below.
            x, h = torch.ops.fastlm_C.decode_layers(x, h, self._decode_layer_weights(), cache.k, cache.v, idx, lens,
                                                    scale, act, self._decode_layer_eps())
            cache.advance()
            return self._head(x, lin, greedy, topk)
        for layer, blk in enumerate(self.blocks):
            qkv = lin(x, blk.c_attn.weight, blk.c_attn.bias).view(B, 3, H, D)
            q, k, v = qkv.unbind(1)                                        # (B, H, D), rows strided
            cache.append(layer, k, v, check=False, index=idx)
            a = att(q, cache.keys(layer), cache.values(layer), lens, scale)  # kernels take strided q
            a = lin(a.reshape(B, c.n_embd), blk.c_proj.weight, blk.c_proj.bias)
            x, h = ln(a, h, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            m = lin(gelu(lin(x, blk.fc.weight, blk.fc.bias), approximate=act), blk.proj.weight, blk.proj.bias)
            nxt = self.blocks[layer + 1].ln_1 if layer + 1 < nb else self.ln_f
            x, h = ln(m, h, nxt.weight, nxt.bias, nxt.eps)
        cache.advance()
        return self._head(x, lin, greedy, topk)

    def _quant_linear(self, x: Tensor):
        """proj(mod, x) for the decode step's quantized projections: the C++ int8 kernel called directly
        where ops.linear_int8 would pick it (the step's shapes and dtypes hold by construction: no
        per-call checks), else the module itself (the public op). proj.raw is that kernel (or None);
        proj.w8a8 says the modules run W8A8 on these rows through the C++ kernel (ops.linear_w8a8's
        choice), which decode_layers can call in their place."""
        ok = lambda backend: None if backend == "reference" or x.dtype in (  # noqa: E731
            torch.float32, torch.float16, torch.bfloat16) else "dtype"
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and isinstance(self.blocks[0].c_attn,
                                                                                        Int8Linear):
            if getattr(self.blocks[0].c_attn, "activations", None) is None or x.shape[0] == 1:  # W8A32
                if backends.select("linear_int8", x.device, ok) == "cpu":
                    raw = torch.ops.fastlm_C.linear_int8_fwd

                    def proj(mod, x):
                        return raw(x, mod.qweight, mod.scale, mod.bias)
                    proj.raw, proj.w8a8 = raw, False
                    return proj
            elif backends.select("linear_w8a8", x.device, ok) == "cpu":
                proj = lambda mod, x: mod(x)  # noqa: E731
                proj.raw, proj.w8a8 = None, True
                return proj
        if (x.device.type == "cpu" and not torch.compiler.is_compiling() and isinstance(self.blocks[0].c_attn, Bf16Linear)
                and x.dtype in (torch.float32, torch.float16) and _ext.has_kernel("linear_w16_fwd", "CPU")):
            # bf16 weights: the kernel ops.linear_bf16w calls on these inputs (fp32 / fp16 rows, bias in
            # the rows' dtype, contiguous bf16 weight: what _quant_layer_weights checks per module)
            raw = torch.ops.fastlm_C.linear_w16_fwd

            def proj(mod, x):
                return raw(x, mod.weight, mod.bias)
            proj.raw, proj.w8a8 = raw, False
            return proj
        return lambda mod, x: mod(x)

    def _decode_step_quantized(self, h: Tensor, cache: StaticKVCache, idx: Tensor, lens: Tensor, scale: float,
                               greedy: bool, topk: int) -> Tensor:
        """decode_step's layer loop for a quantized model (fastlm.quantize): the same ops in the same
        order as the fp32 loop, with every projection on the quantized weights."""
        c = self.config
        B = h.shape[0]
        H, D = c.n_head, c.head_dim
        _, ln, att, _, ln_cpp = self._decode_kernels(h)
        proj = self._quant_linear(h)
        act = c.activation
        nb = len(self.blocks)
        x, _ = ln(h, None, self.blocks[0].ln_1.weight, self.blocks[0].ln_1.bias, self.blocks[0].ln_1.eps)
        weights = self._quant_layer_weights(x, proj) if ln_cpp and self._cpp_layer_loop(x, cache, lens, scale) else None
        if weights is not None:  # the loop below in C++ (decode_layers on the int8 projections)
            x, h = torch.ops.fastlm_C.decode_layers(x, h, weights, cache.k, cache.v, idx, lens, scale, act,
                                                    self._decode_layer_eps())
            cache.advance()
            return self._head(x, None, greedy, topk)
        for layer, blk in enumerate(self.blocks):
            qkv = proj(blk.c_attn, x).view(B, 3, H, D)
            q, k, v = qkv.unbind(1)                                        # (B, H, D), rows strided
            cache.append(layer, k, v, check=False, index=idx)
            a = att(q, cache.keys(layer), cache.values(layer), lens, scale)
            a = proj(blk.c_proj, a.reshape(B, c.n_embd))
            x, h = ln(a, h, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            g = blk.fc.forward_gelu(x, act) if getattr(proj, "w8a8", False) else F.gelu(proj(blk.fc, x), approximate=act)
            m = proj(blk.proj, g)
            nxt = self.blocks[layer + 1].ln_1 if layer + 1 < nb else self.ln_f
            x, h = ln(m, h, nxt.weight, nxt.bias, nxt.eps)
        cache.advance()
        return self._head(x, None, greedy, topk)

    @torch.no_grad()
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits of the last position (B, V) for unpadded input_ids (B, S)."""
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        return self.prefill(input_ids, cache)
