"""fastlm.generate: prefill + decode over a static KV cache, greedy or sampled, left-padded batches.

Semantics follow transformers' GPT2LMHeadModel.generate: positions per row from the attention mask
(left padding), greedy = argmax, sampling = temperature -> top-k -> top-p -> multinomial (drawn from
`generator`), an eos makes a row finished and its later tokens `pad_token_id`, and the loop stops
when every row is finished. Each row's tokens equal those of its prompt run alone: the cache holds
every row without its padding. On CUDA the decode step is captured once in a CUDA graph and replayed.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from fastlm.models.gpt2 import GPT2

_HF_CACHE_ATTR = "_fastlm_gpt2"


def _native(model) -> GPT2:
    if isinstance(model, GPT2):
        return model
    if hasattr(model, "transformer") and hasattr(model, "config") and getattr(model.config, "model_type", "") == "gpt2":
        # converted once and cached on the HF model (not a submodule: stays out of its state_dict)
        native = model.__dict__.get(_HF_CACHE_ATTR)
        ref = model.transformer.wte.weight
        if native is None or native.wte.weight.device != ref.device or native.wte.weight.dtype != ref.dtype:
            native = GPT2.from_hf(model)
            model.__dict__[_HF_CACHE_ATTR] = native
        return native
    raise TypeError(f"fastlm.generate: model must be a fastlm.models.GPT2 or a transformers GPT2LMHeadModel, "
                    f"got {type(model).__name__}")


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return [eos_token_id]
    if isinstance(eos_token_id, Tensor):
        return [int(t) for t in eos_token_id.flatten().tolist()]
    if isinstance(eos_token_id, Sequence) and all(isinstance(t, int) for t in eos_token_id):
        return list(eos_token_id)
    raise TypeError(f"fastlm.generate: eos_token_id must be an int or a list of ints, got {eos_token_id!r}")


def process_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus; keeps the smallest set of tokens whose
    probability reaches top_p, at least one), as transformers' logits warpers do, in fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


_process_logits = process_logits   # the name tests and older callers use


class _DecodeGraph:
    """The decode step captured once in a CUDA graph: static token input, static logits output; the
    cache's buffers and lengths are static by construction."""

    def __init__(self, model: GPT2, cache, batch: int, device, greedy: bool = False, topk: int = 0):
        self.model, self.cache = model, cache
        self.kw = {"greedy": greedy, "topk": topk}
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def capture(self) -> None:
        lengths0 = self.cache.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream (allocator, lazy init), then undo its appends
                self.model.decode_step(self.tokens, self.cache, **self.kw)
                self.cache.lengths.copy_(lengths0)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.tokens, self.cache, **self.kw)
        # capture records the work without running it: lengths were not advanced
        self.cache.lengths.copy_(lengths0)

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


class _CpuThreads:
    """The thread count of CPU decode steps, chosen by timing them.

    A decode step is ~100 short kernels, most of them parallel regions: with all threads it is the
    fastest on an idle machine, but when other processes hold the cores every region waits for a
    descheduled thread (measured on a busy 2-core machine: 475 ms a step with 2 threads, 17 ms
    with 1). So one step runs with all threads and the next with one, and the faster count runs
    until the next probe, `period` steps later (doubling, up to 8x, while the answer holds).
    The one-thread probe is skipped when the all-thread step is within 1.3x of the fastest
    all-thread step seen for the same `key` (model, batch) in this process, i.e. while the machine
    is as idle as it has been: an idle machine pays no probe step after the first generate call.
    Results do not depend on the count (up to 8 threads: the linear kernel computes each output on
    one thread, decode attention splits the cache for 16 parallel units whatever the count).
    FASTLM_DECODE_THREADS=N fixes N."""

    _best_all: dict = {}   # key -> fastest all-thread step time (s) seen in this process

    def __init__(self, period: int = 32, key=None):
        self.key = key
        self.saved = torch.get_num_threads()
        fixed = os.environ.get("FASTLM_DECODE_THREADS")
        self.fixed = int(fixed) if fixed else None
        self.base = period
        self.period, self.n, self.t_all, self.choice = period, 0, 0.0, self.saved
        self.t0 = 0.0

    def before(self) -> None:
        if self.fixed is not None:
            want = self.fixed
        elif self.saved <= 1:
            want = self.saved
        else:
            phase = self.n % self.period
            want = self.saved if phase == 0 else 1 if phase == 1 else self.choice
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        self.t0 = time.perf_counter()

    def after(self) -> None:
        dt = time.perf_counter() - self.t0
        phase = self.n % self.period
        if phase == 0:
            self.t_all = dt
            best = self._best_all.get(self.key)
            if self.saved > 1 and best is not None and dt <= 1.3 * best:
                self._best_all[self.key] = min(best, dt)
                self.choice = self.saved     # as fast as ever: no one-thread probe this period
                self.n = 1
        elif phase == 1:
            choice = self.saved if self.t_all <= dt else 1
            if choice == self.saved and self.key is not None:
                self._best_all[self.key] = min(self._best_all.get(self.key, self.t_all), self.t_all)
            # the probe of the losing count costs a step: probe less often while the answer holds
            if self.n > 1:
                self.period = min(8 * self.base, 2 * self.period) if choice == self.choice else self.base
            self.choice = choice
            self.n = 1  # the period counts from this probe
        self.n += 1

    def restore(self) -> None:
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)


def _use_cuda_graph(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPH", "1") != "0"


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the decode loop (as serving engines freeze it): a
    step makes short-lived objects that refcounting frees, and each collection the allocations
    trigger walks every tracked object of the process. Restored (and so run when due) on exit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, streamer: Any = None,
             _stats: Optional[dict] = None) -> Tensor:
    """Generate up to max_new_tokens tokens after each prompt row.

    model: a fastlm.models.GPT2 or a transformers GPT2LMHeadModel (converted once, cached on it).
    input_ids: (B, S) (or (S,)) token ids, left-padded where attention_mask (B, S) has zeros.
    do_sample=False: greedy (argmax); True: temperature, top_k (0: off), top_p (1.0: off), drawn with
    `generator`. eos_token_id (int or list; None: never stop): a row that produced it is finished, its
    later tokens are pad_token_id (default: the first eos); the loop stops when all rows are finished.
    streamer: an object with put(tensor) and end() (transformers' streamers): put(input_ids) first,
    then put(tokens (B,)) at every step. Returns (B, S + n) int64, n <= max_new_tokens.
    Bad arguments raise ValueError/TypeError before any work."""
    native = _native(model)
    c = native.config
    # ---- argument checks: all before any work ----
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"fastlm.generate: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"fastlm.generate: input_ids must be (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"fastlm.generate: input_ids must be integer token ids, got {input_ids.dtype}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"fastlm.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, S = input_ids.shape
    if S + max_new_tokens > c.n_positions:
        raise ValueError(f"fastlm.generate: prompt length {S} + max_new_tokens {max_new_tokens} = "
                         f"{S + max_new_tokens} exceeds the model's {c.n_positions} positions")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= c.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"fastlm.generate: input_ids holds token id {bad}, outside the vocabulary [0, {c.vocab_size})")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"fastlm.generate: temperature must be > 0, got {temperature!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"fastlm.generate: top_k must be an int >= 0, got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"fastlm.generate: top_p must be in (0, 1], got {top_p!r}")
    eos = _eos_list(eos_token_id)
    if any(not 0 <= e < c.vocab_size for e in eos):
        raise ValueError(f"fastlm.generate: eos_token_id {eos} outside the vocabulary [0, {c.vocab_size})")
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise TypeError(f"fastlm.generate: pad_token_id must be an int, got {pad_token_id!r}")
    device = native.wte.weight.device
    if input_ids.device != device:
        raise ValueError(f"fastlm.generate: input_ids is on {input_ids.device} but the model is on {device}")
    pad_counts = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"fastlm.generate: attention_mask must be a tensor of shape {(B, S)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        m = attention_mask.to(device=device, dtype=torch.long)
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("fastlm.generate: attention_mask must hold 0s and 1s")
        n_real = m.sum(1)
        if bool((n_real == 0).any()):
            raise ValueError("fastlm.generate: a row of attention_mask has no token (all zeros)")
        pads = S - n_real
        # left padding only: every row is zeros then ones
        if bool((m.cumsum(1) != (torch.arange(S, device=device)[None, :] - pads[:, None] + 1).clamp(min=0)).any()):
            raise ValueError("fastlm.generate: attention_mask must be left-padded (zeros, then ones, per row)")
        if bool((pads > 0).any()):
            pad_counts = pads

    input_ids = input_ids.long()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return input_ids.clone()

    def pick(logits: Tensor) -> Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    t0 = time.perf_counter()
    cache = native.new_cache(B, S + max_new_tokens)
    # Greedy: prefill and decode steps return their argmax tokens (the model's head goes through
    # ops.linear_argmax, whose choice -- the int8 screen on CPU fp32, else the logits' argmax -- is the
    # ops' own: the same tokens). Top-k sampling: the head's logits through ops.linear_topk_logits,
    # exact wherever a row's top-k can be and -inf elsewhere: pick() draws what it draws on full logits.
    step_picks = not do_sample
    topk = min(top_k, c.vocab_size) if do_sample and top_k > 0 else 0
    first = native.prefill(input_ids, cache, pad_counts, greedy=step_picks, topk=topk)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    out = [input_ids]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_prefill = time.perf_counter() - t0
    step = None
    steps = 0
    threads = _CpuThreads(key=(id(native), B)) if device.type == "cpu" else None
    picked = first if step_picks else pick(first)
    with _gc_paused():   # the cyclic GC scans every live object: ~5% of a CPU decode step at batch 1
        while True:
            tokens = picked
            if eos_t is not None:
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
                unfinished = unfinished & ~torch.isin(tokens, eos_t)
            out.append(tokens[:, None])
            steps += 1
            if streamer is not None:
                streamer.put(tokens.cpu())
            if steps == max_new_tokens or (eos_t is not None and not bool(unfinished.any())):
                break
            if step is None:
                if _use_cuda_graph(device):
                    graph = _DecodeGraph(native, cache, B, device, greedy=step_picks, topk=topk)
                    graph.capture()
                    step = graph
                else:
                    step = lambda t: native.decode_step(t, cache, greedy=step_picks, topk=topk)  # noqa: E731
            if threads is None:
                out_step = step(tokens)
            else:
                threads.before()
                try:
                    out_step = step(tokens)
                except BaseException:
                    threads.restore()
                    raise
                threads.after()
            picked = out_step if step_picks else pick(out_step)
    if threads is not None:
        threads.restore()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if streamer is not None:
        streamer.end()
    if _stats is not None:
        _stats.update(prefill_s=t_prefill, decode_s=time.perf_counter() - t0 - t_prefill, new_tokens=steps,
                      batch=B, prompt=S)
    return torch.cat(out, dim=1)


# ---- `fastlm generate` CLI (wired into fastlm/cli.py by the lead) ----

def add_cli_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local Hugging Face GPT-2 folder (config + weights, tokenizer optional)")
    src.add_argument("--random", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                     help="random weights with this shape (speed runs, no download)")
    parser.add_argument("--prompt", help="prompt text (needs the folder's tokenizer)")
    parser.add_argument("--tokens", help="prompt as comma-separated token ids")
    parser.add_argument("--prompt-len", type=int, default=32, help="random prompt length when no prompt is given")
    parser.add_argument("--batch", type=int, default=1, help="rows (the prompt repeated)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos", type=int, default=None, help="eos token id (default: none, no early stop)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up call (first-call costs: kernel setup, the head's screen)")


class _CliStreamer:
    """Prints row 0's new tokens as they come (decoded when a tokenizer exists) with a progress bar
    on stderr."""

    def __init__(self, tokenizer, total: int, show: bool):
        import sys

        self.tok, self.total, self.show, self.n, self.sys = tokenizer, total, show, 0, sys
        self.first = True

    def put(self, t: Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.n += 1
        if self.show:
            tok = int(t.reshape(-1)[0])
            self.sys.stdout.write(self.tok.decode([tok]) if self.tok is not None else f"{tok} ")
            self.sys.stdout.flush()
        else:
            width = 30
            done = int(width * self.n / max(self.total, 1))
            self.sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total}")
            self.sys.stderr.flush()

    def end(self) -> None:
        self.sys.stdout.write("\n") if self.show else self.sys.stderr.write("\n")


def cli_main(args) -> int:
    dtype = getattr(torch, args.dtype)
    tokenizer = None
    if args.model:
        model = GPT2.from_hf(args.model, dtype=dtype, device=args.device)
        if any(os.path.exists(os.path.join(args.model, f)) for f in ("tokenizer.json", "vocab.json")):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.model)
            except Exception:  # noqa: BLE001 - a folder without a usable tokenizer still runs on token ids
                tokenizer = None
    else:
        model = GPT2.random(args.random, dtype=dtype, device=args.device)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit("fastlm generate: --prompt needs a --model folder with a tokenizer; use --tokens")
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0].tolist()
    elif args.tokens:
        ids = [int(t) for t in args.tokens.split(",") if t.strip()]
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    input_ids = torch.tensor([ids] * args.batch, device=args.device)
    if not args.no_warmup:
        # One short untimed call first, so the reported rates are those of steady state (the first
        # call pays one-time setup: oneDNN primitives, allocator growth, the LM head's int8 screen).
        generate(model, input_ids[:, -min(8, input_ids.shape[1]):], max_new_tokens=2, do_sample=args.do_sample)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    stats: dict = {}
    streamer = _CliStreamer(tokenizer, args.max_new_tokens, show=not args.no_stream)
    if args.prompt is not None and not args.no_stream:
        print(args.prompt, end="", flush=True)
    out = generate(model, input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=args.eos,
                   generator=gen, streamer=streamer, _stats=stats)
    if args.no_stream:
        new = out[0, input_ids.shape[1]:].tolist()
        print(tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new)))
    B, S, n = stats["batch"], stats["prompt"], stats["new_tokens"]
    pre = B * S / stats["prefill_s"] if stats["prefill_s"] > 0 else float("inf")
    dec = B * max(n - 1, 0) / stats["decode_s"] if stats["decode_s"] > 0 else float("inf")
    print(f"prefill: {B}x{S} tokens in {stats['prefill_s'] * 1e3:.1f} ms ({pre:,.0f} tokens/s); "
          f"decode: {max(n - 1, 0)} steps x {B} rows in {stats['decode_s'] * 1e3:.1f} ms ({dec:,.1f} tokens/s)")
    return 0
