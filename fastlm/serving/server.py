"""The OpenAI-compatible HTTP server: a FastAPI (ASGI) app over fastlm.Engine, run by uvicorn.

Routes: POST /v1/completions, /v1/chat/completions (GPT-2 models), /v1/embeddings (BERT-style
sentence-embedding models); GET /v1/models, /health, /metrics (Prometheus text).

- Requests are validated before anything is queued; a bad one gets OpenAI's error body
  {"error": {"message", "type", "param", "code"}} with 400 (bad parameters, malformed JSON, wrong
  types: never FastAPI's 422), 404 (unknown model or route), 429 + Retry-After (the waiting queue is
  full: more than --max-num-seqs + --max-queue sequences in flight), 503 (draining for shutdown).
- Each prompt of a request is one engine request (engine.stream); `n` sequences each. Streaming
  (`stream: true`) sends server-sent events `data: {...}` as tokens are made, then `data: [DONE]`.
  Text is detokenized incrementally (a UTF-8 character split across tokens is sent whole, once
  complete) and held back while it could still turn into a stop string.
- A client that disconnects aborts its requests (streamed: Starlette cancels the response, whose
  cleanup aborts; not streamed: a watcher on the connection does), which frees their KV blocks.
- Shutdown (SIGTERM): uvicorn stops accepting connections and waits for the open ones; the app's
  lifespan end then drains the engine (engine.drain()).
- Extensions to OpenAI's parameters: top_k, ignore_eos, stop_token_ids, and return_token_ids (each
  choice / chunk also carries the token ids it adds).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from typing import Any, Dict, List, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from fastlm.serving.metrics import CONTENT_TYPE, SequenceTimer, ServerMetrics
from fastlm.serving.params import MAX_N, SamplingParams
from fastlm.serving.tokenizer import SequenceText

MAX_SEED = 2**63 - 1 - MAX_N


# ------------------------------------------------------------------------------------------ errors

class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_UNION_HELP = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "input": "input must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
}


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors()
    first = errs[0] if errs else {"loc": (), "msg": str(e), "type": ""}
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None
    if field in _UNION_HELP and len(loc) > 1:
        return bad_request(f"{_UNION_HELP[field]}", field, "invalid_type")
    if first.get("type") == "missing":
        return bad_request(f"{field} is required", field, "missing_parameter")
    if first.get("type") == "model_type":
        return bad_request(f"the request body must be a JSON object: {first.get('msg')}", None, "invalid_type")
    where = ".".join(loc) if loc else "request body"
    got = first.get("input")
    got_s = json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None), list, dict)) else repr(got)
    return bad_request(f"{where}: {first.get('msg')} (got {got_s})", field, "invalid_type")


def _params_error(e: ValueError) -> APIError:
    msg = str(e)
    word = msg.split(" ", 1)[0]
    known = {"max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stop_token_ids", "ignore_eos"}
    return bad_request(msg, word if word in known else None, "invalid_value")


# ------------------------------------------------------------------------------------------ request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: Optional[bool] = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    n: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: Optional[bool] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, Any]] = None
    return_token_ids: Optional[bool] = False
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatRequest(_Sampling):
    messages: List[Dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[Dict[str, Any]] = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, List[str], List[int], List[List[int]]]
    encoding_format: Optional[str] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


def _parse(cls, raw: bytes):
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", None, "invalid_json")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from None


# ------------------------------------------------------------------------------------------ state

class ServerState:
    """What the routes share. engine: a fastlm.Engine (GPT-2 servers) or None; embedder: an
    EmbeddingBatcher (BERT servers) or None; tokenizer: the text <-> ids of the engine's model."""

    def __init__(self, engine=None, tokenizer=None, embedder=None, served_model_name: str = "fastlm",
                 max_queue: Optional[int] = None, max_num_seqs: Optional[int] = None, model_path: Optional[str] = None):
        if (engine is None) == (embedder is None):
            raise ValueError("ServerState: exactly one of engine (generation) and embedder (embeddings)")
        self.engine = engine
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.model_name = served_model_name
        self.model_path = model_path
        self.max_queue = max_queue
        self.max_num_seqs = max_num_seqs if max_num_seqs is not None else (
            engine.scheduler.max_num_seqs if engine is not None and hasattr(engine, "scheduler") else 64)
        self.inflight_seqs = 0
        self.draining = False
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.stats if engine is not None else None, lambda: self.draining)

    @property
    def kind(self) -> str:
        return "generate" if self.engine is not None else "embed"

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                "(GET /v1/models)", "invalid_request_error", "model", "model_not_found")

    def check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down (draining): retry on another replica",
                           "service_unavailable", None, "draining", headers={"Retry-After": "1"})


# ------------------------------------------------------------------------------------------ generation

def _check_unsupported(req) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name, None)
        if v not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported by fastlm serve (only 0)", name, "unsupported_parameter")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by fastlm serve", "logit_bias", "unsupported_parameter")
    lp = getattr(req, "logprobs", None)
    if lp not in (None, False, 0):
        raise bad_request("logprobs are not supported by fastlm serve", "logprobs", "unsupported_parameter")
    if getattr(req, "top_logprobs", None):
        raise bad_request("top_logprobs is not supported by fastlm serve", "top_logprobs", "unsupported_parameter")
    if getattr(req, "suffix", None):
        raise bad_request("suffix is not supported by fastlm serve", "suffix", "unsupported_parameter")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != (req.n or 1):
        raise bad_request("best_of is not supported by fastlm serve (only best_of == n)", "best_of",
                          "unsupported_parameter")
    if getattr(req, "tools", None):
        raise bad_request("tools are not supported by fastlm serve", "tools", "unsupported_parameter")
    rf = getattr(req, "response_format", None)
    if rf and rf.get("type", "text") != "text":
        raise bad_request("response_format other than text is not supported by fastlm serve", "response_format",
                          "unsupported_parameter")


def _sampling_params(req, max_tokens: int) -> SamplingParams:
    top_k = req.top_k
    if top_k == -1:        # vLLM's "off"
        top_k = 0
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise bad_request(f"seed must be in [0, {MAX_SEED}], got {req.seed}", "seed", "invalid_value")
    try:
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p,
                              top_k=0 if top_k is None else top_k,
                              seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                              n=1 if req.n is None else req.n, ignore_eos=bool(req.ignore_eos))
    except ValueError as e:
        raise _params_error(e) from None


def _check_prompt(state: ServerState, ids: List[int], max_tokens: int, param: str, index: Optional[int]) -> None:
    eng = state.engine
    where = param if index is None else f"{param}[{index}]"
    if not ids:
        raise bad_request(f"{where} is empty: a prompt needs at least one token", param, "empty_prompt")
    for t in ids:
        if not 0 <= t < eng.vocab_size:
            raise bad_request(f"{where} holds token id {t}, outside the vocabulary [0, {eng.vocab_size})", param,
                              "invalid_token_id")
    if len(ids) + max_tokens > eng.max_model_len:
        raise bad_request(f"this model's maximum context length is {eng.max_model_len} tokens; {where} has "
                          f"{len(ids)} tokens and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all): "
                          "shorten the prompt or lower max_tokens", param, "context_length_exceeded")
    num_blocks, bs = getattr(eng, "num_blocks", None), getattr(eng, "block_size", None)
    if num_blocks and bs and -(-(len(ids) + max_tokens - 1) // bs) > num_blocks:
        raise bad_request(f"{where} with max_tokens {max_tokens} needs more KV-cache blocks than the server has "
                          f"({num_blocks} of {bs} tokens)", param, "context_length_exceeded")


class _Seq:
    """One choice being generated."""

    def __init__(self, state: ServerState, params: SamplingParams, arrival: float):
        self.text = SequenceText(state.tokenizer, params.stop_strings)
        self.timer = SequenceTimer(state.metrics, arrival)
        self.token_ids: List[int] = []
        self.finish_reason: Optional[str] = None


class _Run:
    """The engine requests of one HTTP request (one per prompt, n sequences each), merged into one
    stream of (prompt index, RequestOutput)."""

    def __init__(self, state: ServerState, prompts: List[List[int]], params: SamplingParams, arrival: float):
        self.state, self.prompts, self.params, self.arrival = state, prompts, params, arrival
        base = uuid.uuid4().hex
        self.rids = [f"{base}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: List[asyncio.Task] = []
        self.errors: List[BaseException] = []
        self.seqs: Dict[tuple, _Seq] = {}
        self.open = 0
        self.closed = False
        self.nseq = len(prompts) * params.n
        self.first_token = [False] * len(prompts)
        self.started = False

    async def start(self) -> None:
        st = self.state
        if st.max_queue is not None and st.inflight_seqs + self.nseq > st.max_num_seqs + st.max_queue:
            raise APIError(429, f"the server's queue is full ({st.inflight_seqs} sequences in flight, at most "
                                f"{st.max_num_seqs} running + {st.max_queue} waiting): retry later",
                           "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"})
        st.inflight_seqs += self.nseq
        for i, p in enumerate(self.prompts):
            for j in range(self.params.n):
                self.seqs[(i, j)] = _Seq(st, self.params, self.arrival)
            self.tasks.append(asyncio.create_task(self._pump(i, p)))
            self.open += 1
        await asyncio.sleep(0)            # every pump runs up to its first wait: add_request has run
        if self.errors:
            e = self.errors[0]
            self.close()
            if isinstance(e, ValueError):
                raise _params_error(e)
            if isinstance(e, RuntimeError) and "shutting down" in str(e):
                raise APIError(503, str(e), "service_unavailable", None, "draining", headers={"Retry-After": "1"})
            raise e
        st.metrics.request_prompt_tokens.inc(sum(len(p) for p in self.prompts))
        self.started = True

    async def _pump(self, i: int, prompt: List[int]) -> None:
        try:
            async for out in self.state.engine.stream(prompt, self.params, self.rids[i]):
                self.queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # noqa: BLE001 - handed to the consumer
            self.errors.append(e)
            self.queue.put_nowait((i, e))
        finally:
            self.queue.put_nowait((i, None))

    async def outputs(self):
        """Yields (choice index, _Seq, new token ids, finished) until every sequence finished."""
        n = self.params.n
        while self.open:
            i, out = await self.queue.get()
            if out is None:
                self.open -= 1
                continue
            if isinstance(out, BaseException):
                raise out
            if out.new_token_ids and not self.first_token[i]:
                self.first_token[i] = True
                self.state.metrics.prompt_rate.add(len(self.prompts[i]))
            s = self.seqs[(i, out.index)]
            s.token_ids += out.new_token_ids
            s.timer.tokens(len(out.new_token_ids))
            if out.finished:
                s.finish_reason = out.finish_reason
                s.timer.done(out.finish_reason)
            yield i * n + out.index, s, list(out.new_token_ids), out.finished

    def close(self) -> None:
        """Synchronous (safe inside a cancelled scope): abort every engine request still running."""
        if self.closed:
            return
        self.closed = True
        self.state.inflight_seqs -= self.nseq
        gone = sum(1 for s in self.seqs.values() if s.finish_reason is None)
        if self.started and gone:
            self.state.metrics.finished.labels(finish_reason="abort").inc(gone)
        for t in self.tasks:
            if not t.done():
                t.cancel()
        for rid in self.rids:
            try:
                self.state.engine.abort(rid)
            except Exception:   # noqa: BLE001 - aborting a finished request is a no-op anyway
                pass

    def usage(self) -> dict:
        p = sum(len(x) for x in self.prompts)
        c = sum(len(s.token_ids) for s in self.seqs.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _until_disconnect(request) -> None:
    """Returns when the client closes the connection (the ASGI http.disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _collect(run: _Run, request) -> bool:
    """Run to the end (non-streamed): True, or False when the client disconnected first (aborted)."""
    async def consume():
        async for _ in run.outputs():
            pass

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            run.close()
    if work not in done:
        return False
    work.result()
    return True


async def _collect_final(run: _Run, request):
    """Non-streamed: run to the end and return [((prompt index, sequence index), seq)] in order, each
    seq's text finished; None when the client disconnected first (aborted)."""
    try:
        if not await _collect(run, request):
            return None
    finally:
        run.close()
    out = []
    for key, s in sorted(run.seqs.items()):
        s.text.push(s.token_ids)
        s.text.finish(s.finish_reason)
        out.append((key, s))
    return out


def _gone():
    """The answer to a client that already left (never delivered; 499 as nginx logs it)."""
    from fastapi.responses import Response

    return Response(status_code=499)


def _sse_response(events, run: _Run):
    """A text/event-stream response that aborts `run` however it ends: finished, failed, cancelled by
    a client disconnect, even before the first event was pulled from `events`."""
    from fastapi.responses import StreamingResponse

    class _SSE(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                run.close()

    return _SSE(events, media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------ the app

def create_app(state: ServerState):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state.embedder is not None:
            state.embedder.start()
        try:
            yield
        finally:
            state.draining = True
            if state.engine is not None:
                await state.engine.drain()
            if state.embedder is not None:
                await state.embedder.stop()

    app = FastAPI(title="fastlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fastlm = state

    def err(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return err(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):      # FastAPI's 422 -> OpenAI's 400
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return err(bad_request(f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}",
                               loc[0] if loc else None, "invalid_type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg, kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return err(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error", None, "internal_error"))

    # ---- info routes ----

    @app.get("/health")
    async def health():
        body: Dict[str, Any] = {"status": "draining" if state.draining else "ok", "model": state.model_name,
                                "kind": state.kind}
        if state.engine is not None:
            st = state.engine.stats()
            body.update(running=st.get("num_running", 0), waiting=st.get("num_waiting", 0),
                        kv_blocks_used=st.get("kv_blocks_used", 0), kv_blocks_free=st.get("kv_blocks_free", 0))
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "fastlm",
                "root": state.model_path or state.model_name}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_model_len
        else:
            card["max_model_len"] = state.embedder.model.max_seq_length
        return {"object": "list", "data": [card]}

    # ---- completions ----

    def _need_engine(route: str) -> None:
        if state.engine is None:
            raise bad_request(f"{state.model_name!r} is an embedding model: it serves /v1/embeddings, not {route}",
                              "model", "wrong_model_type")

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        req = _parse(CompletionRequest, await request.body())
        state.check_model(req.model)
        _need_engine("/v1/completions")
        state.check_open()
        _check_unsupported(req)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = _sampling_params(req, max_tokens)
        p = req.prompt
        if isinstance(p, str):
            prompts, texts = [state.tokenizer.encode(p)], [p]
        elif len(p) == 0:
            raise bad_request("prompt is an empty list", "prompt", "empty_prompt")
        elif isinstance(p[0], str):
            prompts, texts = [state.tokenizer.encode(x) for x in p], list(p)
        elif isinstance(p[0], int):
            prompts, texts = [list(p)], None
        else:
            prompts, texts = [list(x) for x in p], None
        for k, ids in enumerate(prompts):
            _check_prompt(state, ids, max_tokens, "prompt", k if len(prompts) > 1 else None)
        run = _Run(state, prompts, params, arrival)
        await run.start()
        echo = bool(req.echo)
        echo_text = (texts if texts is not None else [state.tokenizer.decode(x) for x in prompts]) if echo else None
        want_ids = bool(req.return_token_ids)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = params.n

        def choice(index, text, reason, ids=None):
            c = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            if want_ids and ids is not None:
                c["token_ids"] = ids
            return c

        if not req.stream:
            seqs = await _collect_final(run, request)
            if seqs is None:
                return _gone()
            choices = []
            for (i, j), s in seqs:
                text = (echo_text[i] if echo else "") + s.text.final_text
                c = choice(i * n + j, text, s.finish_reason, s.token_ids)
                if want_ids:
                    c["prompt_token_ids"] = prompts[i]
                choices.append(c)
            return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": choices, "usage": run.usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": usage})

        async def events():
            try:
                if echo:
                    for (i, j) in sorted(run.seqs):
                        yield chunk([choice(i * n + j, echo_text[i], None, [] if want_ids else None)])
                async for index, s, new, finished in run.outputs():
                    delta = s.text.push(new)
                    if finished:
                        delta += s.text.finish(s.finish_reason)
                    if delta or finished or (want_ids and new):
                        yield chunk([choice(index, delta, s.finish_reason if finished else None, new)])
                if include_usage:
                    yield chunk([], run.usage())
                yield "data: [DONE]\n\n"
            except Exception as e:   # noqa: BLE001 - headers are sent: the error goes in the stream
                yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body())
                yield "data: [DONE]\n\n"
            finally:
                run.close()

        return _sse_response(events(), run)

    # ---- chat ----

    def _messages(raw: List[Dict[str, Any]]) -> List[Dict[str, str]]:
        if not raw:
            raise bad_request("messages is empty", "messages", "empty_messages")
        out = []
        for k, m in enumerate(raw):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str):
                raise bad_request(f"messages[{k}].role must be a string", "messages", "invalid_type")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if (not isinstance(part, dict) or part.get("type") != "text"
                            or not isinstance(part.get("text"), str)):
                        raise bad_request(f"messages[{k}].content: only text parts are supported", "messages",
                                          "invalid_type")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad_request(f"messages[{k}].content must be a string or a list of text parts", "messages",
                                  "invalid_type")
            out.append({"role": role, "content": content})
        return out

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrival = time.monotonic()
        req = _parse(ChatRequest, await request.body())
        state.check_model(req.model)
        _need_engine("/v1/chat/completions")
        state.check_open()
        _check_unsupported(req)
        if not getattr(state.tokenizer, "chat_template", None):
            raise bad_request(f"the model {state.model_name!r} has no chat template (its tokenizer defines none): "
                              "use /v1/completions", "messages", "no_chat_template")
        messages = _messages(req.messages)
        try:
            ids = state.tokenizer.apply_chat_template(messages)
        except Exception as e:    # noqa: BLE001 - a template that raises on these messages
            raise bad_request(f"the chat template failed on these messages: {e}", "messages", "invalid_messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(state.engine.max_model_len - len(ids), 1)
        params = _sampling_params(req, max_tokens)
        _check_prompt(state, ids, max_tokens, "messages", None)
        run = _Run(state, [ids], params, arrival)
        await run.start()
        want_ids = bool(req.return_token_ids)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            seqs = await _collect_final(run, request)
            if seqs is None:
                return _gone()
            choices = []
            for (_, j), s in seqs:
                c = {"index": j, "message": {"role": "assistant", "content": s.text.final_text},
                     "logprobs": None, "finish_reason": s.finish_reason}
                if want_ids:
                    c["token_ids"] = s.token_ids
                choices.append(c)
            return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                    "choices": choices, "usage": run.usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": state.model_name, "choices": choices, "usage": usage})

        def choice(index, delta, reason, ids=None):
            c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            if want_ids and ids is not None:
                c["token_ids"] = ids
            return c

        async def events():
            try:
                for j in range(params.n):
                    yield chunk([choice(j, {"role": "assistant", "content": ""}, None)])
                async for index, s, new, finished in run.outputs():
                    delta = s.text.push(new)
                    if finished:
                        delta += s.text.finish(s.finish_reason)
                    if delta or (want_ids and new):
                        yield chunk([choice(index, {"content": delta}, None, new)])
                    if finished:
                        yield chunk([choice(index, {}, s.finish_reason)])
                if include_usage:
                    yield chunk([], run.usage())
                yield "data: [DONE]\n\n"
            except Exception as e:   # noqa: BLE001
                yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body())
                yield "data: [DONE]\n\n"
            finally:
                run.close()

        return _sse_response(events(), run)

    # ---- embeddings ----

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        arrival = time.monotonic()
        req = _parse(EmbeddingRequest, await request.body())
        state.check_model(req.model)
        if state.embedder is None:
            raise bad_request(f"{state.model_name!r} is a generative model: it serves /v1/completions and "
                              "/v1/chat/completions, not /v1/embeddings (serve a BERT-style sentence-embedding "
                              "folder for that)", "model", "wrong_model_type")
        state.check_open()
        em = state.embedder.model
        fmt = req.encoding_format or "float"
        if fmt not in ("float", "base64"):
            raise bad_request(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format",
                              "invalid_value")
        if req.dimensions is not None and req.dimensions != em.dimension:
            raise bad_request(f"dimensions: this model's embeddings have {em.dimension} dimensions (it cannot "
                              f"shorten them), got {req.dimensions}", "dimensions", "invalid_value")
        x = req.input
        if isinstance(x, str):
            inputs = [em.encode(x)]
        elif len(x) == 0:
            raise bad_request("input is an empty list", "input", "empty_input")
        elif isinstance(x[0], str):
            inputs = [em.encode(t) for t in x]
        elif isinstance(x[0], int):
            inputs = [list(x)]
        else:
            inputs = [list(t) for t in x]
        if len(inputs) > 2048:
            raise bad_request(f"input holds {len(inputs)} items, at most 2048", "input", "invalid_value")
        for k, ids in enumerate(inputs):
            where = "input" if len(inputs) == 1 else f"input[{k}]"
            if not ids:
                raise bad_request(f"{where} is empty", "input", "empty_input")
            bad = [t for t in ids if not 0 <= t < em.vocab_size]
            if bad:
                raise bad_request(f"{where} holds token id {bad[0]}, outside the vocabulary [0, {em.vocab_size})",
                                  "input", "invalid_token_id")
            if len(ids) > em.max_seq_length:
                raise bad_request(f"{where} has {len(ids)} tokens, over this model's maximum of "
                                  f"{em.max_seq_length}", "input", "context_length_exceeded")
        work = asyncio.create_task(state.embedder.embed(inputs))
        watch = asyncio.create_task(_until_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
        if work not in done:
            return _gone()
        vecs = work.result()
        data = []
        for k, v in enumerate(vecs):
            if fmt == "base64":
                emb: Any = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
            else:
                emb = v.float().tolist()
            data.append({"object": "embedding", "index": k, "embedding": emb})
        ntok = sum(len(t) for t in inputs)
        state.metrics.embedding_latency.observe(time.monotonic() - arrival)
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": ntok, "total_tokens": ntok}}

    return _count_status(app, state.metrics)


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")


class _count_status:
    """Pure-ASGI middleware counting responses by route and status (BaseHTTPMiddleware would wrap
    `receive` and hide client disconnects from the streaming responses)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"s": 0}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["s"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(route=path if path in _ROUTES else "other", status=str(status["s"])).inc()
