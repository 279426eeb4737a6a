"""`k2serve decode ...`: a decode worker process (settings: `k2serve.worker.settings.WorkerSettings`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from k2serve.decode.worker import DecodeServicer
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.rpc.safety import add_servicer
from k2serve.tracing.tracer import make_tracer
from k2serve.transfer.grpc_backend import GrpcKVReceiver
from k2serve.transfer.registry import make_receiver
from k2serve.transfer.torch_receiver import TorchKVReceiver
from k2serve.worker.runtime import load_engine, serve_worker
from k2serve.worker.settings import WorkerSettings


async def run(settings: WorkerSettings) -> int:
    """Serve until stopped; the exit status (non-zero when the expert-parallel group was lost)."""
    stop = asyncio.Event()
    engine = load_engine(settings, stop)
    engine.start()
    options: dict[str, object] = settings.kv_transfer_options()
    if settings.transfer_backend == "grpc":  # torch.distributed carries no credential (see README)
        options["interceptors"] = settings.internal.thread_server_interceptors()
    if settings.tls is not None:
        options["credentials"] = settings.tls.server_credentials()
    receiver = make_receiver(
        settings.transfer_backend, f"{settings.host}:{settings.transfer_port}", **options
    )
    kv_port = int(receiver.endpoint.rsplit(":", 1)[1])
    fallback: GrpcKVReceiver | None = None
    payload_device, fallback_address = "", None
    if isinstance(receiver, TorchKVReceiver):  # senders that cannot pair over torch send over gRPC
        fallback = GrpcKVReceiver(
            f"{settings.host}:0",
            interceptors=settings.internal.thread_server_interceptors(),
            inbox=receiver.inbox,
        )
        payload_device = receiver.device.type
        fallback_address = settings.advertised(int(fallback.endpoint.rsplit(":", 1)[1]))
    tracer = make_tracer(settings.tracing)
    servicer = DecodeServicer(
        engine,
        receiver,
        settings.transfer_backend,
        settings.advertised(kv_port),
        tracer,
        payload_device,
        fallback_address,
    )
    stop_expiry = asyncio.Event()
    expiry = asyncio.create_task(servicer.expire_reservations(stop_expiry))

    def add(server: grpc.aio.Server) -> list[str]:
        add_servicer(server, worker_pb2_grpc.add_DecodeWorkerServicer_to_server, servicer)
        return [worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name]

    async def on_stop() -> None:
        stop_expiry.set()
        await expiry
        if fallback is not None:
            fallback.shutdown()
        receiver.shutdown()
        await asyncio.to_thread(tracer.shutdown)

    return await serve_worker(
        settings,
        engine,
        add,
        lambda: [servicer.endpoint()],
        on_stop,
        stop,
        pending=lambda: len(servicer.reservations),  # reserved, KV and Decode call still coming
    )


def main(settings: WorkerSettings) -> int:
    """Run the decode worker until stopped; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(settings))
