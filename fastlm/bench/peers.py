"""Peer engines as benchmark contenders: CTranslate2 (GPT-2 greedy generate / logits, BERT encoder; fp32
and int8 weights) and ONNX Runtime (BERT, fp32), built from the very Hugging Face model the fastlm
contenders run, so every row computes with the same weight values.

Optional: `pip install fastlm[peers]` (ctranslate2, onnxruntime, onnx). `available()` names the peers
importable here; the builders raise ImportError (with the install hint) where a package is absent, and
the case modules add peer rows only for what `available()` lists.

- `Ct2Generator(hf_gpt2, quantization)`: `.generate(ids, N)` greedy -> (B, N) LongTensor of new tokens
  (no early stop: `end_token=[]`, `min_length=N`); `.logits(ids)` -> (B, S, V) fp32.
- `Ct2Encoder(hf_bert, quantization)`: `(ids, mask) -> last_hidden_state` (B, S, H) fp32.
- `OrtBert(hf_bert)`: the same through ONNX Runtime (legacy TorchScript exporter, `dynamo=False`, opset
  17; dynamic batch and sequence), CPU execution provider.
- `generate_contenders(hf_gpt2, ids, N)` / `bert_contenders(hf_bert, ids, mask)`: {label: callable} of
  every peer available ("ctranslate2 fp32", "ctranslate2 int8", "onnxruntime fp32"), CPU only.

A converted model is cached per (HF model object, quantization) while that model lives for the life of the process, and the
conversions write to a temporary folder removed at exit. Threads: CTranslate2 and ONNX Runtime run with
torch.get_num_threads() intra-op threads and one inter-op thread, as the fastlm rows do.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import warnings
import weakref

import torch

INSTALL_HINT = "pip install fastlm[peers]  (ctranslate2, onnxruntime, onnx)"
_tmp: list[str] = []
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # HF model -> {key: engine}


def available() -> list[str]:
    """The peer engines importable here: a subset of ["ctranslate2", "onnxruntime"] (onnxruntime also
    needs onnx for the export)."""
    out = []
    if importlib.util.find_spec("ctranslate2") is not None:
        out.append("ctranslate2")
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        out.append("onnxruntime")
    return out


def _require(name: str):
    if name not in available():
        raise ImportError(f"{name} is not installed: {INSTALL_HINT}")
    return importlib.import_module(name)


def _tmpdir() -> str:
    if not _tmp:
        _tmp.append(tempfile.mkdtemp(prefix="fastlm_peers_"))
        atexit.register(shutil.rmtree, _tmp[0], True)
    d = tempfile.mkdtemp(dir=_tmp[0])
    return d


def _threads() -> int:
    return max(1, torch.get_num_threads())


class _IdTokenizer:
    """What CTranslate2's converter reads from a tokenizer, for a model with no tokenizer files: the
    vocabulary is the token ids spelled as strings ("0", "1", ...), so ids go in and out unchanged."""

    def __init__(self, config):
        self.vocab_size = config.vocab_size
        eos = getattr(config, "eos_token_id", None)
        bos = getattr(config, "bos_token_id", None)
        self.eos_token = str(eos if eos is not None else 0)
        self.bos_token = str(bos if bos is not None else 0)
        self.unk_token = str(getattr(config, "pad_token_id", None) or 0)
        self.special_tokens_map = {}

    def get_vocab(self) -> dict:
        return {str(i): i for i in range(self.vocab_size)}

    def convert_ids_to_tokens(self, i):
        return str(i)


def _convert(hf_model, quantization: str) -> str:
    """Save `hf_model` (float weights) and convert it with CTranslate2: the folder of the converted model."""
    ct2 = _require("ctranslate2")
    src, out = _tmpdir(), _tmpdir()
    model = hf_model
    if getattr(model, "_fastlm_patch_state", None) is not None or getattr(model, "_fastlm_quantized", None):
        raise ValueError("peers: convert the plain Hugging Face model (not patched or quantized by fastlm)")
    model.save_pretrained(src)

    class Converter(ct2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _IdTokenizer(hf_model.config)

        def load_model(self, model_class, model_name_or_path, **kwargs):
            m = super().load_model(model_class, model_name_or_path, **kwargs)
            if m.config.model_type == "bert" and not hasattr(m.config, "position_embedding_type"):
                m.config.position_embedding_type = "absolute"   # transformers 5 dropped it; the converter reads it
            return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Converter(src).convert(out, quantization=quantization, force=True)
    shutil.rmtree(src, ignore_errors=True)
    return out


def _ct2_quant(weights: str) -> str:
    q = {"fp32": "float32", "float32": "float32", "int8": "int8", "bf16": "bfloat16"}.get(weights)
    if q is None:
        raise ValueError(f"peers: CTranslate2 weights must be fp32, int8 or bf16, got {weights!r}")
    return q


class Ct2Generator:
    """A Hugging Face GPT-2 (GPT2LMHeadModel, random or real weights) run by ctranslate2.Generator."""

    def __init__(self, hf_model, weights: str = "int8"):
        ct2 = _require("ctranslate2")
        cache, key = _cache.setdefault(hf_model, {}), ("gen", _ct2_quant(weights))
        if key not in cache:
            path = _convert(hf_model, _ct2_quant(weights))
            cache[key] = ct2.Generator(path, device="cpu", compute_type="default", inter_threads=1,
                                        intra_threads=_threads())
        self.gen = cache[key]

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: exactly max_new_tokens new tokens per row (no end token), (B, N) int64."""
        toks = [[str(t) for t in row] for row in ids.tolist()]
        res = self.gen.generate_batch(toks, max_length=max_new_tokens, min_length=max_new_tokens, sampling_topk=1,
                                      beam_size=1, include_prompt_in_result=False, end_token=[])
        return torch.tensor([r.sequences_ids[0] for r in res], dtype=torch.long)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S, V) fp32 logits of every position (one forward over the prompt)."""
        import numpy as np

        ct2 = _require("ctranslate2")
        sv = ct2.StorageView.from_array(np.ascontiguousarray(ids.numpy().astype("int32")))
        n = ct2.StorageView.from_array(np.full((ids.shape[0],), ids.shape[1], dtype="int32"))
        return torch.from_numpy(np.array(self.gen.forward_batch(sv, n)))


class Ct2Encoder:
    """A Hugging Face BertModel (with its pooler) run by ctranslate2.Encoder: last hidden state."""

    def __init__(self, hf_model, weights: str = "int8"):
        ct2 = _require("ctranslate2")
        cache, key = _cache.setdefault(hf_model, {}), ("enc", _ct2_quant(weights))
        if key not in cache:
            if getattr(hf_model, "pooler", None) is None:
                raise ValueError("peers: CTranslate2's BERT converter needs a BertModel with its pooler")
            path = _convert(hf_model, _ct2_quant(weights))
            cache[key] = ct2.Encoder(path, device="cpu", compute_type="default", inter_threads=1,
                                      intra_threads=_threads())
        self.enc = cache[key]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        import numpy as np

        ct2 = _require("ctranslate2")
        lengths = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1]))
        if mask is not None and not bool((mask.cumsum(1) == torch.arange(1, ids.shape[1] + 1)).where(
                mask.bool(), True).all()):
            raise ValueError("peers: CTranslate2's encoder takes right-padded batches (the mask a prefix of ones)")
        x = ct2.StorageView.from_array(np.ascontiguousarray(ids.numpy().astype("int32")))
        n = ct2.StorageView.from_array(np.ascontiguousarray(lengths.numpy().astype("int32")))
        out = self.enc.forward_batch(x, n)
        return torch.from_numpy(np.array(out.last_hidden_state))


class OrtBert:
    """A Hugging Face BertModel exported to ONNX (fp32) and run by ONNX Runtime on the CPU."""

    def __init__(self, hf_model):
        ort = _require("onnxruntime")
        cache, key = _cache.setdefault(hf_model, {}), ("ort",)
        if key not in cache:
            path = os.path.join(_tmpdir(), "bert.onnx")
            was_training = hf_model.training
            hf_model.eval()

            class LastHidden(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, input_ids, attention_mask):
                    return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

            ids = torch.zeros(2, 8, dtype=torch.long)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(LastHidden(hf_model), (ids, torch.ones_like(ids)), path, dynamo=False,
                                  input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                                  dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                                "last_hidden_state": {0: "b", 1: "s"}}, opset_version=17)
            hf_model.train(was_training)
            so = ort.SessionOptions()
            so.intra_op_num_threads = _threads()
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            cache[key] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.sess = cache[key]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids) if mask is None else mask
        out = self.sess.run(None, {"input_ids": ids.numpy().astype("int64"),
                                   "attention_mask": mask.numpy().astype("int64")})[0]
        return torch.from_numpy(out)


def _cpu(*ts) -> bool:
    return all(t.device.type == "cpu" for t in ts if t is not None)


def generate_contenders(hf_model, ids: torch.Tensor, max_new_tokens: int, weights=("fp32", "int8")) -> dict:
    """{label: fn() -> (B, P + N) LongTensor (prompt + greedy tokens, as fastlm.generate returns)} for
    each CTranslate2 precision, CPU only; {} where ctranslate2 is absent."""
    if "ctranslate2" not in available() or not _cpu(ids):
        return {}
    out = {}
    for w in weights:
        g = Ct2Generator(hf_model, w)
        out[f"ctranslate2 {w}"] = (lambda g_: lambda: torch.cat([ids, g_.generate(ids, max_new_tokens)], 1))(g)
    return out


def logits_contenders(hf_model, ids: torch.Tensor, weights=("fp32", "int8")) -> dict:
    """{label: fn() -> (B, S, V) logits} through CTranslate2's Generator.forward_batch, CPU only."""
    if "ctranslate2" not in available() or not _cpu(ids):
        return {}
    return {f"ctranslate2 {w}": (lambda g_: lambda: g_.logits(ids))(Ct2Generator(hf_model, w)) for w in weights}


def bert_contenders(hf_model, ids: torch.Tensor, mask: torch.Tensor | None = None, weights=("fp32", "int8"),
                    onnx: bool = True) -> dict:
    """{label: fn() -> last_hidden_state (B, S, H) fp32} for CTranslate2 (each precision) and ONNX
    Runtime fp32, where installed; CPU only."""
    if not _cpu(ids, mask):
        return {}
    out = {}
    if "ctranslate2" in available():
        for w in weights:
            e = Ct2Encoder(hf_model, w)
            out[f"ctranslate2 {w}"] = (lambda e_: lambda: e_(ids, mask))(e)
    if onnx and "onnxruntime" in available():
        o = OrtBert(hf_model)
        out["onnxruntime fp32"] = lambda: o(ids, mask)
    return out
