"""The router's view of its workers: who is there, how loaded, and whether they are still alive.

Workers register (WorkerRegistry.Register) and heartbeat; one that misses heartbeats for longer than
the timeout is removed and gets no new requests. A worker gets requests only once it reports itself
ready (model loaded, warm-up step run). Static workers (`--worker role=host:port`) count as ready,
never expire by heartbeat but are dropped after repeated call failures, like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from typing_extensions import override

from k2serve.kvcache.block_manager import tier_name
from k2serve.proto import registry_pb2, registry_pb2_grpc, worker_pb2_grpc
from k2serve.router.kv_index import KVIndex

logger = logging.getLogger(__name__)

ROLE_NAMES = {registry_pb2.WORKER_ROLE_PREFILL: "prefill", registry_pb2.WORKER_ROLE_DECODE: "decode"}


@dataclass
class Worker:
    worker_id: str
    role: str
    address: str
    info: registry_pb2.WorkerInfo
    channel: grpc.aio.Channel
    static: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    load: registry_pb2.WorkerLoad = field(default_factory=registry_pb2.WorkerLoad)
    in_flight: int = 0  # requests the router has sent and not seen finish
    prefilling: int = 0  # Prefill calls to this worker under way now
    prefill_tokens: int = 0  # uncached prompt tokens of those calls (predicted): its queue between heartbeats
    routed: int = 0  # requests routed to it since it joined (idle workers take turns)
    failures: int = 0
    draining_since: float | None = None  # deregistered: no new requests; removed once idle
    ready: bool = False  # reported by the worker (static ones: assumed); no requests before
    # Prefills answered that the last reported load may still count as queued: (the worker's
    # prompts_computed once each was computed, its uncached tokens); dropped once a heartbeat counts them.
    unreported_prefills: list[tuple[int, int]] = field(default_factory=list)

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens waiting for this prefill worker: its last report, less the prefills answered since
        that report's snapshot (a heartbeat taken mid-prefill is stale once the answer is back), and at
        least the uncached tokens of the calls the router has under way there (fresher between heartbeats)."""
        reported = self.load.queued_prefill_tokens - sum(t for _, t in self.unreported_prefills)
        return max(reported, self.prefill_tokens, 0)

    def prefill_answered(self, prompts_computed: int, uncached_tokens: int) -> None:
        """A Prefill call came back: its prompt leaves the queue the worker last reported, unless that
        report already counted it."""
        if prompts_computed > self.load.prompts_computed:
            self.unreported_prefills.append((prompts_computed, uncached_tokens))

    @property
    def prefill_stub(self) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self.channel)

    @property
    def decode_stub(self) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self.channel)


class WorkerTable:
    """All known workers, and the KV index of their prefix caches (a worker's entries leave with it).
    Touched only from the router's event loop (no locks needed)."""

    def __init__(
        self,
        heartbeat_timeout_s: float,
        channel_factory: Callable[[str], grpc.aio.Channel],
        kv_index: KVIndex | None = None,
    ) -> None:
        self.timeout = heartbeat_timeout_s
        self.kv_index = kv_index if kv_index is not None else KVIndex()
        self._channel = channel_factory
        self.workers: dict[str, Worker] = {}
        self.drain_timeout_s = 180.0
        self.on_remove: list[Callable[[Worker], None]] = []

    def add(self, info: registry_pb2.WorkerInfo, static: bool = False) -> Worker:
        old = self.workers.get(info.worker_id)
        if old is not None and old.address == info.grpc_address:
            old.info, old.last_seen, old.failures = info, time.monotonic(), 0
            old.ready = static or info.ready
            return old
        if old is not None:
            self.remove(info.worker_id, "re-registered at a new address")
        role = ROLE_NAMES.get(info.role)
        if role is None:
            raise ValueError(f"worker {info.worker_id!r} has unsupported role {info.role}")
        self._check_pairable(info, role)
        w = Worker(info.worker_id, role, info.grpc_address, info, self._channel(info.grpc_address), static)
        w.ready = static or info.ready
        self.workers[info.worker_id] = w
        logger.info(
            "worker %s (%s) joined at %s%s", w.worker_id, role, w.address, "" if w.ready else " (warming up)"
        )
        return w

    def _check_pairable(self, info: registry_pb2.WorkerInfo, role: str) -> None:
        """Refuse a prefill (decode) worker whose KV cache format differs from a registered decode
        (prefill) worker's: the KV transfer ships the pool's rows as they are, so a bf16 prefill
        cannot hand its cache to an fp8 decode. Workers that report no geometry (static) pass."""
        if not info.kv_dtype:
            return
        mine = (info.kv_dtype, info.kv_dim, info.num_layers)
        for w in self.workers.values():
            theirs = (w.info.kv_dtype, w.info.kv_dim, w.info.num_layers)
            if w.worker_id == info.worker_id or not w.info.kv_dtype or theirs == mine:
                continue
            if {role, w.role} == {"prefill", "decode"}:
                raise ValueError(
                    f"{role} worker {info.worker_id!r} cannot be paired with {w.role} worker {w.worker_id!r}: "
                    f"its KV cache is {info.kv_dtype} ({info.num_layers} layers x {info.kv_dim}) but "
                    f"{w.worker_id!r}'s is {w.info.kv_dtype} ({w.info.num_layers} layers x {w.info.kv_dim}); "
                    "start every prefill and decode worker with the same --kv-cache-dtype"
                )

    def remove(self, worker_id: str, why: str) -> None:
        w = self.workers.pop(worker_id, None)
        if w is None:
            return
        logger.warning("worker %s removed: %s", worker_id, why)
        self.kv_index.drop(worker_id)
        for cb in self.on_remove:
            cb(w)
        task = asyncio.get_event_loop().create_task(w.channel.close())
        task.add_done_callback(lambda _: None)

    def heartbeat(self, worker_id: str, load: registry_pb2.WorkerLoad, ready: bool = True) -> bool:
        w = self.workers.get(worker_id)
        if w is None or w.draining_since is not None:
            return False
        w.last_seen = time.monotonic()
        w.load = load
        w.unreported_prefills = [p for p in w.unreported_prefills if p[0] > load.prompts_computed]
        if ready and not w.ready:
            logger.info("worker %s is ready", worker_id)
        w.ready = w.static or ready
        return True

    def of_role(self, role: str) -> list[Worker]:
        """Workers of `role` that take new requests: ready ones (draining ones are not)."""
        return [w for w in self.workers.values() if w.role == role and w.ready and w.draining_since is None]

    def missing(self) -> list[str]:
        """What the cluster lacks to serve a request ([] when it can): "prefill worker", "decode worker"."""
        return [f"{role} worker" for role in ("prefill", "decode") if not self.of_role(role)]

    def drain(self, worker_id: str) -> None:
        """The worker is stopping: route nothing new to it, keep its channel until its requests finish."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        if w.in_flight == 0:
            self.remove(worker_id, "deregistered")
        elif w.draining_since is None:
            w.draining_since = time.monotonic()
            logger.info("worker %s draining (%d requests in flight)", worker_id, w.in_flight)

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the timeout; returns their ids."""
        now = time.monotonic()
        gone = []
        for w in list(self.workers.values()):
            if w.draining_since is not None:
                if w.in_flight == 0 or now - w.draining_since > self.drain_timeout_s:
                    gone.append(w.worker_id)
                    self.remove(w.worker_id, "drained")
            elif not w.static and now - w.last_seen > self.timeout:
                gone.append(w.worker_id)
                self.remove(w.worker_id, f"no heartbeat for {self.timeout:.1f} s")
        return gone

    def call_failed(self, w: Worker, max_failures: int = 3) -> None:
        """A call to `w` failed at the transport level; after `max_failures` in a row it is removed."""
        w.failures += 1
        if w.failures >= max_failures:
            self.remove(w.worker_id, f"{w.failures} failed calls in a row")

    def call_succeeded(self, w: Worker) -> None:
        w.failures = 0

    async def monitor(self, stop: asyncio.Event, period_s: float = 0.5) -> None:
        while not stop.is_set():
            self.expire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period_s)


class RegistryServicer(registry_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, table: WorkerTable, heartbeat_interval_ms: int = 1000) -> None:
        self.table = table
        self.interval_ms = heartbeat_interval_ms

    @override
    async def Register(
        self, request: registry_pb2.WorkerInfo, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        if not request.worker_id or not request.grpc_address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id and grpc_address are required")
        try:
            self.table.add(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.publishes_kv_events:  # its snapshot: the index's view of it starts over
            tiers = [tier_name(t) for t in request.kv_block_tiers]
            if tiers and len(tiers) != len(request.kv_block_hashes):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"kv_block_tiers: {len(tiers)} tiers but {len(request.kv_block_hashes)} kv_block_hashes",
                )
            self.table.kv_index.replace(request.worker_id, request.kv_block_hashes, tiers)
            self.table.kv_index.join_store(
                request.worker_id, request.kv_store, request.kv_store_capacity_blocks, request.kv_store_hashes
            )
        else:
            self.table.kv_index.drop(request.worker_id)
        return registry_pb2.RegisterResponse(
            heartbeat_interval_ms=self.interval_ms, lease_ms=int(self.table.timeout * 1000)
        )

    @override
    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        known = self.table.heartbeat(request.worker_id, request.load, request.ready)
        if known and request.HasField("kv_events"):
            ev = request.kv_events
            if len(ev.block_hashes) != len(ev.removed) or len(ev.tiers) not in (0, len(ev.removed)):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"kv_events: {len(ev.block_hashes)} block_hashes but {len(ev.removed)} removed flags "
                    f"and {len(ev.tiers)} tiers",
                )
            tiers = [tier_name(t) for t in ev.tiers]
            self.table.kv_index.apply(request.worker_id, ev.block_hashes, ev.removed, tiers)
            store = self.table.kv_index.store_of(request.worker_id)
            if store is not None:  # each hash is in one of the two lists (its latest event)
                self.table.kv_index.store_missing(store, ev.store_misses)
                self.table.kv_index.store_put(store, ev.store_puts)
        return registry_pb2.HeartbeatResponse(known=known)

    @override
    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        self.table.drain(request.worker_id)
        return registry_pb2.DeregisterResponse()
