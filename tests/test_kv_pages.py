"""BlockPool (fastlm/serving/kv_pages.py): allocation and freeing, reference counts, prefix-cache lookup
and registration through hash chains, LRU eviction order, collisions, probe/share, bad uses."""
from __future__ import annotations

import pytest

from fastlm.serving.kv_pages import ROOT_HASH, BlockPool, NoFreeBlocks, block_key


def _chain(blocks):
    """[(key, parent)] of a list of token blocks."""
    out, parent = [], ROOT_HASH
    for toks in blocks:
        key = block_key(parent, toks)
        out.append((key, parent))
        parent = key[0]
    return out


def test_allocate_free_counts():
    pool = BlockPool(4, 16)
    assert pool.num_free == 4 and pool.num_used == 0
    got = pool.allocate_many(3)
    assert len(set(got)) == 3 and pool.num_free == 1 and pool.num_used == 3
    with pytest.raises(NoFreeBlocks):
        pool.allocate_many(2)
    assert pool.num_free == 1                      # a failed allocate_many takes nothing
    b = pool.allocate()
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    pool.free(b)
    table = list(got)
    pool.free_table(table)
    assert table == [] and pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(b)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)


def test_register_lookup_shares_and_counts():
    pool = BlockPool(8, 2)
    (k0, p0), (k1, p1) = _chain([(1, 2), (3, 4)])
    a, b = pool.allocate_many(2)
    pool.register(a, k0, p0)
    pool.register(b, k1, p1)
    assert pool.num_cached == 2
    assert pool.lookup(k0, p0) == a                # in use: shared, count 2
    assert pool.ref_count[a] == 2
    assert (pool.queries, pool.hits) == (1, 1)
    assert pool.lookup(block_key(ROOT_HASH, (9, 9)), ROOT_HASH) is None
    assert (pool.queries, pool.hits) == (2, 1)
    pool.free(a)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8 and pool.num_cached == 2   # free but still cached
    assert pool.lookup(k1, p1) == b                # taken back from the free queue
    assert pool.num_free == 7 and pool.ref_count[b] == 1


def test_chain_distinguishes_parents():
    """The same tokens after a different prefix are a different block."""
    pool = BlockPool(4, 2)
    (k0, p0), (k1, p1) = _chain([(1, 2), (3, 4)])
    (j0, q0), (j1, q1) = _chain([(5, 6), (3, 4)])
    b = pool.allocate()
    pool.register(b, k1, p1)
    assert pool.lookup(j1, q1) is None
    assert pool.lookup(k1, p1) == b


def test_collision_is_a_miss():
    """A key whose hash matches a cached block but whose tokens or parent differ is a miss."""
    pool = BlockPool(4, 2)
    b = pool.allocate()
    key = block_key(ROOT_HASH, (1, 2))
    pool.register(b, key, ROOT_HASH)
    fake = (key[0], (7, 7))                        # same hash, other tokens
    assert pool.lookup(fake, ROOT_HASH) is None
    assert pool.lookup(key, 12345) is None          # other parent
    assert pool.probe(fake, ROOT_HASH) is None and pool.probe(key, ROOT_HASH) == b


def test_register_duplicate_keeps_first():
    pool = BlockPool(4, 2)
    key = block_key(ROOT_HASH, (1, 2))
    a, b = pool.allocate_many(2)
    pool.register(a, key, ROOT_HASH)
    pool.register(b, key, ROOT_HASH)               # already cached in a: b stays private
    assert pool.cached[key[0]] == a and pool.block_hash[b] is None
    pool.free(b)
    assert pool.free_queue and next(iter(pool.free_queue)) == b   # keyless: reused first


def test_lru_eviction_order():
    """Free blocks without a key are reused first; cached ones in the order they were freed, a table's
    tail before its head; evicting drops the key."""
    pool = BlockPool(4, 2)
    chain = _chain([(1, 2), (3, 4), (5, 6)])
    table = pool.allocate_many(3)
    for blk, (k, p) in zip(table, chain):
        pool.register(blk, k, p)
    head, mid, tail = table
    spare = pool.allocate()
    pool.free_table(list(table))                   # frees tail, mid, head
    pool.free(spare)                               # no key: first to be reused
    assert pool.allocate() == spare
    assert pool.allocate() == tail
    assert pool.num_cached == 2 and pool.block_hash[tail] is None
    assert pool.lookup(*chain[2]) is None          # evicted
    assert pool.lookup(*chain[0]) == head          # the head survives longest


def test_prefix_caching_disabled():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    key = block_key(ROOT_HASH, (1, 2))
    b = pool.allocate()
    pool.register(b, key, ROOT_HASH)
    assert pool.num_cached == 0
    assert pool.lookup(key, ROOT_HASH) is None and pool.probe(key, ROOT_HASH) is None
    assert pool.queries == 0


def test_probe_takes_nothing_and_share():
    pool = BlockPool(3, 2)
    key = block_key(ROOT_HASH, (1, 2))
    b = pool.allocate()
    pool.register(b, key, ROOT_HASH)
    pool.free(b)
    assert pool.probe(key, ROOT_HASH) == b
    assert pool.num_free == 3 and pool.queries == 0
    with pytest.raises(RuntimeError, match="is free"):
        pool.share(b)
    assert pool.lookup(key, ROOT_HASH) == b
    pool.share(b)
    assert pool.ref_count[b] == 2
    pool.free(b)
    pool.free(b)
    assert pool.num_free == 3


def test_reset_prefix_cache():
    pool = BlockPool(4, 2)
    chain = _chain([(1, 2), (3, 4)])
    a, b = pool.allocate_many(2)
    pool.register(a, *chain[0])
    pool.register(b, *chain[1])
    pool.free(b)
    pool.reset_prefix_cache()                      # b was free: forgotten; a in use: kept
    assert pool.lookup(*chain[1]) is None
    assert pool.lookup(*chain[0]) == a
