"""fastlm.Engine: continuous batching over a paged KV cache.

Interface (the HTTP server is written against it):

    engine = Engine(model, max_num_seqs=64, max_num_batched_tokens=2048, kv_cache_mb=None, block_size=16,
                    enable_prefix_caching=True, eos_token_id=None, decode=None, max_model_len=None)
        model: fastlm.models.GPT2, or a transformers GPT2LMHeadModel (converted once, as fastlm.generate
        does). kv_cache_mb None: room for max_num_seqs * max_model_len tokens, capped at 2048 MB (but
        never less than one max_model_len sequence). decode: callable(list[int]) -> str for stop
        strings; eos_token_id: int or None. max_model_len: default the model's n_positions.
    engine.vocab_size, engine.max_model_len, engine.block_size, engine.num_blocks: ints
    engine.add_request(prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> str
        ValueError (naming the problem): empty prompt, non-int ids, ids outside [0, vocab),
        len(prompt) + max_tokens > max_model_len, a duplicate request_id, a prompt that can never fit
        the KV pool, n > max_num_seqs, stop strings without `decode`. RuntimeError("... shutting down") after drain().
        Thread-safe: queued under a lock, applied at the start of the next step().
    engine.step() -> list[RequestOutput]
        One iteration: RequestOutput(request_id, index, new_token_ids, finished, finish_reason
        ("stop" | "length" | "abort" | None), num_prompt_tokens, num_output_tokens) for every sequence
        that produced a token or finished in this step (n > 1: one per sequence index).
    engine.abort(request_id) -> None
        Thread-safe; the next step() frees its blocks and reports finished/"abort" for each of its
        unfinished sequences. Unknown or finished ids: no-op.
    engine.has_unfinished() -> bool
    async for out in engine.stream(prompt_ids, params=None, request_id=None): ...
        Starts (once per event loop) a background task that runs `await asyncio.to_thread(self.step)`
        while there is work and sleeps on an asyncio.Event when idle, routing outputs to per-request
        queues. A consumer that stops iterating (aclose(), cancellation: a client disconnect) aborts
        its request. add_request's ValueError is raised by the first __anext__.
    engine.stats() -> dict
        num_running, num_waiting, num_preempted_total, kv_blocks_total, kv_blocks_used, kv_blocks_free,
        prefix_cache_queries, prefix_cache_hits (full blocks looked up / found), prompt_tokens_total,
        generation_tokens_total, steps_total; also time_step_s and time_forward_s (summed over steps:
        the model -- forward and LM head -- vs the whole step; the rest, scheduling, batch building,
        sampling and stop checks, is the engine's overhead).
    await engine.drain()
        Stop accepting requests, then wait until every running and waiting one has finished.

Semantics: per request temperature / top_k / top_p / seed / stop / stop_token_ids / max_tokens / n as
fastlm.generate and SamplingParams describe; each sequence draws from its own generator (seed + index).
Greedy tokens are batch-invariant on the cpu backend in fp32 (model_runner): a request's tokens are
those of the request run alone, whatever else shares the steps, however it is chunked or preempted.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Dict, List, Optional

import torch

from fastlm.serving.kv_pages import BlockPool
from fastlm.serving.model_runner import KVCache, ModelRunner
from fastlm.serving.params import RequestOutput, SamplingParams
from fastlm.serving.sampling import check_stop, make_generator, sample_rows
from fastlm.serving.scheduler import FINISHED, Scheduler, Sequence, blocks_for

# The default pool's cap. GPT-2 small fp32 holds 73.7 KB of K/V per token, so 512 MB held ~7,100
# tokens: the 64-request trace (prompts 32-512, outputs 16-128) then ran ~20 sequences at a time with
# preemptions (1 thread: 54.8 tok/s); at 2048 MB all 64 fit (68.7 tok/s, same process). vLLM's CPU
# backend defaults to 4 GB.
DEFAULT_KV_CAP_MB = 2048


class _StepThreads:
    """The thread count of CPU steps, chosen by timing them (fastlm.generation._CpuThreads' probe, per
    token: an engine's steps differ in size). With other processes on the cores, every parallel region
    waits for a descheduled thread (measured here, a busy 2-core machine: a tiny model's steps 20x
    slower with 2 threads than with 1). Every `period` steps one step runs with all threads and the next
    with one; the faster per-token count (one thread only when 1.25x faster) runs until the next probe.
    Results do not depend on the count (the kernels' per-row arithmetic is fixed). FASTLM_DECODE_THREADS=N
    fixes N."""

    def __init__(self, period: int = 32):
        fixed = os.environ.get("FASTLM_DECODE_THREADS")
        self.all = int(fixed) if fixed else torch.get_num_threads()
        self.fixed = fixed is not None
        self.period, self.n, self.t_all, self.choice = period, 0, 0.0, self.all

    def run(self, fn, tokens: int):
        want = self.all
        phase = self.n % self.period
        if not self.fixed and self.all > 1:
            want = self.all if phase == 0 else 1 if phase == 1 else self.choice
        saved = torch.get_num_threads()
        if saved != want:
            torch.set_num_threads(want)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            dt = (time.perf_counter() - t0) / max(tokens, 1)
            if saved != want:
                torch.set_num_threads(saved)
            if phase == 0:
                self.t_all = dt
            elif phase == 1:
                self.choice = 1 if dt * 1.25 < self.t_all else self.all
            self.n += 1


class _Request:
    def __init__(self, request_id: str, prompt: List[int], params: SamplingParams, seqs: List[Sequence]):
        self.request_id, self.prompt, self.params, self.seqs = request_id, prompt, params, seqs
        self.num_unfinished = len(seqs)


class Engine:
    """Continuous batching over a paged KV cache; see the module docstring for the interface."""

    def __init__(self, model, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 kv_cache_mb: Optional[float] = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 eos_token_id: Optional[int] = None, decode: Optional[Callable[[List[int]], str]] = None,
                 max_model_len: Optional[int] = None):
        from fastlm.generation import _native

        native = _native(model)
        c = native.config
        for name, v, lo in (("max_num_seqs", max_num_seqs, 1), ("max_num_batched_tokens", max_num_batched_tokens, 1),
                            ("block_size", block_size, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"Engine: {name} must be an int >= {lo}, got {v!r}")
        if max_model_len is None:
            max_model_len = c.n_positions
        if not isinstance(max_model_len, int) or not 1 <= max_model_len <= c.n_positions:
            raise ValueError(f"Engine: max_model_len must be in [1, {c.n_positions}] (the model's positions), "
                             f"got {max_model_len!r}")
        if eos_token_id is not None and (not isinstance(eos_token_id, int) or not 0 <= eos_token_id < c.vocab_size):
            raise ValueError(f"Engine: eos_token_id must be None or an int in [0, {c.vocab_size}), got {eos_token_id!r}")
        self.model = native
        self.vocab_size = c.vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.decode = decode
        dtype = native.wte.weight.dtype
        per_block = KVCache.bytes_per_block(c.n_layer, c.n_head, block_size, c.head_dim, dtype)
        one_seq = blocks_for(max_model_len, block_size)
        if kv_cache_mb is None:
            cap = int(DEFAULT_KV_CAP_MB * 2**20) // per_block
            num_blocks = max(min(blocks_for(max_num_seqs * max_model_len, block_size), cap), one_seq)
        else:
            if isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, (int, float)) or not kv_cache_mb > 0:
                raise ValueError(f"Engine: kv_cache_mb must be a number > 0, got {kv_cache_mb!r}")
            num_blocks = int(kv_cache_mb * 2**20) // per_block
            if num_blocks < 1:
                raise ValueError(f"Engine: kv_cache_mb={kv_cache_mb} holds no KV block ({per_block} bytes each)")
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(native, num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens)
        self.device = native.wte.weight.device
        self._threads = _StepThreads() if self.device.type == "cpu" else None
        self._lock = threading.Lock()
        self._pending: List[_Request] = []          # added, not yet applied (under _lock)
        self._pending_aborts: List[str] = []
        self._requests: Dict[str, _Request] = {}     # applied, unfinished (step thread only)
        self._ids: set = set()                       # every unfinished request id (under _lock)
        self._draining = False
        self._counters = dict(prompt_tokens_total=0, generation_tokens_total=0, steps_total=0,
                              time_step_s=0.0, time_forward_s=0.0)
        # asyncio front
        self._loop = None
        self._loop_task = None
        self._wake: Optional[asyncio.Event] = None
        self._queues: Dict[str, asyncio.Queue] = {}

    # ---- requests ----

    def add_request(self, prompt_ids: List[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; returns its id. See the module docstring for what raises."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a fastlm.SamplingParams, got {type(params).__name__}")
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)):
            raise ValueError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: a prompt needs at least one token")
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt_ids must hold ints, got {t!r} ({type(t).__name__})")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt_ids holds token id {t}, outside the vocabulary [0, {self.vocab_size})")
        P = len(prompt_ids)
        if P + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt length {P} + max_tokens {params.max_tokens} = {P + params.max_tokens} "
                             f"exceeds max_model_len {self.max_model_len}")
        need = blocks_for(P + params.max_tokens - 1, self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"the prompt ({P} tokens) with max_tokens {params.max_tokens} needs {need} KV blocks, "
                             f"more than the pool's {self.num_blocks} (raise kv_cache_mb)")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} sequences exceed the engine's max_num_seqs={self.scheduler.max_num_seqs}")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop strings need the engine's decode callable (Engine(..., decode=...))")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string or None, got {type(request_id).__name__}")
        prompt = list(prompt_ids)
        with self._lock:
            if self._draining:
                raise RuntimeError("Engine is shutting down: no new requests")
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif request_id in self._ids:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            seqs = [Sequence(request_id, i, prompt, params, make_generator(params.seed, i, self.device))
                    for i in range(params.n)]
            seqs[0].children = seqs[1:]
            self._pending.append(_Request(request_id, prompt, params, seqs))
            self._ids.add(request_id)
        self._notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe): the next step frees its blocks and reports it."""
        with self._lock:
            if request_id in self._ids:
                self._pending_aborts.append(request_id)
        self._notify()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._ids)

    # ---- one iteration ----

    def step(self) -> List[RequestOutput]:
        """Apply queued adds/aborts, run one scheduled batch, sample; outputs of this step."""
        t0 = time.perf_counter()
        outputs: List[RequestOutput] = []
        with self._lock:
            adds, self._pending = self._pending, []
            aborts, self._pending_aborts = self._pending_aborts, []
        for req in adds:
            self._requests[req.request_id] = req
            self._counters["prompt_tokens_total"] += len(req.prompt)
            self.scheduler.add(req.seqs[0])
        for rid in aborts:
            req = self._requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if seq.status != FINISHED:
                    self._finish(req, seq, "abort", outputs, [])
        sched = self.scheduler.schedule()
        if sched:
            self._run(sched, outputs)
            self._counters["steps_total"] += 1
        self._counters["time_step_s"] += time.perf_counter() - t0
        return outputs

    def _run(self, sched, outputs: List[RequestOutput]) -> None:
        token_ids, positions, counts, tables, logit_rows, samplers = [], [], [], [], [], []
        row = 0
        for seq, n in sched:
            start = seq.num_computed
            token_ids += seq.tokens(start, start + n)
            positions += range(start, start + n)
            counts.append(n)
            tables.append(seq.block_table)
            row += n
            if start + n == len(seq):
                logit_rows.append(row - 1)
                samplers.append(seq)
        batch = self.runner.make_batch(token_ids, positions, counts, tables, logit_rows)
        t0 = time.perf_counter()
        if self._threads is not None:
            hidden = self._threads.run(lambda: self.runner.forward(batch), len(token_ids))
        else:
            hidden = self.runner.forward(batch)                     # (len(samplers), d)
        self._counters["time_forward_s"] += time.perf_counter() - t0
        for seq, n in sched:
            self.scheduler.computed(seq, n)
        # n > 1: a request's other sequences fork from sequence 0 once its prompt is computed and
        # sample their first token from the same logits row
        rows, seqs = [], []
        for r, seq in enumerate(samplers):
            rows.append(r)
            seqs.append(seq)
            if seq.children:
                for child in seq.children:
                    if self.scheduler.fork(seq, child, self.runner.cache.copy_block):
                        rows.append(r)
                        seqs.append(child)
                    else:                                    # no block for the copy: prefill on its own
                        self.scheduler.add(child, front=True)
                seq.children = []
        if not seqs:
            return
        picked = self._pick(hidden, rows, seqs)
        for seq, tok in zip(seqs, picked):
            seq.output.append(tok)
            self._counters["generation_tokens_total"] += 1
            req = self._requests[seq.request_id]
            reason = check_stop(seq.output, seq.params, self.eos_token_id, self.decode)
            if reason is None:
                outputs.append(self._output(req, seq, [tok], False, None))
            else:
                self._finish(req, seq, reason, outputs, [tok])

    def _pick(self, hidden, rows: List[int], seqs: List[Sequence]) -> List[int]:
        """The next token of seqs[i] from hidden row rows[i]: greedy rows through the runner's argmax
        (the LM head's int8 screen on CPU fp32), the others sampled from their logits."""
        picked = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy] if self.runner.use_head_screen else []
        t0 = time.perf_counter()
        if greedy:
            for i, t in zip(greedy, self.runner.greedy(hidden[[rows[i] for i in greedy]])):
                picked[i] = t
        rest = [i for i in range(len(seqs)) if not (greedy and seqs[i].params.greedy)]
        logits = self.runner.logits(hidden[[rows[i] for i in rest]]) if rest else None
        self._counters["time_forward_s"] += time.perf_counter() - t0         # the model's head
        if rest:
            for i, t in zip(rest, sample_rows(logits, [seqs[i] for i in rest])):
                picked[i] = t
        return picked

    def _output(self, req: _Request, seq: Sequence, new: List[int], finished: bool, reason) -> RequestOutput:
        return RequestOutput(req.request_id, seq.index, new, finished, reason, len(req.prompt), len(seq.output))

    def _finish(self, req: _Request, seq: Sequence, reason: str, outputs: List[RequestOutput], new: List[int]) -> None:
        if seq.children:                 # not forked yet (sequence 0 aborted in its prefill): abort them too
            for child in seq.children:
                self._finish(req, child, "abort", outputs, [])
            seq.children = []
        self.scheduler.remove(seq)
        seq.status = FINISHED
        seq.finish_reason = reason
        outputs.append(self._output(req, seq, new, True, reason))
        req.num_unfinished -= 1
        if req.num_unfinished == 0:
            del self._requests[req.request_id]
            with self._lock:
                self._ids.discard(req.request_id)

    # ---- stats ----

    def stats(self) -> dict:
        s = self.scheduler
        return dict(num_running=len(s.running), num_waiting=len(s.waiting) + len(self._pending),
                    num_preempted_total=s.num_preempted_total, kv_blocks_total=self.pool.num_blocks,
                    kv_blocks_used=self.pool.num_used, kv_blocks_free=self.pool.num_free,
                    prefix_cache_queries=self.pool.queries, prefix_cache_hits=self.pool.hits, **self._counters)

    # ---- asyncio front ----

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:          # the loop closed meanwhile
                pass

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._loop_task is not None and not self._loop_task.done():
            return
        self._loop = loop
        self._wake = asyncio.Event()
        self._loop_task = loop.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        while True:
            if not self.has_unfinished():
                self._wake.clear()
                if not self.has_unfinished():
                    await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self.step)
            except Exception as e:  # noqa: BLE001 - delivered to every consumer, then the engine goes on
                for rid in list(self._queues):
                    self._queues[rid].put_nowait(e)
                    self.abort(rid)
                await asyncio.sleep(0.01)
                continue
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    async def stream(self, prompt_ids, params: Optional[SamplingParams] = None,
                     request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its RequestOutputs as the background step loop makes them, until every
        sequence finished. Leaving early (aclose, cancellation) aborts the request."""
        self._ensure_loop()
        rid = self.add_request(prompt_ids, params, request_id)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q                       # no await since add_request: no output missed
        left = (params or SamplingParams()).n
        try:
            while left:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    left -= 1
                yield out
        finally:
            self._queues.pop(rid, None)
            if left:
                self.abort(rid)

    async def drain(self) -> None:
        """Refuse new requests (RuntimeError), then wait until all queued and running ones finished."""
        with self._lock:
            self._draining = True
        if self.has_unfinished():
            self._ensure_loop()
            self._wake.set()
        while self.has_unfinished():
            await asyncio.sleep(0.005)
