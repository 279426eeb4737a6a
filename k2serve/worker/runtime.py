"""What prefill and decode workers share at run time: the engine (alone or one rank of an expert-parallel
group), the gRPC server (with health and reflection), a warm-up step before the worker reports itself
ready, registration with the router and heartbeats, and graceful shutdown on SIGINT/SIGTERM (or,
exiting non-zero, when the EP group is lost or the warm-up fails)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.group import GroupLostError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import BackendFailure, GenerateRequest
from k2serve.engine.sampling_params import SamplingParams
from k2serve.experts import EPConfig, EPWorker
from k2serve.experts.metrics import EPCollector
from k2serve.kvcache.block_manager import KVEventLog, tier_code, tier_name
from k2serve.kvcache.shared_tier import SharedTiers
from k2serve.proto import kv_transfer_pb2, registry_pb2, registry_pb2_grpc
from k2serve.proto.limits import CONTROL_MAX_MESSAGE_BYTES, grpc_options
from k2serve.rpc.tls import add_port, aio_channel
from k2serve.worker.metrics_server import MetricsServer
from k2serve.worker.settings import ROLES, WorkerSettings

logger = logging.getLogger(__name__)
WARMUP_TIMEOUT_S = 300.0


def load_engine(settings: WorkerSettings, stop: asyncio.Event) -> AsyncEngine:
    """The worker's engine, not started: the whole model, or (ep_size > 1) this rank's share of the
    experts after joining the group (blocks until every rank joined, at most ep_timeout_s; EPError
    otherwise). If the group is lost later, the engine thread sets `stop` (on the running loop)."""
    loop = asyncio.get_running_loop()

    def on_fatal(exc: GroupLostError) -> None:
        loop.call_soon_threadsafe(stop.set)

    dtype = getattr(torch, settings.dtype)
    if settings.ep_size == 1:
        return AsyncEngine.from_pretrained(
            settings.model_dir, dtype, settings.engine, settings.model_name, settings.role, settings.worker_id
        )
    assert settings.ep_init is not None  # checked in __post_init__
    worker = EPWorker.connect(
        settings.ep_rank,
        settings.ep_size,
        settings.model_dir,
        dtype,
        settings.engine,
        settings.ep_init,
        ep_config(settings),
    )
    engine = AsyncEngine.for_group(worker, settings.model_name, on_fatal, settings.role, settings.worker_id)
    engine.metrics.registry.register(EPCollector(worker, engine.metrics.labels))
    return engine


def ep_config(settings: WorkerSettings) -> EPConfig:
    """The EP group's config from the worker's flags: the collective timeout, and with EPLB its
    schedule and this rank's share of the redundant expert slots."""
    eplb = settings.eplb
    return EPConfig(
        redundant_per_rank=0 if eplb is None else eplb.redundant_per_rank(settings.ep_size),
        timeout_s=settings.ep_timeout_s,
        eplb=eplb,
    )


async def warm_up(engine: AsyncEngine, worker_id: str) -> None:
    """One request of one prompt token and one generated token through the running engine: the first
    step's one-time costs (allocations, kernels) are paid before any user request. The prefix-cache
    counters are reset after it and its tokens stay out of the metrics (the warm-up is not traffic). Raises what the request raises."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    events = await engine.generate(GenerateRequest(f"warmup-{worker_id}", [0], params), observed=False)
    async for _ in events:
        pass

    def reset(llm: LLMEngine) -> None:
        llm.blocks.prefix_query_tokens = llm.blocks.prefix_hit_tokens = 0
        llm.prefill_tokens_per_s = 0.0  # a one-token step measures overheads, not the prefill speed

    await engine.call(reset)


def worker_info(
    settings: WorkerSettings,
    engine: AsyncEngine,
    address: str,
    kv_endpoints: list[kv_transfer_pb2.KVEndpoint],
    ready: bool = True,
    metrics_url: str = "",
) -> registry_pb2.WorkerInfo:
    kv, stats = engine.kv_geometry, engine.stats()
    return registry_pb2.WorkerInfo(
        worker_id=settings.worker_id,
        role=ROLES[settings.role],
        grpc_address=address,
        kv_endpoints=kv_endpoints,
        model=settings.model_name,
        num_layers=kv.num_layers,
        kv_dim=kv.kv_dim,
        block_size=kv.block_size,
        kv_dtype=kv.cache_dtype or str(kv.dtype).removeprefix("torch."),
        capacity=registry_pb2.WorkerCapacity(
            free_blocks=stats.kv_blocks_total - stats.kv_blocks_used,
            total_blocks=stats.kv_blocks_total,
            max_batch=engine.config.max_num_seqs,
        ),
        ep_size=settings.ep_size,
        ready=ready,
        metrics_url=metrics_url,
    )


def worker_load(engine: AsyncEngine) -> registry_pb2.WorkerLoad:
    s = engine.stats()
    # keyed by the tier names the router's index uses: a store tier ("mooncake") is "shared" on the wire
    rates = {
        tier_name(tier_code(t)): r for t, r in (s.kv_tiers.reload_tokens_per_s if s.kv_tiers else {}).items()
    }
    return registry_pb2.WorkerLoad(
        running=s.num_running,
        waiting=s.num_waiting,
        free_blocks=s.kv_blocks_total - s.kv_blocks_used,
        total_blocks=s.kv_blocks_total,
        prefix_query_tokens=s.prefix_query_tokens,
        prefix_hit_tokens=s.prefix_hit_tokens,
        queued_prefill_tokens=s.queued_prefill_tokens,
        prefill_tokens_per_s=s.prefill_tokens_per_s,
        prompts_computed=s.prompts_computed,
        decode_step_ms=s.decode_step_ms,
        decode_step_batch=s.decode_step_batch,
        leased_blocks=s.kv_tiers.leased_blocks if s.kv_tiers is not None else 0,
        reload_tokens_per_s=rates,
    )


# registry.proto's KVTier values by kvcache.block_manager.tier_code
_WIRE_TIERS = (
    registry_pb2.KV_TIER_DEVICE,
    registry_pb2.KV_TIER_HOST,
    registry_pb2.KV_TIER_DISK,
    registry_pb2.KV_TIER_SHARED,
)


class KVEventPublisher:
    """A worker's side of the router's KV index: the block manager's stored / removed events (a
    KVEventLog it installs) go out batched on every heartbeat, after a full snapshot of the stored
    hashes on every (re)registration. Order is kept (one log, drained in order); anything a failed
    heartbeat carried, or a log that overflowed while the router was away, is covered by the snapshot
    of the registration that follows (a failed heartbeat always leads to one)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.log = KVEventLog()
        engine.engine.blocks.events = self.log  # before any traffic; the snapshot covers any step before
        tiers = engine.engine.tiers
        self.shared = tiers if isinstance(tiers, SharedTiers) else None  # the shared store, if any

    async def snapshot(self, msg: registry_pb2.WorkerInfo) -> None:
        """Put into `msg` the hashes stored now with their tiers, and with a shared store its id,
        capacity and the hashes this worker put into it, the logs emptied at the same moment (on the
        engine thread, between steps)."""

        def take(llm: LLMEngine) -> list[tuple[int, str]]:
            self.log.reset()
            if self.shared is not None:
                self.shared.drain_store_events()
                msg.kv_store = self.shared.store_id
                msg.kv_store_capacity_blocks = self.shared.capacity_blocks
                msg.kv_store_hashes.extend(self.shared.stored_hashes())
            return llm.blocks.stored_blocks()

        held = await self._engine.call(take)
        msg.publishes_kv_events = True
        msg.kv_block_hashes.extend(h for h, _ in held)
        msg.kv_block_tiers.extend(_WIRE_TIERS[tier_code(t)] for _, t in held)

    def events(self) -> registry_pb2.KVEvents | None:
        """The events since the last call, or None when some were lost (the caller re-registers). The
        shared store's puts and misses go along (their loss only costs predictions: never a resync)."""
        events, overflowed = self.log.drain()
        if overflowed:
            return None
        puts, misses = self.shared.drain_store_events() if self.shared is not None else ([], [])
        return registry_pb2.KVEvents(
            block_hashes=[h for h, _, _ in events],
            removed=[r for _, r, _ in events],
            tiers=[_WIRE_TIERS[tier_code(t)] for _, _, t in events],
            store_puts=puts,
            store_misses=misses,
        )


async def heartbeat_loop(
    settings: WorkerSettings,
    info: Callable[[], registry_pb2.WorkerInfo],
    engine: AsyncEngine,
    stop: asyncio.Event,
    ready: asyncio.Event,
) -> None:
    """Register with the router, then heartbeat; re-register whenever the router does not know us
    (it restarted or dropped us). Every message says whether the worker is `ready`; the heartbeat after
    it becomes ready goes at once. Never gives up while the worker runs; deregisters on the way out.
    A prefill worker publishes its prefix cache's KV events (KVEventPublisher) for the router's
    KV-aware routing."""
    assert settings.router is not None
    kv = KVEventPublisher(engine) if settings.role == "prefill" else None
    options = grpc_options(CONTROL_MAX_MESSAGE_BYTES)
    async with aio_channel(settings.router, options, settings.tls, settings.internal) as channel:
        stub = registry_pb2_grpc.WorkerRegistryStub(channel)
        registered = False
        interval = settings.heartbeat_interval_s
        while not stop.is_set():
            try:
                events = kv.events() if kv is not None and registered else None
                if kv is not None and registered and events is None:
                    registered = False  # the log overflowed: resynchronise with a snapshot
                if not registered:
                    msg = info()
                    if kv is not None:
                        await kv.snapshot(msg)
                    resp = await stub.Register(msg, timeout=5)
                    interval = min(
                        settings.heartbeat_interval_s, resp.heartbeat_interval_ms / 1000 or interval
                    )
                    registered = True
                    logger.info("registered %s with router %s", settings.worker_id, settings.router)
                else:
                    hb = await stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(
                            worker_id=settings.worker_id,
                            load=worker_load(engine),
                            ready=ready.is_set(),
                            kv_events=events,
                        ),
                        timeout=5,
                    )
                    registered = hb.known
            except grpc.aio.AioRpcError as e:
                registered = False
                logger.warning("router %s unreachable (%s); retrying", settings.router, e.code().name)
            except BackendFailure as e:  # the engine thread stopped (the worker is stopping): no snapshot
                registered = False
                logger.warning("no KV snapshot for the router: %s", e)
            told_ready = ready.is_set()
            waits = [asyncio.ensure_future(stop.wait())]
            if not told_ready:
                waits.append(asyncio.ensure_future(ready.wait()))
            _, pending = await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Deregister(registry_pb2.DeregisterRequest(worker_id=settings.worker_id), timeout=2)


async def _warm_up_or_stop(engine: AsyncEngine, worker_id: str, stop: asyncio.Event) -> bool:
    """Run the warm-up unless `stop` is set first; False when the warm-up failed (then `stop` is set)."""
    warm = asyncio.ensure_future(asyncio.wait_for(warm_up(engine, worker_id), WARMUP_TIMEOUT_S))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not warm.done():
        warm.cancel()
        return True
    if warm.exception() is not None:
        logger.error("%s: the warm-up step failed: %r; stopping", worker_id, warm.exception())
        stop.set()
        return False
    return True


async def serve_worker(
    settings: WorkerSettings,
    engine: AsyncEngine,
    add_services: Callable[[grpc.aio.Server], list[str]],
    kv_endpoints: Callable[[], list[kv_transfer_pb2.KVEndpoint]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
    pending: Callable[[], int] | None = None,
) -> int:
    """Run the worker's gRPC server, registered and heartbeating, until SIGINT/SIGTERM or `stop` is set
    (e.g. by the engine's on_fatal); then deregister and stop. Returns the process exit status: 1 when
    the engine stopped by itself (`engine.fatal_error`: the EP group was lost) before a stop was asked
    for, else 0. A group loses all its ranks once one of them stops, so a rank's in-flight requests
    fail if a peer finishes stopping first. `pending()` counts work accepted outside the engine that the
    drain waits for too (a decode worker's reservations whose KV and Decode call are still coming)."""
    server = grpc.aio.server(
        options=grpc_options(CONTROL_MAX_MESSAGE_BYTES), interceptors=settings.internal.server_interceptors()
    )
    names = add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = add_port(server, f"{settings.host}:{settings.port}", settings.tls)
    await server.start()
    address = settings.advertised(port)
    metrics = MetricsServer(settings, engine.metrics.registry)
    for name in ["", *names]:  # SERVING once warmed up: the probes and the router wait for it
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tls = "" if settings.tls is None else " (mutual TLS)" if settings.tls.mutual else " (TLS)"
    print(
        f"k2serve {settings.role} worker {settings.worker_id} serving gRPC{tls} on {address}, "
        f"metrics on {metrics.url}",
        flush=True,
    )
    if settings.tls is not None and settings.ep_size > 1:
        logger.warning(
            "%s: the --ep group's collectives (torch.distributed) are not encrypted", settings.worker_id
        )
    ready = asyncio.Event()
    beat = None
    if settings.router:  # registers at once, not ready: the router lists it, sends it nothing yet
        beat = asyncio.create_task(
            heartbeat_loop(
                settings,
                lambda: worker_info(settings, engine, address, kv_endpoints(), ready.is_set(), metrics.url),
                engine,
                stop,
                ready,
            )
        )
    warm_failed = not await _warm_up_or_stop(engine, settings.worker_id, stop)
    if not warm_failed and not stop.is_set():
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        ready.set()
        print(f"k2serve {settings.role} worker {settings.worker_id} ready", flush=True)
        if settings.ready_file:
            with open(settings.ready_file, "w") as f:
                f.write(address)
    await stop.wait()
    requested = engine.fatal_error is None  # a signal, not the loss of the EP group
    logger.info("stopping %s", settings.worker_id)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if beat is not None:
        await beat  # deregistered: the router sends nothing new and keeps the channel for what is in flight
    if requested:  # drain: let running requests finish (the prefill side's sends, the decode side's streams)
        deadline = loop.time() + settings.drain_timeout_s

        def busy() -> int:
            return engine.num_in_flight + (pending() if pending is not None else 0)

        while busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if busy():
            logger.warning(
                "%s: %d requests still running after the %.0f s drain",
                settings.worker_id,
                busy(),
                settings.drain_timeout_s,
            )
    await server.stop(grace=5)
    await asyncio.to_thread(metrics.close)
    if on_stop is not None:
        await on_stop()
    engine.shutdown()
    if warm_failed:
        return 1
    if engine.fatal_error is None:
        return 0
    if requested:  # the other ranks were stopped too and left the group first
        logger.info("%s: its EP group ended while it was stopping", settings.worker_id)
        return 0
    logger.error("%s exits: %s", settings.worker_id, engine.fatal_error)
    return 1
