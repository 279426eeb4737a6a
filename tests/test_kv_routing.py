"""KV-aware routing: the block manager's stored / removed events, the router's KV index built from them
(snapshots, worker removal, the memory cap), the registry that feeds it, and the pure decision logic
(predicted TTFT = queued prefill tokens / rate + uncached prompt tokens / rate)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import GenerateRequest
from k2serve.engine.sampling_params import SamplingParams
from k2serve.kvcache.block_manager import BlockManager, KVEventLog, NoFreeBlocksError, tier_name
from k2serve.kvcache.hashing import chain_hashes
from k2serve.proto import registry_pb2
from k2serve.router.kv_index import KVIndex
from k2serve.router.policy import (
    DEFAULT_PREFILL_TOKENS_PER_S,
    IN_FLIGHT,
    KVAware,
    LeastLoaded,
    NoWorkerError,
    PromptBlocks,
    RoundRobin,
    make_policy,
    predicted_ttft_s,
    reload_seconds,
)
from k2serve.router.registry import RegistryServicer, Worker, WorkerTable
from k2serve.worker.runtime import KVEventPublisher

BS = 4


# ---- events from a real BlockManager -----------------------------------------------------------------
def test_block_manager_events_track_its_prefix_cache() -> None:
    """Random allocate / compute / free traffic on a small pool (evictions included): after every
    operation, the snapshot plus the events replayed in order equal what the manager can serve."""
    rng = random.Random(7)  # noqa: S311 (test traffic, not secrets)
    bm = BlockManager(num_blocks=24, block_size=BS)
    bm.events = KVEventLog()
    index = KVIndex()
    index.replace("w", bm.stored_hashes())  # empty: the snapshot a registering worker sends
    live: list[tuple[list[int], list[int]]] = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    removed_seen = 0
    for _ in range(300):
        if live and (rng.random() < 0.45 or bm.num_free_blocks < 8):
            table, _ = live.pop(rng.randrange(len(live)))
            bm.free(table)
        else:
            tokens = rng.choice(prefixes)[: rng.randrange(1, 13)] + [rng.randrange(50) for _ in range(6)]
            try:
                alloc = bm.allocate(tokens)
            except NoFreeBlocksError:
                continue
            bm.mark_computed(alloc.block_table, tokens, len(tokens))
            live.append((alloc.block_table, tokens))
        events, overflowed = bm.events.drain()
        removed_seen += sum(r for _, r, _ in events)
        index.apply("w", [h for h, _, _ in events], [r for _, r, _ in events], [t for _, _, t in events])
        assert not overflowed
        assert all(index.holds("w", h) for h in bm.stored_hashes())
        assert index.blocks_of("w") == len(bm.stored_hashes()) == len(index)
        bm.check_invariants([t for t, _ in live])
    assert removed_seen > 0  # evictions happened and were reported


def test_duplicate_block_is_not_reported_and_unused_log_costs_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    a, b = bm.allocate(tokens), bm.allocate(tokens)  # computed at the same time: b's blocks stay private
    bm.events = KVEventLog()
    bm.mark_computed(a.block_table, tokens, 9)
    bm.mark_computed(b.block_table, tokens, 9)
    events, _ = bm.events.drain()
    assert events == [(h, False, "device") for h in chain_hashes(tokens, BS)]  # once each, in prefix order
    bm.events = None  # the default: no log, the manager works as before
    bm.free(a.block_table)
    bm.free(b.block_table)
    bm.check_invariants([])


def test_event_log_overflow_asks_for_a_snapshot() -> None:
    log = KVEventLog(max_events=3)
    for h in range(5):
        log.record(h, False)
    assert log.drain() == ([], True)
    log.record(9, True)
    assert log.drain() == ([(9, True, "device")], False)
    with pytest.raises(ValueError, match="max_events"):
        KVEventLog(0)


# ---- the index ---------------------------------------------------------------------------------------
def test_index_add_remove_drop_and_prefix_match() -> None:
    idx = KVIndex()
    idx.replace("a", [1, 2, 3])
    idx.apply("b", [1, 2, 7, 3], [False, False, False, False])
    assert idx.cached_blocks([1, 2, 3, 4], ["a", "b", "c"]) == {"a": 3, "b": 3, "c": 0}
    idx.apply("b", [2], [True])  # b lost block 2: its block 3 no longer counts (a prefix has no gap)
    assert idx.cached_blocks([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 1}
    assert idx.cached_blocks([9, 1], ["a", "b"]) == {"a": 0, "b": 0}
    idx.drop("a")
    assert idx.cached_blocks([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 1}
    assert idx.blocks_of("a") == 0 and idx.blocks_of("b") == 3 and len(idx) == 3  # 1, 7, 3
    idx.replace("b", [5])  # a new snapshot replaces everything it had
    assert len(idx) == 1 and idx.holds("b", 5) and not idx.holds("b", 1)
    idx.apply("b", [5, 5], [True, False])  # order matters: removed, then stored again
    assert idx.holds("b", 5)
    with pytest.raises(ValueError, match="2 hashes but 1 removed"):
        idx.apply("b", [1, 2], [False])


def test_index_cap_forgets_least_recently_stored() -> None:
    idx = KVIndex(max_blocks=3)
    idx.apply("a", [1, 2, 3], [False] * 3)
    idx.apply("b", [1], [False])  # 1 stored again: now the most recent
    idx.apply("a", [4], [False])  # over the cap: 2 goes
    assert len(idx) == 3 and idx.forgotten == 1
    assert not idx.holds("a", 2) and idx.holds("a", 1) and idx.holds("b", 1)
    assert idx.blocks_of("a") == 3  # 1, 3, 4
    with pytest.raises(ValueError, match="kv-index-max-blocks"):
        KVIndex(0)


# ---- the registry feeds the index --------------------------------------------------------------------
class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def _info(worker_id: str, hashes: list[int] | None, block_size: int = BS) -> registry_pb2.WorkerInfo:
    return registry_pb2.WorkerInfo(
        worker_id=worker_id,
        role=registry_pb2.WORKER_ROLE_PREFILL,
        grpc_address=f"127.0.0.1:{10 + len(worker_id)}{worker_id[-1]}",
        block_size=block_size,
        ready=True,
        publishes_kv_events=hashes is not None,
        kv_block_hashes=hashes or [],
    )


def _beat(worker_id: str, hashes: list[int], removed: list[bool]) -> registry_pb2.HeartbeatRequest:
    return registry_pb2.HeartbeatRequest(
        worker_id=worker_id,
        ready=True,
        kv_events=registry_pb2.KVEvents(block_hashes=hashes, removed=removed),
    )


def test_registry_snapshot_events_removal_and_router_restart() -> None:
    async def run() -> None:
        ctx: Any = _Context()
        table = WorkerTable(5.0, grpc.aio.insecure_channel)
        reg = RegistryServicer(table)
        await reg.Register(_info("p0", [11, 12]), ctx)
        await reg.Heartbeat(_beat("p0", [13, 11], [False, True]), ctx)
        assert [h for h in (11, 12, 13) if table.kv_index.holds("p0", h)] == [12, 13]
        with pytest.raises(_Aborted, match="2 block_hashes but 1 removed"):
            await reg.Heartbeat(_beat("p0", [1, 2], [False]), ctx)
        unknown = await reg.Heartbeat(_beat("ghost", [1], [False]), ctx)
        assert not unknown.known and table.kv_index.blocks_of("ghost") == 0  # it must register first
        await reg.Register(_info("p0", [12, 13, 14]), ctx)  # re-registration: the snapshot is the truth
        assert table.kv_index.blocks_of("p0") == 3
        table.remove("p0", "test")
        assert table.kv_index.blocks_of("p0") == 0 and len(table.kv_index) == 0

        restarted = WorkerTable(5.0, grpc.aio.insecure_channel)  # a new router: rebuilt from snapshots
        reg2 = RegistryServicer(restarted)
        await reg2.Register(_info("p0", [12, 13]), ctx)
        await reg2.Register(_info("p1", [12]), ctx)
        assert restarted.kv_index.cached_blocks([12, 13], ["p0", "p1"]) == {"p0": 2, "p1": 1}
        await reg2.Register(_info("p1", None), ctx)  # no longer publishing: nothing is assumed of it
        assert restarted.kv_index.blocks_of("p1") == 0

    asyncio.run(run())


# ---- the decision ------------------------------------------------------------------------------------
def _worker(
    worker_id: str,
    queued: int = 0,
    rate: float = 0.0,
    events: bool = True,
    block_size: int = BS,
    role: int = registry_pb2.WORKER_ROLE_PREFILL,
) -> Worker:
    info = registry_pb2.WorkerInfo(
        worker_id=worker_id, role=role, block_size=block_size, publishes_kv_events=events
    )
    load = registry_pb2.WorkerLoad(queued_prefill_tokens=queued, prefill_tokens_per_s=rate, free_blocks=100)
    return Worker(worker_id, "prefill", "-", info, channel=None, load=load, ready=True)  # type: ignore[arg-type]


def _cached_on(index: KVIndex, worker_id: str, prompt: list[int], blocks: int) -> None:
    index.apply(worker_id, chain_hashes(prompt, BS)[:blocks], [False] * blocks)


def test_argmin_trades_queue_against_cache() -> None:
    prompt = list(range(100, 141))  # 41 tokens: at most 10 blocks (40 tokens) can come from a cache
    idx = KVIndex()
    _cached_on(idx, "a", prompt, 10)
    policy = KVAware(idx)
    blocks = PromptBlocks(prompt)
    a, b = _worker("a", queued=30, rate=1000.0), _worker("b", queued=0, rate=1000.0)
    # a: (30 + 41 - 40) / 1000 = 31 ms; b: 41 ms -> the cache wins
    c = policy.choose([a, b], "prefill", prompt=blocks)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("a", "prefix_hit", 40)
    assert c.predicted_ttft_s == pytest.approx(0.031)
    a.load.queued_prefill_tokens = 60  # a: 61 ms, b: 41 ms -> the queue wins
    c = policy.choose([a, b], "prefill", prompt=blocks)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("b", "load", 0)
    a.prefill_tokens = 0
    a.load.queued_prefill_tokens = 0
    b.load.prefill_tokens_per_s = 4000.0  # b: 41 / 4000 = 10.25 ms; a: 1 / 1000 = 1 ms
    assert policy.choose([a, b], "prefill", prompt=blocks).worker.worker_id == "a"
    a.prefill_tokens = 20  # the router's own in-flight tokens count when above the reported queue: 21 ms
    assert policy.choose([a, b], "prefill", prompt=blocks).worker.worker_id == "b"
    assert predicted_ttft_s(20, 41, 40, 1000.0) == pytest.approx(0.021)


def test_answered_prefill_leaves_a_stale_reported_queue() -> None:
    """A heartbeat taken while a's prefill ran reports it queued; once that prefill is answered the next
    turn (which a holds a block of) must not see a's queue as still full and go to b (the CI flake of
    test_kv_cluster). A heartbeat whose snapshot predates the answer keeps the correction; one that
    counts the prompt drops it."""
    prompt = list(range(100, 126))  # 26 tokens, a holds the first 2 blocks (8 tokens)
    idx = KVIndex()
    _cached_on(idx, "a", prompt, 2)
    policy = KVAware(idx)
    a, b = _worker("a", queued=9, rate=1000.0), _worker("b", queued=0, rate=1000.0)
    table = WorkerTable(10.0, lambda address: None)  # type: ignore[arg-type,return-value]
    table.workers = {"a": a, "b": b}
    blocks = PromptBlocks(prompt)
    # the stale report: a (9 + 26 - 8) = 27 ms, b 26 ms
    assert policy.choose([a, b], "prefill", prompt=blocks).worker.worker_id == "b"
    a.prefill_answered(1, 9)  # the answer: the worker had computed 1 prompt by then
    assert a.queued_prefill_tokens() == 0
    c = policy.choose([a, b], "prefill", prompt=blocks)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("a", "prefix_hit", 8)
    # a heartbeat built before the answer (its snapshot counted 0 prompts, 9 queued) arrives after it
    assert table.heartbeat("a", registry_pb2.WorkerLoad(queued_prefill_tokens=9, prefill_tokens_per_s=1000.0))
    assert a.queued_prefill_tokens() == 0 and a.unreported_prefills == [(1, 9)]
    # the next one counts the prompt: the correction goes, and a's new queue is its own
    load = registry_pb2.WorkerLoad(queued_prefill_tokens=5, prefill_tokens_per_s=1000.0, prompts_computed=1)
    assert table.heartbeat("a", load)
    assert a.unreported_prefills == [] and a.queued_prefill_tokens() == 5
    a.prefill_answered(1, 7)  # an answer the last report already counted changes nothing
    assert a.queued_prefill_tokens() == 5
    a.prefill_tokens = 12  # the router's own in-flight tokens still count when above the report
    assert a.queued_prefill_tokens() == 12


def test_ties_unmeasured_rates_and_workers_without_events() -> None:
    prompt = list(range(9))
    idx = KVIndex()
    policy = KVAware(idx, cache_balance=False)  # by predicted TTFT alone (`kv-ttft`)
    a, b = _worker("a"), _worker("b")
    c = policy.choose([b, a], "prefill", prompt=PromptBlocks(prompt))
    assert (c.worker.worker_id, c.reason) == ("a", "load")  # a tie: by load, then id
    assert c.predicted_ttft_s == pytest.approx(9 / DEFAULT_PREFILL_TOKENS_PER_S)
    a.routed = 1  # idle workers take turns
    assert policy.choose([a, b], "prefill", prompt=PromptBlocks(prompt)).worker.worker_id == "b"
    # a measured worker lends its speed to an unmeasured one: equal speed, equal queue -> the cache
    a.load.prefill_tokens_per_s = 500.0
    _cached_on(idx, "b", prompt, 2)
    c = policy.choose([a, b], "prefill", prompt=PromptBlocks(prompt))
    assert (c.worker.worker_id, c.cached_tokens, c.predicted_ttft_s) == ("b", 8, pytest.approx(1 / 500))
    # the same hashes on a worker that does not publish events (or another block size) count for nothing
    _cached_on(idx, "c", prompt, 2)
    assert (
        KVAware(idx)
        .choose([_worker("c", events=False)], "prefill", prompt=PromptBlocks(prompt))
        .cached_tokens
        == 0
    )
    only = policy.choose([_worker("d", block_size=8), a], "prefill", frozenset({"a"}), PromptBlocks(prompt))
    assert (only.worker.worker_id, only.reason, only.cached_tokens) == ("d", "only_worker", 0)


def test_a_prefilled_prompt_is_indexed_at_once() -> None:
    """After a prefill the router places the prompt's cacheable blocks on its worker without waiting for
    the heartbeat: the next turn of a fast loop already goes there."""
    idx = KVIndex()
    policy = KVAware(idx)
    a, b = _worker("a"), _worker("b")
    turn1 = list(range(1, 14))
    policy.prefilled(b, PromptBlocks(turn1))
    policy.prefilled(_worker("c", events=False), PromptBlocks(turn1))  # no events: nothing assumed
    assert idx.blocks_of("b") == 3 and idx.blocks_of("c") == 0  # (13 - 1) // 4 blocks
    c = policy.choose([a, b], "prefill", prompt=PromptBlocks(turn1 + [20, 21, 22]))
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("b", "prefix_hit", 12)
    LeastLoaded().prefilled(a, PromptBlocks(turn1))  # other policies keep no index
    assert idx.blocks_of("a") == 0


def test_no_worker_and_other_policies() -> None:
    idx = KVIndex()
    a, b = _worker("a"), _worker("b")
    for policy in (KVAware(idx), LeastLoaded(), RoundRobin()):
        with pytest.raises(NoWorkerError, match="no prefill worker"):
            policy.choose([], "prefill", prompt=PromptBlocks([1, 2]))
        with pytest.raises(NoWorkerError):
            policy.choose([a, b], "prefill", frozenset({"a", "b"}), PromptBlocks([1, 2]))
    rr = RoundRobin()
    picks = [rr.choose([b, a], "prefill").worker.worker_id for _ in range(4)]
    assert picks == ["a", "b", "a", "b"] and rr.choose([a, b], "prefill").reason == "round_robin"
    decode = KVAware(idx).choose([a, b], "decode")  # decode workers: least loaded
    assert (decode.worker.worker_id, decode.reason) == ("a", "load")
    assert isinstance(make_policy("least-loaded", idx), LeastLoaded)
    kv_ttft = make_policy("kv-ttft", idx)
    assert isinstance(kv_ttft, KVAware) and not kv_ttft.cache_balance
    with pytest.raises(ValueError, match="kv, kv-ttft, kv-settled, least-loaded, round-robin"):
        make_policy("random", idx)


def _full_worker(worker_id: str, total_blocks: int, queued: int = 0) -> Worker:
    w = _worker(worker_id, queued=queued, rate=1000.0)
    w.load.total_blocks = total_blocks
    return w


def test_index_eviction_cost_is_the_recency_of_what_would_be_evicted() -> None:
    """KVIndex.eviction_cost: the store sequence number of the newest block among those a worker's LRU
    would evict for `blocks` new ones; 0 while it has room. Re-storing a block (a hit, prefilled) makes it
    recent again; removed and dropped blocks leave the count."""
    idx = KVIndex()
    idx.apply("a", [1, 2, 3], [False] * 3)  # seq 1, 2, 3
    idx.apply("b", [4, 5, 6], [False] * 3)  # seq 4, 5, 6
    assert idx.clock == 6
    assert idx.eviction_cost("a", 1, capacity=4) == 0  # one free block
    assert idx.eviction_cost("a", 2, capacity=4) == 1  # evicts block 1 (seq 1)
    assert idx.eviction_cost("a", 3, capacity=4) == 2
    assert idx.eviction_cost("b", 2, capacity=4) == 4
    assert idx.eviction_cost("a", 10, capacity=4) == 3  # everything goes: the newest is seq 3
    idx.apply("a", [1], [False])  # block 1 used again: seq 7, now a's most recent
    assert idx.eviction_cost("a", 2, capacity=4) == 2
    idx.apply("a", [2], [True])
    assert idx.eviction_cost("a", 2, capacity=4) == 0  # two free blocks now
    assert idx.eviction_cost("nobody", 5, capacity=4) == 0
    idx.drop("b")
    assert idx.eviction_cost("b", 5, capacity=1) == 0 and idx.blocks_of("b") == 0


def test_offloaded_blocks_take_no_device_room_in_eviction_cost() -> None:
    """A block offloaded to the host (a stored event with tier "host") leaves the device LRU order: it
    frees device room and is never the block evicted next; reloaded to the device it is the most recent;
    removed from its tier it leaves the index."""
    idx = KVIndex()
    idx.apply("a", [1, 2, 3], [False] * 3)  # device, seq 1, 2, 3
    assert idx.eviction_cost("a", 2, capacity=3) == 2  # evicts 1 and 2
    idx.apply("a", [1], [False], ["host"])  # block 1 offloaded
    assert idx.tier_of("a", 1) == "host" and idx.blocks_of("a") == 3
    assert idx.eviction_cost("a", 1, capacity=3) == 0  # room for one now
    assert idx.eviction_cost("a", 2, capacity=3) == 2  # evicts block 2 (seq 2), not the offloaded one
    assert idx.eviction_cost("a", 5, capacity=3) == 3  # every device block: the newest is seq 3
    idx.apply("a", [1], [False], ["device"])  # reloaded: seq 4, the most recent
    assert idx.eviction_cost("a", 1, capacity=3) == 2 and idx.eviction_cost("a", 3, capacity=3) == 4
    idx.apply("a", [2], [False], ["disk"])
    idx.apply("a", [2], [True])  # left its last tier
    assert idx.blocks_of("a") == 2 and idx.eviction_cost("a", 2, capacity=3) == 3


def test_new_conversation_goes_where_it_evicts_the_coldest_blocks() -> None:
    """Cache balance: a prompt no worker holds more than a block more of goes to the worker whose LRU
    blocks are oldest, not the least loaded one, while its predicted TTFT stays within the slack; a
    continuing conversation still goes to its holder."""
    idx = KVIndex()
    system = [7, 7, 7, 7]  # a shared first block, cached everywhere
    hot = system + list(range(100, 112))  # 4 blocks: a live conversation on a
    cold = system + list(range(200, 212))
    idx.apply("b", chain_hashes(cold, BS), [False] * 4)  # b's cache: an old conversation
    idx.apply("a", chain_hashes(hot, BS), [False] * 4)  # a's: used just now
    a, b = _full_worker("a", 4), _full_worker("b", 4)
    b.routed = 5  # b has taken more requests: least-loaded order prefers a
    new = PromptBlocks(system + list(range(300, 313)))  # 17 tokens, 4 blocks cacheable; 1 cached anywhere
    policy = KVAware(idx)
    c = policy.choose([a, b], "prefill", prompt=new)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("b", "cache_balance", 4)
    assert c.predicted_ttft_s == pytest.approx(13 / 1000)
    # by TTFT alone (kv-ttft) the tie goes to the less loaded a, evicting the live conversation
    assert KVAware(idx, cache_balance=False).choose([a, b], "prefill", prompt=new).worker.worker_id == "a"
    # b's queue puts it past the slack (its TTFT > best + the prompt's own 13 ms): the TTFT wins
    b.load.queued_prefill_tokens = 14
    c = policy.choose([a, b], "prefill", prompt=new)
    assert (c.worker.worker_id, c.reason) == ("a", "cache_balance")
    b.load.queued_prefill_tokens = 13  # exactly within the slack: b again
    assert policy.choose([a, b], "prefill", prompt=new).worker.worker_id == "b"
    # the live conversation's next turn stays with its holder however hot its cache
    c = policy.choose([a, b], "prefill", prompt=PromptBlocks(hot + [1, 2, 3]))
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("a", "prefix_hit", 16)
    # a short conversation's own first block (more than 10% of its prompt) is a prefix hit, not balanced
    short = [5, 6, 7, 8, 9]
    b.load.queued_prefill_tokens = 0
    idx.apply("b", chain_hashes(short, BS), [False])
    c = policy.choose([a, b], "prefill", prompt=PromptBlocks(short + [10, 11, 12, 13]))
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("b", "prefix_hit", 4)
    # with room in both caches: the worker holding fewer blocks
    e, f = _full_worker("e", 100), _full_worker("f", 100)
    idx.apply("e", chain_hashes(system, BS), [False])
    idx.apply("f", chain_hashes(cold, BS), [False] * 4)
    c = policy.choose([f, e], "prefill", prompt=new)
    assert (c.worker.worker_id, c.reason) == ("e", "cache_balance")


# ---- the shared store in the index and the decision -----------------------------------------------
def test_index_places_store_blocks_for_every_worker_of_the_store() -> None:
    """A block put into a shared store (by any of its workers) counts, as tier "shared", for every worker
    that reaches that store, after the tiers a worker holds it in itself; not for other stores' workers
    or workers without one. Misses forget entries, the store's capacity bounds them (LRU of puts), and
    they go with the store's last worker."""
    idx = KVIndex(max_blocks=100)
    h = [11, 12, 13, 14]
    idx.join_store("a", "s", 2)
    idx.join_store("b", "s", 3, [h[1]])  # b's snapshot: it put block 1 before
    idx.join_store("c", "t", 5)
    idx.join_store("d", "", 5)  # no store: nothing
    assert (idx.store_of("a"), idx.store_of("c"), idx.store_of("d")) == ("s", "t", None)
    assert idx.store_capacity("s") == 5 and idx.store_blocks("s") == 1
    idx.apply("a", [h[0], h[3]], [False, False])  # a holds blocks 0 and 3 on its device
    idx.store_put("s", [h[0], h[2]])  # puts of blocks 0 and 2 (whoever made them)
    assert idx.cached_tiers(h, ["a", "b", "c", "d"]) == {
        "a": ["device", "shared", "shared", "device"],  # its own tier first; the store fills the gaps
        "b": ["shared", "shared", "shared"],  # block 3 is nowhere it can fetch
        "c": [],  # another store
        "d": [],
    }
    assert idx.cached_blocks(h, ["a", "b"]) == {"a": 4, "b": 3}
    idx.store_missing("s", [h[1]])  # a lookup found block 1 gone from the store
    assert idx.cached_tiers(h, ["a", "b"]) == {"a": ["device"], "b": ["shared"]}
    idx.store_missing("t", [h[0]])  # another store's miss leaves this one alone
    assert idx.in_store("s", h[0]) and not idx.in_store("t", h[0])
    idx.store_put("s", [1, 2, 3, 4, 5, h[0]])  # capacity 5: the least recently put go
    assert idx.store_blocks("s") == 5 and not idx.in_store("s", h[2]) and idx.in_store("s", h[0])
    idx.drop("b")  # capacity 2 now
    assert idx.store_capacity("s") == 2 and idx.store_blocks("s") == 2
    assert idx.in_store("s", 5) and idx.in_store("s", h[0])
    idx.drop("a")  # the store's last worker: its entries go, and puts to it are ignored
    idx.store_put("s", [7])
    assert idx.store_blocks("s") == 0 and not idx.in_store("s", 7)
    idx.join_store("e", "u", 0)  # no capacity given: bounded by the index's max_blocks
    assert idx.store_capacity("u") == 100


def test_registry_feeds_the_store_index_and_a_restarted_router_relearns_it() -> None:
    async def run() -> None:
        ctx: Any = _Context()
        table = WorkerTable(5.0, grpc.aio.insecure_channel)
        reg = RegistryServicer(table)
        p0, p1 = _info("p0", []), _info("p1", [])
        for info in (p0, p1):
            info.kv_store, info.kv_store_capacity_blocks = "mooncake://m/ns", 8
        p0.kv_store_hashes.extend([21, 22])
        await reg.Register(p0, ctx)
        await reg.Register(p1, ctx)
        idx = table.kv_index
        assert idx.cached_blocks([21, 22, 23], ["p0", "p1"]) == {"p0": 2, "p1": 2}
        beat = _beat("p1", [], [])
        beat.kv_events.store_puts.extend([23])
        beat.kv_events.store_misses.extend([21])
        await reg.Heartbeat(beat, ctx)
        assert idx.cached_blocks([22, 23], ["p0", "p1"]) == {"p0": 2, "p1": 2}
        assert idx.cached_blocks([21, 22], ["p0", "p1"]) == {"p0": 0, "p1": 0}  # 21 is gone
        assert idx.store_capacity("mooncake://m/ns") == 16

        restarted = WorkerTable(5.0, grpc.aio.insecure_channel)
        reg2 = RegistryServicer(restarted)
        await reg2.Register(p0, ctx)  # its snapshot names what it put
        await reg2.Register(_info("p2", []), ctx)  # no store
        assert restarted.kv_index.cached_blocks([21, 22], ["p0", "p2"]) == {"p0": 2, "p2": 0}

    asyncio.run(run())


def _store_worker(worker_id: str, queued: int = 0, store: str = "s") -> Worker:
    w = _full_worker(worker_id, 100, queued)
    w.info.kv_store = store
    return w


def test_store_blocks_count_as_fetched_for_every_worker_of_the_store() -> None:
    """KVAware: blocks in the shared store are cached for every worker of the store at the cost of a
    fetch (the worker's measured store reload speed, else reload_cost["shared"] of recomputing); a busy
    holder's conversation goes to an idle worker that fetches it; an idle holder keeps it; a prompt only
    the store holds is balanced like a new conversation (no worker holds more of it itself)."""
    prompt = list(range(100, 141))  # 41 tokens: 10 cacheable blocks
    hashes = chain_hashes(prompt[:40], BS)
    idx = KVIndex()
    policy = KVAware(idx)
    a, b, c = _store_worker("a", queued=60), _store_worker("b"), _store_worker("c", store="")
    for w in (a, b):
        idx.join_store(w.worker_id, "s", 100)
    idx.apply("a", hashes, [False] * 10)  # a computed it (device) and put it
    idx.store_put("s", hashes)
    # a: (60 + 1) / 1000 = 61 ms; b: 1 ms + fetching 40 tokens at 0.3 of 1000 tokens/s = 13 ms; c: 41 ms
    ch = policy.choose([a, b, c], "prefill", prompt=PromptBlocks(prompt))
    assert (ch.worker.worker_id, ch.reason, ch.cached_tokens) == ("b", "prefix_hit", 40)
    assert ch.predicted_ttft_s == pytest.approx(0.001 + 40 * 0.3 / 1000)
    b.load.reload_tokens_per_s["shared"] = 4000.0  # its measured store reload speed: 10 ms for 40 tokens
    assert policy.choose([a, b, c], "prefill", prompt=PromptBlocks(prompt)).predicted_ttft_s == pytest.approx(
        0.011
    )
    a.load.queued_prefill_tokens = 0  # an idle holder: its device copy beats fetching (not balanced away)
    ch = policy.choose([a, b, c], "prefill", prompt=PromptBlocks(prompt))
    assert (ch.worker.worker_id, ch.reason, ch.predicted_ttft_s) == ("a", "prefix_hit", pytest.approx(0.001))
    # without the store entries b would be a miss: (0 + 41) / 1000
    idx.store_missing("s", hashes[:1])
    ch = policy.choose([b, c], "prefill", prompt=PromptBlocks(prompt))
    assert (ch.cached_tokens, ch.predicted_ttft_s) == (0, pytest.approx(0.041))
    # a prompt only the store holds: no worker holds more of it itself, so it is balanced (to the
    # emptier b, which fetches it), whatever the store holds
    other = list(range(300, 341))
    idx.store_put("s", chain_hashes(other[:40], BS))
    ch = policy.choose([a, b], "prefill", prompt=PromptBlocks(other))
    assert (ch.worker.worker_id, ch.reason, ch.cached_tokens) == ("b", "cache_balance", 40)


class _Clock:
    """A settable clock for KVAware (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_turn_waits_for_its_previous_turn_in_flight() -> None:
    """The next turn of a conversation arrives while its previous turn's prefill is still running on a:
    nothing is indexed yet, but the previous prompt's blocks are IN_FLIGHT there (cached once that
    prefill is done, which a's queue already holds). a's queue counts that prefill as progressing since
    it was sent, so the turn goes to a once waiting there beats recomputing the prefix elsewhere; the
    settled-only policy (`kv-settled`) sees a new conversation and balances it away."""
    turn1 = list(range(100, 141))  # 41 tokens: 10 cacheable blocks
    turn2 = turn1 + list(range(500, 520))  # 61 tokens, its first 10 blocks are turn1's
    clock = _Clock()
    idx = KVIndex()
    policy = KVAware(idx, clock=clock)
    a, b = _full_worker("a", 67), _full_worker("b", 67)
    policy.dispatched(a, PromptBlocks(turn1))
    a.prefill_tokens, a.in_flight = 41, 1  # the backend counts the call (and its uncached tokens) at once
    # just sent: a (41 + 61 - 40) = 62 ms, b 61 ms: recomputing on the idle b is as fast
    ch = policy.choose([a, b], "prefill", prompt=PromptBlocks(turn2))
    assert ch.worker.worker_id == "b"
    assert [(c.worker_id, c.local, c.shared, c.in_flight, c.queued_tokens) for c in ch.candidates] == [
        ("a", 0, 0, 40, 41),
        ("b", 0, 0, 0, 0),
    ]
    first = ch.candidates[0]
    assert (first.reported_queue, first.router_queue, first.tokens_per_s) == (0, 41, 1000.0)
    clock.t += 0.010  # 10 ms later a has done 10 of the 41 tokens: (31 + 21) = 52 ms against 61 ms
    ch = policy.choose([a, b], "prefill", prompt=PromptBlocks(turn2))
    assert (ch.worker.worker_id, ch.reason, ch.cached_tokens) == ("a", "prefix_in_flight", 40)
    assert ch.predicted_ttft_s == pytest.approx(0.052)
    assert ch.candidates[0].queued_tokens == 31
    clock.t += 1.0  # the progress is capped at the in-flight tokens of the prompt (40): 1 + 21 ms
    assert policy.choose([a, b], "prefill", prompt=PromptBlocks(turn2)).predicted_ttft_s == pytest.approx(
        0.022
    )
    # kv-settled does not count it: no worker holds the prefix, so a new conversation (cache balance)
    settled = KVAware(idx, count_in_flight=False, clock=clock)
    settled.dispatched(a, PromptBlocks(turn1))
    ch = settled.choose([a, b], "prefill", prompt=PromptBlocks(turn2))
    assert (ch.worker.worker_id, ch.reason, ch.cached_tokens) == ("b", "cache_balance", 0)
    assert ch.candidates[0].in_flight == 40  # seen (for the routing log), not counted
    # a busy b: waiting on a wins even before any progress (62 ms against 30 + 61 ms)
    clock.t -= 1.010
    b.load.queued_prefill_tokens = 30
    assert policy.choose([a, b], "prefill", prompt=PromptBlocks(turn2)).worker.worker_id == "a"
    # answered: the index has the blocks (device), nothing is in flight any more
    policy.prefilled(a, PromptBlocks(turn1))
    policy.settled(a, PromptBlocks(turn1))
    a.prefill_tokens = a.in_flight = 0
    b.load.queued_prefill_tokens = 0
    ch = policy.choose([a, b], "prefill", prompt=PromptBlocks(turn2))
    assert (ch.worker.worker_id, ch.reason, ch.cached_tokens) == ("a", "prefix_hit", 40)
    assert ch.candidates[0].local == 40 and ch.candidates[0].in_flight == 0
    assert policy._in_flight == {}


def test_in_flight_blocks_count_per_prefill_and_extend_the_indexed_prefix() -> None:
    """Two prefills in flight of the same prompt keep its blocks IN_FLIGHT until both settle; in-flight
    blocks count only after the blocks the index places (a prefix has no gap) and cost no reload; a
    worker without KV events is not tracked; a failed prefill (settled, never prefilled) leaves nothing."""
    prompt = list(range(100, 141))
    hashes = chain_hashes(prompt[:40], BS)
    idx = KVIndex()
    policy = KVAware(idx, clock=_Clock())
    a, b = _full_worker("a", 67), _full_worker("b", 67)
    idx.apply("a", hashes[:4], [False] * 4)  # a holds 4 blocks on the device
    idx.apply("a", hashes[2:4], [False] * 2, ["host", "host"])  # ... 2 of them offloaded to its host tier
    policy.dispatched(a, PromptBlocks(prompt))
    policy.dispatched(a, PromptBlocks(prompt))
    tiers = policy._cached_tiers([a, b], PromptBlocks(prompt))
    assert tiers == {"a": ["device"] * 2 + ["host"] * 2 + [IN_FLIGHT] * 6, "b": []}
    assert reload_seconds(tiers["a"], BS, 1000.0) == pytest.approx(2 * BS * 0.05 / 1000.0)
    policy.settled(a, PromptBlocks(prompt))
    assert policy._cached_tiers([a], PromptBlocks(prompt))["a"].count(IN_FLIGHT) == 6  # one still runs
    policy.settled(a, PromptBlocks(prompt))
    assert policy._cached_tiers([a], PromptBlocks(prompt))["a"] == ["device"] * 2 + ["host"] * 2
    # a block in flight after a gap in the index does not count
    policy.dispatched(b, PromptBlocks(prompt[:21]))  # blocks 0-4 in flight on b
    idx.apply("b", hashes[5:8], [False] * 3)
    assert policy._cached_tiers([b], PromptBlocks(prompt))["b"] == [IN_FLIGHT] * 5
    quiet = _worker("c", events=False)
    policy.dispatched(quiet, PromptBlocks(prompt))
    policy.settled(quiet, PromptBlocks(prompt))
    assert "c" not in policy._in_flight
    LeastLoaded().dispatched(a, PromptBlocks(prompt))  # other policies track nothing
    LeastLoaded().settled(a, PromptBlocks(prompt))


def test_miss_causes_from_the_routing_log() -> None:
    """`bench kv-trace --trace-misses`: a request short of its best is charged to moved (another worker
    held more, settled), moved_from_in_flight, in_flight_not_reused, store_miss, raced or evicted, from
    its routing line; lines match requests by prompt, in order."""
    from k2serve.bench.kv_misses import lost_by_cause, match_routing, miss_cause, trace_misses
    from k2serve.loadgen.dataset import BenchRequest
    from k2serve.loadgen.record import RequestRecord
    from k2serve.router.backend import prompt_key

    def cand(w: str, local: int = 0, shared: int = 0, flight: int = 0) -> dict[str, Any]:
        return {
            "worker_id": w,
            "predicted_ttft_s": 0.01,
            "queued_tokens": 0,
            "local": local,
            "shared": shared,
            "in_flight": flight,
        }

    def line(worker: str, *cands: dict[str, Any], prompt: str = "") -> dict[str, Any]:
        return {"prompt": prompt, "worker": worker, "reason": "prefix_hit", "candidates": list(cands)}

    assert miss_cause(line("a", cand("a", 16), cand("b", 64)), 16)[0] == "moved"
    assert miss_cause(line("a", cand("a", 16), cand("b", 16, flight=48)), 16)[0] == "moved_from_in_flight"
    assert miss_cause(line("a", cand("a", 16, flight=48), cand("b")), 16)[0] == "in_flight_not_reused"
    assert miss_cause(line("a", cand("a", 16, shared=48), cand("b", shared=48)), 32)[0] == "store_miss"
    assert miss_cause(line("a", cand("a", 64), cand("b")), 32)[0] == "raced"
    assert miss_cause(line("a", cand("a", 16), cand("b", 16)), 16)[0] == "evicted"
    assert miss_cause(None, 0)[0] == "unrouted"
    # found more than the index placed anywhere (a late index) but less than the best: not moved
    assert miss_cause(line("a", cand("a", 16), cand("b", 32)), 48)[0] == "evicted"
    reqs = [BenchRequest(0, (1, 2, 3), 4), BenchRequest(1, (5, 6), 4), BenchRequest(2, (1, 2, 3), 4)]
    k0, k1 = prompt_key([1, 2, 3]), prompt_key([5, 6])
    assert k0 != k1 and k0.startswith("3:")
    lines = [
        line("a", cand("a"), prompt=k0),
        line("b", cand("b"), prompt=k1),
        line("c", cand("c"), prompt=k0),
    ]
    assert {i: x["worker"] for i, x in match_routing(reqs, lines).items()} == {0: "a", 1: "b", 2: "c"}
    lines[2]["candidates"] = [cand("c", 0), cand("a", 3)]
    recs = [RequestRecord(i, 0.0, 3, 4, cached_tokens=c, finish_s=1.0) for i, c in ((0, 0), (1, 0), (2, 0))]
    misses = trace_misses(reqs, recs, [0, 0, 3], lines)  # only request 2 fell short of its best
    assert [(m.index, m.lost, m.cause) for m in misses] == [(2, 3, "moved")]
    assert lost_by_cause(misses) == {"moved": 3}


def test_prompt_blocks_leave_the_last_token_to_compute() -> None:
    """A worker always computes the prompt's last token (BlockManager.allocate), so an 8-token prompt of
    4-token blocks can hit one block, not two: the router predicts exactly what the worker will find."""
    prompt = list(range(8))
    blocks = PromptBlocks(prompt)
    assert blocks.hashes(BS) == chain_hashes(prompt, BS)[:1]
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc = bm.allocate(prompt)
    bm.mark_computed(alloc.block_table, prompt, 8)
    bm.free(alloc.block_table)
    assert bm.allocate(prompt).num_cached_tokens == len(blocks.hashes(BS)) * BS


# ---- what the heartbeat reports ------------------------------------------------------------------------
def test_engine_reports_queued_prefill_tokens_and_prefill_speed(tiny_ckpt: Path) -> None:
    """Chunked prefill (8 tokens a step): the queue counts the prompt tokens not computed yet (a waiting
    prompt less the prefix the pool holds for it), and the speed is measured from the steps that
    computed prompt tokens only (decode steps leave it alone)."""
    llm = LLMEngine.from_pretrained(
        tiny_ckpt, torch.float32, EngineConfig(num_kv_blocks=64, block_size=BS, max_num_batched_tokens=8)
    )
    assert llm.prefill_tokens_per_s == 0.0 and llm.queued_prefill_tokens() == 0
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.add_request("a", list(range(1, 21)), params)
    llm.add_request("b", list(range(30, 35)), params)
    assert llm.queued_prefill_tokens() == 25
    llm.step()  # a's first 8 tokens
    assert llm.queued_prefill_tokens() == 17 and llm.prefill_tokens_per_s > 0
    while llm.queued_prefill_tokens():
        llm.step()
    rate = llm.prefill_tokens_per_s
    while llm.has_unfinished_requests():  # decode steps only
        llm.step()
    assert llm.prefill_tokens_per_s == rate
    # a waiting prompt whose prefix the pool holds (a's 5 full prompt blocks) counts only the rest: a
    # conversation's next turn queued on its holder is not a full recompute
    llm.add_request("c", list(range(1, 21)) + [7, 8, 9], params)
    llm.add_request("d", [500] * 23, params)
    assert llm.queued_prefill_tokens() == 3 + 23
    chain = llm.scheduler.waiting[0].prefix_chain
    assert len(chain) == 5 and llm.queued_prefill_tokens() == 26 and len(chain) == 5  # memoised


# ---- a real engine's publisher ------------------------------------------------------------------------
def test_publisher_snapshot_and_events_of_a_real_engine(tiny_ckpt: Path) -> None:
    """A worker's KVEventPublisher on a running engine: the snapshot at registration plus the events of
    later requests give the router exactly the hashes of the prompts' computed full blocks."""
    engine = AsyncEngine.from_pretrained(
        tiny_ckpt, torch.float32, EngineConfig(num_kv_blocks=64, block_size=BS)
    )
    engine.start()

    async def run() -> None:
        async def generate(rid: str, prompt: list[int]) -> None:
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            async for _ in await engine.generate(GenerateRequest(rid, prompt, params)):
                pass

        first, second = list(range(1, 11)), list(range(1, 9)) + [50, 51, 52, 53, 54]
        await generate("before", first)  # computed before the publisher: must come with the snapshot
        pub = KVEventPublisher(engine)
        idx = KVIndex()
        info = registry_pb2.WorkerInfo()
        await pub.snapshot(info)
        assert info.publishes_kv_events and not info.kv_store  # no shared store
        assert set(info.kv_block_tiers) == {registry_pb2.KV_TIER_DEVICE}
        idx.replace("p", info.kv_block_hashes, [tier_name(t) for t in info.kv_block_tiers])
        await generate("after", second)
        events = pub.events()
        assert events is not None
        idx.apply("p", events.block_hashes, events.removed, [tier_name(t) for t in events.tiers])
        expected = set(chain_hashes(first, BS)) | set(chain_hashes(second, BS))
        assert {h for h in expected if idx.holds("p", h)} == expected and len(idx) == len(expected)
        assert idx.cached_blocks(PromptBlocks(second + [7]).hashes(BS), ["p"]) == {"p": 3}

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_bench_report_reuse_against_the_best_possible() -> None:
    """`k2serve bench kv-routing`'s summary: computed = prompt - cached; reuse = cached / best possible
    (turn 1 has none); TTFT from turn 2 on."""
    from k2serve.bench.kv_routing import TurnResult, report

    ms = 1e-3
    runs = {
        "kv": [
            TurnResult(100, 0, 0, 50 * ms),
            TurnResult(200, 96, 96, 10 * ms),
            TurnResult(300, 192, 192, 30 * ms),
        ],
        "least-loaded": [
            TurnResult(100, 0, 0, 50 * ms),
            TurnResult(200, 0, 96, 40 * ms),
            TurnResult(300, 96, 192, 60 * ms),
        ],
    }
    lines = report(runs, conversations=1)
    assert lines[1].split()[:3] == ["kv", "312", "100.0%"] and lines[1].split()[3] == "20.0"
    assert lines[2].split()[:3] == ["least-loaded", "504", "33.3%"] and lines[2].split()[3] == "50.0"
