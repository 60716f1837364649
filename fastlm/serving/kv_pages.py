"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference counts, and automatic
prefix caching.

Tensors live elsewhere (model_runner.KVCache: (num_blocks, H, block_size, D) per layer); this module
only decides which block ids a sequence owns. A sequence's block table maps its position j to block
table[j // block_size], row j % block_size.

Prefix caching: a full block is keyed by a hash chain, key_i = hash((key_{i-1}, its block_size token
ids)), so equal keys mean equal token prefixes (the key's tokens and parent are stored and compared
on lookup, so a hash collision is a miss, never a wrong hit). Blocks are shared by reference count;
a block whose count drops to 0 goes to the free queue but keeps its key, and can be taken back by a
later lookup until it is reused (evicted) for new data. The free queue is LRU: blocks without a key
are reused first, then cached blocks in the order they were freed (a finished sequence frees its
blocks last-first, so the tail of a prefix chain goes before its head).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

ROOT_HASH = 0


def block_key(parent: int, tokens: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    """(hash, token tuple) of a full block after the block keyed `parent` (ROOT_HASH for the first)."""
    toks = tuple(tokens)
    return hash((parent, toks)), toks


class NoFreeBlocks(RuntimeError):
    """The pool has no free (or evictable) block left."""


class BlockPool:
    """num_blocks blocks of block_size token slots. allocate() takes a free block (evicting the least
    recently freed cached one), free() drops a reference; lookup()/register() do prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: List[Optional[int]] = [None] * num_blocks
        self.block_meta: List[Optional[Tuple[int, Tuple[int, ...]]]] = [None] * num_blocks   # (parent, tokens)
        self.cached: Dict[int, int] = {}                  # hash -> block id
        self.free_queue: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(num_blocks))
        self.queries = 0                                  # blocks looked up
        self.hits = 0

    # ---- counts ----

    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out now (free, cached or not)."""
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    # ---- allocation ----

    def allocate(self) -> int:
        if not self.free_queue:
            raise NoFreeBlocks("no free KV block")
        b, _ = self.free_queue.popitem(last=False)
        self._evict(b)
        self.ref_count[b] = 1
        return b

    def allocate_many(self, n: int) -> List[int]:
        if n > len(self.free_queue):
            raise NoFreeBlocks(f"{n} KV blocks needed, {len(self.free_queue)} free")
        return [self.allocate() for _ in range(n)]

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None
            self.block_meta[b] = None

    def free(self, b: int) -> None:
        """Drop one reference to block b; at 0 it becomes free (a cached block keeps its key)."""
        rc = self.ref_count[b]
        if rc <= 0:
            raise RuntimeError(f"block {b} freed more often than it was taken")
        self.ref_count[b] = rc - 1
        if rc == 1:
            if self.block_hash[b] is not None:
                self.free_queue[b] = None                 # most recently freed: evicted last
            else:
                self.free_queue[b] = None
                self.free_queue.move_to_end(b, last=False)   # holds nothing reusable: reused first

    def free_table(self, table: List[int]) -> None:
        """Free a sequence's blocks, last first (so a prefix chain's tail is evicted before its head)."""
        for b in reversed(table):
            self.free(b)
        table.clear()

    # ---- prefix caching ----

    def lookup(self, key: Tuple[int, Tuple[int, ...]], parent: int) -> Optional[int]:
        """The cached block holding this key (taking a reference to it), or None. Counts a query."""
        if not self.enable_prefix_caching:
            return None
        self.queries += 1
        h, toks = key
        b = self.cached.get(h)
        if b is None or self.block_meta[b] != (parent, toks):
            return None
        self.hits += 1
        if self.ref_count[b] == 0:
            del self.free_queue[b]
        self.ref_count[b] += 1
        return b

    def probe(self, key: Tuple[int, Tuple[int, ...]], parent: int) -> Optional[int]:
        """The cached block holding this key, or None, without taking it or counting a query (the
        scheduler's can-it-fit check before lookup())."""
        if not self.enable_prefix_caching:
            return None
        b = self.cached.get(key[0])
        return b if b is not None and self.block_meta[b] == (parent, key[1]) else None

    def share(self, b: int) -> None:
        """One more reference to block b, which is in use (a forked sequence sharing its parent's block)."""
        if self.ref_count[b] <= 0:
            raise RuntimeError(f"block {b} is free: share() takes blocks in use")
        self.ref_count[b] += 1

    def register(self, b: int, key: Tuple[int, Tuple[int, ...]], parent: int) -> None:
        """Record that block b (owned, full) holds `key`'s tokens. A key already cached in another
        block keeps that block (b stays private and is simply reused once freed)."""
        if not self.enable_prefix_caching or self.block_hash[b] is not None:
            return
        h, toks = key
        if h in self.cached:
            return
        self.cached[h] = b
        self.block_hash[b] = h
        self.block_meta[b] = (parent, toks)

    def reset_prefix_cache(self) -> None:
        """Forget every cached key of a free block (blocks in use keep theirs)."""
        for b in list(self.free_queue):
            self._evict(b)
