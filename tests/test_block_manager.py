"""The paged latent cache: block hash, block manager invariants and prefix caching, pool data movement."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from k2serve.kvcache import (
    BlockHashError,
    BlockManager,
    BlockManagerError,
    KVCachePool,
    KVCachePoolError,
    NoFreeBlocksError,
    block_hash,
    chain_hashes,
)

# ---- hashing ----------------------------------------------------------------------------------


def test_block_hash_matches_documented_layout() -> None:
    tokens = [1, 163839, 7]
    root = hashlib.blake2b(b"k2root\x00\x00" + struct.pack("<3q", *tokens), digest_size=8).digest()
    assert block_hash(None, tokens) == int.from_bytes(root, "little")
    child = hashlib.blake2b((5).to_bytes(8, "little") + struct.pack("<3q", *tokens), digest_size=8).digest()
    assert block_hash(5, tokens) == int.from_bytes(child, "little")


def test_chain_hashes_cover_full_blocks_and_depend_on_the_prefix() -> None:
    hashes = chain_hashes(list(range(10)), 4)
    assert len(hashes) == 2
    assert hashes[1] == block_hash(hashes[0], [4, 5, 6, 7])
    # Same second block after a different first block: different hash.
    assert chain_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hashes[1]
    assert chain_hashes([1, 2, 3], 4) == []
    with pytest.raises(BlockHashError, match="block_size"):
        chain_hashes([1], 0)
    with pytest.raises(BlockHashError, match="parent"):
        block_hash(-1, [1])


# ---- block manager: directed cases ------------------------------------------------------------


def test_shared_prefix_hits_and_shares_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = bm.allocate(prompt)
    assert a.num_cached_tokens == 0 and len(a.block_table) == 3
    bm.mark_computed(a.block_table, prompt, len(prompt))
    b = bm.allocate(prompt[:9] + [99])
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 20
    bm.check_invariants([a.block_table, b.block_table])


def test_whole_prompt_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    a = bm.allocate(prompt)
    bm.mark_computed(a.block_table, prompt, 8)
    b = bm.allocate(prompt)
    assert b.num_cached_tokens == 4  # the last token must be computed, so block 1 is fresh
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    p1, p2 = [1, 1, 1], [2, 2, 2]
    t1 = bm.allocate(p1).block_table
    bm.mark_computed(t1, p1, 3)
    t2 = bm.allocate(p2).block_table
    bm.mark_computed(t2, p2, 3)
    bm.free(t1)  # t1's cached block freed first: least recently freed
    bm.free(t2)
    assert bm.num_free_blocks == 4
    # Revival: p2's cached block comes back.
    again = bm.allocate(p2)
    assert again.num_cached_tokens == 2 and again.block_table[0] == t2[0]
    bm.free(again.block_table)
    # Needing all 4 blocks forces eviction of both cached blocks; the plain free ones go first.
    big = bm.allocate([7] * 8).block_table
    assert big == [t2[1], t1[1], t1[0], t2[0]]  # t1's cached block: least recently freed
    assert bm.cached_hash(t1[0]) is None
    bm.free(big)
    assert bm.allocate(p1).num_cached_tokens == 0
    bm.check_invariants()


def test_duplicate_computation_keeps_the_first_registration() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    prompt = [4, 4, 4]
    a = bm.allocate(prompt).block_table
    b = bm.allocate(prompt).block_table  # before `a` registered anything: no hit
    bm.mark_computed(a, prompt, 3)
    bm.free(a)  # a's block 0 is now evictable under the prefix hash
    bm.mark_computed(b, prompt, 3)  # same hash, computed again: a's entry stays
    bm.check_invariants([b])
    assert bm.allocate(prompt).block_table[0] == a[0]
    bm.free(b)
    assert bm.cached_hash(b[0]) is None  # the duplicate was never shareable
    bm.check_invariants()


def test_full_pool_raises_and_leaks_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    held = bm.allocate(list(range(10))).block_table  # 3 blocks
    bm.mark_computed(held, list(range(10)), 10)
    assert not bm.can_allocate(list(range(100, 108)))
    with pytest.raises(NoFreeBlocksError) as err:
        bm.allocate(list(range(100, 108)))
    assert (err.value.needed, err.value.available) == (2, 1)
    assert bm.num_free_blocks == 1 and bm.prefix_query_tokens == 10
    # A hit does not count as available room: the shared blocks are referenced already.
    assert bm.can_allocate(list(range(9)) + [5])
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(held, 17)
    assert len(held) == 3
    bm.check_invariants([held])
    bm.free(held)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0


def test_append_slot_grows_only_across_block_boundaries() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate([1, 2, 3]).block_table
    assert bm.append_slot(table, 4) is False and len(table) == 1
    assert bm.can_append(table, 5) and bm.append_slot(table, 5) is True and len(table) == 2
    assert bm.append_slot(table, 13) is True and len(table) == 4
    bm.check_invariants([table])


def test_misuse_raises_typed_errors() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate([1, 2]).block_table
    bm.free(table)
    with pytest.raises(BlockManagerError, match="double free"):
        bm.free(table)
    with pytest.raises(BlockManagerError, match="outside"):
        bm.free([4])
    with pytest.raises(BlockManagerError, match="empty"):
        bm.allocate([])
    bm.check_invariants([])


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    t = bm.allocate([1, 2, 3, 4, 5]).block_table
    bm.mark_computed(t, [1, 2, 3, 4, 5], 5)
    assert bm.allocate([1, 2, 3, 4, 5]).num_cached_tokens == 0
    bm.free(t)
    assert all(bm.cached_hash(b) is None for b in range(8))


# ---- block manager: random operation sequences --------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler and simulates the pool's contents.

    The fake pool records, for each slot, the prefix it was computed from (a real latent at
    position p depends on tokens 0..p); a prefix-cache hit must hand back blocks computed from
    exactly the new prompt's prefix, and no write may touch a shared or registered block.
    """

    NUM_BLOCKS, BLOCK_SIZE = 12, 3

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.content: list[list[tuple[int, ...] | None]] = [
            [None] * self.BLOCK_SIZE for _ in range(self.NUM_BLOCKS)
        ]
        self.live: dict[int, dict] = {}
        self.next_id = 0

    def _write(self, seq: dict, start: int, end: int) -> None:
        for p in range(start, end):
            block = seq["table"][p // self.BLOCK_SIZE]
            assert self.bm.ref_count(block) == 1, "write into a shared block"
            assert self.bm.cached_hash(block) is None, "write into a registered block"
            self.content[block][p % self.BLOCK_SIZE] = tuple(seq["tokens"][: p + 1])

    @rule(target=seqs, tokens=st.lists(st.integers(0, 1), min_size=1, max_size=10))
    def allocate(self, tokens: list[int]) -> int:
        before = self.bm.num_free_blocks
        if not self.bm.can_allocate(tokens):
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(tokens)
            assert self.bm.num_free_blocks == before
            return -1
        alloc = self.bm.allocate(tokens)
        cached = alloc.num_cached_tokens
        assert cached % self.BLOCK_SIZE == 0 and cached < len(tokens)
        assert len(alloc.block_table) == -(-len(tokens) // self.BLOCK_SIZE)
        for p in range(cached):
            assert self.content[alloc.block_table[p // self.BLOCK_SIZE]][p % self.BLOCK_SIZE] == tuple(
                tokens[: p + 1]
            )
        self.next_id += 1
        self.live[self.next_id] = {"tokens": list(tokens), "table": alloc.block_table, "computed": cached}
        return self.next_id

    @rule(sid=seqs, data=st.data())
    def compute(self, sid: int, data: st.DataObject) -> None:
        seq = self.live.get(sid)
        if seq is None:
            return
        end = data.draw(st.integers(seq["computed"], len(seq["tokens"])))
        self._write(seq, seq["computed"], end)
        seq["computed"] = end
        self.bm.mark_computed(seq["table"], seq["tokens"], end)
        self.bm.mark_computed(seq["table"], seq["tokens"], end)  # idempotent

    @rule(sid=seqs, token=st.integers(0, 1))
    def append(self, sid: int, token: int) -> None:
        seq = self.live.get(sid)
        if seq is None or seq["computed"] < len(seq["tokens"]):
            return
        n = len(seq["tokens"]) + 1
        if not self.bm.can_append(seq["table"], n):
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slot(seq["table"], n)
            return
        self.bm.append_slot(seq["table"], n)
        seq["tokens"].append(token)

    @rule(sid=consumes(seqs))
    def free(self, sid: int) -> None:
        seq = self.live.pop(sid, None)
        if seq is not None:
            self.bm.free(seq["table"])

    @invariant()
    def consistent(self) -> None:
        tables = [s["table"] for s in self.live.values()]
        self.bm.check_invariants(tables)
        assert self.bm.num_used_blocks == len({b for t in tables for b in t})

    def teardown(self) -> None:
        for seq in self.live.values():
            self.bm.free(seq["table"])
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == self.NUM_BLOCKS


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- pool -------------------------------------------------------------------------------------


def test_pool_budget_and_k2_block_bytes() -> None:
    per_token = KVCachePool.block_bytes(61, 1, 576, torch.bfloat16)
    assert per_token == 70_272  # K2 latent cache, bf16, 61 layers
    pool = KVCachePool.from_budget(3 * 4 * 2 * 8 * 4 + 5, 3, 4, 8, torch.float32)
    assert pool.num_blocks == 2 and pool.bytes_per_block == 3 * 4 * 8 * 4
    assert pool.kv.shape == (3, 2, 4, 8)
    with pytest.raises(KVCachePoolError, match=r"1000 bytes.*70272 bytes"):
        KVCachePool.from_budget(1000, 61, 1, 576, torch.bfloat16)


def test_pool_write_gather_round_trip() -> None:
    pool = KVCachePool(num_layers=2, num_blocks=6, block_size=4, kv_dim=5, dtype=torch.float32)
    tables = {0: [3, 1], 1: [5, 0, 2]}
    lengths = {0: 7, 1: 10}
    values = {s: torch.randn(n, 5, generator=torch.Generator().manual_seed(s)) for s, n in lengths.items()}
    for s, table in tables.items():
        slots = pool.slot_mapping(table, 0, lengths[s])
        assert slots[:5].tolist() == [table[0] * 4 + i for i in range(4)] + [table[1] * 4]
        pool.write(1, slots[:3], values[s][:3])  # written in two pieces, like prefill then decode
        pool.write(1, pool.slot_mapping(table, 3, lengths[s]), values[s][3:])
    padded = torch.tensor([[3, 1, -1], [5, 0, 2]])
    out = pool.gather(1, padded)
    assert out.shape == (2, 12, 5)
    torch.testing.assert_close(out[0, :7], values[0])
    torch.testing.assert_close(out[1, :10], values[1])
    assert pool.gather(0, padded).abs().sum() == 0  # the other layer is untouched
    with pytest.raises(KVCachePoolError, match="outside"):
        pool.slot_mapping([3], 0, 5)
    with pytest.raises(KVCachePoolError, match="kv_dim"):
        pool.write(0, torch.tensor([0]), torch.zeros(1, 4))


def test_pool_rows_of_consecutive_blocks_are_the_cache_itself() -> None:
    """What a decode worker receives KV into in place: the span of a table of consecutive blocks."""
    pool = KVCachePool(num_layers=2, num_blocks=6, block_size=4, kv_dim=5, dtype=torch.float32)
    assert pool.contiguous_start([2, 3, 4], 10) == 8
    assert pool.contiguous_start([2, 3, 0], 8) == 8  # only the blocks covering the positions count
    assert pool.contiguous_start([2, 4], 5) is None
    with pytest.raises(KVCachePoolError, match="need 3 blocks"):
        pool.contiguous_start([2, 3], 9)
    values = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    pool.rows(1, 8, 10).copy_(values)  # written through the view
    torch.testing.assert_close(pool.gather(1, torch.tensor([[2, 3, 4]]))[0, :10], values)
    assert pool.rows(0, 8, 10).abs().sum() == 0 and pool.rows(1, 8, 10).is_contiguous()
    with pytest.raises(KVCachePoolError, match="outside"):
        pool.rows(0, 20, 5)
