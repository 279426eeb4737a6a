"""Local KV tiers (kvcache/tiers.py): blocks evicted from the device pool go to host memory, then to a
disk directory, and come back on a prefix hit with the same tokens; corrupt or missing entries mean
recompute; the caps hold; events keep an offloaded block "held" until it leaves the last tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.kvcache.block_manager import BlockManager, KVEventLog
from k2serve.kvcache.hashing import chain_hashes
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.tiers import KVTiers

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BS = 8


def make_engine(ckpt: Path, **kw: Any) -> LLMEngine:
    cfg = EngineConfig(**({"num_kv_blocks": 12, "block_size": BS, "max_num_batched_tokens": 96} | kw))
    return LLMEngine.from_pretrained(ckpt, torch.float32, cfg)


def generate(engine: LLMEngine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, GREEDY)
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = o.token_ids
    return out


def prompt(seed: int, n: int = 40) -> list[int]:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> dict[int, list[int]]:
    """Greedy tokens of the prompts without any cache reuse."""
    engine = make_engine(tiny_ckpt, enable_prefix_caching=False, num_kv_blocks=64)
    return {s: generate(engine, f"ref{s}", prompt(s)) for s in (1,)}


def evict_first(engine: LLMEngine) -> list[int]:
    """Run prompt 1, then prompts 2, 3 and 4, which push prompt 1's blocks out of the 12-block pool."""
    first = generate(engine, "a", prompt(1))
    for s in (2, 3, 4):
        generate(engine, f"x{s}", prompt(s))
    h = chain_hashes(prompt(1), BS)
    assert not any(x in engine.blocks._hash_to_block for x in h), "prompt 1's blocks must have left the pool"
    if engine.tiers is not None:
        engine.tiers.flush()  # the asynchronous disk writes are done (the files exist)
    return first


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_reload_from_tier_gives_identical_tokens(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[int, list[int]], tier: str
) -> None:
    big = 1 << 30
    kw: dict[str, Any] = (
        {"kv_offload_host_bytes": big}
        if tier == "host"
        else {"kv_offload_dir": str(tmp_path), "kv_offload_disk_bytes": big}
    )
    engine = make_engine(tiny_ckpt, **kw)
    assert engine.tiers is not None
    assert evict_first(engine) == reference[1]
    before = engine.num_computed_tokens_total
    again = generate(engine, "a2", prompt(1))
    assert again == reference[1]
    # (40 - 1) // 8 = 4 full prefix blocks come back from the tier; only the rest is computed
    assert engine.tiers.stats.hit_tokens[tier] == 32
    assert engine.tiers.stats.hit_tokens["disk" if tier == "host" else "host"] == 0
    assert engine.tiers.stats.reload_bytes[tier] == 4 * engine.pool.bytes_per_block
    assert engine.num_computed_tokens_total - before == 40 - 32 + GREEDY.max_tokens - 1
    assert engine.blocks.tier_hit_tokens == 32
    engine.blocks.check_invariants([])
    if tier == "disk":
        assert len(list(tmp_path.glob("*.kvblock"))) == len(engine.tiers.disk or [])


def test_host_then_disk_round_trip(tiny_ckpt: Path, tmp_path: Path, reference: dict[int, list[int]]) -> None:
    """A host tier of 2 blocks pushes the rest of prompt 1's blocks to disk: the hit comes from both."""
    engine = make_engine(
        tiny_ckpt,
        kv_offload_host_bytes=0,
        kv_offload_dir=str(tmp_path),
        kv_offload_disk_bytes=1 << 30,
    )
    assert engine.tiers is not None
    bb = engine.pool.bytes_per_block
    engine2 = make_engine(
        tiny_ckpt,
        kv_offload_host_bytes=2 * bb,
        kv_offload_dir=str(tmp_path / "d2"),
        kv_offload_disk_bytes=4 * bb,
    )
    assert engine2.tiers is not None and engine2.tiers.host is not None and engine2.tiers.disk is not None
    evict_first(engine2)
    assert len(engine2.tiers.host) <= 2 and len(engine2.tiers.disk) <= 4
    assert len(list((tmp_path / "d2").glob("*.kvblock"))) <= 4
    assert generate(engine2, "a2", prompt(1)) == reference[1]
    stats = engine2.tiers.stats
    assert stats.hit_tokens["host"] + stats.hit_tokens["disk"] <= 32
    engine2.blocks.check_invariants([])
    del engine


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_bad_disk_entry_means_recompute(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[int, list[int]], damage: str
) -> None:
    engine = make_engine(tiny_ckpt, kv_offload_dir=str(tmp_path), kv_offload_disk_bytes=1 << 30)
    assert engine.tiers is not None and engine.tiers.disk is not None
    evict_first(engine)
    hashes = chain_hashes(prompt(1), BS)
    victim = engine.tiers.disk.path(hashes[2])  # the third prefix block: blocks 0 and 1 still hit
    assert victim.exists()
    if damage == "corrupt":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-7])
    assert generate(engine, "a2", prompt(1)) == reference[1]
    assert engine.tiers.stats.hit_tokens["disk"] == 2 * BS
    assert engine.tiers.stats.corrupt_blocks == 1
    assert not victim.exists() or damage != "corrupt"
    engine.blocks.check_invariants([])


def _pool_and_manager(num_blocks: int = 4) -> tuple[KVCachePool, BlockManager]:
    pool = KVCachePool(2, num_blocks, 4, 8, torch.float32)
    return pool, BlockManager(num_blocks, 4)


def test_events_offloaded_block_stays_held_until_last_tier_drops_it() -> None:
    pool, bm = _pool_and_manager()
    bm.events = KVEventLog()
    tiers = KVTiers(pool, host_bytes=pool.bytes_per_block, on_dropped=bm.tier_dropped)  # a 1-block host tier
    bm.attach_tiers(tiers)
    a = bm.allocate(list(range(9)))  # 3 blocks, 2 full registered after compute
    bm.mark_computed(a.block_table, list(range(9)), 9)
    bm.free(a.block_table)
    stored, _ = bm.events.drain()
    h0, h1 = chain_hashes(list(range(8)), 4)
    assert stored == [(h0, False, "device"), (h1, False, "device")]
    b = bm.allocate(list(range(100, 116)))  # 4 fresh blocks: both cached blocks evicted
    events, _ = bm.events.drain()
    # freed tail first, h1 is evicted first into the host tier, then pushed out by h0 (no disk): only h1
    # is removed; h0 is offloaded (stored in "host") and stays in the snapshot
    assert events == [(h1, True, "device"), (h0, False, "host")]
    assert tiers.contains(h0) and not tiers.contains(h1)
    assert set(bm.stored_hashes()) == {h0}
    assert bm.stored_blocks() == [(h0, "host")]
    bm.free(b.block_table)


def test_pool_rows_round_trip_bit_exact() -> None:
    pool, bm = _pool_and_manager()
    tiers = KVTiers(pool, host_bytes=4 * pool.bytes_per_block, on_dropped=bm.tier_dropped)
    bm.attach_tiers(tiers)
    tokens = list(range(9))
    a = bm.allocate(tokens)
    pool.kv[:, a.block_table[:2]] = torch.randn(2, 2, 4, 8)
    saved = pool.kv[:, a.block_table[:2]].clone()
    bm.mark_computed(a.block_table, tokens, 9)
    bm.free(a.block_table)
    filler = bm.allocate(list(range(500, 516)))  # evicts both
    bm.free(filler.block_table)
    pool.kv.zero_()
    again = bm.allocate(tokens)
    assert again.num_cached_tokens == 8
    assert torch.equal(pool.kv[:, again.block_table[:2]], saved)
    assert tiers.stats.hit_tokens == {"host": 8, "disk": 0}
    bm.check_invariants([again.block_table])


def test_config_rejects_disk_size_without_directory() -> None:
    with pytest.raises(EngineConfigError, match="kv_offload_dir"):
        EngineConfig(kv_offload_disk_bytes=1 << 20)
    with pytest.raises(EngineConfigError, match="kv_offload_host_bytes must be >= 0"):
        EngineConfig(kv_offload_host_bytes=-1)


def test_cli_flags_reach_the_engine_config_and_up_passes_them_on() -> None:
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config

    flags = ["--kv-offload-host-mb", "64", "--kv-offload-dir", "/tmp/t", "--kv-offload-disk-mb", "256"]
    flags += ["--kv-session-lease-s", "2.5"]
    cfg = engine_config(build_parser().parse_args(["serve", "--preset", "tiny", *flags]))
    assert (
        cfg.kv_offload_host_bytes,
        cfg.kv_offload_dir,
        cfg.kv_offload_disk_bytes,
        cfg.kv_session_lease_s,
    ) == (
        64 << 20,
        "/tmp/t",
        256 << 20,
        2.5,
    )
    passed = engine_args_from_up(build_parser().parse_args(["up", "--preset", "tiny", *flags]))
    assert list(passed[-len(flags) :]) == flags
    assert "--kv-offload-host-mb" not in engine_args_from_up(
        build_parser().parse_args(["up", "--preset", "tiny"])
    )


# ---- session leases ----------------------------------------------------------------------------


def test_lease_keeps_blocks_until_expiry_or_next_turn_or_pressure() -> None:
    from k2serve.kvcache.block_manager import NoFreeBlocksError
    from k2serve.kvcache.leases import SessionLeases

    now = [100.0]
    bm = BlockManager(6, 4)
    leases = SessionLeases(bm, 10.0, clock=lambda: now[0])
    turn = list(range(10))  # 2 full blocks + a partial one
    a = bm.allocate(turn)
    bm.mark_computed(a.block_table, turn, 10)
    bm.free(a.block_table)
    assert leases.hold("s", turn) == 2 and leases.num_leased_blocks == 2
    with pytest.raises(NoFreeBlocksError):  # 4 left: the leased blocks are not evictable
        bm.allocate(list(range(100, 120)))
    other = list(range(100, 116))
    filler = bm.allocate(other)
    bm.mark_computed(filler.block_table, other, 16)
    bm.free(filler.block_table)
    again = bm.allocate(turn + [7])
    assert again.num_cached_tokens == 8  # still cached after the filler
    bm.free(again.block_table)
    now[0] = 109.0
    assert leases.expire() == 0
    now[0] = 110.0
    assert leases.expire() == 1 and leases.num_leased_blocks == 0 and leases.expired_total == 1
    # pressure: a new lease ends early when a request needs its blocks
    assert leases.hold("t", other) == 3  # 4 cached blocks, the 4th since evicted for `again`
    assert leases.relieve(lambda: bm.can_allocate(list(range(200, 224)))) == 1 and len(leases) == 0
    # the next turn ends the lease
    assert leases.hold("u", turn) == 2
    assert leases.release("u") and not leases.release("u")
    with pytest.raises(ValueError, match="lease_s"):
        SessionLeases(bm, 0)


@pytest.mark.parametrize("lease_s", [0.0, 3600.0])
def test_engine_lease_keeps_session_prefix_on_device(tiny_ckpt: Path, lease_s: float) -> None:
    engine = make_engine(tiny_ckpt, kv_session_lease_s=lease_s)
    engine.add_request("t1", prompt(1), GREEDY, session_id="sess")
    first: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            first = o.token_ids if o.finished else first
    leased = engine.leases.leases.num_leased_blocks if engine.leases is not None else 0
    assert leased == (5 if lease_s else 0)  # 40 prompt + 7 computed output tokens: 5 full blocks
    for s in (2, 3, 4):  # other traffic that would evict them
        generate(engine, f"x{s}", prompt(s))
    turn2 = prompt(1) + first + [5, 6, 7]
    engine.add_request("t2", turn2, GREEDY, session_id="sess")
    if engine.leases is not None:
        assert engine.leases.leases.num_leased_blocks == 0  # the next turn ended the lease
    cached = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            cached = o.num_cached_tokens if o.finished else cached
    assert cached == (40 if lease_s else 0)
    engine.blocks.check_invariants(
        [t for t, _ in engine.leases.leases._leases.values()] if engine.leases is not None else []
    )


def tier_samples(registry: Any) -> dict[tuple[str, str | None], float]:
    """(sample name, its `tier` label or None) -> value of every sample a metrics registry exposes."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    got = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for smp in fam.samples:
            got[(smp.name, smp.labels.get("tier"))] = smp.value
    return got


def test_worker_metrics_count_tier_hits_bytes_and_leases(tiny_ckpt: Path) -> None:
    import asyncio

    from k2serve.chat.tokenizer import load_tokenizer
    from k2serve.engine.async_engine import AsyncEngine
    from k2serve.engine.protocol import GenerateRequest, SessionHint

    engine = make_engine(tiny_ckpt, kv_offload_host_bytes=1 << 30, kv_session_lease_s=3600.0)
    engine.tokenizer = load_tokenizer(tiny_ckpt)
    be = AsyncEngine(engine, "tiny", engine_id="e0")
    be.start()

    async def run(rid: str, seed: int, session: str | None = None) -> None:
        hint = SessionHint(session) if session else None
        async for _ in await be.generate(GenerateRequest(rid, prompt(seed), GREEDY, None, hint)):
            pass

    try:
        asyncio.run(run("s1", 1, "sess"))  # leased: 5 blocks stay on the device
        for i, s in enumerate((2, 3, 2)):  # prompt 3 evicts prompt 2 into the host tier; 2 reloads
            asyncio.run(run(f"r{i}", s))
        got = tier_samples(be.metrics.registry)
    finally:
        be.shutdown()
    bb = engine.pool.bytes_per_block
    assert got[("k2serve_kv_leased_blocks", None)] == 5
    # 7 unleased blocks: prompt 3 takes the 2 free ones and evicts 4 of prompt 2's 5 cached blocks
    # (freed tail first), so prompt 2's 4-block prefix comes back as 1 device + 3 host blocks
    assert got[("k2serve_kv_tier_hit_tokens_total", "host")] == 24
    assert got[("k2serve_kv_tier_hit_tokens_total", "disk")] == 0
    assert got[("k2serve_kv_tier_hit_tokens_total", "device")] == 8 == engine.blocks.prefix_hit_tokens - 24
    assert got[("k2serve_kv_reload_bytes_total", "host")] == 3 * bb
    assert got[("k2serve_kv_offload_bytes_total", "host")] >= 4 * bb
    assert got[("k2serve_kv_tier_blocks", "host")] >= 4
    assert got[("k2serve_kv_tier_corrupt_blocks_total", None)] == 0
    # asynchronous tiers (the default): no writer (host tier only), nothing in flight once idle
    assert got[("k2serve_kv_offload_dropped_total", None)] == 0
    assert got[("k2serve_kv_offload_queue_blocks", None)] == 0
    assert got[("k2serve_kv_reloads_in_flight", None)] == 0
    assert got[("k2serve_kv_reload_timeouts_total", None)] == 0
