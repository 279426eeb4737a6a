"""The shared KV tier on Mooncake Store (kvcache/shared_tier.py) against a real `mooncake_master`: blocks
reloaded from the store give the same greedy tokens as recomputing them; a second engine prefills a
prompt the first one computed from the store; corrupt or missing entries and a dead master mean
recompute, never wrong tokens or a failed step. Skipped only where the `mooncake` extra is not importable
or mooncake_master is not on PATH (CI installs both)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_kv_tiers import BS, GREEDY, generate, prompt, tier_samples

from k2serve.cluster.mooncake_master import MooncakeMaster, find_mooncake_master
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.extras import MissingExtraError
from k2serve.kvcache.hashing import chain_hashes
from k2serve.kvcache.shared_tier import STORE_TIER, MooncakeSettings, MooncakeStore, SharedTiers
from k2serve.kvcache.tiers import pack_block, unpack_block
from k2serve.proto import registry_pb2
from k2serve.router.registry import RegistryServicer, WorkerTable

PREFIX_TOKENS = 32  # (40 - 1) // 8 = 4 full blocks of a 40-token prompt can come from a cache

HAVE_MOONCAKE = importlib.util.find_spec("mooncake") is not None
needs_mooncake = pytest.mark.skipif(
    not HAVE_MOONCAKE or find_mooncake_master() is None,
    reason="the mooncake extra is not installed (pip install 'k2serve[mooncake]' + Debian's libibverbs1 "
    "librdmacm1 libnuma1): no mooncake module or no mooncake_master on PATH",
)


def store_engine(ckpt: Path, master: MooncakeMaster | str, **kw: Any) -> LLMEngine:
    """A 12-block engine with the shared tier on `master` (a MooncakeMaster, or an address)."""
    address = master if isinstance(master, str) else master.address
    metadata = None if isinstance(master, str) else master.metadata_url
    cfg = EngineConfig(
        **(
            {
                "num_kv_blocks": 12,
                "block_size": BS,
                "max_num_batched_tokens": 96,
                "kv_store": "mooncake",
                "kv_store_master": address,
                "kv_store_metadata": metadata,
                "kv_store_segment_bytes": 32 << 20,
                "kv_store_local_hostname": "127.0.0.1",
                "kv_store_timeout_s": 1.0,
            }
            | kw
        )
    )
    engine = LLMEngine.from_pretrained(ckpt, torch.float32, cfg)
    assert isinstance(engine.tiers, SharedTiers)
    return engine


def shared(engine: LLMEngine) -> SharedTiers:
    assert isinstance(engine.tiers, SharedTiers)
    return engine.tiers


def evict(engine: LLMEngine, first: int) -> None:
    """Prompts first+1..first+3 push prompt `first`'s blocks out of the 12-block pool."""
    for s in (first + 1, first + 2, first + 3):
        generate(engine, f"evict{first}-{s}", prompt(s))
    assert not any(h in engine.blocks._hash_to_block for h in chain_hashes(prompt(first), BS))


def computed_then_evicted(engine: LLMEngine, seed: int, reference: dict[int, list[int]]) -> SharedTiers:
    """Prompt `seed` generated (the reference tokens), then evicted from the pool; the puts done."""
    assert generate(engine, "a", prompt(seed)) == reference[seed]
    evict(engine, seed)
    assert shared(engine).flush()
    return shared(engine)


@pytest.fixture(scope="module")
def master() -> Iterator[MooncakeMaster]:
    if not HAVE_MOONCAKE or find_mooncake_master() is None:
        pytest.skip("the mooncake extra is not installed (no mooncake module or mooncake_master)")
    with MooncakeMaster() as m:
        yield m


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> dict[int, list[int]]:
    """Greedy tokens of the prompts without any cache reuse."""
    cfg = EngineConfig(num_kv_blocks=64, block_size=BS, enable_prefix_caching=False)
    engine = LLMEngine.from_pretrained(tiny_ckpt, torch.float32, cfg)
    return {s: generate(engine, f"ref{s}", prompt(s)) for s in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)}


def test_config_names_what_is_wrong() -> None:
    with pytest.raises(EngineConfigError, match="kv_store must be one of none, mooncake"):
        EngineConfig(kv_store="redis")
    with pytest.raises(EngineConfigError, match="needs kv_store_master"):
        EngineConfig(kv_store="mooncake")
    with pytest.raises(EngineConfigError, match="HOST:PORT.*'nohost'"):
        EngineConfig(kv_store="mooncake", kv_store_master="nohost")
    with pytest.raises(EngineConfigError, match="needs prefix caching"):
        EngineConfig(kv_store="mooncake", kv_store_master="h:1", enable_prefix_caching=False)
    cfg = EngineConfig(kv_store="mooncake", kv_store_master="10.0.0.5:50051")
    assert cfg.kv_store_metadata_url == "http://10.0.0.5:8080/metadata"
    assert cfg.kv_store_put_on_compute


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the mooncake package the error names the extra that installs it (never a bare import
    error)."""
    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'k2serve\[mooncake\]'") as e:
        MooncakeStore(MooncakeSettings("127.0.0.1:1", "http://127.0.0.1:1/metadata", 1 << 20, 1 << 20))
    assert e.value.extra == "mooncake"


@needs_mooncake
def test_evicted_blocks_reload_from_the_store(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """Put on eviction only: prompt 10's blocks leave the pool into the store and come back from it."""
    engine = store_engine(tiny_ckpt, master, kv_store_put_on_compute=False)
    tiers = shared(engine)
    assert generate(engine, "a", prompt(10)) == reference[10]
    assert tiers.stats.offload_bytes[STORE_TIER] == 0  # nothing put before an eviction
    evict(engine, 10)
    assert tiers.flush()
    bb = engine.pool.bytes_per_block
    assert tiers.stats.offload_bytes[STORE_TIER] >= 4 * bb
    before = engine.num_computed_tokens_total
    assert generate(engine, "a2", prompt(10)) == reference[10]
    assert tiers.stats.hit_tokens[STORE_TIER] == PREFIX_TOKENS
    assert tiers.stats.reload_bytes[STORE_TIER] == 4 * bb
    assert engine.num_computed_tokens_total - before == 40 - PREFIX_TOKENS + GREEDY.max_tokens - 1
    assert tiers.store.errors == 0 and tiers.stats.corrupt_blocks == 0
    engine.blocks.check_invariants([])
    tiers.close()


@needs_mooncake
def test_long_prefix_is_looked_up_and_read_in_batches(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """A prefix of many store blocks costs a few store calls, not one or two per block (a 32K-token
    context is ~2,000 blocks): the lookups go in one batch_is_exist, the reads in get_batch calls of at
    most read_batch_blocks blocks; the tokens are the reference's."""
    engine = store_engine(tiny_ckpt, master)
    tiers = computed_then_evicted(engine, 100, reference)
    tiers.read_batch_blocks = 3  # the 4 blocks of the prefix: two reads (3 + 1)
    calls: dict[str, list[int]] = {"exists": [], "exists_many": [], "get": [], "get_many": []}
    for name in calls:
        fn = getattr(tiers.store, name)

        def counted(keys: Any, *a: Any, fn: Any = fn, name: str = name) -> Any:
            calls[name].append(len(keys) if isinstance(keys, list) else 1)
            return fn(keys, *a)

        setattr(tiers.store, name, counted)
    assert generate(engine, "a2", prompt(100)) == reference[100]
    assert tiers.stats.hit_tokens[STORE_TIER] == PREFIX_TOKENS
    assert calls["exists"] == [] and calls["get"] == []
    assert calls["exists_many"][0] == 4 and calls["get_many"] == [3, 1]
    engine.blocks.check_invariants([])
    tiers.close()


@needs_mooncake
def test_store_reload_is_asynchronous_and_decode_runs_meanwhile(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """With the asynchronous tiers (the default) a store hit is read on the reader thread: while the
    store's gets are held, the decoding request keeps producing a token per step and the reloading one
    waits; then both give the reference tokens, the reloaded prefix from the store."""
    engine = store_engine(tiny_ckpt, master)
    tiers = computed_then_evicted(engine, 60, reference)
    assert engine.reloads is not None and tiers.async_io  # the store does not turn async off
    engine.add_request("d", prompt(70), GREEDY)
    engine.step()  # d's prefill and first token
    gate, reading = threading.Event(), threading.Event()
    get_many = tiers.store.get_many  # a prefix's blocks are read in batches

    def slow_get_many(keys: list[str]) -> list[bytes | None]:
        assert threading.current_thread() is not threading.main_thread()  # never on the engine's
        reading.set()
        gate.wait(30)
        return get_many(keys)

    tiers.store.get_many = slow_get_many  # type: ignore[method-assign]
    engine.add_request("a2", prompt(60), GREEDY)
    got: dict[str, list[int]] = {}
    for _ in range(3):
        assert [o.request_id for o in engine.step()] == ["d"]  # d decodes, a2 waits for its reload
        assert engine.reloads.in_flight == 1
    assert reading.wait(30) and len(engine.seqs["d"].output_token_ids) == 4
    gate.set()
    while engine.has_unfinished_requests():
        got |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    assert got == {"a2": reference[60], "d": reference[70]}
    assert engine.reloads.started_total == 1 and engine.reloads.timeouts_total == 0
    assert tiers.stats.hit_tokens[STORE_TIER] == PREFIX_TOKENS
    engine.blocks.check_invariants([])
    tiers.close()


@needs_mooncake
def test_synchronous_store_reload_gives_the_same_tokens(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """--no-kv-offload-async: the store's get runs inside the step; same tokens, same hits."""
    engine = store_engine(tiny_ckpt, master, kv_offload_async=False)
    tiers = computed_then_evicted(engine, 80, reference)
    assert engine.reloads is None and not tiers.async_io
    assert generate(engine, "a2", prompt(80)) == reference[80]
    assert tiers.stats.hit_tokens[STORE_TIER] == PREFIX_TOKENS
    engine.blocks.check_invariants([])
    tiers.close()


@needs_mooncake
def test_store_below_a_host_tier_reloads_from_both(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """Local host tier + store, asynchronous: a prefix whose first blocks are in the host tier and the
    rest only in the store reloads all of them (host first, the store after) with the reference tokens;
    the KV events of the host tier's blocks name "host"."""
    engine = store_engine(tiny_ckpt, master, kv_offload_host_bytes=1 << 30)
    tiers = computed_then_evicted(engine, 90, reference)
    assert engine.reloads is not None
    hashes = chain_hashes(prompt(90), BS)[:4]
    assert all(tiers.tier_of(h) == "host" for h in hashes)
    assert dict(tiers.held()).get(hashes[0]) == "host"
    for h in hashes[2:]:  # only the store has these now
        assert tiers.host is not None and tiers.host.hashes().count(h) == 1
        tiers.host._blocks.pop(h)
    assert [tiers.tier_of(h) for h in hashes] == ["host", "host", None, None]
    assert generate(engine, "a2", prompt(90)) == reference[90]
    assert tiers.stats.hit_tokens["host"] == 2 * BS
    assert tiers.stats.hit_tokens[STORE_TIER] == 2 * BS
    engine.blocks.check_invariants([])
    tiers.close()


@needs_mooncake
def test_second_engine_prefills_from_the_first_ones_blocks(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """Two engines (two workers) on one store: B's prefill of the prompt A computed fetches A's blocks
    (put on compute, A never evicted them) and gives the same tokens."""
    a = store_engine(tiny_ckpt, master)
    b = store_engine(tiny_ckpt, master)
    assert shared(a).prefix == shared(b).prefix  # same model, dtype and layout: one namespace
    assert generate(a, "a", prompt(20)) == reference[20]
    assert shared(a).flush()
    assert all(h in a.blocks._hash_to_block for h in chain_hashes(prompt(20), BS))  # never evicted
    before = b.num_computed_tokens_total
    assert generate(b, "b", prompt(20)) == reference[20]
    assert shared(b).stats.hit_tokens[STORE_TIER] == PREFIX_TOKENS
    assert b.num_computed_tokens_total - before == 40 - PREFIX_TOKENS + GREEDY.max_tokens - 1
    assert shared(a).stats.hit_tokens[STORE_TIER] == 0
    b.blocks.check_invariants([])
    for e in (a, b):
        shared(e).close()


@needs_mooncake
def test_other_model_or_dtype_gets_another_namespace(tiny_ckpt: Path, master: MooncakeMaster) -> None:
    a = store_engine(tiny_ckpt, master)
    other_dtype = LLMEngine.from_pretrained(tiny_ckpt, torch.bfloat16, a.config)
    fp8 = store_engine(tiny_ckpt, master, kv_cache_dtype="fp8")
    prefixes = {shared(e).prefix for e in (a, other_dtype, fp8)}
    assert len(prefixes) == 3
    for e in (a, other_dtype, fp8):
        shared(e).close()


@needs_mooncake
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_store_entry_means_recompute(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]], damage: str
) -> None:
    """Block 2 of prompt 30/40 in the store fails its checksum, or vanishes between lookup and get: the
    cached prefix ends before it (block 1 still comes from the store), the rest is recomputed."""
    seed = 30 if damage == "corrupt" else 40
    a = store_engine(tiny_ckpt, master)
    b = store_engine(tiny_ckpt, master)
    assert generate(a, "a", prompt(seed)) == reference[seed]
    assert shared(a).flush()
    h = chain_hashes(prompt(seed), BS)[1]
    key = shared(a).key(h)
    client = shared(a).store._store  # the raw Mooncake client
    assert client.remove(key, True) == 0
    if damage == "corrupt":
        payload = bytearray(a.pool.bytes_per_block)
        frame = bytearray(pack_block(bytes(payload)))
        frame[-1] ^= 0xFF  # the checksum no longer matches
        assert client.put(key, bytes(frame)) == 0
    else:
        shared(b)._known[h] = (True, time.monotonic() + 60)  # looked up just before it was evicted
    assert generate(b, "b", prompt(seed)) == reference[seed]
    assert shared(b).stats.hit_tokens[STORE_TIER] == BS
    assert shared(b).stats.corrupt_blocks == 1
    # the bad entry was removed and b's recomputed block put in its place: the store is healed
    assert shared(b).flush()
    healed = shared(a).store.get(key)
    assert healed is not None and unpack_block(healed) is not None
    for e in (a, b):
        shared(e).close()


class _DictStore:
    """A BlockStore in a dict, puts done at once (no Mooncake): for SharedTiers' own bookkeeping."""

    errors = 0

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def exists(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, done: Any = None) -> bool:
        self.data[key] = value
        if done is not None:
            done(0.0)
        return True

    def put_many(self, items: Any) -> bool:
        return all([self.put(*item) for item in items])

    def remove(self, key: str) -> None:
        self.data.pop(key, None)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        pass


def test_store_events_keep_each_hash_latest_event_and_stay_bounded() -> None:
    """SharedTiers' events for the router without a real store: a put, a lookup that misses, a miss then
    a put of the same hash (recomputed: ends as a put), a put then a miss (evicted: ends as a miss); the
    snapshot forgets a missed hash; at most max_store_events are kept between drains."""
    from k2serve.kvcache.pool import KVCachePool
    from k2serve.kvcache.tiers import KVTiers

    pool = KVCachePool(num_layers=2, num_blocks=6, block_size=4, kv_dim=5, dtype=torch.float32)
    store = _DictStore()
    tiers = SharedTiers(KVTiers(pool), store, "ns", miss_ttl_s=0.0, max_store_events=5)
    assert tiers.store_id == "k2kv/ns/" and tiers.capacity_blocks == 0  # defaults
    tiers.computed(1, 0)  # put on compute
    assert not tiers.contains(2)  # a lookup that misses
    assert not tiers.contains(3)
    tiers.computed(3, 1)  # then computed and put
    tiers.computed(4, 2)
    store.remove(tiers.key(4))  # the store dropped it: the next lookup misses
    assert not tiers.contains(4)
    assert tiers.drain_store_events() == ([3], [2, 4])  # bounded: block 1's put, the oldest of 6 events, went
    assert tiers.stored_hashes() == [1, 3]  # 4 went with its miss
    assert tiers.drain_store_events() == ([], [])
    assert tiers.contains(1) and tiers.drain_store_events() == ([], [])  # a hit publishes nothing


@needs_mooncake
def test_store_puts_and_misses_are_published_for_the_router(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """What a worker tells the router's index of the store (SharedTiers.drain_store_events): A's
    successful puts of a prompt's blocks (and its snapshot, stored_hashes); B's lookup of a block the
    store lost is a miss, and the block B recomputes and puts again ends as a put; the id and capacity
    every worker of the store shares."""
    a = store_engine(tiny_ckpt, master)
    b = store_engine(tiny_ckpt, master)
    assert shared(a).store_id == shared(b).store_id == f"mooncake://{master.address}/{shared(a).prefix[5:-1]}"
    assert shared(a).capacity_blocks == (32 << 20) // (a.pool.bytes_per_block + 32)  # 32-byte frame header
    assert generate(a, "a", prompt(50)) == reference[50]
    assert shared(a).flush()
    hashes = chain_hashes(prompt(50), BS)[: PREFIX_TOKENS // BS]
    puts, misses = shared(a).drain_store_events()
    assert puts[: len(hashes)] == hashes and misses == []  # the prompt's full blocks, in order
    assert shared(a).stored_hashes()[: len(hashes)] == hashes
    assert shared(a).drain_store_events() == ([], [])  # drained
    assert shared(a).store._store.remove(shared(a).key(hashes[2]), True) == 0  # the store lost block 2
    assert generate(b, "b", prompt(50)) == reference[50]
    assert shared(b).stats.hit_tokens[STORE_TIER] == 2 * BS
    assert shared(b).flush()
    puts, misses = shared(b).drain_store_events()
    assert hashes[2] in puts and hashes[2] not in misses  # missed, then recomputed and put again
    assert not set(hashes[:2]) & set(puts)  # fetched, not put again
    b.blocks.check_invariants([])
    for e in (a, b):
        shared(e).close()


@needs_mooncake
def test_master_down_means_recompute_and_the_engine_stays_up(
    tiny_ckpt: Path, reference: dict[int, list[int]]
) -> None:
    """A master killed after the blocks were put: lookups fail within the timeout, the engine recomputes
    with the same tokens, counts the errors, and serves on; an engine started while the master is down
    serves too, and picks the store up once a master answers."""
    with MooncakeMaster() as m:
        a = store_engine(tiny_ckpt, m, kv_store_put_on_compute=False)
        assert generate(a, "a", prompt(50)) == reference[50]
        evict(a, 50)
        assert shared(a).flush()
        m.kill()
        shared(a)._known.clear()
        t0 = time.monotonic()
        assert generate(a, "a2", prompt(50)) == reference[50]
        assert time.monotonic() - t0 < 30
        assert shared(a).stats.hit_tokens[STORE_TIER] == 0
        assert shared(a).store.errors >= 1
        assert generate(a, "a3", prompt(10)) == reference[10]
        shared(a).close()

        b = store_engine(tiny_ckpt, m)  # the master is still down
        assert not shared(b).store.connected and shared(b).store.errors >= 1
        assert generate(b, "b", prompt(10)) == reference[10]
        shared(b).close()


@needs_mooncake
def test_client_connects_once_the_master_answers() -> None:
    m = MooncakeMaster()
    store = MooncakeStore(
        MooncakeSettings(m.address, m.metadata_url, 16 << 20, 16 << 20, timeout_s=0.5, retry_s=0.2),
        connect_wait_s=2.0,
    )
    try:
        assert not store.connected and store.errors >= 1
        assert store.get("k") is None and not store.exists("k")
        m.start()
        assert store.wait_connected(20.0)
        assert store.put("k", b"value")
        assert store.flush()
        deadline = time.monotonic() + 10  # the master may first refuse a put while the segment mounts
        while not store.exists("k") and time.monotonic() < deadline:
            store.put("k", b"value")
            store.flush()
            time.sleep(0.1)
        assert store.get("k") == b"value"
    finally:
        store.close()
        m.stop()


@needs_mooncake
def test_metrics_label_the_store_tier(
    tiny_ckpt: Path, master: MooncakeMaster, reference: dict[int, list[int]]
) -> None:
    """A worker's /metrics: hit tokens and reload bytes under tier="mooncake", store errors counted."""
    import asyncio

    from k2serve.chat.tokenizer import load_tokenizer
    from k2serve.engine.async_engine import AsyncEngine
    from k2serve.engine.protocol import GenerateRequest

    a = store_engine(tiny_ckpt, master)
    b = store_engine(tiny_ckpt, master)
    assert generate(a, "a", prompt(20)) == reference[20]
    assert shared(a).flush()
    b.tokenizer = load_tokenizer(tiny_ckpt)
    be = AsyncEngine(b, "tiny", engine_id="e0")
    be.start()

    async def run() -> list[int]:
        out: list[int] = []
        async for ev in await be.generate(GenerateRequest("b", prompt(20), GREEDY, None, None)):
            out += ev.token_ids
        return out

    try:
        assert asyncio.run(run()) == reference[20]
        got = tier_samples(be.metrics.registry)
    finally:
        be.shutdown()
    assert got[("k2serve_kv_tier_hit_tokens_total", STORE_TIER)] == PREFIX_TOKENS
    assert got[("k2serve_kv_reload_bytes_total", STORE_TIER)] == 4 * b.pool.bytes_per_block
    assert got[("k2serve_kv_store_errors_total", None)] == 0
    for e in (a, b):
        shared(e).close()


def test_cli_flags_reach_the_engine_config_and_up(tmp_path: Path) -> None:
    from k2serve.cli import build_parser
    from k2serve.cli.settings import cluster_spec, engine_config

    parser = build_parser()
    ns = parser.parse_args(
        ["prefill", "--model", str(tmp_path), "--kv-store", "mooncake", "--kv-store-master", "m:7"]
        + ["--kv-store-segment-mb", "64", "--no-kv-store-put-on-compute"]
    )
    cfg = engine_config(ns)
    assert (cfg.kv_store, cfg.kv_store_master, cfg.kv_store_segment_bytes) == ("mooncake", "m:7", 64 << 20)
    assert not cfg.kv_store_put_on_compute and cfg.kv_store_metadata_url == "http://m:8080/metadata"
    assert engine_config(parser.parse_args(["prefill", "--model", str(tmp_path)])).kv_store == "none"
    up = parser.parse_args(
        ["up", "--model", str(tmp_path), "--kv-store", "mooncake", "--kv-store-segment-mb", "64"]
    )
    spec = cluster_spec(up)
    assert spec.mooncake_master  # no --kv-store-master: `up` runs one
    assert spec.engine_args[-4:] == ("--kv-store", "mooncake", "--kv-store-segment-mb", "64")
    given = parser.parse_args(
        ["up", "--model", str(tmp_path), "--kv-store", "mooncake", "--kv-store-master", "m:7"]
    )
    assert not cluster_spec(given).mooncake_master
    assert "--kv-store-master" in cluster_spec(given).engine_args
    ray = parser.parse_args(["up", "--model", str(tmp_path), "--ray", "auto", "--kv-store", "mooncake"])
    with pytest.raises(ValueError, match="--ray with --kv-store mooncake needs --kv-store-master"):
        ray.handler(ray)


@needs_mooncake
def test_up_starts_a_local_master_and_always_stops_it(tmp_path: Path) -> None:
    from k2serve.cli import build_parser
    from k2serve.cli.settings import cluster_spec
    from k2serve.cluster.local import LocalCluster

    up = build_parser().parse_args(
        ["up", "--model", str(tmp_path), "--workdir", str(tmp_path / "w"), "--kv-store", "mooncake"]
    )
    cluster = LocalCluster(cluster_spec(up))
    try:
        cluster.start_mooncake_master()
        master = cluster.mooncake
        assert master is not None and master.running
        args = cluster.spec.worker_args("prefill", "prefill-0", "127.0.0.1", "127.0.0.1:1")
        at = args.index("--kv-store-master")
        assert args[at + 1] == master.address and args[at + 3] == master.metadata_url
        assert re.search(rf"mooncake_master +{master.pid} +{master.address}", cluster.status_table())
        store = MooncakeStore(MooncakeSettings(master.address, master.metadata_url, 16 << 20, 16 << 20))
        assert store.connected  # the workers' client reaches it
        store.close()
    finally:
        cluster.stop()
    assert cluster.mooncake is None and not master.running


def test_block_manager_reports_each_computed_block_once() -> None:
    """The put-on-compute hook: every block `mark_computed` registers, once, and never a private
    duplicate of a block another sequence computed at the same time."""
    from k2serve.kvcache.block_manager import BlockManager

    bm = BlockManager(8, BS)
    seen: list[tuple[int, int]] = []
    bm.on_computed = lambda h, block: seen.append((h, block))
    tokens = prompt(7, 24)
    a = bm.allocate(tokens).block_table
    b = bm.allocate(tokens).block_table  # computed concurrently: nothing cached yet
    bm.mark_computed(a, tokens, 16)
    bm.mark_computed(a, tokens, 24)
    bm.mark_computed(b, tokens, 24)  # b's blocks stay private: the map keeps a's
    hashes = chain_hashes(tokens, BS)
    assert seen == list(zip(hashes, a, strict=True))


@needs_mooncake
@pytest.mark.slow
def test_two_prefill_workers_share_blocks_through_the_store(
    tiny_ckpt: Path, tmp_path: Path, reference: dict[int, list[int]]
) -> None:
    """A real `up` cluster: 2 prefill workers, round-robin routing, its own mooncake_master. The same
    prompt twice: the first worker computes it (and puts its blocks), the second prefills it from the
    store (hit tokens under tier="mooncake" on its /metrics) with the same greedy tokens."""
    import httpx
    from conftest import local_cluster_spec
    from test_kv_cluster import _metric

    from k2serve.cluster.local import LocalCluster, registered_workers
    from k2serve.engine.kv_tiers import store_namespace
    from k2serve.kvcache.shared_tier import KEY_PREFIX

    engine_args = ("--kv-cache-mb", "32", "--block-size", str(BS), "--kv-store", "mooncake")
    engine_args += ("--kv-store-segment-mb", "32", "--kv-store-local-hostname", "127.0.0.1")
    spec = local_cluster_spec(
        tiny_ckpt,
        tmp_path,
        num_prefill=2,
        engine_args=engine_args,
        router_args=("--routing-policy", "round-robin"),
        mooncake_master=True,
    )
    # the key of the prompt's last cached block, in the namespace the workers compute (same model,
    # dtype and pool layout), to see the first worker's puts land
    local = LLMEngine.from_pretrained(tiny_ckpt, torch.float32, EngineConfig(num_kv_blocks=8, block_size=BS))
    namespace = store_namespace(local.model, local.pool, local.config)
    last_key = f"{KEY_PREFIX}/{namespace}/{chain_hashes(prompt(10), BS)[PREFIX_TOKENS // BS - 1]:016x}"
    with LocalCluster(spec) as cluster:
        assert cluster.mooncake is not None and cluster.mooncake.running
        m = cluster.mooncake
        store = MooncakeStore(MooncakeSettings(m.address, m.metadata_url, 16 << 20, 16 << 20))

        def prefill_workers() -> list[dict[str, Any]]:
            return [w for w in registered_workers(cluster.http_url, None) if w["role"] == "prefill"]

        stores = {w["kv_store"] for w in prefill_workers()}
        assert len(stores) == 1 and stores.pop().startswith(f"mooncake://{m.address}/")

        def prefill_metric(name: str) -> list[float]:
            urls = [w["metrics_url"] for w in cluster.workers() if w["role"] == "prefill"]
            return sorted(_metric(httpx.get(u, timeout=10).text, name, tier=STORE_TIER) for u in urls)

        outs = []
        with httpx.Client(base_url=cluster.http_url, timeout=120) as client:
            for i in range(2):
                body = {"model": tiny_ckpt.name, "prompt": prompt(10), "max_tokens": GREEDY.max_tokens}
                body |= {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                outs.append(list(r.json()["choices"][0]["token_ids"]))
                deadline = time.monotonic() + 30  # the first prefill's background puts are done
                while i == 0 and not store.exists(last_key):
                    assert time.monotonic() < deadline, (
                        "the first prefill worker's blocks are not in the store"
                    )
                    time.sleep(0.1)
                # ... and the router's index of the store has them, for both workers of the store
                while i == 0 and min(w["kv_store_index_blocks"] for w in prefill_workers()) < 4:
                    assert time.monotonic() < deadline, (
                        f"the router's index misses the puts: {prefill_workers()}"
                    )
                    time.sleep(0.1)
        store.close()
        hits = prefill_metric("k2serve_kv_tier_hit_tokens_total")
        master = cluster.mooncake
    assert outs == [reference[10], reference[10]]
    assert hits == [0.0, PREFIX_TOKENS]
    assert not master.running  # stopped with the cluster


def _router_with_store(store_id: str, capacity_blocks: int) -> RegistryServicer:
    """A router's registry with prefill workers "a" and "b" registered on the shared store `store_id`."""
    reg = RegistryServicer(WorkerTable(5.0, lambda address: None))  # type: ignore[arg-type,return-value]
    for i, wid in enumerate(("a", "b")):
        info = registry_pb2.WorkerInfo(
            worker_id=wid,
            role=registry_pb2.WORKER_ROLE_PREFILL,
            grpc_address=f"127.0.0.1:{10 + i}",
            block_size=BS,
            ready=True,
            publishes_kv_events=True,
            kv_store=store_id,
            kv_store_capacity_blocks=capacity_blocks,
        )
        asyncio.run(reg.Register(info, None))  # type: ignore[arg-type]
    return reg


def _store_beat(reg: RegistryServicer, worker_id: str, puts: list[int], misses: list[int]) -> None:
    """A heartbeat of `worker_id` carrying its store events (as KVEventPublisher sends them)."""
    events = registry_pb2.KVEvents(store_puts=puts, store_misses=misses)
    beat = registry_pb2.HeartbeatRequest(worker_id=worker_id, ready=True, kv_events=events)
    assert asyncio.run(reg.Heartbeat(beat, None)).known  # type: ignore[arg-type]


@needs_mooncake
@pytest.mark.slow  # waits out the store's 5 s lease and its background eviction; 2 min on a loaded box
def test_a_full_store_evicts_silently_and_the_router_forgets_on_the_miss(
    tiny_ckpt: Path, reference: dict[int, list[int]]
) -> None:
    """A store that is really full: its own master, one 16 MiB segment (Mooncake's smallest). A puts
    the blocks of four prompts (the router's index learns them from A's heartbeat), then fills the store
    with other values until the store has evicted some of those blocks, without telling anyone. B (no
    put on compute, so its events end with the misses) prefills a prompt whose blocks were evicted: its
    lookup finds them missing, it recomputes them and gives the reference's tokens, and its heartbeat's
    miss events make the router's index drop them, while the blocks no lookup missed stay indexed."""
    seeds = (10, 20, 30, 40)
    with MooncakeMaster() as m:
        a = store_engine(tiny_ckpt, m, kv_store_segment_bytes=16 << 20)
        for s in seeds:
            assert generate(a, f"a{s}", prompt(s)) == reference[s]
        assert shared(a).flush()
        hashes = {s: chain_hashes(prompt(s), BS)[: PREFIX_TOKENS // BS] for s in seeds}
        tracked = [h for s in seeds for h in hashes[s]]
        puts, _ = shared(a).drain_store_events()
        assert set(tracked) <= set(puts)
        store_id = shared(a).store_id
        reg = _router_with_store(store_id, shared(a).capacity_blocks)
        _store_beat(reg, "a", puts, [])
        index = reg.table.kv_index
        assert all(index.in_store(store_id, h) for h in tracked)
        # fill it with 16 MiB of other values, once the blocks' leases ran out (Mooncake's default lease
        # is 5 s; it evicts no entry under lease, and the least recently used first), not looking at
        # the blocks meanwhile (a lookup uses them); once full it evicts some entries and refuses puts
        time.sleep(6.0)
        for i in range(64):
            shared(a).store.put(f"filler/{i}", bytes(256 << 10))
            if i % 8 == 7:
                assert shared(a).store.flush(30)
        # the master evicts in a background thread: a few more puts over 4 s give it the time, still
        # without looking at the blocks (a lookup of them would make them the last to go)
        for i in range(64, 72):
            time.sleep(0.5)
            shared(a).store.put(f"filler/{i}", bytes(256 << 10))
            assert shared(a).store.flush(30)
        client = shared(a).store._store  # the raw Mooncake client
        evicted = [h for h in tracked if client.is_exist(shared(a).key(h)) != 1]
        fill = [client.is_exist(f"filler/{i}") for i in range(72)]
        assert evicted, (
            f"the store evicted none of the blocks; fillers kept {fill}, {shared(a).store.errors} errors"
        )
        assert all(index.in_store(store_id, h) for h in tracked)  # nobody told the router
        seed = next(s for s in seeds if set(hashes[s]) & set(evicted))
        b = store_engine(tiny_ckpt, m, kv_store_segment_bytes=16 << 20, kv_store_put_on_compute=False)
        assert generate(b, "b", prompt(seed)) == reference[seed]
        first_gone = next(i for i, h in enumerate(hashes[seed]) if h in evicted)
        assert shared(b).stats.hit_tokens[STORE_TIER] <= first_gone * BS  # nothing past the hole
        _, misses = shared(b).drain_store_events()
        assert hashes[seed][first_gone] in misses and set(misses) <= set(evicted)
        _store_beat(reg, "b", [], misses)
        assert not any(index.in_store(store_id, h) for h in misses)
        # the other prompts' blocks, kept or evicted, are no lookup's miss: the index keeps them (an
        # evicted one is a stale entry until a lookup misses it, which costs one recompute)
        others = [h for h in tracked if h not in misses]
        assert len(others) >= 12 and all(index.in_store(store_id, h) for h in others)
        b.blocks.check_invariants([])
        for e in (a, b):
            shared(e).close()
