"""`fastlm.patch(model)` / `fastlm.unpatch(model)`: fastlm's fused ops inside Hugging Face models, in place.

How it works (everything is driven by the table `_RULES` below, nothing is written per model):

- **Attention.** transformers 5.x routes GPT-2's and BERT's attention core through its
  `AttentionInterface`. fastlm registers `"fastlm"` there (`fastlm_attention_forward`, which calls
  `fastlm.ops.scaled_dot_product_attention`) and registers the SDPA mask format (boolean masks, `None`
  when a plain causal/full mask can be expressed by `is_causal`) under the same name with the mask
  interface. `patch` points the model at it with `model.set_attn_implementation("fastlm")`; the
  previous implementation is restored by `unpatch`. `from_pretrained(..., attn_implementation="fastlm")`
  works once fastlm is imported (the registration runs when transformers is first imported). A call that
  asks for attention weights (`output_attentions=True`) runs the model's eager attention for that call
  and returns them (fastlm's fused kernel never materializes them), so HF's assisted generate works too.
- **Modules.** A rule names a module class (by import path, resolved lazily: fastlm imports without
  transformers) and the fastlm forward that replaces its forward. Patching swaps the module's
  `__class__` for a subclass carrying that forward: the module object, its parameters (never copied),
  buffers, hooks and state_dict keys stay exactly as they were, `isinstance` still holds (HF's output
  recorders keep working), and `unpatch` swaps the original class back.
  Exact type matches only: a user subclass with its own forward is left alone (and reported).

Projections: GPT-2's Conv1D modules and BERT's output denses run, on the CPU in fp32, on oneDNN's
GEMMs (`fastlm.ops.linear.dense_linear`, forward and backward: ~2x the MKL sgemm behind torch.addmm /
F.linear on the 2-core CI machine); elsewhere they are the original ops.

Numerics: the fastlm forwards compute the same math as the modules they replace (GPT-2's "gelu_new"
is the tanh GELU, BERT's "gelu" the exact one); dropout modules are called as before, so train mode
is honoured; cross-attention paths fall back to the original forward.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from fastlm import ops
from fastlm.ops.linear import dense_linear as _linear    # F.linear; oneDNN's GEMMs on CPU fp32

logger = logging.getLogger("fastlm.patch")

ATTN_IMPLEMENTATION = "fastlm"
_STATE_ATTR = "_fastlm_patch_state"        # on the patched root module: what patch() changed


class PatchWarning(UserWarning):
    """patch()/unpatch() could not do everything asked (unsupported parts, already patched, ...)."""


# ------------------------------------------------------------------ fastlm forwards (the replacements)

def _add_ln(ln: torch.nn.LayerNorm, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """(ln(x + residual), x + residual) in one fused pass; `ln` only lends its parameters."""
    return ops.add_layer_norm(x, residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class _GPT2BlockForward:
    """GPT2Block: the residual add after attention is fused into ln_2 (add_layer_norm)."""

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):
        if encoder_hidden_states is not None:     # cross-attention: the original code path
            return super().forward(hidden_states, past_key_values, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask, use_cache, **kwargs)
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_output, _ = self.attn(hidden_states, past_key_values=past_key_values, attention_mask=attention_mask,
                                   use_cache=use_cache, **kwargs)
        hidden_states, residual = _add_ln(self.ln_2, attn_output, residual)
        return residual + self.mlp(hidden_states)


class _GPT2MLPForward:
    """GPT2MLP: c_fc -> tanh GELU -> c_proj as one fused FFN. Conv1D stores weights (in, out); the FFN
    takes F.linear's (out, in), so it gets `.t()` views of the stored weights (no copy)."""

    def forward(self, hidden_states):
        y = ops.gelu_ffn(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(),
                         self.c_proj.bias, approximate=self._fastlm_approximate)
        return self.dropout(y)


class _Conv1DForward:
    """transformers' Conv1D (GPT-2's attention projections): x @ W + b, W stored (in, out). On CPU fp32
    it runs oneDNN's GEMMs (forward and backward) with W as it is stored (~2x the MKL sgemm of the
    original addmm on the 2-core CI machine); elsewhere (GPU, other dtypes) the original forward."""

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return _linear(x, self.weight.t(), self.bias)
        return super().forward(x)


class _BertAddNormForward:
    """BertSelfOutput and BertOutput: dense -> dropout -> LayerNorm(. + input_tensor), the add fused."""

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(_linear(hidden_states, self.dense.weight, self.dense.bias))
        return _add_ln(self.LayerNorm, hidden_states, input_tensor)[0]


class _BertLayerForward:
    """BertLayer: the feed-forward (BertIntermediate + BertOutput) as the fused GELU FFN + add_layer_norm."""

    def feed_forward_chunk(self, attention_output):
        inter, out = self.intermediate, self.output
        y = ops.gelu_ffn(attention_output, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                         approximate=self._fastlm_approximate)
        return _add_ln(out.LayerNorm, out.dropout(y), attention_output)[0]


def _weights_requested(kwargs) -> bool:
    """True when this call's caller asked for attention weights: `output_attentions=True` reaching the
    attention function (older transformers) or, in transformers 5.x, HF's output recorder collecting
    "attentions" for the current forward (set by `output_attentions=True` or `config.output_attentions`)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:                       # another transformers layout: only the kwarg tells
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _eager_mask(attention_mask: Optional[Tensor], is_causal: bool, q_len: int, kv_len: int,
                dtype: torch.dtype, device) -> Optional[Tensor]:
    """The mask in the additive form eager attention adds to its scores: bool (True = attend) -> 0 or the
    dtype's min (as HF's eager mask); None + causal -> the top-left aligned causal mask over kv_len (keys
    past q_len, an unwritten static-cache tail, get zero weight)."""
    if attention_mask is None:
        if not is_causal:
            return None
        attention_mask = (torch.arange(kv_len, device=device)[None, :]
                          <= torch.arange(q_len, device=device)[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(attention_mask, zero, torch.finfo(dtype).min)
    return attention_mask


def _eager_attention(module, query, key, value, mask, dropout, scaling, **kwargs):
    """The model's own eager attention (`eager_attention_forward` of the module's modeling file, the function
    HF itself uses to return weights), else the same math here. -> ((B, S, H, D), weights (B, H, Sq, Sk))."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is not None:
        return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        w = w + mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def fastlm_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-interface function for "fastlm": query/key/value (B, H, S, D), the mask in
    SDPA format (bool, True = attend; or additive; None when is_causal covers it). Returns ((B, S, H, D), None)
    through fastlm's fused attention; when the caller asked for attention weights (`output_attentions=True`,
    or `config.output_attentions`), that call goes through the model's eager attention instead and returns
    ((B, S, H, D), weights (B, H, Sq, Sk)), as the unpatched eager model does."""
    enable_gqa = False
    if getattr(module, "num_key_value_groups", 1) > 1:
        enable_gqa = True
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # the mask interface returns None exactly when is_causal (top-left aligned) or no mask is right
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if _weights_requested(kwargs):
        mask = _eager_mask(attention_mask, is_causal, q_len, kv_len, query.dtype, query.device)
        kwargs.pop("output_attentions", None)
        return _eager_attention(module, query, key, value, mask, dropout, scaling, **kwargs)
    if is_causal and kv_len > q_len:          # empty static cache at prefill: the tail is unwritten
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------ the table

def _approximate_of(act) -> Optional[str]:
    """The F.gelu `approximate` equivalent to a transformers activation module, or None."""
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is not None:
        fn = act.act
        if fn is torch.nn.functional.gelu or getattr(fn, "__name__", "") == "gelu":
            return "none"
        return None                       # gelu_python: the erf formula; same math but keep it exact-typed
    return {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh"}.get(name)


def _gpt2_mlp_check(m) -> Optional[str]:
    approx = _approximate_of(m.act)
    if approx is None:
        return f"activation {type(m.act).__name__} has no fused GELU equivalent"
    m._fastlm_approximate = approx
    return None


def _bert_layer_check(m) -> Optional[str]:
    approx = _approximate_of(m.intermediate.intermediate_act_fn)
    if approx is None:
        return f"activation {type(m.intermediate.intermediate_act_fn).__name__} has no fused GELU equivalent"
    if type(m.intermediate).__name__ != "BertIntermediate" or type(m.output).__name__ != "BertOutput":
        return "intermediate/output are not the stock BertIntermediate/BertOutput"   # (parents are visited first)
    m._fastlm_approximate = approx
    return None


@dataclass(frozen=True)
class Rule:
    source: str                                    # "module.path:ClassName" of the class replaced
    forward: object                                # a mixin with the fastlm forward, or a ready fastlm class
    what: str                                      # human-readable, for the report
    check: Optional[Callable] = None               # module -> None (ok, may set attrs) or a reason not to
    attrs: tuple[str, ...] = ()                    # instance attributes `check` sets (removed by unpatch)


_GPT2 = "transformers.models.gpt2.modeling_gpt2"
_BERT = "transformers.models.bert.modeling_bert"

_RULES: tuple[Rule, ...] = (
    Rule(f"{_GPT2}:GPT2Block", _GPT2BlockForward, "residual add + ln_2 -> add_layer_norm"),
    Rule(f"{_GPT2}:GPT2MLP", _GPT2MLPForward, "c_fc + tanh GELU + c_proj -> gelu_ffn", _gpt2_mlp_check,
         ("_fastlm_approximate",)),
    Rule("transformers.pytorch_utils:Conv1D", _Conv1DForward, "Conv1D -> oneDNN GEMM (CPU fp32)"),
    Rule(f"{_BERT}:BertSelfOutput", _BertAddNormForward, "dense + dropout + add & LayerNorm -> add_layer_norm"),
    Rule(f"{_BERT}:BertOutput", _BertAddNormForward, "dense + dropout + add & LayerNorm -> add_layer_norm"),
    Rule(f"{_BERT}:BertLayer", _BertLayerForward, "BertIntermediate + BertOutput -> gelu_ffn + add_layer_norm",
         _bert_layer_check, ("_fastlm_approximate",)),
    Rule("torch.nn:LayerNorm", "fastlm.nn:LayerNorm", "LayerNorm -> fastlm.nn.LayerNorm"),
    Rule("torch.nn:MultiheadAttention", "fastlm.nn:MultiheadAttention",
         "MultiheadAttention -> fastlm.nn.MultiheadAttention"),
)


def _resolve(path: str):
    mod, _, name = path.partition(":")
    if mod.startswith("transformers") and "transformers" not in sys.modules:
        return None                       # a model cannot hold transformers classes if it was never imported
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return None


_swapped: dict[type, type] = {}          # original class -> fastlm class
_originals: dict[type, type] = {}        # fastlm class -> original class


def _fastlm_class(rule: Rule, source: type) -> Optional[type]:
    if source in _swapped:
        return _swapped[source]
    if isinstance(rule.forward, str):
        cls = _resolve(rule.forward)
        if cls is None or not issubclass(cls, source):
            return None
    else:
        cls = type(f"Fastlm{source.__name__}", (rule.forward, source),
                   {"__module__": __name__, "__qualname__": f"Fastlm{source.__name__}",
                    "__doc__": f"{source.__name__} with fastlm's fused forward ({rule.what})."})
        globals()[cls.__name__] = cls     # picklable
    _swapped[source], _originals[cls] = cls, source
    return cls


# ------------------------------------------------------------------ attention-interface registration

_registered = False


def register() -> bool:
    """Register "fastlm" with transformers' AttentionInterface and AttentionMaskInterface (idempotent).
    Returns False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastlm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _fastlm_mask(sdpa_mask))
    _registered = True
    return True


def _fastlm_mask(sdpa_mask):
    """The mask interface for "fastlm": SDPA's format (bool, True = attend; None where `is_causal` or no
    mask says it all), except that a bidirectional mask with padding (BERT) is returned as the (B, 1, 1, Sk)
    key-padding mask it is, which ops.scaled_dot_product_attention takes on its fast path, instead of
    a materialized (B, 1, Sq, Sk) one."""
    from transformers.masking_utils import bidirectional_mask_function, prepare_padding_mask

    def fastlm_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, local_size=None, allow_is_causal_skip=True,
                    allow_is_bidirectional_skip=False, **kwargs):
        if (mask_function is bidirectional_mask_function and local_size is None and attention_mask is not None
                and attention_mask.dim() == 2 and not torch.compiler.is_compiling()):
            pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
            if allow_is_bidirectional_skip and bool(pad.all()):
                return None
            return pad[:, None, None, :].to(torch.bool)
        kwargs.update(q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                      allow_is_causal_skip=allow_is_causal_skip,
                      allow_is_bidirectional_skip=allow_is_bidirectional_skip)
        if mask_function is not None:
            kwargs["mask_function"] = mask_function
        return sdpa_mask(batch_size, q_length, kv_length, **kwargs)

    return fastlm_mask


class _RegisterOnImport:
    """A sys.meta_path finder that registers "fastlm" right after transformers.modeling_utils is imported,
    so `from_pretrained(..., attn_implementation="fastlm")` works without fastlm importing transformers."""
    _target = "transformers.modeling_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self._target:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_and_register(module, _exec=exec_module):
                    _exec(module)
                    try:
                        if self in sys.meta_path:
                            sys.meta_path.remove(self)
                        register()
                    except Exception as e:  # never break importing transformers
                        logger.warning("fastlm: could not register the 'fastlm' attention: %s", e)

                spec.loader.exec_module = exec_and_register
                return spec
        return None


def install_import_hook() -> None:
    """Called by `import fastlm`: register now if transformers is loaded, else when it is."""
    if "transformers.modeling_utils" in sys.modules:
        try:
            register()
        except Exception as e:  # pragma: no cover - a broken transformers must not break import fastlm
            logger.warning("fastlm: could not register the 'fastlm' attention: %s", e)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


# ------------------------------------------------------------------ patch / unpatch

@dataclass
class PatchReport:
    replaced: dict[str, int] = field(default_factory=dict)        # "what" -> count
    attention: list[str] = field(default_factory=list)            # models pointed at "fastlm"
    skipped: list[str] = field(default_factory=list)              # "name (Class): reason"
    already: list[str] = field(default_factory=list)              # names already fastlm

    @property
    def changed(self) -> bool:
        return bool(self.replaced or self.attention)

    def __str__(self) -> str:
        lines = []
        for what, n in self.replaced.items():
            lines.append(f"  replaced {n} x {what}")
        for a in self.attention:
            lines.append(f"  attention of {a} -> fastlm.ops.scaled_dot_product_attention")
        for s in self.skipped:
            lines.append(f"  not replaced: {s}")
        if self.already:
            lines.append(f"  already patched: {len(self.already)} module(s), e.g. {self.already[0]}")
        if not lines:
            lines.append("  nothing to replace (no supported module found)")
        return "\n".join(lines)


def _pretrained_roots(model: torch.nn.Module):
    """The outermost transformers PreTrainedModels inside `model` (model itself included)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots, seen = [], []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(p + ".") or p == "" for p in seen):
            roots.append((name, m))
            seen.append(name)
    return roots


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, the parts of `model` that fastlm has fused ops for (see the module docstring);
    parameters are shared, never copied. Logs what was replaced; warns (PatchWarning) when something
    supported was left alone or the model was already patched. Returns `model`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastlm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        report.already = [n for n, _ in state["modules"]] + [n for n, _ in state["attention"]]
        model.fastlm_patch_report = report
        warnings.warn(f"fastlm.patch: {type(model).__name__} is already patched; nothing changed.\n{report}",
                      PatchWarning, stacklevel=2)
        return model

    rules = [(r, _resolve(r.source)) for r in _RULES]
    rules = [(r, cls) for r, cls in rules if cls is not None]
    by_class = {cls: r for r, cls in rules}
    changed_modules, changed_attn = [], []

    for name, m in model.named_modules():
        t = type(m)
        if t in _originals or (t.__module__.startswith("fastlm.nn") and t not in by_class):
            report.already.append(name or "<root>")          # already fastlm (patched, or fastlm.nn itself)
            continue
        rule = by_class.get(t)
        if rule is None:
            for src, r in ((c, r) for r, c in rules):   # a subclass of a replaced class: say so, leave it
                if isinstance(m, src) and t not in _originals:
                    report.skipped.append(f"{name or '<root>'} ({t.__name__}): a subclass of {src.__name__}")
                    break
            continue
        reason = rule.check(m) if rule.check is not None else None
        new_cls = _fastlm_class(rule, t) if reason is None else None
        if reason is None and new_cls is None:
            reason = f"{rule.forward} is not available in this build"
        if reason is not None:
            report.skipped.append(f"{name or '<root>'} ({t.__name__}): {reason}")
            for a in rule.attrs:
                m.__dict__.pop(a, None)
            continue
        m.__class__ = new_cls
        changed_modules.append((name, t))
        report.replaced[rule.what] = report.replaced.get(rule.what, 0) + 1

    roots = _pretrained_roots(model)
    if roots:
        register()
    for name, m in roots:
        prev = m.config._attn_implementation
        if prev == ATTN_IMPLEMENTATION:
            report.already.append(f"{name or '<root>'}.attention")
            continue
        if not (type(m)._can_set_attn_implementation() and getattr(m, "_supports_attention_backend", False)):
            report.skipped.append(f"{name or '<root>'} ({type(m).__name__}): attention does not use the "
                                  "AttentionInterface")
            continue
        m.set_attn_implementation(ATTN_IMPLEMENTATION)
        changed_attn.append((name, prev))
        report.attention.append(f"{name or '<root>'} ({type(m).__name__}, was {prev!r})")

    if changed_modules or changed_attn:
        object.__setattr__(model, _STATE_ATTR, {"modules": changed_modules, "attention": changed_attn})
    model.fastlm_patch_report = report
    msg = f"fastlm.patch({type(model).__name__}):\n{report}"
    logger.info(msg)
    if report.skipped or report.already or not report.changed:
        warnings.warn(msg, PatchWarning, stacklevel=2)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch(model)` in place: the original classes and attention implementation come back.
    Warns (PatchWarning) if `model` was not patched. Returns `model`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        warnings.warn(f"fastlm.unpatch: {type(model).__name__} was not patched by fastlm.patch; nothing changed",
                      PatchWarning, stacklevel=2)
        return model
    modules = dict(model.named_modules())
    for name, orig in state["modules"]:
        m = modules.get(name)
        if m is None or _originals.get(type(m)) is not orig:
            warnings.warn(f"fastlm.unpatch: {name!r} changed since patch(); left as is", PatchWarning, stacklevel=2)
            continue
        m.__class__ = orig
        for rule in _RULES:
            for a in rule.attrs:
                m.__dict__.pop(a, None)
    for name, prev in state["attention"]:
        m = modules.get(name)
        if m is not None:
            m.set_attn_implementation(prev)
    del model.__dict__[_STATE_ATTR]
    model.__dict__.pop("fastlm_patch_report", None)
    logger.info("fastlm.unpatch(%s): restored %d module(s) and %d attention implementation(s)",
                type(model).__name__, len(state["modules"]), len(state["attention"]))
    return model
