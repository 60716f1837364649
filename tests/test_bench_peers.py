"""fastlm/bench/peers.py: the CTranslate2 / ONNX Runtime contenders of the generate and models suites.

On small random GPT-2 / BERT configs (seconds each): CTranslate2 fp32 greedy tokens == fastlm's fp32
greedy tokens (same weights), its int8 tokens mostly agree; its logits / encoder output and ONNX
Runtime's BERT output == the Hugging Face model's within fp32 (int8: a loose bound); the contender
dicts the suites add carry the labels the report shows. Skipped (with the reason) only where the
package is not installed: `pip install fastlm[peers]`."""
import importlib.util

import pytest
import torch

import fastlm
from fastlm.bench import peers

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

needs_ct2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None,
                               reason="ctranslate2 not installed (pip install fastlm[peers])")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx")
                               is None, reason="onnxruntime/onnx not installed (pip install fastlm[peers])")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=301, bos_token_id=300,
                     eos_token_id=300)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                     vocab_size=173, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _ids(B, S, V, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def test_available_lists_installed():
    av = peers.available()
    assert ("ctranslate2" in av) == (importlib.util.find_spec("ctranslate2") is not None)
    assert set(av) <= {"ctranslate2", "onnxruntime"}


@needs_ct2
def test_ct2_generate_matches_fastlm(gpt2):
    ids = _ids(3, 7, 301)
    ref = fastlm.generate(fastlm.models.GPT2.from_hf(gpt2), ids, max_new_tokens=12)
    out = peers.Ct2Generator(gpt2, "fp32").generate(ids, 12)
    assert out.shape == (3, 12) and out.dtype == torch.long
    mism = int((out != ref[:, 7:]).sum())
    print(f"ctranslate2 fp32 vs fastlm fp32: {mism} of {out.numel()} tokens differ")
    assert mism == 0
    out8 = peers.Ct2Generator(gpt2, "int8").generate(ids, 12)
    agree = (out8 == ref[:, 7:]).float().mean().item()
    print(f"ctranslate2 int8 agreement with fp32: {agree:.3f}")
    assert out8.shape == (3, 12) and agree > 0.5


@needs_ct2
def test_ct2_logits_and_contenders(gpt2):
    ids = _ids(2, 9, 301)
    with torch.inference_mode():
        ref = gpt2(ids).logits
    for w, tol in (("fp32", 1e-4), ("int8", 0.5)):
        err = (peers.Ct2Generator(gpt2, w).logits(ids) - ref).abs().max().item()
        print(f"ctranslate2 {w} logits max err {err:.3g}")
        assert err < tol
    c = peers.generate_contenders(gpt2, ids, 5)
    assert set(c) == {"ctranslate2 fp32", "ctranslate2 int8"}
    out = c["ctranslate2 fp32"]()
    assert out.shape == (2, 14) and torch.equal(out[:, :9], ids)
    assert set(peers.logits_contenders(gpt2, ids)) == {"ctranslate2 fp32", "ctranslate2 int8"}


@needs_ct2
def test_ct2_encoder(bert):
    ids = _ids(3, 11, 173)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                     # right padding: a shorter row
    with torch.inference_mode():
        ref = bert(ids, attention_mask=mask).last_hidden_state
    for w, tol in (("fp32", 1e-4), ("int8", 0.3)):
        out = peers.Ct2Encoder(bert, w)(ids, mask)
        valid = mask.bool()
        err = (out[valid] - ref[valid]).abs().max().item()
        print(f"ctranslate2 {w} encoder max err {err:.3g}")
        assert out.shape == ref.shape and err < tol
    left = torch.ones_like(ids)
    left[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        peers.Ct2Encoder(bert, "fp32")(ids, left)


@needs_ort
def test_onnxruntime_bert(bert):
    for B, S in ((1, 5), (4, 13)):                      # dynamic batch and sequence
        ids = _ids(B, S, 173, seed=S)
        mask = torch.ones_like(ids)
        mask[-1, S - 2:] = 0
        with torch.inference_mode():
            ref = bert(ids, attention_mask=mask).last_hidden_state
        out = peers.OrtBert(bert)(ids, mask)
        err = (out - ref).abs().max().item()
        print(f"onnxruntime ({B},{S}) max err {err:.3g}")
        assert err < 1e-4


@needs_ct2
@needs_ort
def test_bert_contenders_labels(bert):
    ids = _ids(2, 6, 173)
    c = peers.bert_contenders(bert, ids, torch.ones_like(ids))
    assert set(c) == {"ctranslate2 fp32", "ctranslate2 int8", "onnxruntime fp32"}
    for fn in c.values():
        assert fn().shape == (2, 6, 64)


def test_contenders_empty_off_cpu_or_absent(gpt2, monkeypatch):
    ids = _ids(1, 4, 301)
    monkeypatch.setattr(peers, "available", lambda: [])
    assert peers.generate_contenders(gpt2, ids, 3) == {}
    assert peers.bert_contenders(gpt2, ids) == {}
    with pytest.raises(ImportError, match="fastlm\\[peers\\]"):
        peers.Ct2Generator(gpt2, "int8")


def test_bad_weights(gpt2):
    with pytest.raises(ValueError, match="fp32, int8 or bf16"):
        peers._ct2_quant("int4")
