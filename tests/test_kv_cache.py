"""The block manager on its own: allocation, free list, ref counts, prefix hashes, LRU."""

from __future__ import annotations

import pytest
import torch

from workers.kv_cache import BlockManager, KVPools, block_hashes


def test_allocate_and_free_reuse_blocks_and_report_usage() -> None:
    m = BlockManager(4, block_size=2)
    a = m.allocate(3)
    assert a is not None and len(set(a)) == 3 and 0 not in a  # block 0 is the null block
    assert m.usage() == 0.75 and m.num_free() == 1
    assert m.allocate(2) is None and m.num_free() == 1       # all or nothing
    m.free(a)
    assert m.usage() == 0.0 and m.num_free() == 4
    assert sorted(m.allocate(4) or []) == [1, 2, 3, 4]


def test_hashes_chain_over_the_whole_prefix() -> None:
    same = block_hashes([1, 2, 3, 4, 5], 2, [])
    assert len(same) == 2  # the partial last block has no hash
    assert block_hashes([1, 2, 3, 4, 9, 9], 2, [])[:2] == same
    assert block_hashes([7, 2, 3, 4], 2, [])[1] != same[1]  # same tokens, other parent
    known = block_hashes([1, 2], 2, [])
    assert block_hashes([1, 2, 3, 4], 2, known) is known and known == same


def test_prefix_blocks_are_shared_and_ref_counted() -> None:
    m = BlockManager(8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = m.allocate(3)
    assert first is not None
    hashes = block_hashes(tokens, 2, [])
    for block, h in zip(first, hashes):
        m.register(block, h)
    hit = m.match_prefix(block_hashes([1, 2, 3, 4, 6, 7], 2, []))
    assert hit == first[:2]
    m.acquire(hit)
    assert [m.ref_count(b) for b in hit] == [2, 2]
    m.free(first)
    assert [m.ref_count(b) for b in hit] == [1, 1] and m.ref_count(first[2]) == 0
    assert m.usage() == 2 / 8
    m.free(hit)
    # Unreferenced but still cached: found again without recomputing.
    assert m.match_prefix(hashes) == first[:2] and m.num_free() == 8


def test_a_duplicate_block_stays_private() -> None:
    m = BlockManager(4, block_size=2)
    a, b = m.allocate(1), m.allocate(1)
    assert a and b
    h = block_hashes([1, 2], 2, [])[0]
    m.register(a[0], h)
    m.register(b[0], h)
    assert m.is_cached(a[0]) and not m.is_cached(b[0])
    assert m.match_prefix([h]) == a


def test_lru_evicts_the_oldest_unreferenced_cached_block_only_when_needed() -> None:
    m = BlockManager(3, block_size=1)
    hashes = block_hashes([10, 20, 30], 1, [])
    blocks = []
    for h in hashes:  # three one-block requests, finished in order
        [b] = m.allocate(1) or []
        m.register(b, h)
        blocks.append(b)
    for b in blocks:
        m.free([b])
    assert all(m.is_cached(b) for b in blocks) and m.num_free() == 3
    m.acquire(m.match_prefix(hashes[2:3]))     # a hit on the newest takes it off the LRU
    [fresh] = m.allocate(1) or []
    assert fresh == blocks[0] and not m.is_cached(blocks[0])  # the oldest went first
    assert m.match_prefix(hashes[1:2]) == [blocks[1]]
    assert m.match_prefix(hashes[:1]) == []
    assert m.allocate(2) is None  # the referenced one cannot be evicted


def test_free_keeps_a_requests_first_blocks_cached_longest() -> None:
    m = BlockManager(2, block_size=1)
    table = m.allocate(2) or []
    for b, h in zip(table, block_hashes([1, 2], 1, [])):
        m.register(b, h)
    m.free(table)
    [evicted] = m.allocate(1) or []
    assert evicted == table[1]  # the tail block (least shared) is evicted first


def test_disabled_prefix_caching_never_matches() -> None:
    m = BlockManager(2, block_size=1, enable_prefix_caching=False)
    [b] = m.allocate(1) or []
    h = block_hashes([1], 1, [])[0]
    m.register(b, h)
    assert m.match_prefix([h]) == [] and not m.is_cached(b)


def test_pools_have_local_heads_and_a_zero_null_block() -> None:
    pools = KVPools(2, 5, 4, kv_heads=[2, 2], head_dim=8, dtype=torch.bfloat16,
                    device=torch.device("cpu"))
    assert len(pools.layers) == 2
    k, v = pools.layers[0]
    assert k.shape == v.shape == (6, 2, 4, 8) and k.dtype == torch.bfloat16
    assert not k[0].any() and not v[0].any()
    assert KVPools.block_bytes(2, 4, 2, 8, torch.bfloat16) == 2 * 2 * 4 * 2 * 8 * 2


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_blocks_handed_out_for_the_first_time_are_reported_once() -> None:
    """Never-used pool memory may hold NaN bits: the engine zeroes exactly these blocks."""
    blocks = BlockManager(4, 4, enable_prefix_caching=False)
    first = blocks.allocate(2)
    assert blocks.take_fresh() == first and blocks.take_fresh() == []
    blocks.free(first)
    again = blocks.allocate(3)  # two reused, one never used before
    assert blocks.take_fresh() == [b for b in again if b not in first]
