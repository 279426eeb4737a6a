"""What prefill and decode workers share: settings, the gRPC server (with health and reflection),
registration with the router and heartbeats, and graceful shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.proto import kv_transfer_pb2, registry_pb2, registry_pb2_grpc
from k2serve.proto.limits import CONTROL_MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

ROLES = {"prefill": registry_pb2.WORKER_ROLE_PREFILL, "decode": registry_pb2.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process. `router` None: run standalone (listed statically by the router)."""

    role: str
    model_dir: str
    model_name: str
    dtype: str
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    router: str | None = None
    worker_id: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:8]}")
    transfer_backend: str = "grpc"
    transfer_port: int = 0
    heartbeat_interval_s: float = 1.0
    ready_file: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {self.heartbeat_interval_s}")

    @classmethod
    def from_args(cls, role: str, args: argparse.Namespace) -> WorkerSettings:
        from pathlib import Path

        from k2serve.cli import engine_config_from_args, resolve_model

        if args.ep != 1:
            raise ValueError(f"--ep {args.ep}: expert-parallel workers are started by `k2serve up --ep`")
        model_dir = resolve_model(args)
        return cls(
            role=role,
            model_dir=model_dir,
            model_name=args.served_model_name or Path(model_dir).resolve().name,
            dtype=args.dtype,
            engine=engine_config_from_args(args),
            host=args.host,
            port=args.port,
            advertise_host=args.advertise_host,
            router=args.router,
            worker_id=args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}",
            transfer_backend=args.transfer_backend,
            transfer_port=args.transfer_port,
            heartbeat_interval_s=args.heartbeat_interval,
            ready_file=args.ready_file,
        )

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", CONTROL_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", CONTROL_MAX_MESSAGE_BYTES),
    ]


def worker_info(
    settings: WorkerSettings,
    engine: AsyncEngine,
    address: str,
    kv_endpoints: list[kv_transfer_pb2.KVEndpoint],
) -> registry_pb2.WorkerInfo:
    e = engine.engine
    mc = e.model.config
    return registry_pb2.WorkerInfo(
        worker_id=settings.worker_id,
        role=ROLES[settings.role],
        grpc_address=address,
        kv_endpoints=kv_endpoints,
        model=settings.model_name,
        num_layers=mc.num_hidden_layers,
        kv_dim=mc.kv_cache_dim,
        block_size=e.blocks.block_size,
        kv_dtype=str(e.pool.kv.dtype).removeprefix("torch."),
        capacity=registry_pb2.WorkerCapacity(
            free_blocks=e.blocks.num_free_blocks,
            total_blocks=e.blocks.num_blocks,
            max_batch=e.config.max_num_seqs,
        ),
        ep_size=1,
    )


def worker_load(engine: AsyncEngine) -> registry_pb2.WorkerLoad:
    s = engine.stats()
    b = engine.engine.blocks
    return registry_pb2.WorkerLoad(
        running=s.num_running,
        waiting=s.num_waiting,
        free_blocks=s.kv_blocks_total - s.kv_blocks_used,
        total_blocks=s.kv_blocks_total,
        prefix_query_tokens=b.prefix_query_tokens,
        prefix_hit_tokens=b.prefix_hit_tokens,
    )


async def heartbeat_loop(
    settings: WorkerSettings,
    info: Callable[[], registry_pb2.WorkerInfo],
    engine: AsyncEngine,
    stop: asyncio.Event,
) -> None:
    """Register with the router, then heartbeat; re-register whenever the router does not know us
    (it restarted or dropped us). Never gives up while the worker runs; deregisters on the way out."""
    assert settings.router is not None
    async with grpc.aio.insecure_channel(settings.router, options=grpc_options()) as channel:
        stub = registry_pb2_grpc.WorkerRegistryStub(channel)
        registered = False
        interval = settings.heartbeat_interval_s
        while not stop.is_set():
            try:
                if not registered:
                    resp = await stub.Register(info(), timeout=5)
                    interval = min(
                        settings.heartbeat_interval_s, resp.heartbeat_interval_ms / 1000 or interval
                    )
                    registered = True
                    logger.info("registered %s with router %s", settings.worker_id, settings.router)
                else:
                    hb = await stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(worker_id=settings.worker_id, load=worker_load(engine)),
                        timeout=5,
                    )
                    registered = hb.known
            except grpc.aio.AioRpcError as e:
                registered = False
                logger.warning("router %s unreachable (%s); retrying", settings.router, e.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Deregister(registry_pb2.DeregisterRequest(worker_id=settings.worker_id), timeout=2)


async def serve_worker(
    settings: WorkerSettings,
    engine: AsyncEngine,
    add_services: Callable[[grpc.aio.Server], list[str]],
    kv_endpoints: Callable[[], list[kv_transfer_pb2.KVEndpoint]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run the worker's gRPC server until SIGINT/SIGTERM: serving, registered, heartbeating."""
    server = grpc.aio.server(options=grpc_options())
    names = add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    address = settings.advertised(port)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"k2serve {settings.role} worker {settings.worker_id} serving gRPC on {address}", flush=True)
    if settings.ready_file:
        with open(settings.ready_file, "w") as f:
            f.write(address)
    beat = None
    if settings.router:
        beat = asyncio.create_task(
            heartbeat_loop(
                settings, lambda: worker_info(settings, engine, address, kv_endpoints()), engine, stop
            )
        )
    await stop.wait()
    logger.info("stopping %s", settings.worker_id)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if beat is not None:
        await beat
    await server.stop(grace=5)
    if on_stop is not None:
        await on_stop()
    engine.shutdown()
