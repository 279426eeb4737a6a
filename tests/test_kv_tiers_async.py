"""Asynchronous KV tiers (kvcache/tiers.py with async_io, engine/kv_tiers.py:AsyncReloads): a request
whose prefix is reloaded from a tier waits while the others keep decoding, and its greedy tokens are the
reference's; an abort during a reload gives its blocks back; a reload that times out is recomputed; a
full disk-writer queue drops the offload (counted) without waiting; KV events say which tier holds an
offloaded block, and KVAware charges a tier block a reload cost: less than recompute, more than nothing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_kv_tiers import BS, GREEDY, evict_first, generate, make_engine, prompt

from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.kvcache.block_manager import BlockManager, KVEventLog
from k2serve.kvcache.hashing import chain_hashes
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.tiers import KVTiers
from k2serve.proto import registry_pb2
from k2serve.router.kv_index import KVIndex
from k2serve.router.policy import DEFAULT_RELOAD_COST, KVAware, PromptBlocks, reload_seconds
from k2serve.router.registry import Worker

DECODE = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BIG = 1 << 30


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> dict[str, list[int]]:
    """Greedy tokens without any cache reuse: prompt 1 (GREEDY) and the short decode row (DECODE)."""
    engine = make_engine(tiny_ckpt, enable_prefix_caching=False, num_kv_blocks=64)
    out = {"a": generate(engine, "ref", prompt(1))}
    engine.add_request("d", prompt(5, 16), DECODE)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out["d"] = o.token_ids
    return out


def _tier_kw(tier: str, tmp_path: Path) -> dict[str, Any]:
    if tier == "host":
        return {"kv_offload_host_bytes": BIG}
    return {"kv_offload_dir": str(tmp_path), "kv_offload_disk_bytes": BIG}


def gate_disk_writes(tiers: KVTiers) -> tuple[threading.Event, threading.Event]:
    """Every disk write of `tiers` waits for the second event (at most 30 s); the first is set once one
    waits (the writer thread is then busy)."""
    assert tiers.disk is not None
    writing, release = threading.Event(), threading.Event()
    write_file = tiers.disk.write_file

    def gated(h: int, payload: bytes) -> None:
        writing.set()
        release.wait(30)
        write_file(h, payload)

    tiers.disk.write_file = gated  # type: ignore[method-assign]
    return writing, release


def _gate(engine: LLMEngine) -> threading.Event:
    """A slow tier: every block read waits for the returned event (at most 30 s)."""
    assert engine.tiers is not None
    gate = threading.Event()

    def slow_read(h: int) -> None:
        gate.wait(30)

    engine.tiers.read_hook = slow_read
    return gate


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_decode_runs_while_a_reload_is_in_flight_and_tokens_are_identical(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[str, list[int]], tier: str
) -> None:
    engine = make_engine(tiny_ckpt, **_tier_kw(tier, tmp_path))
    assert engine.tiers is not None and engine.reloads is not None
    assert evict_first(engine) == reference["a"]
    engine.add_request("d", prompt(5, 16), DECODE)
    engine.step()  # d's prefill and first token
    gate = _gate(engine)
    engine.add_request("a2", prompt(1), GREEDY)
    got: dict[str, list[int]] = {}
    steps_during_reload = 0
    for _ in range(5):
        outs = engine.step()
        assert [o.request_id for o in outs] == ["d"]  # d decodes one token a step; a2 waits
        assert engine.reloads.in_flight == 1
        steps_during_reload += 1
    assert len(engine.seqs["d"].output_token_ids) == 1 + steps_during_reload
    gate.set()
    while engine.has_unfinished_requests():
        got |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    assert got == {"a2": reference["a"], "d": reference["d"]}
    assert engine.reloads.in_flight == 0 and engine.reloads.started_total == 1
    assert engine.tiers.stats.hit_tokens[tier] == 32  # (40 - 1) // 8 = 4 blocks from the tier
    engine.blocks.check_invariants([])


def test_sync_and_async_reloads_give_the_same_tokens(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[str, list[int]]
) -> None:
    for async_io in (False, True):
        engine = make_engine(
            tiny_ckpt, kv_offload_async=async_io, **_tier_kw("disk", tmp_path / str(async_io))
        )
        assert engine.tiers is not None and (engine.reloads is not None) == async_io
        evict_first(engine)
        assert generate(engine, "a2", prompt(1)) == reference["a"]
        assert engine.tiers.stats.hit_tokens["disk"] == 32
        engine.tiers.close()


def test_abort_during_a_reload_gives_its_blocks_back(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[str, list[int]]
) -> None:
    engine = make_engine(tiny_ckpt, **_tier_kw("disk", tmp_path))
    assert engine.tiers is not None and engine.reloads is not None
    evict_first(engine)
    free_before = engine.blocks.num_free_blocks
    gate = _gate(engine)
    engine.add_request("a2", prompt(1), GREEDY)
    assert engine.step() == []  # the reload starts; nothing else to run
    assert engine.reloads.in_flight == 1
    assert engine.blocks.num_free_blocks == free_before - 5  # 40 tokens: 5 blocks held for it
    engine.blocks.check_invariants(engine.reloads.held_blocks())
    assert engine.abort_request("a2")
    assert engine.reloads.in_flight == 0 and not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == free_before
    engine.blocks.check_invariants([])
    gate.set()  # the abandoned read finishes; its result goes nowhere
    assert generate(engine, "a3", prompt(1)) == reference["a"]
    assert engine.tiers.stats.hit_tokens["disk"] == 32
    engine.blocks.check_invariants([])


def test_reload_timeout_recomputes(tiny_ckpt: Path, tmp_path: Path, reference: dict[str, list[int]]) -> None:
    engine = make_engine(tiny_ckpt, kv_reload_timeout_s=0.2, **_tier_kw("disk", tmp_path))
    assert engine.tiers is not None and engine.reloads is not None
    evict_first(engine)
    gate = _gate(engine)
    before = engine.num_computed_tokens_total
    try:
        assert generate(engine, "a2", prompt(1)) == reference["a"]
    finally:
        gate.set()
    assert engine.reloads.timeouts_total == 1
    assert engine.tiers.stats.hit_tokens["disk"] == 0
    assert engine.num_computed_tokens_total - before == 40 + GREEDY.max_tokens - 1  # all recomputed
    engine.blocks.check_invariants([])


def test_full_write_queue_drops_the_offload_and_never_waits(tmp_path: Path) -> None:
    pool = KVCachePool(2, 7, 4, 8, torch.float32)  # block 6: outside the manager's, for the busy write
    bm = BlockManager(6, 4)
    bm.events = KVEventLog()
    tiers = KVTiers(
        pool,
        disk_dir=tmp_path,
        disk_bytes=BIG,
        on_dropped=bm.tier_dropped,
        async_io=True,
        write_queue_blocks=1,
    )
    tiers.on_moved = bm.tier_moved
    bm.attach_tiers(tiers)
    writing, release = gate_disk_writes(tiers)
    assert tiers.offload(12345, 6)  # another block: the writer takes it and stays busy
    assert writing.wait(30)
    tokens = [list(range(s, s + 5)) for s in (0, 100, 200)]  # one full block each

    def compute_and_free() -> list[int]:
        """Each of `tokens` computed into a block then freed (cached, evictable); their cache hits."""
        tables, hits = [], []
        for t in tokens:
            a = bm.allocate(t)
            hits.append(a.num_cached_tokens)
            pool.kv[:, a.block_table[0]] = float(t[0] + 1)
            bm.mark_computed(a.block_table, t, 5)
            tables.append(a.block_table)
        for table in tables:
            bm.free(table)
        bm.events.drain()
        return hits

    compute_and_free()
    h = [chain_hashes(t, 4)[0] for t in tokens]
    filler = bm.allocate(list(range(500, 524)))  # 6 blocks: all three cached ones evicted at once
    events, _ = bm.events.drain()
    # the writer is busy and the queue (1 block) is full when the batch begins: all three dropped, removed
    assert tiers.stats.dropped_offloads == 3
    assert events == [(x, True, "device") for x in h]
    assert tiers.write_queue_depth == 1 and not any(tiers.contains(x) for x in h)
    bm.free(filler.block_table)
    release.set()
    tiers.flush()
    assert tiers.write_queue_depth == 0 and len(tiers.disk) == 1  # 12345
    # a batch that begins below the bound is queued whole, past it: a long context evicted at once
    assert compute_and_free() == [0, 0, 0]  # dropped before: recomputed
    filler = bm.allocate(list(range(500, 524)))
    events, _ = bm.events.drain()
    assert tiers.stats.dropped_offloads == 3 and events == [(x, False, "disk") for x in h]
    bm.free(filler.block_table)
    pool.kv.zero_()
    tiers.flush()
    assert len(tiers.disk) == 4
    again = bm.allocate(tokens[0] + [9, 9, 9, 9])
    assert again.num_cached_tokens == 4
    assert torch.equal(pool.kv[:, again.block_table[0]], torch.full((2, 4, 8), 1.0))
    tiers.close()


# ---- events with tiers and the router's predicted TTFT -------------------------------------------------
def _worker(worker_id: str, reload_rates: dict[str, float] | None = None) -> Worker:
    info = registry_pb2.WorkerInfo(
        worker_id=worker_id, role=registry_pb2.WORKER_ROLE_PREFILL, block_size=BS, publishes_kv_events=True
    )
    load = registry_pb2.WorkerLoad(
        prefill_tokens_per_s=1000.0, free_blocks=100, reload_tokens_per_s=reload_rates
    )
    return Worker(worker_id, "prefill", "-", info, channel=None, load=load, ready=True)  # type: ignore[arg-type]


def test_index_keeps_the_tier_per_worker() -> None:
    idx = KVIndex()
    idx.replace("a", [1, 2, 3], ["device", "host", "disk"])
    idx.apply("b", [1, 2], [False, False])  # no tiers: the device
    idx.apply("a", [1, 3], [False, False], ["host", "device"])  # 1 offloaded, 3 reloaded
    assert [idx.tier_of("a", h) for h in (1, 2, 3)] == ["host", "host", "device"]
    assert idx.cached_tiers([1, 2, 3, 4], ["a", "b", "c"]) == {
        "a": ["host", "host", "device"],
        "b": ["device", "device"],
        "c": [],
    }
    assert idx.cached_blocks([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 2}
    idx.apply("a", [2], [True])  # 2 left a's last tier
    assert idx.cached_tiers([1, 2, 3], ["a"]) == {"a": ["host"]} and len(idx) == 3
    with pytest.raises(ValueError, match="2 hashes but 1 tiers"):
        idx.apply("a", [1, 2], [False, False], ["host"])


def test_kv_aware_counts_tier_blocks_cheaper_than_recompute_but_not_free() -> None:
    tokens = list(range(100, 141))  # 41 tokens: 5 blocks can come from a cache
    hashes = chain_hashes(tokens, BS)[:5]
    idx = KVIndex()
    idx.apply("dev", hashes, [False] * 5)
    idx.apply("disk", hashes, [False] * 5, ["disk"] * 5)
    policy = KVAware(idx)
    dev, disk, none = _worker("dev"), _worker("disk"), _worker("none")
    blocks = PromptBlocks(tokens)
    ttft = {
        w.worker_id: policy.choose([w], "prefill", prompt=blocks).predicted_ttft_s for w in (dev, disk, none)
    }
    # dev: 1 token to compute; disk: that + 40 tokens at 0.2 of recompute; none: 41 tokens
    assert ttft["dev"] == pytest.approx(0.001)
    assert ttft["disk"] == pytest.approx(0.001 + 40 * DEFAULT_RELOAD_COST["disk"] / 1000)
    assert ttft["none"] == pytest.approx(0.041)
    c = policy.choose([none, disk, dev], "prefill", prompt=blocks)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("dev", "prefix_hit", 40)
    c = policy.choose([none, disk], "prefill", prompt=blocks)
    assert (c.worker.worker_id, c.reason, c.cached_tokens) == ("disk", "prefix_hit", 40)
    # a measured reload speed replaces the default cost: 40 tokens at 4,000 tokens/s = 10 ms
    slow = _worker("disk", {"disk": 4000.0})
    assert policy.choose([slow], "prefill", prompt=blocks).predicted_ttft_s == pytest.approx(0.011)
    # 40 tokens at 500 tokens/s (a slow shared store, say) = 80 ms: recomputing elsewhere is sooner
    crawl = _worker("disk", {"disk": 500.0})
    assert policy.choose([crawl, none], "prefill", prompt=blocks).worker.worker_id == "none"
    assert reload_seconds(["device", "host", "mooncake"], BS, 1000.0) == pytest.approx(
        BS * (DEFAULT_RELOAD_COST["host"] + DEFAULT_RELOAD_COST["shared"]) / 1000
    )


def test_engine_events_and_snapshot_name_the_tier(tiny_ckpt: Path, tmp_path: Path) -> None:
    engine = make_engine(
        tiny_ckpt,
        kv_offload_host_bytes=BIG,  # resized below to 2 blocks
        kv_offload_dir=str(tmp_path),
        kv_offload_disk_bytes=BIG,
    )
    assert engine.tiers is not None and engine.tiers.host is not None
    engine.tiers.host.capacity_blocks = 2
    engine.blocks.events = log = KVEventLog()
    evict_first(engine)
    events, _ = log.drain()
    idx = KVIndex()
    idx.apply("w", [h for h, _, _ in events], [r for _, r, _ in events], [t for _, _, t in events])
    held = dict(engine.blocks.stored_blocks())
    assert {idx.tier_of("w", h) for h in held} == {"device", "host", "disk"}
    assert {h: idx.tier_of("w", h) for h in held} == held  # the events replay to the snapshot
    assert sum(t == "host" for t in held.values()) == 2
    assert idx.blocks_of("w") == len(held)
    first = chain_hashes(prompt(1), BS)[:4]
    assert all(held[h] in ("host", "disk") for h in first)  # prompt 1 offloaded
    generate(engine, "a2", prompt(1))  # reloaded: back on the device
    events, _ = log.drain()
    idx.apply("w", [h for h, _, _ in events], [r for _, r, _ in events], [t for _, _, t in events])
    assert [idx.tier_of("w", h) for h in first] == ["device"] * 4


@pytest.mark.slow
def test_offloaded_events_reach_the_router_through_a_real_cluster(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A prefill worker with a 1 MiB pool (136 blocks of 8 tokens) and a host tier: a prompt pushed out
    of the pool by three others is published as offloaded ("host" in the router's index), its next turn
    reloads it (usage's cached tokens) with the same greedy tokens, and the index has it on the device
    again."""
    import time

    import httpx
    from conftest import local_cluster_spec

    from k2serve.cluster.local import LocalCluster

    engine_args = ("--kv-cache-mb", "1", "--block-size", str(BS), "--heartbeat-interval", "0.3")
    engine_args += ("--kv-offload-host-mb", "8")
    spec = local_cluster_spec(tiny_ckpt, tmp_path, engine_args=engine_args)

    def tiers(cluster: LocalCluster) -> dict[str, int]:
        return next(w["kv_index_tiers"] for w in cluster.workers() if w["role"] == "prefill")

    def wait_for(cluster: LocalCluster, ok: Any) -> dict[str, int]:
        deadline = time.monotonic() + 20
        while not ok(seen := tiers(cluster)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return seen

    prompts = [prompt(10 + k, 480) for k in range(4)]
    with LocalCluster(spec) as cluster, httpx.Client(base_url=cluster.http_url, timeout=120) as client:

        def complete(tokens: list[int]) -> tuple[list[int], int]:
            body = {"model": tiny_ckpt.name, "prompt": tokens, "max_tokens": 4, "temperature": 0}
            r = client.post("/v1/completions", json=body | {"ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            out = r.json()
            return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

        first, _ = complete(prompts[0])
        for p in prompts[1:]:
            complete(p)
        seen = wait_for(cluster, lambda t: t.get("host", 0) >= 59)
        assert seen.get("host", 0) >= 59, seen  # prompt 0's 59 full blocks (at least) were offloaded
        again, cached = complete(prompts[0])
        assert again == first
        assert cached == 59 * BS  # (480 - 1) // 8 blocks reloaded from the host tier
        seen = wait_for(cluster, lambda t: t.get("device", 0) >= 59)
        assert seen.get("device", 0) >= 59, seen


def test_store_tier_goes_on_the_wire_as_shared_with_its_reload_rate() -> None:
    """The Mooncake tier ("mooncake" in the worker's stats) is KV_TIER_SHARED on the wire, and its
    measured reload speed reaches the router under "shared", the name the router's index gives it."""
    from types import SimpleNamespace

    from k2serve.engine.protocol import BackendStats, KVTierStats
    from k2serve.kvcache.block_manager import tier_code, tier_name
    from k2serve.worker.runtime import worker_load

    assert (
        tier_code("mooncake") == registry_pb2.KV_TIER_SHARED and tier_name(tier_code("mooncake")) == "shared"
    )
    tiers = {"host": 0, "disk": 0, "mooncake": 0}
    kv = KVTierStats(
        hit_tokens=tiers | {"host": 64, "mooncake": 32},
        offload_bytes=tiers,
        offload_seconds=dict.fromkeys(tiers, 0.0),
        reload_bytes=tiers,
        reload_seconds={"host": 0.002, "disk": 0.0, "mooncake": 0.016},
        blocks=tiers,
        leased_blocks=3,
    )
    stats = BackendStats(
        num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=10, prefix_hit_rate=0.0,
        num_preemptions=0, kv_tiers=kv,
    )  # fmt: skip
    load = worker_load(SimpleNamespace(stats=lambda: stats))  # type: ignore[arg-type]
    assert dict(load.reload_tokens_per_s) == pytest.approx({"host": 32000.0, "shared": 2000.0})
    assert load.leased_blocks == 3
    # the router charges a block the index holds as "shared" at that rate: 8 tokens at 2,000 tokens/s
    assert reload_seconds(["shared"], BS, 1000.0, dict(load.reload_tokens_per_s)) == pytest.approx(0.004)
