"""`k2serve decode ...`: a decode worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging

import torch

from k2serve.cluster.worker_base import WorkerSettings, serve_worker
from k2serve.decode.worker import DecodeServicer
from k2serve.engine.async_engine import AsyncEngine
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.transfer.registry import make_receiver


async def run(settings: WorkerSettings) -> None:
    engine = AsyncEngine.from_pretrained(
        settings.model_dir, getattr(torch, settings.dtype), settings.engine, settings.model_name
    )
    engine.start()
    receiver = make_receiver(settings.transfer_backend, f"{settings.host}:{settings.transfer_port}")
    servicer = DecodeServicer(engine, receiver, settings.transfer_backend)
    stop_expiry = asyncio.Event()
    expiry = asyncio.create_task(servicer.expire_reservations(stop_expiry))

    def add(server) -> list[str]:  # noqa: ANN001
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name]

    async def stop() -> None:
        stop_expiry.set()
        await expiry
        receiver.shutdown()

    await serve_worker(settings, engine, add, lambda: [servicer.endpoint()], stop)


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(WorkerSettings.from_args("decode", args)))
    return 0
