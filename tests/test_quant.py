"""fastlm.quantize (fastlm/quant.py, fastlm/nn/quant_linear.py): int8 / bf16 weights for native and
Hugging Face GPT-2 / BERT.

- quantize_int8 / dequantize_int8 round trip: every element within scale/2 of the original.
- state_dict of a quantized model (native GPT2 / Bert, HF GPT-2 / BERT) holds qweight int8 + scale fp32
  and loads into a fresh model quantized the same way without re-quantizing: identical outputs.
- A quantized model's outputs == the same model with each projection replaced by F.linear on its
  dequantized weight (HF: the unpatched transformers model holding those weights).
- fastlm.generate on a quantized GPT2 (greedy == argmax of full forwards, sampling, a padded batch, a
  quantized HF model); the greedy pick over the int8 head (linear_argmax) == argmax of the int8 logits.
- group_size, weights="bf16", model.to(dtype), and the bad-input errors.
Small random configs; the file runs in well under a minute on 2 cores."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.models import Bert, GPT2
from fastlm.nn import quant_linear
from fastlm.nn.quant_linear import Bf16Linear, Int8Linear, dequantize_int8, quantize_int8

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)        # fp32, the same math in another summation order


def _gpt2_cfg():
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=96, vocab_size=211,
                      bos_token_id=0, eos_token_id=0)


def _bert_cfg():
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                      vocab_size=173, max_position_embeddings=64)


def _hf_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_gpt2_cfg()).eval()


def _hf_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(_bert_cfg()).eval()


def _ids(B, S, vocab, seed=1):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _dequantized_native(model):
    """A copy of a quantized native model with every Int8Linear / Bf16Linear replaced by a torch Linear
    holding its dequantized weight (the head: a plain weight), so it runs fastlm's fp32 path."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Int8Linear, Bf16Linear)):
                w = child.dequantize() if isinstance(child, Int8Linear) else child.weight.float()
                if isinstance(parent, GPT2) and name == "lm_head":
                    del parent.lm_head
                    parent.lm_head = torch.nn.Parameter(w.clone(), requires_grad=False)
                    continue
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin.eval())
    assert not any(isinstance(m, (Int8Linear, Bf16Linear)) for m in ref.modules())
    return ref


def _int8_layers(model):
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


# ---------------------------------------------------------------- quantize / dequantize


def _roundtrip_weight():
    g = torch.Generator().manual_seed(0)
    N, K = 37, 64
    w = torch.randn(N, K, generator=g) * torch.logspace(-3, 1, N)[:, None]   # rows of very different range
    w[5] = 0.0                                                                # a zero row
    w[7, 3] = 40.0                                                            # an outlier
    return w


@pytest.fixture(params=["cpp", "torch"])
def quant_impl(request, monkeypatch):
    """quantize_int8 through the C++ kernel (linear_int8_quantize) or the PyTorch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(quant_linear._ext, "has_kernel", lambda op, key: False)
    elif not quant_linear._ext.has_kernel("linear_int8_quantize", "CPU"):
        pytest.skip("the C++ extension has no linear_int8_quantize")
    return request.param


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_dequantize_round_trip(group_size, search, quant_impl):
    w = _roundtrip_weight()
    N, K = w.shape
    L = K if group_size is None else group_size
    q, s = quantize_int8(w, group_size, search=search)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == (N, K)
    assert s.shape == ((N,) if group_size is None else (N, K // group_size))
    assert int(q.abs().max()) <= 127 and int(q.min()) >= -127
    deq = dequantize_int8(q, s)
    s_full = s[:, None].expand(N, K) if group_size is None else s.repeat_interleave(group_size, dim=1)
    err = (deq - w).abs()
    print(f"{quant_impl} group_size={group_size} search={search}: max err {err.max():.3e}, "
          f"max err / scale {(err / s_full).max():.4f}")
    # every element inside the (clipped) range is within scale/2; beyond it, clamped to +-127
    inside = w.abs() <= 127 * s_full
    assert bool((err[inside] <= s_full[inside] / 2 * (1 + 1e-6) + 1e-12).all()), "an element is > scale/2 off"
    assert bool((q[~inside].abs() == 127).all())
    amax = w.view(N, -1, L).abs().amax(-1)
    clip = (s.view(N, -1) * 127 / amax.clamp_min(1e-30))[amax > 0]
    if not search:   # absmax: the largest |w| of each channel (group) maps to +-127, nothing is clipped
        assert bool(inside.all()) and torch.allclose(clip, torch.ones_like(clip), rtol=1e-6)
    else:            # the searched clip is in [0.3, 1] and its squared error no larger than absmax's
        assert bool((clip >= 0.3 - 1e-6).all()) and bool((clip <= 1 + 1e-6).all())
        q0, s0 = quantize_int8(w, group_size, search=False)
        e0 = (dequantize_int8(q0, s0) - w).square().view(N, -1, L).sum(-1)
        e1 = (deq - w).square().view(N, -1, L).sum(-1)
        assert bool((e1 <= e0 * (1 + 1e-5) + 1e-20).all())
    assert bool((q[5] == 0).all()) and bool((deq[5] == 0).all())
    # a second round trip is exact (the dequantized weights are on the int8 grid)
    q2, s2 = quantize_int8(deq, group_size, search=search)
    assert torch.equal(q2, q)
    assert torch.allclose(s2, s, rtol=1e-6, atol=0)


def test_quantize_cpp_matches_torch(monkeypatch):
    """The C++ quantizer and the PyTorch fallback: the same clip search, so the same grid up to the
    summation order of the squared errors (a near-tie may pick a neighbouring clip: compare errors)."""
    if not quant_linear._ext.has_kernel("linear_int8_quantize", "CPU"):
        pytest.skip("the C++ extension has no linear_int8_quantize")
    w = torch.randn(300, 768, generator=torch.Generator().manual_seed(3))
    for gs in (None, 32):
        qc, sc = quantize_int8(w, gs)
        with monkeypatch.context() as m:
            m.setattr(quant_linear._ext, "has_kernel", lambda op, key: False)
            qt, st = quantize_int8(w, gs)
        same = (sc == st).float().mean().item()
        ec = (dequantize_int8(qc, sc) - w).square().sum().item()
        et = (dequantize_int8(qt, st) - w).square().sum().item()
        print(f"group_size={gs}: equal scales {same:.3f}, squared error cpp {ec:.6g} torch {et:.6g}")
        assert same > 0.95 and abs(ec - et) <= 1e-4 * et
        q0, s0 = quantize_int8(w, gs, search=False)
        e0 = (dequantize_int8(q0, s0) - w).square().sum().item()
        print(f"  absmax squared error {e0:.6g}")
        assert ec <= e0 and (gs is not None or ec < 0.995 * e0)   # 768 Gaussian inputs a channel: clipping pays


def test_int8linear_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 29)
    m = Int8Linear.from_linear(lin)
    assert set(m.state_dict()) == {"qweight", "scale", "bias"}
    assert m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32 and m.scale.shape == (29,)
    x = torch.randn(3, 5, 48)
    assert torch.allclose(m(x), F.linear(x, m.dequantize(), lin.bias), **TOL)
    assert torch.allclose(m.weight, m.dequantize())            # the dequantized view
    # error against the original weight: within what per-channel rounding allows
    bound = (x.abs().sum(-1, keepdim=True) * (m.scale / 2)).max()
    assert (m(x) - lin(x)).abs().max() <= bound
    # load into a module built on the meta device: assign, no quantization
    with torch.device("meta"):
        fresh = Int8Linear(48, 29)
    fresh.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(fresh(x), m(x))
    # .to(dtype) casts the bias, never the int8 weight or its fp32 scale
    h = copy.deepcopy(m).to(torch.bfloat16)
    assert h.qweight.dtype == torch.int8 and h.scale.dtype == torch.float32 and h.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------- state_dict round trips


def _no_requantize(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("quantize_int8 called while loading a quantized state_dict")
    monkeypatch.setattr(quant_linear, "quantize_int8", boom)


def _check_quantized_sd(sd, n_layers_expected):
    q = {k: v for k, v in sd.items() if k.endswith(".qweight")}
    assert len(q) == n_layers_expected, sorted(q)
    for k, v in q.items():
        assert v.dtype == torch.int8, k
        s = sd[k[: -len("qweight")] + "scale"]
        assert s.dtype == torch.float32 and s.shape[0] == v.shape[0], k
        assert k[: -len("qweight")] + "weight" not in sd, k


@pytest.mark.parametrize("group_size", [None, 32])
def test_state_dict_round_trip_native_gpt2(monkeypatch, group_size):
    model = GPT2.from_hf(_hf_gpt2(), weights="int8", group_size=group_size)
    sd = model.state_dict()
    _check_quantized_sd(sd, 2 * 4 + 1)                      # 4 projections a block + the LM head
    assert sd["lm_head.qweight"].shape == (211, 64)
    with torch.device("meta"):
        fresh = GPT2(model.config)
    fastlm.quantize(fresh, weights="int8", group_size=group_size)   # shapes only: nothing real to quantize
    _no_requantize(monkeypatch)
    fresh.load_state_dict(sd, assign=True, strict=True)
    fresh.eval()
    assert not any(t.is_meta for t in fresh.state_dict().values())
    ids = _ids(2, 11, 211)
    assert torch.equal(fresh(ids), model(ids))
    assert torch.equal(fastlm.generate(fresh, ids, max_new_tokens=6), fastlm.generate(model, ids, max_new_tokens=6))


def test_state_dict_round_trip_native_bert(monkeypatch):
    model = Bert.from_hf(_hf_bert(), weights="int8")
    sd = model.state_dict()
    _check_quantized_sd(sd, 2 * 4)                          # qkv, proj, fc1, fc2 a layer (pooler stays)
    with torch.device("meta"):
        fresh = Bert(model.settings)
    fastlm.quantize(fresh)
    _no_requantize(monkeypatch)
    fresh.load_state_dict(sd, assign=True, strict=True)
    fresh.eval()
    ids = _ids(3, 13, 173)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    a, b = fresh(ids, attention_mask=mask), model(ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_state_dict_round_trip_hf_gpt2(monkeypatch):
    src = fastlm.quantize(_hf_gpt2(0))
    sd = src.state_dict()
    _check_quantized_sd(sd, 2 * 4 + 1)
    fresh = fastlm.quantize(_hf_gpt2(5))                    # other weights, quantized the same way
    _no_requantize(monkeypatch)
    fresh.load_state_dict(sd, strict=True)
    ids = _ids(2, 10, 211)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, src(ids).logits)
    assert torch.equal(fastlm.generate(fresh, ids, max_new_tokens=5), fastlm.generate(src, ids, max_new_tokens=5))


def test_state_dict_round_trip_hf_bert(monkeypatch):
    src = fastlm.quantize(_hf_bert(0))
    sd = src.state_dict()
    _check_quantized_sd(sd, 2 * 6)                          # q, k, v, attention out, intermediate, output
    fresh = fastlm.quantize(_hf_bert(5))
    _no_requantize(monkeypatch)
    fresh.load_state_dict(sd, strict=True)
    ids = _ids(2, 12, 173)
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, src(ids).last_hidden_state)


def test_quantize_keeps_shared_config():
    cfg = _gpt2_cfg()
    torch.manual_seed(0)
    a, b = GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg)
    fastlm.quantize(a)
    assert a.config.tie_word_embeddings is False
    assert cfg.tie_word_embeddings is True and b.config.tie_word_embeddings is True


# ---------------------------------------------------------------- quantized == F.linear on dequantized


@pytest.mark.parametrize("group_size", [None, 32])
def test_native_gpt2_matches_dequantized(group_size):
    model = GPT2.from_hf(_hf_gpt2(), weights="int8", group_size=group_size)
    ref = _dequantized_native(model)
    ids = _ids(3, 9, 211)
    y, y_ref = model(ids), ref(ids)                          # prefill (many rows)
    print(f"prefill logits max err {(y - y_ref).abs().max():.3e}")
    torch.testing.assert_close(y, y_ref, **TOL)
    # decode steps (few rows: the int8 GEMV), logits and greedy picks
    c, c_ref = model.new_cache(3, 16), ref.new_cache(3, 16)
    model.prefill(ids, c)
    ref.prefill(ids, c_ref)
    tok = y.argmax(-1)
    for _ in range(4):
        lq, lr = model.decode_step(tok, c), ref.decode_step(tok, c_ref)
        torch.testing.assert_close(lq, lr, **TOL)
        tok = lr.argmax(-1)


def test_native_bert_matches_dequantized():
    model = Bert.from_hf(_hf_bert(), weights="int8")
    ref = _dequantized_native(model)
    for B, S in ((1, 7), (4, 19)):
        ids = _ids(B, S, 173)
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state, **TOL)


def test_hf_gpt2_matches_dequantized():
    hf = _hf_gpt2()
    ref = copy.deepcopy(hf)                                  # unpatched transformers, dequantized weights
    q = fastlm.quantize(hf)
    with torch.no_grad():
        for hq, hr in zip(q.transformer.h, ref.transformer.h):
            for mq, mr in ((hq.attn.c_attn, hr.attn.c_attn), (hq.attn.c_proj, hr.attn.c_proj),
                           (hq.mlp.c_fc, hr.mlp.c_fc), (hq.mlp.c_proj, hr.mlp.c_proj)):
                assert isinstance(mq, Int8Linear)
                mr.weight.copy_(mq.dequantize().t())         # Conv1D: (in, out)
        ref.lm_head = torch.nn.Linear(64, 211, bias=False)
        ref.lm_head.weight.copy_(q.lm_head.dequantize())
        ids = _ids(2, 10, 211)
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, **TOL)
    # the quantized HF model generates what the native model converted from it generates
    native = GPT2.from_hf(q)
    assert isinstance(native.blocks[0].fc, Int8Linear) and isinstance(native.lm_head, Int8Linear)
    assert torch.equal(fastlm.generate(q, ids, max_new_tokens=6), fastlm.generate(native, ids, max_new_tokens=6))


def test_hf_bert_matches_dequantized():
    hf = _hf_bert()
    ref = copy.deepcopy(hf)
    q = fastlm.quantize(hf)
    with torch.no_grad():
        for Lq, Lr in zip(q.encoder.layer, ref.encoder.layer):
            pairs = [(Lq.attention.self.query, Lr.attention.self.query), (Lq.attention.self.key, Lr.attention.self.key),
                     (Lq.attention.self.value, Lr.attention.self.value),
                     (Lq.attention.output.dense, Lr.attention.output.dense),
                     (Lq.intermediate.dense, Lr.intermediate.dense), (Lq.output.dense, Lr.output.dense)]
            for mq, mr in pairs:
                assert isinstance(mq, Int8Linear)
                mr.weight.copy_(mq.dequantize())
        ids = _ids(3, 15, 173)
        mask = torch.ones_like(ids)
        mask[2, 11:] = 0
        torch.testing.assert_close(q(ids, attention_mask=mask).last_hidden_state,
                                   ref(ids, attention_mask=mask).last_hidden_state, **TOL)
    native = Bert.from_hf(ref, weights="int8")               # same fp32 weights -> the same int8 weights
    torch.testing.assert_close(native(ids, attention_mask=mask).last_hidden_state,
                               q(ids, attention_mask=mask).last_hidden_state, **TOL)


# ---------------------------------------------------------------- generation


def _greedy_by_full_forward(model, ids, n):
    out = ids
    for _ in range(n):
        out = torch.cat([out, model(out).argmax(-1, keepdim=True)], 1)
    return out


def test_generate_quantized_gpt2():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8")
    ids = _ids(2, 7, 211)
    # greedy: the cached decode (int8 GEMV per step) == argmax over full forwards (int8 prefill path)
    out = fastlm.generate(model, ids, max_new_tokens=10)
    assert out.shape == (2, 17) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, _greedy_by_full_forward(model, ids, 10))
    # sampling: reproducible with a seeded generator, inside the vocabulary, top_k respected
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20)
    s1 = fastlm.generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    s2 = fastlm.generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    s3 = fastlm.generate(model, ids, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert s1.shape == (2, 19) and int(s1.min()) >= 0 and int(s1.max()) < 211
    # top_p sampling runs too
    s4 = fastlm.generate(model, ids, max_new_tokens=5, do_sample=True, top_p=0.9,
                         generator=torch.Generator().manual_seed(0))
    assert s4.shape == (2, 12)


def test_generate_quantized_gpt2_padded_batch():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8")
    rows = [_ids(1, 9, 211, seed=2)[0], _ids(1, 5, 211, seed=3)[0], _ids(1, 7, 211, seed=4)[0]]
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):                             # left padding
        ids[i, S - len(r):] = r
        mask[i, S - len(r):] = 1
    out = fastlm.generate(model, ids, attention_mask=mask, max_new_tokens=8)
    for i, r in enumerate(rows):                             # each row as generated alone
        alone = fastlm.generate(model, r[None], max_new_tokens=8)
        assert torch.equal(out[i, S:], alone[0, len(r):]), f"row {i}"


def test_greedy_pick_over_int8_head():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8")
    head = model.lm_head
    assert isinstance(head, Int8Linear)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    full = ops.linear_int8(x, head.qweight, head.scale)      # the full int8 product
    assert torch.equal(ops.linear_argmax(x, head.dequantize()), full.argmax(-1))
    # the decode step's greedy pick == argmax of its own int8 logits
    ids = _ids(4, 6, 211)
    c1, c2 = model.new_cache(4, 12), model.new_cache(4, 12)
    t1 = model.prefill(ids, c1, greedy=True)
    t2 = model.prefill(ids, c2).argmax(-1)
    assert torch.equal(t1, t2)
    for _ in range(3):
        p1 = model.decode_step(t1, c1, greedy=True)
        p2 = model.decode_step(t2, c2).argmax(-1)
        assert torch.equal(p1, p2)
        t1, t2 = p1, p2


# ---------------------------------------------------------------- group_size, bf16, dtype


def test_group_size_native_and_hf():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8", group_size=16)
    for m in _int8_layers(model):
        assert m.group_size == 16 and m.scale.shape == (m.out_features, m.in_features // 16)
    hb = fastlm.quantize(_hf_bert(), group_size=32)
    for m in _int8_layers(hb):
        assert m.scale.shape == (m.out_features, m.in_features // 32)
    # finer groups: no larger reconstruction error than per-channel on the same weight
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    e_ch = (dequantize_int8(*quantize_int8(w)) - w).abs().mean()
    e_g = (dequantize_int8(*quantize_int8(w, 32)) - w).abs().mean()
    print(f"mean |err| per channel {e_ch:.3e}, per group of 32 {e_g:.3e}")
    assert e_g <= e_ch


def test_bf16_weights():
    model = GPT2.from_hf(_hf_gpt2(), weights="bf16")
    layers = [m for m in model.modules() if isinstance(m, Bf16Linear)]
    assert len(layers) == 2 * 4 + 1
    sd = model.state_dict()
    assert all(sd[k].dtype == torch.bfloat16 for k in sd if k.startswith("blocks.") and k.endswith("c_attn.weight"))
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    ref = _dequantized_native(model)                         # fp32 Linear on the bf16 weight widened
    ids = _ids(2, 8, 211)
    torch.testing.assert_close(model(ids), ref(ids), **TOL)
    out = fastlm.generate(model, ids, max_new_tokens=6)
    assert torch.equal(out, _greedy_by_full_forward(model, ids, 6))
    with torch.device("meta"):
        fresh = GPT2(model.config)
    fastlm.quantize(fresh, weights="bf16")
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh.eval()(ids), model(ids))
    hb = fastlm.quantize(_hf_bert(), weights="bf16")
    assert isinstance(hb.encoder.layer[0].intermediate.dense, Bf16Linear)
    nb = Bert.from_hf(_hf_bert(), weights="bf16")
    torch.testing.assert_close(nb(ids % 173).last_hidden_state, hb(ids % 173).last_hidden_state, **TOL)


def test_quantized_model_to_bf16():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8").to(torch.bfloat16)
    for m in _int8_layers(model):
        assert m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32
        assert m.bias is None or m.bias.dtype == torch.bfloat16
    ids = _ids(1, 6, 211)
    out = fastlm.generate(model, ids, max_new_tokens=4)
    assert out.shape == (1, 10)


def test_quantize_twice_is_a_no_op():
    model = GPT2.from_hf(_hf_gpt2(), weights="int8")
    q0 = model.blocks[0].fc.qweight
    fastlm.quantize(model, weights="int8")
    assert model.blocks[0].fc.qweight is q0


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_linear_int8():
    q, s = quantize_int8(torch.randn(9, 16))
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="qweight"):
        ops.linear_int8(x, q.float(), s)
    with pytest.raises(TypeError, match="scale"):
        ops.linear_int8(x, q, s.double())
    with pytest.raises(ValueError, match="scale"):
        ops.linear_int8(x, q, s[:8])
    with pytest.raises(ValueError, match="in_features"):
        ops.linear_int8(torch.randn(2, 15), q, s)


def test_bad_inputs_quantize():
    hf = _hf_gpt2()
    with pytest.raises(ValueError, match="weights"):
        fastlm.quantize(hf, weights="int4")
    with pytest.raises(ValueError, match="weights"):
        fastlm.quantize(hf, weights=8)
    for bad in (0, -16):
        with pytest.raises(ValueError, match="group_size"):
            fastlm.quantize(hf, group_size=bad)
    for bad in (2.5, True, "32"):
        with pytest.raises(TypeError, match="group_size"):
            fastlm.quantize(hf, group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        fastlm.quantize(hf, weights="bf16", group_size=32)
    with pytest.raises(TypeError, match="model"):
        fastlm.quantize(torch.nn.Linear(4, 4))
    # a group_size that does not divide every in_features (64 and 256 here) fails before any swap
    native = GPT2.from_hf(hf)
    with pytest.raises(ValueError, match="group_size 48"):
        fastlm.quantize(native, group_size=48)
    assert not any(isinstance(m, (Int8Linear, Bf16Linear)) for m in native.modules())
    with pytest.raises(ValueError, match="group_size 48"):
        fastlm.quantize(hf, group_size=48)
    assert not any(isinstance(m, (Int8Linear, Bf16Linear)) for m in hf.modules())
    # quantized once: other weights / another group_size are refused, not silently ignored
    fastlm.quantize(native)
    with pytest.raises(ValueError, match="already has int8"):
        fastlm.quantize(native, weights="bf16")
    with pytest.raises(ValueError, match="group_size"):
        fastlm.quantize(native, group_size=32)


def test_bad_inputs_quant_linear():
    with pytest.raises(ValueError, match="group_size"):
        quantize_int8(torch.randn(4, 30), group_size=7)
    with pytest.raises(TypeError, match="group_size"):
        quantize_int8(torch.randn(4, 32), group_size=8.0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        quantize_int8(torch.ones(4, 4, dtype=torch.int8))
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(w)
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(30, 4, group_size=7)
    m = Int8Linear.from_weight(torch.randn(6, 32), torch.randn(6))
    sd = m.state_dict()
    bad = dict(sd, qweight=sd["qweight"].float())            # an unquantized weight under the int8 key
    with pytest.raises(TypeError, match="qweight"):
        copy.deepcopy(m).load_state_dict(bad)
    with pytest.raises(TypeError, match="qweight"):
        copy.deepcopy(m).load_state_dict(bad, assign=True)
    with pytest.raises(ValueError, match="scale"):
        copy.deepcopy(m).load_state_dict(dict(sd, scale=sd["scale"][:5]))
    with pytest.raises(ValueError, match="group_size"):                 # saved per group, loaded per channel
        copy.deepcopy(m).load_state_dict(Int8Linear.from_weight(torch.randn(6, 32), torch.randn(6), 16).state_dict())


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("K,N", [(1, 3), (37, 19), (768, 2304 // 8 + 1), (131, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_bf16w_cpu(M, K, N, dtype):
    """ops.linear_bf16w (weights="bf16" with fp32/bf16 activations): the C++ kernel (bf16 widened in
    registers, fp32 accumulation) == F.linear on the widened weight, few and many rows, odd K and N."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(dtype)
    with torch.inference_mode():
        y = ops.linear_bf16w(x, w, b)
        yn = ops.linear_bf16w(x, w)
    ref = F.linear(x.double(), w.double(), b.double())
    assert y.dtype == dtype and y.shape == (M, N)
    err = (y.double() - ref).abs().max().item()
    tol = 1e-4 * (K ** 0.5) if dtype == torch.float32 else 3e-2 * max(1.0, ref.abs().max().item())
    print(f"M={M} K={K} N={N} {dtype}: max err {err:.3g}")
    assert err <= tol
    assert (yn.double() - (ref - b.double())).abs().max().item() <= tol
    x3 = x.view(1, M, K)                                  # leading dims
    assert ops.linear_bf16w(x3, w, b).shape == (1, M, N)


def test_linear_bf16w_grad_and_errors():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8).to(torch.bfloat16)
    ops.linear_bf16w(x, w).sum().backward()             # autograd: F.linear on the widened weight
    assert torch.allclose(x.grad, w.float().sum(0).expand(3, 8))
    with pytest.raises(TypeError, match="bfloat16"):
        ops.linear_bf16w(x, w.float())
    with pytest.raises(ValueError, match="in_features"):
        ops.linear_bf16w(torch.randn(3, 7), w)


# ---------------------------------------------------------------- activations="int8" (W8A8)


def test_quantize_activations_arguments():
    """activations: None (W8A32, the default) or "int8" (W8A8, weights="int8", per-channel scales);
    anything else raises ValueError naming `activations`, before any projection is replaced. On a
    model quantized before, `activations` is switched in place (the int8 weights stay)."""
    hf = _hf_gpt2()
    for bad in ("fp8", "int4", 8, True):
        with pytest.raises(ValueError, match="activations"):
            fastlm.quantize(hf, activations=bad)
    with pytest.raises(ValueError, match="activations='int8' needs weights='int8'"):
        fastlm.quantize(hf, weights="bf16", activations="int8")
    with pytest.raises(ValueError, match="group_size"):
        fastlm.quantize(hf, group_size=32, activations="int8")
    assert not any(isinstance(m, (Int8Linear, Bf16Linear)) for m in hf.modules())
    native = fastlm.quantize(GPT2.from_hf(hf))
    layers = _int8_layers(native)
    assert all(m.activations is None for m in layers)
    q0 = layers[0].qweight
    fastlm.quantize(native, activations="int8")
    assert all(m.activations == "int8" for m in _int8_layers(native)) and _int8_layers(native)[0].qweight is q0
    fastlm.quantize(native)
    assert all(m.activations is None for m in _int8_layers(native))


def test_quantize_activations_state_dict_round_trip():
    """W8A8 changes no state: a W8A8 model's state_dict loads into a W8A32 one of the same shapes and
    back; the loaded W8A8 model gives the same outputs."""
    model = fastlm.quantize(Bert.from_hf(_hf_bert()), activations="int8")
    sd = model.state_dict()
    assert not any("pack" in k for k in sd)
    with torch.device("meta"):
        fresh = Bert.from_hf(_hf_bert())
    fastlm.quantize(fresh, activations="int8")
    fresh.load_state_dict(sd, assign=True)
    ids = _ids(2, 9, 173)
    assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)
