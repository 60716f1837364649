"""Iteration-level scheduling for the serving engine: which sequences run in the next step, and how
many of their tokens.

Every step (schedule()) takes, under a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs):
1. the running sequences, oldest first: a decoding sequence's one token, or the next chunk of a
   prompt still being prefilled (chunked prefill: a chunk is what is left of the budget). Each gets
   the KV blocks its tokens need; when the pool runs dry the NEWEST running sequence is preempted
   (its blocks freed, the sequence sent back to the front of the waiting queue to be recomputed from
   its prompt and the tokens it already produced), until the older one fits or is itself the newest;
2. then, if nothing was preempted, waiting sequences in arrival order while the budget, the sequence
   cap and the free blocks (minus a small watermark kept for running sequences to grow into) allow.
   On admission the sequence's full prompt blocks are looked up in the prefix cache (kv_pages): hit
   blocks are shared, their tokens are not computed again (the last token always is: its logits
   are needed).

A Sequence's tokens are prompt + output; tokens [0, num_computed) have their keys/values in the
blocks of block_table. A preempted sequence keeps its output: its recompute is a prefill of prompt +
output, whose keys/values are bit for bit those it had (model_runner's rows are batch-invariant).
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Deque, List, Optional, Tuple

from fastlm.serving.kv_pages import ROOT_HASH, BlockPool, block_key

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"

_ids = itertools.count()


class Sequence:
    """One generated sequence (index of n) of a request. prompt, output: token id lists."""

    def __init__(self, request_id: str, index: int, prompt: List[int], params, generator):
        self.request_id, self.index = request_id, index
        self.prompt = prompt
        self.output: List[int] = []
        self.params = params
        self.generator = generator
        self.block_table: List[int] = []
        self.block_hashes: List[int] = []     # hash-chain keys of the first len(block_hashes) full blocks
        self.num_computed = 0                 # tokens whose keys/values are in the cache
        self.status = WAITING
        self.finish_reason: Optional[str] = None
        self.children: List["Sequence"] = []  # n > 1: sequences 1..n-1, forked after this one's prefill
        self.seq_id = next(_ids)              # admission order (preemption takes the newest)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, stop: int) -> List[int]:
        """tokens[start:stop] of prompt + output."""
        P = len(self.prompt)
        if stop <= P:
            return self.prompt[start:stop]
        if start >= P:
            return self.output[start - P:stop - P]
        return self.prompt[start:] + self.output[:stop - P]

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class Scheduler:
    """running: admitted sequences (blocks held), in admission order; waiting: the queue."""

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: Optional[int] = None):
        self.pool = pool
        self.bs = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark = max(1, pool.num_blocks // 100) if watermark is None else watermark
        self.running: List[Sequence] = []
        self.waiting: Deque[Sequence] = deque()
        self.num_preempted_total = 0
        self._preempted = False

    # ---- queue changes ----

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of the queues (finish/abort) and free its blocks."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free_table(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_table(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0
        self.num_preempted_total += 1
        self.add(seq, front=True)

    # ---- one step ----

    def schedule(self) -> List[Tuple[Sequence, int]]:
        """[(sequence, number of its tokens to compute this step)], running ones first."""
        budget = self.max_num_batched_tokens
        out: List[Tuple[Sequence, int]] = []
        self._preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed, budget)
            if not self._grow(seq, n):           # seq itself was the newest: preempted
                break
            out.append((seq, n))
            budget -= n
            i += 1
        if self._preempted:                      # no admissions while running ones are short of blocks
            return out
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.children) > self.max_num_seqs:
                break
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, preempting the newest running sequences as needed. False
        when seq itself had to go."""
        need = blocks_for(seq.num_computed + n, self.bs) - len(seq.block_table)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            self._preempted = True
            if victim is seq:
                return False
        if need > 0:
            seq.block_table.extend(self.pool.allocate_many(need))
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Prefix-cache lookup and blocks for a waiting sequence's first chunk; the chunk's token count,
        or 0 (nothing taken) when its blocks do not fit now."""
        bs = self.bs
        total = len(seq)
        # full blocks that can come from the cache: all but the one holding the last token
        keys = []
        parent = ROOT_HASH
        n_full = (total - 1) // bs
        if self.pool.enable_prefix_caching:
            for j in range(n_full):
                key = block_key(parent, seq.tokens(j * bs, (j + 1) * bs))
                b = self.pool.probe(key, parent)
                if b is None:
                    break
                keys.append((key, parent, b))
                parent = key[0]
        hit = len(keys)
        n = min(total - hit * bs, budget)
        new = blocks_for(hit * bs + n, bs) - hit
        reclaimed = sum(1 for *_, b in keys if self.pool.ref_count[b] == 0)   # cached but free
        watermark = self.watermark if self.running else 0   # alone, a sequence may take every block
        if new > self.pool.num_free - reclaimed - watermark:
            return 0
        # take them: counts the queries and hits (one lookup per full prompt block, as probed; the
        # first miss ends the chain)
        parent = ROOT_HASH
        for j in range(min(hit + 1, n_full)):
            key = block_key(parent, seq.tokens(j * bs, (j + 1) * bs)) if j >= hit else keys[j][0]
            b = self.pool.lookup(key, parent)
            if b is None:
                break
            seq.block_table.append(b)
            seq.block_hashes.append(key[0])
            parent = key[0]
        seq.num_computed = len(seq.block_table) * bs
        n = min(total - seq.num_computed, budget)
        seq.block_table.extend(self.pool.allocate_many(blocks_for(seq.num_computed + n, bs) - len(seq.block_table)))
        return n

    # ---- after the step ----

    def computed(self, seq: Sequence, n: int) -> None:
        """seq's n scheduled tokens are in the cache: advance, and register its newly full blocks."""
        seq.num_computed += n
        if not self.pool.enable_prefix_caching:
            return
        bs = self.bs
        for j in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            key = block_key(parent, seq.tokens(j * bs, (j + 1) * bs))
            self.pool.register(seq.block_table[j], key, parent)
            seq.block_hashes.append(key[0])

    def fork(self, parent: Sequence, child: Sequence, copy_block) -> bool:
        """child (same prompt, no output yet) takes parent's computed prompt: its full blocks shared,
        a private copy (copy_block(src, dst)) of a partial last block. False (nothing taken) when no
        block is free for the copy; the caller then queues the child to prefill on its own."""
        bs = self.bs
        full = parent.num_computed // bs
        partial = parent.num_computed % bs != 0
        if partial and self.pool.num_free < 1:
            return False
        for b in parent.block_table[:full]:
            self.pool.share(b)
        child.block_table = parent.block_table[:full]
        child.block_hashes = list(parent.block_hashes[:full])
        if partial:
            b = self.pool.allocate()
            copy_block(parent.block_table[full], b)
            child.block_table.append(b)
        child.num_computed = parent.num_computed
        child.status = RUNNING
        self.running.append(child)
        return True
