"""KV tiers at shutdown (kvcache/tiers.py, kvcache/shared_tier.py, LLMEngine.close via
AsyncEngine.shutdown): block writes still queued for the disk when the engine is shut down are on disk
when shutdown returns, and the next engine on the same directory (same model: same namespace) reloads
them with the reference's tokens; a directory of another namespace is never read; a stuck disk writer
or a stuck store put cannot hold shutdown longer than its timeout; the store's queued puts run first."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_kv_tiers import BS, generate, make_engine, prompt
from test_kv_tiers_async import gate_disk_writes

from k2serve.engine.async_engine import AsyncEngine
from k2serve.kvcache.hashing import chain_hashes
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.shared_tier import MooncakeSettings, MooncakeStore, SharedTiers
from k2serve.kvcache.tiers import NAMESPACE_FILE, DiskTier, KVTiers, pack_block

BIG = 1 << 30


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> list[int]:
    """Greedy tokens of prompt 1 without any cache reuse."""
    return generate(make_engine(tiny_ckpt, enable_prefix_caching=False, num_kv_blocks=64), "ref", prompt(1))


def test_queued_writes_reach_disk_at_shutdown_and_the_next_engine_reloads_them(
    tiny_ckpt: Path, tmp_path: Path, reference: list[int]
) -> None:
    kw: dict[str, Any] = {"kv_offload_dir": str(tmp_path), "kv_offload_disk_bytes": BIG}
    engine = make_engine(tiny_ckpt, **kw)
    assert engine.tiers is not None and engine.tiers.async_io and engine.tiers.host is None
    _, release = gate_disk_writes(engine.tiers)
    assert generate(engine, "a", prompt(1)) == reference
    for s in (2, 3, 4):  # push prompt 1's blocks out of the 12-block pool: queued for the disk
        generate(engine, f"x{s}", prompt(s))
    hashes = chain_hashes(prompt(1), BS)[:4]  # (40 - 1) // 8 = 4 full prefix blocks
    assert engine.tiers.write_queue_depth >= 4
    assert not any(engine.tiers.disk.path(h).exists() for h in hashes)
    backend = AsyncEngine(engine, "tiny")
    threading.Timer(0.3, release.set).start()  # the writes go on only once shutdown has begun
    backend.shutdown()
    assert engine.tiers.write_queue_depth == 0
    assert all(engine.tiers.disk.path(h).exists() for h in hashes)
    assert (tmp_path / NAMESPACE_FILE).exists()

    again = make_engine(tiny_ckpt, **kw)  # a new process's engine on the same directory
    assert again.tiers is not None and again.tiers.disk is not None
    assert again.tiers.disk.adopted == len(list(tmp_path.glob("*.kvblock"))) >= 4
    before = again.num_computed_tokens_total
    assert generate(again, "a2", prompt(1)) == reference
    assert again.tiers.stats.hit_tokens["disk"] == 32
    assert again.num_computed_tokens_total - before == 40 - 32 + 8 - 1  # the rest and 7 decode steps
    again.blocks.check_invariants([])
    assert again.close() and again.close()  # idempotent


def test_disk_tier_adopts_only_its_own_namespace(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 3, namespace="model-a")
    for h in (1, 2, 3):
        disk.put(h, bytes([h]) * 16)
        time.sleep(0.01)  # distinct modification times: the LRU order comes from them
    (tmp_path / "not-a-block.txt").write_text("left alone")
    same = DiskTier(tmp_path, 2, namespace="model-a")  # smaller: the oldest file goes
    assert same.adopted == 2 and same.hashes() == [2, 3] and not same.path(1).exists()
    assert same.get(3) == bytes([3]) * 16
    assert DiskTier(tmp_path, 8).hashes() == []  # no namespace: never reads what it did not write
    other = DiskTier(tmp_path, 8, namespace="model-b")
    assert other.adopted == 0 and other.hashes() == [] and not list(tmp_path.glob("*.kvblock"))
    assert (tmp_path / NAMESPACE_FILE).read_text().strip() == "model-b"
    assert (tmp_path / "not-a-block.txt").exists()
    assert DiskTier(tmp_path, 8, namespace="model-a").adopted == 0


def test_close_with_a_stuck_writer_returns_within_its_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = KVCachePool(2, 4, 4, 8, torch.float32)
    tiers = KVTiers(pool, disk_dir=tmp_path, disk_bytes=BIG, async_io=True, write_queue_blocks=4)
    writing, release = gate_disk_writes(tiers)
    assert tiers.offload(11, 0) and writing.wait(30)  # the writer holds it (stuck)
    assert tiers.offload(12, 1) and tiers.write_queue_depth == 2  # and one queued behind it
    try:
        with caplog.at_level(logging.WARNING, logger="k2serve.kvcache.tiers"):
            t0 = time.monotonic()
            assert not tiers.close(timeout_s=0.5)
            assert time.monotonic() - t0 < 5.0
        assert "queued block writes not done" in caplog.text
    finally:
        release.set()


class _FakeClient:
    """A Mooncake client whose puts take `put_s` seconds each, or hang until `hang` is set."""

    def __init__(self, put_s: float = 0.0, hang: threading.Event | None = None) -> None:
        self.put_s, self.hang = put_s, hang
        self.puts: list[str] = []
        self.closed = False

    def put(self, key: str, value: bytes) -> int:
        if self.hang is not None:
            self.hang.wait(30)
        time.sleep(self.put_s)
        self.puts.append(key)
        return 0

    def close(self) -> None:
        self.closed = True


def _store_with(client: _FakeClient, max_pending_bytes: int = 256 << 20) -> MooncakeStore:
    """A MooncakeStore (the `mooncake` extra's client class is only imported) whose client is `client`:
    its master address is a closed port, so the background connect fails and never replaces it."""
    pytest.importorskip("mooncake.store", reason="the mooncake extra is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = MooncakeSettings(
        f"127.0.0.1:{port}",
        "http://127.0.0.1:1/metadata",
        1 << 20,
        1 << 20,
        retry_s=0,
        max_pending_bytes=max_pending_bytes,
    )
    store = MooncakeStore(settings, connect_wait_s=5.0)
    assert not store.connected
    store._store = client
    return store


def test_store_close_runs_the_queued_puts_first() -> None:
    client = _FakeClient(put_s=0.05)
    store = _store_with(client)
    assert all(store.put(f"k{i}", b"v") for i in range(4))
    assert store.close(timeout_s=10.0)
    assert client.puts == ["k0", "k1", "k2", "k3"] and client.closed


def test_store_close_with_a_stuck_put_returns_within_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    hang = threading.Event()
    client = _FakeClient(hang=hang)
    store = _store_with(client)
    assert store.put("k0", b"v") and store.put("k1", b"v")
    try:
        with caplog.at_level(logging.WARNING, logger="k2serve.kvcache.shared_tier"):
            t0 = time.monotonic()
            assert not store.close(timeout_s=0.5)
            assert time.monotonic() - t0 < 5.0
        assert "queued puts not done" in caplog.text and not client.closed  # never closed under a call
    finally:
        hang.set()


def test_an_eviction_burst_reaches_the_store_whole() -> None:
    """The put queue is bounded in bytes and takes one call's blocks as one batch: a burst of 2,048
    evicted blocks (a 32K-token context of 16-token blocks; the old 256-put queue kept 256 of them)
    queued while the store's put thread is stuck all reach the store once it goes on, in order, and are
    published for the router. A batch arriving while the queue is over its bound is dropped whole and
    counted; once the queue drains the next is admitted."""
    hang = threading.Event()
    client = _FakeClient(hang=hang)
    block_bytes = 2 * 4 * 8 * 4  # 2 layers x 4 tokens x 8 dims x fp32
    frame = len(pack_block(bytes(block_bytes)))
    store = _store_with(client, max_pending_bytes=1000 * frame)  # less than the burst: admitted whole
    pool = KVCachePool(2, 2048, 4, 8, torch.float32)
    tiers = SharedTiers(KVTiers(pool), store, "ns")
    try:
        tiers.offload_many([(10_000 + b, b) for b in range(2048)])  # one step's evictions
        assert store._pending == 2048 and store._pending_bytes == 2048 * frame and store.dropped_puts == 0
        tiers.offload_many([(50_000, 0), (50_001, 1)])  # the queue is over its bound: dropped whole
        tiers.computed(60_000, 2)
        assert store.dropped_puts == 3
        hang.set()
        assert tiers.flush(30.0)
        assert client.puts == [tiers.key(10_000 + b) for b in range(2048)]
        assert store._pending == store._pending_bytes == 0
        puts, misses = tiers.drain_store_events()
        assert puts == [10_000 + b for b in range(2048)] and misses == []
        tiers.offload_many([(50_000, 0), (50_001, 1)])  # dropped ones were not remembered as put
        assert tiers.flush(30.0) and client.puts[-2:] == [tiers.key(50_000), tiers.key(50_001)]
        with pytest.raises(ValueError, match="max_pending_bytes >= 1"):
            MooncakeSettings("127.0.0.1:1", "http://127.0.0.1:1/metadata", 1, 1, max_pending_bytes=0)
    finally:
        hang.set()
        tiers.close(5.0)
