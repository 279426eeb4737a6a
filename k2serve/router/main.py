"""`k2serve router ...`: the public gRPC API, the OpenAI-compatible HTTP API and, on an internal listener
of its own, the worker registry, in one asyncio process (settings: `k2serve.router.settings.RouterSettings`,
built by the CLI). The public port checks API keys, the internal one the cluster credential
(k2serve.rpc.auth); the router dials its workers with the cluster credential."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.api.openai_app import build_app
from k2serve.api.thinking import ThinkingSigner
from k2serve.proto import api_pb2, api_pb2_grpc, registry_pb2, registry_pb2_grpc
from k2serve.proto.limits import CONTROL_MAX_MESSAGE_BYTES, grpc_options
from k2serve.router.backend import ClusterBackend
from k2serve.router.grpc_api import K2ServeServicer
from k2serve.router.kv_index import KVIndex
from k2serve.router.metrics import RouterCollector
from k2serve.router.policy import make_policy
from k2serve.router.registry import RegistryServicer, Worker, WorkerTable
from k2serve.router.settings import ROLE_OF, RouterSettings
from k2serve.rpc.auth import ServerAuth
from k2serve.rpc.safety import add_servicer
from k2serve.rpc.tls import add_port, aio_channel
from k2serve.sessions.service import SessionService
from k2serve.tracing.propagation import TraceparentInterceptor, TraceparentMiddleware
from k2serve.tracing.tracer import make_tracer

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn that leaves SIGINT/SIGTERM to the router, which drains first and then stops it (uvicorn
    would take the signals for itself while it serves)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Router:
    """Owns the worker table, the backend and both servers; `run()` serves until `stop` is set."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.table = WorkerTable(
            settings.heartbeat_timeout_s,
            lambda addr: aio_channel(
                addr, grpc_options(CONTROL_MAX_MESSAGE_BYTES), settings.tls, settings.internal
            ),
            KVIndex(settings.kv_index_max_blocks),
        )
        self.tracer = make_tracer(settings.tracing)
        self.backend = ClusterBackend(
            settings.model_dir,
            self.table,
            settings.model_name,
            policy=make_policy(settings.routing_policy, self.table.kv_index),
            max_in_flight=settings.max_queue,
            max_predicted_ttft_s=settings.max_ttft_s,
            tracer=self.tracer,
        )
        self.stop = asyncio.Event()
        self.grpc_port = settings.grpc_port
        self.internal_port = settings.internal_port
        self.http_port = settings.port
        self.sessions: SessionService | None = None

    def _add_static(self) -> None:
        for i, (role, addr) in enumerate(self.settings.static_workers):
            info = registry_pb2.WorkerInfo(
                worker_id=f"static-{role}-{i}", role=ROLE_OF[role], grpc_address=addr
            )
            self.table.add(info, static=True)

    async def _workers_view(self) -> dict:
        """Operators' view of the registry (no secrets): id, role, address, where Prometheus scrapes it,
        load, in-flight requests."""
        return {
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "role": w.role,
                    "address": w.address,
                    "metrics_url": w.info.metrics_url,
                    "static": w.static,
                    "ready": w.ready,
                    "in_flight": w.in_flight,
                    "prefilling": w.prefilling,
                    "running": w.load.running,
                    "waiting": w.load.waiting,
                    "free_blocks": w.load.free_blocks,
                    "total_blocks": w.load.total_blocks,
                    "kv_index_blocks": self.table.kv_index.blocks_of(w.worker_id),
                    "kv_index_tiers": self.table.kv_index.tier_counts(w.worker_id),
                    "kv_store": w.info.kv_store,  # the shared store it reaches ("" none)
                    "kv_store_capacity_blocks": w.info.kv_store_capacity_blocks,
                    "kv_store_index_blocks": self.table.kv_index.store_blocks(w.info.kv_store),
                    "queued_prefill_tokens": w.load.queued_prefill_tokens,
                    "prefill_tokens_per_s": w.load.prefill_tokens_per_s,
                    "decode_step_ms": w.load.decode_step_ms,
                    "leased_blocks": w.load.leased_blocks,
                }
                for w in self.table.workers.values()
            ],
            "kv_bytes_transferred": self.backend.bytes_transferred,
            "local_prefills": self.backend.local_prefills,
            "prefill_retries": self.backend.prefill_retries,
            "rejected_early": self.backend.rejected,
            "prefill_compute_ms": self.backend.prefill_compute_ms,
            "exposed_transfer_ms": self.backend.exposed_transfer_ms,
            "prefill_tokens_per_s": self.backend.prefill_tok_s,
        }

    async def _follow_readiness(self, health_servicer: health.aio.HealthServicer, names: list[str]) -> None:
        """The gRPC health of `names` ("" and the public API) follows readiness (`/health/ready`):
        SERVING while at least one ready worker of every role is registered and the router does not
        drain; NOT_SERVING otherwise (also once stopping)."""
        serving: bool | None = None
        while True:
            now = not self.stop.is_set() and not self.table.missing()
            if now != serving:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if now
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in names:
                    await health_servicer.set(name, status)
                serving = now
            if self.stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=0.25)

    async def run(self) -> None:
        s = self.settings
        self._add_static()
        if s.redis:
            self.sessions = SessionService.connect(s.redis)
            await self.sessions.check()
            sessions = self.sessions

            def forget(worker: Worker) -> None:
                asyncio.ensure_future(sessions.forget_worker(worker.worker_id))

            self.table.on_remove.append(forget)
        options = grpc_options(CONTROL_MAX_MESSAGE_BYTES)
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [TraceparentInterceptor()] if self.tracer.enabled else []
        )
        interceptors += ServerAuth.api_keys(s.api_key)
        server = grpc.aio.server(options=options, interceptors=interceptors)
        add_servicer(
            server, api_pb2_grpc.add_K2ServeServicer_to_server, K2ServeServicer(self.backend, self.sessions)
        )
        internal = grpc.aio.server(options=options, interceptors=s.internal.server_interceptors())
        add_servicer(
            internal, registry_pb2_grpc.add_WorkerRegistryServicer_to_server, RegistryServicer(self.table)
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, internal)
        public_name = api_pb2.DESCRIPTOR.services_by_name["K2Serve"].full_name
        registry_name = registry_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name
        names = [public_name, registry_name]
        reflection.enable_server_reflection(
            [public_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.grpc_port = add_port(server, f"{s.host}:{s.grpc_port}", s.tls)
        self.internal_port = add_port(internal, f"{s.host}:{s.internal_port}", s.tls)
        await server.start()
        await internal.start()
        # the registry serves from the start (workers must reach it); the API once a request can be served
        await health_servicer.set(registry_name, health_pb2.HealthCheckResponse.SERVING)
        readiness = asyncio.create_task(self._follow_readiness(health_servicer, ["", public_name]))
        app = build_app(self.backend, s.api_key, self.sessions, self.table.missing)
        # thinking signatures every replica verifies: $K2SERVE_THINKING_KEY, else the shared cluster token
        app.state.k2.thinking_signer = ThinkingSigner.from_env(os.environ, s.internal.token)
        app.state.k2.metrics.registry.register(RouterCollector(self.backend, self.table))
        app.add_api_route(
            "/cluster/workers", self._workers_view, methods=["GET"], dependencies=app.state.k2_auth
        )
        if self.tracer.enabled:
            app.add_middleware(TraceparentMiddleware)
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=s.tls.cert if s.tls else None,
            ssl_keyfile=s.tls.key if s.tls else None,
        )
        http = _Uvicorn(config)
        http_task = asyncio.create_task(http.serve())
        while not http.started and not http_task.done():
            await asyncio.sleep(0.02)
        if http_task.done():
            await http_task
        self.http_port = http.servers[0].sockets[0].getsockname()[1] if http.servers else s.port
        monitor = asyncio.create_task(self.table.monitor(self.stop))
        scheme = "https" if s.tls else "http"
        grpc_tls = "" if s.tls is None else " (mutual TLS)" if s.tls.mutual else " (TLS)"
        print(
            f"k2serve router: HTTP {scheme}://{s.host}:{self.http_port}/v1  "
            f"gRPC{grpc_tls} {s.host}:{self.grpc_port}  internal (workers) {s.host}:{self.internal_port}",
            flush=True,
        )
        if s.ready_file:
            Path(s.ready_file).write_text(f"{self.http_port} {self.grpc_port} {self.internal_port}")
        await self.stop.wait()
        # Drain: refuse new requests, give in-flight ones time to finish, then stop everything.
        self.backend.draining = True
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for _ in range(200):
            if not self.backend.in_flight:
                break
            await asyncio.sleep(0.05)
        http.should_exit = True
        with contextlib.suppress(Exception):
            await http_task
        await server.stop(grace=2)
        await internal.stop(grace=2)
        await monitor
        await readiness
        if self.sessions is not None:
            self.sessions.close()
        await asyncio.to_thread(self.tracer.shutdown)  # exports the spans still buffered


def main(settings: RouterSettings) -> int:
    """Run the router until SIGINT/SIGTERM; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        router = Router(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, router.stop.set)
        with contextlib.ExitStack() as stack:
            if settings.routing_log:  # appended to: a restarted router keeps the earlier lines
                router.backend.routing_log = stack.enter_context(open(settings.routing_log, "a"))
            await router.run()

    asyncio.run(run())
    return 0
