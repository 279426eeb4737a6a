"""The shared KV tier: prefix-cache blocks in a KV store that every worker reaches (Mooncake Store), so
that a block computed once on any prefill worker is fetched, not recomputed, by another.

`SharedTiers` puts the store below a worker's local tiers (kvcache/tiers.py: host LRU, then disk) behind
the block manager's `BlockTiers` interface:

- key: `k2kv/<namespace>/<chain hash, 16 hex digits>`. The chain hash is the prefix-cache block hash
  that the router and every worker share (kvcache/hashing.py); the namespace is a fingerprint of the
  model, the KV cache dtype and the pool's row layout (engine/kv_tiers.py `store_namespace`), so that a
  worker serving another model, dtype or layout never reads these blocks;
- value: the block's latent rows of every layer (raw storage bytes, as the local tiers keep them) framed
  by `pack_block`: a fixed header with the payload length and its XXH3-128 checksum. Never pickle;
- put: when the block manager evicts a block (after the local tiers took their copy) and, with
  `put_on_compute`, as soon as a block's tokens are computed (`computed`), so another worker can hit it
  before this one evicts it: that is what makes cross-worker reuse work. A hash is put once per process
  (a bounded memory of what was put). Puts run on a background thread: the engine step pays the copy
  of the block's rows to host memory, not the network. The put queue is bounded in bytes, and the
  blocks of one call (an eviction burst: every block a step evicts) are queued as one batch, admitted
  whole while the queue is under its bound: a 32K-token context evicted at once reaches the store
  entirely instead of its first few hundred blocks;
- what the router learns (`drain_store_events`, `stored_hashes`): the hashes whose put succeeded and
  the hashes a lookup found missing or bad in the store, drained on the worker's heartbeat into the
  router's index of the store (router/kv_index.py), which places them for every worker of the store;
- lookup: on a prefix miss after the local tiers (`contains`, then `load`). A missing, truncated,
  corrupt or wrong-sized entry, a timeout or a store that is down all end the cached prefix there: the
  rest is recomputed, never served from wrong KV;
- asynchronous reloads (the local tiers' `async_io`, the engine's default): `SharedTiers` has the local
  tiers' batched and asynchronous methods too (`offload_many`, `write_many`, `start_load`, `poll`, ...):
  `start_load` reads each block from the local tiers, else from the store, on the local tiers' reader
  thread, so a store hit never stalls an engine step either (the engine's AsyncReloads gives up a read
  that takes longer than kv_reload_timeout_s).

`MooncakeStore` is the client. Every call runs on a worker thread and is waited for at most `timeout_s`
(a Mooncake call can block for seconds while its master is down); a call that times out or fails with
an RPC error opens a breaker: for `retry_s` no call is made (lookups miss, puts are dropped), then the
next call tries again. The client connects in the background and reconnects the same way, so a worker
whose master is down starts, serves (recomputing) and picks the store up once it answers. Failures are
logged once per outage and counted (`errors`, the `k2serve_kv_store_errors_total` metric).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from k2serve.extras import MissingExtraError
from k2serve.kvcache.tiers import CLOSE_TIMEOUT_S, KVTiers, Loaded, pack_block, run_bounded, unpack_block

__all__ = ["STORE_TIER", "BlockStore", "MooncakeSettings", "MooncakeStore", "SharedTiers", "parse_host_port"]

logger = logging.getLogger(__name__)

STORE_TIER = "mooncake"  # the `tier` label of the shared tier's metrics
KEY_PREFIX = "k2kv"
_RPC_FAIL = -900  # Mooncake's RPC_FAIL: the master did not answer
_T = TypeVar("_T")
# One put: (key, value, called with the put's seconds on the put thread after a success, or None)
PutItem = tuple[str, bytes, "Callable[[float], None] | None"]


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """("host", port) of "HOST:PORT"; ValueError naming `what` and the text when it is not that."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT with a port in 1..65535, got {text!r}")
    return host.strip("[]"), int(port)


class BlockStore(Protocol):
    """What the shared tier needs of a store (MooncakeStore): every method returns at once or within a
    bounded time, and never raises for the store's own failures (it counts them)."""

    errors: int

    def exists(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes | None: ...

    def exists_many(self, keys: Sequence[str]) -> list[bool]: ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def put(self, key: str, value: bytes, done: Callable[[float], None] | None = None) -> bool: ...

    def put_many(self, items: Sequence[PutItem]) -> bool: ...

    def remove(self, key: str) -> None: ...

    def flush(self, timeout_s: float = 10.0) -> bool: ...

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool: ...


@dataclass(frozen=True)
class MooncakeSettings:
    """How to reach a Mooncake Store and what this worker gives it.

    master: the `mooncake_master` RPC address, HOST:PORT. metadata: the transfer engine's metadata
    server, e.g. "http://HOST:8080/metadata" (mooncake_master -enable_http_metadata_server=true serves
    it). segment_bytes: the memory this worker contributes to the store's global pool. buffer_bytes: its
    local transfer buffer (must hold the largest value put or got). local_hostname: the address other
    clients reach this worker's segment at. timeout_s: the longest any store call may stall the caller.
    retry_s: how long the store is left alone after a failure. max_pending_bytes: the values queued
    for the background put thread at most: a batch of puts (`put_many`: an eviction burst) is admitted
    whole while fewer bytes are queued, else dropped whole (the store is a cache), so the queue holds at
    most this plus one batch (default 256 MiB: a 32K-token context of K2-width latent blocks, 2,048 x
    73,760 bytes, is 151 MB)."""

    master: str
    metadata: str
    segment_bytes: int
    buffer_bytes: int
    local_hostname: str = "127.0.0.1"
    timeout_s: float = 1.0
    retry_s: float = 5.0
    max_pending_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        parse_host_port(self.master, "the Mooncake master address")
        if self.segment_bytes < 1 or self.buffer_bytes < 1:
            raise ValueError(
                f"segment and buffer sizes must be >= 1 byte, got {self.segment_bytes}, {self.buffer_bytes}"
            )
        if self.timeout_s <= 0 or self.retry_s < 0 or self.max_pending_bytes < 1:
            raise ValueError(
                f"timeout_s must be > 0, retry_s >= 0, max_pending_bytes >= 1; got {self.timeout_s}, "
                f"{self.retry_s}, {self.max_pending_bytes}"
            )


class MooncakeStore:
    """One Mooncake Store client with bounded calls and a breaker (see the module docstring).

    Raises MissingExtraError naming the `mooncake` extra when its package is not installed.
    `connect_wait_s`: how long the constructor waits for the first connection (it goes on trying in the
    background after that)."""

    def __init__(self, settings: MooncakeSettings, connect_wait_s: float = 10.0) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise MissingExtraError("mooncake", "mooncake", "--kv-store mooncake") from e
        self._factory: Callable[[], Any] = MooncakeDistributedStore
        self.settings = settings
        self.errors = 0  # failed connects, calls that failed, timed out or raised
        self.dropped_puts = 0  # puts not made: store down, or the queue full (counted per value)
        self._lock = threading.Lock()
        self._store: Any = None
        self._connecting: threading.Thread | None = None
        self._down_until = 0.0
        self._pending = 0  # values queued for the put thread
        self._pending_bytes = 0  # their bytes
        self._closed = False
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="k2kv-store-get")
        self._puts = ThreadPoolExecutor(1, thread_name_prefix="k2kv-store-put")
        self._ready()
        thread = self._connecting
        if thread is not None:
            thread.join(connect_wait_s)

    # ---- state -----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether a client is set up (the master may still have gone away since)."""
        return self._store is not None

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a connection (starting an attempt when none is running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready():
                return True
            time.sleep(0.02)
        return self._ready()

    def _ready(self) -> bool:
        """Whether a call may be made now; starts a connection attempt when one is due."""
        if self._closed or time.monotonic() < self._down_until:
            return False
        if self._store is not None:
            return True
        with self._lock:
            if self._connecting is None and self._store is None:
                self._connecting = threading.Thread(
                    target=self._connect, name="k2kv-store-connect", daemon=True
                )
                self._connecting.start()
        return False

    def _connect(self) -> None:
        s = self.settings
        try:
            host, port = parse_host_port(s.master, "the Mooncake master address")
            # A refused or unreachable master fails here at once: setup() itself would retry for ~90 s.
            with socket.create_connection((host, port), timeout=s.timeout_s):
                pass
            store = self._factory()
            rc = store.setup(
                s.local_hostname, s.metadata, s.segment_bytes, s.buffer_bytes, "tcp", "", s.master
            )
            if rc != 0:
                raise OSError(f"MooncakeDistributedStore.setup returned {rc}")
        except OSError as e:
            self._failed(f"cannot connect to the Mooncake master {s.master} (metadata {s.metadata}): {e}")
        else:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._store = store
            if closed:  # closed while connecting: nobody will use it
                store.close()
            else:
                logger.info("KV store: connected to the Mooncake master %s", s.master)
        finally:
            self._connecting = None

    def _failed(self, why: str) -> None:
        """Count a failure and leave the store alone for retry_s (logged once per outage)."""
        with self._lock:
            self.errors += 1
            now = time.monotonic()
            first = now >= self._down_until
            self._down_until = now + self.settings.retry_s
        if first:
            logger.warning("KV store: %s; recomputing, next try in %.1f s", why, self.settings.retry_s)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T | None:
        """fn() on the call thread, waited for at most timeout_s; None (counted) when it failed."""
        try:
            return self._calls.submit(fn).result(timeout=self.settings.timeout_s)
        except FutureTimeout:
            self._failed(f"{what} took longer than {self.settings.timeout_s} s")
        except Exception as e:  # noqa: BLE001 - the store's failure must never reach the engine step
            self._failed(f"{what} failed: {e!r}")
        return None

    # ---- calls -----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether the store has `key` (False when it is down or the call fails)."""
        if not self._ready():
            return False
        rc = self._call("is_exist", lambda: int(self._store.is_exist(key)))
        if rc is not None and rc < 0:
            self._failed(f"is_exist returned {rc}")
        return rc == 1

    def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when it is missing or the store cannot be asked."""
        if not self._ready():
            return None
        data = self._call("get", lambda: bytes(self._store.get(key)))
        return data or None

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether the store has each of `keys`, in one call (Mooncake's batch_is_exist); all False when
        it is down or the call fails."""
        if not keys or not self._ready():
            return [False] * len(keys)
        rcs = self._call("batch_is_exist", lambda: [int(r) for r in self._store.batch_is_exist(list(keys))])
        if rcs is None or len(rcs) != len(keys):
            return [False] * len(keys)
        if any(r < 0 for r in rcs):
            self._failed(f"batch_is_exist returned {min(rcs)}")
        return [r == 1 for r in rcs]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys`, in one call (Mooncake's get_batch), each None when missing; all None
        when the store cannot be asked. The values must fit the client's transfer buffer together."""
        if not keys or not self._ready():
            return [None] * len(keys)
        got = self._call("get_batch", lambda: [bytes(v) for v in self._store.get_batch(list(keys))])
        if got is None or len(got) != len(keys):
            return [None] * len(keys)
        return [v or None for v in got]

    def put(self, key: str, value: bytes, done: Callable[[float], None] | None = None) -> bool:
        """Queue a put of `value` under `key` (a no-op where the key exists: values are immutable);
        returns whether it was queued. `done(seconds)` is called on the put thread after a success."""
        return self.put_many([(key, value, done)])

    def put_many(self, items: Sequence[PutItem]) -> bool:
        """Queue the puts of `items` (key, value, done) as one batch, run in order on the put thread:
        admitted whole while the queue holds fewer than max_pending_bytes (it may end above that by
        this batch), else dropped whole; returns whether it was queued."""
        if not items:
            return True
        if not self._ready():
            self.dropped_puts += len(items)
            return False
        nbytes = sum(len(value) for _, value, _ in items)
        with self._lock:
            if self._pending_bytes >= self.settings.max_pending_bytes:
                self.dropped_puts += len(items)
                return False
            self._pending += len(items)
            self._pending_bytes += nbytes

        def job() -> None:
            for key, value, done in items:
                self._put_one(key, value, done)
                with self._lock:
                    self._pending -= 1
                    self._pending_bytes -= len(value)

        self._submit(self._puts, job)
        return True

    def _put_one(self, key: str, value: bytes, done: Callable[[float], None] | None) -> None:
        """One put on the put thread (never raises: a failure is counted, and opens the breaker when
        the master is unreachable)."""
        t0 = time.perf_counter()
        try:
            if not self._ready():
                self.dropped_puts += 1
                return
            rc = int(self._store.put(key, value))
            if rc == _RPC_FAIL:
                self._failed(f"put returned {rc} (master unreachable)")
            elif rc < 0:
                with self._lock:
                    self.errors += 1
                logger.debug("KV store: put of %s returned %d", key, rc)
            elif done is not None:
                done(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a background put must never kill its thread
            self._failed(f"put failed: {e!r}")

    def remove(self, key: str) -> None:
        """Delete `key` in the background (a corrupt entry, so other workers do not fetch it too)."""
        if self._ready():
            self._submit(self._puts, lambda: self._store.remove(key, True))  # force: past a read lease

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued put has run (at most `timeout_s`); returns whether they all did."""
        try:
            self._submit(self._puts, lambda: None).result(timeout=timeout_s)
        except (FutureTimeout, RuntimeError):
            return False
        return True

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[[], object]) -> Future[object]:
        try:
            return pool.submit(fn)
        except RuntimeError:  # shut down: closed concurrently
            f: Future[object] = Future()
            f.set_exception(RuntimeError("the KV store client is closed"))
            return f

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Run the puts still queued, then stop the threads and close the client, waiting at most
        `timeout_s` in all (at least 0.1 s for the threads once the puts had their time); returns
        whether everything finished. Puts not run by then are dropped (logged). The client is never
        closed under a running call (that crashes it): when one outlives the wait, the client is left
        open. Idempotent."""
        if self._closed:
            return True
        deadline = time.monotonic() + timeout_s
        finished = self.flush(timeout_s)  # before `_closed`: a put job skips itself once closed
        if not finished:
            logger.warning(
                "KV store: %d queued puts not done after %.1f s at close; dropped", self._pending, timeout_s
            )
        self._closed = True

        def drain() -> None:
            self._puts.shutdown(wait=True, cancel_futures=True)
            self._calls.shutdown(wait=True, cancel_futures=True)

        if not run_bounded(drain, max(0.1, deadline - time.monotonic()), "k2kv-store-close"):
            logger.warning("KV store: a call still runs after %.1f s; the client is left open", timeout_s)
            return False
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception as e:  # noqa: BLE001 - closing a client whose master is gone
                logger.debug("KV store: close failed: %r", e)
        return finished


class SharedTiers:
    """The local tiers (`local`, possibly holding no tier) with the shared store below them, behind the
    block manager's BlockTiers interface. `stats` is the local tiers' TierStats, with the `mooncake` tier
    added to every per-tier counter.

    Lookup results are remembered briefly (`exists_ttl_s` for a hit, `miss_ttl_s` for a miss), since the
    block manager plans a waiting request again on every step.

    Long prefixes are looked up and read in batches, not one store call per block (a 32K-token context
    is ~2,000 blocks, and each call is a round trip to the client's call thread): `prefetch` asks the
    store about a prompt's chain hashes at once, `load_many` gets up to `read_batch_blocks` blocks a
    call (their values must fit the client's transfer buffer together)."""

    def __init__(
        self,
        local: KVTiers,
        store: BlockStore,
        namespace: str,
        put_on_compute: bool = True,
        exists_ttl_s: float = 2.0,
        miss_ttl_s: float = 0.25,
        max_remembered: int = 1 << 16,
        store_id: str = "",
        capacity_blocks: int = 0,
        max_store_events: int = 1 << 16,
        read_batch_blocks: int = 64,
    ) -> None:
        if read_batch_blocks < 1:
            raise ValueError(f"read_batch_blocks must be >= 1, got {read_batch_blocks}")
        self.read_batch_blocks = read_batch_blocks
        self.local = local
        self.store = store
        self.prefix = f"{KEY_PREFIX}/{namespace}/"
        # what the router's index calls this store (workers with the same id fetch each other's
        # blocks): the store's address and this namespace; and the framed blocks this worker's
        # contribution to it holds at most
        self.store_id = store_id or self.prefix
        self.capacity_blocks = capacity_blocks
        self._max_store_events = max_store_events
        self._store_events: list[tuple[int, bool]] = []  # (hash, put: True / found missing: False)
        self._stored: OrderedDict[int, None] = OrderedDict()  # hashes whose put succeeded (bounded)
        self.put_on_compute = put_on_compute
        self.stats = local.stats
        for counts in (self.stats.hit_tokens, self.stats.offload_bytes, self.stats.reload_bytes):
            counts[STORE_TIER] = 0
        for seconds in (self.stats.offload_seconds, self.stats.reload_seconds):
            seconds[STORE_TIER] = 0.0
        self._exists_ttl_s = exists_ttl_s
        self._miss_ttl_s = miss_ttl_s
        self._max_remembered = max_remembered
        self._known: OrderedDict[int, tuple[bool, float]] = OrderedDict()  # hash -> (in store, until)
        self._put: OrderedDict[int, None] = OrderedDict()  # hashes this process put (or queued)

    # ---- the local tiers' view (metrics, tests) --------------------------------------------------
    @property
    def host(self) -> Any:
        return self.local.host

    @property
    def disk(self) -> Any:
        return self.local.disk

    @property
    def enabled(self) -> bool:
        return True

    @property
    def async_io(self) -> bool:
        return self.local.async_io

    @property
    def write_queue_depth(self) -> int:
        return self.local.write_queue_depth

    def key(self, h: int) -> str:
        """The store key of chain hash `h` in this namespace."""
        return f"{self.prefix}{h:016x}"

    # ---- BlockTiers ------------------------------------------------------------------------------
    def contains(self, h: int) -> bool:
        """Whether a local tier holds `h`, or the store does (the entry may still fail on `load`)."""
        return self.local.contains(h) or self._in_store(h)

    def hashes(self) -> list[int]:
        """The hashes the local tiers hold: what the store holds is no more this worker's than any
        other's, so it is not in this worker's KV events snapshot."""
        return self.local.hashes()

    def held(self) -> list[tuple[int, str]]:
        """The local tiers' (hash, tier) pairs (see `hashes`)."""
        return self.local.held()

    def tier_of(self, h: int) -> str | None:
        """The local tier holding `h`, or None: the worker's KV events follow the local tiers (a block
        only the store holds is published removed, see `offload`)."""
        return self.local.tier_of(h)

    def offload(self, h: int, block: int) -> bool:
        """Copy evicted block `block` into the local tiers and put it in the store (once); returns
        whether a LOCAL tier holds it (the worker's KV events follow the local tiers)."""
        return self.offload_many([(h, block)])[0]

    def offload_many(self, evicted: Sequence[tuple[int, int]]) -> list[bool]:
        """`offload` of each (hash, block) of `evicted`, with one copy out of the pool for the local
        tiers and one for the blocks not put yet."""
        held = self.local.offload_many(evicted) if self.local.enabled else [False] * len(evicted)
        self._put_blocks(evicted)
        return held

    def computed(self, h: int, block: int) -> None:
        """Block `block` was just computed and registered under `h`: put it now with put_on_compute."""
        if self.put_on_compute:
            self._put_blocks([(h, block)])

    def load(self, h: int) -> Loaded | None:
        """(payload, tier) of `h` from a local tier, else from the store, verified; None when no good
        copy was found (a missing, corrupt or wrong-sized store entry is counted in corrupt_blocks).
        On the engine thread."""
        got = self.local.load(h) if self.local.contains(h) else None
        return got if got is not None else self._from_store(h)

    def load_many(self, hashes: Sequence[int]) -> dict[int, Loaded]:
        """The verified payloads of `hashes`, in order, each from a local tier else from the store, up
        to the first that none has a good copy of. Any thread (the reader's: `start_load`); the local
        tiers' drops reach the block manager with the next `poll`."""
        out: dict[int, Loaded] = {}
        hashes = list(hashes)
        for start in range(0, len(hashes), self.read_batch_blocks):
            chunk = hashes[start : start + self.read_batch_blocks]
            need = [h for h in chunk if not self.local.contains(h)]
            fetched = dict(zip(need, self._from_store_many(need), strict=True))
            for h in chunk:
                got = fetched[h] if h in fetched else self.local.load_many([h]).get(h) or self._from_store(h)
                if got is None:
                    return out
                out[h] = got
        return out

    def prefetch(self, hashes: Sequence[int]) -> None:
        """Ask the store about every hash of `hashes` that no local tier holds and whose answer is not
        remembered, in one call per `read_batch_blocks` * 16 hashes, and remember the answers (the
        block manager's `contains` lookups of a long prompt then find them). On the engine thread."""
        now = time.monotonic()
        unknown = [
            h for h in hashes if not self.local.contains(h) and self._known.get(h, (False, 0.0))[1] <= now
        ]
        step = self.read_batch_blocks * 16
        for start in range(0, len(unknown), step):
            chunk = unknown[start : start + step]
            for h, found in zip(chunk, self.store.exists_many([self.key(h) for h in chunk]), strict=True):
                self._remember(h, found)

    def start_load(self, hashes: Sequence[int]) -> Future[dict[int, Loaded]]:
        """`load_many(hashes)` on the local tiers' reader thread (async_io), else at once."""
        return self.local.start_load(hashes, self.load_many)

    def write(self, block: int, payload: torch.Tensor, tier: str) -> None:
        """Copy a payload from `load` into device block `block`, counted for `tier`."""
        self.local.write(block, payload, tier)

    def write_many(self, blocks: Sequence[int], loaded: Sequence[Loaded]) -> None:
        """`write` of each payload into the block at the same index, with one copy into the pool."""
        self.local.write_many(blocks, loaded)

    def poll(self) -> None:
        """The local tiers' `poll` (drops found on their background threads reach the block manager)."""
        self.local.poll()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait for the local tiers' queued disk writes and the store's queued puts (tests,
        benchmarks); returns whether the puts all ran within `timeout_s`."""
        self.local.flush()
        return self.store.flush(timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Finish the local tiers' queued disk writes and the store's queued puts, then stop their
        threads and the client, within `timeout_s` in all (see KVTiers.close, MooncakeStore.close);
        returns whether everything finished."""
        deadline = time.monotonic() + timeout_s
        local = self.local.close(timeout_s)
        return self.store.close(max(0.0, deadline - time.monotonic())) and local

    # ---- the router's index of the store -----------------------------------------------------------
    def drain_store_events(self) -> tuple[list[int], list[int]]:
        """(hashes put into the store, hashes a lookup found missing or bad there) since the last
        drain, each hash in the list of its latest event (a miss, then the recomputed block's put: a
        put), in order (the worker's heartbeat ships them to the router). At most `max_store_events`
        are kept between drains (the oldest go first): a lost put only hides a block from the
        router's prediction, a lost miss leaves a stale entry that one request pays for by
        recomputing."""
        with self.local.lock:
            events, self._store_events = self._store_events, []
        latest = dict(events)  # hash -> its last event, in the order of first appearance
        return [h for h, put in latest.items() if put], [h for h, put in latest.items() if not put]

    def stored_hashes(self) -> list[int]:
        """The hashes this worker put into the store successfully, least recently first (at most
        `max_remembered`; for the snapshot on a (re)registration: a restarted router relearns the
        store from its workers). The store may have evicted some since."""
        with self.local.lock:
            return list(self._stored)

    def _store_event(self, h: int, put: bool) -> None:
        """Record a put (True) or a miss (False) for the router; callers hold `local.lock`."""
        self._store_events.append((h, put))
        if len(self._store_events) > self._max_store_events:
            del self._store_events[: len(self._store_events) - self._max_store_events]
        if put:
            self._stored[h] = None
            self._stored.move_to_end(h)
            while len(self._stored) > self._max_remembered:
                self._stored.popitem(last=False)
        else:
            self._stored.pop(h, None)

    # ---- internals -------------------------------------------------------------------------------
    def _from_store(self, h: int) -> Loaded | None:
        """`h`'s verified payload from the store, or None (a missing, corrupt or wrong-sized entry is
        counted in corrupt_blocks; a bad one is removed from the store). Any thread."""
        return self._from_store_many([h])[0]

    def _from_store_many(self, hashes: Sequence[int]) -> list[Loaded | None]:
        """Each of `hashes`' verified payload from the store, read in one call, up to the first that has
        no good copy (as `_from_store`); None from there on (a prefix ends there: the rest is neither
        used nor counted). Any thread."""
        if not hashes:
            return []
        t0 = time.perf_counter()
        values = self.store.get_many([self.key(h) for h in hashes])
        seconds = (time.perf_counter() - t0) / len(hashes)
        out: list[Loaded | None] = []
        for h, data in zip(hashes, values, strict=True):
            payload = unpack_block(data) if data is not None else None
            if payload is None or len(payload) != self.local.block_bytes:
                with self.local.lock:
                    self._known.pop(h, None)
                    self.stats.corrupt_blocks += 1
                    self._store_event(h, False)
                if data is not None:  # there but bad: no other worker should fetch it either
                    self.store.remove(self.key(h))
                return out + [None] * (len(hashes) - len(out))
            with self.local.lock:
                self.stats.reload_seconds[STORE_TIER] += seconds
            out.append((torch.frombuffer(bytearray(payload), dtype=torch.uint8), STORE_TIER))
        return out

    def _remember(self, h: int, found: bool) -> None:
        """A lookup's answer for `h`, kept for its TTL; a miss also goes to the router (its store index
        drops the hash)."""
        ttl = self._exists_ttl_s if found else self._miss_ttl_s
        with self.local.lock:  # the reader thread forgets entries (`_from_store`)
            self._known[h] = (found, time.monotonic() + ttl)
            self._known.move_to_end(h)
            while len(self._known) > self._max_remembered:
                self._known.popitem(last=False)
            if not found:
                self._store_event(h, False)

    def _in_store(self, h: int) -> bool:
        known = self._known.get(h)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        found = self.store.exists(self.key(h))
        self._remember(h, found)
        return found

    def _put_blocks(self, blocks: Sequence[tuple[int, int]]) -> None:
        """Queue a store put of each (hash, device block) of `blocks` not put yet (one copy out of the
        pool for all of them)."""
        fresh: dict[int, int] = {}
        for h, block in blocks:
            if h in self._put:
                self._put.move_to_end(h)
            else:
                fresh.setdefault(h, block)
        if not fresh:
            return
        t0 = time.perf_counter()
        payloads = self.local.block_payloads(list(fresh.values()))
        copy_s = (time.perf_counter() - t0) / len(fresh)
        stats, nbytes, lock = self.stats, self.local.block_bytes, self.local.lock
        items: list[PutItem] = []
        for h, payload in zip(fresh, payloads, strict=True):
            t1 = time.perf_counter()
            value = pack_block(payload.numpy().data)
            pack_s = copy_s + time.perf_counter() - t1

            def done(seconds: float, pack_s: float = pack_s, h: int = h) -> None:  # on the put thread
                with lock:
                    stats.offload_bytes[STORE_TIER] += nbytes
                    stats.offload_seconds[STORE_TIER] += pack_s + seconds
                    self._store_event(h, True)

            items.append((self.key(h), value, done))
        if self.store.put_many(items):  # one batch: a burst is queued whole or not at all
            with lock:  # a miss remembered from before these puts must not hide them
                for h in fresh:
                    self._known.pop(h, None)
            for h in fresh:
                self._put[h] = None
            while len(self._put) > self._max_remembered:
                self._put.popitem(last=False)
