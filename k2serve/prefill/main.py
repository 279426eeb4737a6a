"""`k2serve prefill ...`: a prefill worker process (settings: `k2serve.worker.settings.WorkerSettings`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from k2serve.prefill.worker import PrefillServicer
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.rpc.safety import add_servicer
from k2serve.tracing.tracer import make_tracer
from k2serve.worker.runtime import load_engine, serve_worker
from k2serve.worker.settings import WorkerSettings


async def run(settings: WorkerSettings) -> int:
    """Serve until stopped; the exit status (non-zero when the expert-parallel group was lost)."""
    stop = asyncio.Event()
    engine = load_engine(settings, stop)
    engine.start()
    tracer = make_tracer(settings.tracing)
    servicer = PrefillServicer(
        engine, settings.tls, tracer, settings.internal.metadata(), settings.kv_transfer_options()
    )

    def add(server: grpc.aio.Server) -> list[str]:
        add_servicer(server, worker_pb2_grpc.add_PrefillWorkerServicer_to_server, servicer)
        return [worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name]

    async def on_stop() -> None:
        servicer.senders.shutdown()
        await asyncio.to_thread(tracer.shutdown)

    return await serve_worker(settings, engine, add, lambda: [], on_stop, stop)


def main(settings: WorkerSettings) -> int:
    """Run the prefill worker until stopped; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(settings))
