"""The engine's glue to the local KV tiers (kvcache/tiers.py) and the shared one (kvcache/shared_tier.py):
built from EngineConfig and attached to the block manager, so that evicted prefix blocks are offloaded
and reloaded on a hit (asynchronously by default: AsyncReloads; with a shared store below the local
tiers a store hit is read on the same reader thread) and, with a shared store, put when computed; and to
session leases (kvcache/leases.py), fed by the engine's requests that carry a session id."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

import torch
import xxhash

from k2serve.engine.config import EngineConfig
from k2serve.engine.protocol import KVTierStats
from k2serve.engine.sequence import Sequence
from k2serve.kvcache.block_manager import Allocation, BlockManager, NoFreeBlocksError, PendingReload
from k2serve.kvcache.leases import SessionLeases
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.shared_tier import MooncakeSettings, MooncakeStore, SharedTiers
from k2serve.kvcache.tiers import CLOSE_TIMEOUT_S, TIERS, KVTiers, Loaded, framed_bytes

__all__ = ["AsyncReloads", "EngineLeases", "attach_tiers", "close_tiers", "store_namespace", "tier_stats"]

logger = logging.getLogger(__name__)

_STORE_FORMAT = b"k2kv-block-v1"  # bump when the payload layout of a block changes


def attach_tiers(
    blocks: BlockManager, pool: KVCachePool, config: EngineConfig, model: torch.nn.Module | None = None
) -> KVTiers | SharedTiers | None:
    """The host / disk tiers the config asks for, and the shared store below them (`model` names its
    namespace: see `store_namespace`), attached to `blocks`; None when it asks for none (or sizes them
    below one block) or prefix caching is off (nothing would ever hit them)."""
    if not config.enable_prefix_caching:
        return None
    if config.kv_store == "mooncake" and model is None:
        raise ValueError("a shared KV store needs the model: its fingerprint namespaces the keys")
    # The disk tier keeps its blocks for the next process with the same namespace (without a model
    # there is none: its files are then this process's only).
    wants_disk = config.kv_offload_dir is not None and config.kv_offload_disk_bytes > 0
    namespace = (
        store_namespace(model, pool, config)
        if model is not None and (wants_disk or config.kv_store == "mooncake")
        else None
    )
    tiers = KVTiers(
        pool,
        host_bytes=config.kv_offload_host_bytes,
        disk_dir=config.kv_offload_dir,
        disk_bytes=config.kv_offload_disk_bytes,
        on_dropped=blocks.tier_dropped,
        async_io=config.kv_offload_async,
        write_queue_blocks=config.kv_offload_queue_blocks,
        namespace=namespace,
    )
    tiers.on_moved = blocks.tier_moved
    if config.kv_store == "mooncake":
        assert namespace is not None
        settings = mooncake_settings(config, pool)
        shared = SharedTiers(
            tiers,
            MooncakeStore(settings),
            namespace,
            put_on_compute=config.kv_store_put_on_compute,
            store_id=f"mooncake://{config.kv_store_master}/{namespace}",
            capacity_blocks=config.kv_store_segment_bytes // framed_bytes(pool.bytes_per_block),
            # a batched get lands in the transfer buffer: at most half of it, at most 256 blocks a call
            read_batch_blocks=max(1, min(256, settings.buffer_bytes // 2 // (pool.bytes_per_block + 64))),
        )
        blocks.attach_tiers(shared)
        blocks.on_computed = shared.computed
        return shared
    if not tiers.enabled:
        return None
    blocks.attach_tiers(tiers)
    return tiers


def close_tiers(tiers: KVTiers | SharedTiers, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
    """Drain and close `tiers` at shutdown (the disk writes and store puts still queued are done, the
    threads stopped) within `timeout_s`; returns whether everything finished (else a warning is
    logged: a stuck disk or store never holds a worker's exit longer than that)."""
    t0 = time.monotonic()
    finished = tiers.close(timeout_s)
    logger.log(
        logging.INFO if finished else logging.WARNING,
        "KV tiers closed in %.2f s%s",
        time.monotonic() - t0,
        "" if finished else f" (not all finished within {timeout_s:.1f} s)",
    )
    return finished


def mooncake_settings(config: EngineConfig, pool: KVCachePool) -> MooncakeSettings:
    """The Mooncake client settings of `config`: the local transfer buffer holds 8 framed blocks at
    least (a get or put goes through it), 64 MiB at least."""
    assert config.kv_store_master is not None  # EngineConfig checks it with kv_store mooncake
    return MooncakeSettings(
        master=config.kv_store_master,
        metadata=config.kv_store_metadata_url,
        segment_bytes=config.kv_store_segment_bytes,
        buffer_bytes=max(64 << 20, 8 * (pool.bytes_per_block + 64)),
        local_hostname=config.kv_store_local_hostname or _host_address(),
        timeout_s=config.kv_store_timeout_s,
    )


def _host_address() -> str:
    """This host's address as its name resolves (a pod's IP in Kubernetes), else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def store_namespace(model: torch.nn.Module, pool: KVCachePool, config: EngineConfig) -> str:
    """A fingerprint (XXH3-128, hex) of what a stored block's bytes depend on: the model (its config,
    every weight's name, shape and dtype, and the first values of each), the KV cache dtype and the
    pool's row layout (dtype, layers, block size, row width). Workers of the same checkpoint, dtype and
    cache format share it; any other worker gets another namespace and never reads these blocks."""
    h = xxhash.xxh3_128(_STORE_FORMAT)
    h.update(repr(getattr(model, "config", None)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        head = t.detach().reshape(-1)[:64].to("cpu").contiguous()
        h.update(head.view(torch.uint8).numpy().tobytes())
    layout = (config.kv_cache_dtype, str(pool.kv.dtype), pool.num_layers, pool.block_size, pool.row_width)
    h.update(repr(layout).encode())
    return h.hexdigest()


@dataclass
class _Reload:
    pending: PendingReload
    future: Future[dict[int, Loaded]]
    started: float


class AsyncReloads:
    """Tier reloads in flight, by request id, for the scheduler (scheduler.Reloads).

    `admit(seq)` for a waiting sequence without blocks: when its cached prefix has blocks in a tier, the
    block manager holds its blocks (`begin_reload`: nothing can evict or take them) and the tiers' reader
    thread reads and verifies the tier blocks; the sequence is skipped until that is done, then its
    allocation is finished on the engine thread (the copy into the pool). A reload not done within
    `timeout_s` is given up: the sequence gets its device prefix and computes the rest (the read's
    result is ignored). `cancel` (an abort) gives every held block back."""

    def __init__(
        self,
        blocks: BlockManager,
        tiers: KVTiers | SharedTiers,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blocks = blocks
        self.tiers = tiers
        self.timeout_s = timeout_s
        self.clock = clock
        self._inflight: dict[str, _Reload] = {}
        self.started_total = 0
        self.timeouts_total = 0

    @property
    def in_flight(self) -> int:
        """Reloads started and not admitted yet."""
        return len(self._inflight)

    def admit(self, seq: Sequence) -> Allocation | bool:
        r = self._inflight.get(seq.request_id)
        if r is None:
            try:
                pending = self.blocks.begin_reload(seq.token_ids)
            except NoFreeBlocksError:
                return False  # the pool is short: `can_allocate` says so and admission waits
            if pending is None:
                return False
            self._inflight[seq.request_id] = r = _Reload(
                pending, self.tiers.start_load(pending.to_load), self.clock()
            )
            self.started_total += 1
        if not r.future.done():
            if self.clock() - r.started < self.timeout_s:
                return True
            self.timeouts_total += 1
            logger.warning(
                "KV tier reload of %s timed out after %.1fs: recomputing", seq.request_id, self.timeout_s
            )
            loaded: dict[int, Loaded] = {}
        elif r.future.exception() is not None:
            logger.warning(
                "KV tier reload of %s failed (%s): recomputing", seq.request_id, r.future.exception()
            )
            loaded = {}
        else:
            loaded = r.future.result()
        del self._inflight[seq.request_id]
        self.tiers.poll()  # drops the reader found (corrupt entries): "removed" events
        return self.blocks.finish_reload(r.pending, loaded)

    def cancel(self, seq: Sequence) -> None:
        r = self._inflight.pop(seq.request_id, None)
        if r is not None:
            r.future.cancel()
            self.blocks.cancel_reload(r.pending)

    def wait(self, timeout_s: float) -> None:
        """Block until a reload is done or `timeout_s` passes (the engine has nothing else to run)."""
        if self._inflight:
            wait_futures(
                [r.future for r in self._inflight.values()], timeout_s, return_when="FIRST_COMPLETED"
            )

    def held_blocks(self) -> list[list[int]]:
        """The blocks each reload in flight holds (for invariant checks)."""
        return [r.pending.blocks for r in self._inflight.values()]


class _Finished(Protocol):
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finished: bool


class EngineLeases:
    """Session leases of one engine: which request belongs to which session, a lease on the blocks of
    each finished session turn, ended by the session's next turn, its time, or a request that needs
    the blocks (see SessionLeases)."""

    def __init__(self, blocks: BlockManager, lease_s: float) -> None:
        self.leases = SessionLeases(blocks, lease_s)
        self._session_of: dict[str, str] = {}

    @classmethod
    def build(cls, blocks: BlockManager, config: EngineConfig) -> EngineLeases | None:
        """Leases as the config asks (kv_session_lease_s > 0 with prefix caching), else None."""
        if config.kv_session_lease_s <= 0 or not config.enable_prefix_caching:
            return None
        return cls(blocks, config.kv_session_lease_s)

    def added(self, request_id: str, session_id: str | None) -> None:
        """A request arrived: the next turn of `session_id` ends that session's lease."""
        if session_id:
            self.leases.release(session_id)
            self._session_of[request_id] = session_id

    def dropped(self, request_id: str) -> None:
        """A request was aborted: no lease for it."""
        self._session_of.pop(request_id, None)

    def before_schedule(self, blocks: BlockManager, waiting_tokens: list[int] | None) -> None:
        """Expire leases; with a waiting request at the queue head (`waiting_tokens`) that cannot get
        its blocks, end leases (oldest first) until it can."""
        self.leases.expire()
        if waiting_tokens is not None:
            self.leases.relieve(lambda: blocks.can_allocate(waiting_tokens))

    def after_step(self, outputs: Iterable[_Finished]) -> None:
        """Lease the blocks of every finished session turn."""
        for o in outputs:
            if o.finished:
                session_id = self._session_of.pop(o.request_id, None)
                if session_id is not None:
                    self.leases.hold(session_id, o.prompt_token_ids + o.token_ids)


def tier_stats(
    tiers: KVTiers | SharedTiers | None, leases: EngineLeases | None, reloads: AsyncReloads | None = None
) -> KVTierStats | None:
    """A snapshot of the tiers' counters, the leased blocks and the reload queue for metrics; None with
    neither tiers nor leases."""
    if tiers is None and leases is None:
        return None
    leased = leases.leases.num_leased_blocks if leases is not None else 0
    if tiers is None:
        zero = dict.fromkeys(TIERS, 0)
        return KVTierStats(
            zero, zero, dict.fromkeys(TIERS, 0.0), zero, dict.fromkeys(TIERS, 0.0), zero, 0, leased
        )
    st = tiers.stats
    return KVTierStats(
        hit_tokens=dict(st.hit_tokens),
        offload_bytes=dict(st.offload_bytes),
        offload_seconds=dict(st.offload_seconds),
        reload_bytes=dict(st.reload_bytes),
        reload_seconds=dict(st.reload_seconds),
        blocks={"host": len(tiers.host or ()), "disk": len(tiers.disk or ()) + tiers.write_queue_depth},
        corrupt_blocks=st.corrupt_blocks,
        leased_blocks=leased,
        store_errors=tiers.store.errors if isinstance(tiers, SharedTiers) else 0,
        dropped_offloads=st.dropped_offloads,
        write_queue_blocks=tiers.write_queue_depth,
        reloads_in_flight=reloads.in_flight if reloads is not None else 0,
        reload_timeouts=reloads.timeouts_total if reloads is not None else 0,
    )
