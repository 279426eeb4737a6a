"""`k2serve prefill ...`: a prefill worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging

import torch

from k2serve.cluster.worker_base import WorkerSettings, serve_worker
from k2serve.engine.async_engine import AsyncEngine
from k2serve.prefill.worker import PrefillServicer
from k2serve.proto import worker_pb2, worker_pb2_grpc


async def run(settings: WorkerSettings) -> None:
    engine = AsyncEngine.from_pretrained(
        settings.model_dir, getattr(torch, settings.dtype), settings.engine, settings.model_name
    )
    engine.start()
    servicer = PrefillServicer(engine)

    def add(server) -> list[str]:  # noqa: ANN001
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name]

    async def stop() -> None:
        servicer.senders.shutdown()

    await serve_worker(settings, engine, add, lambda: [], stop)


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(WorkerSettings.from_args("prefill", args)))
    return 0
